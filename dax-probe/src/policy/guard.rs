//! Never signal what we have not proven: the checks every signal passes first.

use std::fmt;

use super::{config::Rule, signal::PidFd};
use crate::holders::scan::{Classifier, Paths, Procfs, runs_in};

/// Why a process was not signalled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Init,
    Agent,
    KernelThread,
    Excluded,
    Gone,
    PidReused,
    NoLongerMaps,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Init => "PID 1 is never signalled",
            Refusal::Agent => "the agent never signals itself",
            Refusal::KernelThread => "kernel threads are never signalled",
            Refusal::Excluded => "excluded by policy",
            Refusal::Gone => "process already gone",
            Refusal::PidReused => "pid now belongs to another process",
            Refusal::NoLongerMaps => "no longer maps the device",
        })
    }
}

/// `PF_KTHREAD` in /proc/PID/stat's flags (field 9).
const PF_KTHREAD: u64 = 0x0020_0000;

fn stat_flags(proc_root: &std::path::Path, pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join(format!("{pid}/stat"))).ok()?;
    let close = text.rfind(')')?;
    // After the comm: state(3) ppid pgrp session tty_nr tpgid flags(9)
    text[close + 1..].split_whitespace().nth(6)?.parse().ok()
}

/// A process about to be signalled.
pub struct Candidate<'a> {
    pub pid: u32,
    /// Start time we saw it with (0: unknown).
    pub start_time: u64,
    pub comm: &'a str,
}

/// Runs every check and returns a pidfd pinned to the verified process.
///
/// Order matters: the pidfd is opened first and the identity (start time) checked after, so
/// the process we verify is the process the pidfd will signal.
pub fn admit(
    c: &Candidate,
    rule: &Rule,
    pfn_ranges: &[(u64, u64)],
    proc: &dyn Procfs,
    proc_root: &std::path::Path,
    class: &Classifier,
) -> Result<PidFd, Refusal> {
    if c.pid == 1 {
        return Err(Refusal::Init);
    }
    if c.pid == std::process::id() {
        return Err(Refusal::Agent);
    }
    if rule.exclude.iter().any(|e| e.matches(c.pid, c.comm)) {
        return Err(Refusal::Excluded);
    }
    let fd = PidFd::open(c.pid).map_err(|_| Refusal::Gone)?;
    if stat_flags(proc_root, c.pid).is_some_and(|f| f & PF_KTHREAD != 0) {
        return Err(Refusal::KernelThread);
    }
    let (start, comm) = proc.stat(c.pid).ok_or(Refusal::Gone)?;
    if c.start_time != 0 && start != c.start_time {
        return Err(Refusal::PidReused);
    }
    if rule.exclude.iter().any(|e| e.matches(c.pid, &comm)) {
        return Err(Refusal::Excluded);
    }
    let mut paths = Paths::new();
    let runs =
        runs_in(proc, class, c.pid, 0, u64::MAX >> 12, &mut paths).map_err(|_| Refusal::Gone)?;
    let maps_it = runs.iter().any(|(_, r)| {
        pfn_ranges
            .iter()
            .any(|&(s, e)| r.pfn < e && r.pfn + r.npages > s)
    });
    if !maps_it {
        return Err(Refusal::NoLongerMaps);
    }
    Ok(fd)
}
