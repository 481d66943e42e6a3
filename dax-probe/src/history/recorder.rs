//! The agent's side of the history: the event loop offers every line it prints; the ones
//! that are incidents are queued to a writer thread of their own, which stores each in one
//! transaction. The loop never waits on the disk: the queue is bounded and a full one drops
//! the incident, counted and logged with what was lost. A database that cannot be used
//! (corrupt, locked, newer) is logged once; the agent carries on without history.

use std::{
    sync::mpsc::{self, Receiver, SyncSender, TrySendError},
    thread::JoinHandle,
    time::Duration,
};

use super::{Incident, IncidentKind, Settings, db::Store};
use crate::schema::Line;

/// Incidents waiting for the disk. An unbind of a device with many holders yields one
/// departure and a few enforcement lines per holder: this holds hundreds of those.
pub const QUEUE: usize = 1024;

enum Job {
    Insert(Incident),
    /// A `memory_failure_result`: completes its `memory_failure`.
    Verdict(Incident),
}

pub struct Recorder {
    tx: Option<SyncSender<Job>>,
    writer: Option<JoinHandle<()>>,
    /// Incidents dropped because the writer was behind.
    pub dropped: u64,
}

impl Recorder {
    /// Starts the writer thread; it opens (creates, migrates, prunes) the database itself,
    /// so a slow or locked one delays no start-up.
    pub fn start(settings: Settings) -> Self {
        Self::with_queue(settings, QUEUE)
    }

    fn with_queue(settings: Settings, queue: usize) -> Self {
        let (tx, rx) = mpsc::sync_channel(queue);
        let writer = std::thread::Builder::new()
            .name("dax-probe-history".into())
            .spawn(move || write_loop(&settings, rx))
            .map_err(|e| log::warn!("incident history: no writer thread ({e}): not recorded"))
            .ok();
        Self {
            tx: writer.is_some().then_some(tx),
            writer,
            dropped: 0,
        }
    }

    /// Queues `line` if it is an incident; never blocks.
    pub fn offer(&mut self, line: &Line) {
        let Some(job) = job_of(line) else {
            return;
        };
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                self.dropped += 1;
                let i = match &job {
                    Job::Insert(i) | Job::Verdict(i) => i,
                };
                // The first loss and then every power of two: said, never a flood.
                if self.dropped.is_power_of_two() {
                    log::warn!(
                        "incident history: the writer is behind (slow disk?): a {} of {} was \
                         not recorded ({} incident(s) dropped so far)",
                        i.kind.as_str(),
                        i.device.as_deref().unwrap_or("an unknown device"),
                        self.dropped
                    );
                }
            }
            // The writer gave up (it said why, once).
            Err(TrySendError::Disconnected(_)) => self.tx = None,
        }
    }
}

impl Drop for Recorder {
    /// Lets the writer store what is queued, for a while: a stuck disk does not hold the
    /// agent's exit for long.
    fn drop(&mut self) {
        drop(self.tx.take());
        let Some(w) = self.writer.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !w.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if w.is_finished() {
            let _ = w.join();
        } else {
            log::warn!(
                "incident history: the writer did not finish in 5 s; queued incidents may be lost"
            );
        }
    }
}

fn write_loop(settings: &Settings, rx: Receiver<Job>) {
    let path = settings.path.display();
    let mut store = match Store::open(&settings.path) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("incident history disabled: {e}");
            return;
        }
    };
    match store.prune(settings.keep) {
        Ok(0) => {}
        Ok(n) => log::info!("incident history {path}: pruned {n} incident(s) past retention"),
        Err(e) => log::warn!("incident history {path}: pruning failed: {e}"),
    }
    let mut failed = false;
    for job in rx {
        let res = match &job {
            Job::Insert(i) => store.insert(i),
            Job::Verdict(v) => store.complete_failure(v),
        };
        match res {
            Ok(_) => failed = false,
            // Once per run of failures: a full disk would otherwise log every incident.
            Err(e) if !failed => {
                failed = true;
                log::warn!("incident history: not recorded: {e}");
            }
            Err(_) => {}
        }
    }
}

/// The incident a printed line is, if any.
fn job_of(line: &Line) -> Option<Job> {
    Some(match line {
        Line::DeviceDeparting {
            device,
            namespaces,
            by_pid,
            by_comm,
            driver,
            holders,
            holder_pages,
            ..
        } => {
            let mut i = Incident::new(
                IncidentKind::Departure,
                Some(device.clone()),
                format!(
                    "{} ({}) unbound by {by_comm} (pid {by_pid}, driver {driver}) while {} \
                     page(s) were mapped",
                    device,
                    namespaces.join(", "),
                    holder_pages
                ),
            );
            i.holders = holders.clone();
            Job::Insert(i)
        }
        Line::DeviceGone {
            device,
            still_mapped,
            took_ms,
            ..
        } if !still_mapped.is_empty() => {
            let mut i = Incident::new(
                IncidentKind::StaleMappings,
                Some(device.clone()),
                format!(
                    "{device} was gone after {took_ms:.1} ms with mappings into it left: \
                     `dax-probe audit` checks their page tables"
                ),
            );
            i.holders = still_mapped.clone();
            Job::Insert(i)
        }
        Line::DeviceRebound {
            device,
            namespace,
            old_binding,
            old_binding_pages,
            ..
        } => {
            let mut i = Incident::new(
                IncidentKind::StaleMappings,
                Some(device.clone()),
                format!(
                    "{device} ({namespace}) was bound again while {old_binding_pages} page(s)                      of its old binding stayed mapped: the pfns now hold the new binding's                      data; `dax-probe audit` names the pages"
                ),
            );
            i.holders = old_binding.clone();
            Job::Insert(i)
        }
        Line::MemoryFailure {
            pfn,
            device,
            files,
            holders,
            by_pid,
            by_comm,
            ..
        } => {
            let mut i = Incident::new(
                IncidentKind::MemoryFailure,
                device.clone(),
                format!("memory failure at pfn {pfn:#x} raised by {by_comm} (pid {by_pid})"),
            );
            i.pfn = Some(*pfn);
            i.files = files.clone();
            i.holders = holders.clone();
            Job::Insert(i)
        }
        Line::MemoryFailureResult {
            pfn,
            result,
            page_type,
            signalled,
            not_signalled,
            ..
        } => {
            let mut v = Incident::new(
                IncidentKind::MemoryFailure,
                None,
                format!(
                    "the kernel: {} ({})",
                    result.as_deref().unwrap_or("no verdict"),
                    page_type.as_deref().unwrap_or("page type unknown")
                ),
            );
            v.pfn = Some(*pfn);
            v.result = Some(result.clone().unwrap_or_else(|| "unknown".into()));
            v.signalled = signalled.clone();
            v.not_signalled = not_signalled.clone();
            Job::Verdict(v)
        }
        Line::Enforcement(a) => {
            let mut i = Incident::new(
                IncidentKind::Enforcement,
                Some(a.device.clone()),
                format!("{} {} (pid {})", a.action, a.comm, a.pid),
            );
            i.action = Some(a.action.to_string());
            i.pid = Some(a.pid);
            i.signal = a.signal.clone();
            i.result = Some(a.reason.clone());
            Job::Insert(i)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        history::db::Reader,
        schema::{ActionReport, DevId, FileRef, HolderRow},
    };

    fn row(pid: u32) -> HolderRow {
        HolderRow {
            pid,
            start_time: 1,
            comm: "w".into(),
            dev: DevId {
                major: 259,
                minor: 1,
            },
            ino: 12,
            file: Some("/mnt/a".into()),
            pages: 1024,
            offsets: vec![(0, 4 << 20)],
            extents: None,
            probe_at: Vec::new(),
            cgroup: None,
            container: None,
            pod_uid: None,
        }
    }

    fn settings(p: &std::path::Path) -> Settings {
        Settings {
            path: p.to_path_buf(),
            keep: Duration::from_secs(86_400),
        }
    }

    fn lines() -> Vec<Line> {
        vec![
            Line::MemoryFailure {
                ts_ns: 1,
                pfn: 0x10_8410,
                device: Some("pmem1".into()),
                files: vec![FileRef {
                    dev: DevId {
                        major: 259,
                        minor: 1,
                    },
                    ino: 12,
                    path: Some("/mnt/a".into()),
                    offset: 0x5000,
                }],
                holders: vec![row(150), row(151)],
                by_pid: 151,
                by_comm: "inject".into(),
                media_error: None,
            },
            // Not incidents: never stored.
            Line::DaxShutOff {
                ts_ns: 2,
                device: None,
            },
            Line::DeviceGone {
                ts_ns: 2,
                device: "pmem2".into(),
                still_mapped: Vec::new(),
                took_ms: 1.0,
                synthesised: false,
            },
            Line::MemoryFailureResult {
                ts_ns: 3,
                pfn: 0x10_8410,
                result: Some("Recovered".into()),
                page_type: None,
                signalled: vec![151],
                not_signalled: vec![150],
            },
            Line::DeviceDeparting {
                ts_ns: 4,
                device: "pmem2".into(),
                namespaces: vec!["namespace2.0".into()],
                pfn_ranges: vec![(0, 1)],
                by_pid: 9,
                by_comm: "sh".into(),
                driver: "nd_pmem".into(),
                synthesised: false,
                holders: vec![row(160)],
                holder_pages: 1024,
            },
            Line::Enforcement(ActionReport {
                device: "pmem2".into(),
                pid: 160,
                comm: "w".into(),
                action: "signal".into(),
                signal: Some("TERM".into()),
                reason: "device departing".into(),
                since_departure_us: Some(5),
                received_us: None,
                listed_us: None,
                fenced_us: None,
                verdict_us: None,
                cgroup: None,
                container: None,
                pod_uid: None,
            }),
        ]
    }

    #[test]
    fn the_agents_lines_become_incidents_in_the_database() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("incidents.db");
        let mut r = Recorder::start(settings(&p));
        for l in lines() {
            r.offer(&l);
        }
        drop(r);
        let got = Reader::open(&p, Duration::from_millis(100))
            .unwrap()
            .list(None, None)
            .unwrap();
        let kinds: Vec<_> = got.iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            [
                IncidentKind::Enforcement,
                IncidentKind::Departure,
                IncidentKind::MemoryFailure
            ]
        );
        let mf = &got[2];
        assert_eq!(mf.pfn, Some(0x10_8410));
        assert_eq!(mf.result.as_deref(), Some("Recovered"));
        assert_eq!(
            mf.holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
            [150, 151]
        );
        assert_eq!(mf.files[0].path.as_deref(), Some("/mnt/a"));
        assert_eq!(
            (mf.signalled.clone(), mf.not_signalled.clone()),
            (vec![151], vec![150])
        );
        assert_eq!(got[1].holders, vec![row(160)]);
        let e = &got[0];
        assert_eq!(
            (
                e.action.as_deref(),
                e.pid,
                e.signal.as_deref(),
                e.result.as_deref()
            ),
            (
                Some("signal"),
                Some(160),
                Some("TERM"),
                Some("device departing")
            )
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("incidents.db");
        // A held lock keeps the writer waiting in its open (a slow disk, as far as the loop
        // can tell): the queue of 2 fills and the rest is dropped at once.
        let holder = rusqlite::Connection::open(&p).unwrap();
        holder
            .execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; CREATE TABLE x (y);")
            .unwrap();
        let mut r = Recorder::with_queue(settings(&p), 2);
        let start = std::time::Instant::now();
        let dep = lines().remove(4);
        for _ in 0..10 {
            r.offer(&dep);
        }
        assert!(start.elapsed() < Duration::from_secs(1), "offer waited");
        assert!(r.dropped >= 7, "{} dropped", r.dropped);
    }

    #[test]
    fn an_unusable_database_leaves_the_agent_without_history_not_stuck() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("incidents.db");
        std::fs::write(&p, vec![0x5a; 4096]).unwrap();
        let mut r = Recorder::start(settings(&p));
        // The writer gives up on the garbage; offers go nowhere and never block.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let dep = lines().remove(4);
        while r.tx.is_some() && std::time::Instant::now() < deadline {
            r.offer(&dep);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(r.tx.is_none(), "the writer did not give up");
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x5a; 4096]);
    }
}
