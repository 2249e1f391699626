//! Feeds arbitrary bytes to the invocation decoder (docs/WARM.md): it must never panic or
//! allocate past the payload, and whatever it accepts must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm_agent::invoke::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(inv) = decode(data) {
        assert_eq!(encode(&inv).unwrap(), data);
    }
});
