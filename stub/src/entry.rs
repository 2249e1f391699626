//! The `smolvm` executable's entry: the runtime's command line is `main.rs`
//! (kept at that path) on both architectures; aarch64 also has the VMM test
//! guest's commands (`cli_aarch64.rs`, `smolvm testguest ...`), which the
//! arm64 tier runs.

#[path = "main.rs"]
mod cli;
#[cfg(target_arch = "aarch64")]
mod cli_aarch64;

fn main() -> std::process::ExitCode {
    #[cfg(target_arch = "aarch64")]
    if std::env::args_os().nth(1).is_some_and(|a| a == "testguest") {
        return cli_aarch64::main();
    }
    cli::main()
}
