//! Scenario registry. Each scenario runs on one or more targets (file systems / device kinds)
//! and reports an [`Outcome`] with the numbers it compared.

pub mod bad_input;
pub mod compare;
pub mod fault_trace;

use std::fmt;

use anyhow::Result;
use serde_json::Value;

use crate::{pmem::Fsdax, report::Outcome};

/// What a scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Ext4,
    Xfs,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Ext4 => "ext4",
            Target::Xfs => "xfs",
        })
    }
}

/// A mounted DAX file system prepared by the VM init.
#[derive(Clone, Debug)]
pub struct DaxFs {
    pub target: Target,
    pub dev: Fsdax,
    pub mnt: String,
    /// xfs only: created with reflink+rmapbt (kernel accepted DAX on it).
    pub reflink: bool,
}

/// The prepared machine.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub fs: Vec<DaxFs>,
    /// `dax-probe monitor` run before any namespace was made DAX: (exit code, stderr).
    pub before_setup_monitor: Option<(Option<i32>, String)>,
}

impl Env {
    pub fn fs(&self, t: Target) -> Option<&DaxFs> {
        self.fs.iter().find(|f| f.target == t)
    }
}

pub struct Scenario {
    pub name: &'static str,
    pub targets: &'static [Target],
    pub run: fn(&Env, &DaxFs) -> Result<Checked>,
}

/// What a scenario found: pass/fail is decided by the scenario from these.
pub struct Checked {
    pub passed: bool,
    pub summary: String,
    pub counts: Value,
    pub details: Vec<String>,
}

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "fault-trace",
            targets: &[Target::Ext4, Target::Xfs],
            run: fault_trace::run,
        },
        Scenario {
            name: "fault-trace-fallback",
            targets: &[Target::Ext4],
            run: fault_trace::run_fallback,
        },
        Scenario {
            name: "fault-trace-pagemap",
            targets: &[Target::Ext4],
            run: fault_trace::run_pagemap,
        },
        Scenario {
            name: "bad-input",
            targets: &[Target::Ext4],
            run: bad_input::run,
        },
    ]
}

/// Runs one scenario on one target, turning errors and panics into a failed outcome.
pub fn execute(s: &Scenario, env: &Env, target: Target) -> Outcome {
    let base = |passed, summary: String, counts, details| Outcome {
        scenario: s.name.to_string(),
        target: target.to_string(),
        passed,
        summary,
        counts,
        details,
    };
    let Some(fs) = env.fs(target) else {
        return base(
            false,
            format!("{target} was not prepared in this VM"),
            Value::Null,
            Vec::new(),
        );
    };
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (s.run)(env, fs)));
    match res {
        Ok(Ok(c)) => base(c.passed, c.summary, c.counts, c.details),
        Ok(Err(e)) => base(
            false,
            format!("error: {e:#}"),
            Value::Null,
            crate::sys::dmesg_tail(15),
        ),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            base(false, format!("panicked: {msg}"), Value::Null, Vec::new())
        }
    }
}
