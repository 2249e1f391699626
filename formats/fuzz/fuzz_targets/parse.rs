//! Opens arbitrary bytes as a `.smolmachine` and as a packed executable and walks every
//! reader entry point; any panic, hang or out-of-memory is a bug. Each input is tried as
//! given and again with all checksums recomputed, so mutations also reach the structural
//! checks that sit behind the checksums.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smolvm_formats::testing::exercise(data);
    let mut resealed = data.to_vec();
    smolvm_formats::testing::reseal(&mut resealed);
    if resealed != data {
        smolvm_formats::testing::exercise(&resealed);
    }
});
