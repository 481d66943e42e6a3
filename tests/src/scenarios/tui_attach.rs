//! `dax-probe tui` with a monitor running attaches to it: one set of dax-probe programs in
//! the kernel (the monitor's), the dashboard shows the holder the monitor's `holders` answer
//! and the page tables show, and when the monitor stops the dashboard says the agent is
//! gone instead of showing the last map as live.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::json;

use super::{
    Checked, Env, Target, fs_of,
    tui::{row_key, tmux},
};
use crate::{
    agent::{AGENT, Monitor},
    pmem,
    puppet::{Huge, Puppet},
    sys, truth,
};

const SESSION: &str = "dax-tui-attach";
const ERR: &str = "/tmp/tui-attach.err";
const EXIT: &str = "/tmp/tui-attach.exit";

fn screen() -> String {
    tmux(&["capture-pane", "-p", "-t", SESSION]).unwrap_or_default()
}

/// The eBPF programs process `pid` holds (prog and link fds name them in their fdinfo).
fn prog_ids(pid: u32) -> BTreeSet<u32> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return BTreeSet::new();
    };
    fds.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|v| v.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Every program any process holds.
fn all_prog_ids() -> BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .flat_map(prog_ids)
                .collect()
        })
        .unwrap_or_default()
}

fn tui_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.starts_with(AGENT) && cmd.contains("\0tui\0")).then_some(pid)
    })
}

fn holder_row(screen: &str, pid: u32) -> Option<String> {
    screen
        .lines()
        .find(|l| {
            l.split_whitespace()
                .any(|w| w.trim_start_matches('▸') == pid.to_string())
                && l.contains("tui-attach-data")
        })
        .map(str::to_string)
}

pub fn run(env: &Env, t: Target) -> Result<Checked> {
    let fs = fs_of(env, t)?;
    let dev = fs.dev.block.clone();
    let file = format!("{}/tui-attach-data", fs.mnt);
    const LEN: u64 = 1 << 20;
    pmem::write_file(std::path::Path::new(&file), LEN as usize)?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    let mut check = |what: &str, holds: bool, got: String| {
        if holds {
            ok.push(what.to_string());
        } else {
            bad.push(format!("{what}: {got}"));
        }
    };
    let t0 = Instant::now();
    // The holder maps before the monitor starts: its start-up scan finds it.
    let mut p = Puppet::spawn()?;
    let a = p.map(&file, 0, LEN, true, Huge::Pte)?;
    p.touch(a, LEN, false, 4096)?;
    let m = Monitor::start("tui-attach", &[])?;
    let monitor_pid = m.pid().context("the monitor's pid")?;
    let cmd = format!("{AGENT} tui --device {dev} 2>{ERR}; echo TUI-EXIT=$? >{EXIT}; sleep 600");
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
    let mut row = None;
    let shown = sys::wait_for(Duration::from_secs(20), || {
        let s = screen();
        row = holder_row(&s, p.pid);
        s.contains("live/attached") && row.is_some()
    });
    let attached_screen = screen();
    check(
        "the dashboard attached to the monitor and shows the holder",
        shown,
        format!(
            "{attached_screen}\n{}",
            std::fs::read_to_string(ERR).unwrap_or_default()
        ),
    );
    // One set of programs: the monitor's; the dashboard loaded none.
    let tui = tui_pid();
    let mine = prog_ids(monitor_pid);
    let theirs = tui.map(prog_ids).unwrap_or_default();
    let all = all_prog_ids();
    check(
        "one set of programs in the kernel: the monitor's; the dashboard holds none",
        tui.is_some() && !mine.is_empty() && theirs.is_empty() && all == mine,
        format!(
            "tui {tui:?} holds {theirs:?}, monitor {monitor_pid} holds {} programs, {} held in all",
            mine.len(),
            all.len()
        ),
    );
    // Same holder as the page tables and the monitor's answer.
    let kernel = truth::kernel_pages(&env.space())?;
    let truth_pages = kernel.iter().filter(|(pid, ..)| *pid == p.pid).count();
    let (agent, _) = truth::agent_pages(false)?;
    let agent_pages = agent.iter().filter(|(pid, ..)| *pid == p.pid).count();
    let shown_pages: Option<usize> = row
        .as_deref()
        .and_then(|r| row_key(r).get(3).and_then(|n| n.parse().ok()));
    check(
        "dashboard, monitor's `holders` and page tables agree on the holder's pages",
        truth_pages == (LEN / 4096) as usize
            && agent_pages == truth_pages
            && shown_pages == Some(truth_pages),
        format!("page tables {truth_pages}, holders {agent_pages}, dashboard {shown_pages:?}"),
    );

    // The monitor stops: the dashboard must not go on showing its map as live.
    m.stop()?;
    let t1 = Instant::now();
    let gone = sys::wait_for(Duration::from_secs(10), || {
        let s = screen();
        s.contains("AGENT GONE") && !s.contains("live/attached")
    });
    check(
        "after the monitor stopped the dashboard says the agent is gone",
        gone,
        format!("after {:?}:\n{}", t1.elapsed(), screen()),
    );
    if let Some(pid) = tui_pid() {
        // SAFETY: signalling a process this scenario started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let exited = sys::wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(EXIT).is_ok_and(|s| s.contains("TUI-EXIT"))
    });
    let err = std::fs::read_to_string(ERR).unwrap_or_default();
    check(
        "its last words say it was attached and the monitor went away",
        exited && err.contains("was attached to a monitor") && err.contains("went away"),
        err.clone(),
    );
    let _ = tmux(&["kill-session", "-t", SESSION]);
    drop(p);
    let _ = std::fs::remove_file(&file);
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Checked {
        passed: bad.is_empty(),
        summary: format!(
            "attached: {} programs (the monitor's only), {} pages shown as the page tables \
             map them; agent gone shown; {seconds:.1} s",
            mine.len(),
            truth_pages
        ),
        counts: json!({
            "programs": mine.len(),
            "pages": truth_pages,
            "seconds": seconds,
        }),
        details: bad,
    })
}
