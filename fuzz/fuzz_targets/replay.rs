//! A `monitor --json` recording given to `tui --replay`. The body is dax_probe::fuzzing::replay
//! (shared with the corpus smoke test that `cargo test` runs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dax_probe::fuzzing::replay(data));
