//! Outputs. Nothing here touches the kernel directly; it renders what probe/topology produce.

pub mod audit;
pub mod badblocks;
pub mod devices;
pub mod doctor;
pub mod drain;
pub mod history;
pub mod holders;
pub mod monitor;
pub mod tui;
