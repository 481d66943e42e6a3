//! /proc/PID/cgroup (every path component attacker-chosen). The body is
//! dax_probe::fuzzing::cgroup (shared with the corpus smoke test that `cargo test` runs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dax_probe::fuzzing::cgroup(data));
