//! Architecture-specific machine setup. `aarch64` is plain data and pure
//! functions, compiled on every host; `x86_64` only on x86_64.

pub mod aarch64;

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
