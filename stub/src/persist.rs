//! The save/restore contract every stateful component implements. A leaf
//! module: components (devices, vCPUs) and the machine state that aggregates
//! them both depend on it, and it depends on nothing in the crate.

use serde::{Deserialize, Serialize};

/// The save/restore contract of a component: its state is a plain serde
/// struct, separate from the runtime object (which holds fds and threads).
pub trait Persist: Sized {
    /// The saved state.
    type State: Serialize + for<'de> Deserialize<'de>;
    /// What restoring needs besides the state (the VM, an id, ...).
    type Args<'a>;
    /// Failure of save or restore.
    type Error;
    /// Capture the component's state.
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Rebuild the component from `state`.
    fn restore(args: Self::Args<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}
