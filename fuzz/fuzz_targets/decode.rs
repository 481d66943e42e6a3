//! Ring records as the kernel (or a corrupted ring) hands them over. The body is dax_probe::fuzzing::decode
//! (shared with the corpus smoke test that `cargo test` runs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dax_probe::fuzzing::decode(data));
