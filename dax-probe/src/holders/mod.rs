//! The live holder map: who maps which DAX page right now.
//!
//! `map` stores it, `apply` keeps it exact from kernel events (re-reading page tables where
//! an event cannot describe the change), `scan` reads procfs for the start-up scan, one-shot
//! answers and reconciliation, `liveness` tells who exited without asking /proc, `query` answers "who maps X", `ranges` hands on each page of a
//! coalesced fault range once however often it is read, and `bindings` tells a mapping of a
//! device's current binding from one of a binding that left.

pub mod apply;
pub mod bindings;
pub mod liveness;
pub mod map;
pub mod query;
pub mod ranges;
pub mod scan;

pub use apply::{Applier, Stats};
pub use map::{FileKey, HolderMap};
