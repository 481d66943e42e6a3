//! Keeping the map exact: applying decoded events, re-reading page tables where an event
//! cannot describe the change page by page, and reconciling with procfs.
//!
//! | event | effect |
//! |---|---|
//! | fault on a DAX pfn | pages added to the faulting process |
//! | fault that did not map a DAX pfn (copy-on-write, zero page) | those pages removed |
//! | fault without a pfn | those pages re-read from pagemap |
//! | zap (munmap, exit, exec, truncate, punch) | pages removed from the mapping's owner; a huge entry cut in part is re-read |
//! | fork | the child's DAX vmas read from pagemap (it may hold copies of PTEs it never faulted) |
//! | mremap | the new range read from pagemap (PTEs moved without faults) |

use std::collections::HashMap;

use serde::Serialize;

use super::{
    map::{F_HUGE, F_SHARED, F_WRITE, FileKey, HolderId, HolderMap, Run},
    query::HolderRow,
    scan::{Classifier, Paths, Procfs, dax_vranges, runs_in},
};
use crate::{
    event::{Event, Fault, Fork, Mremap, Zap},
    topology::Topology,
};

/// Counters an operator (and the tests) can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Pages the reconciler found missing from the map, or in it but not in the kernel.
    pub drift_missing: u64,
    pub drift_extra: u64,
    pub reconciles: u64,
    /// Zaps of an address space the agent could not attribute (handled by re-reading every
    /// holder of the file).
    pub unattributed_zaps: u64,
    /// Page-table re-reads done for events (fork, mremap, partial huge unmaps).
    pub resyncs: u64,
}

/// Changes to the kernel-side WATCHED set the caller must apply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WatchChanges {
    pub add: Vec<u32>,
    pub remove: Vec<u32>,
}

pub struct Applier {
    pub map: HolderMap,
    pub stats: Stats,
    proc: Box<dyn Procfs>,
    /// Kernel address space → process, learned from events.
    mm_owner: HashMap<u64, u32>,
    /// Names of the files held, learned from maps once per file.
    paths: Paths,
    watch: WatchChanges,
}

impl Applier {
    pub fn new(proc: Box<dyn Procfs>) -> Self {
        Self {
            map: HolderMap::new(),
            stats: Stats::default(),
            proc,
            mm_owner: HashMap::new(),
            paths: Paths::new(),
            watch: WatchChanges::default(),
        }
    }

    /// Takes the WATCHED changes accumulated since the last call.
    pub fn take_watch_changes(&mut self) -> WatchChanges {
        std::mem::take(&mut self.watch)
    }

    fn holder(&mut self, tgid: u32, comm: &str) -> HolderId {
        if let Some(h) = self.map.holder_of(tgid) {
            return h;
        }
        let (start, c) = self.proc.stat(tgid).unwrap_or((0, comm.to_string()));
        self.watch.add.push(tgid);
        self.map
            .holder(tgid, start, if comm.is_empty() { &c } else { comm })
    }

    /// Drops holders left with no page. The kernel keeps watching a process that is still
    /// alive (it may fault again and fork: a stale "unwatch" would hide that fork); only a
    /// process that is gone is unwatched.
    fn gc(&mut self, h: HolderId) {
        if self.map.pages_of(h) == 0
            && let Some(info) = self.map.info(h)
        {
            let (tgid, start) = (info.tgid, info.start_time);
            self.map.remove_holder(h);
            let alive = self
                .proc
                .stat(tgid)
                .is_some_and(|(s, _)| s == start || start == 0);
            if !alive {
                self.mm_owner.retain(|_, t| *t != tgid);
                self.watch.remove.push(tgid);
            }
        }
    }

    pub fn apply(&mut self, ev: &Event, topo: &Topology) {
        match ev {
            Event::Fault(f) => self.fault(f, topo),
            Event::Zap(z) => self.zap(z, topo),
            Event::Fork(f) => self.fork(f, topo),
            Event::Mremap(m) => self.mremap(m, topo),
            // Device and failure events change nothing by themselves: the teardown they
            // cause arrives as zaps (or, for stale mappings, does not).
            _ => {}
        }
    }

    fn fault(&mut self, f: &Fault, topo: &Topology) {
        if !f.mapped {
            return;
        }
        if f.mm != 0 {
            self.mm_owner.insert(f.mm, f.tgid);
        }
        let pages = f.page_size >> 12;
        let vpage = f.page_address >> 12;
        match f.pfn {
            Some(pfn) if topo.namespace_of_pfn(pfn).is_some() => {
                let h = self.holder(f.tgid, &f.comm);
                let mut flags = 0;
                if f.shared {
                    flags |= F_SHARED;
                }
                if f.write {
                    flags |= F_WRITE;
                }
                if pages > 1 {
                    flags |= F_HUGE;
                }
                let file = FileKey {
                    dev: f.dev,
                    ino: f.ino,
                };
                if !self.paths.contains_key(&file) {
                    self.learn_path(f.tgid, file, topo);
                }
                self.map.add(
                    h,
                    file,
                    Run {
                        vpage,
                        pfn,
                        pgoff: f.offset >> 12,
                        npages: pages,
                        flags,
                    },
                );
            }
            Some(_) | None if f.zero_page => {}
            Some(_) => {
                // Mapped something that is not the device (a private copy-on-write copy):
                // whatever DAX page was there is no longer reachable through this address.
                if let Some(h) = self.map.holder_of(f.tgid) {
                    self.map.remove_vrange(h, vpage, vpage + pages);
                    self.gc(h);
                }
            }
            None => {
                let h = self.holder(f.tgid, &f.comm);
                self.resync(h, f.tgid, vpage, vpage + pages, topo);
                self.gc(h);
            }
        }
    }

    fn zap(&mut self, z: &Zap, topo: &Topology) {
        let owner = self
            .mm_owner
            .get(&z.mm)
            .copied()
            .or((z.own_mm || z.exiting).then_some(z.tgid))
            .or(z.owner_tgid);
        let (vs, ve) = (z.start >> 12, z.end.div_ceil(4096));
        match owner.and_then(|t| self.map.holder_of(t).map(|h| (t, h))) {
            Some((tgid, h)) => {
                let (_, recheck) = self.map.remove_vrange(h, vs, ve);
                if !z.exiting {
                    for (s, e) in recheck {
                        self.resync(h, tgid, s, e, topo);
                    }
                }
                self.gc(h);
            }
            None if owner.is_some() => {} // not a holder we know: nothing to remove
            None => {
                // A foreign zap (truncate, punch) of an address space we cannot attribute:
                // re-read every holder of that file.
                self.stats.unattributed_zaps += 1;
                let file = FileKey {
                    dev: z.dev,
                    ino: z.ino,
                };
                let mut tgids: Vec<u32> = self
                    .map
                    .all()
                    .iter()
                    .filter(|v| v.file == file)
                    .filter_map(|v| self.map.info(v.holder).map(|i| i.tgid))
                    .collect();
                tgids.sort_unstable();
                tgids.dedup();
                for t in tgids {
                    self.resync_process(t, topo);
                }
            }
        }
    }

    /// The kernel reports forks of watched processes only. The parent may have no pages
    /// left by the time we get here (later events already applied), but the child's copies
    /// were made at fork time: always read the child.
    fn fork(&mut self, f: &Fork, topo: &Topology) {
        if f.child_mm != 0 {
            self.mm_owner.insert(f.child_mm, f.child_tgid);
        }
        self.resync_process(f.child_tgid, topo);
    }

    /// The source range was zapped (removed already); the pages now live at the new range.
    fn mremap(&mut self, m: &Mremap, topo: &Topology) {
        let h = self.holder(m.tgid, &m.comm);
        let s = m.new_addr >> 12;
        let e = (m.new_addr + m.new_len).div_ceil(4096);
        self.resync(h, m.tgid, s, e, topo);
        self.gc(h);
    }

    /// Re-reads `[vstart, vend)` of a holder from pagemap.
    fn resync(&mut self, h: HolderId, tgid: u32, vstart: u64, vend: u64, topo: &Topology) {
        self.stats.resyncs += 1;
        let class = Classifier { topology: topo };
        match runs_in(
            self.proc.as_ref(),
            &class,
            tgid,
            vstart,
            vend,
            &mut self.paths,
        ) {
            Ok(runs) => {
                self.map.replace_vrange(h, vstart, vend, &runs);
            }
            // Gone: its pages went with it.
            Err(_) => self.map.remove_holder_pages(h),
        }
    }

    /// Re-reads every DAX vma of a process (creating or dropping its holder as needed).
    /// Returns the drift corrected (missing, extra).
    pub fn resync_process(&mut self, tgid: u32, topo: &Topology) -> (u64, u64) {
        self.stats.resyncs += 1;
        let class = Classifier { topology: topo };
        let runs = dax_vranges(self.proc.as_ref(), &class, tgid).and_then(|_| {
            runs_in(
                self.proc.as_ref(),
                &class,
                tgid,
                0,
                u64::MAX >> 12,
                &mut self.paths,
            )
        });
        let drift = match runs {
            Ok(runs) => {
                if runs.is_empty() && self.map.holder_of(tgid).is_none() {
                    return (0, 0);
                }
                let h = self.holder(tgid, "");
                self.map.replace_vrange(h, 0, u64::MAX >> 12, &runs)
            }
            Err(_) => match self.map.holder_of(tgid) {
                Some(h) => {
                    let extra = self.map.pages_of(h);
                    self.map.remove_holder_pages(h);
                    (0, extra)
                }
                None => (0, 0),
            },
        };
        if let Some(h) = self.map.holder_of(tgid) {
            self.gc(h);
        }
        drift
    }

    /// Compares the whole map with procfs and repairs it: every known holder, then every
    /// other process (holders the events missed). Returns the drift found.
    pub fn reconcile(&mut self, topo: &Topology) -> (u64, u64) {
        self.stats.reconciles += 1;
        let mut total = (0, 0);
        let known: Vec<u32> = self.map.holders().map(|(_, h)| h.tgid).collect();
        for tgid in &known {
            let (m, e) = self.resync_process(*tgid, topo);
            total.0 += m;
            total.1 += e;
        }
        for pid in self.proc.pids() {
            if known.contains(&pid) {
                continue;
            }
            let (m, e) = self.resync_process(pid, topo);
            total.0 += m;
            total.1 += e;
        }
        self.stats.drift_missing += total.0;
        self.stats.drift_extra += total.1;
        total
    }
}

impl Applier {
    pub fn procfs(&self) -> &dyn Procfs {
        self.proc.as_ref()
    }

    /// Names a file from a process that maps it (once per file).
    fn learn_path(&mut self, tgid: u32, file: FileKey, topo: &Topology) {
        let class = Classifier { topology: topo };
        if let Ok(maps) = self.proc.maps(tgid)
            && let Some(v) = maps.iter().find(|v| class.dax_file(v) == Some(file))
        {
            self.paths
                .insert(file, v.path.trim_end_matches(" (deleted)").to_string());
        }
    }

    /// The name learned for a file, if any.
    pub fn path_of(&self, file: &FileKey) -> Option<&str> {
        self.paths.get(file).map(String::as_str)
    }

    /// Names a file from elsewhere (a recording's `file` line): replay has no maps to read.
    pub fn set_path(&mut self, file: FileKey, path: String) {
        self.paths.insert(file, path);
    }

    /// One row per (process, file) mapping any pfn in `ranges`, with file names.
    pub fn rows_in_pfn_ranges(&mut self, topo: &Topology, ranges: &[(u64, u64)]) -> Vec<HolderRow> {
        let sel: Vec<_> = ranges
            .iter()
            .flat_map(|&(s, e)| self.map.in_pfn_range(s, e))
            .collect();
        let mut r = super::query::rows(&self.map, &sel, false);
        self.name_files(&mut r, topo);
        r
    }

    /// Fills in file names: from what we learned, else from the holder's maps.
    pub fn name_files(&mut self, rows: &mut [HolderRow], topo: &Topology) {
        for r in rows {
            let key = FileKey {
                dev: r.dev,
                ino: r.ino,
            };
            if !self.paths.contains_key(&key) {
                self.learn_path(r.pid, key, topo);
            }
            r.file = self.paths.get(&key).cloned();
        }
    }
}

impl HolderMap {
    /// Drops every page of a holder (keeps nothing: used when its process is gone).
    pub fn remove_holder_pages(&mut self, h: HolderId) {
        self.remove_vrange(h, 0, u64::MAX >> 12);
    }
}
