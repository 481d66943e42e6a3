//! The kernel's fence obeys the policy (issue 10 item 8), proven in a window that surely
//! exists: `drain` arms the fence (audited) before it signals the holders and keeps it up
//! through the grace. A holder that catches the drain's SIGTERM and goes on faulting new
//! pages of its DAX mapping gets the kernel's SIGTERM too; a holder the policy excludes by
//! comm faults on the fenced device and gets no signal at all (neither the drain's nor the
//! kernel's), is reported as skipped, and then unmaps and exits by itself before the grace
//! ends, so the drain's verify, unmount and unbind go on deterministically.
//!
//! Ground truth is the holders' own count of the SIGTERMs they caught, split by `si_code`:
//! SI_KERNEL is the fence (`bpf_send_signal`), SI_USER the drain's pidfd signal.
//!
//! Why not an unbind under `monitor --enforce` (the first version): ext4 shuts down
//! ("shut down requested") within milliseconds of the departure, and from then on its fault
//! handler returns SIGBUS before the DAX fault path (and so the fence) is reached; no fault
//! fell inside the fence's window.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Checked, Env, Target};
use crate::{
    agent::{AGENT, Line, parse_line},
    pmem,
    puppet::WORKLOAD,
};

/// The comm of the excluded holder: `dax-workload` started through a symlink of this name.
const SPARED: &str = "dax-spared";

/// [kernel USR1, user USR1, SIGBUS, passes, kernel TERM, user TERM].
type Counts = [u64; 6];

struct Probe {
    child: Child,
    status: String,
}

impl Probe {
    fn start(exe: &str, file: &str, status: &str, exit_on_stop: bool) -> Result<Self> {
        let mut args = vec!["fence-probe", file, status];
        if exit_on_stop {
            args.push("exit");
        }
        let mut child = Command::new(exe)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {exe}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        anyhow::ensure!(line.trim() == "ready", "{exe}: {line:?}");
        Ok(Self {
            child,
            status: status.into(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops its faulting (SIGUSR2).
    fn stop(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGUSR2) };
    }

    fn counts(&self) -> Result<Counts> {
        let raw = std::fs::read(&self.status)?;
        let at = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap());
        Ok([at(0), at(1), at(2), at(3), at(4), at(5)])
    }

    /// How it ended, within `limit`: Ok(code) for an exit, Err(signal) for a death by signal.
    fn fate(&mut self, limit: Duration) -> Option<Result<i32, i32>> {
        use std::os::unix::process::ExitStatusExt;
        let mut st = None;
        crate::sys::wait_for(limit, || {
            st = self.child.try_wait().ok().flatten();
            st.is_some()
        });
        st.map(|s| s.code().ok_or(s.signal().unwrap_or(0)))
    }
}

fn counts_json(c: &Counts) -> Value {
    json!({"kernel_term": c[4], "user_term": c[5], "kernel_usr1": c[0], "user_usr1": c[1],
           "sigbus": c[2], "passes": c[3]})
}

pub fn fence_excluded(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "fence-excluded")?;
    let file = format!("{}/fence", fs.mnt);
    pmem::write_file(std::path::Path::new(&file), 1 << 20)?;
    let spared_exe = format!("/tmp/{SPARED}");
    let _ = std::fs::remove_file(&spared_exe);
    std::os::unix::fs::symlink(WORKLOAD, &spared_exe)?;
    let policy = "/tmp/policy-fence.toml";
    std::fs::write(
        policy,
        format!(
            "[device.{}]\naction = \"signal\"\nsignal = \"TERM\"\ngrace = \"3s\"\n\
             escalate = \"KILL\"\nexclude = [\"{SPARED}\"]\n",
            fs.dev.block
        ),
    )?;
    let audit = "/tmp/audit-fence.jsonl";
    let _ = std::fs::remove_file(audit);
    let mut victim = Probe::start(WORKLOAD, &file, "/tmp/fence-victim.status", false)?;
    let mut spared = Probe::start(&spared_exe, &file, "/tmp/fence-spared.status", true)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut drain = Command::new(AGENT)
        .args([
            "drain",
            &fs.dev.block,
            "--signal",
            "TERM",
            "--grace",
            "3s",
            "--then",
            "KILL",
            "--unbind",
            "--policy",
            policy,
            "--audit-log",
            audit,
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn dax-probe drain")?;
    let stdout = BufReader::new(drain.stdout.take().unwrap());
    let mut raw_lines = Vec::new();
    // The excluded holder's passes when the fence was up, and some time later.
    let mut fenced_passes: Option<(u64, u64)> = None;
    for l in stdout.lines() {
        let l = l?;
        let fence_up = fenced_passes.is_none()
            && matches!(parse_line(&l), Ok(Line::Drain(ref d)) if d.step == "fence");
        raw_lines.push(l);
        if fence_up {
            // The drain printed this after arming the fence and before signalling: from now
            // on, every pass of the excluded holder faults on the fenced device.
            let p0 = spared.counts()?[3];
            std::thread::sleep(Duration::from_millis(700));
            let p1 = spared.counts()?[3];
            fenced_passes = Some((p0, p1));
            // It leaves by itself, well before the grace ends: unmaps and exits 0.
            spared.stop();
        }
    }
    let status = drain.wait()?;
    let mut err = String::new();
    std::io::Read::read_to_string(&mut drain.stderr.take().unwrap(), &mut err)?;
    let spared_fate = spared.fate(Duration::from_secs(2));
    let victim_fate = victim.fate(Duration::from_secs(2));
    let v = victim.counts()?;
    let s = spared.counts()?;

    let mut ok = Vec::new();
    let mut bad = Vec::new();
    let mut check = |what: &str, holds: bool, got: String| {
        if holds {
            ok.push(what.to_string());
        } else {
            bad.push(format!("{what}: {got}"));
        }
    };
    let out_text = raw_lines.join("\n");
    check(
        "drain exits 0",
        status.code() == Some(0),
        format!("exit {status:?}: {out_text}\n{err}"),
    );
    let lines: Vec<Line> = raw_lines
        .iter()
        .filter_map(|l| parse_line(l).ok())
        .collect();
    let (p0, p1) = fenced_passes.unwrap_or_default();
    check(
        "the excluded holder faulted on the device while it was fenced",
        fenced_passes.is_some() && p1 > p0,
        format!("passes {fenced_passes:?} (no `fence` step line if None)"),
    );
    check(
        "the excluded holder caught no signal (neither the drain's nor the kernel's)",
        s[0] == 0 && s[1] == 0 && s[4] == 0 && s[5] == 0,
        format!("{}", counts_json(&s)),
    );
    check(
        "the excluded holder unmapped and exited 0 by itself",
        spared_fate == Some(Ok(0)),
        format!("{spared_fate:?}"),
    );
    check(
        "the other holder caught the drain's SIGTERM (SI_USER) once and the kernel's \
         (SI_KERNEL) at least once, and was killed by the escalation",
        v[5] == 1 && v[4] >= 1 && victim_fate == Some(Err(libc::SIGKILL)),
        format!("{}, fate {victim_fate:?}", counts_json(&v)),
    );
    let holders: Vec<&str> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Drain(d) if d.step == "holders" => Some(d.message.as_str()),
            _ => None,
        })
        .collect();
    check(
        "drain found both holders",
        holders.len() == 1 && holders[0].starts_with("2 process"),
        format!("{holders:?}"),
    );
    let skipped: Vec<&Line> = lines
        .iter()
        .filter(
            |l| matches!(l, Line::Enforcement(a) if a.pid == spared.pid() && a.action == "skip"),
        )
        .collect();
    let to_spared: Vec<&Line> = lines
        .iter()
        .filter(|l| match l {
            Line::Enforcement(a) => a.pid == spared.pid() && a.action != "skip",
            Line::FenceSignal { sent, .. } => sent.pid == spared.pid(),
            _ => false,
        })
        .collect();
    check(
        "drain reported the excluded holder as skipped, and nothing else for it",
        skipped.len() == 1 && to_spared.is_empty(),
        format!("skip lines {skipped:?}, other lines {to_spared:?}"),
    );
    let fence_lines: Vec<(u32, String, Option<String>)> = lines
        .iter()
        .filter_map(|l| match l {
            Line::FenceSignal { sent, device } => {
                Some((sent.pid, sent.signal.clone(), device.clone()))
            }
            _ => None,
        })
        .collect();
    check(
        "drain --json printed the kernel's signals to the other holder (SIGTERM, the \
         device), at least as many as it caught",
        !fence_lines.is_empty()
            && fence_lines.iter().all(|f| {
                f.0 == victim.pid()
                    && f.1 == "SIGTERM"
                    && f.2.as_deref() == Some(fs.dev.block.as_str())
            })
            && fence_lines.len() as u64 >= v[4],
        format!("caught {}, fence_signal lines {fence_lines:?}", v[4]),
    );
    check(
        "the device is unbound",
        !pmem::is_bound(&fs.dev),
        "still bound".into(),
    );
    let log = std::fs::read_to_string(audit).unwrap_or_default();
    let recs: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let arming = recs.iter().position(|r| {
        r["action"] == "fence"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("SIGTERM") && d.contains(SPARED))
    });
    let kernel_recs: Vec<usize> = recs
        .iter()
        .enumerate()
        .filter(|(_, r)| r["action"] == "kernel_signal")
        .map(|(i, _)| i)
        .collect();
    let kernel_ok = kernel_recs.iter().all(|&i| {
        recs[i]["pid"] == victim.pid()
            && recs[i]["signal"] == "SIGTERM"
            && recs[i]["device"] == fs.dev.block.as_str()
    });
    check(
        "the audit log has the arming (SIGTERM, the exclusion) before the first kernel_signal, \
         one kernel_signal per fence_signal line, all to the other holder",
        matches!((arming, kernel_recs.first()), (Some(a), Some(k)) if a < *k)
            && kernel_recs.len() == fence_lines.len()
            && kernel_ok,
        log.clone(),
    );
    check(
        "the audit log skips the excluded holder and signals it nowhere",
        recs.iter()
            .any(|r| r["pid"] == spared.pid() && r["action"] == "skip")
            && !recs.iter().any(|r| {
                r["pid"] == spared.pid() && r["action"] != "skip" && r["action"] != "decide"
            }),
        log.clone(),
    );
    let counts = json!({
        "victim": counts_json(&v),
        "spared": counts_json(&s),
        "spared_passes_while_fenced": p1.saturating_sub(p0),
        "fence_signal_lines": fence_lines.len(),
        "kernel_signal_records": kernel_recs.len(),
    });
    Ok(Checked {
        passed: bad.is_empty(),
        summary: format!(
            "drain with the fence up: the other holder caught {} SIGTERM(s) from the kernel and \
             {} from the drain ({} fence_signal lines); the excluded one none ({} passes while \
             fenced), then it ended {spared_fate:?}, the other {victim_fate:?}",
            v[4],
            v[5],
            fence_lines.len(),
            p1.saturating_sub(p0)
        ),
        counts,
        details: bad,
    })
}
