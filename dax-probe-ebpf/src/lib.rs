#![no_std]
// Library target so `cargo check --workspace` and clippy can see the crate; the programs live in
// the `dax-probe` binary target (src/main.rs).
