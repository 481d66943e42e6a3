//! The one departure pipeline: fence → decide → signal → escalate → verify → unmount →
//! unbind. `monitor --enforce` runs its first steps when the kernel reports a device leaving
//! ([`depart`], then [`escalate`] from the event loop); `drain` (and the dashboard's `d`,
//! which runs `drain --json`) runs all of them ([`plan_drain`], then [`run_drain`]).
//!
//! Every step is written to the audit log, durably, before it runs, and a step whose record
//! could not be written does not run. Everything the pipeline does to the machine goes
//! through [`Os`] and [`Fence`], so its order is unit-tested against the fake.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    Action, Policy, Rule,
    audit::{Record, now},
    config::Exclusion,
    enforce::{ActionReport, Enforcer},
    guard::{Proof, Scope},
    signal::Signal,
};
use crate::{
    event::FenceSignal,
    exit::{Code, Failure},
    holders::{
        Applier,
        query::{self, HolderRow, Target},
        scan::{Classifier, Procfs, maps_any_pfn},
    },
    incident::Departure,
    os::{Fence, FenceArm, Os},
    topology::{DevId, Mode, Mount, Namespace, Topology},
};

/// How long holders get to leave after the escalation signal.
const AFTER_ESCALATION: Duration = Duration::from_secs(5);

/// How often drain looks whether holders left.
const POLL: Duration = Duration::from_millis(100);

/// Records a signal the kernel's fence sent (`kernel_signal`), after the fact: the fault
/// program cannot wait for the log; its arming was recorded before (`fence`). One record
/// for the monitor and drain alike. `device`: its name, when known.
pub fn audit_kernel_signal(enf: &mut Enforcer, sent: &FenceSignal, device: Option<&str>) -> bool {
    let dev = sent.dev.to_string();
    enf.log(Record {
        time: now(),
        action: "kernel_signal",
        device: device.unwrap_or(&dev),
        pid: Some(sent.pid),
        start_time: None,
        comm: Some(&sent.comm),
        signal: Some(sent.signal.clone()),
        detail: match sent.error {
            None => format!(
                "sent by the kernel's fence to a task faulting on {dev} (recorded after it was \
                 sent)"
            ),
            Some(e) => format!(
                "the kernel's fence could not signal a task faulting on {dev}: {}",
                std::io::Error::from_raw_os_error(e)
            ),
        },
        // The faulting task's cgroup is not read here: it is the kernel's act, recorded as
        // the kernel reported it.
        cgroup: None,
        container: None,
        pod_uid: None,
    })
}

/// Writes the record of a step about to run; the step must not run when this fails.
fn step(enf: &mut Enforcer, action: &str, device: &str, detail: String) -> Result<(), Failure> {
    if enf.log(Record::device(action, device, detail)) {
        Ok(())
    } else {
        Err(Failure::new(
            Code::Software,
            format!(
                "cannot write the audit log {}: the {action} step of {device} was not run \
                 (every step is recorded before it runs)",
                enf.audit.path().display()
            ),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// monitor --enforce

/// A device is leaving (the kernel is unbinding it): fence it when the rule signals (after
/// its record), and apply the rule to its holders. Escalations come later from
/// [`escalate`]. The `device_departing` line goes out before these actions' lines (the
/// agent's output order).
///
/// The fence signals with the rule's own signal and spares the rule's exclusions (see
/// [`fence_arm`]). A rule that only reports arms no fence at all: refusing mappings and
/// signalling faults are actions, and such a rule allows none.
pub fn depart(
    dep: &Departure,
    rule: &Rule,
    os: &dyn Os,
    fence: &mut dyn Fence,
    enf: &mut Enforcer,
    class: &Classifier,
) -> Vec<ActionReport> {
    // One record before the fence, written into the log but not waited for on disk: the
    // fence is kernel state that dies with the machine, as the unflushed record would, and
    // the decision's flush (before the first signal of ours) makes both durable. Every
    // fdatasync here delays the fence and the first signal of a departure the kernel is
    // already carrying out.
    let mut stamps = dep.stamps;
    let mut armed = None;
    if rule.action == Action::Signal {
        let arm = fence_arm(rule, os);
        let record = Record::device(
            "fence",
            &dep.device,
            format!(
                "departing ({}; {} holder(s)): {}; {}",
                dep.namespaces.join(", "),
                dep.holders.len(),
                fence_detail(fence.refuses_mappings()),
                arm_detail(&arm, &dep.devs)
            ),
        );
        if enf.log_ahead(record.clone()) {
            fence_all(fence, &dep.devs, &arm);
            armed = Some(record);
            if stamps.received_ns != 0 {
                stamps.fenced_ns = crate::policy::enforce::boottime_ns();
            }
        } else {
            log::error!(
                "the fence of {} was not raised: its record could not be written (every step \
                 is recorded before it runs)",
                dep.device
            );
        }
    }
    let scope = Scope {
        device: &dep.device,
        pfn_ranges: &dep.pfn_ranges,
        proof: enf.departure_proof,
        stamps,
    };
    let acts = enf.act(
        scope,
        &dep.holders,
        rule,
        dep.started_ns,
        os,
        class,
        "device departing",
    );
    // Flushed by the decision already, unless no holder was left to decide about. When a
    // flush failed after it (then nothing of ours was signalled), the record is written
    // again, durably: a fence stays up only on a record known to be on disk, else it is
    // lifted.
    if let Some(record) = armed
        && !enf.settle()
    {
        let again = Record {
            detail: format!(
                "{} (written again: a flush failed after the first copy)",
                record.detail
            ),
            ..record
        };
        if !enf.log(again) {
            log::error!(
                "the fence of {} is lifted: its record cannot be made durable",
                dep.device
            );
            lift(fence, &dep.devs);
        }
    }
    acts
}

/// A bad media range became known (`media_error`): apply the rule's `on_media_error` to
/// the processes that map it, with the rule's signal, grace and escalation. The same
/// decide → re-verify → signal → escalate steps as a departure (no fence: the device stays
/// in use; the kernel itself refuses new faults on the bad sectors). The `media_error`
/// line goes out before these actions' lines.
pub fn media_error(
    m: &crate::badblocks::MediaError,
    rule: &Rule,
    os: &dyn Os,
    enf: &mut Enforcer,
    class: &Classifier,
) -> Vec<ActionReport> {
    let Some(range) = m.pfns else {
        return Vec::new();
    };
    let rule = Rule {
        action: rule.on_media_error,
        ..rule.clone()
    };
    // The device stays: its page tables are safe to read.
    let scope = Scope {
        device: &m.device,
        pfn_ranges: &[range],
        proof: Proof::PageTables,
        stamps: Default::default(),
    };
    enf.act(
        scope,
        &m.holders,
        &rule,
        m.ts_ns,
        os,
        class,
        &format!("media error {}", m.name()),
    )
}

/// What the kernel's fence does for `rule`: the rule's first signal (a holder promised TERM
/// and a grace gets TERM again if it faults, never a harsher signal than the policy's), to
/// every task but the rule's exclusions, PID 1 and the agent itself (never signalled, as
/// in the guard).
pub fn fence_arm(rule: &Rule, os: &dyn Os) -> FenceArm {
    let mut exclude = rule.exclude.clone();
    for pid in [1, os.self_pid()] {
        if !exclude.contains(&Exclusion::Pid(pid)) {
            exclude.push(Exclusion::Pid(pid));
        }
    }
    FenceArm {
        signal: rule.signal,
        exclude,
    }
}

/// The arming as the audit log records it: devices, signal, exclusions. In-kernel signals
/// cannot be audited before they happen; this record precedes the arming, and each signal
/// the kernel reports is recorded after it (`kernel_signal`).
fn arm_detail(arm: &FenceArm, devs: &[DevId]) -> String {
    let (comms, pids) = arm.split();
    format!(
        "faults on {} get {} from the kernel, except comm [{}] and pid [{}]",
        devs.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        arm.signal,
        comms.join(", "),
        pids.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Runs the escalations that are due: the escalation signal, only to those still mapping.
pub fn escalate(os: &dyn Os, enf: &mut Enforcer, class: &Classifier) -> Vec<ActionReport> {
    enf.tick(os, class)
}

/// Lifts the fence of a departure's devices.
pub fn lift(fence: &mut dyn Fence, devs: &[DevId]) {
    for d in devs {
        fence.unfence(*d);
    }
}

fn fence_all(fence: &mut dyn Fence, devs: &[DevId], arm: &FenceArm) {
    for d in devs {
        if let Err(e) = fence.fence(*d, arm) {
            log::warn!("cannot fence {d}: {e}");
        }
    }
}

fn fence_detail(refuses: bool) -> &'static str {
    if refuses {
        "new mappings refused (BPF LSM mmap_file)"
    } else {
        "BPF LSM not active: new mappings cannot be refused"
    }
}

// ---------------------------------------------------------------------------------------
// drain

/// What the operator asked for.
pub struct DrainRequest<'a> {
    pub device: &'a str,
    pub signal: Option<Signal>,
    pub grace: Option<Duration>,
    /// Escalation: Some(Some(sig)), explicitly none: Some(None), from policy: None.
    pub then: Option<Option<Signal>>,
    pub unbind: bool,
    pub policy: Option<&'a Policy>,
}

/// A drain checked against the machine, before anything was fenced or signalled.
#[derive(Debug)]
pub struct DrainPlan {
    /// `pmem0`, `dax0.0`.
    pub name: String,
    pub namespace: Namespace,
    pub rule: Rule,
    pub ranges: Vec<(u64, u64)>,
    pub devs: Vec<DevId>,
    /// The devices whose mounts `--unbind` unmounts (the device's own, its dm devices', a
    /// file system's that uses it as realtime device).
    pub mount_devs: Vec<DevId>,
    /// dm devices `--unbind` removes after the unmounts, top-most first.
    pub dm_remove: Vec<String>,
    /// The nd device to unbind and its `driver/unbind` file, with `--unbind`.
    pub unbind: Option<(String, PathBuf)>,
}

/// What drain tells the operator as it goes.
#[derive(Debug)]
pub enum Progress {
    Say {
        step: &'static str,
        text: String,
    },
    Action(ActionReport),
    /// A signal the kernel's fence sent to a task faulting on the device (`device`).
    FenceSignal {
        sent: FenceSignal,
        device: String,
    },
}

/// Checks everything that can be checked before acting: privileges, the device, its
/// range, its mounts, the rule. An error here means nothing was fenced or signalled.
pub fn plan_drain(
    req: &DrainRequest,
    os: &dyn Os,
    topo: &Topology,
    root: &Path,
) -> Result<DrainPlan, Failure> {
    if !os.may_enforce() {
        return Err(Failure::new(
            Code::NoPermission,
            "drain signals other processes and fences the device in the kernel: run it with sudo",
        ));
    }
    let target = query::resolve(req.device, topo, root)
        .map_err(|e| Failure::new(Code::NoInput, e.to_string()))?;
    let Target::Device { name, .. } = &target else {
        return Err(Failure::new(
            Code::NoInput,
            format!(
                "{} is not a pmem or dax device: drain takes pmem0, /dev/dax0.0, namespace0.0, …",
                req.device
            ),
        ));
    };
    let ns = topo
        .namespaces
        .iter()
        .find(|n| n.device_name() == name)
        .ok_or_else(|| Failure::new(Code::NoInput, format!("unknown device {}", req.device)))?
        .clone();
    // Without the range, "nobody maps it" would be checked against no pages at all and
    // always hold: refuse rather than unbind a device we cannot verify is free.
    if !ns.range_known || ns.data_range.is_empty() {
        return Err(Failure::new(
            Code::Unavailable,
            format!(
                "the physical range of {name} is unknown (its sysfs `resource` could not be \
                 read): drain could not verify that nobody maps it. Nothing was signalled or \
                 fenced"
            ),
        ));
    }
    let stack = Stack::of(&ns, topo)?;
    if !stack.is_empty() && !req.unbind {
        return Err(Failure::new(
            Code::Stacked,
            format!(
                "{name} is a member of {}: draining one member would leave the stack above \
                it in use over a fenced device; pass --unbind to drain every member's \
                holders, unmount, remove the dm table and unbind {name} (top-down). Nothing \
                was signalled or fenced",
                stack.describe(topo)
            ),
        ));
    }
    let mounts = mounts_of(&stack.mount_devs, &topo.mounts);
    if !mounts.is_empty() && !req.unbind {
        return Err(Failure::new(
            Code::Usage,
            format!(
                "{} is mounted on {}: draining signals the processes mapping it but the \
                 file system would stay in use; pass --unbind to also unmount and unbind it (or \
                 unmount it yourself first). Nothing was signalled or fenced",
                name,
                describe(&mounts)
            ),
        ));
    }

    // The rule: command line over policy over defaults.
    let names = [name.as_str(), ns.name.as_str()];
    let mut rule: Rule = req
        .policy
        .map(|p| p.rule_for(&names).clone())
        .unwrap_or_default();
    rule.action = Action::Signal;
    if let Some(s) = req.signal {
        rule.signal = s;
    }
    if let Some(g) = req.grace {
        rule.grace = g;
    }
    if let Some(t) = req.then {
        rule.escalate = t;
    }
    if rule.grace.is_zero() && rule.escalate.is_none() {
        return Err(Failure::new(
            Code::Usage,
            "--grace 0 with no escalation (--then): holders would get one signal and no time to \
             leave, so the drain could never verify the device is free; give a grace period or \
             an escalation signal",
        ));
    }
    let unbind = if req.unbind {
        let holder = ns.holder.clone().unwrap_or_else(|| ns.name.clone());
        let path = unbind_path(root, &holder)?;
        Some((holder, path))
    } else {
        None
    };
    // Nobody may map any member of the stack before it is torn down: every member's
    // range is watched, and the fence covers the devices files above are opened through.
    let mut ranges = vec![(ns.data_range.first_pfn(), ns.data_range.end_pfn())];
    let mut devs = ns.devices();
    devs.extend(topo.devices_above(&ns));
    for m in &stack.members {
        if m.name != ns.name {
            ranges.push((m.data_range.first_pfn(), m.data_range.end_pfn()));
        }
    }
    Ok(DrainPlan {
        name: name.clone(),
        ranges,
        devs,
        mount_devs: stack.mount_devs,
        dm_remove: stack.dm_remove,
        namespace: ns,
        rule,
        unbind,
    })
}

/// What sits above a device that drain must tear down first: dm devices (removed top
/// first), file systems on the device, on the dm devices or using it as XFS realtime
/// device, and the other pmem members the stack spans.
struct Stack {
    /// Devices whose mounts are unmounted: the member's own block device, its dm devices,
    /// the data devices of file systems using it.
    mount_devs: Vec<DevId>,
    /// dm names, the one nearest the file system first.
    dm_remove: Vec<String>,
    /// Every pmem namespace of the stack, the drained one included.
    members: Vec<Namespace>,
    /// Lines naming the dm devices and mounts, for the refusal.
    parts: Vec<String>,
}

impl Stack {
    fn of(ns: &Namespace, topo: &Topology) -> Result<Self, Failure> {
        let name = ns.device_name();
        let mut s = Stack {
            mount_devs: ns.devices(),
            dm_remove: Vec::new(),
            members: vec![ns.clone()],
            parts: Vec::new(),
        };
        let add = |s: &mut Stack, n: &Namespace| {
            if !s.members.iter().any(|m| m.name == n.name) {
                s.members.push(n.clone());
            }
        };
        let above = topo.dm_above(ns);
        for d in &above {
            let non_dax = topo.non_dax_members(d);
            if !non_dax.is_empty() {
                return Err(Failure::new(
                    Code::Unavailable,
                    format!(
                        "{name} is a member of {} ({}), whose member {} is not fsdax pmem: \
                        nothing above it can map persistent memory directly, and drain \
                        cannot verify the stack is free. Take the stack down with dmsetup \
                        yourself. Nothing was signalled or fenced",
                        d.node,
                        d.name,
                        non_dax.join(", ")
                    ),
                ));
            }
            for n in topo.pmem_members(d) {
                add(&mut s, n);
            }
            s.mount_devs.push(d.dev);
        }
        // Top-most first: a dm device is removed before the dm devices it is built on.
        s.dm_remove = above.iter().rev().map(|d| d.name.clone()).collect();
        for u in topo.fs_users(ns) {
            let m = u.mount;
            if u.role == crate::topology::Role::Realtime || u.via.is_some() || m.rtdev.is_some() {
                // An XFS with a realtime device spans two devices: both must be DAX pmem
                // for drain to verify that nobody maps the file system's memory.
                if let Some(rt) = &m.rtdev {
                    let rts = topo.realtime_namespaces(m);
                    let data_dax = topo.live_dax_block(m.dev);
                    if rts.is_empty() || rts.iter().any(|n| n.mode != Mode::Fsdax) || !data_dax {
                        return Err(Failure::new(
                            Code::Unavailable,
                            format!(
                                "{name} is used by the xfs on {}, whose {} is not fsdax                                  pmem: its files there cannot be mapped directly and drain                                  cannot verify the file system is free. Unmount it                                  yourself. Nothing was signalled or fenced",
                                m.mount_point,
                                if data_dax {
                                    format!("realtime device {rt}")
                                } else {
                                    format!("data device {}", m.source)
                                }
                            ),
                        ));
                    }
                    s.parts.push(format!(
                        "the xfs on {} (realtime device {rt})",
                        m.mount_point
                    ));
                }
                s.mount_devs.push(m.dev);
                // An XFS realtime device's file system also spans its data device.
                if let Some(data) = topo.namespace_of_block(m.dev) {
                    add(&mut s, data);
                }
                if let Some(d) = topo.dm.iter().find(|d| d.dev == m.dev) {
                    for n in topo.pmem_members(d) {
                        add(&mut s, n);
                    }
                }
                for n in topo.realtime_namespaces(m) {
                    add(&mut s, n);
                }
            }
        }
        for n in &s.members {
            if !n.range_known || n.data_range.is_empty() {
                return Err(Failure::new(
                    Code::Unavailable,
                    format!(
                        "the physical range of {}, a member of the stack above {name}, is \
                        unknown: drain could not verify that nobody maps it. Nothing was \
                        signalled or fenced",
                        n.device_name()
                    ),
                ));
            }
        }
        s.mount_devs.sort();
        s.mount_devs.dedup();
        let dms: Vec<String> = above
            .iter()
            .map(|d| {
                let members: Vec<&str> = d.members.iter().map(String::as_str).collect();
                format!("{} ({}, members {})", d.node, d.name, members.join(" "))
            })
            .collect();
        s.parts.splice(0..0, dms);
        Ok(s)
    }

    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// `dm-0 (lin, members pmem0 pmem1), mounted on /mnt/lin (ext4)`.
    fn describe(&self, topo: &Topology) -> String {
        let mounts = mounts_of(&self.mount_devs, &topo.mounts);
        let mut s = self.parts.join(", ");
        if !mounts.is_empty() {
            s.push_str(&format!(", mounted on {}", describe(&mounts)));
        }
        s
    }
}

/// Every mount of these devices (bind mounts included), in mount order.
fn mounts_of(devs: &[DevId], mounts: &[Mount]) -> Vec<Mount> {
    mounts
        .iter()
        .filter(|m| devs.contains(&m.dev))
        .cloned()
        .collect()
}

fn describe(mounts: &[Mount]) -> String {
    mounts
        .iter()
        .map(|m| format!("{} ({})", m.mount_point, m.fstype))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `/sys/bus/nd/devices/<dev>/driver/unbind`.
fn unbind_path(root: &Path, dev: &str) -> Result<PathBuf, Failure> {
    let p = root
        .join("sys/bus/nd/devices")
        .join(dev)
        .join("driver/unbind");
    if !p.exists() {
        return Err(Failure::new(
            Code::NoInput,
            format!(
                "{dev} has no driver bound: nothing to unbind. Nothing was signalled or fenced"
            ),
        ));
    }
    Ok(p)
}

fn holders_now(app: &mut Applier, topo: &Topology, ranges: &[(u64, u64)]) -> Vec<HolderRow> {
    app.reconcile(topo);
    app.rows_in_pfn_ranges(topo, ranges)
}

/// Those of `pids` that still map the device.
fn still_mapping(
    proc: &dyn Procfs,
    class: &Classifier,
    pids: &[u32],
    ranges: &[(u64, u64)],
) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|&pid| maps_any_pfn(proc, class, pid, ranges).unwrap_or(false))
        .collect()
}

/// Runs a planned drain. The fence is lifted on every way out (as the old drain did by
/// ending its session), after a `done` record.
pub fn run_drain(
    plan: &DrainPlan,
    os: &dyn Os,
    fence: &mut dyn Fence,
    enf: &mut Enforcer,
    app: &mut Applier,
    topo: &Topology,
    out: &mut dyn FnMut(Progress),
) -> Result<(), Failure> {
    let name = plan.name.as_str();
    let rule = &plan.rule;
    step(
        enf,
        "drain",
        name,
        format!(
            "start: signal {}, grace {:?}, then {}, unbind {}",
            rule.signal,
            rule.grace,
            rule.escalate
                .map(|s| s.name())
                .unwrap_or_else(|| "nothing".into()),
            plan.unbind.is_some()
        ),
    )?;
    let refuses = fence.refuses_mappings();
    let arm = fence_arm(rule, os);
    step(
        enf,
        "fence",
        name,
        format!(
            "{}; {}",
            fence_detail(refuses),
            arm_detail(&arm, &plan.devs)
        ),
    )?;
    let mut fenced = Vec::new();
    let mut result = Ok(());
    for d in &plan.devs {
        if let Err(e) = fence.fence(*d, &arm) {
            result = Err(Failure::new(
                Code::Software,
                format!("cannot fence {name} ({d}): {e}"),
            ));
            break;
        }
        fenced.push(*d);
    }
    if result.is_ok() {
        out(Progress::Say {
            step: "fence",
            text: if refuses {
                format!("{name} fenced: new mappings are refused")
            } else {
                format!(
                    "warning: cannot refuse new mappings of {name} on this kernel (BPF LSM not \
                     active; boot with lsm=...,bpf); a process may map it again while we wait"
                )
            },
        });
        result = drain_fenced(plan, os, enf, app, topo, out);
    }
    // The fence's own signals, recorded after the fact (the arming was recorded before).
    // Read once the holders are gone: the fence signals only while they fault.
    report_fence_signals(fence, enf, name, out);
    let done = match &result {
        Ok(()) => "fence lifted".to_string(),
        Err(e) => format!("stopped: {e}; fence lifted"),
    };
    // The fence goes either way: a drain that stopped must not leave the device refusing
    // mappings and signalling faults with nobody left to lift it.
    let recorded = enf.log(Record::device("done", name, done));
    lift(fence, &fenced);
    // A fault between the reading above and the lifting.
    report_fence_signals(fence, enf, name, out);
    result?;
    if !recorded {
        return Err(Failure::new(
            Code::Software,
            format!(
                "cannot write the audit log {}: the drain of {name} is complete but its last \
                 record is missing",
                enf.audit.path().display()
            ),
        ));
    }
    out(Progress::Say {
        step: "done",
        text: format!("{name} drained; audit log {}", enf.audit.path().display()),
    });
    Ok(())
}

/// Audits (`kernel_signal`) and reports each signal the fence sent since the last call.
fn report_fence_signals(
    fence: &mut dyn Fence,
    enf: &mut Enforcer,
    name: &str,
    out: &mut dyn FnMut(Progress),
) {
    for sent in fence.signals_sent() {
        if !audit_kernel_signal(enf, &sent, Some(name)) {
            log::error!(
                "cannot write the audit log: the fence's {} to {} is not recorded",
                sent.signal,
                sent.pid
            );
        }
        out(Progress::FenceSignal {
            sent,
            device: name.to_string(),
        });
    }
}

/// The steps between the fence and its lifting: decide, signal, escalate, verify,
/// unmount, unbind.
fn drain_fenced(
    plan: &DrainPlan,
    os: &dyn Os,
    enf: &mut Enforcer,
    app: &mut Applier,
    topo: &Topology,
    out: &mut dyn FnMut(Progress),
) -> Result<(), Failure> {
    let name = plan.name.as_str();
    let rule = &plan.rule;
    let ranges = &plan.ranges;
    let holders = holders_now(app, topo, ranges);
    out(Progress::Say {
        step: "holders",
        text: format!("{} process(es) map {name}", holders.len()),
    });
    let class = Classifier { topology: topo };
    // A drain signals before it unbinds: the device is live, its page tables safe to read.
    let scope = Scope {
        device: name,
        pfn_ranges: ranges,
        proof: Proof::PageTables,
        stamps: Default::default(),
    };
    for a in enf.act(scope, &holders, rule, 0, os, &class, "drain") {
        out(Progress::Action(a));
    }

    // Wait for them to leave, escalate, wait again.
    let pids: Vec<u32> = holders.iter().map(|h| h.pid).collect();
    let leave = |limit: Duration| -> Vec<u32> {
        let start = os.now();
        loop {
            let left = still_mapping(os.procfs(), &class, &pids, ranges);
            if left.is_empty() || os.now().duration_since(start) >= limit {
                return left;
            }
            os.sleep(POLL);
        }
    };
    let mut left = leave(rule.grace);
    if !left.is_empty() && rule.escalate.is_some() {
        out(Progress::Say {
            step: "escalate",
            text: format!(
                "{} process(es) still map {name} after {:?}",
                left.len(),
                rule.grace
            ),
        });
        // Due now: the grace period is over.
        os.sleep(Duration::from_millis(10));
        for a in escalate(os, enf, &class) {
            out(Progress::Action(a));
        }
        left = leave(AFTER_ESCALATION);
    }

    // Verify with a full scan: nobody, not just the processes we signalled.
    let remaining = holders_now(app, topo, ranges);
    if !remaining.is_empty() || !left.is_empty() {
        let who: Vec<String> = remaining
            .iter()
            .map(|r| format!("{} {}", r.pid, r.comm))
            .chain(
                left.iter()
                    .filter(|p| !remaining.iter().any(|r| r.pid == **p))
                    .map(|p| p.to_string()),
            )
            .collect();
        enf.log(Record::device(
            "verify",
            name,
            format!("failed: still mapped by {}", who.join(", ")),
        ));
        return Err(Failure::new(
            Code::Findings,
            format!(
                "{name} is still mapped by {}; not unbinding",
                who.join(", ")
            ),
        ));
    }
    step(enf, "verify", name, "no process maps the device".into())?;
    out(Progress::Say {
        step: "verify",
        text: format!("no process maps {name}"),
    });

    let Some((holder, unbind)) = &plan.unbind else {
        return Ok(());
    };
    unmount_all(plan, os, enf, out)?;
    remove_dm(plan, os, enf, out)?;
    step(enf, "unbind", name, format!("unbinding {holder}"))?;
    let r = os.write_sysfs(unbind, holder);
    enf.log(Record::device(
        "result",
        name,
        match &r {
            Ok(()) => format!("{holder} unbound"),
            Err(e) => format!("unbind of {holder} failed: {e}"),
        },
    ));
    r.map_err(|e| {
        Failure::new(
            Code::Software,
            format!("cannot unbind {holder} ({}): {e}", unbind.display()),
        )
    })?;
    out(Progress::Say {
        step: "unbind",
        text: format!("{holder} unbound: {name} is gone"),
    });
    Ok(())
}

/// Removes the dm devices above the device (`DM_DEV_REMOVE`), top-most first, each after
/// its record; the first that fails (still open: EBUSY) stops the drain before the unbind.
fn remove_dm(
    plan: &DrainPlan,
    os: &dyn Os,
    enf: &mut Enforcer,
    out: &mut dyn FnMut(Progress),
) -> Result<(), Failure> {
    let name = plan.name.as_str();
    for dm in &plan.dm_remove {
        step(enf, "dm_remove", name, format!("removing dm device {dm}"))?;
        let r = os.remove_dm(dm);
        enf.log(Record::device(
            "result",
            name,
            match &r {
                Ok(()) => format!("dm device {dm} removed"),
                Err(e) => format!("removal of dm device {dm} failed: {e}"),
            },
        ));
        if let Err(e) = r {
            return Err(Failure::new(
                Code::Software,
                format!(
                    "cannot remove the dm device {dm} ({e}): something still opens it (see                      `ls /sys/block/*/holders`); not unbinding"
                ),
            ));
        }
        out(Progress::Say {
            step: "dm_remove",
            text: format!("dm device {dm} removed"),
        });
    }
    Ok(())
}

/// Unmounts every mount of the device in our mount namespace (bind mounts too: any one
/// left keeps the file system alive under the unbind), most recent first so mounts on top
/// go before the ones below. Refuses to go on, naming them, while any is left.
fn unmount_all(
    plan: &DrainPlan,
    os: &dyn Os,
    enf: &mut Enforcer,
    out: &mut dyn FnMut(Progress),
) -> Result<(), Failure> {
    let name = plan.name.as_str();
    let mounts = mounts_of(&plan.mount_devs, &os.mounts());
    for m in mounts.iter().rev() {
        step(
            enf,
            "unmount",
            name,
            format!("unmounting {}", m.mount_point),
        )?;
        let r = os.unmount(&m.mount_point);
        enf.log(Record::device(
            "result",
            name,
            match &r {
                Ok(()) => format!("unmounted {}", m.mount_point),
                Err(e) => format!("unmount of {} failed: {e}", m.mount_point),
            },
        ));
        if let Err(e) = r {
            return Err(Failure::new(
                Code::Software,
                format!(
                    "cannot unmount {} ({e}): open files or working directories keep it \
                     busy (see `fuser -vm {}`); not unbinding",
                    m.mount_point, m.mount_point
                ),
            ));
        }
        out(Progress::Say {
            step: "unmount",
            text: format!("unmounted {}", m.mount_point),
        });
    }
    let left = mounts_of(&plan.mount_devs, &os.mounts());
    if !left.is_empty() {
        enf.log(Record::device(
            "unmount",
            name,
            format!("failed: still mounted on {}", describe(&left)),
        ));
        return Err(Failure::new(
            Code::Software,
            format!(
                "{name} is still mounted on {}; not unbinding",
                describe(&left)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::fake::{Call, DEV, END_PFN, FIRST_PFN, FakeOs, FakeProc, topology};

    const TERM: i32 = libc::SIGTERM;
    const KILL: i32 = libc::SIGKILL;
    const RANGES: &[(u64, u64)] = &[(FIRST_PFN, END_PFN)];

    fn rule(grace: u64) -> Rule {
        Rule {
            action: Action::Signal,
            signal: Signal(TERM),
            grace: Duration::from_secs(grace),
            escalate: Some(Signal(KILL)),
            exclude: Vec::new(),
            on_media_error: Action::Report,
            ..Rule::default()
        }
    }

    fn holders(os: &FakeOs, topo: &Topology) -> Vec<HolderRow> {
        let mut app = Applier::new(os.procfs_box());
        holders_now(&mut app, topo, RANGES)
    }

    /// The actions of the log, as short words: `audit:signal`, `signal:100:15`, `fence`, …
    fn words(os: &FakeOs) -> Vec<String> {
        os.actions()
            .iter()
            .map(|c| match c {
                Call::Audit { action, pid, .. } => match pid {
                    Some(p) => format!("audit:{action}:{p}"),
                    None => format!("audit:{action}"),
                },
                Call::AuditFailed { action } => format!("audit-failed:{action}"),
                Call::Fence(..) => "fence".into(),
                Call::Unfence(_) => "unfence".into(),
                Call::Signal { pid, sig, .. } => format!("signal:{pid}:{sig}"),
                Call::Unmount(m) => format!("unmount:{m}"),
                Call::Sysfs(_, v) => format!("unbind:{v}"),
                Call::DmRemove(d) => format!("dm_remove:{d}"),
                Call::PidfdOpen(_) | Call::Pin(_) => unreachable!(),
            })
            .collect()
    }

    fn departure(os: &FakeOs, topo: &Topology) -> Departure {
        Departure {
            device: "pmem0".into(),
            namespaces: vec!["namespace0.0".into()],
            pfn_ranges: RANGES.to_vec(),
            devs: vec![DEV],
            names: vec!["pmem0".into()],
            started_ns: 1,
            stamps: Default::default(),
            tid: 77,
            pre_remove: false,
            holders: holders(os, topo),
        }
    }

    #[test]
    fn enforcement_lines_and_audit_records_name_the_pod() {
        let pod = FakeProc {
            cgroup: Some(
                "0::/kubepods.slice/kubepods-pod1b2c3d4e_5f60_4a7b_8c9d_0e1f2a3b4c5d.slice/\
                 crio-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n"
                    .into(),
            ),
            ..FakeProc::holder("db", 7)
        };
        let os = FakeOs::new(&[(100, pod)], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        assert_eq!(
            dep.holders[0].pod_uid.as_deref(),
            Some("1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d")
        );
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        let signal = acts.iter().find(|a| a.action == "signal").unwrap();
        assert_eq!(signal.pod_uid, dep.holders[0].pod_uid);
        assert_eq!(signal.container, dep.holders[0].container);
        assert!(signal.cgroup.as_deref().unwrap().ends_with(".scope"));
        // The record written before the signal names the pod too.
        let audit = os.state.borrow().audit_json.clone();
        let rec: serde_json::Value = audit
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["action"] == "signal")
            .unwrap();
        assert_eq!(rec["pod_uid"], "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d");
        assert_eq!(rec["container"]["runtime"], "crio");
        assert_eq!(rec["pid"], 100);
    }

    /// `n` holders of pmem0, pids 1000 up: more than one batch of signals.
    fn many_holders(n: u32) -> FakeOs {
        let procs: Vec<(u32, FakeProc)> = (0..n)
            .map(|i| (1000 + i, FakeProc::holder("app", 7 + i as u64)))
            .collect();
        FakeOs::new(&procs, &["/mnt/pmem0"])
    }

    #[test]
    fn many_holders_cost_two_flushes_per_batch_and_each_signal_follows_its_record() {
        // 300 holders: two batches (256 + 44). Before: two flushes per holder (600).
        let os = many_holders(300);
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let before = os.state.borrow().audit_flushes;
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        assert_eq!(acts.iter().filter(|a| a.action == "signal").count(), 300);
        assert_eq!(os.state.borrow().audit_flushes - before, 4);
        // Never a signal before its own record is written.
        let w = words(&os);
        for pid in 1000..1300u32 {
            let rec = w.iter().position(|x| *x == format!("audit:signal:{pid}"));
            let sig = w.iter().position(|x| *x == format!("signal:{pid}:15"));
            assert!(
                matches!((rec, sig), (Some(r), Some(s)) if r < s),
                "{pid}: {rec:?} {sig:?}"
            );
        }
    }

    /// A departure with no holder left has no decision to flush the fence record with: it
    /// is flushed on its own before the departure is done.
    #[test]
    fn a_fence_record_written_ahead_is_flushed_even_with_no_holder() {
        let os = FakeOs::new(&[], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let mut dep = departure(&os, &topo);
        dep.holders.clear();
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        assert!(acts.is_empty(), "{acts:?}");
        assert_eq!(words(&os), ["audit:fence", "fence"]);
        let s = os.state.borrow();
        assert_eq!((s.durable_writes, s.ahead), (1, None));
    }

    /// The decision's write fails after the fence record was written ahead: no signal of
    /// ours goes out, in no batch (300 holders: the second batch's verdicts could be
    /// written, but the decision never was), and the fence record, not known to be on disk
    /// now, is written again durably; the fence stays up on it.
    #[test]
    fn a_failed_decision_after_the_fence_record_signals_no_one_and_rewrites_the_fence() {
        let os = many_holders(300);
        os.state.borrow_mut().failing_audit.push("decide".into());
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        assert_eq!(acts.len(), 300);
        assert!(acts.iter().all(|a| a.action == "skip"), "{acts:?}");
        let w = words(&os);
        assert!(
            !w.iter().any(|x| x.starts_with("signal:") || x == "unfence"),
            "{w:?}"
        );
        assert_eq!(
            w,
            ["audit:fence", "fence", "audit-failed:decide", "audit:fence"]
        );
        let s = os.state.borrow();
        assert!(
            s.audit_json[1].contains("written again"),
            "{:?}",
            s.audit_json
        );
        assert_eq!(
            (s.durable_writes, s.ahead),
            (1, None),
            "only the rewrite is durable"
        );
    }

    /// The disk under the log fails every flush: the fence record went into the file ahead
    /// of its flush and the fence up, but the decision cannot be made durable, nor the
    /// record written again: no signal of ours, and the fence is lifted (no fence on a
    /// record not known to be on disk).
    #[test]
    fn a_log_that_cannot_flush_signals_no_one_and_lifts_the_fence() {
        let os = FakeOs::new(&[(100, FakeProc::holder("a", 7))], &["/mnt/pmem0"]);
        os.state.borrow_mut().failing_flush = true;
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        assert!(acts.iter().all(|a| a.action == "skip"), "{acts:?}");
        assert_eq!(
            words(&os),
            [
                "audit:fence",
                "fence",
                "audit-failed:decide",
                "audit-failed:fence",
                "unfence"
            ]
        );
        assert_eq!(os.state.borrow().durable_writes, 0);
    }

    #[test]
    fn a_batch_whose_records_cannot_be_written_signals_no_one() {
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("a", 7)),
                (200, FakeProc::holder("b", 8)),
            ],
            &["/mnt/pmem0"],
        );
        os.state.borrow_mut().failing_audit.push("signal".into());
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        assert!(acts.iter().all(|a| a.action == "skip"), "{acts:?}");
        assert!(!words(&os).iter().any(|x| x.starts_with("signal:")));
    }

    /// A departure of [`leaves_and_stays`]' holders under `rule(2)`, and its escalation
    /// two seconds later: both signalled, then the one that stayed killed.
    fn signal_then_escalate_the_stubborn(
        os: &FakeOs,
        enf: &mut Enforcer,
        class: &Classifier,
        dep: &Departure,
        devmap: bool,
    ) {
        let acts = depart(dep, &rule(2), os, &mut os.fence(), enf, class);
        os.sleep(Duration::from_secs(2));
        let esc = escalate(os, enf, class);
        let did: Vec<_> = acts
            .iter()
            .chain(&esc)
            .map(|a| (a.pid, a.action.as_ref()))
            .collect();
        assert_eq!(
            did,
            vec![(100, "signal"), (200, "signal"), (200, "escalate")],
            "devmap {devmap}"
        );
    }

    /// Two holders of pmem0: 100 leaves on SIGTERM, 200 only on SIGKILL.
    fn leaves_and_stays() -> FakeOs {
        FakeOs::new(
            &[
                (100, FakeProc::holder("leaves", 7)),
                (200, FakeProc::stubborn("stays", 8)),
            ],
            &["/mnt/pmem0"],
        )
    }

    #[test]
    fn escalation_kills_only_those_still_mapping_after_the_grace() {
        let os = leaves_and_stays();
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        assert_eq!(
            acts.iter()
                .map(|a| (a.pid, a.action.as_ref()))
                .collect::<Vec<_>>(),
            vec![(100, "signal"), (200, "signal")]
        );
        assert_eq!(enf.next_due(), Some(os.now() + Duration::from_secs(2)));
        os.sleep(Duration::from_millis(1999));
        assert!(escalate(&os, &mut enf, &class).is_empty(), "not due yet");
        os.sleep(Duration::from_millis(1));
        let acts = escalate(&os, &mut enf, &class);
        assert_eq!(
            acts.iter()
                .map(|a| (a.pid, a.action.as_ref()))
                .collect::<Vec<_>>(),
            vec![(200, "escalate")]
        );
        assert!(!enf.has_pending());
        let sigs: Vec<_> = os
            .log()
            .into_iter()
            .filter_map(|c| match c {
                Call::Signal { pid, sig, at } => Some((pid, sig, at)),
                _ => None,
            })
            .collect();
        assert_eq!(
            sigs,
            vec![
                (100, TERM, Duration::ZERO),
                (200, TERM, Duration::ZERO),
                (200, KILL, Duration::from_secs(2)),
            ]
        );
    }

    /// Before the first signal of a departure: the fence record written ahead (in the log
    /// before the fence, not waited for on disk: it was an fdatasync of its own, the
    /// longest step under TCG), then the decision with the first batch's verdicts in one
    /// durable write, which flushes the fence record too. Then the results.
    #[test]
    fn a_departure_makes_one_durable_write_before_its_first_signal() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let once = Rule {
            escalate: None,
            ..rule(2)
        };
        depart(&dep, &once, &os, &mut os.fence(), &mut enf, &class);
        assert_eq!(
            os.state.borrow().durable_writes,
            2,
            "fence+decide+verdicts, results"
        );
        assert_eq!(
            os.state.borrow().ahead,
            None,
            "the fence record was flushed"
        );
        let w = words(&os);
        let pos = |x: &str| w.iter().position(|y| y == x).unwrap();
        assert!(pos("audit:fence") < pos("fence"), "{w:?}");
        assert!(pos("fence") < pos("audit:decide"), "{w:?}");
        assert!(pos("audit:decide") < pos("audit:signal:100"), "{w:?}");
        assert!(pos("audit:signal:100") < pos("signal:100:15"), "{w:?}");
    }

    /// Each signal's line times the steps after the kernel's report: the agent reading it,
    /// listing the holders, the fence, this holder's verdict, its signal, in that order.
    #[test]
    fn enforcement_lines_time_read_verdict_and_signal() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let mut dep = departure(&os, &topo);
        dep.started_ns = crate::policy::enforce::boottime_ns() - 5_000_000;
        dep.stamps.received_ns = dep.started_ns + 2_000_000;
        dep.stamps.listed_ns = dep.started_ns + 3_000_000;
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        let a = acts.iter().find(|a| a.action == "signal").unwrap();
        assert_eq!((a.received_us, a.listed_us), (Some(2000), Some(3000)));
        let (f, v, s) = (
            a.fenced_us.unwrap(),
            a.verdict_us.unwrap(),
            a.since_departure_us.unwrap(),
        );
        assert!(5000 <= f && f <= v && v <= s, "{a:?}");
        // Without the kernel's time (a drain) there is nothing to time against.
        dep.started_ns = 0;
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        assert!(acts.iter().all(|a| a.received_us.is_none()
            && a.listed_us.is_none()
            && a.fenced_us.is_none()
            && a.verdict_us.is_none()));
    }

    /// A kernel without devmap DAX entries (7.x) oopses whoever walks page tables into a
    /// device whose memmap the unbind freed: the agent read such a holder's pagemap during
    /// a dm member's unbind and died in the kernel. There a departure, and its escalation,
    /// prove every holder by its maps alone and signal exactly as before.
    #[test]
    fn without_devmap_a_departure_signals_and_escalates_reading_no_page_table() {
        for devmap in [true, false] {
            let os = leaves_and_stays();
            let topo = topology(&["/mnt/pmem0"]);
            let class = Classifier { topology: &topo };
            let mut enf = Enforcer::new(os.audit()).with_devmap(devmap);
            let dep = departure(&os, &topo);
            let before = os.state.borrow().pagemap_opens.len();
            let (maps_before, vmas_before) = {
                let s = os.state.borrow();
                (s.maps_reads.len(), s.vma_queries.len())
            };
            signal_then_escalate_the_stubborn(&os, &mut enf, &class, &dep, devmap);
            let read = os.state.borrow().pagemap_opens.len() - before;
            let s = os.state.borrow();
            // Every proof looks where the holder map says the pages are: no whole maps.
            assert_eq!(s.maps_reads.len() - maps_before, 0, "devmap {devmap}");
            let vmas = s.vma_queries.len() - vmas_before;
            if devmap {
                assert_eq!(read, 3, "two verdicts and one escalation from page tables");
                assert_eq!(vmas, 0);
            } else {
                assert_eq!(read, 0, "no page table read without devmap");
                assert_eq!(vmas, 3, "one vma query per proof");
            }
        }
    }

    /// Holders pinned when they became holders are proven and signalled through their pins:
    /// the departure and its escalation open no pidfd, no stat, no pagemap and no maps,
    /// and do exactly what they do unpinned.
    #[test]
    fn pinned_holders_are_proven_and_signalled_opening_nothing() {
        for devmap in [true, false] {
            let os = leaves_and_stays();
            let topo = topology(&["/mnt/pmem0"]);
            let class = Classifier { topology: &topo };
            let mut enf = Enforcer::new(os.audit()).with_devmap(devmap);
            let dep = departure(&os, &topo);
            for h in &dep.holders {
                assert!(enf.pins.pin(&os, h.pid, h.start_time), "pin {}", h.pid);
            }
            let log_before = os.log().len();
            let counts = |os: &FakeOs| {
                let s = os.state.borrow();
                [
                    s.pagemap_opens.len(),
                    s.maps_reads.len(),
                    s.vma_queries.len(),
                    s.stat_opens.len(),
                ]
            };
            let before = counts(&os);
            let reads_before = os.state.borrow().pin_reads.len();
            signal_then_escalate_the_stubborn(&os, &mut enf, &class, &dep, devmap);
            assert_eq!(counts(&os), before, "opened afresh (devmap {devmap})");
            let log = os.log();
            assert!(
                !log[log_before..]
                    .iter()
                    .any(|c| matches!(c, Call::PidfdOpen(_) | Call::Pin(_))),
                "{:?}",
                &log[log_before..]
            );
            // Three verdicts, each an identity and a proof through the pin, and the
            // escalation's identity read of 100, which left on the first signal.
            assert_eq!(os.state.borrow().pin_reads.len() - reads_before, 7);
        }
    }

    /// A pinned holder that exited and whose pid another process took is not signalled, and
    /// neither is that process; a pinned holder whose pin cannot prove it where the map
    /// says (it moved its mapping) is proven by its maps read afresh.
    #[test]
    fn a_pin_signals_its_own_process_or_no_one() {
        let os = leaves_and_stays();
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let mut dep = departure(&os, &topo);
        for h in &dep.holders {
            assert!(enf.pins.pin(&os, h.pid, h.start_time));
        }
        os.state
            .borrow_mut()
            .procs
            .insert(100, FakeProc::holder("newcomer", 99));
        for h in dep.holders.iter_mut().filter(|h| h.pid == 200) {
            h.probe_at = vec![0x1000];
        }
        let once = Rule {
            escalate: None,
            ..rule(2)
        };
        let opened = os.state.borrow().pagemap_opens.len();
        let acts = depart(&dep, &once, &os, &mut os.fence(), &mut enf, &class);
        let did: Vec<_> = acts.iter().map(|a| (a.pid, a.action.as_ref())).collect();
        assert_eq!(did, vec![(100, "skip"), (200, "signal")], "{acts:?}");
        assert!(
            !words(&os).contains(&"signal:100:15".to_string()),
            "{:?}",
            words(&os)
        );
        assert_eq!(
            os.state.borrow().pagemap_opens[opened..],
            [200],
            "a fresh walk of 200 only"
        );
    }

    /// The fence's arming in the log.
    fn armed(os: &FakeOs) -> Vec<FenceArm> {
        os.log()
            .into_iter()
            .filter_map(|c| match c {
                Call::Fence(_, arm) => Some(arm),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_fence_signals_as_the_policy_says_and_spares_its_exclusions() {
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("app", 7)),
                (200, FakeProc::holder("backup", 8)),
            ],
            &["/mnt/pmem0"],
        );
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let mut r = rule(2);
        r.exclude = vec![Exclusion::Comm("backup".into()), Exclusion::Pid(300)];
        depart(&dep, &r, &os, &mut os.fence(), &mut enf, &class);
        // The policy's TERM, not a hard-coded SIGBUS: a holder promised TERM and a grace
        // gets nothing harsher for touching the device during it.
        let arms = armed(&os);
        assert_eq!(arms.len(), 1, "{arms:?}");
        assert_eq!(arms[0].signal, Signal(TERM));
        for e in [
            Exclusion::Comm("backup".into()),
            Exclusion::Pid(300),
            Exclusion::Pid(1),
            Exclusion::Pid(os.self_pid()),
        ] {
            assert!(arms[0].exclude.contains(&e), "{e:?} in {arms:?}");
        }
        // What the kernel then does on a fault.
        assert_eq!(os.fault(DEV, 100, "app"), Some(TERM));
        assert_eq!(os.fault(DEV, 200, "backup"), None, "excluded by comm");
        assert_eq!(os.fault(DEV, 300, "other"), None, "excluded by pid");
        assert_eq!(os.fault(DEV, 1, "init"), None, "never PID 1");
        assert_eq!(os.fault(DEV, os.self_pid(), "dax-probe"), None);
        // The arming is audited before it: devices, signal, exclusions.
        let log = os.log();
        let rec = log
            .iter()
            .position(|c| matches!(c, Call::Audit { action, .. } if action == "fence"))
            .expect("a fence record");
        let fence = log
            .iter()
            .position(|c| matches!(c, Call::Fence(..)))
            .unwrap();
        assert!(rec < fence);
        let Call::Audit { detail, .. } = &log[rec] else {
            unreachable!()
        };
        for want in ["SIGTERM", "backup", "300", &DEV.to_string()] {
            assert!(detail.contains(want), "{want:?} in {detail:?}");
        }
        // Lifted: nobody is signalled any more.
        lift(&mut os.fence(), &[DEV]);
        assert_eq!(os.fault(DEV, 100, "app"), None);
    }

    #[test]
    fn a_report_only_rule_arms_no_fence() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let mut r = rule(2);
        r.action = Action::Report;
        depart(&dep, &r, &os, &mut os.fence(), &mut enf, &class);
        assert!(armed(&os).is_empty(), "{:?}", os.log());
        assert_eq!(os.fault(DEV, 100, "app"), None);
        assert!(
            !os.log().iter().any(|c| matches!(c, Call::Signal { .. })),
            "{:?}",
            os.log()
        );
    }

    #[test]
    fn the_fence_is_recorded_before_it_is_set_and_every_signal_has_a_result() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        assert_eq!(
            words(&os),
            vec![
                "audit:fence",
                "fence",
                "audit:decide",
                "audit:signal:100",
                "signal:100:15",
                "audit:result:100",
            ]
        );
    }

    #[test]
    fn report_only_fences_and_signals_nothing() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let acts = depart(
            &dep,
            &Rule::default(),
            &os,
            &mut os.fence(),
            &mut enf,
            &class,
        );
        assert_eq!(acts[0].action, "report-only");
        assert_eq!(words(&os), vec!["audit:decide"]);
    }

    #[test]
    fn no_signal_leaves_without_a_durable_record() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        os.state.borrow_mut().failing_audit = vec!["signal".into()];
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let mut enf = Enforcer::new(os.audit());
        let dep = departure(&os, &topo);
        let acts = depart(&dep, &rule(2), &os, &mut os.fence(), &mut enf, &class);
        assert_eq!(acts[0].action, "skip");
        assert!(!words(&os).iter().any(|w| w.starts_with("signal:")));
    }

    // ---- drain ------------------------------------------------------------------------

    /// A root with pfn0.0's `driver/unbind`, as sysfs has it while a driver is bound.
    fn sysfs_root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sys/bus/nd/devices/pfn0.0/driver");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("unbind"), "").unwrap();
        d
    }

    fn request(unbind: bool) -> DrainRequest<'static> {
        DrainRequest {
            device: "pmem0",
            signal: Some(Signal(TERM)),
            grace: Some(Duration::from_secs(2)),
            then: Some(Some(Signal(KILL))),
            unbind,
            policy: None,
        }
    }

    fn drain(os: &FakeOs, topo: &Topology, req: &DrainRequest) -> Result<(), Failure> {
        let root = sysfs_root();
        let plan = plan_drain(req, os, topo, root.path())?;
        let mut enf = Enforcer::new(os.audit());
        let mut app = Applier::new(os.procfs_box());
        run_drain(
            &plan,
            os,
            &mut os.fence(),
            &mut enf,
            &mut app,
            topo,
            &mut |_| {},
        )
    }

    fn code(r: Result<impl std::fmt::Debug, Failure>) -> Code {
        r.expect_err("refused").code
    }

    #[test]
    fn drain_refuses_before_anything_is_fenced() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let root = sysfs_root();
        let plan = |r: &DrainRequest| plan_drain(r, &os, &topo, root.path());
        // Unknown device, not a device, mounted without --unbind, no time to leave.
        let unknown = DrainRequest {
            device: "pmem9",
            ..request(true)
        };
        assert_eq!(code(plan(&unknown)), Code::NoInput);
        let not_a_device = DrainRequest {
            device: "0x100000",
            ..request(true)
        };
        assert_eq!(code(plan(&not_a_device)), Code::NoInput);
        let e = plan(&request(false)).unwrap_err();
        assert_eq!(e.code, Code::Usage);
        assert!(e.message.contains("/mnt/pmem0"), "{}", e.message);
        let no_time = DrainRequest {
            grace: Some(Duration::ZERO),
            then: Some(None),
            ..request(true)
        };
        assert_eq!(code(plan(&no_time)), Code::Usage);
        // --unbind of a device without a driver: refused now, not after signalling.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            code(plan_drain(&request(true), &os, &topo, empty.path())),
            Code::NoInput
        );
        os.state.borrow_mut().unprivileged = true;
        assert_eq!(code(plan(&request(true))), Code::NoPermission);
        assert_eq!(
            os.log(),
            vec![],
            "nothing was recorded, fenced or signalled"
        );
    }

    #[test]
    fn drain_refuses_a_device_whose_range_is_unknown() {
        // sysfs `resource` unreadable: the range reads 0..0, and "nobody maps 0..0" would
        // always verify (the old drain then unbound the device under its holders).
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let mut topo = topology(&["/mnt/pmem0"]);
        let ns = &mut topo.namespaces[0];
        ns.range_known = false;
        ns.data_range = crate::topology::PhysRange { start: 0, end: 0 };
        let e = drain(&os, &topo, &request(true)).unwrap_err();
        assert_eq!(e.code, Code::Unavailable);
        assert!(
            e.message.contains("range of pmem0 is unknown"),
            "{}",
            e.message
        );
        assert_eq!(os.log(), vec![]);
    }

    #[test]
    fn drain_fences_with_its_own_signal_and_the_policys_exclusions() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let policy = Policy {
            default: Rule {
                exclude: vec![Exclusion::Comm("backup".into())],
                ..Rule::default()
            },
            ..Policy::default()
        };
        let req = DrainRequest {
            signal: Some(Signal(libc::SIGUSR1)),
            policy: Some(&policy),
            ..request(true)
        };
        drain(&os, &topo, &req).unwrap();
        let arms = armed(&os);
        assert_eq!(arms.len(), 1, "{arms:?}");
        assert_eq!(arms[0].signal, Signal(libc::SIGUSR1));
        assert!(arms[0].exclude.contains(&Exclusion::Comm("backup".into())));
    }

    #[test]
    fn drain_reports_and_audits_the_fences_signals_after_the_arming() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        // What the kernel reports of a fault of pid 100 while fenced.
        os.state
            .borrow_mut()
            .kernel_sent
            .push(crate::event::FenceSignal {
                ts_ns: 1,
                pid: 100,
                tid: 100,
                comm: "app".into(),
                signal: "SIGTERM".into(),
                dev: DEV,
                ino: 12,
                error: None,
            });
        let root = sysfs_root();
        let plan = plan_drain(&request(true), &os, &topo, root.path()).unwrap();
        let mut enf = Enforcer::new(os.audit());
        let mut app = Applier::new(os.procfs_box());
        let mut seen = Vec::new();
        run_drain(
            &plan,
            &os,
            &mut os.fence(),
            &mut enf,
            &mut app,
            &topo,
            &mut |p| {
                if let Progress::FenceSignal { sent, device } = p {
                    seen.push((sent.pid, sent.signal, device));
                }
            },
        )
        .unwrap();
        assert_eq!(seen, vec![(100, "SIGTERM".into(), "pmem0".into())]);
        let w = words(&os);
        let at = |a: &str| w.iter().position(|x| x.starts_with(a));
        let (fence, kernel, done) = (
            at("audit:fence"),
            at("audit:kernel_signal:100"),
            at("audit:done"),
        );
        assert!(
            matches!((fence, kernel, done), (Some(f), Some(k), Some(d)) if f < k && k < d),
            "{w:?}"
        );
    }

    #[test]
    fn drain_steps_run_in_order_each_after_its_record() {
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("leaves", 7)),
                (200, FakeProc::stubborn("stays", 8)),
            ],
            &["/mnt/pmem0", "/srv/bind"],
        );
        let topo = topology(&["/mnt/pmem0", "/srv/bind"]);
        drain(&os, &topo, &request(true)).unwrap();
        assert_eq!(
            words(&os),
            vec![
                "audit:drain",
                "audit:fence",
                "fence",
                "audit:decide",
                // Both verdicts on disk (one flush), then both signals, then both results.
                "audit:signal:100",
                "audit:signal:200",
                "signal:100:15",
                "signal:200:15",
                "audit:result:100",
                "audit:result:200",
                // The one that left is not signalled again (its refusal is recorded).
                "audit:skip:100",
                "audit:escalate:200",
                "signal:200:9",
                "audit:result:200",
                "audit:verify",
                // Every mount of the device, the bind mount too, most recent first.
                "audit:unmount",
                "unmount:/srv/bind",
                "audit:result",
                "audit:unmount",
                "unmount:/mnt/pmem0",
                "audit:result",
                "audit:unbind",
                "unbind:pfn0.0",
                "audit:result",
                "audit:done",
                "unfence",
            ]
        );
        // The escalation came after the grace period, not before.
        let kill_at = os.log().into_iter().find_map(|c| match c {
            Call::Signal { sig: KILL, at, .. } => Some(at),
            _ => None,
        });
        assert!(
            kill_at.is_some_and(|t| t >= Duration::from_secs(2)),
            "{kill_at:?}"
        );
    }

    #[test]
    fn a_mount_that_stays_busy_stops_the_unbind_and_is_named() {
        let os = FakeOs::new(&[], &["/mnt/pmem0", "/srv/bind"]);
        os.state.borrow_mut().busy_mounts = vec!["/srv/bind".into()];
        let topo = topology(&["/mnt/pmem0", "/srv/bind"]);
        let e = drain(&os, &topo, &request(true)).unwrap_err();
        assert!(e.message.contains("/srv/bind"), "{}", e.message);
        let w = words(&os);
        assert!(!w.iter().any(|x| x.starts_with("unbind:")), "{w:?}");
        assert_eq!(w.last().map(String::as_str), Some("unfence"), "{w:?}");
    }

    #[test]
    fn a_step_whose_record_fails_does_not_run() {
        for (failing, forbidden) in [
            ("drain", "fence"),
            ("fence", "fence"),
            ("unmount", "unmount:"),
            ("unbind", "unbind:"),
        ] {
            let os = FakeOs::new(&[], &["/mnt/pmem0"]);
            os.state.borrow_mut().failing_audit = vec![failing.into()];
            let topo = topology(&["/mnt/pmem0"]);
            let e = drain(&os, &topo, &request(true)).unwrap_err();
            assert!(e.message.contains("audit log"), "{}", e.message);
            let w = words(&os);
            assert!(
                !w.iter().any(|x| x.starts_with(forbidden)),
                "{failing}: {w:?}"
            );
            assert!(
                !w.iter().any(|x| x.starts_with("unbind:")),
                "{failing}: {w:?}"
            );
        }
    }

    #[test]
    fn drain_stops_when_someone_still_maps_it() {
        let mut p = FakeProc::stubborn("immortal", 7);
        p.leaves_on.clear();
        let os = FakeOs::new(&[(100, p)], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let e = drain(&os, &topo, &request(true)).unwrap_err();
        assert_eq!(e.code, Code::Findings);
        assert!(e.message.contains("100 immortal"), "{}", e.message);
        let w = words(&os);
        assert!(!w.iter().any(|x| x.starts_with("unmount:")), "{w:?}");
        assert_eq!(w.last().map(String::as_str), Some("unfence"));
    }

    // ---- drain of a member of a stack -------------------------------------------------

    const DM: DevId = DevId {
        major: 253,
        minor: 0,
    };

    /// pmem0 and pmem1 (the next 0x40000 pfns) under dm-0 `lin`, mounted on /mnt/lin;
    /// `extra` is a third member (a loop device: not DAX).
    fn stack(extra: Option<&str>) -> Topology {
        let mut t = topology(&[]);
        let mut second = t.namespaces[0].clone();
        second.name = "namespace1.0".into();
        second.holder = Some("pfn1.0".into());
        second.block = Some((
            "pmem1".into(),
            DevId {
                major: 259,
                minor: 1,
            },
        ));
        for r in [&mut second.namespace_range, &mut second.data_range] {
            r.start += (END_PFN - FIRST_PFN) << 12;
            r.end += (END_PFN - FIRST_PFN) << 12;
        }
        t.namespaces.push(second);
        let mut members = vec!["pmem0".to_string(), "pmem1".to_string()];
        members.extend(extra.map(String::from));
        t.dm.push(crate::topology::DmDevice {
            node: "dm-0".into(),
            name: "lin".into(),
            dev: DM,
            members,
            table: None,
            table_error: None,
        });
        t.mounts.push(Mount {
            dev: DM,
            source: "/dev/mapper/lin".into(),
            mount_point: "/mnt/lin".into(),
            ..crate::os::fake::mount("/mnt/lin")
        });
        t
    }

    /// A holder of a file on the dm device whose pages lie on pmem1.
    fn on_second(comm: &str) -> FakeProc {
        FakeProc {
            file_dev: DM,
            pfn_shift: END_PFN - FIRST_PFN,
            ..FakeProc::holder(comm, 9)
        }
    }

    fn stack_os(procs: &[(u32, FakeProc)], topo: &Topology) -> FakeOs {
        let os = FakeOs::new(procs, &[]);
        os.state.borrow_mut().mounts = topo.mounts.clone();
        os
    }

    #[test]
    fn a_member_of_a_stack_is_refused_without_unbind_naming_the_stack() {
        let topo = stack(None);
        let os = stack_os(&[(100, on_second("db"))], &topo);
        let root = sysfs_root();
        let e = plan_drain(&request(false), &os, &topo, root.path()).unwrap_err();
        assert_eq!(e.code, Code::Stacked);
        assert!(
            e.message
                .contains("dm-0 (lin, members pmem0 pmem1), mounted on /mnt/lin (ext4)"),
            "{}",
            e.message
        );
        assert_eq!(
            os.log(),
            vec![],
            "nothing was recorded, fenced or signalled"
        );
    }

    #[test]
    fn a_stack_with_a_non_dax_member_is_refused_before_anything_is_done() {
        let topo = stack(Some("loop0"));
        let os = stack_os(&[(100, on_second("db"))], &topo);
        let root = sysfs_root();
        for unbind in [false, true] {
            let e = plan_drain(&request(unbind), &os, &topo, root.path()).unwrap_err();
            assert_eq!(e.code, Code::Unavailable);
            assert!(
                e.message.contains("member loop0 is not fsdax pmem"),
                "{}",
                e.message
            );
        }
        assert_eq!(os.log(), vec![]);
    }

    #[test]
    fn unbind_tears_a_stack_down_top_down_after_every_members_holders_left() {
        let topo = stack(None);
        // 100 maps pages on pmem1 only, through the dm device: drain of pmem0 still
        // signals it (the stack cannot go while anyone maps any member).
        let os = stack_os(&[(100, on_second("db"))], &topo);
        let root = sysfs_root();
        let plan = plan_drain(&request(true), &os, &topo, root.path()).unwrap();
        assert_eq!(plan.ranges.len(), 2, "{:?}", plan.ranges);
        assert!(plan.devs.contains(&DM), "the fence covers the dm device");
        drain(&os, &topo, &request(true)).unwrap();
        let w = words(&os);
        let at = |a: &str| w.iter().position(|x| x == a).unwrap_or(usize::MAX);
        assert!(at("signal:100:15") < at("audit:verify"), "{w:?}");
        assert!(at("audit:verify") < at("unmount:/mnt/lin"), "{w:?}");
        assert!(at("unmount:/mnt/lin") < at("dm_remove:lin"), "{w:?}");
        assert!(at("dm_remove:lin") < at("unbind:pfn0.0"), "{w:?}");
        assert!(w.contains(&"audit:dm_remove".to_string()), "{w:?}");
        let fenced: Vec<DevId> = os
            .log()
            .iter()
            .filter_map(|c| match c {
                Call::Fence(d, _) => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(fenced, vec![DEV, DM]);
    }

    #[test]
    fn a_dm_device_that_stays_open_stops_the_unbind() {
        let topo = stack(None);
        let os = stack_os(&[], &topo);
        os.state.borrow_mut().busy_dm = vec!["lin".into()];
        let e = drain(&os, &topo, &request(true)).unwrap_err();
        assert!(
            e.message.contains("cannot remove the dm device lin"),
            "{}",
            e.message
        );
        let w = words(&os);
        assert!(!w.iter().any(|x| x.starts_with("unbind:")), "{w:?}");
        assert_eq!(w.last().map(String::as_str), Some("unfence"));
    }

    #[test]
    fn a_holder_only_on_the_other_member_keeps_the_stack_up() {
        let topo = stack(None);
        let mut p = on_second("immortal");
        p.leaves_on.clear();
        let os = stack_os(&[(100, p)], &topo);
        let e = drain(&os, &topo, &request(true)).unwrap_err();
        assert_eq!(e.code, Code::Findings);
        assert!(e.message.contains("100 immortal"), "{}", e.message);
        let w = words(&os);
        assert!(
            !w.iter()
                .any(|x| x.starts_with("unmount:") || x.starts_with("dm_remove:")),
            "{w:?}"
        );
    }

    /// pmem0 the data device, pmem1 (or `rt`) the realtime device of an xfs on /mnt/rt.
    fn realtime(rt: &str) -> Topology {
        let mut t = stack(None);
        t.dm.clear();
        t.mounts = vec![Mount {
            fstype: "xfs".into(),
            mount_point: "/mnt/rt".into(),
            rtdev: Some(rt.into()),
            ..crate::os::fake::mount("/mnt/rt")
        }];
        t
    }

    #[test]
    fn a_realtime_device_is_a_stack_and_a_non_dax_one_is_refused() {
        let topo = realtime("/dev/pmem1");
        let os = stack_os(&[(100, FakeProc::holder("db", 7))], &topo);
        let root = sysfs_root();
        // Either device of the xfs: refused without --unbind, naming the realtime role.
        for dev in ["pmem0", "pmem1"] {
            let req = DrainRequest {
                device: dev,
                ..request(false)
            };
            let e = plan_drain(&req, &os, &topo, root.path()).unwrap_err();
            assert_eq!(e.code, Code::Stacked, "{dev}: {}", e.message);
            assert!(
                e.message
                    .contains("the xfs on /mnt/rt (realtime device /dev/pmem1)"),
                "{}",
                e.message
            );
        }
        let plan = plan_drain(&request(true), &os, &topo, root.path()).unwrap();
        assert_eq!(plan.ranges.len(), 2, "both devices of the xfs are watched");
        // A realtime device that is not fsdax pmem (a loop device, a raw namespace).
        for rt in ["/dev/loop0", "/dev/pmem9"] {
            let topo = realtime(rt);
            let e = plan_drain(&request(true), &os, &topo, root.path()).unwrap_err();
            assert_eq!(e.code, Code::Unavailable);
            assert!(
                e.message
                    .contains(&format!("realtime device {rt} is not fsdax")),
                "{}",
                e.message
            );
        }
        assert_eq!(os.log(), vec![], "nothing recorded, fenced or signalled");
    }
}
