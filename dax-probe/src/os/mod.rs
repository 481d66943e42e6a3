//! The OS boundary: everything the agent does *to* the machine goes through these traits, so
//! the departure pipeline and the guard run against a fake in unit tests and against the
//! kernel in production.
//!
//! - [`Os`]: reading another process (page tables, maps and stat through [`Procfs`], stat
//!   flags), pidfds and signals through them, sysfs writes, unmounts, mount listing,
//!   privilege and the clock.
//! - [`Fence`]: the kernel's FENCED map (devices whose new mappings are refused and whose
//!   faults are signalled).
//! - [`AuditSink`]: the audit log, so a test can make a write fail.
//!
//! [`live`] wraps today's code (procfs, `policy::signal::PidFd`, `probe::Session`,
//! `policy::audit::AuditLog`); `fake` records every call in one ordered log.

#[cfg(test)]
pub mod fake;
pub mod live;

use std::{
    io,
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    holders::scan::{Procfs, Vma},
    policy::{audit::Record, config::Exclusion, guard::Proof, signal::Signal},
    proc::pagemap::PagemapSource,
    topology::{DevId, Mount},
};

pub use live::LiveOs;

/// `PF_KTHREAD` in /proc/PID/stat's flags (field 9).
pub const PF_KTHREAD: u64 = 0x0020_0000;

/// A process pinned by a pidfd: a signal reaches exactly the process opened, never a later
/// process that reused its pid.
pub trait Pidfd {
    fn pid(&self) -> u32;
    fn send(&self, sig: Signal) -> io::Result<()>;
}

/// A holder opened once, when it became one: a pidfd and, opened after it, the files a
/// departure re-reads (its stat, and its pagemap or maps). All of them name that process
/// for as long as they are open: a recycled pid is another process, whose stat read
/// through this pin fails, and an `exec` leaves the page tables the pin reads empty (the
/// guard then reads the process afresh). A departure re-checks a pinned holder with one
/// read of each and signals it through the pidfd: nothing to open under the clock.
pub trait Pinned: Pidfd {
    /// Has the pinned process exited (a zombie included)? `None`: not known.
    fn exited(&self) -> Option<bool>;
    /// The pidfd itself, so many pins are asked at once
    /// ([`crate::policy::signal::exited`]); `None` where there is none (test doubles),
    /// which [`Pinned::exited`] answers for.
    fn pidfd_raw(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// (start time, comm, flags) as /proc/PID/stat says now, read through the open file;
    /// `None`: the process is gone.
    fn identity(&self) -> Option<(u64, String, u64)>;
    /// Its page tables, when pinned for the page-table proof.
    fn pagemap(&self) -> Option<Box<dyn PagemapSource + '_>>;
    /// The vma covering `addr` (`PROCMAP_QUERY` on the open maps), when pinned for the
    /// mappings proof. An error (no such ioctl, nothing pinned) sends the guard to the
    /// whole maps.
    fn vma_at(&self, addr: u64) -> io::Result<Option<Vma>>;
}

/// What the agent reads from and does to the machine.
pub trait Os {
    /// Page tables (pagemap), maps and stat of other processes.
    fn procfs(&self) -> &dyn Procfs;
    /// (start time, comm, `flags` (`PF_KTHREAD`, …)) of `pid`, from one read of
    /// /proc/PID/stat. `None`: gone. Flags unknown read as 0.
    fn identity(&self, pid: u32) -> Option<(u64, String, u64)>;
    /// Our own pid: the agent never signals itself.
    fn self_pid(&self) -> u32;
    fn pidfd_open(&self, pid: u32) -> io::Result<Box<dyn Pidfd + '_>>;
    /// Pins `pid` ahead of a departure (see [`Pinned`]): its pidfd first, then its stat
    /// and, for `proof`, its pagemap (page tables) or its maps (mappings); no `proof`: a
    /// pin to tell its exit only. The caller checks the start time through the pin
    /// afterwards.
    fn pin(&self, pid: u32, proof: Option<Proof>) -> io::Result<Box<dyn Pinned>>;
    /// Writes `value` to a sysfs attribute (`…/driver/unbind`).
    fn write_sysfs(&self, path: &Path, value: &str) -> io::Result<()>;
    /// Unmounts `mount_point` without following symlinks (`UMOUNT_NOFOLLOW`).
    fn unmount(&self, mount_point: &str) -> io::Result<()>;
    /// Removes the device-mapper device `name` (`DM_DEV_REMOVE`).
    fn remove_dm(&self, name: &str) -> io::Result<()>;
    /// The mounts of our mount namespace, now.
    fn mounts(&self) -> Vec<Mount>;
    /// May we fence and signal: eBPF (root or CAP_BPF+CAP_PERFMON) and pfns in pagemap
    /// (CAP_SYS_ADMIN)?
    fn may_enforce(&self) -> bool;
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration);
}

/// What the kernel's fence does to a task that faults on a fenced device: the policy's
/// signal, to everyone but the excluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceArm {
    /// The rule's first signal.
    pub signal: Signal,
    /// The rule's exclusions, PID 1 and the agent itself: never signalled by the fence.
    pub exclude: Vec<Exclusion>,
}

impl FenceArm {
    /// Command names, and pids, the fence must not signal.
    pub fn split(&self) -> (Vec<String>, Vec<u32>) {
        let mut comms = Vec::new();
        let mut pids = Vec::new();
        for e in &self.exclude {
            match e {
                Exclusion::Comm(c) => comms.push(c.clone()),
                Exclusion::Pid(p) => pids.push(*p),
            }
        }
        (comms, pids)
    }
}

/// The kernel's fence: new mappings of a fenced device are refused (BPF LSM, when active)
/// and faults on it are signalled (as `arm` says).
pub trait Fence {
    fn fence(&mut self, dev: DevId, arm: &FenceArm) -> anyhow::Result<()>;
    fn unfence(&mut self, dev: DevId);
    /// Does the kernel refuse new mappings (the BPF LSM program is attached)?
    fn refuses_mappings(&self) -> bool;
    /// The signals the fence sent since the last call, as the kernel reported them (after
    /// each: the fault program cannot wait). Where nobody reads the kernel's reports (the
    /// monitor's event loop reads them itself), none.
    fn signals_sent(&mut self) -> Vec<crate::event::FenceSignal> {
        Vec::new()
    }
}

/// Where audit records go. `write` returns only once the record is durable.
pub trait AuditSink {
    fn write(&mut self, r: &Record) -> io::Result<()>;
    /// Writes `rs` as one durable unit (one write, one fdatasync): all of them, or on an
    /// error none.
    fn write_all(&mut self, rs: &[Record]) -> io::Result<()>;
    /// Writes `r` into the log without waiting for the disk (see
    /// [`crate::policy::audit::AuditLog::write_ahead`]): the next durable write flushes it.
    fn write_ahead(&mut self, r: &Record) -> io::Result<()>;
    /// Are the records written ahead on disk? Flushes them if nothing did; an error when a
    /// write or flush after them failed.
    fn settle(&mut self) -> io::Result<()>;
    fn path(&self) -> &Path;
}
