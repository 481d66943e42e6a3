//! /proc text the agent parses (names and paths chosen by users). The body is dax_probe::fuzzing::procfs_text
//! (shared with the corpus smoke test that `cargo test` runs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dax_probe::fuzzing::procfs_text(data));
