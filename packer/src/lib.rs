//! The smolpack library: what the `smolpack` command is built from.

pub mod artifacts;
pub mod build;
pub mod gc;
pub mod guest;
pub mod pack;
pub mod progress;
pub mod registry;
pub mod signing;
pub mod smolfile;
pub mod targets;
