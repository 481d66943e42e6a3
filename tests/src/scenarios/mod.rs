//! Scenario registry. Each scenario runs on one or more targets (file systems / device kinds)
//! and reports an [`Outcome`] with the numbers it compared.

pub mod bad_input;
pub mod badblocks;
pub mod cgroup_pod;
pub mod clone_vm;
pub mod compare;
pub mod departure;
pub mod fault_trace;
pub mod fence;
pub mod guard;
pub mod history;
pub mod holders;
pub mod hostile;
pub mod metrics;
pub mod personality;
pub mod rebind;
pub mod stack;
pub mod tui;
pub mod tui_attach;

use std::fmt;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    pmem::{Devdax, Fsdax},
    report::Outcome,
    truth::DaxSpace,
};

/// What a scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Ext4,
    Xfs,
    Devdax,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Ext4 => "ext4",
            Target::Xfs => "xfs",
            Target::Devdax => "devdax",
        })
    }
}

/// A mounted DAX file system prepared by the VM init.
#[derive(Clone, Debug)]
pub struct DaxFs {
    pub target: Target,
    pub dev: Fsdax,
    pub mnt: String,
    /// xfs only: created with reflink+rmapbt (kernel accepted DAX on it).
    pub reflink: bool,
}

/// The prepared machine.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub fs: Vec<DaxFs>,
    /// Unused nvdimm regions for scenarios that need a device of their own.
    pub pool: std::cell::RefCell<Vec<String>>,
    pub devdax: Option<Devdax>,
    /// `dax-probe monitor` run before any namespace was made DAX: (exit code, stderr).
    pub before_setup_monitor: Option<(Option<i32>, String)>,
}

impl Env {
    pub fn fs(&self, t: Target) -> Option<&DaxFs> {
        self.fs.iter().find(|f| f.target == t)
    }

    pub fn has(&self, t: Target) -> bool {
        match t {
            Target::Devdax => self.devdax.is_some(),
            t => self.fs(t).is_some(),
        }
    }

    /// A fresh DAX file system on a device of its own, for a scenario that unbinds,
    /// drains or poisons it. Devices are never reused: a file system whose device was pulled
    /// from under it cannot be torn down safely on every kernel (6.12 faults in
    /// dax_disassociate_entry when its inodes go), so it is left as it is.
    pub fn fresh(&self, t: Target, name: &str) -> Result<DaxFs> {
        let region = self
            .pool
            .borrow_mut()
            .pop()
            .context("no spare nvdimm left for this scenario (raise the VM's nvdimm count)")?;
        let dev = crate::pmem::make_fsdax(&region)?;
        let mnt = format!("/mnt/{name}-{t}");
        let reflink = match t {
            Target::Xfs => crate::pmem::mount_xfs(&dev, &mnt, true)?,
            _ => {
                crate::pmem::mount_ext4(&dev, &mnt)?;
                false
            }
        };
        Ok(DaxFs {
            target: t,
            dev,
            mnt,
            reflink,
        })
    }

    /// Where DAX memory is, for ground-truth scans.
    pub fn space(&self) -> DaxSpace {
        let mut s = DaxSpace::default();
        for f in &self.fs {
            s.pfn_ranges
                .push((f.dev.data_start >> 12, f.dev.data_end >> 12));
            s.path_prefixes.push(format!("{}/", f.mnt));
        }
        if let Some(d) = &self.devdax {
            s.pfn_ranges.push((d.data_start >> 12, d.data_end >> 12));
            s.path_prefixes.push(d.dev_path());
        }
        s
    }
}

pub type Run = fn(&Env, Target) -> Result<Checked>;

pub struct Scenario {
    pub name: &'static str,
    pub targets: &'static [Target],
    pub run: Run,
}

/// What a scenario found: pass/fail is decided by the scenario from these.
pub struct Checked {
    pub passed: bool,
    pub summary: String,
    pub counts: Value,
    pub details: Vec<String>,
}

fn fs_of(env: &Env, t: Target) -> Result<&DaxFs> {
    env.fs(t).with_context(|| format!("{t} was not prepared"))
}

const FS: &[Target] = &[Target::Ext4, Target::Xfs];

/// Scenario targets that run in a VM boot of their own, because the kernel may not survive
/// them in a state fit for the next scenario:
/// - an unbind of xfs (rmapbt) with a mapped file never finishes on some kernels (7.2: the
///   unbinding task spins in the kernel, with or without the agent), and every later sysfs
///   access to the nvdimm bus waits on it;
/// - a holder killed during an unbind tears its mapping down while the device's memmap is
///   being freed: on 7.2 (DAX pages without devmap) an exit that loses that race oopses in
///   `__zap_vma_range` (seen under host load; the enforcement normally wins it). That is
///   why every scenario whose enforcement kills a holder during an unbind is here
///   (unbind-enforce, never-wrong-target, hostile-unbind, clone-vm, metrics); a drain kills
///   before it unbinds and needs no isolation.
///
/// `all` leaves these out and the guest names them; the host runs them in a boot of their
/// own, in this order, and boots again for those a wedged bus kept from running.
pub const ISOLATED: &[(&str, Target)] = &[
    // In the order the host runs them in their shared boot: the ext4 ones first, since an
    // xfs unbind that wedges the bus ends the boot for everything after it.
    ("unbind-enforce", Target::Ext4),
    ("rebind-leak", Target::Ext4),
    ("devdax-reconfigure", Target::Devdax),
    ("never-wrong-target", Target::Ext4),
    ("hostile-unbind", Target::Ext4),
    ("clone-vm", Target::Ext4),
    ("metrics", Target::Ext4),
    // A member of a dm stack unbound under its holders (ext4 on dm: no notify_failure).
    ("dm-linear", Target::Ext4),
    ("dm-striped", Target::Ext4),
    // Unbinds a device under a live holder (the guard-off case).
    ("guard", Target::Ext4),
    ("unbind-report", Target::Xfs),
    ("unbind-xfs-explain", Target::Xfs),
    // Last: an xfs whose realtime device is unbound under it.
    ("xfs-realtime", Target::Xfs),
];

/// Whether `token` (from `daxprobe.scenario=`, comma list of `all`, `NAME` or
/// `NAME/TARGET`) selects this scenario target, and whether it was left out only because
/// it is isolated.
pub fn selects(tokens: &[&str], name: &str, t: Target) -> (bool, bool) {
    let exact = format!("{name}/{t}");
    if tokens.contains(&exact.as_str()) {
        return (true, false);
    }
    let broad = tokens.contains(&"all") || tokens.contains(&name);
    let isolated = ISOLATED.contains(&(name, t));
    (broad && !isolated, broad && isolated)
}

/// What a boot asked for `tokens` runs, in order: everything `all` or a name selects (in
/// [`all`]'s order), then exact `NAME/TARGET` tokens in the order given (the host orders
/// isolated ones); and the isolated targets left out, for the host to run apart.
pub fn plan(tokens: &[&str]) -> (Vec<(&'static str, Target)>, Vec<String>) {
    let scenarios = all();
    let mut run: Vec<(&'static str, Target)> = Vec::new();
    let mut left_out = Vec::new();
    for s in &scenarios {
        for &t in s.targets {
            let exact = format!("{}/{t}", s.name);
            if tokens.contains(&exact.as_str()) {
                continue;
            }
            match selects(tokens, s.name, t) {
                (true, _) => run.push((s.name, t)),
                (false, true) => left_out.push(exact),
                _ => {}
            }
        }
    }
    for tok in tokens {
        for s in &scenarios {
            for &t in s.targets {
                if *tok == format!("{}/{t}", s.name) && !run.contains(&(s.name, t)) {
                    run.push((s.name, t));
                }
            }
        }
    }
    left_out.sort_by_key(|tok| {
        ISOLATED
            .iter()
            .position(|(n, t)| format!("{n}/{t}") == *tok)
    });
    (run, left_out)
}

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "fault-trace",
            targets: FS,
            run: |e, t| fault_trace::run(e, fs_of(e, t)?),
        },
        Scenario {
            name: "fault-trace-fallback",
            targets: &[Target::Ext4],
            run: |e, t| fault_trace::run_fallback(e, fs_of(e, t)?),
        },
        Scenario {
            name: "fault-trace-pagemap",
            targets: &[Target::Ext4],
            run: |e, t| fault_trace::run_pagemap(e, fs_of(e, t)?),
        },
        Scenario {
            name: "bad-input",
            targets: &[Target::Ext4],
            run: |e, t| bad_input::run(e, fs_of(e, t)?),
        },
        Scenario {
            name: "map-before-agent",
            targets: FS,
            run: holders::map_before_agent,
        },
        Scenario {
            name: "fork-inherit",
            targets: FS,
            run: holders::fork_inherit,
        },
        Scenario {
            name: "exit",
            targets: FS,
            run: holders::exit,
        },
        Scenario {
            name: "partial-munmap",
            targets: FS,
            run: holders::partial_munmap,
        },
        Scenario {
            name: "mremap",
            targets: FS,
            run: holders::mremap,
        },
        Scenario {
            name: "private-cow",
            targets: FS,
            run: holders::private_cow,
        },
        Scenario {
            name: "truncate",
            targets: FS,
            run: holders::truncate,
        },
        Scenario {
            name: "shared-by-two",
            targets: FS,
            run: holders::shared_by_two,
        },
        Scenario {
            name: "reflinked-files",
            targets: &[Target::Xfs],
            run: holders::reflinked_files,
        },
        Scenario {
            name: "devdax",
            targets: &[Target::Devdax],
            run: holders::devdax,
        },
        Scenario {
            name: "module-late",
            targets: &[Target::Devdax],
            run: holders::module_late,
        },
        Scenario {
            name: "badblocks",
            targets: FS,
            run: badblocks::run,
        },
        Scenario {
            name: "audit-stale",
            targets: &[Target::Ext4],
            run: departure::audit_stale,
        },
        Scenario {
            name: "unbind-report",
            targets: FS,
            run: departure::unbind_report,
        },
        Scenario {
            name: "unbind-enforce",
            targets: &[Target::Ext4],
            run: departure::unbind_enforce,
        },
        Scenario {
            name: "unbind-xfs-explain",
            targets: &[Target::Xfs],
            run: departure::unbind_xfs_explain,
        },
        Scenario {
            name: "drain",
            targets: FS,
            run: departure::drain,
        },
        Scenario {
            name: "storm-unbind",
            targets: &[Target::Ext4],
            run: departure::storm_unbind,
        },
        Scenario {
            name: "never-wrong-target",
            targets: &[Target::Ext4],
            run: departure::never_wrong_target,
        },
        Scenario {
            name: "tui",
            targets: &[Target::Ext4],
            run: tui::run,
        },
        // Last: a poisoned page stays poisoned, so its file system is not reused.
        Scenario {
            name: "hwpoison",
            targets: FS,
            run: departure::hwpoison,
        },
        Scenario {
            name: "hostile-unbind",
            targets: &[Target::Ext4],
            run: hostile::run,
        },
        Scenario {
            name: "killed-mid-action",
            targets: &[Target::Ext4],
            run: hostile::killed_mid_action,
        },
        Scenario {
            name: "tui-attach",
            targets: &[Target::Ext4],
            run: tui_attach::run,
        },
        Scenario {
            name: "history",
            targets: &[Target::Ext4],
            run: history::run,
        },
        Scenario {
            name: "clone-vm",
            targets: &[Target::Ext4],
            run: clone_vm::run,
        },
        // After hwpoison: it uses a fresh device of its own (drained and unbound).
        Scenario {
            name: "fence-excluded",
            targets: &[Target::Ext4],
            run: fence::fence_excluded,
        },
        Scenario {
            name: "cgroup-pod",
            targets: &[Target::Ext4],
            run: cgroup_pod::run,
        },
        Scenario {
            name: "metrics",
            targets: &[Target::Ext4],
            run: |e, _| metrics::run(e),
        },
        // Stacks over two pmem members each (dm made with the agent's ioctl client).
        Scenario {
            name: "drain-stack",
            targets: &[Target::Ext4],
            run: |e, _| stack::drain_stack(e),
        },
        Scenario {
            name: "dm-linear",
            targets: &[Target::Ext4],
            run: |e, _| stack::dm_unbind(e, stack::Kind::Linear),
        },
        Scenario {
            name: "dm-striped",
            targets: &[Target::Ext4],
            run: |e, _| stack::dm_unbind(e, stack::Kind::Striped),
        },
        Scenario {
            name: "xfs-realtime",
            targets: &[Target::Xfs],
            run: |e, _| stack::xfs_realtime(e),
        },
        // Isolated: it takes a device-dax device from device_dax and gives it to kmem.
        Scenario {
            name: "devdax-reconfigure",
            targets: &[Target::Devdax],
            run: personality::reconfigure,
        },
        // Isolated: it unbinds three devices and leaves their old holders behind.
        Scenario {
            name: "rebind-leak",
            targets: &[Target::Ext4],
            run: rebind::run,
        },
        Scenario {
            name: "guard",
            targets: &[Target::Ext4],
            run: guard::run,
        },
    ]
}

/// Runs one scenario on one target, turning errors and panics into a failed outcome.
pub fn execute(s: &Scenario, env: &Env, target: Target) -> Outcome {
    let base = |passed, summary: String, counts, details| Outcome {
        scenario: s.name.to_string(),
        target: target.to_string(),
        passed,
        summary,
        counts,
        details,
    };
    if !env.has(target) {
        return base(
            false,
            format!("{target} was not prepared in this VM"),
            Value::Null,
            Vec::new(),
        );
    }
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (s.run)(env, target)));
    match res {
        Ok(Ok(c)) => base(c.passed, c.summary, c.counts, c.details),
        Ok(Err(e)) => base(
            false,
            format!("error: {e:#}"),
            Value::Null,
            crate::sys::dmesg_tail(15),
        ),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            base(false, format!("panicked: {msg}"), Value::Null, Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_targets_run_only_when_named_exactly() {
        let all = ["all"];
        assert_eq!(selects(&all, "unbind-report", Target::Ext4), (true, false));
        assert_eq!(selects(&all, "unbind-report", Target::Xfs), (false, true));
        let named = ["unbind-report"];
        assert_eq!(selects(&named, "unbind-report", Target::Xfs), (false, true));
        let exact = ["unbind-report/xfs"];
        assert_eq!(selects(&exact, "unbind-report", Target::Xfs), (true, false));
        assert_eq!(
            selects(&exact, "unbind-report", Target::Ext4),
            (false, false)
        );
        assert_eq!(selects(&named, "drain", Target::Xfs), (false, false));
    }

    #[test]
    fn a_plan_runs_exact_tokens_in_the_order_given_and_names_the_isolated() {
        let (run, left) = plan(&["all"]);
        assert!(run.contains(&("unbind-report", Target::Ext4)));
        assert!(!run.iter().any(|r| ISOLATED.contains(r)));
        let iso: Vec<String> = ISOLATED.iter().map(|(n, t)| format!("{n}/{t}")).collect();
        assert_eq!(left, iso, "isolated listed in ISOLATED's order");
        let (run, left) = plan(&["unbind-report/xfs", "unbind-enforce/ext4"]);
        assert_eq!(
            run,
            vec![
                ("unbind-report", Target::Xfs),
                ("unbind-enforce", Target::Ext4)
            ]
        );
        assert!(left.is_empty());
        let (run, _) = plan(&["drain", "drain/xfs"]);
        assert_eq!(
            run,
            vec![("drain", Target::Ext4), ("drain", Target::Xfs)],
            "no target twice"
        );
    }
}
