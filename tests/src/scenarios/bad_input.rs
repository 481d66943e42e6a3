//! bad-input: the agent's refusals. Every bad condition must give a clear message and its own
//! exit code, and no run — failed, killed or stopped — may leave a program in the kernel.
//! A full ring buffer must be counted exactly: delivered + dropped = faults the kernel saw.

use std::{os::unix::process::CommandExt, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result};
use serde_json::json;

use super::{Checked, DaxFs, Env};
use crate::{
    agent::{AGENT, Monitor, run_once},
    pmem,
    puppet::{Huge, Puppet},
    sys,
};

/// Programs of ours still loaded (kernel names are truncated to 15 characters).
fn ours_loaded() -> Result<usize> {
    Ok(sys::bpf_prog_names()?
        .iter()
        .filter(|n| n.starts_with("dax_"))
        .count())
}

struct Checks {
    ok: Vec<String>,
    bad: Vec<String>,
}

impl Checks {
    fn check(&mut self, what: &str, pass: bool, got: String) {
        if pass {
            self.ok.push(what.to_string());
        } else {
            self.bad.push(format!("{what}: {got}"));
        }
    }
}

pub fn run(env: &Env, fs: &DaxFs) -> Result<Checked> {
    let mut c = Checks {
        ok: Vec::new(),
        bad: Vec::new(),
    };

    // Not root: refused before touching the kernel, pointing at sudo.
    let out = Command::new(AGENT)
        .args(["monitor"])
        .uid(65534)
        .gid(65534)
        .output()
        .context("run agent as nobody")?;
    let err = String::from_utf8_lossy(&out.stderr);
    c.check(
        "not root -> exit 77 naming sudo",
        out.status.code() == Some(77) && err.contains("sudo"),
        format!("exit {:?}: {}", out.status.code(), err.trim()),
    );

    // No BTF.
    let (code, _, err) = run_once(&["monitor", "--btf", "/nonexistent/vmlinux"])?;
    c.check(
        "no BTF -> exit 69 naming CONFIG_DEBUG_INFO_BTF",
        code == Some(69) && err.contains("CONFIG_DEBUG_INFO_BTF"),
        format!("exit {code:?}: {}", err.trim()),
    );

    // No DAX device: observed before the VM set its namespaces up (raw pmem only).
    match &env.before_setup_monitor {
        Some((code, err)) => c.check(
            "no DAX device -> exit 66 suggesting --wait",
            *code == Some(66) && err.contains("no DAX device") && err.contains("--wait"),
            format!("exit {code:?}: {}", err.trim()),
        ),
        None => c.check("no DAX device", false, "pre-setup run missing".into()),
    }

    // Bad ring size: usage error, nothing loaded.
    let (code, _, err) = run_once(&["monitor", "--ring-size-kib", "3"])?;
    c.check(
        "ring size not a power of two -> exit 2",
        code == Some(2) && err.contains("power of two"),
        format!("exit {code:?}: {}", err.trim()),
    );

    // No tracefs: not needed, the monitor attaches anyway and doctor says so.
    let tracefs = "/sys/kernel/tracing";
    let had_tracefs = Path::new(&format!("{tracefs}/events")).is_dir();
    if had_tracefs {
        sys::umount(tracefs)?;
    }
    let (code, out, _) = run_once(&["monitor", "--json", "--duration", "2"])?;
    c.check(
        "no tracefs -> monitor still attaches",
        code == Some(0) && out.contains("\"type\":\"attached\""),
        format!("exit {code:?}: {}", out.lines().next().unwrap_or("")),
    );
    let (_, doc, _) = run_once(&["doctor"])?;
    c.check(
        "no tracefs -> doctor says not mounted, not needed",
        doc.contains("not mounted (not needed"),
        doc.lines()
            .find(|l| l.starts_with("tracefs"))
            .unwrap_or("")
            .to_string(),
    );
    if had_tracefs {
        sys::mount("tracefs", tracefs, "tracefs", "")?;
    }

    let after_failures = ours_loaded()?;
    c.check(
        "failed runs leave no program loaded",
        after_failures == 0,
        format!("{after_failures} loaded"),
    );

    // Killed with SIGKILL while attached: the kernel must drop everything (no pins).
    let m = Monitor::start("killed", &[])?;
    let while_running = ours_loaded()?;
    let pid = m.pid().unwrap();
    // SAFETY: our child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    drop(m);
    let gone = sys::wait_for(Duration::from_secs(5), || {
        ours_loaded().is_ok_and(|n| n == 0)
    });
    c.check(
        "SIGKILLed agent leaves no program loaded",
        while_running > 0 && gone,
        format!("{while_running} loaded while running, gone afterwards: {gone}"),
    );

    // Full ring buffer: a 4 KiB ring, a stopped reader and 2048 faults, one record each
    // (`--per-fault`: coalesced, they would be one record). Every fault must be either
    // delivered or counted as dropped, and the operator told.
    let file = format!("{}/bad-input-ring", fs.mnt);
    pmem::write_file(Path::new(&file), 8 << 20)?;
    let m = Monitor::start("ring", &["--ring-size-kib", "4", "--per-fault"])?;
    let mpid = m.pid().unwrap() as i32;
    let mut p = Puppet::spawn()?;
    let a = p.map(&file, 0, 8 << 20, true, Huge::Pte)?;
    // SAFETY: our child; stopped so the ring cannot drain while faults pour in.
    unsafe { libc::kill(mpid, libc::SIGSTOP) };
    let touched = p.touch(a, 8 << 20, false, 4096)?;
    p.exit()?;
    unsafe { libc::kill(mpid, libc::SIGCONT) };
    std::thread::sleep(Duration::from_millis(300));
    let out = m.stop()?;
    let s = out.summary().cloned().unwrap_or_default();
    let (events, faults, dropped, attempted, seen) = (
        s.events,
        s.faults,
        s.dropped,
        s.events_attempted_by_kernel,
        s.faults_seen_by_kernel,
    );
    c.check(
        "full ring: delivered + dropped = attempted, all 2048 faults seen",
        dropped > 0 && events + dropped == attempted && seen >= touched && touched == 2048,
        format!(
            "delivered {events} ({faults} faults), dropped {dropped}, attempted {attempted}, \
             faults seen {seen}, touched {touched}"
        ),
    );
    let drift = s.drift_missing + s.drift_extra;
    c.check(
        "full ring: the holder map was repaired by a reconcile",
        out.reconciles().any(|r| r.reason == "events lost"),
        format!(
            "drift corrected {drift} pages; reconcile lines: {}",
            out.reconciles().count()
        ),
    );
    c.check(
        "full ring: operator warned with the fix",
        out.stderr.contains("lost because the ring buffer was full")
            && out.stderr.contains("--ring-size-kib"),
        out.stderr.trim().to_string(),
    );

    holders_refusals(&mut c, fs)?;

    let passed = c.bad.is_empty();
    Ok(Checked {
        passed,
        summary: format!("{} of {} checks held", c.ok.len(), c.ok.len() + c.bad.len()),
        counts: json!({"held": c.ok, "failed": c.bad, "ring": {"delivered": events,
                       "dropped": dropped, "attempted": attempted, "faults_seen": seen,
                       "touched": touched}}),
        details: c.bad,
    })
}

/// `dax-probe holders` with bad targets and without privileges: the right exit code, a
/// message naming the problem, nothing on stdout.
fn holders_refusals(c: &mut Checks, fs: &DaxFs) -> Result<()> {
    let cases: [(&str, &[&str], i32, &str); 5] = [
        (
            "unknown device",
            &["holders", "nvme9n1"],
            66,
            "unknown target",
        ),
        (
            "file on a non-DAX file system",
            &["holders", "/etc/mke2fs.conf"],
            66,
            "not on a DAX file system",
        ),
        (
            "mount that is not DAX",
            &["holders", "/tmp"],
            66,
            "not on a DAX file system",
        ),
        (
            "bad pfn range",
            &["holders", "0x2000-0x1000"],
            66,
            "bad pfn range",
        ),
        (
            "raw device name that is not DAX",
            &["holders", "region0"],
            66,
            "unknown target",
        ),
    ];
    for (what, args, want, msg) in cases {
        let (code, out, err) = run_once(args)?;
        c.check(
            &format!("holders: {what} -> exit {want}, nothing on stdout"),
            code == Some(want) && err.contains(msg) && out.is_empty(),
            format!(
                "exit {code:?}, stdout {:?}, stderr {}",
                out.trim(),
                err.trim()
            ),
        );
    }
    // Not root: pagemap shows no pfns to others, and the monitor's socket is root-only.
    let m = Monitor::start("holders-nobody", &[])?;
    let out = Command::new(AGENT)
        .args(["holders", &fs.dev.dev_path()])
        .uid(65534)
        .gid(65534)
        .output()?;
    drop(m);
    let err = String::from_utf8_lossy(&out.stderr);
    c.check(
        "holders as nobody -> exit 77 naming sudo, nothing on stdout",
        out.status.code() == Some(77) && err.contains("sudo") && out.stdout.is_empty(),
        format!("exit {:?}: {}", out.status.code(), err.trim()),
    );
    // Processes that come and go during a scan must not break it.
    let file = format!("{}/bad-input-churn", fs.mnt);
    pmem::write_file(Path::new(&file), 1 << 20)?;
    let mut churn = Command::new(crate::puppet::WORKLOAD)
        .args(["churn", &file, "300"])
        .spawn()?;
    let mut codes = Vec::new();
    for _ in 0..5 {
        let (code, _, _) = run_once(&["holders", "all", "--scan", "--json"])?;
        codes.push(code);
    }
    let _ = churn.wait();
    c.check(
        "holders --scan while processes map, exit and vanish mid-scan -> no crash",
        codes.iter().all(|c| matches!(c, Some(0) | Some(1))),
        format!("exit codes {codes:?}"),
    );
    Ok(())
}
