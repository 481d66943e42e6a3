//! fault-trace: a workload maps DAX files and touches every page, 4 MiB with 4 KiB faults and
//! 8 MiB with 2 MiB faults. The agent must report a fault for every page, with the tgid,
//! inode, device and pfn that `/proc/PID/pagemap` and `stat` show, and every pfn must lie in
//! the device's physical range from sysfs.

use std::path::Path;

use anyhow::{Result, bail};
use dax_probe::probe::plan::Concern;
use serde_json::json;

use super::{
    Checked, DaxFs, Env,
    compare::{Expect, tally},
};
use crate::{
    agent::{Fault, Monitor},
    pagemap, pmem,
    puppet::{Huge, Puppet},
    sys,
};

const MIB: u64 = 1 << 20;

/// Preferred hooks (whatever the agent picks on this kernel).
pub fn run(_env: &Env, fs: &DaxFs) -> Result<Checked> {
    trace(fs, "fault-trace", &[], None, None)
}

/// The fallback hooks: raw tracepoint with probe reads, kprobe on the insert function.
pub fn run_fallback(_env: &Env, fs: &DaxFs) -> Result<Checked> {
    trace(
        fs,
        "fallback",
        &["--skip-hooks", "tp_btf,fentry"],
        Some("raw_tp"),
        Some("kprobe"),
    )
}

/// No insert hook at all: pfns from /proc/PID/pagemap in the agent.
pub fn run_pagemap(_env: &Env, fs: &DaxFs) -> Result<Checked> {
    trace(
        fs,
        "pagemap",
        &["--skip-hooks", "fentry,kprobe"],
        Some("tp_btf"),
        Some("userspace"),
    )
}

fn trace(
    fs: &DaxFs,
    tag: &str,
    agent_args: &[&str],
    want_fault_hook: Option<&str>,
    want_pfn_hook: Option<&str>,
) -> Result<Checked> {
    let dir = format!("{}/fault-trace-{tag}", fs.mnt);
    std::fs::create_dir_all(&dir)?;
    let f4k = format!("{dir}/pte-4m");
    let f2m = format!("{dir}/pmd-8m");
    pmem::write_file(Path::new(&f4k), (4 * MIB) as usize)?;
    pmem::write_file(Path::new(&f2m), (8 * MIB) as usize)?;
    for f in [&f4k, &f2m] {
        if !sys::is_dax_file(Path::new(f))? {
            bail!("{f} is not DAX (statx has no STATX_ATTR_DAX): the mount did not enable DAX");
        }
    }
    let (dev4, ino4) = sys::stat_dev_ino(Path::new(&f4k))?;
    let (dev2, ino2) = sys::stat_dev_ino(Path::new(&f2m))?;

    let monitor = Monitor::start(&format!("fault-trace-{tag}-{}", fs.target), agent_args)?;
    let mut p = Puppet::spawn()?;
    let a4 = p.map(&f4k, 0, 4 * MIB, true, Huge::Pte)?;
    let touched4 = p.touch(a4, 4 * MIB, false, 4096)?;
    let a2 = p.map(&f2m, 0, 8 * MIB, true, Huge::Pmd)?;
    let touched2 = p.touch(a2, 8 * MIB, false, 4096)?;
    // Ground truth while the mappings are alive.
    let truth4 = pagemap::pfns(p.pid, a4, 4 * MIB)?;
    let truth2 = pagemap::pfns(p.pid, a2, 8 * MIB)?;
    let pid = p.pid;
    // 1024 PTE faults and 4 PMD faults must reach the agent before the process goes.
    monitor.wait_for_faults(pid, 1028, std::time::Duration::from_secs(20));
    p.exit()?;
    let out = monitor.stop()?;

    // Which hooks served the run (the attached line), against what the variant demands.
    let chosen = |concern: Concern| -> String {
        out.attached()
            .and_then(|a| a.hooks.iter().find(|x| x.concern == concern))
            .and_then(|x| x.chosen.as_deref())
            .unwrap_or("none")
            .to_string()
    };
    let (fault_hook, pfn_hook) = (chosen(Concern::FaultDone), chosen(Concern::FaultPfn));
    let hooks_ok = want_fault_hook.is_none_or(|w| fault_hook.starts_with(w))
        && want_pfn_hook.is_none_or(|w| pfn_hook.starts_with(w));

    let faults: Vec<Fault> = out.faults().cloned().collect();
    let t4 = tally(
        &faults,
        &Expect {
            label: "4K".into(),
            pid,
            dev: dev4,
            ino: ino4,
            addr: a4,
            truth: truth4.clone(),
            page_size: 4096,
        },
    );
    let t2 = tally(
        &faults,
        &Expect {
            label: "2M".into(),
            pid,
            dev: dev2,
            ino: ino2,
            addr: a2,
            truth: truth2.clone(),
            page_size: 2 * MIB,
        },
    );
    // Every pfn the agent reported for this workload must be on the device.
    let mine: Vec<_> = faults
        .iter()
        .filter(|e| e.tgid == pid && e.pfn.is_some())
        .collect();
    let outside: Vec<u64> = mine
        .iter()
        .filter_map(|e| e.pfn)
        .filter(|&pfn| !fs.dev.contains_pfn(pfn))
        .collect();
    let truth_outside = truth4
        .iter()
        .chain(truth2.iter())
        .flatten()
        .filter(|&&pfn| !fs.dev.contains_pfn(pfn))
        .count();
    let named_device = mine
        .iter()
        .filter(|e| e.device.as_deref() == Some(fs.dev.block.as_str()))
        .count();
    let dropped = out.summary().map(|s| s.dropped).unwrap_or(u64::MAX);
    // Where the kernel names the pfn, successive faults are coalesced: 1024 sequential
    // faults arrive as a few lines (one per range, plus one per poll that read a range
    // still growing), not 1024.
    let coalesced = pfn_hook.starts_with("userspace") || t4.events * 8 <= t4.pages;

    let passed = t4.perfect()
        && t2.perfect()
        && touched4 == 1024
        && touched2 == 2048
        && outside.is_empty()
        && truth_outside == 0
        && named_device == mine.len()
        && dropped == 0
        && coalesced
        && hooks_ok
        && out.exit_code == Some(0);
    let mut details: Vec<String> = t4
        .examples
        .iter()
        .chain(t2.examples.iter())
        .cloned()
        .collect();
    if !outside.is_empty() {
        details.push(format!(
            "{} agent pfns outside {} [{:#x}, {:#x}): first {:#x}",
            outside.len(),
            fs.dev.block,
            fs.dev.data_start,
            fs.dev.data_end,
            outside[0]
        ));
    }
    if named_device != mine.len() {
        details.push(format!(
            "{} of {} events did not name device {}",
            mine.len() - named_device,
            mine.len(),
            fs.dev.block
        ));
    }
    if !coalesced {
        details.push(format!(
            "{} lines for {} sequential 4K faults: not coalesced",
            t4.events, t4.pages
        ));
    }
    if !hooks_ok {
        details.push(format!(
            "hooks used: {fault_hook} / {pfn_hook}; wanted {want_fault_hook:?} / {want_pfn_hook:?}"
        ));
    }
    if out.exit_code != Some(0) || dropped != 0 {
        details.push(format!(
            "agent exit {:?}, dropped {dropped}, stderr: {}",
            out.exit_code,
            out.stderr.trim()
        ));
    }
    Ok(Checked {
        passed,
        summary: format!(
            "4K: {}/{} pages matched pagemap via {} events; 2M: {}/{} pages via {} PMD events; \
             {} pfns outside {} [{fault_hook} + {pfn_hook}]",
            t4.matched,
            t4.pages,
            t4.events,
            t2.matched,
            t2.pages,
            t2.events,
            outside.len(),
            fs.dev.block
        ),
        counts: json!({
            "pte": {"touched": touched4, "pagemap_present": t4.pages, "matched": t4.matched,
                    "missing": t4.missing, "wrong_pfn": t4.wrong_pfn, "wrong_size": t4.wrong_size,
                    "agent_events": t4.events},
            "pmd": {"touched": touched2, "pagemap_present": t2.pages, "matched": t2.matched,
                    "missing": t2.missing, "wrong_pfn": t2.wrong_pfn, "wrong_size": t2.wrong_size,
                    "agent_events": t2.events},
            "agent_fault_events_total": faults.len(),
            "pfns_outside_device": outside.len(),
            "dropped": dropped,
            "device": fs.dev.block,
            "hooks": {"fault": fault_hook, "pfn": pfn_hook},
            "device_range": [fs.dev.data_start, fs.dev.data_end],
        }),
        details,
    })
}
