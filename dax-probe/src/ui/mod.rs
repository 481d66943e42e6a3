//! Outputs. Nothing here touches the kernel directly; it renders what probe/topology produce.

pub mod devices;
pub mod doctor;
pub mod holders;
pub mod monitor;
