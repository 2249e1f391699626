//! The smolpack library: what the `smolpack` command is built from.

pub mod smolfile;
