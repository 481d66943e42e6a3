//! Never signal what we have not proven: the checks every signal passes first.

use std::{fmt, rc::Rc};

use super::config::Rule;
use crate::{
    holders::{
        map::FileKey,
        scan::{Classifier, Procfs, Vma, maps_any_pfn, pages_at_in_ranges},
    },
    os::{Os, PF_KTHREAD, Pidfd, Pinned},
};

/// How a holder's mapping of the device is proven before it is signalled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Proof {
    /// A present page in the pfn ranges, read from the holder's page tables (pagemap):
    /// the page itself.
    #[default]
    PageTables,
    /// A vma of a file the holder map says it holds pages of, over those offsets, read
    /// from /proc/PID/maps and never from its page tables. For a departing device on
    /// kernels without devmap DAX entries (7.x): there, walking page tables that still
    /// point into the device once the unbind freed its memmap oopses the walker (the
    /// agent's own pagemap read died so in `pagemap_pmd_range` during a dm member's
    /// unbind on 7.2), and the unbind does not wait for us.
    Mappings,
}

/// A file (or device-dax device, `ino` 0) a holder maps, and the byte ranges of it the
/// holder map says it holds pages of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub file: FileKey,
    pub offsets: Vec<(u64, u64)>,
}

impl Held {
    /// Does `v` map this file over some of the held offsets? A device-dax device is known
    /// by its node (`/dev/NAME`, `device` being the departing device's name) or by what
    /// the classifier says the vma maps.
    fn mapped_by(&self, v: &Vma, device: &str, class: &Classifier) -> bool {
        let same = if self.file.is_devdax() {
            v.path.strip_prefix("/dev/") == Some(device) || class.dax_file(v) == Some(self.file)
        } else {
            v.dev == self.file.dev && v.ino == self.file.ino
        };
        let (vs, ve) = (v.offset, v.offset + (v.end - v.start));
        same && self.offsets.iter().any(|&(s, e)| s < ve && e > vs)
    }
}

/// Does the vma at one of `at` (addresses the holder map says the process holds), as
/// `vma_at` finds it, map one of `held`? One `PROCMAP_QUERY` per address, no page table
/// read; `false` sends the guard to [`maps_held`].
fn held_at(
    vma_at: &dyn Fn(u64) -> std::io::Result<Option<Vma>>,
    class: &Classifier,
    device: &str,
    held: &[Held],
    at: &[u64],
) -> std::io::Result<bool> {
    for &a in at {
        if let Some(v) = vma_at(a)?
            && held.iter().any(|h| h.mapped_by(&v, device, class))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Does `pid` still map one of `held` (its maps only, no page table read)?
fn maps_held(
    proc: &dyn Procfs,
    class: &Classifier,
    pid: u32,
    device: &str,
    held: &[Held],
) -> std::io::Result<bool> {
    Ok(proc
        .maps(pid)?
        .iter()
        .any(|v| held.iter().any(|h| h.mapped_by(v, device, class))))
}

/// Does the candidate map the device, as `scope.proof` proves it? First where the holder
/// map says the pages are (one page-table entry, or one vma, per address), through the
/// candidate's pin when it has one; the whole maps, read afresh, only when that finds
/// nothing, since a holder may have moved its mapping (mremap) or exec'd since the map
/// learned of it. The page-table walk stops at the first present page in the ranges.
fn proven(
    c: &Candidate,
    scope: Scope,
    proc: &dyn Procfs,
    class: &Classifier,
) -> std::io::Result<bool> {
    let ranges = scope.pfn_ranges;
    Ok(match scope.proof {
        Proof::PageTables => {
            let at_pages = match c.pinned.and_then(|p| p.pagemap()) {
                // A pin reads the address space it was opened on: nothing after an exec
                // (or an exit) is an error here and sends the guard to the fresh read.
                Some(mut src) => {
                    pages_at_in_ranges(src.as_mut(), class, c.at, ranges).unwrap_or(false)
                }
                None if c.at.is_empty() => false,
                None => pages_at_in_ranges(proc.pagemap(c.pid)?.as_mut(), class, c.at, ranges)?,
            };
            at_pages || maps_any_pfn(proc, class, c.pid, ranges)?
        }
        Proof::Mappings => {
            let at_vmas = match c.pinned {
                Some(p) => {
                    held_at(&|a| p.vma_at(a), class, scope.device, c.held, c.at).unwrap_or(false)
                }
                None => held_at(
                    &|a| proc.vma_at(c.pid, a),
                    class,
                    scope.device,
                    c.held,
                    c.at,
                )?,
            };
            at_vmas || maps_held(proc, class, c.pid, scope.device, c.held)?
        }
    })
}

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
    /// What the holder map says it holds (for [`Proof::Mappings`]).
    pub held: &'a [Held],
    /// Addresses of pages the holder map says it holds there: looked at first.
    pub at: &'a [u64],
    /// Its pin, when the agent opened one as it became a holder (start time checked
    /// then): identity and proof are read through it, and the signal goes through its
    /// pidfd. `None`: everything is opened now.
    pub pinned: Option<&'a Rc<dyn Pinned>>,
}

/// What a signal is about: the device, its pfn ranges, how a mapping of it is proven, and
/// when the agent read the kernel's report of it.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub device: &'a str,
    pub pfn_ranges: &'a [(u64, u64)],
    pub proof: Proof,
    /// When the agent's steps before the verdicts ended.
    pub stamps: Stamps,
}

/// CLOCK_BOOTTIME at the steps of a departure before its verdicts, on the kernel's clock
/// for its report (0: not reached, or not from an event): with the kernel's own time of
/// the report, each step's share of the reaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamps {
    /// The agent read the kernel's report off the ring.
    pub received_ns: u64,
    /// Its holders were listed from the holder map.
    pub listed_ns: u64,
    /// Its devices were fenced (their audit record written first).
    pub fenced_ns: u64,
}

/// Runs every check and returns a pidfd pinned to the verified process.
///
/// Order matters: the pidfd is opened first and the identity (start time) checked after, so
/// the process we verify is the process the pidfd will signal. A pin was opened in that
/// order when its process became a holder; its identity is read again now (comm,
/// flags), through the pin.
pub fn admit<'o>(
    c: &Candidate,
    rule: &Rule,
    scope: Scope,
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
    let (fd, identity): (Box<dyn Pidfd + 'o>, _) = match c.pinned {
        Some(p) => (Box::new(Shared(p.clone())), p.identity()),
        None => {
            let fd = os.pidfd_open(c.pid).map_err(|_| Refusal::Gone)?;
            (fd, os.identity(c.pid))
        }
    };
    let (start, comm, flags) = identity.ok_or(Refusal::Gone)?;
    if flags & PF_KTHREAD != 0 {
        return Err(Refusal::KernelThread);
    }
    if c.start_time != 0 && start != c.start_time {
        return Err(Refusal::PidReused);
    }
    if rule.exclude.iter().any(|e| e.matches(c.pid, &comm)) {
        return Err(Refusal::Excluded);
    }
    if !proven(c, scope, os.procfs(), class).map_err(|_| Refusal::Gone)? {
        return Err(Refusal::NoLongerMaps);
    }
    Ok(fd)
}

/// A pin's pidfd, handed out for one signal while the pin stays with the enforcer.
struct Shared(Rc<dyn Pinned>);

impl Pidfd for Shared {
    fn pid(&self) -> u32 {
        self.0.pid()
    }
    fn send(&self, sig: super::signal::Signal) -> std::io::Result<()> {
        self.0.send(sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        os::fake::{Call, DEV, END_PFN, FIRST_PFN, FakeOs, FakeProc, PAGES, topology},
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
        admit_by_pages(os, pid, start_time, comm, rule, &[])
    }

    /// The page-table proof, looking at `at` first.
    fn admit_by_pages(
        os: &FakeOs,
        pid: u32,
        start_time: u64,
        comm: &str,
        rule: &Rule,
        at: &[u64],
    ) -> Result<(), Refusal> {
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let c = Candidate {
            pid,
            start_time,
            comm,
            held: &[],
            at,
            pinned: None,
        };
        let scope = Scope {
            device: "pmem0",
            pfn_ranges: RANGES,
            proof: Proof::PageTables,
            stamps: Stamps::default(),
        };
        admit(&c, rule, scope, os, &class).map(|fd| assert_eq!(fd.pid(), pid))
    }

    /// The fake's holders map `/mnt/pmem0/file` (inode 12 on `DEV`) over `PAGES` pages.
    fn admit_by_maps(os: &FakeOs, pid: u32, held: &[Held]) -> Result<(), Refusal> {
        admit_by_maps_at(os, pid, held, &[])
    }

    fn admit_by_maps_at(os: &FakeOs, pid: u32, held: &[Held], at: &[u64]) -> Result<(), Refusal> {
        let topo = topology(&["/mnt/pmem0"]);
        let class = Classifier { topology: &topo };
        let c = Candidate {
            pid,
            start_time: 7,
            comm: "app",
            held,
            at,
            pinned: None,
        };
        let scope = Scope {
            device: "pmem0",
            pfn_ranges: RANGES,
            proof: Proof::Mappings,
            stamps: Stamps::default(),
        };
        admit(&c, &Rule::default(), scope, os, &class).map(|_| ())
    }

    fn held(ino: u64, offsets: (u64, u64)) -> Held {
        Held {
            file: FileKey { dev: DEV, ino },
            offsets: vec![offsets],
        }
    }

    /// Where the fake's holders map their file.
    const MAPPED: u64 = 0x7f00_0000_0000;

    /// With an address the holder map knows, the page-table proof reads that one entry and
    /// not the maps; an address that no longer holds a page of the device (the holder
    /// moved it) falls back to the whole maps, and still proves or refuses by them.
    #[test]
    fn a_targeted_page_table_proof_reads_one_entry_and_no_maps() {
        // 101 maps the file at the same address, but its pages lie past the device's.
        let mut elsewhere = FakeProc::holder("sh", 8);
        elsewhere.pfn_shift = END_PFN;
        let os = FakeOs::new(
            &[(100, FakeProc::holder("app", 7)), (101, elsewhere)],
            &["/mnt/pmem0"],
        );
        let rule = Rule::default();
        assert_eq!(
            admit_by_pages(&os, 100, 7, "app", &rule, &[MAPPED + 4096]),
            Ok(())
        );
        assert_eq!(os.state.borrow().maps_reads, Vec::<u32>::new());
        assert_eq!(os.state.borrow().pagemap_opens, vec![100]);
        // A stale address: the whole maps, then the walk, prove it.
        assert_eq!(admit_by_pages(&os, 100, 7, "app", &rule, &[0x1000]), Ok(()));
        assert_eq!(os.state.borrow().maps_reads, vec![100]);
        // A present page at the address, but not the device's, nor anywhere: refused.
        assert_eq!(
            admit_by_pages(&os, 101, 8, "sh", &rule, &[MAPPED]),
            Err(Refusal::NoLongerMaps)
        );
    }

    /// The same for the proof by mappings: one vma query at the address, no maps read,
    /// and the held file over held offsets is still what proves it.
    #[test]
    fn a_targeted_proof_by_mappings_asks_for_one_vma() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let held12 = [held(12, (0, 4096))];
        assert_eq!(admit_by_maps_at(&os, 100, &held12, &[MAPPED]), Ok(()));
        assert_eq!(os.state.borrow().vma_queries, vec![100]);
        assert_eq!(os.state.borrow().maps_reads, Vec::<u32>::new());
        assert_eq!(os.state.borrow().pagemap_opens, Vec::<u32>::new());
        // The vma there is another file than the one held: the maps decide, and refuse.
        assert_eq!(
            admit_by_maps_at(&os, 100, &[held(13, (0, 4096))], &[MAPPED]),
            Err(Refusal::NoLongerMaps)
        );
        assert_eq!(os.state.borrow().maps_reads, vec![100]);
    }

    /// 7.2 oopsed in the agent's own pagemap read of a holder during a dm member's
    /// unbind: the proof by mappings reads the maps, never a page table.
    #[test]
    fn a_proof_by_mappings_reads_no_page_table() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        assert_eq!(admit_by_maps(&os, 100, &[held(12, (0, 4096))]), Ok(()));
        assert_eq!(os.state.borrow().pagemap_opens, Vec::<u32>::new());
        // The page-table proof of the same holder does read them (the fake sees it).
        assert_eq!(try_admit(&os, 100, 7, "app", &Rule::default()), Ok(()));
        assert_eq!(os.state.borrow().pagemap_opens, vec![100]);
    }

    /// Only the held file over the held offsets proves a mapping: another file of the
    /// device, offsets past the vma, or no vma at all do not.
    #[test]
    fn a_proof_by_mappings_needs_the_held_file_over_held_offsets() {
        let os = FakeOs::new(&[(100, FakeProc::holder("app", 7))], &["/mnt/pmem0"]);
        let end = PAGES * 4096;
        assert_eq!(
            admit_by_maps(&os, 100, &[held(13, (0, 4096))]),
            Err(Refusal::NoLongerMaps)
        );
        assert_eq!(
            admit_by_maps(&os, 100, &[held(12, (end, end + 4096))]),
            Err(Refusal::NoLongerMaps)
        );
        assert_eq!(
            admit_by_maps(&os, 100, &[held(13, (0, 1)), held(12, (end - 4096, end))]),
            Ok(())
        );
        assert_eq!(admit_by_maps(&os, 100, &[]), Err(Refusal::NoLongerMaps));
        let mut gone = FakeProc::holder("app", 7);
        gone.maps = false;
        let os = FakeOs::new(&[(100, gone)], &["/mnt/pmem0"]);
        assert_eq!(
            admit_by_maps(&os, 100, &[held(12, (0, 4096))]),
            Err(Refusal::NoLongerMaps)
        );
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
