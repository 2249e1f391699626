//! The smolvm VMM runtime.

pub mod devices;
