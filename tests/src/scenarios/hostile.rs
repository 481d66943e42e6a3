//! The worst an unprivileged user and a stuck reader can do to a root agent during a
//! departure (issue 10): a 64 TiB mapping of a 16 KiB file by uid 65534, reconciles over
//! it, a control client that sends half a request and stops, another that never reads its
//! answer, and the agent's stdout blocked by a reader that stopped reading. The agent must
//! live through reconciles and one-shot scans, answer with the real holder, and still
//! enforce the departure on time.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{net::UnixStream, process::ExitStatusExt},
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{
    Checked, Env, Target,
    departure::{Verdict, scratch_file, signal_policy},
};
use crate::{
    agent::{AGENT, Output, parse_line, run_once},
    pagemap, pmem,
    puppet::{Huge, Puppet},
    sys,
};

const MIB: u64 = 1 << 20;
/// Far more than the machine has: only page tables for what is touched ever exist.
const HUGE_LEN: u64 = 64 << 40;
const NOBODY: u32 = 65534;

/// A monitor whose stdout is a pipe the scenario stops reading once it is attached.
struct PipedMonitor {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    resume: mpsc::Sender<()>,
    reader: std::thread::JoinHandle<()>,
}

impl PipedMonitor {
    fn start(extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(AGENT)
            .args(["monitor", "--json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create("/tmp/agent-hostile.err")?)
            .spawn()
            .context("spawn dax-probe monitor")?;
        let out = BufReader::new(child.stdout.take().unwrap());
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (attached_tx, attached_rx) = mpsc::channel();
        let (resume, resume_rx) = mpsc::channel::<()>();
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            let mut out = out.lines();
            for l in out.by_ref().map_while(Result::ok) {
                let attached = l.contains("\"type\":\"attached\"");
                l2.lock().unwrap().push(l);
                if attached {
                    break;
                }
            }
            let _ = attached_tx.send(());
            // Stop reading: the pipe fills and the agent's writes block.
            let _ = resume_rx.recv();
            for l in out.map_while(Result::ok) {
                l2.lock().unwrap().push(l);
            }
        });
        attached_rx
            .recv_timeout(Duration::from_secs(90))
            .context("agent did not attach")?;
        Ok(Self {
            child,
            lines,
            resume,
            reader,
        })
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Reads again, stops the agent, returns all it printed.
    fn finish(mut self) -> Result<Output> {
        let _ = self.resume.send(());
        // SAFETY: our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let mut status = None;
        sys::wait_for(Duration::from_secs(30), || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_none() {
            let _ = self.child.kill();
        }
        let _ = self.reader.join();
        let lines = self.lines.lock().unwrap();
        Ok(Output {
            lines: lines
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| parse_line(l))
                .collect::<Result<_>>()?,
            stderr: std::fs::read_to_string("/tmp/agent-hostile.err").unwrap_or_default(),
            exit_code: status.and_then(|s| s.code()),
        })
    }
}

/// Pages of `pid` present in `[addr, addr+len)` per its pagemap.
fn present(pid: u32, addr: u64, len: u64) -> usize {
    pagemap::pfns(pid, addr, len)
        .map(|v| v.iter().flatten().count())
        .unwrap_or(0)
}

/// The pages `holders` (one-shot, `--scan` or from the monitor) gives `pid`.
fn holder_pages(v: &Value, pid: u32) -> Option<u64> {
    v["holders"]
        .as_array()?
        .iter()
        .filter(|r| r["pid"].as_u64() == Some(pid as u64))
        .map(|r| r["pages"].as_u64().unwrap_or(0))
        .reduce(|a, b| a + b)
}

pub fn run(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "hostile")?;
    let small = scratch_file(&fs, "small", 16 << 10)?;
    let noisy_file = scratch_file(&fs, "noisy", 4 * MIB)?;
    let mut v = Verdict::new();
    let (policy, audit) = signal_policy("hostile", &fs.dev.block, "KILL", "1s")?;
    let audit = audit.as_str();
    let mut m = PipedMonitor::start(&[
        "--enforce",
        "--policy",
        &policy,
        "--audit-log",
        audit,
        "--reconcile-secs",
        "1",
    ])?;

    // uid 65534 maps 64 TiB of a 16 KiB file it may only read and touches the file's pages.
    let mut big = Puppet::spawn_as(NOBODY)?;
    let addr = big.map_readonly(&small, HUGE_LEN)?;
    big.touch(addr, 16 << 10, false, 4096)?;
    let truth = present(big.pid, addr, 16 << 10);
    v.check(
        "pagemap: the unprivileged holder maps the file's 4 pages",
        truth == 4,
        format!("{truth} present"),
    );
    // Output the reader will not take: 1024 fault lines fill the pipe.
    let mut noisy = Puppet::spawn()?;
    let naddr = noisy.map(&noisy_file, 0, 4 * MIB, true, Huge::Pte)?;
    noisy.touch(naddr, 4 * MIB, false, 4096)?;

    // A client that sends half a request and stops; one that never reads its answer.
    let sock = dax_probe::control::DEFAULT_SOCKET;
    let mut half = UnixStream::connect(sock).context("connect to the control socket")?;
    half.write_all(b"{\"op\":\"holders\",\"target\":")?;
    let mut mute = UnixStream::connect(sock)?;
    mute.write_all(b"{\"op\":\"holders\",\"target\":\"all\",\"pages\":true}\n")?;

    // Reconciles run every second over the 64 TiB mapping.
    std::thread::sleep(Duration::from_millis(3500));
    v.check(
        "the agent lives through reconciles of a 64 TiB mapping, a stalled client and a blocked stdout",
        m.alive(),
        "the monitor exited".to_string(),
    );
    let one_shot = |args: &[&str]| -> (Option<i32>, Value, String) {
        match run_once(args) {
            Ok((code, out, err)) => (
                code,
                serde_json::from_str(out.trim()).unwrap_or(Value::Null),
                err,
            ),
            Err(e) => (None, Value::Null, format!("{e:#}")),
        }
    };
    let dev = format!("/dev/{}", fs.dev.block);
    for (what, args) in [
        (
            "the monitor's answer",
            vec!["holders", dev.as_str(), "--json"],
        ),
        (
            "a one-shot scan",
            vec!["holders", dev.as_str(), "--json", "--scan"],
        ),
    ] {
        let (code, out, err) = one_shot(&args);
        let pages = holder_pages(&out, big.pid);
        v.check(
            &format!("{what} names the unprivileged holder with its 4 pages"),
            code == Some(0) && pages == Some(4),
            format!("exit {code:?}, pages {pages:?}, stderr {}", err.trim()),
        );
    }
    let (code, _, err) = one_shot(&["audit", "--json"]);
    v.check(
        "audit survives the 64 TiB mapping",
        matches!(code, Some(0) | Some(1)),
        format!("exit {code:?}: {}", err.trim()),
    );

    // The departure, with the stdout still blocked and both clients still stalled.
    let start = Instant::now();
    pmem::unbind_fsdax(&fs.dev)?;
    let unbind_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut killed = (None, None);
    sys::wait_for(Duration::from_secs(10), || {
        if killed.0.is_none() && big.status().is_some() {
            killed.0 = Some(start.elapsed());
        }
        if killed.1.is_none() && noisy.status().is_some() {
            killed.1 = Some(start.elapsed());
        }
        killed.0.is_some() && killed.1.is_some()
    });
    let sig = |p: &mut Puppet| p.status().and_then(|s| s.signal());
    let (big_sig, noisy_sig) = (sig(&mut big), sig(&mut noisy));
    v.check(
        "both holders were killed by the policy's SIGKILL within 2 s of the unbind",
        big_sig == Some(libc::SIGKILL)
            && noisy_sig == Some(libc::SIGKILL)
            && killed.0.is_some_and(|d| d < Duration::from_secs(2))
            && killed.1.is_some_and(|d| d < Duration::from_secs(2)),
        format!("signals {big_sig:?}/{noisy_sig:?} after {killed:?}"),
    );
    drop((half, mute));
    let alive = m.alive();
    let out = m.finish()?;
    v.check(
        "the agent was still running after the departure",
        alive,
        out.stderr.clone(),
    );
    let dep = out.departing(&fs.dev.block);
    let listed = dep
        .as_ref()
        .and_then(|d| d.holders.iter().find(|h| h.pid == big.pid))
        .map(|h| h.pages);
    v.check(
        "the departure listed the unprivileged holder with its 4 pages",
        listed == Some(4),
        format!("{listed:?}"),
    );
    let signalled: Vec<u32> = out
        .enforcement()
        .filter(|a| a.action == "signal")
        .map(|a| a.pid)
        .collect();
    v.check(
        "enforcement lines name both holders",
        signalled.contains(&big.pid) && signalled.contains(&noisy.pid),
        format!("{signalled:?}"),
    );
    let log = std::fs::read_to_string(audit).unwrap_or_default();
    v.check(
        "the audit log recorded both signals",
        [big.pid, noisy.pid].iter().all(|p| {
            log.lines()
                .any(|l| l.contains("\"action\":\"signal\"") && l.contains(&format!("\"pid\":{p}")))
        }),
        log.clone(),
    );
    v.count("unbind_ms", json!(unbind_ms));
    v.count(
        "killed_after_ms",
        json!([
            killed.0.map(|d| d.as_secs_f64() * 1e3),
            killed.1.map(|d| d.as_secs_f64() * 1e3)
        ]),
    );
    v.count("lines", json!(out.lines.len()));
    // Killed holders of a pulled device: left as they are (see departure::leave_behind).
    std::mem::forget(big);
    std::mem::forget(noisy);
    Ok(v.done(format!(
        "64 TiB mapping by uid {NOBODY}: agent alive, 4 pages reported; holders killed {:.0}/{:.0} ms after the unbind began with stdout blocked and two stalled clients",
        killed.0.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        killed.1.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
    )))
}

/// Programs of ours still loaded (kernel names are truncated to 15 characters).
fn ours_loaded() -> usize {
    sys::bpf_prog_names()
        .map(|n| n.iter().filter(|n| n.starts_with("dax_")).count())
        .unwrap_or(usize::MAX)
}

/// The audit log's records (every line must be whole JSON: a torn one is `None`).
fn audit_records(path: &str) -> Vec<Option<Value>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn actions(records: &[Option<Value>]) -> Vec<String> {
    records
        .iter()
        .flatten()
        .filter_map(|r| r["action"].as_str().map(str::to_string))
        .collect()
}

/// Waits until the audit log says a signal to `pid` was sent: its `signal` record (written
/// before the send) and then the `result` record for the same pid (written after it). A kill
/// between the two is a legitimate end of the log, so waiting for the first alone would let
/// the scenario race the agent's next write.
fn signal_recorded(path: &str, pid: u32, within: Duration) -> bool {
    sys::wait_for(within, || {
        let records = audit_records(path);
        let of_pid = |r: &&Value| r["pid"].as_u64() == Some(pid as u64);
        let mut mine = records.iter().flatten().filter(of_pid);
        mine.any(|r| r["action"] == "signal") && mine.any(|r| r["action"] == "result")
    })
}

/// The agent SIGKILLed in the middle of a drain (during the grace after SIGTERM) and in the
/// middle of an enforcement (the same point of a departure): the audit log says exactly what
/// happened and no more, no fence outlives the agent, and a restarted agent still finds the
/// holder (live map, and the stale mapping after the departure).
pub fn killed_mid_action(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "killed")?;
    let file = scratch_file(&fs, "killed", MIB)?;
    let mut v = Verdict::new();
    let mut p = Puppet::spawn()?;
    p.ignore(libc::SIGTERM)?;
    let a = p.map(&file, 0, MIB, true, Huge::Pte)?;
    // Half the pages now; the other half after the drain's death proves no fence is left.
    p.touch(a, MIB / 2, false, 4096)?;

    // 1. A drain killed while it waits out the grace it gave the holder.
    let drain_audit = "/tmp/audit-killed-drain.jsonl";
    let _ = std::fs::remove_file(drain_audit);
    let mut drain = Command::new(AGENT)
        .args([
            "drain",
            &fs.dev.block,
            "--signal",
            "TERM",
            "--grace",
            "60s",
            "--then",
            "KILL",
            "--unbind",
            "--audit-log",
            drain_audit,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let seen = signal_recorded(drain_audit, p.pid, Duration::from_secs(90));
    let _ = drain.kill();
    let _ = drain.wait();
    let records = audit_records(drain_audit);
    let acts = actions(&records);
    v.check(
        "the killed drain's audit log is whole JSON and ends with the SIGTERM it sent",
        seen && records.iter().all(Option::is_some)
            && acts.ends_with(&["signal".to_string(), "result".to_string()]),
        format!("{acts:?}"),
    );
    v.check(
        "the log claims no step the drain did not reach",
        !acts
            .iter()
            .any(|a| ["escalate", "unmount", "unbind", "done"].contains(&a.as_str())),
        format!("{acts:?}"),
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    v.check(
        "and indeed: the holder lives, the device is bound and mounted",
        p.status().is_none()
            && pmem::is_bound(&fs.dev)
            && mountinfo.contains(&format!(" {} ", fs.mnt)),
        format!(
            "holder {:?}, bound {}, mounted {}",
            p.status(),
            pmem::is_bound(&fs.dev),
            mountinfo.contains(&format!(" {} ", fs.mnt))
        ),
    );
    let mut loaded = ours_loaded();
    sys::wait_for(Duration::from_secs(5), || {
        loaded = ours_loaded();
        loaded == 0
    });
    let touched = p.touch(a + MIB / 2, MIB / 2, false, 4096);
    let now = present(p.pid, a, MIB);
    v.check(
        "no fence outlives the drain: no programs of ours, and the holder faults in the rest",
        loaded == 0 && touched.is_ok() && now == 256,
        format!("{loaded} programs, touch {touched:?}, {now}/256 pages present"),
    );

    // 2. A restarted agent finds the holder; then it is killed mid-enforcement.
    let (policy, enf_audit) = signal_policy("killed-enforce", &fs.dev.block, "TERM", "60s")?;
    let enf_audit = enf_audit.as_str();
    let m = crate::agent::Monitor::start(
        "killed",
        &["--enforce", "--policy", &policy, "--audit-log", enf_audit],
    )?;
    let (code, out, err) = run_once(&["holders", &format!("/dev/{}", fs.dev.block), "--json"])?;
    let listed = holder_pages(
        &serde_json::from_str(out.trim()).unwrap_or(Value::Null),
        p.pid,
    );
    v.check(
        "the restarted agent lists the holder with all 256 pages",
        code == Some(0) && listed == Some(256),
        format!("exit {code:?}, {listed:?}: {}", err.trim()),
    );
    pmem::unbind_fsdax(&fs.dev)?;
    let seen = signal_recorded(enf_audit, p.pid, Duration::from_secs(10));
    let pid = m.pid().unwrap_or(0);
    // SAFETY: our child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = m.peek()?;
    std::thread::sleep(Duration::from_millis(300));
    let records = audit_records(enf_audit);
    let acts = actions(&records);
    v.check(
        "the killed monitor's audit log is whole and says: decided, sent SIGTERM, nothing more",
        seen && records.iter().all(Option::is_some)
            && acts.contains(&"decide".to_string())
            && acts.ends_with(&["signal".to_string(), "result".to_string()])
            && !acts.contains(&"escalate".to_string()),
        format!("{acts:?}"),
    );
    v.check(
        "and indeed: the holder ignored it and lives",
        p.status().is_none(),
        format!("{:?}", p.status()),
    );
    v.check(
        "the departure was reported before the kill",
        out.departing(&fs.dev.block).is_some(),
        format!("{} lines", out.lines.len()),
    );
    // The kernel frees a dead process's programs after its fds are closed, not at once.
    let mut loaded = ours_loaded();
    sys::wait_for(Duration::from_secs(5), || {
        loaded = ours_loaded();
        loaded == 0
    });
    let (code, out, err) = run_once(&["audit", "--json"])?;
    let stale: u64 = match parse_line(out.trim()) {
        Ok(crate::agent::Line::Audit(a)) => a
            .stale
            .iter()
            .filter(|s| s.pid == p.pid)
            .map(|s| s.pages)
            .sum(),
        _ => 0,
    };
    v.check(
        "after the agent's death no programs of ours remain, and audit reports the holder's stale mapping",
        loaded == 0 && code == Some(1) && stale > 0,
        format!("{loaded} programs; audit exit {code:?}, {stale} pages: {}", err.trim()),
    );
    v.count("drain_audit", json!(actions(&audit_records(drain_audit))));
    v.count("enforce_audit", json!(acts));
    v.count("stale_pages", json!(stale));
    // A holder of a pulled device: left as it is (see departure::leave_behind).
    std::mem::forget(p);
    Ok(v.done(format!(
        "drain and monitor SIGKILLed after their SIGTERM: audit logs end there; no fence left; restarted agent listed 256 pages, audit {stale} stale"
    )))
}
