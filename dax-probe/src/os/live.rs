//! The real machine: thin wrappers over procfs, pidfds, sysfs, umount2, the BPF FENCED map
//! and the audit file.

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{AuditSink, Fence, FenceArm, Os, Pidfd};
use crate::{
    holders::scan::{LiveProc, Procfs},
    policy::{
        audit::{AuditLog, Record},
        signal::{PidFd, Signal},
    },
    privilege,
    probe::Session,
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
    fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
