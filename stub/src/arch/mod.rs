//! Architecture-specific machine setup. `aarch64` is plain data and pure
//! functions, compiled on every host; `x86_64` only on x86_64.

pub mod aarch64;

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

// The host architecture's modules under one name, for the code shared by both.
#[cfg(target_arch = "aarch64")]
pub use self::aarch64::{cpu_model, state};
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{cpu_model, state};
