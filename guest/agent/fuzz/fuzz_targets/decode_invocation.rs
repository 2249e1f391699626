//! Feeds arbitrary bytes to the invocation decoder (docs/WARM.md): it must never panic or
//! allocate past the payload, and whatever it accepts must encode back to the same bytes.
//! The same bytes go to the exit report's parser, under the same rule.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm_agent::invoke::{decode, encode, exit_report, parse_exit_report};

fuzz_target!(|data: &[u8]| {
    if let Ok(inv) = decode(data) {
        assert_eq!(encode(&inv).unwrap(), data);
    }
    if let Ok(Some(status)) = parse_exit_report(data) {
        assert_eq!(exit_report(status).as_bytes(), data);
    }
});
