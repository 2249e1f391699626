//! Opens arbitrary bytes as a `.smolmachine` and as a packed executable and walks every
//! reader entry point; any panic, hang or out-of-memory is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smolvm_formats::testing::exercise(data);
});
