//! dax-probe: watch and police DAX mappings of persistent memory.
//!
//! Flow, one direction only: kernel hook → ring buffer (`probe`) → decoder (`probe::decode`)
//! → state (`topology`, later the holder map) → outputs (`ui`).

pub mod event;
pub mod exit;
pub mod privilege;
pub mod probe;
pub mod proc;
pub mod topology;
pub mod ui;
