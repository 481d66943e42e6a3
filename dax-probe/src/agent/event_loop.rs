//! Records in, state updated, policy applied, outputs out.
//!
//! [`Flow`] is the synchronous core: it takes one kernel record (or one decoded event),
//! updates the [`State`], runs the policy on a departure and queues the lines that describe
//! all of it, in the order a reader and a replay need them. It touches the kernel only
//! through [`KernelMaps`] (the fence and the watched set), so tests run it without one.
//! [`Agent::run`] is the async loop around it: the reader thread's records, timers
//! (reconcile, escalation, drop checks, module loads), the control socket and signals.

use std::{collections::BTreeSet, sync::atomic::Ordering, time::Duration};

use dax_probe_common::{Counter, Event as _, FaultEvent};
use tokio::signal::unix::{SignalKind, signal};

use super::{Agent, control, state::State};
use crate::{
    badblocks::{
        locate::{FileSpace, LiveSpace},
        watch::Watch,
    },
    event::Event,
    event::{GuardVerdict, UnbindGuarded},
    exit::{Code, Failure},
    holders::{ranges::Source, scan::Classifier},
    incident::{Departure, Report},
    metrics::Metrics,
    os::{Fence, Os},
    policy::{Policy, audit::Record, enforce::Enforcer, pins::Pins, pipeline, unbind_guard},
    probe::Session,
    schema::{Dropped, HoldersReason, Line, Reconcile},
};

/// `CLOCK_BOOTTIME` in nanoseconds: the kernel's event clock (`bpf_ktime_get_boot_ns`).
fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Where outputs go (monitor text or JSON, the dashboard's channel).
pub type Sink<'a> = dyn FnMut(Line) -> anyhow::Result<()> + 'a;

/// What the flow changes in the kernel: the fenced devices and the watched processes.
pub trait KernelMaps: Fence {
    fn watch(&mut self, tgid: u32);
    fn unwatch(&mut self, tgid: u32);
    /// The device names the unbind guard refuses unbinds of, from now on.
    fn set_guarded(&mut self, _names: &BTreeSet<String>) {}
    /// The fault ranges every CPU is still growing.
    fn pending(&self) -> Vec<FaultEvent> {
        Vec::new()
    }
}

impl KernelMaps for Session {
    fn watch(&mut self, tgid: u32) {
        self.watched.add(tgid);
    }
    fn unwatch(&mut self, tgid: u32) {
        self.watched.remove(tgid);
    }
    fn set_guarded(&mut self, names: &BTreeSet<String>) {
        self.guarded.set(names);
    }
    fn pending(&self) -> Vec<FaultEvent> {
        self.pending.read()
    }
}

/// The unbind guard as the flow runs it (only when its program is attached).
struct GuardState {
    /// What the kernel's list holds.
    listed: BTreeSet<String>,
    /// Where its records go when there is no enforcer (a monitor without `--enforce`).
    audit: Option<Box<dyn crate::os::AuditSink>>,
}

pub struct Flow {
    pub state: State,
    /// What enforcement does to the machine (pidfds, page tables): the live one, or a fake.
    os: Box<dyn Os>,
    enforcer: Option<Enforcer>,
    policy: Policy,
    /// Outputs produced while handling a record, in order.
    pending_out: Vec<Line>,
    /// Where incidents among the outputs are recorded (off the loop: a queue).
    history: Option<crate::history::recorder::Recorder>,
    /// What the outputs tell, counted for `--metrics` (every line goes through it).
    pub metrics: Metrics,
    /// The badblocks ranges reported so far.
    pub media: Watch,
    /// The file systems' extents and space maps (FIEMAP/GETFSMAP, or a fake).
    space: Box<dyn FileSpace>,
    /// The unbind guard, when the policy asks for it and the kernel runs it.
    guard: Option<GuardState>,
    /// A monitor that does not enforce pins its holders too, with a pidfd and a stat each,
    /// only to tell who exited; an enforcer's pins do that and more.
    watch_pins: Option<Pins>,
}

/// The pins the flow keeps: the enforcer's, or the monitor's own.
fn pins_of<'a>(
    enforcer: &'a mut Option<Enforcer>,
    watch: &'a mut Option<Pins>,
) -> Option<&'a mut Pins> {
    match enforcer {
        Some(e) => Some(&mut e.pins),
        None => watch.as_mut(),
    }
}

impl Flow {
    /// `enforcer`: None reports departures without acting on them.
    pub fn new(
        mut state: State,
        os: Box<dyn Os>,
        enforcer: Option<Enforcer>,
        policy: Policy,
    ) -> Self {
        let watch_pins = enforcer
            .is_none()
            .then(|| Pins::within_open_file_limit(None));
        // A pinned holder's exit is then one poll away, not a stat read.
        if let Some(p) = enforcer.as_ref().map(|e| &e.pins).or(watch_pins.as_ref()) {
            state.applier.set_liveness(p.liveness());
        }
        Self {
            state,
            os,
            enforcer,
            policy,
            pending_out: Vec::new(),
            history: None,
            metrics: Metrics::new(),
            media: Watch::default(),
            space: Box::new(LiveSpace),
            guard: None,
            watch_pins,
        }
    }

    /// Runs the unbind guard from now on: the kernel's list follows the holder map.
    /// `audit`: where its records go when the flow has no enforcer.
    pub fn enable_guard(
        &mut self,
        audit: Option<Box<dyn crate::os::AuditSink>>,
        k: &mut dyn KernelMaps,
    ) {
        self.guard = Some(GuardState {
            listed: BTreeSet::new(),
            audit,
        });
        self.update_guard(k);
    }

    /// Makes the kernel's guard list what the policy and the holder map say now (written
    /// only when it changed).
    fn update_guard(&mut self, k: &mut dyn KernelMaps) {
        if self.guard.is_none() {
            return;
        }
        let map = &self.state.applier.map;
        let names = unbind_guard::guarded_names(&self.policy, &self.state.topology, &|s, e| {
            map.holds_any(s, e)
        });
        if let Some(g) = self.guard.as_mut()
            && g.listed != names
        {
            log::info!("unbind guard: refusing unbinds of {names:?}");
            k.set_guarded(&names);
            g.listed = names;
        }
    }

    /// Writes an audit record of the guard's: to the enforcer's log, else the guard's own;
    /// true when durable, or when there is no log at all (neither guard nor enforcement:
    /// nothing acts, nothing is recorded).
    fn guard_log(&mut self, r: &Record) -> bool {
        match (self.enforcer.as_mut(), self.guard.as_mut()) {
            (Some(enf), _) => enf.log(r.clone()),
            (None, Some(GuardState { audit: Some(a), .. })) => match a.write(r) {
                Ok(()) => true,
                Err(e) => {
                    log::error!("cannot write the audit log {}: {e}", a.path().display());
                    false
                }
            },
            _ => true,
        }
    }

    /// Unbinds `device` through `path` for a client (`drain --unbind`, which verified that
    /// nobody maps it): written by the agent, so its own guard lets it through. Refused
    /// when `path` is not an nd/dax driver's `unbind` file, when `device` is no device the
    /// agent knows, or while the agent's map still has holders of it; audited before and
    /// after the write.
    pub fn unbind_for_client(
        &mut self,
        device: &str,
        path: &std::path::Path,
    ) -> Result<(), crate::exit::Failure> {
        use crate::exit::{Code, Failure};
        self.refresh_topology();
        let real = std::fs::canonicalize(path)
            .map_err(|e| Failure::new(Code::NoInput, format!("{}: {e}", path.display())))?;
        let sys = self.state.root.join("sys/bus");
        let ok_path = real.file_name().is_some_and(|n| n == "unbind")
            && real
                .parent()
                .and_then(|d| d.parent())
                .is_some_and(|d| d.file_name().is_some_and(|n| n == "drivers"))
            && ["nd", "dax"].iter().any(|bus| {
                real.parent()
                    .and_then(|d| d.parent())
                    .and_then(|d| d.parent())
                    .is_some_and(|b| b == sys.join(bus))
            });
        if !ok_path {
            return Err(Failure::new(
                Code::Usage,
                format!(
                    "{} is not the unbind file of an nd or dax driver: the agent unbinds                      nothing else",
                    real.display()
                ),
            ));
        }
        let Some(ns) = unbind_guard::namespace_written(&self.state.topology, device).cloned()
        else {
            return Err(Failure::new(
                Code::NoInput,
                format!("{device} is no pmem/dax device the agent knows"),
            ));
        };
        let name = ns.device_name().to_string();
        self.state.forget_gone();
        let holders = self.state.applier.rows_in_pfn_ranges(
            &self.state.topology,
            &[(ns.data_range.first_pfn(), ns.data_range.end_pfn())],
        );
        if !holders.is_empty() {
            let who: Vec<String> = holders
                .iter()
                .map(|h| format!("{} ({})", h.pid, h.comm))
                .collect();
            return Err(Failure::new(
                Code::Findings,
                format!(
                    "the agent still sees holders of {name}: {}; not unbinding",
                    who.join(", ")
                ),
            ));
        }
        let rec = |action: &'static str, detail: String| Record::device(action, &name, detail);
        let before = rec(
            "unbind",
            format!(
                "the agent unbinds {device} ({}) for a client (drain) that verified nobody \
                 maps {name}; the agent's map agrees",
                real.display()
            ),
        );
        if !self.guard_log(&before) {
            return Err(Failure::new(
                Code::Software,
                "cannot write the audit log: not unbinding".to_string(),
            ));
        }
        let r = self.os.write_sysfs(&real, device);
        let after = rec(
            "result",
            match &r {
                Ok(()) => format!("{device} unbound"),
                Err(e) => format!("unbind of {device} failed: {e}"),
            },
        );
        self.guard_log(&after);
        r.map_err(|e| Failure::new(Code::Software, format!("unbind of {device} failed: {e}")))
    }

    /// A write the guard refused (or let through because it was ours): audited, and a
    /// refusal reported with the writer's command line and the holders it protected.
    fn guard_report(&mut self, g: &UnbindGuarded) {
        let raw = std::fs::read(self.state.root.join(format!("proc/{}/cmdline", g.pid)))
            .unwrap_or_default();
        let cmdline = unbind_guard::cmdline_of(&raw);
        let ns = unbind_guard::namespace_written(&self.state.topology, &g.written).cloned();
        let device = ns.as_ref().map(|n| n.device_name().to_string());
        let holders = match &ns {
            Some(n) => self.state.applier.rows_in_pfn_ranges(
                &self.state.topology,
                &[(n.data_range.first_pfn(), n.data_range.end_pfn())],
            ),
            None => Vec::new(),
        };
        let detail = unbind_guard::audit_detail(g, device.as_deref(), cmdline.as_deref());
        let record = Record {
            pid: Some(g.pid),
            comm: Some(&g.comm),
            ..Record::device(
                unbind_guard::audit_action(g.verdict),
                device.as_deref().unwrap_or(&g.written),
                detail,
            )
        };
        if !self.guard_log(&record) {
            log::error!(
                "cannot write the audit log: the unbind guard's report of pid {} is not recorded",
                g.pid
            );
        }
        if g.verdict != GuardVerdict::AgentPassed {
            self.pending_out.push(Line::UnbindRefused {
                refused: g.clone(),
                device,
                cmdline,
                holders,
            });
        }
    }

    /// Uses `space` for the files under bad media (tests: a fake file system).
    pub fn with_space(mut self, space: Box<dyn FileSpace>) -> Self {
        self.space = space;
        self
    }

    /// Does a badblocks list state a range not reported yet? (The caller then catches up
    /// with the kernel's events before [`Flow::check_media`] names the holders.)
    pub fn media_pending(&self) -> bool {
        let (placed, _) = crate::badblocks::read(&self.state.root, &self.state.topology, None);
        placed
            .iter()
            .any(|p| !self.media.known.iter().any(|k| k.key == p.key()))
    }

    /// Reads the badblocks lists: a `media_error` line for each new range, then what the
    /// policy's `on_media_error` does to its holders (audited, through the pipeline).
    pub fn check_media(&mut self, now_ns: u64) {
        let (found, warnings) = self.media.poll(
            &self.state.root,
            &self.state.topology,
            &mut self.state.applier,
            self.space.as_ref(),
            now_ns,
        );
        for w in warnings {
            log::warn!("{w}");
        }
        for m in found {
            let mut names: Vec<&str> = vec![m.device.as_str()];
            names.extend(m.namespace.as_deref());
            let rule = self.policy.rule_for(&names).clone();
            self.pending_out.push(Line::MediaError(m.clone()));
            if let Some(enf) = self.enforcer.as_mut() {
                let class = Classifier {
                    topology: &self.state.topology,
                };
                let actions = pipeline::media_error(&m, &rule, self.os.as_ref(), enf, &class);
                self.pending_out
                    .extend(actions.into_iter().map(Line::Enforcement));
            }
        }
    }

    /// Names the known-bad range a memory failure or a kernel SIGBUS hit, if any.
    fn link_media(&self, r: &mut Report) {
        match r {
            Report::MemoryFailure {
                pfn, media_error, ..
            } => *media_error = self.media.of_pfn(*pfn).map(|k| k.name.clone()),
            Report::KernelSigbus {
                sigbus,
                media_error,
                cause,
            } => {
                *media_error = self
                    .media
                    .of_access(sigbus.pid, sigbus.addr, &self.state.applier)
                    .map(|k| k.name.clone());
                // A refused fault (not a machine check) on a known-bad range: the media is
                // the cause, whatever else is going on.
                if let (Some(name), true) = (media_error.as_ref(), sigbus.code == "BUS_ADRERR") {
                    *cause =
                        format!("the DAX fault handler refused a read of known-bad media ({name})");
                }
            }
            _ => {}
        }
    }

    /// Records the incidents among the outputs from now on.
    pub fn record_history(&mut self, r: crate::history::recorder::Recorder) {
        self.history = Some(r);
    }

    /// The start-up scan: mappings made before the agent attached.
    pub fn start_scan(&mut self, k: &mut dyn KernelMaps) {
        self.state.applier.reconcile(&self.state.topology);
        self.state.applier.stats = Default::default();
        self.sync_pins();
        self.push_watch(k);
        self.update_guard(k);
    }

    fn push_watch(&mut self, k: &mut dyn KernelMaps) {
        let w = self.state.applier.take_watch_changes();
        for t in w.add {
            k.watch(t);
        }
        for t in w.remove {
            k.unwatch(t);
        }
    }

    /// Re-reads the topology (at most once a second); its line is queued when it changed.
    pub fn refresh_topology(&mut self) {
        if let Some(line) = self.state.refresh_topology() {
            self.pending_out.push(line);
        }
    }

    /// Re-reads the topology and looks what it says about departures (see
    /// [`Flow::departures_seen`]), now.
    pub fn check_departures(&mut self, k: &mut dyn KernelMaps) {
        self.refresh_topology();
        self.departures_seen(boot_ns(), k);
    }

    /// What the topology says about departures at boot time `now_ns`: one that ended
    /// without its `device_gone` is ended and unfenced; a device that vanished without a
    /// departure event is reported as a synthesised departure.
    pub(crate) fn departures_seen(&mut self, now_ns: u64, k: &mut dyn KernelMaps) {
        let o = self.state.incidents.topology_seen(
            &self.state.topology,
            now_ns,
            &mut self.state.applier,
        );
        if let Some(dep) = &o.ended {
            pipeline::lift(k, &dep.devs);
        }
        self.pending_out.extend(o.reports);
        let root = self.state.root.clone();
        let rebound = self.state.incidents.rebound(
            &self.state.topology,
            now_ns,
            &mut self.state.applier,
            &root,
        );
        self.pending_out.extend(rebound);
    }

    /// Decodes and applies one record; its outputs are queued (see [`Flow::flush`]).
    pub fn handle(&mut self, rec: &[u8], k: &mut dyn KernelMaps) {
        let mut ev = match self.state.decode(rec) {
            Ok(e) => e,
            Err(e) => {
                self.state.counts.undecodable += 1;
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
            if let Ok(again) = self.state.decode(rec) {
                ev = again;
            }
        }
        // A departure or failure names the holders mapping the device now: the pages of
        // ranges still growing in the kernel first.
        if matches!(ev, Event::Device(_) | Event::MemoryFailure(_)) {
            let pending = k.pending();
            self.handle_pending(&pending, k);
        }
        self.handle_fresh(ev, Source::Ring, k);
    }

    /// Applies the fault ranges the kernel is still growing, read from every CPU's slot
    /// (`Session::pending`): what of them was not reported yet goes out now.
    pub fn handle_pending(&mut self, ranges: &[FaultEvent], k: &mut dyn KernelMaps) {
        for r in ranges {
            match self.state.decode(r.as_bytes()) {
                Ok(ev) => self.handle_fresh(ev, Source::Slot, k),
                Err(e) => log::debug!("pending range not decoded: {e}"),
            }
        }
    }

    /// A fault line carries only the pages of its range not reported before.
    fn handle_fresh(&mut self, ev: Event, src: Source, k: &mut dyn KernelMaps) {
        let ev = match ev {
            Event::Fault(f) => match self.state.applier.ranges.fresh(f, src) {
                Some(f) => Event::Fault(f),
                None => return,
            },
            other => other,
        };
        self.handle_event(ev, k);
    }

    /// Applies one decoded event; its outputs are queued in the order readers rely on:
    /// a departure report before the enforcement it triggered, and the `holders` line of
    /// a resync before the event that caused it.
    pub fn handle_event(&mut self, ev: Event, k: &mut dyn KernelMaps) {
        self.state.counts.events += 1;
        if let Event::Fault(f) = &ev {
            self.state.counts.faults += f.pages;
        }
        // Departures and failures first: their reports describe the map as it was when the
        // kernel spoke.
        let outcome =
            self.state
                .incidents
                .handle(&ev, &mut self.state.applier, &self.state.topology);
        if let Some(dep) = &outcome.started {
            self.enforce_departure(dep, k);
            self.state.hide_departing();
        }
        if let Some(dep) = &outcome.ended {
            // The departure's own devices: by now the topology may list them no more.
            pipeline::lift(k, &dep.devs);
        }
        for mut r in outcome.reports {
            self.link_media(&mut r);
            if let Report::FenceSignal { sent, device } = &r {
                self.audit_fence_signal(sent, device.as_deref());
            }
            if matches!(r, Report::DeviceDeparting { .. }) {
                // The departing report goes out before the actions it triggered.
                let pos = self
                    .pending_out
                    .iter()
                    .position(|o| matches!(o, Line::Enforcement(_)))
                    .unwrap_or(self.pending_out.len());
                self.pending_out.insert(pos, r);
            } else {
                self.pending_out.push(r);
            }
        }
        if let Event::UnbindGuard(g) = &ev {
            self.guard_report(g);
        }
        let resyncs = self.state.applier.stats.resyncs;
        self.state.applier.apply(&ev, &self.state.topology);
        self.adopt_new_holders(&ev);
        self.push_watch(k);
        self.update_guard(k);
        if matches!(
            ev,
            Event::Fault(_) | Event::Zap(_) | Event::Fork(_) | Event::Mremap(_) | Event::Device(_)
        ) {
            // What procfs told the applier goes out before the event, so a replay's
            // applier gets the same answers when it applies the same event.
            if self.state.applier.stats.resyncs != resyncs {
                let pids = self.state.touched_by(&ev);
                let line = self.state.holders_line(HoldersReason::Resync, Some(pids));
                self.pending_out.push(line);
            }
            if let Some(line) = self.state.announce_file(&ev) {
                self.pending_out.push(line);
            }
            self.pending_out.extend(Line::from_event(ev));
        }
    }

    /// A process a fault or a fork made a holder is read now, not under a departure's
    /// clock: its cgroup (which the departure's report and actions name) and its pin (for
    /// an enforcing agent a departure then opens nothing for it; for every agent, its exit
    /// is one poll away). A process known already costs a lookup or two per event.
    fn adopt_new_holders(&mut self, ev: &Event) {
        let pids = match ev {
            Event::Fault(f) => [Some(f.tgid), None],
            Event::Fork(f) => [Some(f.child_tgid), Some(f.parent_tgid)],
            _ => return,
        };
        for pid in pids.into_iter().flatten() {
            let Some(start) = self.state.applier.map.start_time_of(pid) else {
                continue;
            };
            self.state.applier.cgroup_of(pid, start);
            let Some(pins) = pins_of(&mut self.enforcer, &mut self.watch_pins) else {
                continue;
            };
            if pins.refused(pid, start) {
                // Left out at the cap: not tried (nor the pins swept) on its every fault.
                continue;
            }
            if pins.len() >= pins.cap() {
                // Full: first close the pins of processes that are holders no more.
                let app = &self.state.applier;
                pins.retain(|pid, start| app.holds(pid, start));
            }
            pins.pin(self.os.as_ref(), pid, start);
        }
    }

    /// One pin per holder process of the map, and none for anyone else: at start, after
    /// the start-up scan, and on every reconcile, which may find holders no event told of.
    /// Holders found that way have their cgroup read here too, as a fault or a fork makes
    /// one read it (see `adopt_new_holders`), so no departure's listing reads it.
    pub fn sync_pins(&mut self) {
        let app = &mut self.state.applier;
        let procs: Vec<(u32, u64)> = app.map.processes().collect();
        for (pid, start) in procs {
            if app.holds(pid, start) {
                app.cgroup_of(pid, start);
            }
        }
        let Some(pins) = pins_of(&mut self.enforcer, &mut self.watch_pins) else {
            return;
        };
        let app = &self.state.applier;
        pins.retain(|pid, start| app.holds(pid, start));
        for (pid, start) in app.map.processes() {
            if app.holds(pid, start) {
                pins.pin(self.os.as_ref(), pid, start);
            }
        }
    }

    /// Fences a departing device and applies the policy to its holders.
    fn enforce_departure(&mut self, dep: &Departure, k: &mut dyn KernelMaps) {
        let Some(enf) = self.enforcer.as_mut() else {
            return;
        };
        let names: Vec<&str> = dep.names.iter().map(String::as_str).collect();
        let rule = self.policy.rule_for(&names).clone();
        let class = Classifier {
            topology: &self.state.topology,
        };
        let actions = pipeline::depart(dep, &rule, self.os.as_ref(), k, enf, &class);
        self.pending_out
            .extend(actions.into_iter().map(Line::Enforcement));
    }

    /// A signal the kernel's fence sent is recorded after the fact: the fault program cannot
    /// wait for the log. Its arming was recorded before (`fence`).
    fn audit_fence_signal(&mut self, sent: &crate::event::FenceSignal, device: Option<&str>) {
        let Some(enf) = self.enforcer.as_mut() else {
            return;
        };
        let logged = pipeline::audit_kernel_signal(enf, sent, device);
        if !logged {
            log::error!(
                "cannot write the audit log: the fence's {} to {} is not recorded",
                sent.signal,
                sent.pid
            );
        }
    }

    /// Hands the queued outputs to `out`, in order.
    pub fn flush(&mut self, out: &mut Sink) -> anyhow::Result<()> {
        for o in std::mem::take(&mut self.pending_out) {
            if let Some(h) = self.history.as_mut() {
                h.offer(&o);
            }
            self.record(&o);
            out(o)?;
        }
        Ok(())
    }

    /// Counts what an output line tells into the metrics.
    fn record(&self, line: &Line) {
        self.metrics.observe(line);
        if let Line::KernelSigbus { sigbus, .. } = line {
            self.metrics
                .kernel_sigbus(self.device_at(sigbus.pid, sigbus.addr).as_deref());
        }
    }

    /// The device whose page `pid` maps at `addr`, per the map; else the device departing
    /// (the kernel's SIGBUS of an unbind may come after the map dropped the page).
    fn device_at(&self, pid: u32, addr: u64) -> Option<String> {
        let map = &self.state.applier.map;
        let topo = &self.state.topology;
        map.holder_of(pid)
            .into_iter()
            .flat_map(|h| map.of_holder(h))
            .find(|v| addr >= v.vaddr && addr < v.vaddr + (v.pages << 12))
            .and_then(|v| topo.namespace_of_pfn(v.pfn + ((addr - v.vaddr) >> 12)))
            .map(|n| n.device_name().to_string())
            .or_else(|| {
                self.state
                    .incidents
                    .departing
                    .last()
                    .map(|d| d.device.clone())
            })
    }

    /// Brings the metrics' per-device totals and drift up to date with the map.
    pub fn refresh_metrics(&self) {
        let s = &self.state.applier.stats;
        self.metrics.refresh(
            &self.state.applier.map,
            &self.state.topology,
            s.drift_missing,
            s.drift_extra,
        );
        if let Some(p) = self
            .enforcer
            .as_ref()
            .map(|e| &e.pins)
            .or(self.watch_pins.as_ref())
        {
            self.metrics.pins(p.len(), p.over_cap);
        }
    }

    /// When the next escalation is due.
    pub fn next_due(&self) -> Option<std::time::Instant> {
        self.enforcer.as_ref().and_then(Enforcer::next_due)
    }

    /// Runs escalations that are due.
    pub fn escalate(&mut self, out: &mut Sink) -> anyhow::Result<()> {
        let Some(enf) = self.enforcer.as_mut() else {
            return Ok(());
        };
        let class = Classifier {
            topology: &self.state.topology,
        };
        for a in pipeline::escalate(self.os.as_ref(), enf, &class) {
            let line = Line::Enforcement(a);
            self.metrics.observe(&line);
            if let Some(h) = self.history.as_mut() {
                h.offer(&line);
            }
            out(line)?;
        }
        Ok(())
    }

    /// Compares the map with every process's page tables; a `holders` line when that
    /// corrected it, and a `reconcile` line unless it was a periodic one that found nothing.
    pub fn reconcile(
        &mut self,
        reason: &'static str,
        k: &mut dyn KernelMaps,
        out: &mut Sink,
    ) -> anyhow::Result<()> {
        self.check_departures(k);
        self.flush(out)?;
        self.state.forget_gone();
        let (missing, extra) = self.state.applier.reconcile(&self.state.topology);
        self.sync_pins();
        self.push_watch(k);
        self.update_guard(k);
        if missing + extra > 0 {
            let line = self.state.holders_line(HoldersReason::Reconcile, None);
            out(line)?;
        }
        if missing + extra > 0 || reason != "periodic" {
            out(Line::Reconcile(Reconcile {
                missing,
                extra,
                holders: self.state.applier.map.holder_count(),
                reason: reason.into(),
            }))?;
        }
        Ok(())
    }
}

impl Agent {
    /// Runs until Ctrl-C, SIGTERM or `duration`; every event and reconcile goes to `out`.
    pub async fn run(
        &mut self,
        duration: Option<Duration>,
        out: &mut Sink<'_>,
    ) -> anyhow::Result<()> {
        // Every output also goes to the subscribers (never waiting for them).
        let subs = self.subscribers.clone();
        let mut tee = |l: Line| -> anyhow::Result<()> {
            subs.lock().unwrap_or_else(|p| p.into_inner()).send(&l);
            out(l)
        };
        let out: &mut Sink<'_> = &mut tee;
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
        // Per-device totals for `--metrics`: a walk of the map, so once a second at most.
        let mut metrics_tick = tokio::time::interval(Duration::from_secs(1));
        let serving_metrics = self.serving_metrics;
        let stop = self.stop.clone();
        // A recording starts with the machine's state: replay needs no procfs or sysfs.
        out(self.flow.state.topology_line())?;
        let start = self.flow.state.holders_line(HoldersReason::Start, None);
        out(start)?;
        // Bad media already listed: reported now, with their holders from the start-up scan.
        self.flow.check_media(boot_ns());
        self.flow.flush(out)?;
        loop {
            tokio::select! {
                rec = self.session.records.recv() => {
                    let Some(rec) = rec else { return Err(self.blind()) };
                    self.flow.handle(&rec, &mut self.session);
                    self.flow.flush(out)?;
                    self.drain(out)?;
                }
                _ = sleep_opt(self.flow.next_due()) => {
                    self.flow.escalate(out)?;
                }
                conn = control::accept(&self.listener) => {
                    if let Ok(stream) = conn {
                        // Answers name processes and physical memory: root only
                        // (SO_PEERCRED), refused with one line before anything is read.
                        if !crate::control::peer_is_root(&stream).unwrap_or(false) {
                            let _ = stream.try_write(crate::control::not_root_line().as_bytes());
                            continue;
                        }
                        // Its own task: a slow client never holds the loop.
                        tokio::spawn(control::connection(
                            stream,
                            self.questions.0.clone(),
                            control::Limits::default(),
                        ));
                    }
                }
                Some(q) = self.questions.1.recv() => self.answer_question(q, out),
                _ = tick.tick() => self.reconcile("periodic", out)?,
                _ = modules.tick() => {
                    self.adopt_new_modules(out)?;
                    // A device that left without its departure event (no hook, or one
                    // without an exit probe) is seen here.
                    self.flow.check_departures(&mut self.session);
                    self.flow.flush(out)?;
                    // New bad media: catch up with the kernel first, so its holders are
                    // the ones mapping it now.
                    if self.flow.media_pending() {
                        self.session.sync(crate::control::SYNC_WAIT);
                        self.drain(out)?;
                        self.flow.check_media(boot_ns());
                        self.flow.flush(out)?;
                    }
                }
                _ = metrics_tick.tick(), if serving_metrics => {
                    self.flow.refresh_metrics();
                    let c = &self.session.counters;
                    self.flow.metrics.kernel_counters(|k| c.get(k));
                }
                _ = drops.tick() => {
                    self.collect_pending(out)?;
                    self.flow.state.applier.tick();
                    self.repair_after_drops(out)?;
                    if self.snapshot_request.swap(false, Ordering::Relaxed) {
                        out(self.flow.state.topology_line())?;
                        let line = self.flow.state.holders_line(HoldersReason::Requested, None);
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
        self.collect_pending(out)?;
        self.repair_after_drops(out)?;
        Ok(())
    }

    /// The reader thread ended while the agent runs: it can no longer see the kernel's
    /// events. It exits non-zero, so a supervisor (systemd's Restart=on-failure) restarts it.
    fn blind(&self) -> anyhow::Error {
        Failure::new(
            Code::Software,
            format!(
                "the ring-buffer reader stopped ({}): the agent no longer sees the kernel's \
                 events",
                self.session
                    .reader_failure()
                    .unwrap_or_else(|| "no reason given".into())
            ),
        )
        .into()
    }

    pub fn reconcile(&mut self, reason: &'static str, out: &mut Sink) -> anyhow::Result<()> {
        self.flow.reconcile(reason, &mut self.session, out)?;
        let swept = self.session.sweep_watched(&self.src.root);
        if swept > 0 {
            log::debug!("unwatched {swept} process(es) that exited");
        }
        Ok(())
    }

    /// Handles everything the reader already queued.
    pub(super) fn drain(&mut self, out: &mut Sink) -> anyhow::Result<()> {
        while let Ok(rec) = self.session.records.try_recv() {
            self.flow.handle(&rec, &mut self.session);
            self.flow.flush(out)?;
        }
        Ok(())
    }

    /// Applies the ranges the kernel's CPUs are still growing (one map read for all CPUs).
    pub(super) fn collect_pending(&mut self, out: &mut Sink) -> anyhow::Result<()> {
        let pending = self.session.pending.read();
        if pending.is_empty() {
            return Ok(());
        }
        self.flow.handle_pending(&pending, &mut self.session);
        self.flow.flush(out)
    }

    /// A module loaded since the last look may make kernel hooks possible where the agent
    /// fell back to userspace (device_dax loaded after the agent started, for one).
    fn adopt_new_modules(&mut self, out: &mut Sink) -> anyhow::Result<()> {
        let ups = self.session.adopt_new_modules(&self.src);
        if ups.is_empty() {
            return Ok(());
        }
        for u in ups {
            log::warn!(
                "{}: a module loaded: now {} (was {})",
                u.concern.name(),
                u.chosen,
                u.was.as_deref().unwrap_or("unavailable")
            );
            let line = Line::HooksChanged(u);
            self.flow.metrics.observe(&line);
            out(line)?;
        }
        // Mappings made before the new hooks: one full comparison with the page tables.
        self.reconcile("hooks changed", out)
    }

    /// Lost events leave the map behind the kernel: repair at once.
    pub(super) fn repair_after_drops(&mut self, out: &mut Sink) -> anyhow::Result<()> {
        let dropped = self.session.lost_events();
        if dropped > self.last_dropped {
            self.last_dropped = dropped;
            out(Line::Dropped(Dropped { dropped }))?;
            self.drain(out)?;
            self.reconcile("events lost", out)?;
        }
        let full = self.session.counters.get(Counter::WatchedFull);
        if full > self.last_watched_full {
            self.last_watched_full = full;
            log::warn!(
                "the kernel's map of watched processes was full {full} time(s): forks and \
                 mremaps of new holders may have gone unreported; exited processes are \
                 swept out and the page tables re-read"
            );
            self.reconcile("watched map full", out)?;
        }
        Ok(())
    }
}

async fn sleep_opt(due: Option<std::time::Instant>) {
    match due {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use super::*;
    use crate::{
        event::{DeviceChange, DevicePhase, Fork},
        holders::{
            Applier,
            query::{HolderRow, RowExtent},
        },
        incident::Incidents,
        policy::audit::AuditLog,
        topology::{DaxOption, DevId, Mode, Mount, Namespace, PhysRange, Topology},
        ui::tui::recorded::{Recorded, RecordedProc},
    };

    const DEV: DevId = DevId {
        major: 259,
        minor: 1,
    };
    /// First pfn of pmem1's data range.
    const PFN0: u64 = 0x10_0200;

    /// What a test saw the flow do to the kernel.
    #[derive(Default)]
    struct FakeKernel {
        fenced: Vec<u32>,
        unfenced: Vec<u32>,
        watched: Vec<u32>,
        /// Every list the flow gave the unbind guard, in order.
        guarded: Vec<BTreeSet<String>>,
    }

    impl Fence for FakeKernel {
        fn fence(&mut self, dev: DevId, _arm: &crate::os::FenceArm) -> anyhow::Result<()> {
            self.fenced.push(dev.to_kernel());
            Ok(())
        }
        fn unfence(&mut self, dev: DevId) {
            self.unfenced.push(dev.to_kernel());
        }
        fn refuses_mappings(&self) -> bool {
            false
        }
    }

    impl KernelMaps for FakeKernel {
        fn watch(&mut self, tgid: u32) {
            self.watched.push(tgid);
        }
        fn unwatch(&mut self, tgid: u32) {
            self.watched.retain(|t| *t != tgid);
        }
        fn set_guarded(&mut self, names: &BTreeSet<String>) {
            self.guarded.push(names.clone());
        }
    }

    fn topology() -> Topology {
        Topology {
            dm: Vec::new(),
            namespaces: vec![Namespace {
                name: "namespace1.0".into(),
                region: "region1".into(),
                mode: Mode::Fsdax,
                holder: Some("pfn1.0".into()),
                namespace_range: PhysRange {
                    start: 0x1_0000_0000,
                    end: 0x1_4000_0000,
                },
                data_range: PhysRange {
                    start: PFN0 << 12,
                    end: 0x1_4000_0000,
                },
                block: Some(("pmem1".into(), DEV)),
                chardev: None,
                align: Some(2 << 20),
                enabled: true,
                range_known: true,
            }],
            mounts: vec![Mount {
                dev: DEV,
                mount_point: "/mnt/xfs".into(),
                fstype: "xfs".into(),
                source: "/dev/pmem1".into(),
                dax: DaxOption::Always,
                rtdev: None,
            }],
        }
    }

    /// `pid` maps two pages of /mnt/xfs/db at pfn `pfn`.
    fn row(pid: u32, pfn: u64) -> HolderRow {
        HolderRow {
            pid,
            start_time: 1000 + pid as u64,
            comm: "db".into(),
            dev: DEV,
            ino: 12,
            file: Some("/mnt/xfs/db".into()),
            pages: 2,
            offsets: vec![(0, 8192)],
            probe_at: Vec::new(),
            extents: Some(vec![RowExtent {
                vaddr: 0x7f00_0000_0000,
                pfn,
                offset: 0,
                pages: 2,
            }]),
            cgroup: None,
            container: None,
            pod_uid: None,
        }
    }

    /// A flow over a machine described by `procs` (procfs as a recording answers it), with
    /// a report-only enforcer (a real one would signal real pids), after the start-up scan.
    fn flow(dir: &std::path::Path) -> (Flow, Rc<RefCell<Recorded>>, FakeKernel) {
        flow_with(dir, Policy::default())
    }

    fn flow_with(
        dir: &std::path::Path,
        policy: Policy,
    ) -> (Flow, Rc<RefCell<Recorded>>, FakeKernel) {
        let recorded = Rc::new(RefCell::new(Recorded::default()));
        recorded.borrow_mut().topology = topology();
        recorded.borrow_mut().replace_all(&[row(150, PFN0)]);
        let state = State::new(
            topology(),
            Applier::new(Box::new(RecordedProc(recorded.clone()))),
            Incidents::new(None),
            dir.to_path_buf(),
        );
        let enforcer = Enforcer::new(AuditLog::open(&dir.join("audit.jsonl")).unwrap());
        // The live OS below an empty root: no process of the test exists there.
        let os = Box::new(crate::os::LiveOs::new(dir));
        let mut f = Flow::new(state, os, Some(enforcer), policy);
        let mut k = FakeKernel::default();
        f.start_scan(&mut k);
        assert_eq!(k.watched, [150], "the start-up scan found the holder");
        (f, recorded, k)
    }

    fn outputs(f: &mut Flow) -> Vec<Line> {
        let mut out = Vec::new();
        f.flush(&mut |l| {
            out.push(l);
            Ok(())
        })
        .unwrap();
        out
    }

    fn departing(ts_ns: u64, phase: DevicePhase) -> Event {
        Event::Device(DeviceChange {
            ts_ns,
            phase,
            tgid: 300,
            tid: 300,
            comm: "sh".into(),
            device: "pfn1.0".into(),
            driver: "nd_pmem".into(),
            bus: "nd".into(),
            offset: 0,
            len: 0,
            mf_flags: 0,
            pre_remove: false,
        })
    }

    /// A fault of `pid` that mapped one 4 KiB page at `pfn` of /mnt/xfs/db.
    fn fault(pid: u32, pfn: u64) -> Event {
        Event::Fault(crate::event::Fault {
            ts_ns: 3,
            tgid: pid,
            tid: pid,
            comm: "db".into(),
            dev: DEV,
            ino: 12,
            offset: 0,
            address: 0x7f00_0000_0000,
            page_address: 0x7f00_0000_0000,
            pfn: Some(pfn),
            pfn_source: None,
            page_size: 4096,
            write: false,
            user: true,
            mapped: true,
            zero_page: false,
            result: "NOPAGE".into(),
            result_raw: 0x100,
            vma_start: 0x7f00_0000_0000,
            vma_end: 0x7f00_0000_2000,
            shared: true,
            device: Some("pmem1".into()),
            devdax: false,
            mm: 0,
            pages: 1,
            last_ts_ns: 0,
            range: None,
        })
    }

    /// A fault of `pid` at `addr` (page 1 of /mnt/xfs/db) that the handler refused.
    fn refused_fault(pid: u32, addr: u64, user: bool, result_raw: u32) -> Event {
        let Event::Fault(mut f) = fault(pid, 0) else {
            unreachable!()
        };
        f.address = addr;
        f.page_address = addr & !0xfff;
        f.offset = 4096;
        f.pfn = None;
        f.device = None;
        f.mapped = false;
        f.user = user;
        f.result = "SIGBUS".into();
        f.result_raw = result_raw;
        Event::Fault(f)
    }

    /// The metrics count what the flow saw, with no pid or path label: the holder map's
    /// totals, a fault, a departure with its holder, and the stale mapping left after it.
    #[test]
    fn metrics_count_what_the_flow_saw() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow(dir.path());
        f.refresh_metrics();
        let text = f.metrics.encode();
        for want in [
            "dax_probe_holder_processes{device=\"pmem1\"} 1\n",
            "dax_probe_mapped_bytes{device=\"pmem1\"} 8192\n",
            // The flow's OS has no process 150 to pin (an empty root).
            "dax_probe_pinned_processes 0\n",
            "dax_probe_unpinned_holders_total 0\n",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        f.handle_event(fault(150, PFN0), &mut k);
        f.handle_event(departing(5, DevicePhase::Departing), &mut k);
        outputs(&mut f);
        f.handle_event(departing(9, DevicePhase::Gone), &mut k);
        outputs(&mut f);
        let text = f.metrics.encode();
        for want in [
            "dax_probe_faults_total{device=\"pmem1\",page_size=\"4096\"} 1\n",
            "dax_probe_departures_total{device=\"pmem1\"} 1\n",
            "dax_probe_departure_holders_total{device=\"pmem1\"} 1\n",
            // Report-only: nobody was signalled, the holder still maps the gone device.
            "dax_probe_stale_mappings_found_total{device=\"pmem1\"} 1\n",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        assert!(!text.contains("signals_sent_total{"), "{text}");
        assert!(
            !text.contains("150") && !text.contains("/mnt/xfs"),
            "{text}"
        );
        promtool_accepts(&f.metrics.encode_classic());
    }

    /// Signals by origin: a delivered policy signal and a signal the fence reports count, a
    /// skipped one (or a bare fault) does not.
    #[test]
    fn signals_are_counted_by_origin() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow(dir.path());
        let act = |action: &'static str| {
            Line::Enforcement(crate::policy::enforce::ActionReport {
                device: "pmem1".into(),
                pid: 150,
                comm: "db".into(),
                action: action.into(),
                signal: Some("SIGTERM".into()),
                reason: String::new(),
                since_departure_us: None,
                received_us: None,
                listed_us: None,
                fenced_us: None,
                verdict_us: None,
                cgroup: None,
                container: None,
                pod_uid: None,
            })
        };
        f.metrics.observe(&act("signal"));
        f.metrics.observe(&act("skip"));
        f.metrics.observe(&act("escalate"));
        // A signal the fence reports counts; a fault alone (an excluded task, the rate
        // limit) does not.
        f.handle_event(fault(150, PFN0), &mut k);
        f.handle_event(
            Event::FenceSignal(crate::event::FenceSignal {
                ts_ns: 5,
                pid: 150,
                tid: 150,
                comm: "db".into(),
                signal: "SIGBUS".into(),
                dev: DEV,
                ino: 12,
                error: None,
            }),
            &mut k,
        );
        outputs(&mut f);
        let text = f.metrics.encode();
        for want in [
            "dax_probe_signals_sent_total{device=\"pmem1\",signal=\"SIGTERM\",origin=\"policy\"} 2\n",
            "dax_probe_signals_sent_total{device=\"pmem1\",signal=\"SIGBUS\",origin=\"kernel_fence\"} 1\n",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        promtool_accepts(&f.metrics.encode_classic());
    }

    /// A range written into pmem1's badblocks list is reported once with its file, offset
    /// and holder, the policy's `on_media_error` acts on the holder through the pipeline
    /// (audited), and a later memory failure / kernel SIGBUS on that page is linked to it.
    #[test]
    fn a_new_bad_range_is_reported_acted_on_and_linked() {
        let dir = tempfile::tempdir().unwrap();
        let mut policy = Policy::default();
        policy.default.on_media_error = crate::policy::Action::Signal;
        let (f, _, mut k) = flow_with(dir.path(), policy);
        let mut space = crate::os::fake::FakeSpace::default();
        // /mnt/xfs/db's first 8 KiB sit at the device's first 8 KiB.
        space.file("/mnt/xfs/db", 12, &[(0, 0, 8192, false)]);
        let mut f = f.with_space(Box::new(space));
        let list = dir.path().join("sys/block/pmem1/badblocks");
        std::fs::create_dir_all(list.parent().unwrap()).unwrap();
        f.check_media(1);
        assert!(outputs(&mut f).is_empty(), "no list, nothing reported");
        // Page 1 of the device (sectors 8..16): pfn PFN0 + 1, which pid 150 maps.
        std::fs::write(&list, "8 8\n").unwrap();
        assert!(f.media_pending());
        f.check_media(2);
        let out = outputs(&mut f);
        let Some(Line::MediaError(m)) = out.first() else {
            panic!("a media_error first: {out:?}")
        };
        assert_eq!(m.device, "pmem1");
        assert_eq!(m.pfns, Some((PFN0 + 1, PFN0 + 2)));
        assert_eq!(m.mount.as_deref(), Some("/mnt/xfs"));
        assert_eq!(m.files.len(), 1);
        assert_eq!((m.files[0].offset, m.files[0].end), (4096, 8192));
        assert_eq!(m.holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [150]);
        // The policy's action follows the report: pid 150 is not a process of this test's
        // root, so the pipeline's re-check refuses to signal it, and says so.
        let acts: Vec<_> = out
            .iter()
            .filter_map(|l| match l {
                Line::Enforcement(a) => Some(a),
                _ => None,
            })
            .collect();
        assert!(acts.iter().any(|a| a.pid == 150), "{out:?}");
        assert!(acts.iter().all(|a| a.action != "signal"), "{acts:?}");
        let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert!(audit.contains("media error pmem1 sectors 8+8"), "{audit}");
        // Reported once.
        assert!(!f.media_pending());
        f.check_media(3);
        assert!(outputs(&mut f).is_empty());
        // The kernel's SIGBUS at the page's address and a memory failure of its pfn.
        f.handle_event(
            Event::KernelSigbus(crate::event::KernelSigbus {
                ts_ns: 5,
                pid: 150,
                tid: 150,
                comm: "db".into(),
                addr: 0x7f00_0000_1008,
                code: "BUS_MCEERR_AR".into(),
                lsb: 12,
                sender_pid: 150,
            }),
            &mut k,
        );
        f.handle_event(
            Event::MemoryFailure(crate::event::MemoryFailure {
                ts_ns: 6,
                pfn: PFN0 + 1,
                phase: "start",
                tgid: 1,
                comm: "madvise".into(),
                flags: 0,
                page_type: None,
                result: None,
            }),
            &mut k,
        );
        // A SIGBUS at the other page is not linked.
        f.handle_event(
            Event::KernelSigbus(crate::event::KernelSigbus {
                ts_ns: 7,
                pid: 150,
                tid: 150,
                comm: "db".into(),
                addr: 0x7f00_0000_0008,
                code: "BUS_MCEERR_AR".into(),
                lsb: 12,
                sender_pid: 150,
            }),
            &mut k,
        );
        let out = outputs(&mut f);
        let linked: Vec<Option<&str>> = out
            .iter()
            .filter_map(|l| match l {
                Line::KernelSigbus { media_error, .. }
                | Line::MemoryFailure { media_error, .. } => Some(media_error.as_deref()),
                _ => None,
            })
            .collect();
        assert_eq!(
            linked,
            [Some("pmem1 sectors 8+8"), Some("pmem1 sectors 8+8"), None],
            "{out:?}"
        );
        // A plain VM_FAULT_SIGBUS refusal of a user-mode read of the bad page (what 5.10 and
        // 6.1 do; no hook sees the BUS_ADRERR it brings) is the kernel's SIGBUS too, linked;
        // a kernel-mode refusal (an error return, no signal) and a HWPOISON refusal
        // (force_sig_mceerr's own record) add no line.
        for (user, result_raw) in [(true, 0x2), (false, 0x2), (true, 0x10)] {
            f.handle_event(
                refused_fault(150, 0x7f00_0000_1008, user, result_raw),
                &mut k,
            );
        }
        let out = outputs(&mut f);
        let sigbus: Vec<_> = out
            .iter()
            .filter_map(|l| match l {
                Line::KernelSigbus {
                    sigbus,
                    cause,
                    media_error,
                } => Some((sigbus, cause, media_error.as_deref())),
                _ => None,
            })
            .collect();
        assert_eq!(sigbus.len(), 1, "{out:?}");
        let (s, cause, media) = &sigbus[0];
        assert_eq!(
            (s.pid, s.tid, s.addr, s.code.as_str(), *media),
            (
                150,
                150,
                0x7f00_0000_1008,
                "BUS_ADRERR",
                Some("pmem1 sectors 8+8")
            )
        );
        assert!(cause.contains("known-bad media"), "{cause}");
        // Cleared from the list: forgotten, and reported again if it comes back.
        std::fs::write(&list, "").unwrap();
        f.check_media(8);
        assert!(f.media.known.is_empty());
        std::fs::write(&list, "8 8\n").unwrap();
        f.check_media(9);
        assert_eq!(
            outputs(&mut f)
                .iter()
                .filter(|l| matches!(l, Line::MediaError(_)))
                .count(),
            1
        );
    }

    /// A garbled list is warned about and keeps what it stated; the others are still read.
    #[test]
    fn a_garbled_list_keeps_its_known_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, _) = flow(dir.path());
        let list = dir.path().join("sys/block/pmem1/badblocks");
        std::fs::create_dir_all(list.parent().unwrap()).unwrap();
        std::fs::write(&list, "8 8\n").unwrap();
        f.check_media(1);
        assert_eq!(f.media.known.len(), 1);
        outputs(&mut f);
        std::fs::write(&list, "8 eight\n").unwrap();
        f.check_media(2);
        assert!(outputs(&mut f).is_empty());
        assert_eq!(f.media.known.len(), 1, "a garbled list forgets nothing");
    }

    /// The kernel's own SIGBUS is attributed to the device the holder maps at the address,
    /// and a memory failure on a mapped page says so.
    #[test]
    fn kernel_sigbus_and_memory_failure_name_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow(dir.path());
        f.handle_event(
            Event::MemoryFailure(crate::event::MemoryFailure {
                ts_ns: 4,
                pfn: PFN0 + 1,
                phase: "start",
                tgid: 1,
                comm: "madvise".into(),
                flags: 0,
                page_type: None,
                result: None,
            }),
            &mut k,
        );
        f.handle_event(
            Event::KernelSigbus(crate::event::KernelSigbus {
                ts_ns: 5,
                pid: 150,
                tid: 150,
                comm: "db".into(),
                addr: 0x7f00_0000_1008,
                code: "BUS_MCEERR_AR".into(),
                lsb: 12,
                sender_pid: 1,
            }),
            &mut k,
        );
        outputs(&mut f);
        let text = f.metrics.encode();
        for want in [
            "dax_probe_memory_failures_total{device=\"pmem1\",mapped=\"true\"} 1\n",
            "dax_probe_signals_sent_total{device=\"pmem1\",signal=\"SIGBUS\",origin=\"kernel\"} 1\n",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }

    /// `promtool check metrics` on the scrape (classic format: promtool parses no other)
    /// when `cargo xtask test` names promtool (DAX_PROBE_PROMTOOL): it lints names, types,
    /// units and help texts by Prometheus's rules.
    fn promtool_accepts(text: &str) {
        let Some(promtool) = std::env::var_os("DAX_PROBE_PROMTOOL") else {
            return;
        };
        use std::io::Write;
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics rejects the scrape: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// On a kernel without devmap DAX entries a departing device is gone for every later
    /// walk (resync, reconcile, scan), also when sysfs still lists it mid-unbind: reading
    /// page tables into it can oops once the unbind freed its memmap. With devmap, kept.
    #[test]
    fn without_devmap_a_departing_device_is_walked_no_more() {
        for devmap in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (mut f, _, mut k) = flow(dir.path());
            f.state.devmap = devmap;
            let vma = crate::holders::scan::Vma {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0000_1000,
                shared: true,
                write: true,
                offset: 0,
                dev: DEV,
                ino: 12,
                path: "/mnt/xfs/f".into(),
            };
            let walks = |f: &Flow| {
                Classifier {
                    topology: &f.state.topology,
                }
                .dax_file(&vma)
                .is_some()
            };
            assert!(walks(&f), "a live device's files are walked");
            f.handle_event(departing(5, DevicePhase::Departing), &mut k);
            let _ = outputs(&mut f);
            assert_eq!(walks(&f), devmap, "devmap {devmap}");
            // A re-read of sysfs mid-unbind, which still lists the device: no change to
            // report, and the device stays hidden.
            assert!(f.state.take_read(topology()).is_none());
            assert_eq!(walks(&f), devmap, "devmap {devmap}, after a re-read");
            // sysfs changed (the namespace gone): reported as sysfs says, hidden or not.
            let mut gone = topology();
            gone.namespaces[0].enabled = false;
            gone.namespaces[0].block = None;
            match f.state.take_read(gone.clone()) {
                Some(Line::Topology(t)) => assert_eq!(t, gone),
                other => panic!("{other:?}"),
            }
            // The reported topology never carries the hiding.
            let Line::Topology(t) = f.state.topology_line() else {
                unreachable!()
            };
            assert_eq!(t, gone);
        }
    }

    /// An enforcing agent pins every holder: those of the start-up scan, and each process
    /// a fault makes one (once); a holder gone is unpinned by the next reconcile.
    #[test]
    fn holders_are_pinned_as_they_appear_and_unpinned_when_gone() {
        use crate::os::fake::{Call, FakeOs, FakeProc};
        let dir = tempfile::tempdir().unwrap();
        let (mut f, recorded, mut k) = flow(dir.path());
        let os = FakeOs::new(
            &[
                (150, FakeProc::holder("db", 1150)),
                (160, FakeProc::holder("db", 1160)),
            ],
            &["/mnt/xfs"],
        );
        f.os = Box::new(os.clone());
        f.sync_pins();
        let pinned = |f: &Flow, pid: u32| {
            let pins = &f.enforcer.as_ref().unwrap().pins;
            pins.get(pid, 1000 + pid as u64).is_some()
        };
        assert!(pinned(&f, 150) && !pinned(&f, 160));
        recorded
            .borrow_mut()
            .replace_all(&[row(150, PFN0), row(160, PFN0 + 2)]);
        f.handle_event(fault(160, PFN0 + 2), &mut k);
        f.handle_event(fault(160, PFN0 + 3), &mut k);
        assert!(pinned(&f, 160));
        let opens = os.log().iter().filter(|c| **c == Call::Pin(160)).count();
        assert_eq!(opens, 1, "{:?}", os.log());
        // 150 exits.
        os.state.borrow_mut().procs.remove(&150);
        recorded.borrow_mut().replace_all(&[row(160, PFN0 + 2)]);
        f.reconcile("periodic", &mut k, &mut |_| Ok(())).unwrap();
        assert!(!pinned(&f, 150) && pinned(&f, 160));
        assert_eq!(f.enforcer.as_ref().unwrap().pins.len(), 1);
        f.refresh_metrics();
        let text = f.metrics.encode();
        assert!(text.contains("dax_probe_pinned_processes 1\n"), "{text}");
    }

    /// A monitor that does not enforce pins its holders too (a pidfd and a stat each, no
    /// page tables): an answer then tells who exited from one poll of them, where it read
    /// every holder's stat (150 ms of a 1,000-holder answer under TCG).
    #[test]
    fn a_monitor_that_does_not_enforce_pins_its_holders_to_tell_their_exit() {
        use crate::os::fake::{FakeOs, FakeProc};
        let dir = tempfile::tempdir().unwrap();
        let recorded = Rc::new(RefCell::new(Recorded::default()));
        recorded.borrow_mut().topology = topology();
        recorded.borrow_mut().replace_all(&[row(150, PFN0)]);
        let state = State::new(
            topology(),
            Applier::new(Box::new(RecordedProc(recorded.clone()))),
            Incidents::new(None),
            dir.path().to_path_buf(),
        );
        let os = FakeOs::new(&[(150, FakeProc::holder("db", 1150))], &["/mnt/xfs"]);
        let mut f = Flow::new(state, Box::new(os.clone()), None, Policy::default());
        let mut k = FakeKernel::default();
        f.start_scan(&mut k);
        let pins = f.watch_pins.as_ref().expect("a monitor's own pins");
        assert!(pins.get(150, 1150).is_some());
        assert_eq!(pins.proof, None, "no page tables or maps held");
        os.state.borrow_mut().pin_polls.clear();
        f.state.forget_gone();
        assert_eq!(os.state.borrow().pin_polls, [150]);
        f.refresh_metrics();
        assert!(
            f.metrics
                .encode()
                .contains("dax_probe_pinned_processes 1\n")
        );
    }

    #[test]
    fn a_departure_report_precedes_its_actions() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow(dir.path());
        f.handle_event(departing(5, DevicePhase::Departing), &mut k);
        let out = outputs(&mut f);
        let dep = out
            .iter()
            .position(|l| matches!(l, Line::DeviceDeparting { .. }))
            .expect("a device_departing line");
        let acts: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l, Line::Enforcement(a) if a.pid == 150))
            .map(|(i, _)| i)
            .collect();
        assert!(
            !acts.is_empty(),
            "an enforcement line for the holder: {out:?}"
        );
        assert!(acts.iter().all(|&a| a > dep), "{out:?}");
        let Line::DeviceDeparting {
            device, holders, ..
        } = &out[dep]
        else {
            unreachable!()
        };
        assert_eq!(device, "pmem1");
        assert_eq!(holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [150]);
        // The raw device event goes out last; a report-only rule fences nothing.
        assert!(matches!(out.last(), Some(Line::Device(_))), "{out:?}");
        assert!(k.fenced.is_empty());
        // The unbind finished: its report follows, and the device is unfenced.
        f.handle_event(departing(9, DevicePhase::Gone), &mut k);
        let out = outputs(&mut f);
        assert!(
            matches!(&out[0], Line::DeviceGone { device, .. } if device == "pmem1"),
            "{out:?}"
        );
        assert_eq!(k.unfenced, [(259 << 20) | 1]);
    }

    #[test]
    fn a_resync_holders_line_precedes_its_event() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, recorded, mut k) = flow(dir.path());
        // The child inherited the parent's mapping: that is what its page tables show.
        recorded.borrow_mut().set(Some(&[151]), &[row(151, PFN0)]);
        f.handle_event(
            Event::Fork(Fork {
                ts_ns: 7,
                parent_tgid: 150,
                comm: "db".into(),
                child_tgid: 151,
                child_mm: 0,
            }),
            &mut k,
        );
        let out = outputs(&mut f);
        assert_eq!(out.len(), 2, "{out:?}");
        let Line::Holders(h) = &out[0] else {
            panic!("a holders line first: {out:?}")
        };
        assert_eq!(h.reason, HoldersReason::Resync);
        assert_eq!(h.pids.as_deref(), Some(&[150, 151][..]));
        assert!(h.rows.iter().any(|r| r.pid == 151), "{h:?}");
        assert!(matches!(&out[1], Line::Fork(x) if x.child_tgid == 151));
        assert!(k.watched.contains(&151));
    }

    /// A policy that signals holders of every device.
    fn signalling() -> Policy {
        Policy {
            default: crate::policy::Rule {
                action: crate::policy::Action::Signal,
                ..Default::default()
            },
            ..Policy::default()
        }
    }

    /// pmem1 after its unbind: the namespace stays, its block device is gone.
    fn unbound() -> Topology {
        let mut t = topology();
        t.namespaces[0].block = None;
        t.namespaces[0].enabled = false;
        t
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn the_fence_is_lifted_from_the_departures_own_devices() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow_with(dir.path(), signalling());
        f.handle_event(departing(5, DevicePhase::Departing), &mut k);
        assert_eq!(k.fenced, [DEV.to_kernel()]);
        // The topology was re-read during the teardown: pmem1 is no longer listed.
        f.state.topology = unbound();
        f.handle_event(departing(9, DevicePhase::Gone), &mut k);
        assert_eq!(k.unfenced, [DEV.to_kernel()], "the fence stayed up");
    }

    #[test]
    fn a_departure_without_its_end_event_ends_when_its_device_leaves_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow_with(dir.path(), signalling());
        // A kprobe departure hook: no exit probe, no device_gone from the kernel.
        f.state.incidents.end_hooked = false;
        f.departures_seen(SECOND, &mut k);
        f.handle_event(departing(2 * SECOND, DevicePhase::Departing), &mut k);
        outputs(&mut f);
        f.state.topology = unbound();
        // Gone from sysfs, but the teardown gets its moment.
        f.departures_seen(2 * SECOND + SECOND / 2, &mut k);
        assert!(outputs(&mut f).is_empty());
        assert!(k.unfenced.is_empty());
        f.departures_seen(4 * SECOND, &mut k);
        let out = outputs(&mut f);
        assert!(
            matches!(
                &out[..],
                [Line::DeviceGone { device, synthesised: true, took_ms, .. }]
                    if device == "pmem1" && *took_ms == 2000.0
            ),
            "{out:?}"
        );
        assert_eq!(k.unfenced, [DEV.to_kernel()]);
        assert!(f.state.incidents.departing.is_empty());
        // The device comes back and leaves again: that departure is not ignored.
        f.state.topology = topology();
        f.departures_seen(5 * SECOND, &mut k);
        f.handle_event(departing(6 * SECOND, DevicePhase::Departing), &mut k);
        let out = outputs(&mut f);
        assert!(
            out.iter().any(|l| matches!(
                l,
                Line::DeviceDeparting {
                    synthesised: false,
                    ..
                }
            )),
            "the second departure was ignored: {out:?}"
        );
        assert_eq!(k.fenced, [DEV.to_kernel(), DEV.to_kernel()]);
    }

    /// The rebind leak: pmem1 leaves while 150 maps it (report only), then comes back on
    /// the same range with a new block device number (the departed superblock still holds
    /// the old one). The agent says so once, naming 150 as a holder of the old binding.
    #[test]
    fn a_device_bound_again_under_old_mappings_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow(dir.path());
        f.departures_seen(SECOND, &mut k);
        f.handle_event(departing(2 * SECOND, DevicePhase::Departing), &mut k);
        f.state.topology = unbound();
        f.handle_event(departing(3 * SECOND, DevicePhase::Gone), &mut k);
        f.departures_seen(4 * SECOND, &mut k);
        let out = outputs(&mut f);
        assert!(
            !out.iter().any(|l| matches!(l, Line::DeviceRebound { .. })),
            "{out:?}"
        );
        let mut back = topology();
        let new_dev = DevId {
            major: 259,
            minor: 7,
        };
        back.namespaces[0].block = Some(("pmem1".into(), new_dev));
        f.state.topology = back;
        f.departures_seen(5 * SECOND, &mut k);
        let out = outputs(&mut f);
        assert!(
            matches!(
                &out[..],
                [Line::DeviceRebound { device, namespace, departed_ns, old_binding, old_binding_pages: 2, .. }]
                    if device == "pmem1" && namespace == "namespace1.0"
                        && *departed_ns == 3 * SECOND
                        && old_binding.len() == 1 && old_binding[0].pid == 150
            ),
            "{out:?}"
        );
        f.departures_seen(6 * SECOND, &mut k);
        let out = outputs(&mut f);
        assert!(
            !out.iter().any(|l| matches!(l, Line::DeviceRebound { .. })),
            "reported twice: {out:?}"
        );
    }

    /// A device that comes back with nobody left on its old binding is no news.
    #[test]
    fn a_rebind_without_old_mappings_is_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, recorded, mut k) = flow(dir.path());
        f.departures_seen(SECOND, &mut k);
        f.handle_event(departing(2 * SECOND, DevicePhase::Departing), &mut k);
        f.state.topology = unbound();
        f.handle_event(departing(3 * SECOND, DevicePhase::Gone), &mut k);
        recorded.borrow_mut().replace_all(&[]);
        f.state.applier.reconcile(&f.state.topology);
        let mut back = topology();
        back.namespaces[0].block = Some((
            "pmem1".into(),
            DevId {
                major: 259,
                minor: 7,
            },
        ));
        f.state.topology = back;
        f.departures_seen(5 * SECOND, &mut k);
        let out = outputs(&mut f);
        assert!(
            !out.iter().any(|l| matches!(l, Line::DeviceRebound { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn with_an_exit_probe_sysfs_ends_a_departure_only_after_the_safety_net() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow_with(dir.path(), signalling());
        f.state.incidents.end_hooked = true;
        f.departures_seen(SECOND, &mut k);
        f.handle_event(departing(2 * SECOND, DevicePhase::Departing), &mut k);
        outputs(&mut f);
        f.state.topology = unbound();
        // The teardown may wait for page references: the fence holds meanwhile.
        f.departures_seen(12 * SECOND, &mut k);
        assert!(outputs(&mut f).is_empty());
        assert!(k.unfenced.is_empty());
        f.departures_seen(33 * SECOND, &mut k);
        let out = outputs(&mut f);
        assert!(
            matches!(
                &out[..],
                [Line::DeviceGone {
                    synthesised: true,
                    ..
                }]
            ),
            "{out:?}"
        );
        assert_eq!(k.unfenced, [DEV.to_kernel()]);
    }

    /// Seen in the 5.10 tui scenario: the topology was re-read while the unbind ran (the
    /// block device already gone from sysfs) before the departure record was handled. The
    /// departure came out as `namespace1.0` with no devices (nothing to fence), and sysfs
    /// then reported pmem1's disappearance as a second, synthesised departure.
    #[test]
    fn a_departure_handled_after_a_mid_unbind_topology_keeps_its_device() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow_with(dir.path(), signalling());
        f.departures_seen(SECOND, &mut k);
        f.state.topology = unbound();
        f.handle_event(departing(2 * SECOND, DevicePhase::Departing), &mut k);
        f.handle_event(departing(2 * SECOND + 5, DevicePhase::Gone), &mut k);
        f.departures_seen(4 * SECOND, &mut k);
        let out = outputs(&mut f);
        let departures: Vec<(&str, bool)> = out
            .iter()
            .filter_map(|l| match l {
                Line::DeviceDeparting {
                    device,
                    synthesised,
                    ..
                } => Some((device.as_str(), *synthesised)),
                _ => None,
            })
            .collect();
        assert_eq!(departures, [("pmem1", false)], "{out:?}");
        assert_eq!(k.fenced, [DEV.to_kernel()], "its device was fenced");
    }

    #[test]
    fn a_device_gone_from_sysfs_without_any_event_is_reported_as_a_departure() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow_with(dir.path(), signalling());
        f.departures_seen(SECOND, &mut k);
        assert!(outputs(&mut f).is_empty(), "nothing left yet");
        f.state.topology = unbound();
        f.departures_seen(3 * SECOND, &mut k);
        let out = outputs(&mut f);
        let [
            Line::DeviceDeparting {
                device,
                holders,
                synthesised: true,
                ts_ns,
                ..
            },
            Line::DeviceGone {
                synthesised: true,
                device: gone,
                ..
            },
        ] = &out[..]
        else {
            panic!("a synthesised departure and its end: {out:?}")
        };
        assert_eq!(
            (device.as_str(), gone.as_str(), *ts_ns),
            ("pmem1", "pmem1", 3 * SECOND)
        );
        assert_eq!(holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [150]);
        // After the fact: nothing fenced, nobody signalled.
        assert!(k.fenced.is_empty());
        assert!(!out.iter().any(|l| matches!(l, Line::Enforcement(_))));
        assert_eq!(f.state.incidents.departed.len(), 1);
        // Reported once.
        f.departures_seen(4 * SECOND, &mut k);
        assert!(outputs(&mut f).is_empty());
    }

    #[test]
    fn a_departure_the_kernel_reported_is_not_reported_again_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow_with(dir.path(), signalling());
        f.departures_seen(SECOND, &mut k);
        f.handle_event(departing(2 * SECOND, DevicePhase::Departing), &mut k);
        f.state.topology = unbound();
        f.handle_event(departing(2 * SECOND + 5, DevicePhase::Gone), &mut k);
        outputs(&mut f);
        f.departures_seen(5 * SECOND, &mut k);
        assert!(outputs(&mut f).is_empty());
        assert_eq!(f.state.incidents.departed.len(), 1);
    }

    #[test]
    fn a_signal_of_the_kernels_fence_is_printed_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow_with(dir.path(), signalling());
        f.handle_event(departing(5, DevicePhase::Departing), &mut k);
        outputs(&mut f);
        f.handle_event(
            Event::FenceSignal(crate::event::FenceSignal {
                ts_ns: 7,
                pid: 150,
                tid: 151,
                comm: "db".into(),
                signal: "SIGTERM".into(),
                dev: DEV,
                ino: 12,
                error: None,
            }),
            &mut k,
        );
        let out = outputs(&mut f);
        assert!(
            matches!(
                &out[..],
                [Line::FenceSignal { sent, device: Some(d) }] if sent.pid == 150 && d == "pmem1"
            ),
            "{out:?}"
        );
        let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let recs: Vec<serde_json::Value> = audit
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let fence = recs
            .iter()
            .position(|r| r["action"] == "fence")
            .expect("the arming is audited");
        assert!(
            recs[fence]["detail"].as_str().unwrap().contains("SIGTERM"),
            "{audit}"
        );
        let sig = recs
            .iter()
            .position(|r| r["action"] == "kernel_signal")
            .expect("the kernel's signal is audited");
        assert!(fence < sig);
        assert_eq!(recs[sig]["pid"], 150);
        assert_eq!(recs[sig]["comm"], "db");
        assert_eq!(recs[sig]["signal"], "SIGTERM");
        assert_eq!(recs[sig]["device"], "pmem1");
    }

    fn guarding() -> Policy {
        crate::policy::config::parse("[default]\nguard = \"refuse-unbind\"\n", "p.toml").unwrap()
    }

    fn refused(pid: u32, written: &str) -> Event {
        Event::UnbindGuard(UnbindGuarded {
            ts_ns: 9,
            pid,
            tid: pid,
            comm: "sh".into(),
            written: written.into(),
            driver: "nd_pmem".into(),
            bus: "nd".into(),
            syscall: 1,
            verdict: GuardVerdict::Refused,
            errno: Some(16),
        })
    }

    fn audit_of(dir: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn pmem1_names() -> BTreeSet<String> {
        ["namespace1.0", "pfn1.0", "region1"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn the_guard_list_follows_the_holders_of_guarded_devices() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, recorded, mut k) = flow_with(dir.path(), guarding());
        // Not enabled (no guard program): the kernel is never told anything.
        f.handle_event(fault(150, PFN0 + 4), &mut k);
        assert!(k.guarded.is_empty());
        f.enable_guard(None, &mut k);
        assert_eq!(k.guarded, vec![pmem1_names()], "the held device is listed");
        // More faults of the same holder: the list is not rewritten.
        f.handle_event(fault(150, PFN0 + 8), &mut k);
        assert_eq!(k.guarded.len(), 1);
        // The holder is gone (procfs says so at the reconcile): nothing is refused any more.
        recorded.borrow_mut().replace_all(&[]);
        f.reconcile("test", &mut k, &mut |_| Ok(())).unwrap();
        assert_eq!(k.guarded.last(), Some(&BTreeSet::new()));
    }

    #[test]
    fn a_device_whose_guard_is_off_is_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        let off = crate::policy::config::parse(
            "[default]\nguard = \"refuse-unbind\"\n[device.pmem1]\nguard = \"off\"\n",
            "p.toml",
        )
        .unwrap();
        let (mut f, _, mut k) = flow_with(dir.path(), off);
        f.enable_guard(None, &mut k);
        f.handle_event(fault(150, PFN0 + 4), &mut k);
        assert!(k.guarded.iter().all(BTreeSet::is_empty), "{:?}", k.guarded);
    }

    #[test]
    fn a_refusal_is_reported_with_its_holders_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, mut k) = flow_with(dir.path(), guarding());
        f.enable_guard(None, &mut k);
        outputs(&mut f);
        f.handle_event(refused(300, "pfn1.0"), &mut k);
        let out = outputs(&mut f);
        match &out[..] {
            [
                Line::UnbindRefused {
                    refused,
                    device,
                    cmdline,
                    holders,
                },
            ] => {
                assert_eq!(refused.pid, 300);
                assert_eq!(device.as_deref(), Some("pmem1"));
                // No /proc below the test's root: the command line is unknown, not made up.
                assert_eq!(cmdline, &None);
                assert_eq!(holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [150]);
            }
            other => panic!("{other:?}"),
        }
        let recs = audit_of(dir.path());
        let r = recs
            .iter()
            .find(|r| r["action"] == "unbind_refused")
            .expect("audited");
        assert_eq!(r["pid"], 300);
        assert_eq!(r["comm"], "sh");
        assert_eq!(r["device"], "pmem1");
        // The agent's own write that the guard let through is audited, not reported.
        f.handle_event(
            Event::UnbindGuard(UnbindGuarded {
                verdict: GuardVerdict::AgentPassed,
                errno: None,
                ..match refused(4242, "pfn1.0") {
                    Event::UnbindGuard(g) => g,
                    _ => unreachable!(),
                }
            }),
            &mut k,
        );
        assert!(outputs(&mut f).is_empty());
        assert!(
            audit_of(dir.path())
                .iter()
                .any(|r| r["action"] == "unbind_guard_pass" && r["pid"] == 4242)
        );
    }

    #[test]
    fn the_agent_unbinds_for_drain_only_an_unbind_file_of_a_device_nobody_maps() {
        let dir = tempfile::tempdir().unwrap();
        let drv = dir.path().join("sys/bus/nd/drivers/nd_pmem");
        std::fs::create_dir_all(&drv).unwrap();
        let unbind = drv.join("unbind");
        std::fs::write(&unbind, "").unwrap();
        let other = dir.path().join("sys/bus/nd/drivers/nd_pmem/bind");
        std::fs::write(&other, "").unwrap();
        let (mut f, recorded, mut k) = flow_with(dir.path(), guarding());
        f.enable_guard(None, &mut k);
        // Still held in the agent's map: refused, nothing written.
        let e = f.unbind_for_client("pfn1.0", &unbind).unwrap_err();
        assert_eq!(e.code, crate::exit::Code::Findings, "{}", e.message);
        assert!(e.message.contains("150"), "{}", e.message);
        assert_eq!(std::fs::read_to_string(&unbind).unwrap(), "");
        recorded.borrow_mut().replace_all(&[]);
        f.reconcile("test", &mut k, &mut |_| Ok(())).unwrap();
        // Not an unbind file, not a known device: refused.
        let e = f.unbind_for_client("pfn1.0", &other).unwrap_err();
        assert_eq!(e.code, crate::exit::Code::Usage);
        let e = f.unbind_for_client("pfn9.0", &unbind).unwrap_err();
        assert_eq!(e.code, crate::exit::Code::NoInput);
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "");
        // Nobody maps it: written by the agent, audited before and after.
        f.unbind_for_client("pfn1.0", &unbind).unwrap();
        assert_eq!(std::fs::read_to_string(&unbind).unwrap(), "pfn1.0");
        let recs = audit_of(dir.path());
        let at = |a: &str| {
            recs.iter()
                .position(|r| r["action"] == a && r["device"] == "pmem1")
        };
        assert!(at("unbind").unwrap() < at("result").unwrap(), "{recs:?}");
    }
}
