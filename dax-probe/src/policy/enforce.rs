//! Carrying out a rule against the holders of a device: signal each (after the guard's checks
//! and an audit record), then, after the grace period, re-check and escalate.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    audit::{AuditLog, Record, now},
    config::{Action, Rule},
    guard::{Candidate, Refusal, admit},
    signal::Signal,
};
use crate::holders::{
    query::HolderRow,
    scan::{Classifier, Procfs},
};

/// One thing enforcement did (or refused to do), as reported.
#[derive(Clone, Debug, Serialize)]
pub struct ActionReport {
    pub device: String,
    pub pid: u32,
    pub comm: String,
    /// `signal`, `escalate`, `skip`, `report-only`.
    pub action: &'static str,
    pub signal: Option<String>,
    pub reason: String,
    /// Microseconds from the kernel reporting the departure to this action (CLOCK_BOOTTIME).
    pub since_departure_us: Option<u64>,
}

/// Nanoseconds since boot, comparable with kernel event timestamps.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Pending {
    due: Instant,
    device: String,
    pfn_ranges: Vec<(u64, u64)>,
    rule: Rule,
    targets: Vec<(u32, u64, String)>,
    since_ns: u64,
}

pub struct Enforcer {
    pub audit: AuditLog,
    pending: Vec<Pending>,
    proc_root: PathBuf,
}

impl Enforcer {
    pub fn new(audit: AuditLog, root: &Path) -> Self {
        Self {
            audit,
            pending: Vec::new(),
            proc_root: root.join("proc"),
        }
    }

    fn log(&mut self, r: Record) {
        if let Err(e) = self.audit.write(&r) {
            // Without the audit trail nothing may be signalled: the caller checks
            // `audit_ok` before every signal.
            log::error!(
                "cannot write the audit log {}: {e}",
                self.audit.path.display()
            );
        }
    }

    /// Applies `rule` to `holders` of `device` now; schedules the escalation.
    #[allow(clippy::too_many_arguments)]
    pub fn act(
        &mut self,
        device: &str,
        pfn_ranges: &[(u64, u64)],
        holders: &[HolderRow],
        rule: &Rule,
        since_ns: u64,
        proc: &dyn Procfs,
        class: &Classifier,
        why: &str,
    ) -> Vec<ActionReport> {
        let mut out = Vec::new();
        let mut targets: Vec<(u32, u64, String)> = holders
            .iter()
            .map(|h| (h.pid, h.start_time, h.comm.clone()))
            .collect();
        targets.sort();
        targets.dedup_by_key(|t| t.0);
        self.log(Record {
            time: now(),
            action: "decide",
            device,
            pid: None,
            start_time: None,
            comm: None,
            signal: (rule.action == Action::Signal).then(|| rule.signal.name()),
            detail: format!(
                "{why}: {} holder(s); policy {}",
                targets.len(),
                match rule.action {
                    Action::Report => "report only".to_string(),
                    Action::Signal => format!(
                        "signal {} then {} after {:?}",
                        rule.signal,
                        rule.escalate
                            .map(|s| s.name())
                            .unwrap_or_else(|| "nothing".into()),
                        rule.grace
                    ),
                }
            ),
        });
        if rule.action == Action::Report {
            for (pid, _, comm) in &targets {
                out.push(ActionReport {
                    device: device.into(),
                    pid: *pid,
                    comm: comm.clone(),
                    action: "report-only",
                    signal: None,
                    reason: "policy action is report".into(),
                    since_departure_us: None,
                });
            }
            return out;
        }
        let signalled = self.signal_all(
            device,
            pfn_ranges,
            &targets,
            rule,
            rule.signal,
            "signal",
            since_ns,
            proc,
            class,
            &mut out,
        );
        if rule.escalate.is_some() && !signalled.is_empty() {
            self.pending.push(Pending {
                due: Instant::now() + rule.grace,
                device: device.into(),
                pfn_ranges: pfn_ranges.to_vec(),
                rule: rule.clone(),
                targets: signalled,
                since_ns,
            });
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn signal_all(
        &mut self,
        device: &str,
        pfn_ranges: &[(u64, u64)],
        targets: &[(u32, u64, String)],
        rule: &Rule,
        sig: Signal,
        action: &'static str,
        since_ns: u64,
        proc: &dyn Procfs,
        class: &Classifier,
        out: &mut Vec<ActionReport>,
    ) -> Vec<(u32, u64, String)> {
        let mut sent = Vec::new();
        for (pid, start, comm) in targets {
            let c = Candidate {
                pid: *pid,
                start_time: *start,
                comm,
            };
            match admit(&c, rule, pfn_ranges, proc, &self.proc_root, class) {
                Err(refusal) => {
                    self.log(Record {
                        time: now(),
                        action: "skip",
                        device,
                        pid: Some(*pid),
                        start_time: Some(*start),
                        comm: Some(comm),
                        signal: Some(sig.name()),
                        detail: refusal.to_string(),
                    });
                    // A holder that left in time is the good outcome, not worth a line per
                    // process on escalation.
                    if !(action == "escalate"
                        && matches!(refusal, Refusal::Gone | Refusal::NoLongerMaps))
                    {
                        out.push(ActionReport {
                            device: device.into(),
                            pid: *pid,
                            comm: comm.clone(),
                            action: "skip",
                            signal: Some(sig.name()),
                            reason: refusal.to_string(),
                            since_departure_us: None,
                        });
                    }
                }
                Ok(fd) => {
                    // The record is on disk before the signal leaves.
                    let audit_ok = self
                        .audit
                        .write(&Record {
                            time: now(),
                            action,
                            device,
                            pid: Some(*pid),
                            start_time: Some(*start),
                            comm: Some(comm),
                            signal: Some(sig.name()),
                            detail: "verified through a pidfd: maps the device".into(),
                        })
                        .is_ok();
                    if !audit_ok {
                        out.push(ActionReport {
                            device: device.into(),
                            pid: *pid,
                            comm: comm.clone(),
                            action: "skip",
                            signal: Some(sig.name()),
                            reason: "the audit log cannot be written: nothing is signalled".into(),
                            since_departure_us: None,
                        });
                        continue;
                    }
                    let result = fd.send(sig);
                    let since = boottime_ns().saturating_sub(since_ns) / 1000;
                    match result {
                        Ok(()) => {
                            sent.push((*pid, *start, comm.clone()));
                            out.push(ActionReport {
                                device: device.into(),
                                pid: *pid,
                                comm: comm.clone(),
                                action,
                                signal: Some(sig.name()),
                                reason: "maps the device".into(),
                                since_departure_us: (since_ns != 0).then_some(since),
                            });
                        }
                        Err(e) => {
                            self.log(Record {
                                time: now(),
                                action: "skip",
                                device,
                                pid: Some(*pid),
                                start_time: Some(*start),
                                comm: Some(comm),
                                signal: Some(sig.name()),
                                detail: format!("signal failed: {e}"),
                            });
                        }
                    }
                }
            }
        }
        sent
    }

    /// Earliest pending escalation.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.due).min()
    }

    /// Runs the escalations that are due.
    pub fn tick(&mut self, proc: &dyn Procfs, class: &Classifier) -> Vec<ActionReport> {
        let now_i = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.due <= now_i);
        self.pending = keep;
        let mut out = Vec::new();
        for p in due {
            let Some(sig) = p.rule.escalate else { continue };
            self.signal_all(
                &p.device,
                &p.pfn_ranges,
                &p.targets,
                &p.rule,
                sig,
                "escalate",
                p.since_ns,
                proc,
                class,
                &mut out,
            );
        }
        out
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Waits in small steps until `cond` holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(limit.saturating_sub(start.elapsed())));
    }
}
