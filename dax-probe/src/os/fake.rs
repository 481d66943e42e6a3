//! A scripted machine for unit tests: processes that map one pmem device (or not), react to
//! signals by leaving (or not), a clock that moves only when slept on, and one ordered log
//! of every call the code under test made — audit records, fences, pidfds, signals,
//! unmounts, sysfs writes — so tests assert the order of what happened.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    rc::Rc,
    time::{Duration, Instant},
};

use super::{AuditSink, Fence, FenceArm, Os, Pidfd, Pinned};
use crate::{
    holders::scan::{Procfs, Vma},
    policy::{audit::Record, guard::Proof, signal::Signal},
    proc::pagemap::PagemapSource,
    topology::{DaxOption, DevId, Mode, Mount, Namespace, PhysRange, Topology},
};

/// The device every fake process maps: `pmem0`, fsdax, mounted on /mnt/pmem0.
pub const DEV: DevId = DevId {
    major: 259,
    minor: 0,
};
pub const FIRST_PFN: u64 = 0x10_0000;
pub const END_PFN: u64 = 0x14_0000;
/// Pages each mapping process has present.
pub const PAGES: u64 = 4;

/// One thing the code under test did, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Audit {
        action: String,
        pid: Option<u32>,
        detail: String,
    },
    /// A write to the audit log that the script made fail.
    AuditFailed {
        action: String,
    },
    Fence(DevId, FenceArm),
    Unfence(DevId),
    PidfdOpen(u32),
    /// A holder pinned ([`Os::pin`]).
    Pin(u32),
    /// A signal delivered, and when (fake time since the start).
    Signal {
        pid: u32,
        sig: i32,
        at: Duration,
    },
    Unmount(String),
    Sysfs(PathBuf, String),
    DmRemove(String),
}

#[derive(Clone, Debug)]
pub struct FakeProc {
    pub start_time: u64,
    pub comm: String,
    /// /proc/PID/stat flags.
    pub flags: u64,
    /// Has pages of the device present.
    pub maps: bool,
    /// Signals on which it exits.
    pub leaves_on: Vec<i32>,
    /// Start time the pid shows once a pidfd was opened on it: the pid was recycled between
    /// the holder list and the pidfd.
    pub recycled_on_open: Option<u64>,
    /// Uses the address space of this pid (`clone(CLONE_VM)`): the same page tables, so the
    /// same pages. `None`: its own.
    pub mm_of: Option<u32>,
    /// The text of /proc/PID/cgroup (None: unreadable).
    pub cgroup: Option<String>,
    /// The `st_dev` of the file it maps (pmem0's; a dm device's for a stack).
    pub file_dev: DevId,
    /// Its pages lie this many pfns past the usual ones (on another member of a stack).
    pub pfn_shift: u64,
}

impl FakeProc {
    /// A holder that exits on SIGTERM (and SIGKILL).
    pub fn holder(comm: &str, start_time: u64) -> Self {
        Self {
            start_time,
            comm: comm.into(),
            flags: 0,
            maps: true,
            leaves_on: vec![libc::SIGTERM, libc::SIGKILL],
            recycled_on_open: None,
            mm_of: None,
            cgroup: Some("0::/dax.slice/plain.scope\n".into()),
            file_dev: DEV,
            pfn_shift: 0,
        }
    }
    /// A process sharing `pid`'s address space (holding its pages too).
    pub fn sharer(comm: &str, start_time: u64, pid: u32) -> Self {
        Self {
            mm_of: Some(pid),
            ..Self::holder(comm, start_time)
        }
    }
    /// A holder that ignores SIGTERM.
    pub fn stubborn(comm: &str, start_time: u64) -> Self {
        Self {
            leaves_on: vec![libc::SIGKILL],
            ..Self::holder(comm, start_time)
        }
    }
}

#[derive(Default)]
pub struct State {
    pub procs: BTreeMap<u32, FakeProc>,
    pub log: Vec<Call>,
    pub elapsed: Duration,
    pub mounts: Vec<Mount>,
    /// Durable writes of several records at once (`write_all`).
    pub audit_flushes: usize,
    /// Every durable write (one `write` or one `write_all`, or a `settle` that flushed):
    /// each is an fdatasync.
    pub durable_writes: usize,
    /// Records written ahead (`write_ahead`) that no flush covered yet, and whether a write
    /// failed since (then `settle` fails).
    pub ahead: Option<bool>,
    /// Mount points whose unmount fails (EBUSY).
    pub busy_mounts: Vec<String>,
    /// dm devices whose removal fails (EBUSY: still open).
    pub busy_dm: Vec<String>,
    /// Audit writes of these actions fail (as on a full disk).
    pub failing_audit: Vec<String>,
    /// Every durable audit write fails (EIO from fdatasync: the disk under the log is
    /// failing); writes ahead of a flush still go into the file.
    pub failing_flush: bool,
    pub unprivileged: bool,
    /// Signals the kernel's fence sent, not yet read through [`Fence::signals_sent`].
    pub kernel_sent: Vec<crate::event::FenceSignal>,
    /// Every audit record written, as the log file would hold it (JSON).
    pub audit_json: Vec<String>,
    /// Page tables opened (/proc/PID/pagemap), by pid: a departure's re-check on a kernel
    /// without devmap DAX entries must open none.
    pub pagemap_opens: Vec<u32>,
    /// Whole maps read (/proc/PID/maps), by pid.
    pub maps_reads: Vec<u32>,
    /// Single-vma queries (`PROCMAP_QUERY`), by pid.
    pub vma_queries: Vec<u32>,
    /// stat reads by pid through /proc/PID/stat opened afresh ([`Os::identity`],
    /// [`Procfs::stat`] and so every [`Procfs::gone`]).
    pub stat_opens: Vec<u32>,
    /// /proc/PID/cgroup reads, by pid.
    pub cgroup_reads: Vec<u32>,
    /// Reads through a pin (its stat, pagemap or maps), by pid.
    pub pin_reads: Vec<u32>,
    /// Liveness polls of a pin's pidfd, by pid.
    pub pin_polls: Vec<u32>,
}

/// The fake machine. Clones share one state.
#[derive(Clone)]
pub struct FakeOs {
    pub state: Rc<RefCell<State>>,
    base: Instant,
    self_pid: u32,
}

pub fn mount(point: &str) -> Mount {
    Mount {
        dev: DEV,
        mount_point: point.into(),
        fstype: "ext4".into(),
        source: "/dev/pmem0".into(),
        dax: DaxOption::Always,
        rtdev: None,
    }
}

/// pmem0 (fsdax, namespace0.0, pfn0.0) mounted on each of `mounts`.
pub fn topology(mounts: &[&str]) -> Topology {
    Topology {
        dm: Vec::new(),
        namespaces: vec![Namespace {
            name: "namespace0.0".into(),
            region: "region0".into(),
            mode: Mode::Fsdax,
            holder: Some("pfn0.0".into()),
            namespace_range: PhysRange {
                start: FIRST_PFN << 12,
                end: END_PFN << 12,
            },
            data_range: PhysRange {
                start: FIRST_PFN << 12,
                end: END_PFN << 12,
            },
            block: Some(("pmem0".into(), DEV)),
            chardev: None,
            align: Some(2 << 20),
            enabled: true,
            range_known: true,
        }],
        mounts: mounts.iter().map(|m| mount(m)).collect(),
    }
}

impl FakeOs {
    /// The one vma a holder of the fake has: `/mnt/pmem0/file` over `PAGES` pages.
    fn vmas(&self, pid: u32) -> io::Result<Vec<Vma>> {
        vmas_in(&self.state.borrow(), pid)
    }

    pub fn new(procs: &[(u32, FakeProc)], mounts: &[&str]) -> Self {
        let state = State {
            procs: procs.iter().cloned().collect(),
            mounts: mounts.iter().map(|m| mount(m)).collect(),
            ..Default::default()
        };
        Self {
            state: Rc::new(RefCell::new(state)),
            base: Instant::now(),
            self_pid: 4242,
        }
    }

    pub fn self_pid(&self) -> u32 {
        self.self_pid
    }

    pub fn log(&self) -> Vec<Call> {
        self.state.borrow().log.clone()
    }

    /// The log without pidfd opens: what was recorded and done.
    pub fn actions(&self) -> Vec<Call> {
        self.log()
            .into_iter()
            .filter(|c| !matches!(c, Call::PidfdOpen(_) | Call::Pin(_)))
            .collect()
    }

    pub fn fence(&self) -> FakeFence {
        FakeFence {
            state: self.state.clone(),
        }
    }

    /// What the kernel's fault program does when `pid` (`comm`) faults on `dev`, given the
    /// fence as the code under test armed it (its last fence/unfence of `dev`): the signal
    /// sent, or None (not fenced, no signal, or excluded). The same rules as `fenced()` in
    /// dax-probe-ebpf/src/fault.rs, comm compared as the kernel keeps it (15 bytes).
    pub fn fault(&self, dev: DevId, pid: u32, comm: &str) -> Option<i32> {
        let s = self.state.borrow();
        let arm = s.log.iter().rev().find_map(|c| match c {
            Call::Fence(d, arm) if *d == dev => Some(Some(arm.clone())),
            Call::Unfence(d) if *d == dev => Some(None),
            _ => None,
        })??;
        let kernel = |c: &str| c.bytes().take(15).collect::<Vec<u8>>();
        let excluded = arm.exclude.iter().any(|e| match e {
            crate::policy::config::Exclusion::Comm(c) => kernel(c) == kernel(comm),
            crate::policy::config::Exclusion::Pid(p) => *p == pid,
        });
        (arm.signal.0 != 0 && !excluded).then_some(arm.signal.0)
    }

    pub fn audit(&self) -> FakeAudit {
        FakeAudit {
            state: self.state.clone(),
            path: PathBuf::from("/fake/audit.jsonl"),
        }
    }

    pub fn procfs_box(&self) -> Box<dyn Procfs> {
        Box::new(self.clone())
    }
}

impl Procfs for FakeOs {
    fn pids(&self) -> Vec<u32> {
        self.state.borrow().procs.keys().copied().collect()
    }

    fn maps(&self, pid: u32) -> io::Result<Vec<Vma>> {
        self.state.borrow_mut().maps_reads.push(pid);
        self.vmas(pid)
    }

    fn vma_at(&self, pid: u32, addr: u64) -> io::Result<Option<Vma>> {
        self.state.borrow_mut().vma_queries.push(pid);
        Ok(self.vmas(pid)?.into_iter().find(|v| v.covers(addr)))
    }

    fn pagemap(&self, pid: u32) -> io::Result<Box<dyn PagemapSource + '_>> {
        self.state.borrow_mut().pagemap_opens.push(pid);
        let s = self.state.borrow();
        let p = s.procs.get(&pid).ok_or(io::ErrorKind::NotFound)?;
        let mm = p.mm_of.unwrap_or(pid);
        let shift = s.procs.get(&mm).map_or(p.pfn_shift, |o| o.pfn_shift);
        Ok(Box::new(FakePagemap {
            pid: mm,
            maps: p.maps,
            shift,
        }))
    }

    fn stat(&self, pid: u32) -> Option<(u64, String)> {
        self.state.borrow_mut().stat_opens.push(pid);
        let s = self.state.borrow();
        let p = s.procs.get(&pid)?;
        Some((p.start_time, p.comm.clone()))
    }

    fn same_mm(&self, a: u32, b: u32) -> Option<bool> {
        let s = self.state.borrow();
        let mm = |pid: u32| s.procs.get(&pid).map(|p| p.mm_of.unwrap_or(pid));
        Some(mm(a)? == mm(b)?)
    }

    fn cgroup(&self, pid: u32) -> io::Result<Vec<u8>> {
        self.state.borrow_mut().cgroup_reads.push(pid);
        let s = self.state.borrow();
        let p = s.procs.get(&pid).ok_or(io::ErrorKind::NotFound)?;
        Ok(p.cgroup
            .clone()
            .ok_or(io::ErrorKind::PermissionDenied)?
            .into_bytes())
    }
}

struct FakePidfd {
    state: Rc<RefCell<State>>,
    pid: u32,
    /// The process the pidfd pins: a pid recycled after the open is another process.
    start_time: u64,
}

impl Pidfd for FakePidfd {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn send(&self, sig: Signal) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        let at = s.elapsed;
        let Some(p) = s.procs.get(&self.pid) else {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        };
        if p.recycled_on_open.is_none() && p.start_time != self.start_time {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let leaves = p.leaves_on.contains(&sig.0);
        s.log.push(Call::Signal {
            pid: self.pid,
            sig: sig.0,
            at,
        });
        if leaves {
            s.procs.remove(&self.pid);
        }
        Ok(())
    }
}

/// The vmas of `pid`: its one mapping of `/mnt/pmem0/file`, or none.
fn vmas_in(s: &State, pid: u32) -> io::Result<Vec<Vma>> {
    let p = s.procs.get(&pid).ok_or(io::ErrorKind::NotFound)?;
    Ok(if p.maps {
        vec![Vma {
            start: 0x7f00_0000_0000,
            end: 0x7f00_0000_0000 + PAGES * 4096,
            shared: true,
            write: true,
            offset: 0,
            dev: p.file_dev,
            ino: 12,
            path: "/mnt/pmem0/file".into(),
        }]
    } else {
        Vec::new()
    })
}

/// A fake pin: the process at `pid` started at `start_time`, and no other.
struct FakePinned {
    state: Rc<RefCell<State>>,
    pid: u32,
    start_time: u64,
}

impl FakePinned {
    /// The pinned process, when it still holds its pid; the read is counted.
    fn alive(&self) -> Option<FakeProc> {
        let mut s = self.state.borrow_mut();
        s.pin_reads.push(self.pid);
        s.procs
            .get(&self.pid)
            .filter(|p| p.start_time == self.start_time)
            .cloned()
    }
}

impl Pidfd for FakePinned {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn send(&self, sig: Signal) -> io::Result<()> {
        FakePidfd {
            state: self.state.clone(),
            pid: self.pid,
            start_time: self.start_time,
        }
        .send(sig)
    }
}

impl Pinned for FakePinned {
    fn exited(&self) -> Option<bool> {
        let mut s = self.state.borrow_mut();
        s.pin_polls.push(self.pid);
        Some(
            s.procs
                .get(&self.pid)
                .is_none_or(|p| p.start_time != self.start_time),
        )
    }

    fn identity(&self) -> Option<(u64, String, u64)> {
        self.alive().map(|p| (p.start_time, p.comm, p.flags))
    }

    fn pagemap(&self) -> Option<Box<dyn PagemapSource + '_>> {
        let p = self.alive()?;
        let mm = p.mm_of.unwrap_or(self.pid);
        let s = self.state.borrow();
        let shift = s.procs.get(&mm).map_or(p.pfn_shift, |o| o.pfn_shift);
        Some(Box::new(FakePagemap {
            pid: mm,
            maps: p.maps,
            shift,
        }))
    }

    fn vma_at(&self, addr: u64) -> io::Result<Option<Vma>> {
        self.alive().ok_or(io::ErrorKind::NotFound)?;
        Ok(vmas_in(&self.state.borrow(), self.pid)?
            .into_iter()
            .find(|v| v.covers(addr)))
    }
}

impl Os for FakeOs {
    fn procfs(&self) -> &dyn Procfs {
        self
    }

    fn identity(&self, pid: u32) -> Option<(u64, String, u64)> {
        let (start, comm) = self.stat(pid)?;
        let flags = self.state.borrow().procs.get(&pid).map_or(0, |p| p.flags);
        Some((start, comm, flags))
    }

    fn self_pid(&self) -> u32 {
        self.self_pid
    }

    fn pidfd_open(&self, pid: u32) -> io::Result<Box<dyn Pidfd + '_>> {
        let mut s = self.state.borrow_mut();
        s.log.push(Call::PidfdOpen(pid));
        let p = s
            .procs
            .get_mut(&pid)
            .ok_or(io::Error::from_raw_os_error(libc::ESRCH))?;
        let start_time = p.start_time;
        if let Some(new) = p.recycled_on_open.take() {
            p.start_time = new;
        }
        Ok(Box::new(FakePidfd {
            state: self.state.clone(),
            pid,
            start_time,
        }))
    }

    /// The pid as it is after the open: a pid recycled on open is pinned as the new
    /// process, whose start time the caller then refuses.
    fn pin(&self, pid: u32, _proof: Option<Proof>) -> io::Result<Box<dyn Pinned>> {
        let mut s = self.state.borrow_mut();
        s.log.push(Call::Pin(pid));
        let p = s
            .procs
            .get_mut(&pid)
            .ok_or(io::Error::from_raw_os_error(libc::ESRCH))?;
        if let Some(new) = p.recycled_on_open.take() {
            p.start_time = new;
        }
        Ok(Box::new(FakePinned {
            state: self.state.clone(),
            pid,
            start_time: p.start_time,
        }))
    }

    fn write_sysfs(&self, path: &Path, value: &str) -> io::Result<()> {
        self.state
            .borrow_mut()
            .log
            .push(Call::Sysfs(path.to_path_buf(), value.into()));
        Ok(())
    }

    fn unmount(&self, mount_point: &str) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        s.log.push(Call::Unmount(mount_point.into()));
        if s.busy_mounts.iter().any(|m| m == mount_point) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        s.mounts.retain(|m| m.mount_point != mount_point);
        Ok(())
    }

    fn remove_dm(&self, name: &str) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        s.log.push(Call::DmRemove(name.into()));
        if s.busy_dm.iter().any(|d| d == name) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        Ok(())
    }

    fn mounts(&self) -> Vec<Mount> {
        self.state.borrow().mounts.clone()
    }

    fn may_enforce(&self) -> bool {
        !self.state.borrow().unprivileged
    }

    fn now(&self) -> Instant {
        self.base + self.state.borrow().elapsed
    }

    fn sleep(&self, d: Duration) {
        self.state.borrow_mut().elapsed += d;
    }
}

pub struct FakeFence {
    state: Rc<RefCell<State>>,
}

impl Fence for FakeFence {
    fn fence(&mut self, dev: DevId, arm: &FenceArm) -> anyhow::Result<()> {
        self.state
            .borrow_mut()
            .log
            .push(Call::Fence(dev, arm.clone()));
        Ok(())
    }
    fn unfence(&mut self, dev: DevId) {
        self.state.borrow_mut().log.push(Call::Unfence(dev));
    }
    fn refuses_mappings(&self) -> bool {
        true
    }
    fn signals_sent(&mut self) -> Vec<crate::event::FenceSignal> {
        std::mem::take(&mut self.state.borrow_mut().kernel_sent)
    }
}

pub struct FakeAudit {
    state: Rc<RefCell<State>>,
    path: PathBuf,
}

impl AuditSink for FakeAudit {
    fn write(&mut self, r: &Record) -> io::Result<()> {
        if let Err(e) = self.flush_fails(r).and_then(|()| self.append(r)) {
            self.failed();
            return Err(e);
        }
        self.flushed();
        Ok(())
    }
    fn write_all(&mut self, rs: &[Record]) -> io::Result<()> {
        // All or nothing, as the real log: a failing record fails the batch before any is
        // written.
        if let Some(bad) = {
            let s = self.state.borrow();
            rs.iter()
                .find(|r| s.failing_flush || s.failing_audit.iter().any(|a| a == r.action))
                .map(|r| r.action.to_string())
        } {
            self.state
                .borrow_mut()
                .log
                .push(Call::AuditFailed { action: bad });
            self.failed();
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        for r in rs {
            self.append(r)?;
        }
        self.state.borrow_mut().audit_flushes += 1;
        self.flushed();
        Ok(())
    }
    fn write_ahead(&mut self, r: &Record) -> io::Result<()> {
        self.append(r)?;
        let mut s = self.state.borrow_mut();
        s.ahead = Some(s.ahead.unwrap_or(false));
        Ok(())
    }
    fn settle(&mut self) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        match s.ahead.take() {
            None => Ok(()),
            Some(false) => {
                s.durable_writes += 1;
                Ok(())
            }
            Some(true) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

impl FakeAudit {
    /// With [`State::failing_flush`], a durable write of `r` fails (the real log then cuts
    /// the record off again: it is not in the file).
    fn flush_fails(&self, r: &Record) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        if !s.failing_flush {
            return Ok(());
        }
        s.log.push(Call::AuditFailed {
            action: r.action.into(),
        });
        Err(io::Error::from_raw_os_error(libc::EIO))
    }

    /// A durable write: an fdatasync, which covers the records written ahead too.
    fn flushed(&self) {
        let mut s = self.state.borrow_mut();
        s.durable_writes += 1;
        if s.ahead == Some(false) {
            s.ahead = None;
        }
    }

    /// A durable write failed: the records written ahead may not be on disk.
    fn failed(&self) {
        let mut s = self.state.borrow_mut();
        if s.ahead.is_some() {
            s.ahead = Some(true);
        }
    }

    /// One record into the log (made durable by the caller's count).
    fn append(&mut self, r: &Record) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        if s.failing_audit.iter().any(|a| a == r.action) {
            s.log.push(Call::AuditFailed {
                action: r.action.into(),
            });
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        s.audit_json
            .push(serde_json::to_string(r).expect("records serialize"));
        s.log.push(Call::Audit {
            action: r.action.into(),
            pid: r.pid,
            detail: r.detail.clone(),
        });
        Ok(())
    }
}

/// A scripted process's page tables: `PAGES` present pages from 0x7f00_0000_0000 when it
/// maps the device, each pid on pfns of its own.
struct FakePagemap {
    pid: u32,
    maps: bool,
    shift: u64,
}

impl PagemapSource for FakePagemap {
    fn read(&mut self, vpage: u64, out: &mut [u64]) -> io::Result<()> {
        let first = 0x7f00_0000_0000u64 >> 12;
        for (i, e) in out.iter_mut().enumerate() {
            let v = vpage + i as u64;
            *e = if self.maps && (first..first + PAGES).contains(&v) {
                (1 << 63) | (FIRST_PFN + self.shift + self.pid as u64 * PAGES + (v - first))
            } else {
                0
            };
        }
        Ok(())
    }
}

/// A file system for `badblocks::locate`: files with extents and a space map, scripted.
#[derive(Default)]
pub struct FakeSpace {
    files: Vec<crate::badblocks::locate::FileExtents>,
    recs: Vec<crate::badblocks::locate::SpaceRec>,
    refused: Option<String>,
}

impl FakeSpace {
    /// A file with extents `(logical, physical, len, shared)`.
    pub fn file(&mut self, path: &str, ino: u64, extents: &[(u64, u64, u64, bool)]) {
        self.files.push(crate::badblocks::locate::FileExtents {
            path: path.into(),
            ino,
            extents: extents
                .iter()
                .map(
                    |&(logical, physical, len, shared)| crate::badblocks::locate::Extent {
                        logical,
                        physical,
                        len,
                        shared,
                    },
                )
                .collect(),
        });
    }

    /// A record of the file system's space map.
    pub fn rec(
        &mut self,
        physical: u64,
        len: u64,
        kind: crate::badblocks::locate::SpaceKind,
        what: &str,
    ) {
        self.recs.push(crate::badblocks::locate::SpaceRec {
            physical,
            len,
            kind,
            what: what.into(),
        });
    }

    /// GETFSMAP fails from now on with `why`.
    pub fn refuse(&mut self, why: &str) {
        self.refused = Some(why.into());
    }
}

impl crate::badblocks::locate::FileSpace for FakeSpace {
    fn files(
        &self,
        _mount: &Mount,
        start: u64,
        end: u64,
    ) -> (Vec<crate::badblocks::locate::FileExtents>, Vec<String>) {
        let out = self
            .files
            .iter()
            .filter(|f| {
                f.extents
                    .iter()
                    .any(|e| e.physical < end && start < e.physical + e.len)
            })
            .cloned()
            .collect();
        (out, Vec::new())
    }

    fn fsmap(
        &self,
        _mount: &Mount,
        start: u64,
        end: u64,
    ) -> Result<Vec<crate::badblocks::locate::SpaceRec>, String> {
        if let Some(w) = &self.refused {
            return Err(w.clone());
        }
        Ok(self
            .recs
            .iter()
            .filter(|r| r.physical < end && start < r.physical + r.len)
            .cloned()
            .collect())
    }
}
