//! A process sharing a holder's address space without being its thread
//! (`clone(CLONE_VM|SIGCHLD)`): listed as a holder beside it, still listed (and the parent
//! not) after the parent exits, and signalled when the device departs under enforcement.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Checked, Env, Target};
use crate::{
    agent::{Monitor, run_once},
    pagemap, pmem,
    puppet::{Huge, Puppet},
    sys,
};

const MIB: u64 = 1 << 20;
const PAGES: u64 = MIB >> 12;

/// `holders FILE` as the running monitor answers it: (source, (pid, pages) per row).
fn holders_of(path: &str) -> Result<(String, Vec<(u32, u64)>)> {
    let (code, out, err) = run_once(&["holders", path, "--json"])?;
    anyhow::ensure!(
        matches!(code, Some(0) | Some(1)),
        "holders exited {code:?}: {}",
        err.trim()
    );
    let v: Value = serde_json::from_str(out.trim()).with_context(|| format!("holders: {out}"))?;
    let rows = v["holders"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["pid"].as_u64().unwrap_or(0) as u32,
                r["pages"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    Ok((v["source"].as_str().unwrap_or("?").to_string(), rows))
}

/// Has `pid` exited (gone, or a zombie waiting for init)?
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|st| st == "Z" || st == "X")
    })
}

/// Kills the clone child if the scenario ends before the enforcement did.
struct Child(u32);

impl Drop for Child {
    fn drop(&mut self) {
        if !exited(self.0) {
            // SAFETY: our puppet's child, still running.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

pub fn run(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "clone-vm")?;
    let path = format!("{}/clone-vm", fs.mnt);
    pmem::write_file(Path::new(&path), MIB as usize)?;
    let (policy, audit) = super::departure::signal_policy("clone-vm", &fs.dev.block, "KILL", "1s")?;
    let audit = audit.as_str();
    let m = Monitor::start(
        &format!("clone-vm-{t}"),
        &["--enforce", "--policy", &policy, "--audit-log", audit],
    )?;
    let mut bad = Vec::new();
    let mut check = |what: &str, holds: bool, got: String| {
        if !holds {
            bad.push(format!("{what}: {got}"));
        }
    };

    let mut p = Puppet::spawn()?;
    let parent = p.pid;
    let a = p.map(&path, 0, MIB, true, Huge::Pte)?;
    p.touch(a, MIB, false, 4096)?;
    let child = Child(p.clone_vm()?);
    // Ground truth: both processes' page tables (one address space) map the file's pfns.
    let pp = pagemap::pfns(parent, a, MIB)?;
    let cp = pagemap::pfns(child.0, a, MIB)?;
    let present = pp.iter().filter(|p| p.is_some()).count() as u64;
    check(
        "the kernel shows the same pfns in both processes' pagemaps",
        present == PAGES && pp == cp,
        format!(
            "{present} pages present in the parent, equal in the child: {}",
            pp == cp
        ),
    );
    let (source, rows) = holders_of(&path)?;
    check(
        "the monitor lists the parent and the CLONE_VM child, each with every page",
        source == "monitor" && rows.contains(&(parent, PAGES)) && rows.contains(&(child.0, PAGES)),
        format!(
            "source {source}, rows {rows:?} (parent {parent}, child {})",
            child.0
        ),
    );
    p.exit()?;
    sys::wait_for(Duration::from_secs(2), || exited(parent));
    let cp = pagemap::pfns(child.0, a, MIB)?;
    let still = cp.iter().filter(|p| p.is_some()).count() as u64;
    let (source, after) = holders_of(&path)?;
    check(
        "after the parent exits the child is still listed with its pages, the parent not",
        source == "monitor" && after == [(child.0, still)] && still == PAGES,
        format!("source {source}, rows {after:?}, kernel: child maps {still} pages"),
    );

    pmem::unbind_fsdax(&fs.dev)?;
    let killed = sys::wait_for(Duration::from_secs(5), || exited(child.0));
    let out = m.stop()?;
    check(
        "the enforcement killed the child",
        killed,
        "the child still runs 5 s after the unbind".into(),
    );
    let dep = out.departing(&fs.dev.block);
    let dep_pids: Vec<u32> = dep
        .as_ref()
        .map(|d| d.holders.iter().map(|h| h.pid).collect())
        .unwrap_or_default();
    check(
        "device_departing lists the child and not the dead parent",
        dep_pids == [child.0],
        format!("departing holders {dep_pids:?}"),
    );
    let signalled = out
        .enforcement()
        .any(|a| a.pid == child.0 && a.action == "signal");
    check(
        "an enforcement line signals the child",
        signalled,
        format!("{:?}", out.of_type("enforcement").collect::<Vec<_>>()),
    );
    let log = std::fs::read_to_string(audit).unwrap_or_default();
    check(
        "the audit log records the signal to the child before it was sent",
        log.lines().any(|l| {
            l.contains("\"action\":\"signal\"") && l.contains(&format!("\"pid\":{}", child.0))
        }),
        log.clone(),
    );
    Ok(Checked {
        passed: bad.is_empty(),
        summary: format!(
            "parent {parent} and CLONE_VM child {} listed with {PAGES} pages each; after the \
             parent exited only the child; the unbind's enforcement {} it",
            child.0,
            if killed { "killed" } else { "did not kill" }
        ),
        counts: json!({"pages": PAGES, "holders_before_exit": rows.len(), "holders_after_exit": after.len()}),
        details: bad,
    })
}
