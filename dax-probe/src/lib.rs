//! dax-probe: watch and police DAX mappings of persistent memory.
//!
//! Flow, one direction only: kernel hook → ring buffer (`probe`) → decoder (`probe::decode`)
//! → state (`topology`, `holders`) → outputs (`ui`, the control socket). `agent` runs the
//! loop.

pub mod agent;
pub mod control;
pub mod event;
pub mod exit;
pub mod holders;
pub mod incident;
pub mod policy;
pub mod privilege;
pub mod probe;
pub mod proc;
pub mod topology;
pub mod ui;
