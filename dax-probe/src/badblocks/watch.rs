//! The monitor's watch on the badblocks lists: which ranges it already reported, and what
//! a later SIGBUS or memory failure has to do with them.
//!
//! The lists are read on the agent's 2-second sysfs tick (the kernel notifies pollers of
//! them only after an address range scrub, never for a range written to the file; a poll
//! costs one small sysfs read per device). A range is reported once, when it first appears
//! (at start-up: every range already listed); one that leaves the list (cleared by a write
//! that repaired the media) is forgotten, and reported again if it comes back.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::{
    MediaError, Placed, Sectors, describe,
    locate::{BadFile, FileSpace},
};
use crate::{
    holders::Applier,
    topology::{DevId, Topology},
};

/// One reported range, with what links a later SIGBUS to it.
#[derive(Clone, Debug)]
pub struct KnownBad {
    pub key: (String, Sectors),
    /// The list that states it.
    pub source: PathBuf,
    pub name: String,
    pub pfns: Option<(u64, u64)>,
    pub files: Vec<BadFile>,
    /// The file system's device, for `files`.
    pub dev: Option<DevId>,
    /// Where each holder mapped the bad pages when it was reported: (pids of the address
    /// space, vaddr range).
    pub vaddrs: Vec<(Vec<u32>, u64, u64)>,
}

#[derive(Default)]
pub struct Watch {
    pub known: Vec<KnownBad>,
    /// Lists already warned about as unreadable (warned again once readable and broken
    /// anew).
    warned: BTreeSet<PathBuf>,
}

impl Watch {
    /// Reads the lists; returns the ranges that appeared since the last look, described
    /// (files, holders from the live map), and the unreadable lists not yet warned about.
    pub fn poll(
        &mut self,
        root: &Path,
        topo: &Topology,
        app: &mut Applier,
        space: &dyn FileSpace,
        now_ns: u64,
    ) -> (Vec<MediaError>, Vec<String>) {
        let (placed, bad) = super::read(root, topo, None);
        let mut warn = Vec::new();
        let bad_paths: BTreeSet<PathBuf> = bad.iter().map(|b| b.path.clone()).collect();
        for b in &bad {
            if !self.warned.contains(&b.path) {
                warn.push(format!("{b}; the other badblocks lists are still watched"));
            }
        }
        self.warned = bad_paths.clone();
        // Forget ranges no list states any more; an unreadable list keeps its ranges.
        let now: BTreeSet<(String, Sectors)> = placed.iter().map(Placed::key).collect();
        self.known
            .retain(|k| now.contains(&k.key) || bad_paths.contains(&k.source));
        let mut out = Vec::new();
        for p in placed {
            if self.known.iter().any(|k| k.key == p.key()) {
                continue;
            }
            let mut holders = |a: u64, b: u64| Ok(app.rows_in_pfn_ranges(topo, &[(a, b)]));
            let mut m = describe(&p, topo, space, &mut holders);
            m.ts_ns = now_ns;
            let vaddrs = m
                .pfns
                .map(|(a, b)| vaddrs_of(app, a, b))
                .unwrap_or_default();
            let dev = m
                .namespace
                .as_deref()
                .and_then(|n| topo.namespaces.iter().find(|x| x.name == n))
                .and_then(|n| n.block.as_ref().map(|(_, d)| *d));
            self.known.push(KnownBad {
                key: p.key(),
                source: p.source.clone(),
                name: m.name(),
                pfns: m.pfns,
                files: m.files.clone(),
                dev,
                vaddrs,
            });
            out.push(m);
        }
        (out, warn)
    }

    /// The known-bad range holding `pfn`.
    pub fn of_pfn(&self, pfn: u64) -> Option<&KnownBad> {
        self.known
            .iter()
            .find(|k| k.pfns.is_some_and(|(a, b)| a <= pfn && pfn < b))
    }

    /// The known-bad range the page `pid` touched at `addr` lies in: where a holder mapped
    /// a bad page when it was reported; else the pfn the live map has there; else the file
    /// offset the process maps there (its maps, or the map's neighbouring pages of the
    /// same file mapping: a fault refused on bad media leaves no page to look at).
    pub fn of_access(&self, pid: u32, addr: u64, app: &Applier) -> Option<&KnownBad> {
        let page = addr & !0xfff;
        if let Some(k) = self.known.iter().find(|k| {
            k.vaddrs
                .iter()
                .any(|(pids, s, e)| pids.contains(&pid) && *s <= page && page < *e)
        }) {
            return Some(k);
        }
        let map = &app.map;
        let views = map
            .holder_of(pid)
            .map(|h| map.of_holder(h))
            .unwrap_or_default();
        if let Some(v) = views
            .iter()
            .find(|v| page >= v.vaddr && page < v.vaddr + (v.pages << 12))
            && let Some(k) = self.of_pfn(v.pfn + ((page - v.vaddr) >> 12))
        {
            return Some(k);
        }
        let in_file = |dev: DevId, ino: u64, off: u64| {
            self.known.iter().find(|k| {
                k.dev == Some(dev)
                    && k.files
                        .iter()
                        .any(|f| f.ino == ino && f.offset <= off + 4095 && off < f.end)
            })
        };
        if let Ok(vmas) = app.procfs().maps(pid)
            && let Some(v) = vmas.iter().find(|v| v.start <= page && page < v.end)
            && v.ino != 0
            && let Some(k) = in_file(v.dev, v.ino, v.offset + (page - v.start))
        {
            return Some(k);
        }
        views.iter().find_map(|v| {
            let off = (v.offset as i128) + (page as i128 - v.vaddr as i128);
            (off >= 0)
                .then(|| in_file(v.file.dev, v.file.ino, off as u64))
                .flatten()
        })
    }
}

/// Where each address space maps the pfns `[a, b)` now.
fn vaddrs_of(app: &Applier, a: u64, b: u64) -> Vec<(Vec<u32>, u64, u64)> {
    let map = &app.map;
    let mut out = Vec::new();
    for v in map.in_pfn_range(a, b) {
        let (s, e) = (v.pfn.max(a), (v.pfn + v.pages).min(b));
        if s >= e {
            continue;
        }
        let Some(h) = map.info(v.holder) else {
            continue;
        };
        let pids: Vec<u32> = std::iter::once(h.tgid)
            .chain(h.sharers.iter().map(|p| p.tgid))
            .collect();
        out.push((
            pids,
            v.vaddr + ((s - v.pfn) << 12),
            v.vaddr + ((e - v.pfn) << 12),
        ));
    }
    out
}
