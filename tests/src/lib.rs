//! What runs inside the test VM: PID 1 (`dax-vm-init`), a puppet workload (`dax-workload`)
//! and the scenarios that drive both and check the agent against the kernel's ground truth.
//!
//! Ground truth is read here independently of the agent's own code (`pagemap`, `stat`,
//! sysfs), so a bug shared by the two cannot make a scenario pass.

pub mod agent;
pub mod pagemap;
pub mod pmem;
pub mod puppet;
pub mod report;
pub mod scenarios;
pub mod sys;
pub mod truth;
