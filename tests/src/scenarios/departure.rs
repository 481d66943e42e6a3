//! Departing devices and memory failures on the spare file systems: unbind while mapped
//! (report, enforce, the kernel's own SIGBUS explained), drain, audit of stale mappings,
//! targets that must never be signalled, and a poisoned page.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use dax_probe::schema::{ActionReport, FileRef, KernelSigbus};
use serde_json::{Value, json};

use super::{Checked, DaxFs, Env, Target};
use crate::{
    agent::{HolderRow, Line, Monitor, parse_line, run_once},
    pagemap, pmem,
    puppet::{Huge, Puppet, WORKLOAD},
    report, sys,
};

const MIB: u64 = 1 << 20;

pub(super) struct Verdict {
    ok: Vec<String>,
    bad: Vec<String>,
    counts: serde_json::Map<String, Value>,
}

impl Verdict {
    pub(super) fn new() -> Self {
        Self {
            ok: Vec::new(),
            bad: Vec::new(),
            counts: Default::default(),
        }
    }
    pub(super) fn check(&mut self, what: &str, holds: bool, got: impl Into<String>) {
        if holds {
            self.ok.push(what.to_string());
        } else {
            self.bad.push(format!("{what}: {}", got.into()));
        }
    }
    pub(super) fn count(&mut self, k: &str, v: Value) {
        self.counts.insert(k.into(), v);
    }
    pub(super) fn done(self, summary: String) -> Checked {
        Checked {
            passed: self.bad.is_empty(),
            summary,
            counts: Value::Object(self.counts),
            details: self.bad,
        }
    }
}

/// A policy that signals `device`'s holders with `signal` after `grace`, written to
/// /tmp/policy-TAG.toml, and a fresh audit log path /tmp/audit-TAG.jsonl: the files an
/// enforcing monitor of a scenario is started with.
pub(super) fn signal_policy(
    tag: &str,
    device: &str,
    signal: &str,
    grace: &str,
) -> Result<(String, String)> {
    let policy = format!("/tmp/policy-{tag}.toml");
    std::fs::write(
        &policy,
        format!(
            "[device.{device}]\naction = \"signal\"\nsignal = \"{signal}\"\ngrace = \"{grace}\"\n"
        ),
    )?;
    let audit = format!("/tmp/audit-{tag}.jsonl");
    let _ = std::fs::remove_file(&audit);
    Ok((policy, audit))
}

pub(super) fn scratch_file(fs: &DaxFs, name: &str, len: u64) -> Result<String> {
    let path = format!("{}/{name}", fs.mnt);
    pmem::write_file(Path::new(&path), len as usize)?;
    Ok(path)
}

/// Kernel facts from the agent's doctor (what this kernel's BTF says it does).
pub(super) fn kernel_facts() -> Value {
    run_once(&["doctor", "--json"])
        .ok()
        .and_then(|(_, out, _)| serde_json::from_str::<Value>(&out).ok())
        .map(|v| v["kernel_facts"].clone())
        .unwrap_or_default()
}

fn holder_pids(holders: &[HolderRow]) -> Vec<u64> {
    holders.iter().map(|h| h.pid as u64).collect()
}

/// Waits for a puppet to die; returns the signal that killed it.
pub(super) fn death_signal(p: &mut Puppet, within: Duration) -> Option<i32> {
    let mut st = None;
    sys::wait_for(within, || {
        st = p.status();
        st.is_some()
    });
    st.and_then(|s| s.signal())
}

fn dmesg_shutdown() -> Vec<String> {
    sys::dmesg_tail(400)
        .into_iter()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("shut down") || l.contains("shutting down") || l.contains("force_shutdown")
        })
        .collect()
}

pub fn unbind_report(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "unbind-report")?;
    let file = scratch_file(&fs, "unbind-report", 4 * MIB)?;
    let mut v = Verdict::new();
    let m = Monitor::start(&format!("unbind-report-{t}"), &[])?;
    let (mut p, fate, counts) = hold_and_unbind(&fs, &file)?;
    std::thread::sleep(Duration::from_millis(500));
    // Died of what the kernel sent (not of the SIGKILL that let a blocked unbind finish).
    let killed =
        death_signal(&mut p, Duration::from_millis(500)).filter(|_| fate == UnbindFate::Returned);
    let (caught, code) = if fate == UnbindFate::Returned && killed.is_none() {
        p.sigbus()?
    } else {
        counts
    };
    report::fact(&format!("unbind_{t}_with_holder"), json!(fate.fact()));
    let out = m.finish(fate)?;
    let dep = out.departing(&fs.dev.block);
    v.check(
        "device_departing names the device",
        dep.is_some(),
        format!(
            "reports: {:?}; raw device events: {:?}",
            out.of_type("device_departing").collect::<Vec<_>>(),
            out.of_type("device").collect::<Vec<_>>()
        ),
    );
    let dep_holders = dep.map(|d| d.holders).unwrap_or_default();
    let row = dep_holders.iter().find(|h| h.pid == p.pid);
    v.check(
        "it lists the holder with its file and 1024 pages",
        row.is_some_and(|r| r.pages == 1024 && r.file.as_deref() == Some(file.as_str())),
        format!("holders {dep_holders:?}"),
    );
    let gone = out.gone(&fs.dev.block);
    if fate == UnbindFate::Wedged {
        v.check(
            "no device_gone while the kernel never finished the unbind",
            gone.is_none(),
            format!("device_gone {gone:?}"),
        );
    } else {
        v.check(
            "device_gone follows",
            gone.is_some(),
            "no device_gone".to_string(),
        );
    }
    // What the kernel did to the holder, as a fact about this kernel: the SIGBUS it sent
    // (caught and counted by the holder, with its si_code), or nothing.
    // Categorical (how many arrive varies: pending SIGBUS absorb repeats).
    report::fact(
        &format!("unbind_{t}_kernel_sigbus_to_holder"),
        json!(match (caught, code) {
            (0, _) => "none".to_string(),
            (_, 4) => "BUS_MCEERR_AR".to_string(),
            (_, 5) => "BUS_MCEERR_AO".to_string(),
            (_, c) => format!("si_code {c}"),
        }),
    );
    v.count("holder_killed_by_signal", json!(killed));
    v.count("holder_sigbus", json!({"count": caught, "si_code": code}));
    v.count("unbind_fate", json!(format!("{fate:?}")));
    v.count("took_ms", json!(gone.map(|g| g.took_ms)));
    leave_behind(p);
    Ok(v.done(format!(
        "departing listed {} holder(s) incl. pid {}; the kernel {} the holder{}",
        holder_pids(dep_holders).len(),
        p_pid_str(row),
        match (killed, caught) {
            (Some(s), _) => format!("killed (signal {s})"),
            (None, 0) => "did not signal".into(),
            (None, n) => format!("sent {n} SIGBUS (si_code {code}) to"),
        },
        match fate {
            UnbindFate::Returned => "",
            UnbindFate::BlockedUntilHolderGone => "; the unbind blocked until the holder was gone",
            UnbindFate::Wedged => "; the unbind never finished (kernel wedged, fact recorded)",
        }
    )))
}

/// How an unbind with a live holder went on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnbindFate {
    /// Returned at once, holder or not (5.10-6.12; ext4 everywhere).
    Returned,
    /// Blocked while the holder mapped the device and finished once it was gone.
    BlockedUntilHolderGone,
    /// Never finished, holder or not: the unbinding thread spins in the kernel (7.2 xfs with
    /// rmapbt and a mapped file, with or without the agent). Every later sysfs access to the
    /// bus waits on it, so such scenarios run in a VM of their own.
    Wedged,
}

impl UnbindFate {
    fn fact(self) -> &'static str {
        match self {
            Self::Returned => "returned",
            Self::BlockedUntilHolderGone => "blocked until the holder was gone",
            Self::Wedged => "never finished: the unbinding task spins in the kernel",
        }
    }
}

trait FinishMonitor {
    fn finish(self, fate: UnbindFate) -> Result<crate::agent::Output>;
}

impl FinishMonitor for Monitor {
    /// Stops the agent, or only reads it when a wedged unbind holds it in the kernel.
    fn finish(self, fate: UnbindFate) -> Result<crate::agent::Output> {
        if fate == UnbindFate::Wedged {
            self.peek()
        } else {
            self.stop()
        }
    }
}

/// A holder maps and touches 4 MiB of `file`, catching SIGBUS (counted, not died of: its own
/// count and si_code are ground truth for the agent's kernel_sigbus events, and on 7.2 a
/// holder dying of the pre-remove SIGBUS mid-walk left the unbind hung); then `fs` is
/// unbound under it. Returns the holder, how the unbind went, and the SIGBUS count and last
/// si_code taken before a blocked unbind made us kill it ((0, 0) otherwise).
fn hold_and_unbind(fs: &DaxFs, file: &str) -> Result<(Puppet, UnbindFate, (u64, i32))> {
    let mut p = Puppet::spawn()?;
    let a = p.map(file, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(a, 4 * MIB, false, 4096)?;
    p.catch_sigbus()?;
    let mut counts = (0, 0);
    let fate = unbind_with_holder(fs, &mut p, &mut |p| {
        counts = p.sigbus().unwrap_or_default();
    })?;
    Ok((p, fate, counts))
}

/// Unbinds `fs` while `p` maps it. If the kernel blocks the unbind, the holder's signal
/// counts are taken first (`before_kill`), then it is killed so the unbind can finish; the
/// VM would otherwise stay wedged (every later sysfs read of the bus waits on that unbind).
fn unbind_with_holder(
    fs: &DaxFs,
    p: &mut Puppet,
    before_kill: &mut dyn FnMut(&mut Puppet),
) -> Result<UnbindFate> {
    let u = pmem::Unbind::start(&fs.dev);
    match u.wait(Duration::from_secs(20)) {
        Some(r) => r.map(|_| UnbindFate::Returned),
        None => {
            report::note(&format!(
                "unbind of {} blocks with a live holder; kernel stacks: {}",
                fs.dev.pfn_dev,
                sys::kernel_stacks(&[std::process::id(), p.pid])
            ));
            before_kill(p);
            report::note("holder's signal counts taken; killing it");
            // SAFETY: our child.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
            match u.wait(Duration::from_secs(30)) {
                Some(r) => r.map(|_| UnbindFate::BlockedUntilHolderGone),
                None => {
                    report::note(&format!(
                        "the unbind of {} still blocks 30 s after its only holder was killed: \
                         the kernel is wedged; kernel stacks: {}",
                        fs.dev.pfn_dev,
                        sys::kernel_stacks(&[std::process::id(), p.pid])
                    ));
                    pmem::mark_bus_wedged();
                    Ok(UnbindFate::Wedged)
                }
            }
        }
    }
}

/// Whether a holder the agent signalled, not reaped (`reaped` false), died in the kernel's
/// own teardown of its stale mapping: on 7.x (DAX pages without devmap) a holder whose exit
/// loses the race with the unbind's freeing of the memmap oopses and is never reaped. The
/// kernel's log says so of that very pid (the oops's `RIP:`, returned); a fact `fact` is
/// kept. The caller still needs the agent's own record of its signal to that pid.
pub(super) fn died_in_kernel(fact: &str, pid: u32, reaped: bool) -> Option<String> {
    let o = (!reaped).then(|| sys::oops_of(pid)).flatten()?;
    report::fact(
        fact,
        json!(format!(
            "the kernel oopsed tearing the signalled holder down: {o}"
        )),
    );
    Some(o)
}

/// A holder of a pulled device is left running: on kernels whose DAX pages are plain
/// folios (7.x), tearing down such a stale mapping touches the freed memmap and oopses the
/// kernel (the agent's `audit` finds these processes instead). The VM powers off at the end.
pub(super) fn leave_behind(p: Puppet) {
    std::mem::forget(p);
}

fn p_pid_str(row: Option<&HolderRow>) -> String {
    row.map_or_else(|| "null".into(), |r| r.pid.to_string())
}

pub fn unbind_enforce(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "unbind-enforce")?;
    let file = scratch_file(&fs, "unbind-enforce", 4 * MIB)?;
    let mut v = Verdict::new();
    let (policy, audit) = signal_policy("enforce", &fs.dev.block, "KILL", "1s")?;
    let audit = audit.as_str();
    let m = Monitor::start(
        &format!("enforce-{t}"),
        &["--enforce", "--policy", &policy, "--audit-log", audit],
    )?;
    let status = "/tmp/reader.status";
    let mut reader = Command::new(WORKLOAD)
        .args(["reader", &file, &(4 * MIB).to_string(), status])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(reader.stdout.take().unwrap()).read_line(&mut line)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = sys::boottime_ns();
    pmem::unbind_fsdax(&fs.dev)?;
    let unbind_done = sys::boottime_ns();
    let mut st = None;
    sys::wait_for(Duration::from_secs(5), || {
        st = reader.try_wait().ok().flatten();
        st.is_some()
    });
    let raw = std::fs::read(status)?;
    let last_read = u64::from_le_bytes(raw[0..8].try_into()?);
    let out = m.stop()?;
    let sig = st.and_then(|s| s.signal());
    // On 7.x (DAX pages without devmap) a killed holder whose exit loses the race with the
    // unbind's freeing of the memmap oopses in the kernel and is never reaped: the kernel's
    // log then says so, and that the signal got it there (`get_signal` → `do_group_exit`).
    let oops = died_in_kernel(
        "unbind_enforce_killed_holder_exit",
        reader.id(),
        st.is_some(),
    );
    let delivered = out
        .enforcement()
        .any(|a| a.pid == reader.id() && a.action == "signal");
    v.check(
        "the holder was killed by the agent's SIGKILL (or, the kernel's log says, died of it \
         in the kernel's own teardown)",
        sig == Some(libc::SIGKILL) || (oops.is_some() && delivered),
        format!("reader exit {st:?}; kernel oops in it: {oops:?}"),
    );
    v.check(
        "the holder read nothing after the unbind completed",
        last_read > 0 && last_read < unbind_done,
        format!(
            "last read {:.3} ms after the unbind completed",
            (last_read as f64 - unbind_done as f64) / 1e6
        ),
    );
    let action = out
        .enforcement()
        .find(|a| a.pid == reader.id() && a.action == "signal")
        .cloned();
    v.check(
        "the enforcement line names the holder and SIGKILL",
        action
            .as_ref()
            .is_some_and(|a| a.signal.as_deref() == Some("SIGKILL")),
        format!(
            "enforcement lines: {:?}",
            out.of_type("enforcement").collect::<Vec<_>>()
        ),
    );
    let log = std::fs::read_to_string(audit).unwrap_or_default();
    v.check(
        "the audit log recorded the decision and the signal",
        log.contains("\"action\":\"decide\"")
            && log.lines().any(|l| {
                l.contains("\"action\":\"signal\"")
                    && l.contains(&format!("\"pid\":{}", reader.id()))
            }),
        log.clone(),
    );
    let latency = action.as_ref().and_then(|a| a.since_departure_us);
    v.count("signal_after_departure_us", json!(latency));
    v.count("unbind_ms", json!((unbind_done - before) as f64 / 1e6));
    v.count(
        "last_read_before_unbind_done_ms",
        json!((unbind_done as f64 - last_read as f64) / 1e6),
    );
    // Killed already (or the check above failed): leave it, see `leave_behind`.
    std::mem::forget(reader);
    Ok(v.done(format!(
        "holder killed {:.1} ms after the departure began; unbind took {:.1} ms; last read {:.1} ms before it completed",
        latency.unwrap_or(0) as f64 / 1000.0,
        (unbind_done - before) as f64 / 1e6,
        (unbind_done as f64 - last_read as f64) / 1e6
    )))
}

pub fn unbind_xfs_explain(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "explain")?;
    let facts = kernel_facts();
    let pre_remove = facts["mf_mem_pre_remove"] == true;
    // The kernel tells xfs about a removal only with MF_MEM_PRE_REMOVE (6.8+), and xfs can
    // find the files only with rmapbt (made with reflink here). notify_failure alone (6.1)
    // is called for media errors, never on unbind.
    let expect_sigbus = pre_remove && fs.reflink;
    let file = scratch_file(&fs, "explain", 4 * MIB)?;
    let mut v = Verdict::new();
    let m = Monitor::start(&format!("explain-{t}"), &[])?;
    let (mut p, fate, counts) = hold_and_unbind(&fs, &file)?;
    let killed =
        death_signal(&mut p, Duration::from_secs(2)).filter(|_| fate == UnbindFate::Returned);
    let (caught, si_code) = if fate == UnbindFate::Returned && killed.is_none() {
        p.sigbus()?
    } else {
        counts
    };
    report::fact("unbind_xfs_explain_with_holder", json!(fate.fact()));
    let out = m.finish(fate)?;
    // (the kernel's machine-check SIGBUS, why) for the holder: what memory_failure() sends
    // on a removal. A refused fault's BUS_ADRERR (a later access to the departed device) is
    // another signal, counted apart.
    let (sigbus, refused): (Vec<(&KernelSigbus, &str)>, Vec<_>) = out
        .lines
        .iter()
        .filter_map(|l| match l {
            Line::KernelSigbus { sigbus, cause, .. } if sigbus.pid == p.pid => {
                Some((sigbus, cause.as_str()))
            }
            _ => None,
        })
        .partition(|(s, _)| s.code != "BUS_ADRERR");
    v.count(
        "kernel_sigbus_refused_faults",
        json!(refused.iter().map(|(_, cause)| cause).collect::<Vec<_>>()),
    );
    report::fact("unbind_xfs_kernel_sigbus", json!(!sigbus.is_empty()));
    v.count(
        "kernel_sigbus",
        json!(
            sigbus
                .iter()
                .map(|(s, cause)| json!({"code": s.code, "tid": s.tid, "cause": cause}))
                .collect::<Vec<_>>()
        ),
    );
    v.count("kernel_facts", facts.clone());
    v.check(
        "the kernel signals the holder exactly where this kernel's facts say it does",
        sigbus.is_empty() != expect_sigbus,
        format!(
            "MF_MEM_PRE_REMOVE {pre_remove}, rmapbt {}, kernel SIGBUS {}",
            fs.reflink,
            !sigbus.is_empty()
        ),
    );
    if !sigbus.is_empty() {
        let cause = sigbus[0].1;
        v.check(
            "the kernel's SIGBUS is attributed to the unbind",
            cause.starts_with("unbind of"),
            cause.to_string(),
        );
        if pre_remove {
            v.check(
                "MF_MEM_PRE_REMOVE is named (the kernel calls it hardware corruption)",
                cause.contains("MF_MEM_PRE_REMOVE") && cause.contains("nothing was corrupt"),
                cause.to_string(),
            );
        }
        // BUS_MCEERR_AR = 4, BUS_MCEERR_AO = 5 (include/uapi/asm-generic/siginfo.h).
        let agent_code = sigbus.last().map(|s| s.0.code.as_str()).unwrap_or("");
        let holder_code = match si_code {
            4 => "BUS_MCEERR_AR",
            5 => "BUS_MCEERR_AO",
            _ => "?",
        };
        // The kernel logs each SIGBUS it sends; the holder sees fewer (a pending standard
        // signal absorbs repeats), but the si_code it got is the kernel's own.
        let needle = format!("Sending SIGBUS to dax-workload:{} ", p.pid);
        let logged = sys::dmesg_tail(usize::MAX)
            .iter()
            .filter(|l| l.contains(&needle))
            .count();
        v.check(
            "the agent saw every SIGBUS the kernel logged, with the si_code the holder got",
            caught > 0 && logged == sigbus.len() && agent_code == holder_code,
            format!(
                "kernel log {logged}, agent {} ({agent_code}); holder caught {caught} (last \
                 si_code {si_code} = {holder_code}); exit signal {killed:?}",
                sigbus.len()
            ),
        );
    } else {
        // A fact about this kernel: nobody is told (no MF_MEM_PRE_REMOVE, or xfs without
        // rmapbt); the holder lives on with its mapping.
        v.check(
            "without a pre-remove notification the holder lives on, unsignalled",
            killed.is_none() && caught == 0,
            format!("killed {killed:?}, SIGBUS caught {caught}"),
        );
    }
    let fs_notes: Vec<&Line> = out.of_type("fs_notified").collect();
    v.count("fs_notified", json!(fs_notes));
    leave_behind(p);
    Ok(v.done(if sigbus.is_empty() {
        format!(
            "the kernel did not signal the holder (MF_MEM_PRE_REMOVE {pre_remove}, rmapbt {}); \
             reported as a fact",
            fs.reflink
        )
    } else {
        format!(
            "kernel SIGBUS {} attributed: {}",
            sigbus[0].0.code, sigbus[0].1
        )
    }))
}

pub fn drain(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "drain")?;
    let file = scratch_file(&fs, "drain", 4 * MIB)?;
    let mut v = Verdict::new();
    let mut ps = Vec::new();
    for i in 0..3 {
        let mut p = Puppet::spawn()?;
        let a = p.map(&file, 0, 4 * MIB, true, Huge::Pte)?;
        p.touch(a, 4 * MIB, false, 4096)?;
        if i == 2 {
            p.ignore(libc::SIGTERM)?;
        }
        ps.push(p);
    }
    // A second mount of the same file system: left mounted, it would keep the file system
    // alive on the unbound device (the old drain unmounted only the first).
    let bind = format!("/mnt/drain-bind-{t}");
    crate::sys::bind_mount(&fs.mnt, &bind)?;
    let audit = format!("/tmp/audit-drain-{t}.jsonl");
    let _ = std::fs::remove_file(&audit);
    let dmesg_before = dmesg_shutdown().len();
    let (code, out, err) = run_once(&[
        "drain",
        &fs.dev.block,
        "--signal",
        "TERM",
        "--grace",
        "2s",
        "--then",
        "KILL",
        "--unbind",
        "--audit-log",
        &audit,
    ])?;
    v.check(
        "drain exits 0",
        code == Some(0),
        format!("exit {code:?}: {out}{err}"),
    );
    let fates: Vec<Option<i32>> = ps
        .iter_mut()
        .map(|p| death_signal(p, Duration::from_secs(2)))
        .collect();
    v.check(
        "two holders left on SIGTERM, the one ignoring it was killed",
        fates
            == vec![
                Some(libc::SIGTERM),
                Some(libc::SIGTERM),
                Some(libc::SIGKILL),
            ],
        format!("{fates:?}"),
    );
    v.check(
        "the device is unbound",
        !pmem::is_bound(&fs.dev),
        "still bound",
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let left: Vec<&String> = [&fs.mnt, &bind]
        .into_iter()
        .filter(|m| mountinfo.contains(&format!(" {m} ")))
        .collect();
    v.check(
        "its file system was unmounted, the bind mount too",
        left.is_empty(),
        format!("still mounted on {left:?}"),
    );
    let shut = dmesg_shutdown();
    v.check(
        "no file system shutdown in dmesg",
        shut.len() == dmesg_before,
        shut.join(" | "),
    );
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    let actions: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| r["action"].as_str().map(str::to_string))
        .collect();
    let n = |a: &str| actions.iter().filter(|x| *x == a).count();
    v.check(
        "the audit log has every step",
        n("drain") == 1
            && n("fence") == 1
            && n("decide") == 1
            && n("signal") == 3
            && n("escalate") == 1
            && n("verify") == 1
            && n("unmount") == 2
            && n("unbind") == 1
            && n("done") == 1,
        format!("{actions:?}"),
    );
    v.count("audit_actions", json!(actions));
    drop(ps);
    Ok(v.done(format!(
        "3 holders: {:?}; unbound, unmounted; audit log {} records",
        fates,
        actions.len()
    )))
}

pub fn audit_stale(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "stale")?;
    let file = scratch_file(&fs, "stale", 4 * MIB)?;
    let mut v = Verdict::new();
    let mut p = Puppet::spawn()?;
    let a = p.map(&file, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(a, 4 * MIB, false, 4096)?;
    let (code0, _, _) = run_once(&["audit"])?;
    v.check(
        "audit is clean before the unbind",
        code0 == Some(0),
        format!("exit {code0:?}"),
    );
    let devmap = kernel_facts()["dax_devmap"] == true;
    // Read off this kernel's BTF (devmap DAX entries); where it is false the scenario does not
    // read the stale page tables at all (7.2 oopsed when it did).
    report::fact("stale_pagemap_read_safe", json!(devmap));
    pmem::unbind_fsdax(&fs.dev)?;
    // Reading the page tables of a stale mapping oopses kernels without devmap DAX entries
    // (7.x, seen in this VM): there the truth is the mapping itself.
    let kernel_stale = if devmap {
        pagemap::pfns(p.pid, a, 4 * MIB)?
            .iter()
            .filter(|x| x.is_some())
            .count()
    } else {
        1024
    };
    let (code, out, err) = run_once(&["audit", "--json"])?;
    let mine: u64 = match parse_line(out.trim()) {
        Ok(Line::Audit(a)) => a
            .stale
            .iter()
            .filter(|s| s.pid == p.pid)
            .map(|s| s.pages)
            .sum(),
        _ => 0,
    };
    v.check(
        "after the unbind audit exits 1 and reports the holder's stale pages",
        code == Some(1) && mine == kernel_stale as u64 && mine > 0,
        format!("exit {code:?}, audit {mine} pages, pagemap {kernel_stale}: {err}"),
    );
    if devmap {
        p.exit()?;
        let (code2, out2, _) = run_once(&["audit"])?;
        v.check(
            "after the holder exits audit is clean",
            code2 == Some(0),
            format!("exit {code2:?}: {out2}"),
        );
    } else {
        // DAX pages are plain folios here: tearing the stale mapping down touches the freed
        // memmap (the kernel oopses); the holder stays, and so does the finding.
        leave_behind(p);
    }
    v.count("stale_pages", json!(mine));
    v.count("pagemap_present_after_unbind", json!(kernel_stale));
    Ok(v.done(format!(
        "{mine} stale pages found after the unbind (pagemap: {kernel_stale}); clean after exit"
    )))
}

pub fn never_wrong_target(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "targets")?;
    let file = scratch_file(&fs, "targets", 4 * MIB)?;
    let mut v = Verdict::new();
    let policy = "/tmp/policy-targets.toml";
    std::fs::write(
        policy,
        "[default]\naction = \"signal\"\nsignal = \"KILL\"\ngrace = \"1s\"\n",
    )?;
    let m = Monitor::start(
        "targets",
        &[
            "--enforce",
            "--policy",
            policy,
            "--audit-log",
            "/tmp/audit-targets.jsonl",
        ],
    )?;
    let agent_pid = m.pid().unwrap_or(0);
    let mut victim = Puppet::spawn()?;
    let a = victim.map(&file, 0, 4 * MIB, true, Huge::Pte)?;
    victim.touch(a, 4 * MIB, false, 4096)?;
    let mut opener = Puppet::spawn()?;
    opener.open(&file)?;
    // PID 1 (this process) maps a page of the device too.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)?;
    // SAFETY: mapping and reading one page of our own file.
    let p1 = unsafe {
        use std::os::fd::AsRawFd;
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    anyhow::ensure!(p1 != libc::MAP_FAILED, "PID 1 could not map the file");
    // SAFETY: reading the page just mapped.
    let _ = unsafe { std::ptr::read_volatile(p1 as *const u8) };
    std::thread::sleep(Duration::from_millis(300));
    pmem::unbind_fsdax(&fs.dev)?;
    let victim_sig = death_signal(&mut victim, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(300));
    let out = m.stop()?;
    let acts: Vec<&ActionReport> = out.enforcement().collect();
    let signalled = |pid: u64| {
        acts.iter()
            .any(|a| a.pid as u64 == pid && (a.action == "signal" || a.action == "escalate"))
    };
    v.check(
        "the holder was killed",
        victim_sig == Some(libc::SIGKILL) && signalled(victim.pid as u64),
        format!("victim {victim_sig:?}; actions {acts:?}"),
    );
    v.check(
        "PID 1 mapped the device and was refused, not signalled",
        !signalled(1)
            && acts
                .iter()
                .any(|a| a.pid == 1 && a.action == "skip" && a.reason.contains("PID 1")),
        format!("{acts:?}"),
    );
    v.check(
        "the process that only opened the device is untouched and alive",
        !acts.iter().any(|a| a.pid == opener.pid) && opener.status().is_none(),
        format!("{acts:?}"),
    );
    v.check(
        "the agent never signals itself",
        !signalled(agent_pid as u64),
        format!("{acts:?}"),
    );
    // PID 1 keeps its stale page mapped (unmapping it could crash kernels without devmap
    // entries, see `leave_behind`), the opener goes.
    std::mem::forget(f);
    drop(opener);
    Ok(v.done(format!(
        "holder killed; PID 1 skipped; opener alive; {} enforcement lines",
        acts.len()
    )))
}

pub fn hwpoison(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "poison")?;
    let file = scratch_file(&fs, "poison-a", 4 * MIB)?;
    let mut v = Verdict::new();
    let reflink = t == Target::Xfs && fs.reflink;
    let clone = file.replace("poison-a", "poison-b");
    if reflink {
        use std::os::fd::AsRawFd;
        let src = std::fs::File::open(&file)?;
        let dst = std::fs::File::create(&clone)?;
        const FICLONE: libc::c_ulong = 0x4004_9409;
        // SAFETY: valid fds.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
        anyhow::ensure!(rc == 0, "FICLONE: {}", std::io::Error::last_os_error());
    }
    let m = Monitor::start(&format!("poison-{t}"), &[])?;
    // Runs first in the ordering of the VM: stale holders of earlier departure scenarios
    // do not matter here.
    let mut holders = Vec::new();
    for i in 0..2 {
        let mut p = Puppet::spawn()?;
        let path = if reflink && i == 1 { &clone } else { &file };
        let a = p.map(path, 0, 4 * MIB, true, Huge::Pte)?;
        p.touch(a, 4 * MIB, false, 4096)?;
        holders.push((p, a));
    }
    let mut inj = Puppet::spawn()?;
    let ia = inj.map(&file, 0, 4 * MIB, true, Huge::Pte)?;
    inj.touch(ia, 4 * MIB, false, 4096)?;
    let page = 5u64;
    let truth_pfn =
        pagemap::pfns(inj.pid, ia + page * 4096, 4096)?[0].context("page not present")?;
    // What the agent and the kernel say about the page before it is poisoned.
    let before_agent = run_once(&["holders", &format!("{truth_pfn:#x}"), "--json"])
        .map(|(_, o, _)| o)
        .unwrap_or_default();
    let before_kernel: Vec<(u32, Option<u64>)> = holders
        .iter()
        .map(|(p, a)| {
            (
                p.pid,
                pagemap::pfns(p.pid, a + page * 4096, 4096)
                    .ok()
                    .and_then(|v| v[0]),
            )
        })
        .collect();
    v.count("before_agent", json!(before_agent.trim()));
    v.count("before_kernel", json!(format!("{before_kernel:?}")));
    let rc = inj.poison(ia + page * 4096);
    let inj_sig = death_signal(&mut inj, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(500));
    let out = m.stop()?;
    let mf = out
        .lines
        .iter()
        .find(|l| matches!(l, Line::MemoryFailure { pfn, .. } if *pfn == truth_pfn));
    v.check(
        "memory_failure names the pfn the kernel poisoned",
        mf.is_some(),
        format!(
            "reports {:?}; madvise {rc:?}",
            out.of_type("memory_failure").collect::<Vec<_>>()
        ),
    );
    let (mf_files, mf_holders): (&[FileRef], &[HolderRow]) = match mf {
        Some(Line::MemoryFailure { files, holders, .. }) => (files, holders),
        _ => (&[], &[]),
    };
    let files: Vec<String> = mf_files.iter().filter_map(|f| f.path.clone()).collect();
    let want_files: Vec<&str> = if reflink {
        vec![&file, &clone]
    } else {
        vec![&file]
    };
    v.check(
        "it names every file the page backs (both reflinked files on xfs)",
        want_files.iter().all(|w| files.iter().any(|f| f == w))
            && !mf_files.is_empty()
            && mf_files.iter().all(|f| f.offset == page * 4096),
        format!("files {mf_files:?}"),
    );
    let pids = holder_pids(mf_holders);
    // The holders are whoever the kernel's page tables say mapped the pfn right before the
    // poison (on xfs with reflink the kernel may already have unmapped one of them).
    let all: Vec<u64> = before_kernel
        .iter()
        .filter(|(_, pfn)| *pfn == Some(truth_pfn))
        .map(|(pid, _)| *pid as u64)
        .chain([inj.pid as u64])
        .collect();
    let not_holding: Vec<u32> = before_kernel
        .iter()
        .filter(|(_, pfn)| *pfn != Some(truth_pfn))
        .map(|(pid, _)| *pid)
        .collect();
    if !not_holding.is_empty() {
        v.count("mapped_the_file_but_not_the_page", json!(not_holding));
    }
    let kernel_holders: Vec<(u32, Option<u64>)> = holders
        .iter()
        .map(|(p, a)| {
            (
                p.pid,
                pagemap::pfns(p.pid, a + page * 4096, 4096)
                    .ok()
                    .and_then(|v| v[0]),
            )
        })
        .collect();
    v.check(
        "it names exactly the processes whose page tables map the pfn",
        all.iter().all(|p| pids.contains(p)) && pids.iter().all(|p| all.contains(p)),
        format!(
            "holders {pids:?}, expected {all:?}; per pagemap the holders map page {page} at {:?}, poisoned pfn {truth_pfn:#x}; before: kernel {before_kernel:?}, agent {}",
            kernel_holders, before_agent.trim()
        ),
    );
    let result = out
        .lines
        .iter()
        .find(|l| matches!(l, Line::MemoryFailureResult { pfn, .. } if *pfn == truth_pfn));
    let (verdict, signalled, not_signalled): (Option<String>, Vec<u64>, Vec<u64>) = match result {
        Some(Line::MemoryFailureResult {
            result,
            signalled,
            not_signalled,
            ..
        }) => (
            result.clone(),
            signalled.iter().map(|&p| p as u64).collect(),
            not_signalled.iter().map(|&p| p as u64).collect(),
        ),
        _ => (None, Vec::new(), Vec::new()),
    };
    // Ground truth for the kernel's action: which processes died of SIGBUS.
    let mut died_of_sigbus = Vec::new();
    if inj_sig == Some(libc::SIGBUS) {
        died_of_sigbus.push(inj.pid as u64);
    }
    for (p, _) in holders.iter_mut() {
        if death_signal(p, Duration::from_millis(200)) == Some(libc::SIGBUS) {
            died_of_sigbus.push(p.pid as u64);
        }
    }
    v.check(
        "the kernel's result and its SIGBUS victims are reported",
        verdict.is_some()
            && died_of_sigbus.iter().all(|p| signalled.contains(p))
            && !died_of_sigbus.is_empty(),
        format!("result {result:?}, died of SIGBUS {died_of_sigbus:?}"),
    );
    let survivors: Vec<u64> = all
        .iter()
        .copied()
        .filter(|p| !died_of_sigbus.contains(p))
        .collect();
    v.check(
        "holders the kernel left alone are named as not signalled",
        survivors.iter().all(|p| not_signalled.contains(p)),
        format!("survivors {survivors:?}, reported {not_signalled:?}"),
    );
    report::fact(
        &format!("hwpoison_{t}_signalled"),
        json!(died_of_sigbus.len()),
    );
    report::fact(&format!("hwpoison_{t}_left_mapped"), json!(survivors.len()));
    v.count("memory_failure", json!(mf));
    v.count("result", json!(result));
    drop(holders);
    Ok(v.done(format!(
        "pfn {truth_pfn:#x}: {} file(s), {} holder(s); kernel result {}; SIGBUS to {:?}; left mapped: {:?}",
        files.len(),
        pids.len(),
        verdict.as_deref().unwrap_or("none"),
        died_of_sigbus,
        survivors
    )))
}

/// A fault storm on another device fills a 16 KiB fault ring while a holder's device is
/// unbound: the departure still arrives and lists the holder (device events ride a ring of
/// their own). The holder mapped its file before the agent started, so it is known from the
/// start-up scan, not from fault events the storm could push out of the ring.
pub fn storm_unbind(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "storm-unbind")?;
    let file = scratch_file(&fs, "storm-unbind", 4 * MIB)?;
    let storm_fs = env
        .fs(Target::Xfs)
        .or_else(|| env.fs(Target::Ext4))
        .context("no file system for the storm")?;
    let storm_file = scratch_file(storm_fs, "storm", 4 * MIB)?;
    let mut v = Verdict::new();
    let mut p = Puppet::spawn()?;
    let a = p.map(&file, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(a, 4 * MIB, false, 4096)?;
    p.catch_sigbus()?;
    let m = Monitor::start(&format!("storm-unbind-{t}"), &["--ring-size-kib", "16"])?;
    // The storm: map, touch 1024 pages, unmap, again, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let storm = std::thread::spawn(move || -> Result<u64> {
        let mut s = Puppet::spawn()?;
        let mut rounds = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let a = s.map(&storm_file, 0, 4 * MIB, true, Huge::Pte)?;
            s.touch(a, 4 * MIB, true, 4096)?;
            s.unmap(a, 4 * MIB)?;
            rounds += 1;
        }
        s.exit()?;
        Ok(rounds)
    });
    std::thread::sleep(Duration::from_secs(2));
    let fate = unbind_with_holder(&fs, &mut p, &mut |_| {})?;
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = storm
        .join()
        .map_err(|_| anyhow::anyhow!("storm panicked"))??;
    let out = m.finish(fate)?;
    let dropped = out.summary().map(|s| s.dropped).unwrap_or(0);
    // Whether the storm outran the reader depends on how fast TCG runs the agent: the
    // count says how hard this run pressed (0 drops: the departure only raced a busy ring).
    if dropped == 0 {
        report::note("storm-unbind: the agent kept up with the storm (no fault record dropped)");
    }
    let dep = out.departing(&fs.dev.block);
    v.check(
        "device_departing names the device despite the storm",
        dep.is_some(),
        format!(
            "reports: {:?}; raw device events: {:?}",
            out.departures().count(),
            out.of_type("device").collect::<Vec<_>>()
        ),
    );
    let dep_holders = dep.map(|d| d.holders).unwrap_or_default();
    let row = dep_holders.iter().find(|h| h.pid == p.pid);
    v.check(
        "it lists the holder with its 1024 pages",
        row.is_some_and(|r| r.pages == 1024),
        format!("holders {dep_holders:?}"),
    );
    v.count("dropped", json!(dropped));
    v.count("storm_rounds", json!(rounds));
    v.count("unbind_fate", json!(format!("{fate:?}")));
    leave_behind(p);
    Ok(v.done(format!(
        "{rounds} storm rounds, {dropped} fault records dropped; the departure listed {} \
         holder(s)",
        holder_pids(dep_holders).len()
    )))
}
