//! Reads arbitrary bytes as the FILE argument of `smolvm run` and decides whether it is a
//! registry reference; any panic is a bug, and a recognised reference's parts must rebuild
//! the input exactly (the stub passes it on to `smolpack pull` unchanged).
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm_formats::reference::parse_reference;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(p) = parse_reference(s) {
        let mut back = format!("{}/{}", p.registry, p.repository);
        if let Some(t) = p.tag {
            back = format!("{back}:{t}");
        }
        if let Some(d) = p.digest {
            back = format!("{back}@sha256:{d}");
        }
        assert_eq!(back, s);
    }
});
