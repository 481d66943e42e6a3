//! `dax-probe audit`: after a removal, find page-table entries that still point into memory
//! of a device that is gone (the kernel did not tear them down: a process can keep reading
//! memory that now belongs to nobody, or to someone else).
//!
//! Departed memory is: a namespace whose driver is unbound, persistent memory in /proc/iomem
//! that no live namespace covers (a device removed altogether), and ranges a monitor
//! recorded when it saw a device leave.

use std::{collections::BTreeMap, io::Write, ops::ControlFlow, path::Path};

use serde::Serialize;

use crate::{
    exit::{Code, Failure},
    holders::{
        bindings::{Bindings, departed_file, iomem_pmem},
        scan::{LiveProc, Procfs},
    },
    incident::Departed,
    privilege,
    probe::{self, KernelSource},
    proc::pagemap::visit_present,
    schema::{Audit, DepartedRange, Line},
    topology::{Mode, Topology},
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
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
    for (s, e) in iomem_pmem(root) {
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
    for d in recorded {
        for &(s, e) in &d.pfn_ranges {
            if !is_live(s, e) {
                out.push((s, e, format!("{} (departed)", d.device)));
            }
        }
    }
    out
}

/// `read_page_tables`: false on kernels where reading a stale DAX mapping's page tables
/// oopses (no devmap entries): mappings of files on departed devices are then reported
/// whole from /proc/PID/maps and their page tables are never read.
pub fn scan(
    proc: &dyn Procfs,
    topo: &Topology,
    bindings: &Bindings,
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
            let gone = departed_file(topo, bindings, v, !read_page_tables);
            if !read_page_tables && let Some(dev) = gone.clone() {
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
            let Ok(mut pm) = proc.pagemap(pid) else {
                continue;
            };
            let (s, e) = crate::holders::scan::walk_range(proc, pid, v);
            let mut runs: BTreeMap<u64, (u64, u64, String)> = BTreeMap::new();
            // A mapping of a binding that is gone: every page of it in persistent memory is
            // stale, even where the pfn belongs to a live device again (a rebound device
            // hands those pfns to its new tenant).
            let old_binding = gone.as_ref().map(|g| format!("{g} (old binding)"));
            let walked = visit_present(pm.as_mut(), s, e, |vpage, pfn| {
                let hit = ranges
                    .iter()
                    .find(|(rs, re, _)| pfn >= *rs && pfn < *re)
                    .map(|(_, _, name)| name)
                    .or(old_binding.as_ref().filter(|_| bindings.is_pmem(pfn)));
                if let Some(name) = hit {
                    // Extend the previous run when contiguous.
                    if let Some((&start, (n, first, _))) = runs.iter_mut().next_back()
                        && start + *n == vpage
                        && *first + *n == pfn
                    {
                        *n += 1;
                    } else {
                        runs.insert(vpage, (1, pfn, name.clone()));
                    }
                }
                ControlFlow::Continue(())
            });
            if walked.is_err() {
                continue;
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
    let recorded: Vec<Departed> = crate::fsutil::read_root_owned(departed_file)
        .map_err(|e| eprintln!("warning: departed devices: {e}"))
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let ranges = departed_ranges(root, &topo, &recorded);
    // Only kernels with devmap DAX entries (pfn_t in BTF, up to 6.12) survive reading the
    // page tables of a mapping into a pulled device.
    let devmap = probe::collect_facts(src)
        .map(|f| f.dax_devmap())
        .unwrap_or(false);
    let bindings = Bindings::read(root, &topo);
    let stale = scan(&LiveProc::new(root), &topo, &bindings, &ranges, devmap);
    // Findings go to the incident history too; failing that is said, not fatal.
    if !stale.is_empty() {
        let path = crate::history::db_path(None);
        let found = crate::history::stale_incidents(&stale);
        if let Err(e) = crate::history::db::record_now(&path, &found) {
            eprintln!("warning: incident history: not recorded: {e}");
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        let line = Line::Audit(Audit {
            departed_ranges: ranges
                .iter()
                .map(|(s, e, n)| DepartedRange {
                    first_pfn: *s,
                    end_pfn: *e,
                    device: n.clone(),
                })
                .collect(),
            stale: stale.clone(),
        });
        serde_json::to_writer(&mut out, &line)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        holders::{bindings::old_binding_vmas, scan::Vma},
        os::fake::{self, DEV, END_PFN, FIRST_PFN, FakeOs, FakeProc},
        topology::DevId,
    };

    /// The new binding's block device number: the departed superblock still holds pmem0's
    /// old one (259:0, which the fake holder's file is on).
    const NEW: DevId = DevId {
        major: 259,
        minor: 1,
    };

    /// pmem0 unbound and bound again: live on the same range under a new device number,
    /// the old ext4 still in the mount table.
    fn rebound() -> (Topology, Bindings) {
        let mut t = fake::topology(&["/mnt/pmem0"]);
        t.namespaces[0].block = Some(("pmem0".into(), NEW));
        let b = Bindings {
            live_blocks: [NEW, DevId { major: 8, minor: 0 }].into(),
            dax_nodes: BTreeMap::new(),
            pmem: vec![(FIRST_PFN, END_PFN)],
        };
        (t, b)
    }

    fn holder() -> FakeOs {
        FakeOs::new(&[(150, FakeProc::holder("db", 1000))], &["/mnt/pmem0"])
    }

    #[test]
    fn a_mapping_into_a_rebound_device_is_stale_though_its_pfns_are_live() {
        let (t, b) = rebound();
        let os = holder();
        let ranges = departed_ranges(Path::new("/nonexistent"), &t, &[]);
        assert!(ranges.is_empty(), "the range is live again: {ranges:?}");
        let found = scan(&os, &t, &b, &ranges, true);
        assert_eq!(found.len(), 1, "{found:?}");
        let s = &found[0];
        assert_eq!((s.pid, s.pages, s.verified), (150, 4, true));
        assert_eq!(s.first_pfn, FIRST_PFN + 150 * 4);
        assert!(
            s.former_device.contains("pmem0") && s.former_device.contains("old binding"),
            "{s:?}"
        );
        // Without page tables (7.x): the whole mapping, from /proc/PID/maps.
        let found = scan(&os, &t, &b, &ranges, false);
        assert_eq!(found.len(), 1);
        assert!(!found[0].verified);
        // Even with the old mount detached, the device number alone says it when the page
        // tables are read (the pfns are persistent memory).
        let mut detached = t.clone();
        detached.mounts.clear();
        let found = scan(&os, &detached, &b, &ranges, true);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].former_device.contains("259:0 is gone"),
            "{found:?}"
        );
        // ... but not from /proc/PID/maps alone (a file on a pulled plain disk looks alike).
        assert!(scan(&os, &detached, &b, &ranges, false).is_empty());
    }

    #[test]
    fn a_live_binding_and_plain_memory_are_not_stale() {
        let (mut t, mut b) = rebound();
        let os = holder();
        // pmem0 never left: its device number is the holder's.
        t.namespaces[0].block = Some(("pmem0".into(), DEV));
        b.live_blocks.insert(DEV);
        assert!(scan(&os, &t, &b, &[], true).is_empty());
        // A file on a gone device whose pages are not persistent memory (page cache).
        let (t, mut b) = rebound();
        b.pmem.clear();
        let mut detached = t.clone();
        detached.mounts.clear();
        assert!(scan(&os, &detached, &b, &[], true).is_empty());
        // /sys/dev/block unreadable: no judgement on device numbers.
        let (t, mut b) = rebound();
        b.live_blocks.clear();
        assert!(scan(&os, &detached_of(&t), &b, &[], true).is_empty());
    }

    /// What a monitor names when pmem0 comes back: the mappings of pmem0's old binding,
    /// not those of another device's gone binding.
    #[test]
    fn the_old_binding_of_a_device_is_that_devices_alone() {
        let (t, b) = rebound();
        let os = holder();
        let found = old_binding_vmas(&os, &t, &b, "pmem0");
        assert_eq!(found.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [150]);
        assert!(old_binding_vmas(&os, &t, &b, "pmem1").is_empty());
        // A live binding has no old mappings.
        let (mut t, mut b) = (t, b);
        t.namespaces[0].block = Some(("pmem0".into(), DEV));
        b.live_blocks.insert(DEV);
        assert!(old_binding_vmas(&os, &t, &b, "pmem0").is_empty());
    }

    fn detached_of(t: &Topology) -> Topology {
        let mut d = t.clone();
        d.mounts.clear();
        d
    }

    fn devdax_vma(path: &str, dev: DevId, ino: u64) -> Vma {
        Vma {
            start: 0x7f00_0000_0000,
            end: 0x7f00_0020_0000,
            shared: true,
            write: true,
            offset: 0,
            dev,
            ino,
            path: path.into(),
        }
    }

    #[test]
    fn a_mapping_of_an_earlier_dev_dax_node_is_of_a_gone_binding() {
        let tmpfs = DevId { major: 0, minor: 5 };
        let mut t = fake::topology(&[]);
        t.namespaces[0].mode = Mode::Devdax;
        t.namespaces[0].block = None;
        t.namespaces[0].chardev = Some((
            "dax0.0".into(),
            DevId {
                major: 252,
                minor: 0,
            },
        ));
        let mut b = Bindings::default();
        b.dax_nodes.insert("dax0.0".into(), (tmpfs, 400));
        // The current node.
        let v = devdax_vma("/dev/dax0.0", tmpfs, 400);
        assert_eq!(departed_file(&t, &b, &v, true), None);
        // The node of an earlier binding: another inode, or unlinked.
        let v = devdax_vma("/dev/dax0.0", tmpfs, 399);
        assert_eq!(
            departed_file(&t, &b, &v, true).as_deref(),
            Some("dax0.0, an earlier binding")
        );
        let v = devdax_vma("/dev/dax0.0 (deleted)", tmpfs, 399);
        assert_eq!(
            departed_file(&t, &b, &v, false).as_deref(),
            Some("dax0.0, an earlier binding")
        );
        // Not bound at all.
        t.namespaces[0].enabled = false;
        assert_eq!(departed_file(&t, &b, &v, true).as_deref(), Some("dax0.0"));
    }

    #[test]
    fn bindings_are_read_from_sysfs_dev_and_iomem() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("sys/dev/block/259:1")).unwrap();
        std::fs::create_dir_all(root.join("sys/dev/block/8:0")).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::write(root.join("dev/dax0.0"), "").unwrap();
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(
            root.join("proc/iomem"),
            "00000000-00000fff : Reserved\n140000000-15fffffff : Persistent Memory\n  \
             140000000-15fffffff : namespace1.0\n",
        )
        .unwrap();
        let mut t = fake::topology(&[]);
        t.namespaces[0].chardev = Some((
            "dax0.0".into(),
            DevId {
                major: 252,
                minor: 0,
            },
        ));
        let b = Bindings::read(root, &t);
        assert_eq!(b.live_blocks, [NEW, DevId { major: 8, minor: 0 }].into());
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(root.join("dev/dax0.0")).unwrap().ino();
        assert_eq!(b.dax_nodes["dax0.0"].1, ino);
        assert!(b.is_pmem(FIRST_PFN) && b.is_pmem(0x14_0000) && !b.is_pmem(0x16_0000));
    }
}
