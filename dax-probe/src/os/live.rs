//! The real machine: thin wrappers over procfs, pidfds, sysfs, umount2, the BPF FENCED map
//! and the audit file.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{AuditSink, Fence, FenceArm, Os, Pidfd, Pinned};
use crate::{
    holders::scan::{LiveProc, Procfs, Vma},
    policy::{
        audit::{AuditLog, Record},
        guard::Proof,
        signal::{PidFd, Signal},
    },
    privilege,
    probe::Session,
    proc::pagemap::{LivePagemap, PagemapSource},
    topology::{DevId, Mount, read_mounts},
};

/// The live machine below a root (normally `/`; tests of paths point it elsewhere).
pub struct LiveOs {
    proc: LiveProc,
    root: PathBuf,
    /// A running monitor's control socket: an unbind is asked of that agent first (its own
    /// write is the one its unbind guard lets through); written here only when no agent
    /// answers there.
    unbind_via: Option<PathBuf>,
}

impl LiveOs {
    pub fn new(root: &Path) -> Self {
        Self {
            proc: LiveProc::new(root),
            root: root.to_path_buf(),
            unbind_via: None,
        }
    }

    /// Unbinds go through the agent listening on `socket`, when one does (`drain`).
    pub fn unbind_via(mut self, socket: PathBuf) -> Self {
        self.unbind_via = Some(socket);
        self
    }
}

impl Os for LiveOs {
    fn procfs(&self) -> &dyn Procfs {
        &self.proc
    }

    fn identity(&self, pid: u32) -> Option<(u64, String, u64)> {
        let text = std::fs::read_to_string(self.proc.root.join(format!("{pid}/stat"))).ok()?;
        let (start, comm) = crate::holders::scan::parse_stat(&text)?;
        Some((start, comm, parse_stat_flags(&text).unwrap_or(0)))
    }

    fn self_pid(&self) -> u32 {
        std::process::id()
    }

    fn pidfd_open(&self, pid: u32) -> io::Result<Box<dyn Pidfd + '_>> {
        Ok(Box::new(PidFd::open(pid)?))
    }

    fn pin(&self, pid: u32, proof: Option<Proof>) -> io::Result<Box<dyn Pinned>> {
        // The pidfd first: whatever opens after it and reads as the process it pinned
        // (the caller checks the start time) is that process's.
        let pidfd = PidFd::open(pid)?;
        let dir = self.proc.root.join(pid.to_string());
        let stat = File::open(dir.join("stat"))?;
        let tables = proof
            .map(|p| {
                File::open(dir.join(match p {
                    Proof::PageTables => "pagemap",
                    Proof::Mappings => "maps",
                }))
            })
            .transpose()?;
        Ok(Box::new(LivePinned {
            pidfd,
            stat,
            tables,
            proof,
        }))
    }

    fn write_sysfs(&self, path: &Path, value: &str) -> io::Result<()> {
        if let Some(sock) = &self.unbind_via
            && path.file_name().is_some_and(|n| n == "unbind")
        {
            let req = crate::control::Request::Unbind {
                device: value.to_string(),
                path: path.to_path_buf(),
            };
            match crate::control::ask(sock, &req) {
                // No agent there: no guard either; write it ourselves.
                Ok(None) => {}
                Ok(Some(r)) if r.ok => return Ok(()),
                Ok(Some(r)) => {
                    return Err(io::Error::other(format!(
                        "the running agent ({}) refused to unbind it: {}",
                        sock.display(),
                        r.error.unwrap_or_default()
                    )));
                }
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "cannot ask the running agent ({}) to unbind it: {e}",
                        sock.display()
                    )));
                }
            }
        }
        std::fs::write(path, value)
    }

    fn unmount(&self, mount_point: &str) -> io::Result<()> {
        let c = std::ffi::CString::new(mount_point)?;
        // A mount point is a path an unprivileged user may have replaced with a symlink
        // since we listed it: never follow one.
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::UMOUNT_NOFOLLOW) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn remove_dm(&self, name: &str) -> io::Result<()> {
        crate::topology::dm::remove(&self.root, name)
    }

    fn mounts(&self) -> Vec<Mount> {
        read_mounts(&self.root)
    }

    fn may_enforce(&self) -> bool {
        privilege::can_trace() && privilege::can_read_pagemap()
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// Field 9 (`flags`) of /proc/PID/stat; the comm may hold spaces and parentheses.
pub fn parse_stat_flags(text: &str) -> Option<u64> {
    let close = text.rfind(')')?;
    // After the comm: state(3) ppid pgrp session tty_nr tpgid flags(9)
    text[close + 1..].split_whitespace().nth(6)?.parse().ok()
}

/// A holder pinned by [`LiveOs::pin`]. procfs files opened on a process answer for that
/// process only (its `struct pid` and, for pagemap and maps, its address space, taken at
/// open): its stat reads fail once it is gone, whatever took its pid since.
struct LivePinned {
    pidfd: PidFd,
    stat: File,
    /// Its pagemap (page-table proof) or its maps (mappings proof); none for a pin that
    /// only tells the process's exit.
    tables: Option<File>,
    proof: Option<Proof>,
}

impl Pidfd for LivePinned {
    fn pid(&self) -> u32 {
        self.pidfd.pid
    }
    fn send(&self, sig: Signal) -> io::Result<()> {
        self.pidfd.send(sig)
    }
}

impl Pinned for LivePinned {
    fn exited(&self) -> Option<bool> {
        crate::policy::signal::exited(&[self.pidfd.as_raw_fd()])[0]
    }

    fn pidfd_raw(&self) -> Option<std::os::fd::RawFd> {
        Some(self.pidfd.as_raw_fd())
    }

    fn identity(&self) -> Option<(u64, String, u64)> {
        // A seq_file read at offset 0 shows the file afresh.
        let mut buf = [0u8; 1024];
        let n = self.stat.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let (start, comm) = crate::holders::scan::parse_stat(text)?;
        Some((start, comm, parse_stat_flags(text).unwrap_or(0)))
    }

    fn pagemap(&self) -> Option<Box<dyn PagemapSource + '_>> {
        let tables = self.tables.as_ref()?;
        (self.proof == Some(Proof::PageTables))
            .then(|| Box::new(LivePagemap::over(tables)) as Box<dyn PagemapSource + '_>)
    }

    fn vma_at(&self, addr: u64) -> io::Result<Option<Vma>> {
        use crate::proc::procmap::{Answer, vma_at};
        let (Some(Proof::Mappings), Some(maps)) = (self.proof, &self.tables) else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        match vma_at(maps, addr)? {
            Answer::Vma(v) => Ok(Some(v)),
            Answer::None => Ok(None),
            Answer::Unsupported => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

impl Pidfd for PidFd {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn send(&self, sig: Signal) -> io::Result<()> {
        PidFd::send(self, sig)
    }
}

impl Fence for Session {
    fn fence(&mut self, dev: DevId, arm: &FenceArm) -> anyhow::Result<()> {
        let (comms, pids) = arm.split();
        Ok(self
            .fenced
            .add(dev.to_kernel(), arm.signal.0, &comms, &pids)?)
    }
    fn unfence(&mut self, dev: DevId) {
        self.fenced.remove(dev.to_kernel());
    }
    fn refuses_mappings(&self) -> bool {
        self.fence_attached()
    }
    /// For drain, whose session nobody else reads: everything the kernel submitted so far,
    /// of which only the fence's signals matter (faults and device events go).
    fn signals_sent(&mut self) -> Vec<crate::event::FenceSignal> {
        self.sync(crate::control::SYNC_WAIT);
        let topology = crate::topology::Topology::default();
        let d = crate::probe::decode::Decoder {
            topology: &topology,
            lookup: crate::probe::decode::NoLookup,
        };
        let mut out = Vec::new();
        while let Ok(rec) = self.records.try_recv() {
            if let Ok(crate::event::Event::FenceSignal(f)) = d.decode(&rec) {
                out.push(f);
            }
        }
        out
    }
}

impl AuditSink for AuditLog {
    fn write(&mut self, r: &Record) -> io::Result<()> {
        AuditLog::write(self, r)
    }
    fn write_all(&mut self, rs: &[Record]) -> io::Result<()> {
        AuditLog::write_all(self, rs)
    }
    fn write_ahead(&mut self, r: &Record) -> io::Result<()> {
        AuditLog::write_ahead(self, r)
    }
    fn settle(&mut self) -> io::Result<()> {
        AuditLog::settle(self)
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this machine's kernel: a pin reads its process through the files it opened (its
    /// start time and comm, the vma at an address its maps list), signals it through its
    /// pidfd, and reads nothing once the process is gone.
    #[test]
    fn a_pin_reads_and_signals_its_process_until_it_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        // exec'd when its maps name the binary
        let mut maps = String::new();
        for _ in 0..200 {
            maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            if maps.contains("sleep") {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let os = LiveOs::new(Path::new("/"));
        let start = os.identity(pid).unwrap().0;
        let pin = os.pin(pid, Some(Proof::Mappings)).unwrap();
        let (s, comm, flags) = pin.identity().unwrap();
        assert_eq!(
            (s, comm.as_str(), flags & super::super::PF_KTHREAD),
            (start, "sleep", 0)
        );
        let first = maps
            .lines()
            .filter_map(crate::holders::scan::parse_maps_line)
            .next()
            .unwrap();
        match pin.vma_at(first.start) {
            Ok(v) => assert_eq!(v.as_ref(), Some(&first)),
            // Before 6.11 the kernel has no PROCMAP_QUERY: the guard reads the maps.
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported),
        }
        assert!(pin.pagemap().is_none(), "pinned for the mappings proof");
        assert_eq!(pin.exited(), Some(false));
        let fd = pin.pidfd_raw().unwrap();
        assert_eq!(
            crate::policy::signal::exited(&[fd, 1 << 20]),
            [Some(false), None],
            "one poll for many; a descriptor that is not open is not judged"
        );
        pin.send(Signal(libc::SIGKILL)).unwrap();
        // A zombie (not reaped yet) has exited: its page tables are gone.
        let t = Instant::now();
        while pin.exited() != Some(true) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(pin.exited(), Some(true), "a zombie has exited");
        assert!(pin.identity().is_some(), "its stat is still there");
        child.wait().unwrap();
        assert_eq!(pin.exited(), Some(true));
        assert_eq!(pin.identity(), None, "gone and reaped");
        assert!(pin.send(Signal(libc::SIGKILL)).is_err());
        let tables = os.pin(std::process::id(), Some(Proof::PageTables)).unwrap();
        assert!(tables.pagemap().is_some());
        let bare = os.pin(std::process::id(), None).unwrap();
        assert_eq!(bare.exited(), Some(false));
        assert!(bare.pagemap().is_none() && bare.vma_at(first.start).is_err());
    }

    #[test]
    fn stat_flags_after_an_awkward_comm() {
        let stat = "2 (kthr) (x)) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat_flags(stat), Some(2129984));
        assert!(parse_stat_flags(stat).unwrap() & super::super::PF_KTHREAD != 0);
        assert_eq!(parse_stat_flags("garbage"), None);
    }

    /// One read of /proc/PID/stat gives the start time, the comm and the flags alike (the
    /// guard used to read it twice); a stat with no start time is no identity.
    #[test]
    fn identity_from_one_stat() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("proc/2");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("stat"),
            "2 (kthr) (x)) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0",
        )
        .unwrap();
        let os = LiveOs::new(root.path());
        let (start, comm, flags) = os.identity(2).unwrap();
        assert_eq!((start, comm.as_str()), (5, "kthr) (x)"));
        assert!(flags & super::super::PF_KTHREAD != 0);
        std::fs::write(dir.join("stat"), "2 (short) S 0").unwrap();
        assert_eq!(os.identity(2), None);
        assert_eq!(os.identity(3), None);
    }
}
