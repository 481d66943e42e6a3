//! The unbind guard, agent side (policy `guard = "refuse-unbind"`).
//!
//! The kernel program (`dax-probe-ebpf/src/guard.rs`, BPF LSM `file_permission`) refuses,
//! with EBUSY, a write to `/sys/bus/{nd,dax}/drivers/<driver>/unbind` that names a device
//! in its `GUARDED` map. This module decides what is in that map: the sysfs names of every
//! device whose rule asks for the guard *and* that has holders in the live map right now.
//! A device without holders is never guarded (nothing would be stranded), so `drain`, which
//! first makes the holders leave, is never in the way; its own write is the agent's anyway.
//!
//! Covered: the nd and dax buses' driver `unbind` files, written directly or through
//! `/sys/bus/*/devices/<dev>/driver/unbind` (what `ndctl disable-namespace`,
//! `ndctl disable-region` and `daxctl disable-device` write: libndctl `ndctl_unbind`,
//! libdaxctl `daxctl_unbind`), for the names the namespace, its pfn/dax device, its
//! device-dax device and its region have. Not covered: `rmmod`/`modprobe -r` of a driver
//! (no LSM hook sees module removal), `ndbusN` and the ACPI `nfit` driver's unbind (the
//! whole bus), an `nmemN` DIMM unbind, a driver unbind from another bus (e.g. PCI `remove`).
//!
//! Fails open: the programs go when the agent stops (nothing is pinned).

use std::collections::BTreeSet;

use super::config::{Guard, Policy};
use crate::{
    event::{GuardVerdict, UnbindGuarded},
    topology::{Mode, Namespace, Topology},
};

/// Every name a sysfs unbind may use to take `n` (or what it sits on) away.
pub fn unbind_names(n: &Namespace) -> Vec<String> {
    let mut v = vec![n.name.clone(), n.region.clone()];
    v.extend(n.holder.clone());
    if let Some((c, _)) = &n.chardev {
        v.push(c.clone());
    }
    v.sort();
    v.dedup();
    v
}

/// The names to refuse unbinds of now: those of every namespace whose rule asks for the
/// guard and that has holders (`holds(first_pfn, end_pfn)`).
pub fn guarded_names(
    policy: &Policy,
    topo: &Topology,
    holds: &dyn Fn(u64, u64) -> bool,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for n in &topo.namespaces {
        if !n.range_known || !matches!(n.mode, Mode::Fsdax | Mode::Devdax | Mode::Raw) {
            continue;
        }
        let names = unbind_names(n);
        let mut keyed: Vec<&str> = vec![n.device_name()];
        keyed.extend(names.iter().map(String::as_str));
        if policy.rule_for(&keyed).guard != Guard::RefuseUnbind {
            continue;
        }
        if holds(n.data_range.first_pfn(), n.data_range.end_pfn()) {
            out.extend(names);
        }
    }
    out
}

/// The namespace a name written to an `unbind` file stands for.
pub fn namespace_written<'a>(topo: &'a Topology, written: &str) -> Option<&'a Namespace> {
    if written.is_empty() {
        return None;
    }
    topo.namespaces
        .iter()
        .find(|n| unbind_names(n).iter().any(|x| x == written))
}

/// The audit record's `action` for a guard report.
pub fn audit_action(v: GuardVerdict) -> &'static str {
    match v {
        GuardVerdict::Refused | GuardVerdict::RefusedUnreadable => "unbind_refused",
        GuardVerdict::AgentPassed => "unbind_guard_pass",
    }
}

/// One line of what the audit record says.
pub fn audit_detail(g: &UnbindGuarded, device: Option<&str>, cmdline: Option<&str>) -> String {
    let what = match g.verdict {
        GuardVerdict::Refused => format!(
            "refused (EBUSY) a write of {:?} to {}/drivers/{}/unbind: {} has holders",
            g.written,
            g.bus,
            g.driver,
            device.unwrap_or(&g.written)
        ),
        GuardVerdict::RefusedUnreadable => format!(
            "refused (EBUSY) a write to {}/drivers/{}/unbind whose device name could not be \
             read (syscall {}) while a guarded device has holders",
            g.bus, g.driver, g.syscall
        ),
        GuardVerdict::AgentPassed => format!(
            "let the agent's own unbind of {:?} ({}/drivers/{}) through",
            g.written, g.bus, g.driver
        ),
    };
    match cmdline {
        Some(c) => format!("{what}; writer's command line: {c}"),
        None => format!("{what}; writer's command line unknown (it has exited)"),
    }
}

/// `/proc/PID/cmdline` as a line: arguments joined by spaces; `None` when unreadable or
/// empty (a process that exited, a kernel thread).
pub fn cmdline_of(raw: &[u8]) -> Option<String> {
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// Why the guard cannot run here, when a policy asks for it: the monitor warns once and
/// goes on without it (nothing is refused).
pub fn unavailable_warning(reason: &str) -> String {
    format!(
        "the policy asks for guard = \"refuse-unbind\", but the unbind guard is unavailable on \
         this kernel ({reason}): unbinds are NOT refused; boot with lsm=...,bpf to enable it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        os::fake::{END_PFN, FIRST_PFN, topology},
        policy::config::parse,
        topology::{DevId, PhysRange},
    };

    fn two_devices() -> Topology {
        let mut t = topology(&["/mnt/pmem0"]);
        let mut n = t.namespaces[0].clone();
        n.name = "namespace1.0".into();
        n.region = "region1".into();
        n.holder = Some("pfn1.0".into());
        n.block = Some((
            "pmem1".into(),
            DevId {
                major: 259,
                minor: 1,
            },
        ));
        let off = END_PFN - FIRST_PFN;
        n.data_range = PhysRange {
            start: (FIRST_PFN + off) << 12,
            end: (END_PFN + off) << 12,
        };
        n.namespace_range = n.data_range;
        t.namespaces.push(n);
        t
    }

    /// Holders on pmem0's range only.
    fn pmem0_held(s: u64, e: u64) -> bool {
        s < END_PFN && e > FIRST_PFN
    }

    fn names(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_guarded_devices_with_holders_are_listed_with_every_unbind_name() {
        let topo = two_devices();
        let p = parse(
            "[device.pmem0]\nguard = \"refuse-unbind\"\n[device.pmem1]\nguard = \"refuse-unbind\"\n",
            "p.toml",
        )
        .unwrap();
        // pmem1 is guarded but has no holders: its unbind goes through.
        assert_eq!(
            guarded_names(&p, &topo, &pmem0_held),
            names(&["namespace0.0", "pfn0.0", "region0"])
        );
        // Nobody holds anything: nothing is refused.
        assert!(guarded_names(&p, &topo, &|_, _| false).is_empty());
        // Both held: both listed.
        assert_eq!(guarded_names(&p, &topo, &|_, _| true).len(), 6);
    }

    #[test]
    fn the_guard_off_or_for_another_device_lists_nothing_of_this_one() {
        let topo = two_devices();
        let off = parse("[default]\naction = \"report\"\n", "p.toml").unwrap();
        assert!(guarded_names(&off, &topo, &|_, _| true).is_empty());
        let other = parse("[device.pmem1]\nguard = \"refuse-unbind\"\n", "p.toml").unwrap();
        assert!(guarded_names(&other, &topo, &pmem0_held).is_empty());
        // By namespace name, from [default], and off again for one device.
        let by_ns = parse(
            "[device.\"namespace0.0\"]\nguard = \"refuse-unbind\"\n",
            "p.toml",
        )
        .unwrap();
        assert!(guarded_names(&by_ns, &topo, &pmem0_held).contains("pfn0.0"));
        let all_but = parse(
            "[default]\nguard = \"refuse-unbind\"\n[device.pmem0]\nguard = \"off\"\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(
            guarded_names(&all_but, &topo, &|_, _| true),
            names(&["namespace1.0", "pfn1.0", "region1"])
        );
    }

    #[test]
    fn a_device_whose_range_is_unknown_is_not_guarded() {
        let mut topo = two_devices();
        topo.namespaces[0].range_known = false;
        let p = parse("[default]\nguard = \"refuse-unbind\"\n", "p.toml").unwrap();
        assert!(!guarded_names(&p, &topo, &|_, _| true).contains("pfn0.0"));
    }

    #[test]
    fn a_written_name_resolves_to_its_namespace() {
        let topo = two_devices();
        for w in ["pfn1.0", "namespace1.0", "region1"] {
            assert_eq!(
                namespace_written(&topo, w).map(|n| n.device_name()),
                Some("pmem1")
            );
        }
        assert!(namespace_written(&topo, "").is_none());
        assert!(namespace_written(&topo, "pfn9.0").is_none());
    }

    #[test]
    fn cmdlines_are_joined_and_empty_ones_unknown() {
        assert_eq!(
            cmdline_of(b"sh\0-c\0echo pfn0.0 > unbind\0").as_deref(),
            Some("sh -c echo pfn0.0 > unbind")
        );
        assert_eq!(cmdline_of(b""), None);
        assert_eq!(cmdline_of(b"\0"), None);
    }

    #[test]
    fn audit_lines_say_what_was_refused_and_by_whom() {
        let g = UnbindGuarded {
            ts_ns: 1,
            pid: 10,
            tid: 10,
            comm: "sh".into(),
            written: "pfn0.0".into(),
            driver: "nd_pmem".into(),
            bus: "nd".into(),
            syscall: 1,
            verdict: GuardVerdict::Refused,
            errno: Some(16),
        };
        let d = audit_detail(&g, Some("pmem0"), Some("sh -c x"));
        assert!(
            d.contains("EBUSY") && d.contains("pmem0") && d.contains("sh -c x"),
            "{d}"
        );
        assert_eq!(audit_action(g.verdict), "unbind_refused");
        assert_eq!(audit_action(GuardVerdict::AgentPassed), "unbind_guard_pass");
        assert!(audit_detail(&g, None, None).contains("exited"));
    }
}
