//! `dax-probe audit`: after a removal, find page-table entries that still point into memory
//! of a device that is gone (the kernel did not tear them down: a process can keep reading
//! memory that now belongs to nobody, or to someone else).
//!
//! Departed memory is: a namespace whose driver is unbound, persistent memory in /proc/iomem
//! that no live namespace covers (a device removed altogether), and ranges a monitor
//! recorded when it saw a device leave.

use std::{collections::BTreeMap, io::Write, path::Path};

use serde::Serialize;

use crate::{
    exit::{Code, Failure},
    holders::scan::{LiveProc, Procfs},
    incident::Departed,
    privilege,
    probe::{self, KernelSource},
    topology::{Mode, Topology},
};

#[derive(Clone, Debug, Serialize)]
pub struct Stale {
    pub pid: u32,
    pub comm: String,
    pub vaddr_start: u64,
    pub vaddr_end: u64,
    pub pages: u64,
    /// 0 when the page tables were not read (see `verified`).
    pub first_pfn: u64,
    pub former_device: String,
    pub file: String,
    /// False when the finding comes from /proc/PID/maps alone: on kernels whose DAX pages are
    /// plain folios (7.x) reading the page tables of a mapping into a pulled device oopses the
    /// kernel, so the whole mapping is reported instead of its present pages.
    pub verified: bool,
}

/// Physical ranges (pfns) that belong to no live device, with a name for each.
pub fn departed_ranges(
    root: &Path,
    topo: &Topology,
    recorded: &[Departed],
) -> Vec<(u64, u64, String)> {
    let live: Vec<(u64, u64)> = topo
        .namespaces
        .iter()
        .filter(|n| n.enabled && n.range_known)
        .map(|n| (n.namespace_range.first_pfn(), n.namespace_range.end_pfn()))
        .collect();
    let is_live = |s: u64, e: u64| live.iter().any(|&(ls, le)| s < le && e > ls);
    let mut out = Vec::new();
    for n in &topo.namespaces {
        if !n.enabled && n.range_known {
            out.push((
                n.namespace_range.first_pfn(),
                n.namespace_range.end_pfn(),
                format!("{} ({}, driver unbound)", n.device_name(), n.name),
            ));
        }
    }
    if let Ok(iomem) = std::fs::read_to_string(root.join("proc/iomem")) {
        for l in iomem.lines().filter(|l| !l.starts_with(' ')) {
            let Some((range, what)) = l.split_once(" : ") else {
                continue;
            };
            if !what.starts_with("Persistent Memory") {
                continue;
            }
            let Some((s, e)) = range.split_once('-') else {
                continue;
            };
            let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
                continue;
            };
            if e == 0 {
                continue; // addresses hidden (not root)
            }
            let (s, e) = (s >> 12, (e + 1) >> 12);
            // Carve out what live namespaces cover.
            let mut cuts: Vec<(u64, u64)> = live
                .iter()
                .copied()
                .filter(|&(ls, le)| ls < e && le > s)
                .collect();
            cuts.sort();
            let mut cur = s;
            for (ls, le) in cuts {
                if ls > cur {
                    out.push((cur, ls, "persistent memory of no live device".into()));
                }
                cur = cur.max(le);
            }
            if cur < e {
                out.push((cur, e, "persistent memory of no live device".into()));
            }
        }
    }
    for d in recorded {
        for &(s, e) in &d.pfn_ranges {
            if !is_live(s, e) {
                out.push((s, e, format!("{} (departed)", d.device)));
            }
        }
    }
    out
}

/// Devices of files that live on a departed device: a block device no live namespace owns
/// under a DAX mount, or a device-dax node that is gone.
fn departed_file(topo: &Topology, v: &crate::holders::scan::Vma) -> Option<String> {
    if let Some(name) = v.path.strip_prefix("/dev/dax") {
        let live = topo.namespaces.iter().any(|n| {
            n.enabled
                && n.chardev
                    .as_ref()
                    .is_some_and(|(c, _)| c.strip_prefix("dax") == Some(name))
        });
        return (!live).then(|| format!("dax{name}"));
    }
    let m = topo.mount_of_dev(v.dev)?;
    if !m.dax.is_dax() {
        return None;
    }
    let live = topo.namespace_of_block(v.dev).is_some_and(|n| n.enabled);
    (!live).then(|| m.source.trim_start_matches("/dev/").to_string())
}

/// `read_page_tables`: false on kernels where reading a stale DAX mapping's page tables
/// oopses (no devmap entries): mappings of files on departed devices are then reported
/// whole from /proc/PID/maps and their page tables are never read.
pub fn scan(
    proc: &dyn Procfs,
    topo: &Topology,
    ranges: &[(u64, u64, String)],
    read_page_tables: bool,
) -> Vec<Stale> {
    let mut found = Vec::new();
    for pid in proc.pids() {
        let Ok(maps) = proc.maps(pid) else { continue };
        let comm = proc.stat(pid).map(|(_, c)| c).unwrap_or_default();
        for v in maps
            .iter()
            .filter(|v| v.ino != 0 || v.path.starts_with("/dev/dax"))
        {
            let (s, e) = (v.start >> 12, v.end >> 12);
            if !read_page_tables && let Some(dev) = departed_file(topo, v) {
                found.push(Stale {
                    pid,
                    comm: comm.clone(),
                    vaddr_start: v.start,
                    vaddr_end: v.end,
                    pages: e - s,
                    first_pfn: 0,
                    former_device: format!("{dev} (departed)"),
                    file: v.path.clone(),
                    verified: false,
                });
                continue;
            }
            let Ok(pm) = proc.pagemap(pid, s, e - s) else {
                continue;
            };
            let mut runs: BTreeMap<u64, (u64, u64, String)> = BTreeMap::new();
            for (i, &ent) in pm.iter().enumerate() {
                let pfn = ent & ((1 << 55) - 1);
                if ent & (1 << 63) == 0 || pfn == 0 {
                    continue;
                }
                if let Some((_, _, name)) =
                    ranges.iter().find(|(rs, re, _)| pfn >= *rs && pfn < *re)
                {
                    let vpage = s + i as u64;
                    // Extend the previous run when contiguous.
                    if let Some((&start, (n, first, _))) = runs.iter_mut().next_back()
                        && start + *n == vpage
                        && *first + *n == pfn
                    {
                        *n += 1;
                        continue;
                    }
                    runs.insert(vpage, (1, pfn, name.clone()));
                }
            }
            for (vpage, (n, pfn, name)) in runs {
                found.push(Stale {
                    pid,
                    comm: comm.clone(),
                    vaddr_start: vpage << 12,
                    vaddr_end: (vpage + n) << 12,
                    pages: n,
                    first_pfn: pfn,
                    former_device: name,
                    file: v.path.clone(),
                    verified: true,
                });
            }
        }
    }
    found
}

pub fn run(src: &KernelSource, json: bool, departed_file: &Path) -> anyhow::Result<()> {
    let root = src.root.as_path();
    if !privilege::can_read_pagemap() {
        return Err(Failure::new(
            Code::NoPermission,
            "audit reads every process's page tables (/proc/PID/pagemap): run it with sudo",
        )
        .into());
    }
    let topo = Topology::read(root);
    let recorded: Vec<Departed> = std::fs::read(departed_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let ranges = departed_ranges(root, &topo, &recorded);
    // Only kernels with devmap DAX entries (pfn_t in BTF, up to 6.12) survive reading the
    // page tables of a mapping into a pulled device.
    let devmap = probe::collect_facts(src)
        .map(|f| f.btf.has_typedef("pfn_t"))
        .unwrap_or(false);
    let stale = scan(&LiveProc::new(root), &topo, &ranges, devmap);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({
                "departed_ranges": ranges.iter().map(|(s, e, n)| serde_json::json!({"first_pfn": s, "end_pfn": e, "device": n})).collect::<Vec<_>>(),
                "stale": stale,
            }),
        )?;
        writeln!(out)?;
    } else if stale.is_empty() {
        writeln!(
            out,
            "clean: no page table points into departed persistent memory ({} range(s) checked; \
             live DAX devices: {})",
            ranges.len(),
            topo.namespaces
                .iter()
                .filter(|n| n.enabled && matches!(n.mode, Mode::Fsdax | Mode::Devdax))
                .count()
        )?;
    } else {
        writeln!(out, "STALE MAPPINGS into departed persistent memory:")?;
        for s in &stale {
            writeln!(
                out,
                "{:>7} {:<15} {:#x}-{:#x} {:>6} pages  pfn {:#x}  {}  ({})",
                s.pid,
                s.comm,
                s.vaddr_start,
                s.vaddr_end,
                s.pages,
                s.first_pfn,
                s.former_device,
                s.file
            )?;
        }
    }
    out.flush()?;
    if !stale.is_empty() {
        return Err(Failure::new(Code::Findings, String::new()).into());
    }
    Ok(())
}
