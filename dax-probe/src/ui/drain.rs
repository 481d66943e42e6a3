//! `dax-probe drain DEVICE`: the controlled removal. Fence the device (no new mappings),
//! signal its holders, wait, escalate, verify that nobody maps it any more, and with
//! `--unbind` unmount its file system and unbind it, writing every step to the audit log.
//! The steps are `policy::pipeline`'s; this file only takes the arguments and prints.

use std::{path::PathBuf, time::Duration};

use crate::{
    exit::{Code, Failure},
    holders::{Applier, scan::LiveProc},
    os::LiveOs,
    policy::{
        Policy,
        audit::AuditLog,
        enforce::{ActionReport, Enforcer},
        pipeline::{self, DrainRequest, Progress},
        signal::Signal,
    },
    probe::{KernelSource, Session},
    schema::{DrainStep, Line},
    topology::Topology,
};

pub struct Options<'a> {
    pub device: &'a str,
    pub signal: Option<Signal>,
    pub grace: Option<Duration>,
    /// Escalation: Some(Some(sig)), explicitly none: Some(None), from policy: None.
    pub then: Option<Option<Signal>>,
    pub unbind: bool,
    pub policy: Option<Policy>,
    pub audit_log: PathBuf,
    pub json: bool,
    pub ring_bytes: u32,
    /// A running monitor's control socket (its unbind guard).
    pub socket: PathBuf,
}

struct Out {
    json: bool,
}

impl Out {
    fn say(&self, step: &str, text: String) {
        if self.json {
            let line = Line::Drain(DrainStep {
                step: step.into(),
                message: text,
            });
            println!("{}", line.to_json());
        } else {
            println!("drain: {text}");
        }
    }
    /// As the monitor prints it (`fence_signal`).
    fn fence_signal(&self, sent: crate::event::FenceSignal, device: String) {
        if self.json {
            let line = Line::FenceSignal {
                sent,
                device: Some(device),
            };
            println!("{}", line.to_json());
        } else {
            println!(
                "drain: the kernel's fence sent {} to {} ({}) faulting on {device}{}",
                sent.signal,
                sent.pid,
                sent.comm,
                match sent.error {
                    Some(e) => format!(": failed, {}", std::io::Error::from_raw_os_error(e)),
                    None => String::new(),
                }
            );
        }
    }
    fn action(&self, a: &ActionReport) {
        if self.json {
            // Flat, as the monitor prints it (one shape of `enforcement`).
            println!("{}", Line::Enforcement(a.clone()).to_json());
        } else {
            println!(
                "drain: {} {} {} ({}): {}",
                a.action,
                a.signal.as_deref().unwrap_or("-"),
                a.pid,
                a.comm,
                a.reason
            );
        }
    }
}

pub fn run(src: &KernelSource, o: &Options) -> anyhow::Result<()> {
    let out = Out { json: o.json };
    // A running monitor's unbind guard lets only its own writes through: the unbind is
    // asked of it (written here when no monitor answers).
    let os = LiveOs::new(&src.root).unbind_via(o.socket.clone());
    let topo = Topology::read(&src.root);
    let plan = pipeline::plan_drain(
        &DrainRequest {
            device: o.device,
            signal: o.signal,
            grace: o.grace,
            then: o.then,
            unbind: o.unbind,
            policy: o.policy.as_ref(),
        },
        &os,
        &topo,
        &src.root,
    )?;
    let audit = AuditLog::open(&o.audit_log).map_err(|e| {
        Failure::new(
            Code::Config,
            format!(
                "cannot open the audit log {}: {e}; pass --audit-log PATH",
                o.audit_log.display()
            ),
        )
    })?;
    let mut enf = Enforcer::new(audit);
    // The fence lives in the kernel programs of this session.
    let mut session = Session::start(
        src,
        crate::probe::Ring {
            bytes: o.ring_bytes,
            per_fault: false,
        },
        true,
    )?;
    let mut app = Applier::new(Box::new(LiveProc::new(&src.root)));
    pipeline::run_drain(
        &plan,
        &os,
        &mut session,
        &mut enf,
        &mut app,
        &topo,
        &mut |p| match p {
            Progress::Say { step, text } => out.say(step, text),
            Progress::Action(a) => out.action(&a),
            Progress::FenceSignal { sent, device } => out.fence_signal(sent, device),
        },
    )?;
    Ok(())
}
