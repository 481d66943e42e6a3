//! Holder-map scenarios: after every step of a mapping's life, the agent's holder set (from
//! the running monitor) and its one-shot scan must both equal the kernel's page tables:
//! zero missing, zero extra.

use std::{os::fd::AsRawFd, path::Path, time::Duration};

use anyhow::{Context, Result};
use dax_probe::probe::plan::Concern;
use serde_json::json;

use super::{Checked, Env, Target};
use crate::{
    agent::{Line, Monitor},
    pmem,
    puppet::{Huge, Puppet},
    sys,
    truth::{DaxSpace, Step, step},
};

const MIB: u64 = 1 << 20;

/// Runs checks and turns them into a verdict.
struct Steps {
    space: DaxSpace,
    steps: Vec<Step>,
    notes: Vec<String>,
    ok: bool,
}

impl Steps {
    fn new(env: &Env) -> Self {
        Self {
            space: env.space(),
            steps: Vec::new(),
            notes: Vec::new(),
            ok: true,
        }
    }

    fn check(&mut self, label: &str) -> Result<()> {
        let s = step(label, &self.space)?;
        self.steps.push(s);
        Ok(())
    }

    /// An extra condition of the scenario.
    fn require(&mut self, what: &str, holds: bool) {
        if !holds {
            self.ok = false;
            self.notes.push(format!("not true: {what}"));
        }
    }

    fn done(self, monitor: Monitor) -> Result<Checked> {
        let out = monitor.stop()?;
        let summary = out.summary().cloned().unwrap_or_default();
        let exact = self.steps.iter().all(Step::exact);
        let nonzero = self.steps.iter().any(|s| s.kernel > 0);
        let mut details: Vec<String> = self
            .steps
            .iter()
            .filter(|s| !s.exact())
            .map(|s| {
                format!(
                    "{} [answered by {}]{}",
                    s.line(),
                    s.source,
                    s.example
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        details.extend(self.notes);
        if out.exit_code != Some(0) {
            details.push(format!(
                "agent exit {:?}: {}",
                out.exit_code,
                out.stderr.trim()
            ));
        }
        let passed = exact && nonzero && self.ok && out.exit_code == Some(0);
        Ok(Checked {
            passed,
            summary: self
                .steps
                .iter()
                .map(|s| {
                    format!(
                        "{}: {}/{} pages (missing {}, extra {})",
                        s.label,
                        s.monitor,
                        s.kernel,
                        s.monitor_missing + s.scan_missing,
                        s.monitor_extra + s.scan_extra
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            counts: json!({
                "steps": self.steps.iter().map(Step::json).collect::<Vec<_>>(),
                "agent_drift": {"missing": summary.drift_missing, "extra": summary.drift_extra},
                "dropped": summary.dropped,
            }),
            details,
        })
    }
}

fn file(env: &Env, t: Target, name: &str, len: u64) -> Result<String> {
    let fs = env.fs(t).with_context(|| format!("{t} not prepared"))?;
    let dir = format!("{}/holders", fs.mnt);
    std::fs::create_dir_all(&dir)?;
    let path = format!("{dir}/{name}");
    pmem::write_file(Path::new(&path), len as usize)?;
    Ok(path)
}

fn tag(t: Target, what: &str) -> String {
    format!("{what}-{t}")
}

pub fn map_before_agent(env: &Env, t: Target) -> Result<Checked> {
    let f = file(env, t, "before-agent", 12 * MIB)?;
    let mut p = Puppet::spawn()?;
    let a = p.map(&f, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(a, 4 * MIB, false, 4096)?;
    let b = p.map(&f, 4 * MIB, 8 * MIB, true, Huge::Pmd)?;
    p.touch(b, 8 * MIB, false, 4096)?;
    let m = Monitor::start(&tag(t, "before-agent"), &[])?;
    let mut s = Steps::new(env);
    s.check("agent started after the mappings")?;
    p.exit()?;
    s.check("mapper exited")?;
    s.done(m)
}

pub fn fork_inherit(env: &Env, t: Target) -> Result<Checked> {
    let shared = file(env, t, "fork-shared", 4 * MIB)?;
    let private = file(env, t, "fork-private", 4 * MIB)?;
    let m = Monitor::start(&tag(t, "fork"), &[])?;
    let mut s = Steps::new(env);
    let mut p = Puppet::spawn()?;
    let a = p.map(&shared, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(a, 4 * MIB, false, 4096)?;
    let b = p.map(&private, 0, 4 * MIB, false, Huge::Pte)?;
    p.touch(b, 4 * MIB, false, 4096)?;
    // One private write gives the vma an anon_vma: fork then copies its page tables, DAX
    // entries included, into the child.
    p.touch(b, 4096, true, 4096)?;
    s.check("parent mapped")?;
    let child = p.fork()?;
    s.check("after fork")?;
    let kernel_child = crate::truth::kernel_pages(&s.space)?
        .iter()
        .filter(|(pid, _, _)| *pid == child)
        .count();
    s.notes.push(format!(
        "the child holds {kernel_child} inherited DAX pages per pagemap"
    ));
    s.require(
        "the child inherited DAX pages it never faulted",
        kernel_child > 0,
    );
    p.reap(child)?;
    s.check("child exited")?;
    p.exit()?;
    s.check("parent exited")?;
    s.done(m)
}

pub fn exit(env: &Env, t: Target) -> Result<Checked> {
    let f = file(env, t, "exit", 4 * MIB)?;
    let m = Monitor::start(&tag(t, "exit"), &[])?;
    let mut s = Steps::new(env);
    let mut a = Puppet::spawn()?;
    let mut b = Puppet::spawn()?;
    for p in [&mut a, &mut b] {
        let addr = p.map(&f, 0, 4 * MIB, true, Huge::Pte)?;
        p.touch(addr, 4 * MIB, false, 4096)?;
    }
    s.check("two processes mapped")?;
    // SAFETY: our child.
    unsafe { libc::kill(a.pid as i32, libc::SIGKILL) };
    drop(a); // reaps it
    s.check("one killed with SIGKILL")?;
    b.exit()?;
    s.check("the other exited")?;
    s.done(m)
}

pub fn partial_munmap(env: &Env, t: Target) -> Result<Checked> {
    let f = file(env, t, "partial", 12 * MIB)?;
    let m = Monitor::start(&tag(t, "partial"), &[])?;
    let mut s = Steps::new(env);
    let mut p = Puppet::spawn()?;
    let a = p.map(&f, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(a, 4 * MIB, false, 4096)?;
    let b = p.map(&f, 4 * MIB, 8 * MIB, true, Huge::Pmd)?;
    p.touch(b, 8 * MIB, false, 4096)?;
    s.check("mapped")?;
    p.unmap(a + MIB, MIB)?;
    s.check("1 MiB unmapped from the middle of the 4K mapping")?;
    p.unmap(b + 2 * MIB + MIB / 2, MIB)?;
    s.check("1 MiB unmapped inside a 2M mapping")?;
    p.exit()?;
    s.check("exited")?;
    s.done(m)
}

pub fn mremap(env: &Env, t: Target) -> Result<Checked> {
    let f = file(env, t, "mremap", 4 * MIB)?;
    let m = Monitor::start(&tag(t, "mremap"), &[])?;
    let mut s = Steps::new(env);
    let mut p = Puppet::spawn()?;
    let a = p.map(&f, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(a, 4 * MIB, false, 4096)?;
    s.check("mapped")?;
    let b = p.mremap(a, 4 * MIB, 4 * MIB, true)?;
    s.require("mremap moved the mapping", b != a);
    s.check("moved by mremap")?;
    p.mremap(b, 4 * MIB, 2 * MIB, false)?;
    s.check("shrunk in place by mremap")?;
    p.exit()?;
    s.check("exited")?;
    s.done(m)
}

pub fn private_cow(env: &Env, t: Target) -> Result<Checked> {
    let f = file(env, t, "cow", 4 * MIB)?;
    let m = Monitor::start(&tag(t, "cow"), &[])?;
    let mut s = Steps::new(env);
    let mut p = Puppet::spawn()?;
    let a = p.map(&f, 0, 4 * MIB, false, Huge::Pte)?;
    p.touch(a, 4 * MIB, false, 4096)?;
    s.check("private mapping read")?;
    let before = s.steps.last().map(|x| x.kernel).unwrap_or(0);
    p.touch(a + MIB, 16 * 4096, true, 4096)?;
    s.check("16 pages written (copied to RAM)")?;
    let after = s.steps.last().map(|x| x.kernel).unwrap_or(0);
    s.require("the 16 written pages left pmem", before == after + 16);
    p.exit()?;
    s.check("exited")?;
    s.done(m)
}

pub fn truncate(env: &Env, t: Target) -> Result<Checked> {
    let f = file(env, t, "truncate", 8 * MIB)?;
    let m = Monitor::start(&tag(t, "truncate"), &[])?;
    let mut s = Steps::new(env);
    let mut p = Puppet::spawn()?;
    let a = p.map(&f, 0, 8 * MIB, true, Huge::Pte)?;
    p.touch(a, 8 * MIB, false, 4096)?;
    s.check("mapped")?;
    // Another process (this one) cuts the file under the mapper.
    let fh = std::fs::OpenOptions::new().write(true).open(&f)?;
    fh.set_len(4 * MIB)?;
    s.check("file truncated to half by another process")?;
    // DAX truncate breaks every layout of the file (all its PTEs go); fault the remaining
    // half back in so the hole punch has something to take away.
    p.touch(a, 4 * MIB, false, 4096)?;
    s.check("remaining half touched again")?;
    // SAFETY: valid fd; punching a hole keeps the size.
    let rc = unsafe {
        libc::fallocate(
            fh.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            MIB as i64,
            MIB as i64,
        )
    };
    s.require("hole punch succeeded", rc == 0);
    s.check("1 MiB hole punched by another process")?;
    p.exit()?;
    s.check("exited")?;
    s.done(m)
}

pub fn shared_by_two(env: &Env, t: Target) -> Result<Checked> {
    let f = file(env, t, "shared", 4 * MIB)?;
    let m = Monitor::start(&tag(t, "shared"), &[])?;
    let mut s = Steps::new(env);
    let mut a = Puppet::spawn()?;
    let mut b = Puppet::spawn()?;
    for p in [&mut a, &mut b] {
        let addr = p.map(&f, 0, 4 * MIB, true, Huge::Pte)?;
        p.touch(addr, 4 * MIB, false, 4096)?;
    }
    s.check("two processes map one file")?;
    let both = crate::truth::agent_pages(false)?.0;
    let shared_pfns = {
        let mut by_pfn = std::collections::HashMap::<u64, usize>::new();
        for (_, _, pfn) in &both {
            *by_pfn.entry(*pfn).or_default() += 1;
        }
        by_pfn.values().filter(|&&n| n == 2).count()
    };
    s.require("every page has both holders", shared_pfns == 1024);
    a.exit()?;
    s.check("one of them exited")?;
    b.exit()?;
    s.check("both exited")?;
    s.done(m)
}

/// xfs: two files sharing extents (FICLONE), one pfn held through both.
pub fn reflinked_files(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fs(t).context("xfs not prepared")?;
    if !fs.reflink {
        // A fact about this kernel: DAX on a reflink-capable xfs is refused at mount.
        return Ok(Checked {
            passed: true,
            summary: "this kernel refuses DAX on xfs with reflink (fact checked at mount): \
                      no shared extents to map"
                .into(),
            counts: json!({"reflink_dax": false}),
            details: Vec::new(),
        });
    }
    let a = file(env, t, "reflink-a", 4 * MIB)?;
    let b = a.replace("reflink-a", "reflink-b");
    {
        let src = std::fs::File::open(&a)?;
        let dst = std::fs::File::create(&b)?;
        const FICLONE: libc::c_ulong = 0x4004_9409;
        // SAFETY: valid fds; FICLONE shares src's extents with dst.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
        anyhow::ensure!(rc == 0, "FICLONE: {}", std::io::Error::last_os_error());
        dst.sync_all()?;
    }
    let m = Monitor::start(&tag(t, "reflink"), &[])?;
    let mut s = Steps::new(env);
    let mut p = Puppet::spawn()?;
    let x = p.map(&a, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(x, 4 * MIB, false, 4096)?;
    let y = p.map(&b, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(y, 4 * MIB, false, 4096)?;
    s.check("one process maps two reflinked files")?;
    let pages = crate::truth::kernel_pages(&s.space)?;
    let mut by_pfn = std::collections::HashMap::<u64, usize>::new();
    for (_, _, pfn) in &pages {
        *by_pfn.entry(*pfn).or_default() += 1;
    }
    let doubly = by_pfn.values().filter(|&&n| n >= 2).count();
    s.notes
        .push(format!("{doubly} pfns are mapped through both files"));
    s.require(
        "the reflinked files share pfns in the page tables",
        doubly > 0,
    );
    // The agent names both files for one shared pfn.
    if let Some((&pfn, _)) = by_pfn.iter().find(|(_, n)| **n >= 2) {
        let (code, out, _) = crate::agent::run_once(&["holders", &format!("{pfn:#x}"), "--json"])?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let files = v["holders"].as_array().map(|a| a.len()).unwrap_or(0);
        s.require(
            &format!("holders {pfn:#x} lists two files (got {files}, exit {code:?})"),
            files == 2,
        );
    }
    p.exit()?;
    s.check("exited")?;
    s.done(m)
}

pub fn devdax(env: &Env, _t: Target) -> Result<Checked> {
    let d = env.devdax.as_ref().context("devdax not prepared")?;
    let m = Monitor::start("devdax", &[])?;
    let mut s = Steps::new(env);
    let mut p = Puppet::spawn()?;
    let a = p.map(&d.dev_path(), 0, 8 * MIB, true, Huge::Pmd)?;
    p.touch(a, 8 * MIB, false, 4096)?;
    s.check("device-dax mapped and touched")?;
    p.unmap(a + 2 * MIB, 2 * MIB)?;
    s.check("2 MiB unmapped")?;
    p.exit()?;
    s.check("exited")?;
    s.done(m)
}

/// device_dax loaded after the agent started: the agent notices, attaches its device-dax
/// fault probes (instead of finding such mappings only at the next reconcile), and the
/// holder map is exact from the first fault.
pub fn module_late(env: &Env, _t: Target) -> Result<Checked> {
    let d = env.devdax.as_ref().context("devdax not prepared")?;
    let module = std::fs::read_to_string("/etc/dax-probe/modules")?
        .lines()
        .find(|l| {
            let f = l.rsplit('/').next().unwrap_or("");
            f == "device_dax.ko" || f.starts_with("device_dax.ko.")
        })
        .map(str::to_string)
        .context("device_dax is not among the VM's modules")?;
    sys::unload_module("device_dax")?;
    let dev = d.dev_path();
    sys::wait_for(Duration::from_secs(10), || !Path::new(&dev).exists());
    let m = Monitor::start("module-late", &[])?;
    let attached = std::fs::read_to_string(&m.out)?;
    let before = attached
        .lines()
        .find_map(|l| match serde_json::from_str::<Line>(l) {
            Ok(Line::Attached(a)) => Some(a),
            _ => None,
        })
        .and_then(|a| {
            a.hooks
                .into_iter()
                .find(|h| h.concern == Concern::DevdaxFault)
        });
    sys::load_module(Path::new(&module))?;
    let back = sys::wait_for(Duration::from_secs(15), || Path::new(&dev).exists());
    let upgraded = sys::wait_for(Duration::from_secs(15), || {
        std::fs::read_to_string(&m.out)
            .map(|t| {
                t.lines().any(|l| {
                    matches!(serde_json::from_str::<Line>(l),
                        Ok(Line::HooksChanged(u)) if u.concern == Concern::DevdaxFault)
                })
            })
            .unwrap_or(false)
    });
    let mut s = Steps::new(env);
    s.require(
        "before device_dax loaded, device-dax faults had no kernel hook",
        before
            .as_ref()
            .is_none_or(|h| h.userspace || h.chosen.is_none()),
    );
    s.require(&format!("{dev} came back once device_dax loaded"), back);
    s.require(
        "the agent announced a kernel hook for device-dax faults within 15 s",
        upgraded,
    );
    let mut p = Puppet::spawn()?;
    let a = p.map(&dev, 0, 8 * MIB, true, Huge::Pmd)?;
    p.touch(a, 8 * MIB, false, 4096)?;
    // Faults seen as events, not found by a reconcile: the new probes are live.
    let faults = m.wait_for_faults(p.pid, 4, Duration::from_secs(10));
    s.require(
        "the agent saw the puppet's device-dax faults as events",
        faults,
    );
    s.check("device-dax mapped after device_dax loaded")?;
    p.exit()?;
    s.check("exited")?;
    s.notes.push(format!("devdax hook before: {before:?}"));
    s.done(m)
}
