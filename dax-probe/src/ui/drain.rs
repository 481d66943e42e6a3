//! `dax-probe drain DEVICE`: the controlled removal. Fence the device (no new mappings),
//! signal its holders, wait, escalate, verify that nobody maps it any more, and with
//! `--unbind` unmount its file system and unbind it, writing every step to the audit log.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{
    exit::{Code, Failure},
    holders::{
        Applier,
        query::{self, HolderRow, Target},
        scan::{Classifier, LiveProc, Paths, Procfs, runs_in},
    },
    policy::{
        Action, Policy, Rule,
        audit::{AuditLog, Record, now},
        enforce::{ActionReport, Enforcer},
        signal::Signal,
    },
    privilege,
    probe::{KernelSource, Session},
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
}

struct Out {
    json: bool,
}

impl Out {
    fn say(&self, step: &str, text: String) {
        if self.json {
            println!(
                "{}",
                json!({"type": "drain", "step": step, "message": text})
            );
        } else {
            println!("drain: {text}");
        }
    }
    fn action(&self, a: &ActionReport) {
        if self.json {
            println!("{}", json!({"type": "enforcement", "action": a}));
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

fn holders_now(app: &mut Applier, topo: &Topology, ranges: &[(u64, u64)]) -> Vec<HolderRow> {
    app.reconcile(topo);
    app.rows_in_pfn_ranges(topo, ranges)
}

/// Do any of these processes still map the device?
fn still_mapping(
    proc: &dyn Procfs,
    class: &Classifier,
    pids: &[u32],
    ranges: &[(u64, u64)],
) -> Vec<u32> {
    let mut paths = Paths::new();
    pids.iter()
        .copied()
        .filter(|&pid| {
            runs_in(proc, class, pid, 0, u64::MAX >> 12, &mut paths)
                .map(|runs| {
                    runs.iter().any(|(_, r)| {
                        ranges
                            .iter()
                            .any(|&(s, e)| r.pfn < e && r.pfn + r.npages > s)
                    })
                })
                .unwrap_or(false)
        })
        .collect()
}

pub fn run(src: &KernelSource, o: &Options) -> anyhow::Result<()> {
    let out = Out { json: o.json };
    if !privilege::can_trace() || !privilege::can_read_pagemap() {
        return Err(Failure::new(
            Code::NoPermission,
            "drain signals other processes and fences the device in the kernel: run it with sudo",
        )
        .into());
    }
    let topo = Topology::read(&src.root);
    let target = query::resolve(o.device, &topo, &src.root)
        .map_err(|e| Failure::new(Code::NoInput, e.to_string()))?;
    let Target::Device { name, .. } = &target else {
        return Err(Failure::new(
            Code::NoInput,
            format!(
                "{} is not a pmem or dax device: drain takes pmem0, /dev/dax0.0, namespace0.0, …",
                o.device
            ),
        )
        .into());
    };
    let ns = topo
        .namespaces
        .iter()
        .find(|n| n.device_name() == name)
        .ok_or_else(|| Failure::new(Code::NoInput, format!("unknown device {}", o.device)))?
        .clone();
    let mount = ns
        .block
        .as_ref()
        .and_then(|(_, dev)| topo.mount_of_dev(*dev))
        .cloned();
    if let Some(m) = &mount
        && !o.unbind
    {
        return Err(Failure::new(
            Code::Usage,
            format!(
                "{} is mounted on {} ({}): draining signals the processes mapping it but the \
                 file system would stay in use; pass --unbind to also unmount and unbind it (or \
                 unmount it yourself first). Nothing was signalled or fenced",
                name, m.mount_point, m.fstype
            ),
        )
        .into());
    }

    // The rule: command line over policy over defaults.
    let names = [name.as_str(), ns.name.as_str()];
    let mut rule: Rule = o
        .policy
        .as_ref()
        .map(|p| p.rule_for(&names).clone())
        .unwrap_or_default();
    rule.action = Action::Signal;
    if let Some(s) = o.signal {
        rule.signal = s;
    }
    if let Some(g) = o.grace {
        rule.grace = g;
    }
    if let Some(t) = o.then {
        rule.escalate = t;
    }
    if rule.grace.is_zero() && rule.escalate.is_none() {
        return Err(Failure::new(
            Code::Usage,
            "--grace 0 with no escalation (--then): holders would get one signal and no time to \
             leave, so the drain could never verify the device is free; give a grace period or \
             an escalation signal",
        )
        .into());
    }

    let audit = AuditLog::open(&o.audit_log).map_err(|e| {
        Failure::new(
            Code::Config,
            format!(
                "cannot open the audit log {}: {e}; pass --audit-log PATH",
                o.audit_log.display()
            ),
        )
    })?;
    let mut enf = Enforcer::new(audit, &src.root);
    let ranges = vec![(ns.data_range.first_pfn(), ns.data_range.end_pfn())];
    let log = |enf: &mut Enforcer, action: &str, detail: String| {
        let _ = enf.audit.write(&Record {
            time: now(),
            action,
            device: name,
            pid: None,
            start_time: None,
            comm: None,
            signal: None,
            detail,
        });
    };
    log(
        &mut enf,
        "drain",
        format!(
            "start: signal {}, grace {:?}, then {}, unbind {}",
            rule.signal,
            rule.grace,
            rule.escalate
                .map(|s| s.name())
                .unwrap_or_else(|| "nothing".into()),
            o.unbind
        ),
    );

    // Fence: the kernel refuses new mappings (BPF LSM) and signals faults on the device.
    let mut session = Session::start(src, o.ring_bytes, true)?;
    let devs: Vec<_> = ns
        .block
        .iter()
        .chain(ns.chardev.iter())
        .map(|(_, d)| *d)
        .collect();
    for d in &devs {
        session
            .fenced
            .add((d.major << 20) | d.minor, libc::SIGBUS)?;
    }
    let fenced = session.fence_attached();
    log(
        &mut enf,
        "fence",
        if fenced {
            "new mappings refused (BPF LSM mmap_file); faults on the device get SIGBUS".into()
        } else {
            "BPF LSM not active: new mappings cannot be refused; faults on the device get SIGBUS"
                .into()
        },
    );
    out.say(
        "fence",
        if fenced {
            format!("{name} fenced: new mappings are refused")
        } else {
            format!(
                "warning: cannot refuse new mappings of {name} on this kernel (BPF LSM not \
                 active; boot with lsm=...,bpf); a process may map it again while we wait"
            )
        },
    );

    let mut app = Applier::new(Box::new(LiveProc::new(&src.root)));
    let holders = holders_now(&mut app, &topo, &ranges);
    out.say(
        "holders",
        format!("{} process(es) map {name}", holders.len()),
    );
    let class = Classifier { topology: &topo };
    for a in enf.act(
        name,
        &ranges,
        &holders,
        &rule,
        0,
        app.procfs(),
        &class,
        "drain",
    ) {
        out.action(&a);
    }

    // Wait for them to leave, escalate, wait again.
    let pids: Vec<u32> = holders.iter().map(|h| h.pid).collect();
    let leave = |limit: Duration| -> Vec<u32> {
        let start = Instant::now();
        loop {
            let left = still_mapping(app.procfs(), &class, &pids, &ranges);
            if left.is_empty() || start.elapsed() >= limit {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut left = leave(rule.grace);
    if !left.is_empty() && rule.escalate.is_some() {
        out.say(
            "escalate",
            format!(
                "{} process(es) still map {name} after {:?}",
                left.len(),
                rule.grace
            ),
        );
        // Due now: the grace period is over.
        std::thread::sleep(Duration::from_millis(10));
        for a in enf.tick(app.procfs(), &class) {
            out.action(&a);
        }
        left = leave(Duration::from_secs(5));
    }

    // Verify with a full scan: nobody, not just the processes we signalled.
    let remaining = holders_now(&mut app, &topo, &ranges);
    if !remaining.is_empty() || !left.is_empty() {
        let who: Vec<String> = remaining
            .iter()
            .map(|r| format!("{} {}", r.pid, r.comm))
            .collect();
        log(
            &mut enf,
            "verify",
            format!("failed: still mapped by {}", who.join(", ")),
        );
        return Err(Failure::new(
            Code::Findings,
            format!(
                "{name} is still mapped by {}; not unbinding",
                who.join(", ")
            ),
        )
        .into());
    }
    log(&mut enf, "verify", "no process maps the device".into());
    out.say("verify", format!("no process maps {name}"));

    if o.unbind {
        if let Some(m) = &mount {
            let c = std::ffi::CString::new(m.mount_point.as_str())?;
            // SAFETY: valid path.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                let e = std::io::Error::last_os_error();
                log(&mut enf, "unmount", format!("failed: {e}"));
                return Err(Failure::new(
                    Code::Software,
                    format!(
                        "cannot unmount {} ({e}): open files or working directories keep it \
                         busy (see `fuser -vm {}`); not unbinding",
                        m.mount_point, m.mount_point
                    ),
                )
                .into());
            }
            log(&mut enf, "unmount", format!("unmounted {}", m.mount_point));
            out.say("unmount", format!("unmounted {}", m.mount_point));
        }
        let holder = ns.holder.clone().unwrap_or_else(|| ns.name.clone());
        let unbind = unbind_path(&src.root, &holder)?;
        std::fs::write(&unbind, &holder).map_err(|e| {
            Failure::new(
                Code::Software,
                format!("cannot unbind {holder} ({}): {e}", unbind.display()),
            )
        })?;
        log(&mut enf, "unbind", format!("{holder} unbound"));
        out.say("unbind", format!("{holder} unbound: {name} is gone"));
    }
    drop(session);
    log(&mut enf, "done", "fence lifted".into());
    out.say(
        "done",
        format!("{name} drained; audit log {}", enf.audit.path.display()),
    );
    Ok(())
}

/// `/sys/bus/nd/devices/<dev>/driver/unbind`.
fn unbind_path(root: &Path, dev: &str) -> anyhow::Result<PathBuf> {
    let p = root
        .join("sys/bus/nd/devices")
        .join(dev)
        .join("driver/unbind");
    if !p.exists() {
        return Err(Failure::new(
            Code::NoInput,
            format!("{dev} has no driver bound: nothing to unbind"),
        )
        .into());
    }
    Ok(p)
}
