//! The live holder map: who maps which DAX page right now.
//!
//! `map` stores it, `apply` keeps it exact from kernel events (re-reading page tables where
//! an event cannot describe the change), `scan` reads procfs for the start-up scan, one-shot
//! answers and reconciliation, and `query` answers "who maps X".

pub mod apply;
pub mod map;
pub mod query;
pub mod scan;

pub use apply::{Applier, Stats};
pub use map::{FileKey, HolderMap};
