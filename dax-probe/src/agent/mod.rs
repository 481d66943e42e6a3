//! The running agent: kernel events in, the live holder map kept exact, answers out.
//!
//! One flow, one direction: kernel hook → ring buffer (`probe`) → decoder → state
//! ([`state`]: topology, holder map, incidents) → policy (enforcement) → outputs. The
//! modules follow it and none reaches back up:
//!
//! - [`state`]: what the agent knows and the lines that describe it;
//! - [`event_loop`]: records in, state updated, policy applied, outputs out, in order
//!   ([`event_loop::Flow`], which runs without the kernel), and the async loop that feeds it
//!   from the reader thread, timers and signals;
//! - [`control`]: the control socket, answered from the state after a reader sync, so an
//!   answer includes every event the kernel emitted before the question; subscribers (an
//!   attached dashboard) get a snapshot and then every line the agent outputs.
//!
//! A reconcile against procfs runs periodically and right after the kernel reported lost
//! events.

pub mod control;
pub mod event_loop;
pub mod state;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Duration,
};

use dax_probe_common::Counter;
use tokio::{net::UnixListener, sync::mpsc};

use self::{event_loop::Flow, state::State};
use crate::{
    control::AgentStats,
    exit::{Code, Failure},
    holders::{Applier, scan::LiveProc},
    incident::Incidents,
    policy::{Policy, audit::AuditLog, enforce::Enforcer},
    privilege,
    probe::{KernelSource, Session},
    schema::{Attached, Hook, Line, Summary},
    topology::Topology,
};

pub struct Options {
    pub ring: crate::probe::Ring,
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
    /// Where incidents are recorded (None: nowhere).
    pub history: Option<crate::history::Settings>,
    /// Serve Prometheus metrics here (`--metrics`; None: no metrics server).
    pub metrics: Option<std::net::SocketAddr>,
}

pub struct Agent {
    pub session: Session,
    /// State, policy and the outputs they produce.
    pub flow: Flow,
    /// How the kernel is probed (kept to re-plan when modules load).
    src: KernelSource,
    last_dropped: u64,
    last_watched_full: u64,
    listener: Option<(UnixListener, PathBuf)>,
    /// Questions from the connection tasks, answered by the loop.
    questions: (
        mpsc::Sender<control::Question>,
        mpsc::Receiver<control::Question>,
    ),
    reconcile_every: Duration,
    /// Set by a consumer that lost lines (a lagging TUI): the next tick emits the whole
    /// topology and holder map.
    pub snapshot_request: Arc<AtomicBool>,
    /// Ends `run` like SIGINT does (for a caller that runs the agent on a thread).
    pub stop: Arc<tokio::sync::Notify>,
    /// Clients subscribed to the lines `run` outputs (shared by `run`'s output and the
    /// question that adds one).
    subscribers: Arc<Mutex<control::Subscribers>>,
    /// A metrics server runs (`Options::metrics`): keep its per-device totals fresh.
    serving_metrics: bool,
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
            Some(p) => Some((control::bind(p)?, p.clone())),
            None => None,
        };
        // Bound before anything is loaded, so the warning comes first; an address in use or
        // not this machine's leaves the agent watching and enforcing, without metrics.
        let metrics_listener = opts.metrics.and_then(|a| {
            crate::metrics::bind(a)
                .map_err(|e| crate::metrics::warn_unserved(&e))
                .ok()
        });
        // Holders are pinned as they appear (two descriptors each, three when enforcing).
        crate::policy::pins::raise_open_file_limit();
        let mut enforcer = if opts.enforce {
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
            Some(Enforcer::new(log))
        } else {
            None
        };
        let wants_guard = opts.policy.wants_guard();
        for name in opts.policy.unknown_devices(&topology) {
            eprintln!(
                "dax-probe: warning: the policy has a [device.{name}] section but this machine \
                 has no device of that name (a namespace, pmem/dax device, pfn/dax device or \
                 region): its rule applies to nothing until one appears"
            );
        }
        // The guard's records go to the audit log even without --enforce.
        let guard_audit = if wants_guard && !opts.enforce {
            Some(AuditLog::open(&opts.audit_log).map_err(|e| {
                Failure::new(
                    Code::Config,
                    format!(
                        "cannot open the audit log {}: {e}; the unbind guard needs it (pass \
                         --audit-log PATH)",
                        opts.audit_log.display()
                    ),
                )
            })?)
        } else {
            None
        };
        let mut session = Session::start(src, opts.ring, opts.enforce || wants_guard)?;
        let guard_on = wants_guard && session.guard_attached();
        if wants_guard && !guard_on {
            eprintln!(
                "dax-probe: warning: {}",
                crate::policy::unbind_guard::unavailable_warning(&session.guard_unavailable())
            );
        }
        if guard_on && let Err(e) = session.guarded.set_agent(std::process::id()) {
            return Err(Failure::new(
                Code::Software,
                format!("cannot tell the unbind guard the agent's pid: {e}"),
            )
            .into());
        }
        if opts.enforce && !session.fence_attached() {
            eprintln!(
                "dax-probe: warning: new mappings of a departing device cannot be refused on \
                 this kernel (the BPF LSM is not active; boot with lsm=...,bpf): holders are \
                 still signalled, and faults on it are signalled by the fault program"
            );
        }
        // How a departing device's holders are proven: never by their page tables where
        // reading those can oops.
        enforcer = enforcer.map(|e| e.with_devmap(session.facts.dax_devmap()));
        let mut incidents = Incidents::new(opts.departed.clone());
        incidents.end_hooked = departure_end_hooked(&session);
        let mut state = State::new(
            topology,
            Applier::new(Box::new(LiveProc::new(&src.root))),
            incidents,
            src.root.clone(),
        );
        state.devmap = session.facts.dax_devmap();
        let mut agent = Self {
            session,
            flow: Flow::new(
                state,
                Box::new(crate::os::LiveOs::new(&src.root)),
                enforcer,
                opts.policy.clone(),
            ),
            src: src.clone(),
            last_dropped: 0,
            last_watched_full: 0,
            listener,
            questions: mpsc::channel(control::QUESTIONS),
            reconcile_every: opts.reconcile,
            snapshot_request: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(tokio::sync::Notify::new()),
            subscribers: Default::default(),
            serving_metrics: metrics_listener.is_some(),
        };
        // Mappings made before we attached: programs are live first, so nothing that
        // happens during the scan is lost (its events are applied on top).
        agent.flow.start_scan(&mut agent.session);
        if guard_on {
            let audit = guard_audit.map(|a| Box::new(a) as Box<dyn crate::os::AuditSink>);
            agent.flow.enable_guard(audit, &mut agent.session);
        }
        if let Some(h) = &opts.history {
            agent
                .flow
                .record_history(crate::history::recorder::Recorder::start(h.clone()));
        }
        if let Some(l) = metrics_listener {
            let hooks: Vec<crate::schema::Hook> = agent
                .session
                .probe
                .choices
                .iter()
                .map(|c| crate::schema::Hook {
                    concern: c.concern,
                    chosen: c.chosen.map(Into::into),
                    userspace: c.userspace,
                })
                .collect();
            agent.flow.metrics.hooks(&hooks);
            agent.flow.refresh_metrics();
            crate::metrics::serve(l, agent.flow.metrics.clone(), Default::default())?;
        }
        Ok(agent)
    }

    /// What the agent knows.
    pub fn state(&self) -> &State {
        &self.flow.state
    }

    pub fn stats(&self) -> AgentStats {
        self.flow
            .state
            .stats(self.session.counters.get(Counter::RingFull))
    }

    /// What is attached: the first line of `monitor --json` and of a subscription.
    pub fn attached_line(&self) -> Line {
        let session = &self.session;
        Line::Attached(Attached {
            kernel: session.facts.release.clone(),
            holders: self.state().applier.map.holder_count(),
            holder_pages: self.state().summary().holder_pages,
            hooks: session
                .probe
                .choices
                .iter()
                .map(|c| Hook {
                    concern: c.concern,
                    chosen: c.chosen.map(Into::into),
                    userspace: c.userspace,
                })
                .collect(),
        })
    }

    pub fn summary(&self) -> Summary {
        let c = &self.session.counters;
        Summary {
            dropped: self.session.lost_events(),
            kernel_read_errors: c.get(Counter::ReadFailed),
            faults_seen_by_kernel: c.get(Counter::FaultsSeen),
            events_attempted_by_kernel: c.get(Counter::Attempted),
            programs: self.session.probe.program_stats(),
            ..self.flow.state.summary()
        }
    }
}

/// Does the chosen departure hook report the end of a teardown? Its fexit or kretprobe
/// does; the plain kprobe and the userspace fallback do not (the end is then read from
/// sysfs, see `Incidents::topology_seen`).
fn departure_end_hooked(session: &Session) -> bool {
    session
        .probe
        .choice(crate::probe::plan::Concern::Departure)
        .and_then(|c| c.chosen)
        .is_some_and(|label| label.contains("fexit") || label.contains("kretprobe"))
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some((_, p)) = &self.listener {
            let _ = std::fs::remove_file(p);
        }
    }
}
