//! Carrying out a rule against the holders of a device: signal each (after the guard's checks
//! and an audit record), then, after the grace period, re-check and escalate.

use std::time::{Duration, Instant};

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    audit::{Record, now},
    config::{Action, Rule},
    guard::{Candidate, Held, Proof, Refusal, Scope, admit},
    pins::Pins,
    signal::Signal,
};
use crate::{
    holders::{
        map::FileKey,
        query::{HolderRow, PROBES},
        scan::Classifier,
    },
    os::{AuditSink, Os},
    proc::cgroup::Container,
};

/// One thing enforcement did (or refused to do), as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ActionReport {
    pub device: String,
    pub pid: u32,
    pub comm: String,
    /// `signal`, `escalate`, `skip`, `report-only`.
    pub action: Cow<'static, str>,
    pub signal: Option<String>,
    pub reason: String,
    /// Microseconds from the kernel reporting the departure to this action (CLOCK_BOOTTIME).
    pub since_departure_us: Option<u64>,
    /// Microseconds from the kernel's report to the agent reading it (the ring and the
    /// agent's queue; listing the holders comes after), the same for every action of one
    /// departure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_us: Option<u64>,
    /// Microseconds from the kernel's report to the agent having listed its holders from
    /// the holder map (the departure line's holders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listed_us: Option<u64>,
    /// Microseconds from the kernel's report to the departing devices fenced (the fence's
    /// audit record written first); absent where nothing was fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_us: Option<u64>,
    /// Microseconds from the kernel's report to this process's verdict (pidfd opened, its
    /// identity and mapping proven); `since_departure_us` minus this is the audit flush
    /// and the signals sent before this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict_us: Option<u64>,
    /// The process's cgroup, container and pod, as its holder row has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// A process enforcement acts on: its identity, and its workload for the reports.
#[derive(Clone, Debug)]
struct Whom {
    pid: u32,
    start: u64,
    comm: String,
    cgroup: Option<String>,
    container: Option<Container>,
    pod_uid: Option<String>,
    /// Every file of the device it holds pages of, as the holder map says.
    held: Vec<Held>,
    /// Addresses of some of those pages (the re-check looks there first).
    at: Vec<u64>,
}

impl Whom {
    fn of(h: &HolderRow) -> Self {
        Self {
            pid: h.pid,
            start: h.start_time,
            comm: h.comm.clone(),
            cgroup: h.cgroup.clone(),
            container: h.container.clone(),
            pod_uid: h.pod_uid.clone(),
            held: vec![held_of(h)],
            at: h.probe_at.clone(),
        }
    }

    /// One target per process, whatever number of its files the rows name.
    fn of_rows(holders: &[HolderRow]) -> Vec<Self> {
        let mut targets: Vec<Whom> = Vec::with_capacity(holders.len());
        let mut rows: Vec<&HolderRow> = holders.iter().collect();
        rows.sort_by(|a, b| (a.pid, a.start_time, &a.comm).cmp(&(b.pid, b.start_time, &b.comm)));
        for h in rows {
            match targets.last_mut() {
                Some(t) if t.pid == h.pid => {
                    t.held.push(held_of(h));
                    let room = PROBES.saturating_sub(t.at.len());
                    t.at.extend(h.probe_at.iter().take(room));
                }
                _ => targets.push(Whom::of(h)),
            }
        }
        targets
    }
}

fn held_of(h: &HolderRow) -> Held {
    Held {
        file: FileKey {
            dev: h.dev,
            ino: h.ino,
        },
        offsets: h.offsets.clone(),
    }
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

/// A record about one target: every record of a target names the same process and signal.
fn record_of<'a>(
    w: &'a Whom,
    device: &'a str,
    sig: Signal,
    action: &'static str,
    detail: String,
) -> Record<'a> {
    Record {
        time: now(),
        action,
        device,
        pid: Some(w.pid),
        start_time: Some(w.start),
        comm: Some(&w.comm),
        signal: Some(sig.name()),
        cgroup: w.cgroup.as_deref(),
        container: w.container.as_ref(),
        pod_uid: w.pod_uid.as_deref(),
        detail,
    }
}

/// Targets verified, audited and signalled together (see `signal_all`): bounds the pidfds
/// held open at once well below the default open-file limit.
const SIGNAL_BATCH: usize = 256;

struct Pending {
    due: Instant,
    device: String,
    pfn_ranges: Vec<(u64, u64)>,
    proof: Proof,
    stamps: super::guard::Stamps,
    rule: Rule,
    targets: Vec<Whom>,
    since_ns: u64,
}

pub struct Enforcer {
    pub audit: Box<dyn AuditSink>,
    pending: Vec<Pending>,
    /// How the holders of a departing device are proven to map it (see [`Proof`]): page
    /// tables where the kernel survives reading them, mappings where it does not.
    pub departure_proof: Proof,
    /// Holders opened when they became holders (the agent pins them, see [`Pins`]).
    pub pins: Pins,
}

impl Enforcer {
    pub fn new(audit: impl AuditSink + 'static) -> Self {
        Self {
            audit: Box::new(audit),
            pending: Vec::new(),
            departure_proof: Proof::PageTables,
            pins: Pins::within_open_file_limit(Some(Proof::PageTables)),
        }
    }

    /// For a kernel with (`true`) or without devmap DAX entries.
    pub fn with_devmap(mut self, devmap: bool) -> Self {
        self.departure_proof = if devmap {
            Proof::PageTables
        } else {
            Proof::Mappings
        };
        self.pins.proof = Some(self.departure_proof);
        self
    }

    /// What became of an audit write: true, or false with the error logged (`what`: the
    /// sentence's head, the log's path and the error follow).
    fn logged(&self, what: &str, r: std::io::Result<()>) -> bool {
        r.map_err(|e| log::error!("{what} {}: {e}", self.audit.path().display()))
            .is_ok()
    }

    /// Writes a record; false (and an error logged) when it could not be made durable.
    pub fn log(&mut self, r: Record) -> bool {
        let w = self.audit.write(&r);
        self.logged("cannot write the audit log", w)
    }

    /// Writes a record ahead of its flush ([`AuditSink::write_ahead`]); false (and an error
    /// logged) when it could not be written.
    pub fn log_ahead(&mut self, r: Record) -> bool {
        let w = self.audit.write_ahead(&r);
        self.logged("cannot write the audit log", w)
    }

    /// Are the records written ahead on disk (flushed now if nothing did)? False, and an
    /// error logged, when they may not be.
    pub fn settle(&mut self) -> bool {
        let w = self.audit.settle();
        self.logged(
            "a record written ahead of its flush may not be on disk in",
            w,
        )
    }

    /// Writes records as one durable unit; false (and an error logged) when it could not.
    pub fn log_all(&mut self, rs: &[Record]) -> bool {
        let w = self.audit.write_all(rs);
        self.logged("cannot write the audit log", w)
    }

    /// Applies `rule` to `holders` of `device` now; schedules the escalation.
    #[allow(clippy::too_many_arguments)]
    pub fn act(
        &mut self,
        scope: Scope,
        holders: &[HolderRow],
        rule: &Rule,
        since_ns: u64,
        os: &dyn Os,
        class: &Classifier,
        why: &str,
    ) -> Vec<ActionReport> {
        let device = scope.device;
        let mut out = Vec::new();
        let targets = Whom::of_rows(holders);
        let decide = Record {
            time: now(),
            action: "decide",
            device,
            pid: None,
            start_time: None,
            comm: None,
            signal: (rule.action == Action::Signal).then(|| rule.signal.name()),
            cgroup: None,
            container: None,
            pod_uid: None,
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
        };
        if rule.action == Action::Report {
            self.log(decide);
            for w in &targets {
                let (pid, comm) = (&w.pid, &w.comm);
                out.push(ActionReport {
                    device: device.into(),
                    pid: *pid,
                    comm: comm.clone(),
                    action: "report-only".into(),
                    signal: None,
                    reason: "policy action is report".into(),
                    since_departure_us: None,
                    received_us: None,
                    listed_us: None,
                    fenced_us: None,
                    verdict_us: None,
                    cgroup: w.cgroup.clone(),
                    container: w.container.clone(),
                    pod_uid: w.pod_uid.clone(),
                });
            }
            return out;
        }
        // The decision goes to disk with the first batch's verdicts: one fdatasync fewer
        // before the first signal, and still none leaves before its decision is durable.
        let signalled = self.signal_all(
            scope,
            Some(decide),
            &targets,
            rule,
            rule.signal,
            "signal",
            since_ns,
            os,
            class,
            &mut out,
        );
        if rule.escalate.is_some() && !signalled.is_empty() {
            self.pending.push(Pending {
                due: os.now() + rule.grace,
                device: device.into(),
                pfn_ranges: scope.pfn_ranges.to_vec(),
                proof: scope.proof,
                stamps: scope.stamps,
                rule: rule.clone(),
                targets: signalled,
                since_ns,
            });
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn signal_all<'a>(
        &mut self,
        scope: Scope<'a>,
        mut lead: Option<Record<'a>>,
        targets: &'a [Whom],
        rule: &Rule,
        sig: Signal,
        action: &'static str,
        since_ns: u64,
        os: &dyn Os,
        class: &Classifier,
        out: &mut Vec<ActionReport>,
    ) -> Vec<Whom> {
        let device = scope.device;
        let mut sent = Vec::new();
        // Every record and report of a target names the same process and signal.
        let record = |w, action, detail| record_of(w, device, sig, action, detail);
        // Microseconds since the kernel's report, for a time on CLOCK_BOOTTIME.
        let since = |t: u64| (since_ns != 0 && t != 0).then(|| t.saturating_sub(since_ns) / 1000);
        let received_us = since(scope.stamps.received_ns);
        let listed_us = since(scope.stamps.listed_ns);
        let fenced_us = since(scope.stamps.fenced_ns);
        let report =
            |w: &Whom, action: &'static str, reason: String, at: Option<(u64, u64)>| ActionReport {
                device: device.into(),
                pid: w.pid,
                comm: w.comm.clone(),
                action: action.into(),
                signal: Some(sig.name()),
                reason,
                since_departure_us: at.and_then(|(_, sent)| since(sent)),
                received_us,
                listed_us,
                fenced_us,
                verdict_us: at.and_then(|(verdict, _)| since(verdict)),
                cgroup: w.cgroup.clone(),
                container: w.container.clone(),
                pod_uid: w.pod_uid.clone(),
            };
        // In batches: verify each target (through a pidfd), write every verdict with one
        // flush, then send every signal, then write what each did with one more flush. Two
        // flushes per batch instead of two per process, and still every signal is on disk
        // before it leaves. Batches bound the pidfds open at once. The first batch carries the
        // decision (and flushes what was written ahead of it, the fence record): when it
        // cannot be written, no batch signals.
        let mut batches = targets.chunks(SIGNAL_BATCH);
        while let Some(batch) = batches.next() {
            let mut verdicts: Vec<Record<'a>> = Vec::with_capacity(batch.len() + 1);
            let decides = lead.is_some();
            verdicts.extend(lead.take());
            let mut admitted = Vec::with_capacity(batch.len());
            for w in batch {
                let pin = self.pins.get(w.pid, w.start);
                let c = Candidate {
                    pid: w.pid,
                    start_time: w.start,
                    comm: &w.comm,
                    held: &w.held,
                    at: &w.at,
                    pinned: pin.as_ref(),
                };
                match admit(&c, rule, scope, os, class) {
                    Err(refusal) => {
                        verdicts.push(record(w, "skip", refusal.to_string()));
                        // A holder that left in time is the good outcome, not worth a line
                        // per process on escalation.
                        if !(action == "escalate"
                            && matches!(refusal, Refusal::Gone | Refusal::NoLongerMaps))
                        {
                            out.push(report(w, "skip", refusal.to_string(), None));
                        }
                    }
                    Ok(fd) => {
                        verdicts.push(record(
                            w,
                            action,
                            "verified through a pidfd: maps the device".into(),
                        ));
                        admitted.push((w, fd, boottime_ns()));
                    }
                }
            }
            if !self.log_all(&verdicts) {
                for (w, _, _) in &admitted {
                    out.push(report(
                        w,
                        "skip",
                        "the audit log cannot be written: nothing is signalled".into(),
                        None,
                    ));
                }
                if decides {
                    for w in batches.by_ref().flatten() {
                        out.push(report(
                            w,
                            "skip",
                            "the decision cannot be written to the audit log: nothing is \
                             signalled"
                                .into(),
                            None,
                        ));
                    }
                }
                continue;
            }
            // Every signal first, in a tight loop; what each did is written down after.
            let sends: Vec<_> = admitted
                .iter()
                .map(|(_, fd, _)| (fd.send(sig), boottime_ns()))
                .collect();
            let mut results = Vec::with_capacity(admitted.len());
            for ((w, _fd, verdict_ns), (result, sent_ns)) in admitted.into_iter().zip(sends) {
                // What happened to the signal: a record that only announced it would leave
                // "sent?" open after a crash or an error.
                results.push(record(
                    w,
                    "result",
                    match &result {
                        Ok(()) => format!("{action}: delivered"),
                        Err(e) => format!("{action}: not delivered: {e}"),
                    },
                ));
                match result {
                    Ok(()) => {
                        sent.push(w.clone());
                        out.push(report(
                            w,
                            action,
                            "maps the device".into(),
                            Some((verdict_ns, sent_ns)),
                        ));
                    }
                    Err(e) => {
                        log::warn!("cannot signal {} ({}): {e}", w.pid, w.comm);
                    }
                }
            }
            self.log_all(&results);
        }
        sent
    }

    /// Earliest pending escalation.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.due).min()
    }

    /// Runs the escalations that are due.
    pub fn tick(&mut self, os: &dyn Os, class: &Classifier) -> Vec<ActionReport> {
        let now_i = os.now();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.due <= now_i);
        self.pending = keep;
        let mut out = Vec::new();
        for p in due {
            let Some(sig) = p.rule.escalate else { continue };
            let scope = Scope {
                device: &p.device,
                pfn_ranges: &p.pfn_ranges,
                proof: p.proof,
                stamps: p.stamps,
            };
            self.signal_all(
                scope, None, &p.targets, &p.rule, sig, "escalate", p.since_ns, os, class, &mut out,
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
