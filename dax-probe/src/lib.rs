//! dax-probe: watch and police DAX mappings of persistent memory.
//!
//! Flow, one direction only: kernel hook → ring buffer (`probe`) → decoder (`probe::decode`)
//! → state (`topology`, `holders`) → outputs (`ui`, the control socket). `agent` runs the
//! loop.

pub mod agent;
pub mod badblocks;
pub mod control;
pub mod event;
pub mod exit;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod holders;
pub mod incident;
pub mod metrics;
pub mod os;
pub mod policy;
pub mod privilege;
pub mod probe;
pub mod proc;
pub mod schema;
pub mod topology;
pub mod ui;
