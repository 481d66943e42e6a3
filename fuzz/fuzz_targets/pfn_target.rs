//! `holders TARGET` resolution and the answer from a map. The body is dax_probe::fuzzing::pfn_target
//! (shared with the corpus smoke test that `cargo test` runs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dax_probe::fuzzing::pfn_target(data));
