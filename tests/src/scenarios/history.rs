//! Incident history survives the agent: a memory failure and a departure are recorded, the
//! agent is SIGKILLed and started again, and `dax-probe history --json` (read while the new
//! agent runs) still lists both with the files and holders the page tables showed before the
//! incidents; SQLite's integrity check of the database says `ok`.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use dax_probe::schema::{Incident, IncidentKind};
use serde_json::{Value, json};

use super::{Checked, Env, Target};
use crate::{
    agent::{Line, Monitor, parse_line, run_once},
    pagemap, pmem,
    puppet::{Huge, Puppet},
    sys,
};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

pub fn run(env: &Env, t: Target) -> Result<Checked> {
    let db = format!("/tmp/history-{t}.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db}{suffix}"));
    }
    // The memory failure hits a file of its own on the shared file system (this scenario
    // runs after every other user of it; the poisoned page stays with that file); the
    // departure takes a device of the spare pool.
    let shared = env.fs(t).with_context(|| format!("{t} was not prepared"))?;
    let poisoned = format!("{}/history-poison", shared.mnt);
    pmem::write_file(Path::new(&poisoned), (4 * MIB) as usize)?;
    let fresh = env.fresh(t, "history")?;
    let departing = format!("{}/history-unbind", fresh.mnt);
    pmem::write_file(Path::new(&departing), (4 * MIB) as usize)?;

    let mut bad: Vec<String> = Vec::new();
    let mut check = |what: &str, holds: bool, got: String| {
        if !holds {
            bad.push(format!("{what}: {got}"));
        }
    };

    let mut holder = Puppet::spawn()?;
    let ha = holder.map(&poisoned, 0, 4 * MIB, true, Huge::Pte)?;
    holder.touch(ha, 4 * MIB, false, PAGE)?;
    let mut inj = Puppet::spawn()?;
    let ia = inj.map(&poisoned, 0, 4 * MIB, true, Huge::Pte)?;
    inj.touch(ia, 4 * MIB, false, PAGE)?;
    let mut leaver = Puppet::spawn()?;
    let la = leaver.map(&departing, 0, 4 * MIB, true, Huge::Pte)?;
    leaver.touch(la, 4 * MIB, false, PAGE)?;
    leaver.catch_sigbus()?;

    let agent_args = ["--history-db", db.as_str()];
    let started = std::time::Instant::now();
    let m = Monitor::start(&format!("history-{t}"), &agent_args)?;

    // Ground truth before the incidents: who maps the page to be poisoned, and that the
    // leaver's pages lie in the departing device.
    let page = 5u64;
    let truth_pfn = pagemap::pfns(inj.pid, ia + page * PAGE, PAGE)?[0]
        .context("the injector's page is not present")?;
    let mut want_mf: Vec<u32> = vec![inj.pid];
    if pagemap::pfns(holder.pid, ha + page * PAGE, PAGE)?[0] == Some(truth_pfn) {
        want_mf.push(holder.pid);
    }
    want_mf.sort();
    let leaver_pfns = pagemap::pfns(leaver.pid, la, 4 * MIB)?;
    let leaver_pages = leaver_pfns
        .iter()
        .filter(|p| p.is_some_and(|p| fresh.dev.contains_pfn(p)))
        .count() as u64;
    check(
        "the leaver maps 1024 pages of the departing device (pagemap)",
        leaver_pages == 1024,
        format!("{leaver_pages} pages"),
    );

    let rc = inj.poison(ia + page * PAGE);
    sys::wait_for(Duration::from_secs(3), || inj.status().is_some());
    let u = pmem::Unbind::start(&fresh.dev);
    let fate = match u.wait(Duration::from_secs(10)) {
        Some(r) => r.map(|_| "returned"),
        None => {
            // Some kernels hold the unbind until every holder let go.
            // SAFETY: our child.
            unsafe { libc::kill(leaver.pid as i32, libc::SIGKILL) };
            match u.wait(Duration::from_secs(20)) {
                Some(r) => r.map(|_| "blocked until the holder was killed"),
                None => Ok("wedged"),
            }
        }
    }?;
    // Both incidents printed (so handed to the writer thread), then a moment for its
    // commits; then the agent dies without any chance to flush.
    let printed = sys::wait_for(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&m.out).unwrap_or_default();
        text.contains("\"type\":\"memory_failure_result\"")
            && text.contains("\"type\":\"device_departing\"")
    });
    check(
        "the agent printed the memory failure's result and the departure",
        printed,
        format!("madvise {rc:?}, unbind {fate}"),
    );
    // Then until `history` shows both committed (ground truth for "recorded"), so that
    // what the restart must keep is known to have been on disk before the SIGKILL.
    let first_pid = m.pid().context("agent pid")?;
    let mut before: Vec<Incident> = Vec::new();
    let committed = sys::wait_for(Duration::from_secs(5), || {
        before = history_json(&db).map(|(_, i)| i).unwrap_or_default();
        before
            .iter()
            .any(|i| i.kind == IncidentKind::MemoryFailure && i.result.is_some())
            && before.iter().any(|i| i.kind == IncidentKind::Departure)
    });
    check(
        "the running agent committed both incidents",
        committed,
        format!(
            "history before the kill: {before:?}; {}; agent threads: {}",
            db_files(&db),
            threads(first_pid)
        ),
    );
    let first_err = m.err.clone();
    // SAFETY: our child (the Monitor's).
    unsafe { libc::kill(first_pid as i32, libc::SIGKILL) };
    drop(m);

    let m2 = Monitor::start(&format!("history-{t}-again"), &agent_args)?;
    let (code, incidents) = match history_json(&db) {
        Ok((code, i)) => (code, i),
        Err(e) => (None, {
            check("history --json prints incidents", false, format!("{e:#}"));
            Vec::new()
        }),
    };
    check(
        "history --json answers while the new agent runs",
        code == Some(0),
        format!("exit {code:?}; {}", db_files(&db)),
    );
    let mf = incidents
        .iter()
        .find(|i| i.kind == IncidentKind::MemoryFailure && i.pfn == Some(truth_pfn));
    let mut mf_pids: Vec<u32> = mf
        .map(|i| i.holders.iter().map(|h| h.pid).collect())
        .unwrap_or_default();
    mf_pids.sort();
    mf_pids.dedup();
    check(
        "the memory failure is listed with the holders pagemap showed",
        mf_pids == want_mf,
        format!("holders {mf_pids:?}, expected {want_mf:?}; incident {mf:?}"),
    );
    check(
        "with the poisoned file and offset",
        mf.is_some_and(|i| {
            !i.files.is_empty()
                && i.files.iter().all(|f| {
                    f.path.as_deref() == Some(poisoned.as_str()) && f.offset == page * PAGE
                })
        }),
        format!("files {:?}", mf.map(|i| &i.files)),
    );
    check(
        "and the kernel's verdict",
        mf.is_some_and(|i| i.result.is_some()),
        format!("result {:?}", mf.map(|i| &i.result)),
    );
    let dep = incidents.iter().find(|i| {
        i.kind == IncidentKind::Departure && i.device.as_deref() == Some(&fresh.dev.block)
    });
    let row = dep.and_then(|d| d.holders.iter().find(|h| h.pid == leaver.pid));
    check(
        "the departure is listed with its holder, file and 1024 pages",
        row.is_some_and(|r| {
            r.pages == leaver_pages && r.file.as_deref() == Some(departing.as_str())
        }),
        format!("departure {dep:?}"),
    );
    let (dcode, dout, _) = run_once(&[
        "history",
        "--json",
        "--device",
        &fresh.dev.dev_path(),
        "--history-db",
        &db,
    ])?;
    let only_dep = dout.lines().filter(|l| !l.trim().is_empty()).count();
    check(
        "--device lists that device's incidents only",
        dcode == Some(0) && only_dep >= 1 && only_dep < incidents.len(),
        format!("{only_dep} of {} line(s)", incidents.len()),
    );
    let (ccode, cout, cerr) = run_once(&["history", "--check", "--history-db", &db])?;
    check(
        "PRAGMA integrity_check says ok",
        ccode == Some(0) && cout.trim() == "ok",
        format!("exit {ccode:?}: {} {}", cout.trim(), cerr.trim()),
    );
    let first_err = std::fs::read_to_string(&first_err).unwrap_or_default();
    let out2 = m2.stop()?;
    check(
        "neither agent gave up its history or dropped an incident",
        !format!("{first_err}{}", out2.stderr).contains("incident history")
            && !format!("{first_err}{}", out2.stderr).contains("panicked"),
        format!("{} / {}", first_err.trim(), out2.stderr.trim()),
    );
    let secs = started.elapsed().as_secs_f64();
    // The leaver maps a device that is gone: left as it is (see departure.rs).
    std::mem::forget(leaver);
    drop((holder, inj));
    let summary = format!(
        "after SIGKILL and restart: {} incident(s); memory failure at pfn {truth_pfn:#x} with \
         holders {mf_pids:?}, departure of {} ({fate}) with {} page(s) held",
        incidents.len(),
        fresh.dev.block,
        row.map_or(0, |r| r.pages)
    );
    let counts: Value = json!({
        "incidents": incidents.len(),
        "memory_failure_holders": mf_pids,
        "unbind": fate,
        "seconds": secs,
    });
    Ok(Checked {
        passed: bad.is_empty(),
        summary,
        counts,
        details: bad,
    })
}

/// `dax-probe history --json` on `db`: its exit code and the incidents it printed.
fn history_json(db: &str) -> Result<(Option<i32>, Vec<Incident>)> {
    let (code, out, err) = run_once(&["history", "--json", "--history-db", db])?;
    anyhow::ensure!(code == Some(0), "history exit {code:?}: {}", err.trim());
    let incidents = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match parse_line(l)? {
            Line::Incident(i) => Ok(i),
            other => anyhow::bail!("history printed a line that is no incident: {other:?}"),
        })
        .collect::<Result<_>>()?;
    Ok((code, incidents))
}

/// The database's files and sizes (for a failure's details).
fn db_files(db: &str) -> String {
    ["", "-wal", "-shm"]
        .iter()
        .map(|s| {
            let p = format!("{db}{s}");
            match std::fs::metadata(&p) {
                Ok(m) => format!("{p}: {} bytes", m.len()),
                Err(e) => format!("{p}: {e}"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Thread names and states of a process (is its history writer alive, and where).
fn threads(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    tasks
        .flatten()
        .map(|t| {
            let d = t.path();
            let comm = std::fs::read_to_string(d.join("comm")).unwrap_or_default();
            let wchan = std::fs::read_to_string(d.join("wchan")).unwrap_or_default();
            format!("{} ({})", comm.trim(), wchan.trim())
        })
        .collect::<Vec<_>>()
        .join(", ")
}
