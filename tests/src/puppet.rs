//! Driving `dax-workload` (a puppet process) from a scenario: it maps, touches and unmaps on
//! command, so every step happens in a real, separate process whose page tables we can read.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub const WORKLOAD: &str = "/bin/dax-workload";

pub struct Puppet {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
}

/// Page size a mapping is set up for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Huge {
    /// MADV_NOHUGEPAGE: every fault maps 4 KiB.
    Pte,
    /// 2 MiB-aligned address: PMD faults possible.
    Pmd,
}

impl Puppet {
    pub fn spawn() -> Result<Self> {
        Self::spawn_cmd(Command::new(WORKLOAD))
    }

    /// A puppet running as an unprivileged user (`uid`, and the same number as its group).
    pub fn spawn_as(uid: u32) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(WORKLOAD);
        c.uid(uid).gid(uid);
        Self::spawn_cmd(c)
    }

    fn spawn_cmd(mut cmd: Command) -> Result<Self> {
        let mut child = cmd
            .arg("puppet")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn dax-workload")?;
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let pid = child.id();
        Ok(Self {
            child,
            stdin,
            stdout,
            pid,
        })
    }

    /// Sends one command line and returns the JSON reply; an `ok: false` reply is an error.
    pub fn cmd(&mut self, line: &str) -> Result<Value> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let mut reply = String::new();
        if self.stdout.read_line(&mut reply)? == 0 {
            bail!("workload {} died on `{line}`", self.pid);
        }
        let v: Value = serde_json::from_str(&reply)
            .with_context(|| format!("workload replied non-JSON: {reply}"))?;
        if v["ok"] != true {
            bail!("workload `{line}` failed: {}", v["error"]);
        }
        Ok(v)
    }

    /// Maps `len` bytes of `path` from `offset`; returns the address.
    pub fn map(
        &mut self,
        path: &str,
        offset: u64,
        len: u64,
        shared: bool,
        huge: Huge,
    ) -> Result<u64> {
        let v = self.cmd(&format!(
            "map {path} {offset} {len} {} {}",
            if shared { "shared" } else { "private" },
            match huge {
                Huge::Pte => "pte",
                Huge::Pmd => "pmd",
            }
        ))?;
        v["addr"].as_u64().context("map reply without addr")
    }

    /// A read-only shared mapping of `len` bytes of `path` (may exceed the file).
    pub fn map_readonly(&mut self, path: &str, len: u64) -> Result<u64> {
        let v = self.cmd(&format!("map-ro {path} {len}"))?;
        v["addr"].as_u64().context("map-ro reply without addr")
    }

    /// Touches every `step` bytes of `[addr, addr+len)`; returns pages touched.
    pub fn touch(&mut self, addr: u64, len: u64, write: bool, step: u64) -> Result<u64> {
        let v = self.cmd(&format!(
            "touch {addr} {len} {} {step}",
            if write { "write" } else { "read" }
        ))?;
        v["pages"].as_u64().context("touch reply without pages")
    }

    /// Reads the first bytes of each 4 KiB page of a mapping of a file at offset 0: (pages,
    /// pages beginning with `marker`, pages still holding what `pmem::write_file` wrote).
    pub fn content(&mut self, addr: u64, len: u64, marker: &str) -> Result<(u64, u64, u64)> {
        let v = self.cmd(&format!("content {addr} {len} {marker}"))?;
        let n = |k: &str| {
            v[k].as_u64()
                .with_context(|| format!("content reply without {k}"))
        };
        Ok((n("pages")?, n("marker")?, n("own")?))
    }

    pub fn unmap(&mut self, addr: u64, len: u64) -> Result<()> {
        self.cmd(&format!("unmap {addr} {len}")).map(|_| ())
    }

    /// mremap; `mv` forces a move to a new address. Returns the new address.
    pub fn mremap(&mut self, addr: u64, old: u64, new: u64, mv: bool) -> Result<u64> {
        let v = self.cmd(&format!(
            "mremap {addr} {old} {new} {}",
            if mv { "move" } else { "inplace" }
        ))?;
        v["addr"].as_u64().context("mremap reply without addr")
    }

    /// Forks a child that keeps the mappings and idles; returns its pid.
    pub fn fork(&mut self) -> Result<u32> {
        let v = self.cmd("fork")?;
        v["child"]
            .as_u64()
            .map(|p| p as u32)
            .context("fork reply without child")
    }

    /// `clone(CLONE_VM)` without CLONE_THREAD: a child process sharing the puppet's address
    /// space (every page it maps) that idles until signalled, outliving the puppet.
    pub fn clone_vm(&mut self) -> Result<u32> {
        let v = self.cmd("clone-vm")?;
        v["child"]
            .as_u64()
            .map(|p| p as u32)
            .context("clone-vm reply without child")
    }

    /// Opens a file and keeps it open without mapping it.
    pub fn open(&mut self, path: &str) -> Result<()> {
        self.cmd(&format!("open {path}")).map(|_| ())
    }

    /// Ignores a signal from now on.
    /// Drops the page table entries of `[addr, addr + len)` (MADV_DONTNEED): the mapping
    /// stays, the next access faults again.
    pub fn dontneed(&mut self, addr: u64, len: u64) -> Result<()> {
        self.cmd(&format!("dontneed {addr} {len}")).map(|_| ())
    }

    pub fn ignore(&mut self, sig: i32) -> Result<()> {
        self.cmd(&format!("ignore {sig}")).map(|_| ())
    }

    /// Catches SIGBUS instead of dying of it, counting them (see `sigbus`).
    pub fn catch_sigbus(&mut self) -> Result<()> {
        self.cmd("catch-sigbus").map(|_| ())
    }

    /// SIGBUS caught so far and the last one's si_code.
    pub fn sigbus(&mut self) -> Result<(u64, i32)> {
        let v = self.cmd("sigbus")?;
        Ok((
            v["count"].as_u64().unwrap_or(0),
            v["code"].as_i64().unwrap_or(0) as i32,
        ))
    }

    /// madvise(MADV_HWPOISON) on a page; the kernel may kill the puppet for it (then this
    /// returns an error: the reply never comes).
    pub fn poison(&mut self, addr: u64) -> Result<Value> {
        self.cmd(&format!("poison {addr}"))
    }

    /// Whether the puppet process has exited (and how).
    pub fn status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Ends a forked child and reaps it.
    pub fn reap(&mut self, child: u32) -> Result<()> {
        self.cmd(&format!("reap {child}")).map(|_| ())
    }

    /// Asks the puppet to exit and reaps it.
    pub fn exit(mut self) -> Result<()> {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Puppet {
    fn drop(&mut self) {
        crate::sys::end_child(&mut self.child, std::time::Duration::from_secs(5));
    }
}
