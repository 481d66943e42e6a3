//! Enforcement, safely. Policy decides per device whether holders are only reported or
//! signalled (which signal, how long to wait, what to escalate to); the guard refuses unsafe
//! targets and re-verifies through a pidfd that a process still maps the device right
//! before signalling it; every decision and signal is written to the audit log (flushed to
//! disk first) before the signal goes out.

pub mod audit;
pub mod config;
pub mod enforce;
pub mod guard;
pub mod pins;
pub mod pipeline;
pub mod signal;
pub mod unbind_guard;

pub use config::{Action, Policy, Rule};
