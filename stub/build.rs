//! Assembles the VMM test guest (`testguest/guest.S`) into a flat binary.
//!
//! Needs GNU `as` and `objcopy` (binutils) on x86_64 Linux. Without them the
//! crate still builds; the guest image is then empty and the tests that need
//! it report that binutils is missing.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=testguest/guest.S");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let bin = out.join("testguest.bin");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch != "x86_64" || os != "linux" {
        fs::write(&bin, []).expect("write empty test guest image");
        return;
    }
    let obj = out.join("testguest.o");
    let assembled = Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg("testguest/guest.S")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !assembled {
        println!("cargo:warning=GNU as/objcopy unavailable: the VMM test guest is not built (install binutils)");
        fs::write(&bin, []).expect("write empty test guest image");
    }
}
