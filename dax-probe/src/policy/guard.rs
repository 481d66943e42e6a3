//! Never signal what we have not proven: the checks every signal passes first.

use std::fmt;

use super::config::Rule;
use crate::{
    holders::scan::{Classifier, maps_any_pfn},
    os::{Os, PF_KTHREAD, Pidfd},
};

/// Why a process was not signalled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Init,
    Agent,
    KernelThread,
    Excluded,
    Gone,
    PidReused,
    NoLongerMaps,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Init => "PID 1 is never signalled",
            Refusal::Agent => "the agent never signals itself",
            Refusal::KernelThread => "kernel threads are never signalled",
            Refusal::Excluded => "excluded by policy",
            Refusal::Gone => "process already gone",
            Refusal::PidReused => "pid now belongs to another process",
            Refusal::NoLongerMaps => "no longer maps the device",
        })
    }
}

/// A process about to be signalled.
pub struct Candidate<'a> {
    pub pid: u32,
    /// Start time we saw it with (0: unknown).
    pub start_time: u64,
    pub comm: &'a str,
}

/// Runs every check and returns a pidfd pinned to the verified process.
///
/// Order matters: the pidfd is opened first and the identity (start time) checked after, so
/// the process we verify is the process the pidfd will signal.
pub fn admit<'o>(
    c: &Candidate,
    rule: &Rule,
    pfn_ranges: &[(u64, u64)],
    os: &'o dyn Os,
    class: &Classifier,
) -> Result<Box<dyn Pidfd + 'o>, Refusal> {
    if c.pid == 1 {
        return Err(Refusal::Init);
    }
    if c.pid == os.self_pid() {
        return Err(Refusal::Agent);
    }
    if rule.exclude.iter().any(|e| e.matches(c.pid, c.comm)) {
        return Err(Refusal::Excluded);
    }
    let fd = os.pidfd_open(c.pid).map_err(|_| Refusal::Gone)?;
    if os.stat_flags(c.pid).is_some_and(|f| f & PF_KTHREAD != 0) {
        return Err(Refusal::KernelThread);
    }
    let (start, comm) = os.procfs().stat(c.pid).ok_or(Refusal::Gone)?;
    if c.start_time != 0 && start != c.start_time {
        return Err(Refusal::PidReused);
    }
    if rule.exclude.iter().any(|e| e.matches(c.pid, &comm)) {
        return Err(Refusal::Excluded);
    }
    // The bounded reader stops at the first present page in the ranges.
    if !maps_any_pfn(os.procfs(), class, c.pid, pfn_ranges).map_err(|_| Refusal::Gone)? {
        return Err(Refusal::NoLongerMaps);
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        os::fake::{Call, END_PFN, FIRST_PFN, FakeOs, FakeProc, topology},
        policy::config::Exclusion,
    };

    const RANGES: &[(u64, u64)] = &[(FIRST_PFN, END_PFN)];

    fn try_admit(
        os: &FakeOs,
        pid: u32,
        start_time: u64,
        comm: &str,
        rule: &Rule,
    ) -> Result<(), Refusal> {
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let c = Candidate {
            pid,
            start_time,
            comm,
        };
        admit(&c, rule, RANGES, os, &class).map(|fd| assert_eq!(fd.pid(), pid))
    }

    #[test]
    fn admits_a_verified_holder() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        assert_eq!(try_admit(&os, 100, 7, "app", &Rule::default()), Ok(()));
        assert_eq!(os.log(), vec![Call::PidfdOpen(100)]);
    }

    #[test]
    fn never_pid_1_nor_itself_and_opens_nothing_for_them() {
        let os = FakeOs::new(&[(1, FakeProc::holder("init", 1))], &["/mnt/pmem0"]);
        let me = os.self_pid();
        os.state
            .borrow_mut()
            .procs
            .insert(me, FakeProc::holder("dax-probe", 2));
        assert_eq!(
            try_admit(&os, 1, 1, "init", &Rule::default()),
            Err(Refusal::Init)
        );
        assert_eq!(
            try_admit(&os, me, 2, "dax-probe", &Rule::default()),
            Err(Refusal::Agent)
        );
        assert_eq!(os.log(), vec![]);
    }

    #[test]
    fn never_a_kernel_thread() {
        let mut k = FakeProc::holder("kworker/0:1", 3);
        k.flags = PF_KTHREAD | 0x40;
        let os = FakeOs::new(&[(50, k)], &["/mnt/pmem0"]);
        assert_eq!(
            try_admit(&os, 50, 3, "kworker/0:1", &Rule::default()),
            Err(Refusal::KernelThread)
        );
    }

    #[test]
    fn a_pid_recycled_after_the_pidfd_open_is_refused() {
        // The start time changes only once the pidfd is open: a guard that read the stat
        // before opening the pidfd would admit a process it then cannot vouch for.
        let mut p = FakeProc::holder("app", 7);
        p.recycled_on_open = Some(9000);
        let os = FakeOs::new(&[(100, p)], &["/mnt/pmem0"]);
        assert_eq!(
            try_admit(&os, 100, 7, "app", &Rule::default()),
            Err(Refusal::PidReused)
        );
        assert_eq!(os.log(), vec![Call::PidfdOpen(100)]);
    }

    #[test]
    fn a_process_that_does_not_map_the_device_is_refused() {
        let mut p = FakeProc::holder("app", 7);
        p.maps = false;
        let os = FakeOs::new(&[(100, p)], &["/mnt/pmem0"]);
        assert_eq!(
            try_admit(&os, 100, 7, "app", &Rule::default()),
            Err(Refusal::NoLongerMaps)
        );
        assert_eq!(
            try_admit(&os, 101, 7, "gone", &Rule::default()),
            Err(Refusal::Gone)
        );
    }

    #[test]
    fn excluded_by_pid_or_by_the_comm_it_has_now() {
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("app", 7)),
                (200, FakeProc::holder("db", 8)),
            ],
            &["/mnt/pmem0"],
        );
        let rule = Rule {
            exclude: vec![Exclusion::Pid(100), Exclusion::Comm("db".into())],
            ..Rule::default()
        };
        assert_eq!(try_admit(&os, 100, 7, "app", &rule), Err(Refusal::Excluded));
        // The holder list named it differently; its stat, read through the pidfd, says db.
        assert_eq!(
            try_admit(&os, 200, 8, "old-name", &rule),
            Err(Refusal::Excluded)
        );
        assert_eq!(os.log(), vec![Call::PidfdOpen(200)]);
    }
}
