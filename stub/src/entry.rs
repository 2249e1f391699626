//! The `smolvm` executable's entry: the x86_64 runtime's command line is
//! `main.rs` (kept at that path); aarch64 has the test-guest commands of
//! `cli_aarch64.rs` until the runtime (machine, devices, Linux guests) is
//! ported there (issue 15).

#[cfg(target_arch = "aarch64")]
mod cli_aarch64;
#[cfg(target_arch = "x86_64")]
#[path = "main.rs"]
mod cli_x86_64;

fn main() -> std::process::ExitCode {
    #[cfg(target_arch = "x86_64")]
    {
        cli_x86_64::main()
    }
    #[cfg(target_arch = "aarch64")]
    {
        cli_aarch64::main()
    }
}
