//! The running agent: kernel events in, the live holder map kept exact, answers out.
//!
//! One loop owns all state (topology, holder map, counters). Records arrive from the reader
//! thread; each is decoded, applied to the map and handed to the output sink (monitor text,
//! JSON, TUI). The control socket is served from the same loop after a reader sync, so an
//! answer includes every event the kernel emitted before the question. A reconcile against
//! procfs runs periodically and right after the kernel reported lost events.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use dax_probe_common::Counter;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    control::{self, AgentStats, Request, Response},
    event::Event,
    exit::{Code, Failure},
    holders::{
        Applier, FileKey,
        query::{HolderRow, resolve, rows, select},
        scan::{Classifier, LiveProc},
    },
    incident::{Departure, Incidents, Report},
    policy::{
        Action, Policy,
        audit::AuditLog,
        enforce::{ActionReport, Enforcer},
    },
    privilege,
    probe::{
        KernelSource, Session,
        decode::{DecodeError, Decoder},
    },
    proc::pagemap::PagemapLookup,
    topology::{DevId, Topology},
};

pub struct Options {
    pub ring_bytes: u32,
    /// Keep running even when no DAX device exists yet.
    pub wait: bool,
    /// Serve the control socket here (None: no socket).
    pub socket: Option<PathBuf>,
    /// Reconcile with procfs this often.
    pub reconcile: Duration,
    /// Act on departing devices per `policy` (otherwise report only).
    pub enforce: bool,
    pub policy: Policy,
    pub audit_log: PathBuf,
    /// Where departed devices are remembered for `audit`.
    pub departed: Option<PathBuf>,
}

/// A reconcile's outcome, reported like an event.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Reconcile {
    /// Pages the kernel maps that the map lacked.
    pub missing: u64,
    /// Pages in the map the kernel no longer maps.
    pub extra: u64,
    pub holders: usize,
    pub reason: &'static str,
}

/// What the sink receives.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Output {
    Event(Event),
    Reconcile(ReconcileLine),
    Report(Report),
    Action(ActionLine),
    Hooks(HooksLine),
    /// State a recording needs to be replayed without the machine (`tui --replay`).
    Topology(TopologyLine),
    Holders(HoldersLine),
    File(FileLine),
    Dropped(DroppedLine),
}

impl Output {
    /// Lines that carry state for replay rather than news for a reader (the text monitor
    /// leaves them out).
    pub fn is_state(&self) -> bool {
        matches!(
            self,
            Output::Topology(_) | Output::Holders(_) | Output::File(_) | Output::Dropped(_)
        )
    }
}

/// The pmem topology, typed `topology` in JSON: when the agent starts and whenever it reads
/// a different one.
#[derive(Clone, Debug, Serialize)]
pub struct TopologyLine {
    pub r#type: &'static str,
    #[serde(flatten)]
    pub topology: Topology,
}

/// Holder state, typed `holders` in JSON. Without `pids` it is the whole map (`reason`
/// `start`: mappings made before the agent; `reconcile`: after procfs corrected it;
/// `requested`: a consumer asked). With `pids` it is the complete state of those processes
/// right after the agent re-read their page tables for the event on the next line
/// (`resync`: fork, mremap, a partial huge unmap); a listed pid without rows maps nothing.
#[derive(Clone, Debug, Serialize)]
pub struct HoldersLine {
    pub r#type: &'static str,
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<Vec<u32>>,
    /// One row per (process, file), with every extent.
    pub rows: Vec<HolderRow>,
}

/// Events lost so far because the ring buffer was full, typed `dropped` in JSON: printed when
/// the count grows, right before the reconcile that repairs the map.
#[derive(Clone, Debug, Serialize)]
pub struct DroppedLine {
    pub r#type: &'static str,
    pub dropped: u64,
}

/// A DAX file's name, typed `file` in JSON: once per file, before the first fault on it
/// (events carry only device and inode).
#[derive(Clone, Debug, Serialize)]
pub struct FileLine {
    pub r#type: &'static str,
    pub dev: DevId,
    pub ino: u64,
    pub path: String,
}

/// A concern moved to a kernel hook after a module loaded, typed `hooks_changed` in JSON.
#[derive(Clone, Debug, Serialize)]
pub struct HooksLine {
    pub r#type: &'static str,
    #[serde(flatten)]
    pub upgrade: crate::probe::loader::Upgrade,
}

/// An enforcement action, typed `enforcement` in JSON.
#[derive(Clone, Debug, Serialize)]
pub struct ActionLine {
    pub r#type: &'static str,
    #[serde(flatten)]
    pub action: ActionReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReconcileLine {
    pub r#type: &'static str,
    #[serde(flatten)]
    pub reconcile: Reconcile,
}

/// Totals for the final summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub r#type: &'static str,
    pub events: u64,
    pub faults: u64,
    /// Lost in the kernel: ring buffer full.
    pub dropped: u64,
    /// Records the agent could not decode.
    pub undecodable: u64,
    /// Kernel reads that failed (fields zeroed).
    pub kernel_read_errors: u64,
    /// Faults the kernel programs saw.
    pub faults_seen_by_kernel: u64,
    /// Events of every kind the kernel programs tried to emit: delivered + dropped.
    pub events_attempted_by_kernel: u64,
    pub holders: usize,
    pub holder_pages: u64,
    pub drift_missing: u64,
    pub drift_extra: u64,
    pub reconciles: u64,
    pub duration_s: f64,
}

pub struct Agent {
    pub session: Session,
    pub topology: Topology,
    pub applier: Applier,
    root: PathBuf,
    /// How the kernel is probed (kept to re-plan when modules load).
    src: KernelSource,
    last_topology: Instant,
    started: Instant,
    summary: Summary,
    last_dropped: u64,
    listener: Option<(UnixListener, PathBuf)>,
    reconcile_every: Duration,
    pub incidents: Incidents,
    enforcer: Option<Enforcer>,
    policy: Policy,
    /// Outputs produced while handling a record, in order.
    pending_out: Vec<Output>,
    /// Files whose `file` line went out.
    announced: HashSet<FileKey>,
    /// Set by a consumer that lost lines (a lagging TUI): the next tick emits the whole
    /// topology and holder map.
    pub snapshot_request: Arc<AtomicBool>,
    /// Ends `run` like SIGINT does (for a caller that runs the agent on a thread).
    pub stop: Arc<tokio::sync::Notify>,
}

impl Agent {
    /// Checks privileges and devices, attaches, scans existing holders and opens the socket.
    pub fn start(src: &KernelSource, opts: &Options) -> anyhow::Result<Self> {
        if !privilege::can_trace() {
            return Err(Failure::new(
                Code::NoPermission,
                "the agent needs root (or CAP_BPF with CAP_PERFMON and CAP_SYS_ADMIN for \
                 page tables) to load eBPF programs: run it with sudo",
            )
            .into());
        }
        let topology = Topology::read(&src.root);
        if !topology.has_dax() {
            let msg = "no DAX device present: no fsdax/devdax pmem namespace and no file \
                       system mounted with -o dax";
            if !opts.wait {
                return Err(Failure::new(
                    Code::NoInput,
                    format!("{msg}; pass --wait to monitor anyway (devices added later are seen)"),
                )
                .into());
            }
            eprintln!("dax-probe: warning: {msg}; waiting for one");
        }
        let listener = match &opts.socket {
            Some(p) => Some((bind(p)?, p.clone())),
            None => None,
        };
        let enforcer = if opts.enforce {
            let log = AuditLog::open(&opts.audit_log).map_err(|e| {
                Failure::new(
                    Code::Config,
                    format!(
                        "cannot open the audit log {}: {e}; enforcement needs it (pass \
                         --audit-log PATH)",
                        opts.audit_log.display()
                    ),
                )
            })?;
            Some(Enforcer::new(log, &src.root))
        } else {
            None
        };
        let session = Session::start(src, opts.ring_bytes, opts.enforce)?;
        if opts.enforce && !session.fence_attached() {
            eprintln!(
                "dax-probe: warning: new mappings of a departing device cannot be refused on \
                 this kernel (the BPF LSM is not active; boot with lsm=...,bpf): holders are \
                 still signalled, and faults on it are signalled by the fault program"
            );
        }
        let mut agent = Self {
            session,
            topology,
            applier: Applier::new(Box::new(LiveProc::new(&src.root))),
            root: src.root.clone(),
            src: src.clone(),
            last_topology: Instant::now(),
            started: Instant::now(),
            summary: Summary {
                r#type: "summary",
                ..Default::default()
            },
            last_dropped: 0,
            listener,
            reconcile_every: opts.reconcile,
            incidents: Incidents::new(opts.departed.clone()),
            enforcer,
            policy: opts.policy.clone(),
            pending_out: Vec::new(),
            announced: HashSet::new(),
            snapshot_request: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(tokio::sync::Notify::new()),
        };
        // Mappings made before we attached: programs are live first, so nothing that
        // happens during the scan is lost (its events are applied on top).
        agent.applier.reconcile(&agent.topology);
        agent.applier.stats = Default::default();
        agent.push_watch();
        Ok(agent)
    }

    /// A module loaded since the last look may make kernel hooks possible where the agent
    /// fell back to userspace (device_dax loaded after the agent started, for one).
    fn adopt_new_modules(
        &mut self,
        out: &mut dyn FnMut(Output) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let ups = self.session.adopt_new_modules(&self.src);
        if ups.is_empty() {
            return Ok(());
        }
        for u in ups {
            log::warn!(
                "{}: a module loaded: now {} (was {})",
                u.concern.name(),
                u.chosen,
                u.was.unwrap_or("unavailable")
            );
            out(Output::Hooks(HooksLine {
                r#type: "hooks_changed",
                upgrade: u,
            }))?;
        }
        // Mappings made before the new hooks: one full comparison with the page tables.
        self.reconcile("hooks changed", out)
    }

    fn push_watch(&mut self) {
        let w = self.applier.take_watch_changes();
        for t in w.add {
            self.session.watched.add(t);
        }
        for t in w.remove {
            self.session.watched.remove(t);
        }
    }

    fn refresh_topology(&mut self) {
        if self.last_topology.elapsed() > Duration::from_secs(1) {
            let topology = Topology::read(&self.root);
            self.last_topology = Instant::now();
            if topology != self.topology {
                self.topology = topology;
                self.pending_out.push(self.topology_line());
            }
        }
    }

    fn topology_line(&self) -> Output {
        Output::Topology(TopologyLine {
            r#type: "topology",
            topology: self.topology.clone(),
        })
    }

    /// The holder map (all of it, or the complete state of `pids`) as a `holders` line.
    fn holders_line(&mut self, reason: &'static str, pids: Option<Vec<u32>>) -> Output {
        let map = &self.applier.map;
        let sel = match &pids {
            None => map.all(),
            Some(p) => p
                .iter()
                .filter_map(|t| map.holder_of(*t))
                .flat_map(|h| map.of_holder(h))
                .collect(),
        };
        let mut r = rows(map, &sel, true);
        self.applier.name_files(&mut r, &self.topology);
        Output::Holders(HoldersLine {
            r#type: "holders",
            reason,
            pids,
            rows: r,
        })
    }

    /// Processes whose page tables the applier may have re-read for `ev`: the event's own,
    /// and for a zap every holder of the file (a truncate re-reads them all).
    fn touched_by(&self, ev: &Event) -> Vec<u32> {
        let mut pids = match ev {
            Event::Fault(f) => vec![f.tgid],
            Event::Fork(f) => vec![f.child_tgid, f.parent_tgid],
            Event::Mremap(m) => vec![m.tgid],
            Event::Zap(z) => {
                let file = FileKey {
                    dev: z.dev,
                    ino: z.ino,
                };
                let map = &self.applier.map;
                let mut p: Vec<u32> = map
                    .all()
                    .iter()
                    .filter(|v| v.file == file)
                    .filter_map(|v| map.info(v.holder).map(|i| i.tgid))
                    .collect();
                p.push(z.tgid);
                p.extend(z.owner_tgid);
                p
            }
            _ => Vec::new(),
        };
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// A `file` line the first time a fault names a file the recording has not named yet.
    fn announce_file(&mut self, ev: &Event) {
        let Event::Fault(f) = ev else { return };
        let key = FileKey {
            dev: f.dev,
            ino: f.ino,
        };
        if self.announced.contains(&key) {
            return;
        }
        if let Some(path) = self.applier.path_of(&key) {
            self.pending_out.push(Output::File(FileLine {
                r#type: "file",
                dev: key.dev,
                ino: key.ino,
                path: path.to_string(),
            }));
            self.announced.insert(key);
        }
    }

    fn decode(&self, rec: &[u8]) -> Result<Event, DecodeError> {
        Decoder {
            topology: &self.topology,
            lookup: PagemapLookup,
        }
        .decode(rec)
    }

    /// Decodes and applies one record; its outputs go to `pending_out`.
    pub fn handle(&mut self, rec: &[u8]) {
        let mut ev = match self.decode(rec) {
            Ok(e) => e,
            Err(e) => {
                self.summary.undecodable += 1;
                log::warn!("{e}");
                return;
            }
        };
        // A pfn outside every known device: the topology may have changed (namespace
        // reconfigured, device hot-added). Re-read it (at most once a second) and retry.
        if let Event::Fault(f) = &ev
            && f.pfn.is_some()
            && f.device.is_none()
        {
            self.refresh_topology();
            if let Ok(again) = self.decode(rec) {
                ev = again;
            }
        }
        self.summary.events += 1;
        if matches!(ev, Event::Fault(_)) {
            self.summary.faults += 1;
        }
        // Departures and failures first: their reports describe the map as it was when the
        // kernel spoke.
        let (reports, departure) = self
            .incidents
            .handle(&ev, &mut self.applier, &self.topology);
        if let Some(dep) = departure {
            self.enforce_departure(&dep);
        }
        for r in reports {
            if let Report::DeviceGone { device, .. } = &r {
                self.unfence(device);
            }
            if matches!(r, Report::DeviceDeparting { .. }) {
                // The departing report goes out before the actions it triggered.
                let pos = self
                    .pending_out
                    .iter()
                    .position(|o| matches!(o, Output::Action(_)))
                    .unwrap_or(self.pending_out.len());
                self.pending_out.insert(pos, Output::Report(r));
            } else {
                self.pending_out.push(Output::Report(r));
            }
        }
        let resyncs = self.applier.stats.resyncs;
        self.applier.apply(&ev, &self.topology);
        self.push_watch();
        if matches!(
            ev,
            Event::Fault(_) | Event::Zap(_) | Event::Fork(_) | Event::Mremap(_) | Event::Device(_)
        ) {
            // What procfs told the applier goes out before the event, so a replay's
            // applier gets the same answers when it applies the same event.
            if self.applier.stats.resyncs != resyncs {
                let pids = self.touched_by(&ev);
                let line = self.holders_line("resync", Some(pids));
                self.pending_out.push(line);
            }
            self.announce_file(&ev);
            self.pending_out.push(Output::Event(ev));
        }
    }

    /// Fences a departing device and applies the policy to its holders.
    fn enforce_departure(&mut self, dep: &Departure) {
        let Some(enf) = self.enforcer.as_mut() else {
            return;
        };
        let names: Vec<&str> = dep.names.iter().map(String::as_str).collect();
        let rule = self.policy.rule_for(&names).clone();
        if rule.action == Action::Signal {
            for d in &dep.devs {
                let kdev = (d.major << 20) | d.minor;
                if let Err(e) = self.session.fenced.add(kdev, libc::SIGBUS) {
                    log::warn!("cannot fence {d}: {e}");
                }
            }
        }
        let class = Classifier {
            topology: &self.topology,
        };
        let actions = enf.act(
            &dep.device,
            &dep.pfn_ranges,
            &dep.holders,
            &rule,
            dep.started_ns,
            self.applier.procfs(),
            &class,
            "device departing",
        );
        self.pending_out.extend(actions.into_iter().map(|a| {
            Output::Action(ActionLine {
                r#type: "enforcement",
                action: a,
            })
        }));
    }

    fn unfence(&mut self, device: &str) {
        let devs: Vec<_> = self
            .topology
            .namespaces
            .iter()
            .filter(|n| n.device_name() == device)
            .flat_map(|n| n.block.iter().chain(n.chardev.iter()).map(|(_, d)| *d))
            .collect();
        for d in devs {
            self.session.fenced.remove((d.major << 20) | d.minor);
        }
    }

    fn flush(&mut self, out: &mut dyn FnMut(Output) -> anyhow::Result<()>) -> anyhow::Result<()> {
        for o in std::mem::take(&mut self.pending_out) {
            out(o)?;
        }
        Ok(())
    }

    /// Drains everything already queued.
    fn drain(&mut self, out: &mut dyn FnMut(Output) -> anyhow::Result<()>) -> anyhow::Result<()> {
        while let Ok(rec) = self.session.records.try_recv() {
            self.handle(&rec);
            self.flush(out)?;
        }
        Ok(())
    }

    /// Runs escalations that are due.
    fn escalate(
        &mut self,
        out: &mut dyn FnMut(Output) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let Some(enf) = self.enforcer.as_mut() else {
            return Ok(());
        };
        let class = Classifier {
            topology: &self.topology,
        };
        for a in enf.tick(self.applier.procfs(), &class) {
            out(Output::Action(ActionLine {
                r#type: "enforcement",
                action: a,
            }))?;
        }
        Ok(())
    }

    pub fn reconcile(
        &mut self,
        reason: &'static str,
        out: &mut dyn FnMut(Output) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.refresh_topology();
        self.flush(out)?;
        let (missing, extra) = self.applier.reconcile(&self.topology);
        self.push_watch();
        if missing + extra > 0 {
            let line = self.holders_line("reconcile", None);
            out(line)?;
        }
        if missing + extra > 0 || reason != "periodic" {
            out(Output::Reconcile(ReconcileLine {
                r#type: "reconcile",
                reconcile: Reconcile {
                    missing,
                    extra,
                    holders: self.applier.map.holder_count(),
                    reason,
                },
            }))?;
        }
        Ok(())
    }

    /// Runs until Ctrl-C, SIGTERM or `duration`; every event and reconcile goes to `out`.
    pub async fn run(
        &mut self,
        duration: Option<Duration>,
        out: &mut dyn FnMut(Output) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let deadline = duration.map(|d| tokio::time::Instant::now() + d);
        let sleep_until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(sleep_until);
        let mut tick = tokio::time::interval(self.reconcile_every);
        tick.tick().await; // the start-up scan just ran
        let mut drops = tokio::time::interval(Duration::from_millis(200));
        let mut modules = tokio::time::interval(Duration::from_secs(2));
        let stop = self.stop.clone();
        // A recording starts with the machine's state: replay needs no procfs or sysfs.
        out(self.topology_line())?;
        let start = self.holders_line("start", None);
        out(start)?;
        loop {
            tokio::select! {
                rec = self.session.records.recv() => {
                    let Some(rec) = rec else { break };
                    self.handle(&rec);
                    self.flush(out)?;
                    self.drain(out)?;
                }
                _ = sleep_opt(self.enforcer.as_ref().and_then(Enforcer::next_due)) => {
                    self.escalate(out)?;
                }
                conn = accept(&self.listener) => {
                    if let Ok(stream) = conn {
                        self.serve(stream, out).await;
                    }
                }
                _ = tick.tick() => self.reconcile("periodic", out)?,
                _ = modules.tick() => self.adopt_new_modules(out)?,
                _ = drops.tick() => {
                    self.repair_after_drops(out)?;
                    if self.snapshot_request.swap(false, Ordering::Relaxed) {
                        out(self.topology_line())?;
                        let line = self.holders_line("requested", None);
                        out(line)?;
                    }
                }
                _ = sigint.recv() => break,
                _ = stop.notified() => break,
                _ = sigterm.recv() => break,
                _ = &mut sleep_until => break,
            }
        }
        // Drain what the kernel submitted before we stopped, so counts are complete.
        self.session.stop_reader();
        self.drain(out)?;
        self.repair_after_drops(out)?;
        Ok(())
    }

    /// Lost events leave the map behind the kernel: repair at once.
    fn repair_after_drops(
        &mut self,
        out: &mut dyn FnMut(Output) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let dropped = self.session.counters.get(Counter::RingFull);
        if dropped > self.last_dropped {
            self.last_dropped = dropped;
            out(Output::Dropped(DroppedLine {
                r#type: "dropped",
                dropped,
            }))?;
            self.drain(out)?;
            self.reconcile("events lost", out)?;
        }
        Ok(())
    }

    async fn serve(
        &mut self,
        stream: tokio::net::UnixStream,
        out: &mut dyn FnMut(Output) -> anyhow::Result<()>,
    ) {
        let (rd, mut wr) = stream.into_split();
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            BufReader::new(rd).read_line(&mut line),
        )
        .await;
        let resp = match read {
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    let t = Instant::now();
                    // "Right now" includes everything the kernel already reported.
                    self.session.sync();
                    if let Err(e) = self.drain(out) {
                        log::warn!("output failed: {e}");
                    }
                    let mut r = self.answer(req);
                    r.elapsed_us = t.elapsed().as_micros() as u64;
                    r
                }
                Err(e) => Response::error(None, format!("bad request: {e}")),
            },
            _ => return,
        };
        if let Ok(mut text) = serde_json::to_string(&resp) {
            text.push('\n');
            let _ = wr.write_all(text.as_bytes()).await;
        }
    }

    fn answer(&mut self, req: Request) -> Response {
        match req {
            Request::Holders { target, pages } => {
                self.refresh_topology();
                let target = match resolve(&target, &self.topology, &self.root) {
                    Ok(t) => t,
                    Err(e) => return Response::error(Some(Code::NoInput as i32), e.to_string()),
                };
                let sel = select(&self.applier.map, &target);
                let mut r = rows(&self.applier.map, &sel, pages);
                self.applier.name_files(&mut r, &self.topology);
                Response {
                    ok: true,
                    error: None,
                    rows: r,
                    stats: Some(self.stats()),
                    elapsed_us: 0,
                    target: Some(target),
                    code: None,
                }
            }
            Request::Stats => Response {
                stats: Some(self.stats()),
                ..Response::error(None, String::new())
            }
            .ok(),
        }
    }

    pub fn stats(&self) -> AgentStats {
        AgentStats {
            holders: self.applier.map.holder_count(),
            extents: self.applier.map.extent_count(),
            map_bytes: self.applier.map.heap_bytes(),
            events: self.summary.events,
            dropped: self.session.counters.get(Counter::RingFull),
            map: self.applier.stats.into(),
        }
    }

    pub fn summary(&self) -> Summary {
        let map = &self.applier.map;
        Summary {
            dropped: self.session.counters.get(Counter::RingFull),
            kernel_read_errors: self.session.counters.get(Counter::ReadFailed),
            faults_seen_by_kernel: self.session.counters.get(Counter::FaultsSeen),
            events_attempted_by_kernel: self.session.counters.get(Counter::Attempted),
            holders: map.holder_count(),
            holder_pages: map.holders().map(|(h, _)| map.pages_of(h)).sum(),
            drift_missing: self.applier.stats.drift_missing,
            drift_extra: self.applier.stats.drift_extra,
            reconciles: self.applier.stats.reconciles,
            duration_s: self.started.elapsed().as_secs_f64(),
            ..self.summary.clone()
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some((_, p)) = &self.listener {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    control::prepare(path).map_err(|e| Failure::new(Code::Software, e.to_string()))?;
    let l = UnixListener::bind(path).map_err(|e| {
        Failure::new(
            Code::Software,
            format!("cannot listen on {}: {e}", path.display()),
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn sleep_opt(due: Option<Instant>) {
    match due {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

async fn accept(l: &Option<(UnixListener, PathBuf)>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some((l, _)) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}
