//! The real `dax-probe tui` in tmux: the dashboard shows a workload's pid and file in the
//! holders pane within 2 s of its faults, the device `gone` with the departure in the event
//! log after an unbind, leaves the terminal as it found it on SIGTERM, and a replay of a
//! `monitor --json` recording of the same session shows the same holder.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::{Checked, Env, Target};
use crate::{
    agent::{AGENT, Monitor, run_once},
    pmem,
    puppet::{Huge, Puppet},
    sys,
};

const MIB: u64 = 1 << 20;
const TMUX: &str = "/sbin/tmux";
const SESSION: &str = "dax-tui";

pub(super) fn tmux(args: &[&str]) -> Result<String> {
    let out = Command::new(TMUX)
        .arg("-u") // UTF-8 even without a locale: the panes draw box characters
        .args(args)
        .env("TERM", "xterm-256color")
        .env("LC_CTYPE", "C.UTF-8")
        .env("TMUX_TMPDIR", "/tmp")
        .output()
        .context("spawn tmux")?;
    if !out.status.success() {
        bail!(
            "tmux {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn screen() -> String {
    tmux(&["capture-pane", "-p", "-t", SESSION]).unwrap_or_default()
}

/// The holders pane's row of process `pid` holding the test file.
fn holder_row(screen: &str, pid: u32) -> Option<String> {
    screen
        .lines()
        .find(|l| {
            l.split_whitespace()
                .any(|w| w.trim_start_matches('▸') == pid.to_string())
                && l.contains("dax-workload")
                && l.contains("tui-data")
        })
        .map(str::to_string)
}

/// `dax-probe tui --replay FILE --print-frame 120x36 --device DEV`: (frame, stderr).
fn replay_frame(file: &str, dev: &str) -> Result<(String, String)> {
    let out = Command::new(AGENT)
        .args([
            "tui",
            "--replay",
            file,
            "--print-frame",
            "120x36",
            "--device",
            dev,
        ])
        .output()?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// (pid, comm, file, pages, page size) from a holders row; the age column is left out.
pub(super) fn row_key(row: &str) -> Vec<String> {
    row.trim_matches(|c| c == '│' || c == ' ')
        .trim_start_matches('▸')
        .split_whitespace()
        .take(5)
        .map(str::to_string)
        .collect()
}

fn device_row(screen: &str, dev: &str) -> Option<String> {
    screen
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == dev) && l.contains("fsdax"))
        .map(str::to_string)
}

fn tui_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.starts_with(AGENT) && cmd.contains("\0tui\0")).then_some(pid)
    })
}

/// The kernel hook the agent uses to see a device leave, per `doctor` (None: it has only
/// the after-the-fact userspace fallback, as on 5.10).
fn departure_hook() -> Option<String> {
    let (_, out, _) = run_once(&["doctor", "--json"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v["concerns"]
        .as_array()?
        .iter()
        .find(|c| c["concern"] == "departure")?["chosen"]
        .as_str()
        .filter(|c| !c.starts_with("userspace"))
        .map(str::to_string)
}

pub fn run(env: &Env, t: Target) -> Result<Checked> {
    let hook = departure_hook();
    let fs = env.fresh(t, "tui")?;
    let dev = fs.dev.block.clone();
    let file = format!("{}/tui-data", fs.mnt);
    pmem::write_file(std::path::Path::new(&file), (4 * MIB) as usize)?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    let mut check = |what: &str, holds: bool, got: String| {
        if holds {
            ok.push(what.to_string());
        } else {
            bad.push(format!("{what}: {got}"));
        }
    };

    // A recording of the same session, for the replay comparison.
    let rec = Monitor::start("tui-recording", &["--no-socket"])?;
    let cmd = format!(
        "{AGENT} tui --device {dev} 2>/tmp/tui.err; echo TUI-EXIT=$? >/tmp/tui.exit; sleep 600"
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        SESSION,
        "-x",
        "120",
        "-y",
        "36",
        &cmd,
    ])?;
    let attached = sys::wait_for(Duration::from_secs(150), || {
        device_row(&screen(), &dev).is_some()
    });
    if !attached {
        let err = std::fs::read_to_string("/tmp/tui.err").unwrap_or_default();
        let _ = tmux(&["kill-server"]);
        bail!(
            "the dashboard never showed {dev}: {}\n{}",
            err.trim(),
            screen()
        );
    }

    let mut p = Puppet::spawn()?;
    let a = p.map(&file, 0, 4 * MIB, true, Huge::Pte)?;
    p.touch(a, 4 * MIB, false, 4096)?;
    let t0 = Instant::now();
    let mut live_row = None;
    sys::wait_for(Duration::from_secs(10), || {
        let s = screen();
        live_row = holder_row(&s, p.pid);
        live_row.is_some()
    });
    // The recording so far (a monitor still writing it: its last line may be cut).
    rec.wait_for_faults(p.pid, 1024, Duration::from_secs(10));
    let rec_path = "/tmp/agent-tui-recording.jsonl";
    std::fs::copy(rec_path, "/tmp/tui-recording-before-unbind.jsonl")?;
    let shown_after = t0.elapsed();
    // The agent may still be working through the burst of 1024 faults (TCG is slow): wait
    // for the row to settle before comparing it with the replay.
    sys::wait_for(Duration::from_secs(20), || {
        live_row = holder_row(&screen(), p.pid);
        live_row
            .as_deref()
            .is_some_and(|r| row_key(r).get(3).map(String::as_str) == Some("1024"))
    });
    let live_row = live_row.unwrap_or_default();
    check(
        "holders pane shows the workload's pid and file within 2 s",
        !live_row.is_empty() && shown_after <= Duration::from_secs(2),
        format!("after {shown_after:?}: {live_row:?}\n{}", screen()),
    );
    check(
        "the row counts its 1024 pages",
        row_key(&live_row).get(3).map(String::as_str) == Some("1024"),
        live_row.clone(),
    );

    pmem::unbind_fsdax(&fs.dev)?;
    let t1 = Instant::now();
    let gone = sys::wait_for(Duration::from_secs(10), || {
        let s = screen();
        device_row(&s, &dev).is_some_and(|r| r.contains("gone"))
            && s.contains(&format!("{dev} GONE"))
            && s.contains(&format!("{dev} DEPARTING"))
    });
    let after_unbind = screen();
    // Without a departure hook the agent learns of the unbind only at its next topology
    // refresh: nothing to show within the scenario's time, and nothing to assert.
    if hook.is_some() {
        check(
            "device shows gone and the departure is in the event log",
            gone,
            format!("after {:?}:\n{after_unbind}", t1.elapsed()),
        );
    }

    // SIGTERM: the dashboard leaves, the screen is the shell's again, exit status 0.
    let pid = tui_pid().context("dax-probe tui not found")?;
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let exited = sys::wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string("/tmp/tui.exit").is_ok_and(|s| s.contains("TUI-EXIT"))
    });
    let exit = std::fs::read_to_string("/tmp/tui.exit").unwrap_or_default();
    let err = std::fs::read_to_string("/tmp/tui.err").unwrap_or_default();
    let restored = screen();
    check(
        "SIGTERM ends it with status 0 and its counts",
        exited && exit.trim() == "TUI-EXIT=0" && err.contains("dax-probe tui:"),
        format!("{exit:?} {err:?}"),
    );
    check(
        "the terminal is restored (no dashboard left on the screen)",
        !restored.contains("Holders of") && !restored.contains("┌ Devices"),
        restored.clone(),
    );
    let _ = tmux(&["kill-server"]);

    // Replay the recording without the machine's state: same holder, device gone.
    let out = rec.stop()?;
    let text = std::fs::read_to_string(rec_path)?;
    let kinds = ["topology", "holders", "file"];
    for k in kinds {
        check(
            &format!("the recording carries {k} lines"),
            out.of_type(k).next().is_some(),
            "none".into(),
        );
    }
    let (before, before_err) = replay_frame("/tmp/tui-recording-before-unbind.jsonl", &dev)?;
    let replay_row = holder_row(&before, p.pid).unwrap_or_default();
    check(
        "replay shows the same holder row (pid, comm, file, pages, size) as the live run",
        !replay_row.is_empty() && row_key(&replay_row) == row_key(&live_row),
        format!("live {live_row:?}, replay {replay_row:?}\n{before}{before_err}"),
    );
    let (frame, replay_err) = replay_frame(rec_path, &dev)?;
    check(
        if hook.is_some() {
            "replay shows the device gone and agrees with the departure report"
        } else {
            "replay ends without a departure report either (no departure hook)"
        },
        if hook.is_some() {
            device_row(&frame, &dev).is_some_and(|r| r.contains("gone"))
                && replay_err.contains("1 departure report(s) agree")
                && replay_err.contains("0 disagree")
        } else {
            replay_err.contains("0 departure report(s) agree") && replay_err.contains("0 disagree")
        },
        format!("{frame}{replay_err}"),
    );
    // Bad input: no root for live (points to --replay), a missing recording, a bad speed;
    // and a replay needs no root at all.
    let nobody = |args: &[&str]| -> Result<(Option<i32>, String, String)> {
        use std::os::unix::process::CommandExt;
        let out = Command::new(AGENT)
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (code, _, err) = nobody(&["tui"])?;
    check(
        "live dashboard as nobody -> exit 77 pointing to --replay",
        code == Some(77) && err.contains("--replay") && err.contains("sudo"),
        format!("exit {code:?}: {}", err.trim()),
    );
    let (code, out, err) = nobody(&["tui", "--replay", rec_path, "--print-frame", "80x24"])?;
    check(
        "replay as nobody works (exit 0, the device in the frame)",
        code == Some(0) && out.contains(&dev),
        format!("exit {code:?}: {}", err.trim()),
    );
    let (code, _, err) = nobody(&["tui", "--replay", "/nonexistent.jsonl"])?;
    check(
        "missing recording -> exit 66",
        code == Some(66) && err.contains("/nonexistent.jsonl"),
        format!("exit {code:?}: {}", err.trim()),
    );
    let (code, _, err) = nobody(&["tui", "--replay", rec_path, "--speed", "0"])?;
    check(
        "speed 0 -> exit 2",
        code == Some(2),
        format!("exit {code:?}: {}", err.trim()),
    );

    // The holder of a pulled device stays behind (see departure.rs).
    std::mem::forget(p);
    Ok(Checked {
        passed: bad.is_empty(),
        summary: format!(
            "holder shown {:.0} ms after its faults; {}; SIGTERM restored the terminal; replay \
             of {} recorded lines matches",
            shown_after.as_secs_f64() * 1000.0,
            match &hook {
                Some(_) => "gone+departure shown".to_string(),
                None => "no departure hook on this kernel: gone not checked".to_string(),
            },
            text.lines().count()
        ),
        counts: json!({
            "shown_ms": shown_after.as_millis() as u64,
            "recorded_lines": text.lines().count(),
        }),
        details: bad,
    })
}
