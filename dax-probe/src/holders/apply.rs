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
    map::{
        F_HUGE, F_SHARED, F_WRITE, FileKey, HolderId, HolderMap, Run, check_pages,
        pages_of_page_size,
    },
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
    /// Fault lines that arrived after a change of their address space and were re-read
    /// from the page tables instead (see `Changes`).
    pub late_ranges: u64,
}

/// Changes to the kernel-side WATCHED set the caller must apply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WatchChanges {
    pub add: Vec<u32>,
    pub remove: Vec<u32>,
}

/// Why an event describes something no kernel can (a crafted or corrupt recording), if it
/// does: such an event is refused whole, never applied in part.
pub fn check_event(ev: &Event) -> Result<(), String> {
    match ev {
        Event::Fault(f) => {
            let per = pages_of_page_size(f.page_size).ok_or_else(|| {
                format!(
                    "page_size {} is not 4096, 2097152 or 1073741824",
                    f.page_size
                )
            })?;
            if f.pages == 0 || f.pages > u64::from(dax_probe_common::RANGE_MAX_PAGES) {
                return Err(format!(
                    "a fault line for {} pages (1 to {} are possible)",
                    f.pages,
                    dax_probe_common::RANGE_MAX_PAGES
                ));
            }
            if let Some(pfn) = f.pfn {
                check_pages(f.page_address >> 12, pfn, per * f.pages)?;
            }
            Ok(())
        }
        Event::Mremap(m) => m
            .new_addr
            .checked_add(m.new_len)
            .map(|_| ())
            .ok_or_else(|| format!("mremap to {:#x}+{:#x} wraps", m.new_addr, m.new_len)),
        _ => Ok(()),
    }
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
    /// Processes found dead whose events may still be on their way (tgid → the tick they
    /// were found on): hidden from every answer about now, but kept in the map until the
    /// events stamped before their death are applied, so a memory failure or departure the
    /// kernel saw while they lived still lists them.
    dying: HashMap<u32, u64>,
    /// Bumped by the agent's clock (`tick`).
    ticks: u64,
    /// Coalesced ranges: what was reported of each (see `ranges.rs`).
    pub ranges: super::ranges::Ledger,
    /// Boot time of the latest page-table change applied, per address space and per
    /// process (an mremap names only its process); see [`Changes`].
    changes: Changes,
    /// Who exited, for the processes it knows (an enforcing agent's pins); /proc for
    /// the rest.
    liveness: Option<std::rc::Rc<dyn super::liveness::Liveness>>,
}

/// When each address space last changed (zap, copy-on-write, mremap), as far as the
/// applied events tell. A fault line whose first fault is older than a change already
/// applied arrived late (a range emitted after the zap of some of its pages, or read from
/// its slot after that): its pages are re-read from the page tables, not taken on trust.
#[derive(Debug, Default)]
struct Changes {
    by_mm: HashMap<u64, u64>,
    by_tgid: HashMap<u32, u64>,
    /// Everything forgotten to stay bounded counts as changed at this time.
    floor: u64,
}

/// Address spaces remembered before [`Changes`] forgets (and raises its floor).
const CHANGES_KEPT: usize = 65_536;

impl Changes {
    fn note(&mut self, mm: u64, tgid: Option<u32>, ts: u64) {
        if self.by_mm.len() >= CHANGES_KEPT || self.by_tgid.len() >= CHANGES_KEPT {
            let newest = self.by_mm.values().chain(self.by_tgid.values()).max();
            self.floor = self.floor.max(newest.copied().unwrap_or(0));
            self.by_mm.clear();
            self.by_tgid.clear();
        }
        if mm != 0 {
            let e = self.by_mm.entry(mm).or_default();
            *e = (*e).max(ts);
        }
        if let Some(t) = tgid {
            let e = self.by_tgid.entry(t).or_default();
            *e = (*e).max(ts);
        }
    }

    fn since(&self, mm: u64, tgid: u32) -> u64 {
        let a = self.by_mm.get(&mm).copied().unwrap_or(0);
        let b = self.by_tgid.get(&tgid).copied().unwrap_or(0);
        a.max(b).max(self.floor)
    }
}

/// Ticks a dead process stays after it was found dead: the reader hands events over
/// within one tick (200 ms), so two leave room for one in flight.
const DYING_TICKS: u64 = 2;

impl Applier {
    pub fn new(proc: Box<dyn Procfs>) -> Self {
        Self {
            map: HolderMap::new(),
            stats: Stats::default(),
            proc,
            mm_owner: HashMap::new(),
            paths: Paths::new(),
            watch: WatchChanges::default(),
            dying: HashMap::new(),
            ticks: 0,
            ranges: Default::default(),
            changes: Changes::default(),
            liveness: None,
        }
    }

    /// Asks `l` first whether a holder exited, /proc only for those it does not know.
    pub fn set_liveness(&mut self, l: std::rc::Rc<dyn super::liveness::Liveness>) {
        self.liveness = Some(l);
    }

    /// Which of `procs` exited: what the liveness knows, /proc for the rest.
    fn gone_of(&self, procs: &[(u32, u64)]) -> Vec<bool> {
        let known = match &self.liveness {
            Some(l) => l.exited(procs),
            None => vec![None; procs.len()],
        };
        procs
            .iter()
            .zip(known)
            .map(|(&(pid, start), k)| k.unwrap_or_else(|| self.proc.gone(pid, start)))
            .collect()
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

    /// The holder of address space `mm` (0: not reported) that process `tgid` faulted in.
    /// A process faulting in an address space another one holds shares it; a process new
    /// to the map may share its address space with processes that never faulted (a
    /// `clone(CLONE_VM)` made before the first fault): those are looked for once.
    fn holder_in(&mut self, tgid: u32, mm: u64, comm: &str) -> HolderId {
        if mm != 0
            && let Some(&owner) = self.mm_owner.get(&mm)
            && owner != tgid
            && let Some(h) = self.map.holder_of(owner)
            // An mm freed and reallocated to another process has the same address.
            && self.proc.same_mm(owner, tgid) != Some(false)
        {
            if self.map.holder_of(tgid) != Some(h) {
                self.join(h, tgid, comm);
            }
            return h;
        }
        let h = match self.map.holder_of(tgid) {
            Some(h) => h,
            // New to the map: an address space already held (found by a scan, which knows
            // no mm), or a new one whose other users never faulted.
            None => match self.sharing_holder(tgid) {
                Some(h) => {
                    self.join(h, tgid, comm);
                    h
                }
                None => {
                    let h = self.holder(tgid, comm);
                    self.find_sharers(h, tgid);
                    h
                }
            },
        };
        if mm != 0 {
            self.mm_owner.insert(mm, tgid);
        }
        h
    }

    /// Process `tgid` uses holder `h`'s address space.
    fn join(&mut self, h: HolderId, tgid: u32, comm: &str) {
        let (start, c) = self.proc.stat(tgid).unwrap_or((0, comm.to_string()));
        self.watch.add.push(tgid);
        self.map
            .add_sharer(h, tgid, start, if comm.is_empty() { &c } else { comm });
    }

    /// Adds every other process using `tgid`'s address space to `h` (one `kcmp` per
    /// process, once per new address space). Processes with a holder of their own are
    /// left there: moving them could drop pages only that holder lists.
    fn find_sharers(&mut self, h: HolderId, tgid: u32) {
        if self.proc.same_mm(tgid, tgid).is_none() {
            return; // this procfs cannot tell
        }
        for pid in self.proc.pids() {
            if pid != tgid
                && self.map.holder_of(pid).is_none()
                && self.proc.same_mm(tgid, pid) == Some(true)
            {
                self.join(h, pid, "");
            }
        }
    }

    /// The holder whose address space process `tgid` uses, if any (a process not in the
    /// map found holding pages by a scan).
    fn sharing_holder(&self, tgid: u32) -> Option<HolderId> {
        self.map
            .holders()
            .find(|(_, info)| self.proc.same_mm(info.tgid, tgid) == Some(true))
            .map(|(h, _)| h)
    }

    /// Process `tgid` is gone (or uses another address space now): it leaves its holder
    /// (whose pages stay while a sharer uses them) and every per-process cache. Returns the
    /// pages that went with it.
    fn leave(&mut self, tgid: u32) -> u64 {
        self.dying.remove(&tgid);
        let mut pages = 0;
        if let Some(h) = self.map.holder_of(tgid) {
            let p = self.map.pages_of(h);
            if self.map.remove_process(h, tgid) {
                pages = p;
            }
        }
        self.forget(tgid);
        pages
    }

    /// Drops what the agent keeps about a process that is gone: its address spaces, and
    /// its place in the kernel's WATCHED set.
    fn forget(&mut self, tgid: u32) {
        self.mm_owner.retain(|_, t| *t != tgid);
        self.watch.remove.push(tgid);
    }

    /// Finds every process that has exited (or no longer shares the address space it was
    /// listed with) and hides it: a dead pid is never an answer about now, and a sharer
    /// outliving the process that faulted keeps the pages. It leaves the map at its exit
    /// event, or `DYING_TICKS` ticks later when that event was lost: until then the events
    /// the kernel stamped while it lived (a memory failure it was killed by) still find it.
    /// Answers and departures call this first. Returns how many processes are hidden.
    pub fn forget_gone(&mut self) -> usize {
        // Leave now: dead sharers of an address space that lives on (its pages stay with
        // the live ones, and so do its events) and processes gone to another one. Dying:
        // the last processes of an address space.
        let mut leave = Vec::new();
        let mut dying = Vec::new();
        // Asked all at once: the liveness answers many processes with one poll.
        let procs: Vec<(u32, u64)> = self.map.processes().collect();
        let gone: HashMap<(u32, u64), bool> =
            procs.iter().copied().zip(self.gone_of(&procs)).collect();
        for (_, info) in self.map.holders() {
            let (dead, live): (Vec<_>, Vec<_>) = info
                .processes()
                .partition(|p| gone.get(&(p.tgid, p.start_time)) != Some(&false));
            let dead = dead.iter().map(|p| p.tgid);
            if live.is_empty() {
                dying.extend(dead);
            } else {
                leave.extend(dead);
            }
            // A vfork child that exec'd has an address space of its own now. Compared with
            // a live process: an exited one (a zombie) has no address space at all.
            if let Some((anchor, rest)) = live.split_first() {
                for p in rest {
                    if self.proc.same_mm(anchor.tgid, p.tgid) == Some(false) {
                        leave.push(p.tgid);
                    }
                }
            }
        }
        for t in leave {
            self.leave(t);
        }
        for t in dying {
            self.dying.entry(t).or_insert(self.ticks);
        }
        self.expire_dying();
        self.trim_paths();
        self.dying.len()
    }

    /// The agent's clock: dead processes whose events had time to arrive leave the map.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.expire_dying();
    }

    fn expire_dying(&mut self) {
        let due: Vec<u32> = self
            .dying
            .iter()
            .filter(|&(_, &at)| self.ticks >= at + DYING_TICKS)
            .map(|(&t, _)| t)
            .collect();
        if !due.is_empty() {
            for t in due {
                self.leave(t);
            }
            self.trim_paths();
        }
    }

    /// Is `tgid`, started at `start_time`, a live holder? An exited one stays in the map a
    /// while for its in-flight events (see [`Applier::forget_gone`]), not as a holder.
    pub fn holds(&self, tgid: u32, start_time: u64) -> bool {
        self.map.start_time_of(tgid) == Some(start_time) && !self.is_dying(tgid)
    }

    /// Found dead (or gone to another address space) and kept only for the events still
    /// on their way: never an answer about now.
    pub fn is_dying(&self, tgid: u32) -> bool {
        self.dying.contains_key(&tgid)
    }

    /// Drops the dying from rows answering a question about now.
    pub fn only_live(&self, rows: &mut Vec<HolderRow>) {
        if !self.dying.is_empty() {
            rows.retain(|r| !self.is_dying(r.pid));
        }
    }

    /// File names are kept for files some holder maps, no others.
    fn trim_paths(&mut self) {
        let held = self.map.files_held();
        self.paths.retain(|f, _| held.contains(f));
    }

    /// Drops holders left with no page. The kernel keeps watching a process that is still
    /// alive (it may fault again and fork: a stale "unwatch" would hide that fork); only a
    /// process that is gone is unwatched.
    fn gc(&mut self, h: HolderId) {
        if self.map.pages_of(h) == 0
            && let Some(info) = self.map.info(h)
        {
            let procs: Vec<_> = info.processes().map(|p| (p.tgid, p.start_time)).collect();
            self.map.remove_holder(h);
            for ((tgid, _), gone) in procs.iter().zip(self.gone_of(&procs)) {
                if gone {
                    self.forget(*tgid);
                }
            }
        }
    }

    pub fn apply(&mut self, ev: &Event, topo: &Topology) {
        if let Err(e) = check_event(ev) {
            log::warn!("event not applied: {e}");
            return;
        }
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
        let Some(per) = pages_of_page_size(f.page_size) else {
            return;
        };
        let pages = per * f.pages;
        let vpage = f.page_address >> 12;
        if f.pfn.is_some() && self.changes.since(f.mm, f.tgid) > f.ts_ns {
            // Late: some of these pages may have been zapped or moved since.
            let h = self.holder_in(f.tgid, f.mm, &f.comm);
            self.stats.late_ranges += 1;
            self.resync(h, f.tgid, vpage, vpage + pages, topo);
            self.gc(h);
            return;
        }
        match f.pfn {
            Some(pfn) if topo.namespace_of_pfn(pfn).is_some() => {
                let h = self.holder_in(f.tgid, f.mm, &f.comm);
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
                let h = self.holder_in(f.tgid, f.mm, &f.comm);
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
        self.changes.note(z.mm, owner, z.ts_ns);
        match owner.and_then(|t| self.map.holder_of(t).map(|h| (t, h))) {
            Some((tgid, h)) => {
                let (_, mut recheck) = self.map.remove_vrange(h, vs, ve);
                // Pages a range read ahead of the ring added after this zap was stamped
                // are not its to remove: what the page tables say now decides.
                recheck.extend(self.ranges.ahead_of(z.ts_ns, z.mm, Some(tgid), vs, ve));
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
    /// A child made with `CLONE_VM` (not a thread: another tgid) shares the parent's
    /// address space: it joins the parent's holder, its pages are the parent's.
    fn fork(&mut self, f: &Fork, topo: &Topology) {
        if let Some(h) = self.map.holder_of(f.parent_tgid) {
            let same = match self.proc.same_mm(f.parent_tgid, f.child_tgid) {
                Some(same) => same,
                // Cannot ask the kernel: the mm the fault path reported for the parent.
                None => f.child_mm != 0 && self.mm_owner.get(&f.child_mm) == Some(&f.parent_tgid),
            };
            if same {
                self.join(h, f.child_tgid, "");
                return;
            }
        }
        if f.child_mm != 0 {
            self.mm_owner.insert(f.child_mm, f.child_tgid);
        }
        self.resync_process(f.child_tgid, topo);
    }

    /// The source range was zapped (removed already); the pages now live at the new range.
    fn mremap(&mut self, m: &Mremap, topo: &Topology) {
        self.changes.note(0, Some(m.tgid), m.ts_ns);
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
            // Gone: its pages went with it, unless a sharer still uses them.
            Err(_) => {
                self.leave(tgid);
            }
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
                let h = match self.map.holder_of(tgid) {
                    Some(h) => h,
                    None => match self.sharing_holder(tgid) {
                        Some(h) => {
                            self.join(h, tgid, "");
                            h
                        }
                        None => self.holder(tgid, ""),
                    },
                };
                self.map.replace_vrange(h, 0, u64::MAX >> 12, &runs)
            }
            Err(_) => (0, self.leave(tgid)),
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
        self.forget_gone();
        let mut total = (0, 0);
        // One page-table read per address space: its sharers' are the same.
        let named: Vec<u32> = self.map.holders().map(|(_, h)| h.tgid).collect();
        let known: std::collections::HashSet<u32> = self
            .map
            .holders()
            .flat_map(|(_, h)| h.processes().map(|p| p.tgid))
            .collect();
        for tgid in &named {
            // A dying process's page tables are gone; it leaves on its own (`tick`).
            if self.is_dying(*tgid) {
                continue;
            }
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

    /// The cgroup of holder `tgid` started at `start_time`: read from /proc once per
    /// process and kept on its holder, so it goes when the holder goes (no per-pid cache to
    /// outlive the process). Read after the holder was seen and checked against its start
    /// time afterwards: a pid reused in between is another process, whose cgroup is not
    /// this holder's.
    pub fn cgroup_of(
        &mut self,
        tgid: u32,
        start_time: u64,
    ) -> Option<std::sync::Arc<crate::proc::cgroup::Cgroup>> {
        let id = self.map.holder_of(tgid)?;
        let h = self.map.info(id)?;
        // The process the address space is named by, no sharer of it (even one started in
        // the same clock tick): the cache is that process's.
        if h.tgid != tgid || h.start_time != start_time {
            return None;
        }
        if h.cgroup_read {
            return h.cgroup.clone();
        }
        // An error (gone, not permitted) is asked again next time; a text naming no cgroup
        // (no hierarchy mounted) is an answer, kept like any other: re-read, it cost two
        // /proc reads per holder on every listing and every `holders` answer.
        let text = self.proc.cgroup(tgid).ok()?;
        if self.proc.stat(tgid).map(|s| s.0) != Some(start_time) {
            return None;
        }
        let c = crate::proc::cgroup::parse(&text).map(std::sync::Arc::new);
        self.map.set_cgroup(id, c.clone());
        c
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
        self.forget_gone();
        let sel: Vec<_> = ranges
            .iter()
            .flat_map(|&(s, e)| self.map.in_pfn_range(s, e))
            .collect();
        let mut r = super::query::rows(&self.map, &sel, false);
        self.only_live(&mut r);
        self.name_files(&mut r, topo);
        r
    }

    /// Fills in file names (from what we learned, else from the holder's maps) and each
    /// process's cgroup, container and pod.
    pub fn name_files(&mut self, rows: &mut [HolderRow], topo: &Topology) {
        for r in rows {
            if let Some(c) = self.cgroup_of(r.pid, r.start_time) {
                r.set_cgroup(&c);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::PfnSource,
        holders::ranges::Source,
        os::fake::{DEV, END_PFN, FIRST_PFN, FakeOs, FakeProc, topology},
    };

    const VADDR: u64 = 0x7f00_0000_0000;

    /// `tgid` faults page `i` of the fake file in address space `mm`, where the fake
    /// machine has address space `space`'s pages.
    fn fault(tgid: u32, mm: u64, space: u32, i: u64) -> Event {
        Event::Fault(Fault {
            ts_ns: 1,
            tgid,
            tid: tgid,
            comm: String::new(),
            dev: DEV,
            ino: 12,
            offset: i << 12,
            address: VADDR + (i << 12),
            page_address: VADDR + (i << 12),
            pfn: Some(FIRST_PFN + space as u64 * 4 + i),
            pfn_source: Some(PfnSource::Kernel),
            page_size: 4096,
            write: true,
            user: true,
            mapped: true,
            zero_page: false,
            result: "NOPAGE".into(),
            result_raw: 0x100,
            vma_start: VADDR,
            vma_end: VADDR + 4 * 4096,
            shared: true,
            device: Some("pmem0".into()),
            devdax: false,
            mm,
            pages: 1,
            last_ts_ns: 0,
            range: None,
        })
    }

    fn pids(app: &mut Applier) -> Vec<u32> {
        let topo = topology(&["/mnt/pmem0"]);
        let mut p: Vec<u32> = app
            .rows_in_pfn_ranges(&topo, &[(FIRST_PFN, END_PFN)])
            .iter()
            .map(|r| r.pid)
            .collect();
        p.dedup();
        p
    }

    #[test]
    fn a_process_sharing_the_address_space_before_the_first_fault_is_a_holder() {
        // 101 was cloned with CLONE_VM (no CLONE_THREAD) before 100 faulted: no fork event.
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("parent", 7)),
                (101, FakeProc::sharer("child", 8, 100)),
                (102, FakeProc::holder("other", 9)),
            ],
            &["/mnt/pmem0"],
        );
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        app.apply(&fault(100, 0xa000, 100, 0), &topo);
        assert_eq!(pids(&mut app), [100, 101]);
        assert_eq!(app.map.holder_count(), 2);
        let w = app.take_watch_changes();
        assert!(w.add.contains(&101), "the sharer's forks are reported too");
        // The sharer faults next: the same address space, no second copy of the pages.
        app.apply(&fault(101, 0xa000, 100, 1), &topo);
        assert_eq!(app.map.extent_count(), 1);
        assert_eq!(app.map.pages_of(app.map.holder_of(101).unwrap()), 2);
    }

    #[test]
    fn the_faulting_process_exits_and_its_sharer_stays_listed() {
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("parent", 7)),
                (101, FakeProc::sharer("child", 8, 100)),
            ],
            &["/mnt/pmem0"],
        );
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        app.apply(&fault(100, 0xa000, 100, 0), &topo);
        // The parent exits; the mm lives on in the child, so the kernel zaps nothing.
        os.state.borrow_mut().procs.remove(&100);
        assert_eq!(pids(&mut app), [101], "the dead pid is never reported");
        let h = app.map.holder_of(101).unwrap();
        assert_eq!(app.map.pages_of(h), 1);
        assert!(app.take_watch_changes().remove.contains(&100));
        // A reconcile keeps it and reads the address space once, through the sharer (the
        // fake page tables hold all 4 pages; 1 was faulted).
        app.reconcile(&topo);
        assert_eq!(pids(&mut app), [101]);
        assert_eq!((app.stats.drift_missing, app.stats.drift_extra), (3, 0));
        assert_eq!(app.map.pages_of(app.map.holder_of(101).unwrap()), 4);
    }

    #[test]
    fn a_clone_vm_child_of_a_holder_joins_its_address_space() {
        let os = FakeOs::new(&[(100, FakeProc::holder("parent", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        app.apply(&fault(100, 0xa000, 100, 0), &topo);
        os.state
            .borrow_mut()
            .procs
            .insert(101, FakeProc::sharer("child", 8, 100));
        app.apply(
            &Event::Fork(Fork {
                ts_ns: 2,
                parent_tgid: 100,
                comm: "parent".into(),
                child_tgid: 101,
                child_mm: 0xa000,
            }),
            &topo,
        );
        assert_eq!(pids(&mut app), [100, 101]);
        assert_eq!(
            app.map.extent_count(),
            1,
            "one address space, its pages once"
        );
        // A zap by the child (munmap in the shared mm) removes the pages for both.
        app.apply(
            &Event::Zap(Zap {
                ts_ns: 3,
                tgid: 101,
                tid: 101,
                comm: "child".into(),
                start: VADDR,
                end: VADDR + 4 * 4096,
                vma_start: VADDR,
                vma_end: VADDR + 4 * 4096,
                offset: 0,
                dev: DEV,
                ino: 12,
                devdax: false,
                own_mm: true,
                exiting: false,
                cow: false,
                owner_tgid: None,
                mm: 0xa000,
            }),
            &topo,
        );
        assert!(pids(&mut app).is_empty());
    }

    #[test]
    fn a_sharer_of_a_scanned_holder_joins_it_without_losing_its_pages() {
        // 100 was found by the start-up scan (no mm known); its CLONE_VM child faults.
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("parent", 7)),
                (101, FakeProc::sharer("child", 8, 100)),
            ],
            &["/mnt/pmem0"],
        );
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        app.resync_process(100, &topo);
        assert_eq!(app.map.pages_of(app.map.holder_of(100).unwrap()), 4);
        app.apply(&fault(101, 0xa000, 100, 2), &topo);
        assert_eq!(app.map.holder_of(100), app.map.holder_of(101));
        assert_eq!(app.map.pages_of(app.map.holder_of(101).unwrap()), 4);
        assert_eq!(pids(&mut app), [100, 101]);
    }

    #[test]
    fn a_reused_mm_address_is_not_a_sharer() {
        // 100's mm was freed and the same address now is 102's own.
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("first", 7)),
                (102, FakeProc::holder("second", 9)),
            ],
            &["/mnt/pmem0"],
        );
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        app.apply(&fault(100, 0xa000, 100, 0), &topo);
        app.apply(&fault(102, 0xa000, 102, 0), &topo);
        assert_eq!(pids(&mut app), [100, 102]);
        assert_ne!(app.map.holder_of(100), app.map.holder_of(102));
    }

    /// history/ext4 on 6.12: a process killed by the memory failure it triggered was found
    /// dead (an answer's forget_gone) before the agent applied that failure's record, and
    /// the stored failure listed the other holder only. A dead process is hidden from
    /// answers at once and leaves the map only when its events had time to arrive.
    #[test]
    fn a_process_found_dead_is_still_found_by_its_in_flight_events() {
        let os = FakeOs::new(&[], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        for pid in [261, 262] {
            os.state
                .borrow_mut()
                .procs
                .insert(pid, FakeProc::holder("puppet", pid as u64));
            app.apply(&fault(pid, pid as u64, pid, 1), &topo);
        }
        // 262's page, poisoned by 262 itself, which the kernel then killed.
        let pfn = FIRST_PFN + 262 * 4 + 1;
        os.state.borrow_mut().procs.remove(&262);
        app.forget_gone();
        let who = |app: &Applier| -> Vec<u32> {
            app.map
                .who_maps(pfn)
                .iter()
                .filter_map(|v| app.map.info(v.holder).map(|h| h.tgid))
                .collect()
        };
        assert_eq!(
            who(&app),
            [262],
            "the failure's record, applied now, finds it"
        );
        assert_eq!(pids(&mut app), [261], "a dead pid is never an answer");
        // A reconcile in between does not drop it early either.
        app.reconcile(&topo);
        assert_eq!(who(&app), [262]);
        for _ in 0..DYING_TICKS {
            app.tick();
        }
        assert!(
            who(&app).is_empty(),
            "gone once its events had time to arrive"
        );
        assert!(app.map.holder_of(262).is_none());
        assert!(app.take_watch_changes().remove.contains(&262));
        assert_eq!(pids(&mut app), [261]);
    }

    /// A departure listed 100 holders in ~26 ms under TCG, most of it one stat read each to
    /// hide the exited. Holders an enforcing agent pinned are asked with one poll of their
    /// pidfds; /proc is read only for the others, and an exited pin is hidden as before.
    #[test]
    fn pinned_holders_are_known_alive_or_exited_without_reading_their_stat() {
        use crate::policy::pins::Pins;
        let os = FakeOs::new(&[], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        let mut pins = Pins::new(10);
        app.set_liveness(pins.liveness());
        for pid in [261, 262, 263] {
            os.state
                .borrow_mut()
                .procs
                .insert(pid, FakeProc::holder("db", pid as u64));
            app.apply(&fault(pid, pid as u64, pid, 1), &topo);
        }
        for pid in [261, 262] {
            assert!(pins.pin(&os, pid, pid as u64));
        }
        os.state.borrow_mut().procs.remove(&262);
        os.state.borrow_mut().stat_opens.clear();
        app.forget_gone();
        let s = os.state.borrow();
        assert_eq!(
            s.stat_opens,
            [263],
            "only the unpinned holder's stat is read"
        );
        let mut polled = s.pin_polls.clone();
        polled.sort();
        assert_eq!(polled, [261, 262]);
        drop(s);
        assert!(app.is_dying(262), "the exited pin is hidden");
        assert!(!app.is_dying(261) && !app.is_dying(263));
        assert_eq!(pids(&mut app), [261, 263]);
    }

    #[test]
    fn exited_processes_leave_every_cache() {
        let os = FakeOs::new(&[], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        for n in 0..1000u32 {
            let pid = 1000 + n;
            os.state
                .borrow_mut()
                .procs
                .insert(pid, FakeProc::holder("short", n as u64 + 1));
            app.apply(&fault(pid, 0x10_0000 + n as u64, pid, 0), &topo);
            os.state.borrow_mut().procs.remove(&pid);
            app.forget_gone();
        }
        for _ in 0..DYING_TICKS {
            app.tick();
        }
        assert_eq!(app.map.holder_count(), 0);
        assert!(
            app.mm_owner.is_empty(),
            "{} mm entries left",
            app.mm_owner.len()
        );
        assert!(app.paths.is_empty(), "{} file names left", app.paths.len());
        let w = app.take_watch_changes();
        assert_eq!(w.remove.len(), 1000, "every exited process is unwatched");
    }

    /// A range of `pages` pages of the fake file from page 0, first fault at `ts_ns`,
    /// learned from `cpu`'s slot or ring as range `seq`.
    fn range(tgid: u32, ts_ns: u64, pages: u64, seq: u64) -> Fault {
        let Event::Fault(mut f) = fault(tgid, 0xa000, tgid, 0) else {
            unreachable!()
        };
        f.ts_ns = ts_ns;
        f.last_ts_ns = ts_ns + 10;
        f.pages = pages;
        f.range = Some((0, seq));
        f
    }

    fn munmap(tgid: u32, ts_ns: u64) -> Event {
        Event::Zap(Zap {
            ts_ns,
            tgid,
            tid: tgid,
            comm: "w".into(),
            start: VADDR,
            end: VADDR + 4 * 4096,
            vma_start: VADDR,
            vma_end: VADDR + 4 * 4096,
            offset: 0,
            dev: DEV,
            ino: 12,
            devdax: false,
            own_mm: true,
            exiting: false,
            cow: false,
            owner_tgid: None,
            mm: 0xa000,
        })
    }

    fn pages_of(app: &Applier, tgid: u32) -> u64 {
        app.map
            .holder_of(tgid)
            .map(|h| {
                app.map
                    .all()
                    .iter()
                    .filter(|v| v.holder == h)
                    .map(|v| v.pages)
                    .sum()
            })
            .unwrap_or(0)
    }

    #[test]
    fn a_range_applies_all_its_pages() {
        let os = FakeOs::new(&[(100, FakeProc::holder("w", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        app.apply(&Event::Fault(range(100, 5, 4, 1)), &topo);
        assert_eq!(pages_of(&app, 100), 4);
        assert_eq!(app.stats.resyncs, 0);
    }

    #[test]
    fn a_range_arriving_after_a_zap_of_its_address_space_is_read_from_the_page_tables() {
        // The range began at 5 and reached the agent after a munmap stamped 10 (its record
        // was emitted behind the zap): the pages are gone, the page tables say so.
        let os = FakeOs::new(&[(100, FakeProc::holder("w", 7))], &["/mnt/pmem0"]);
        os.state.borrow_mut().procs.get_mut(&100).unwrap().maps = false;
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        app.apply(&munmap(100, 10), &topo);
        app.apply(&Event::Fault(range(100, 5, 4, 1)), &topo);
        assert_eq!(
            pages_of(&app, 100),
            0,
            "a late range must not invent a holder"
        );
        assert_eq!(app.stats.late_ranges, 1);
        // A range begun after the zap is taken as it is.
        app.apply(&Event::Fault(range(100, 11, 4, 2)), &topo);
        assert_eq!(pages_of(&app, 100), 4);
    }

    #[test]
    fn an_older_zap_applied_after_a_range_read_ahead_does_not_remove_its_pages() {
        // The range (first fault at 20) was read from its CPU's slot while a munmap stamped
        // 10 (of the pages as they were before) was still queued: the pages are mapped.
        let os = FakeOs::new(&[(100, FakeProc::holder("w", 7))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let mut app = Applier::new(os.procfs_box());
        let r = app
            .ranges
            .fresh(range(100, 20, 4, 1), Source::Slot)
            .unwrap();
        app.apply(&Event::Fault(r), &topo);
        app.apply(&munmap(100, 10), &topo);
        assert_eq!(
            pages_of(&app, 100),
            4,
            "an older zap must not hide a holder"
        );
        // A zap newer than the range removes them.
        app.apply(&munmap(100, 30), &topo);
        assert_eq!(pages_of(&app, 100), 0);
    }
}

#[cfg(test)]
mod cgroup_tests {
    use super::*;
    use crate::{
        os::fake::{FakeOs, FakeProc, topology},
        proc::cgroup::Runtime,
    };

    const POD: &str = "0::/kubepods.slice/kubepods-besteffort.slice/\
        kubepods-besteffort-pod1b2c3d4e_5f60_4a7b_8c9d_0e1f2a3b4c5d.slice/\
        cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n";

    fn rows_of(a: &mut Applier, topo: &Topology) -> Vec<HolderRow> {
        let sel = a.map.all();
        let mut r = super::super::query::rows(&a.map, &sel, false);
        a.name_files(&mut r, topo);
        r
    }

    /// The cgroup kept for an address space is its naming process's: a sharer (even one
    /// started in the same clock tick) is not given it, and a sharer that comes to name the
    /// address space when the first process exits has its own read, not the dead one's.
    #[test]
    fn a_sharer_is_never_given_the_cgroup_of_the_process_the_space_was_named_by() {
        let os = FakeOs::new(
            &[
                (
                    100,
                    FakeProc {
                        cgroup: Some("0::/first.scope\n".into()),
                        ..FakeProc::holder("parent", 7)
                    },
                ),
                (
                    101,
                    FakeProc {
                        cgroup: Some("0::/second.scope\n".into()),
                        // Started in the same tick as 100.
                        ..FakeProc::sharer("child", 7, 100)
                    },
                ),
            ],
            &["/mnt/pmem0"],
        );
        let topo = topology(&["/mnt/pmem0"]);
        let mut a = Applier::new(os.procfs_box());
        a.reconcile(&topo);
        let cg = |a: &mut Applier| {
            rows_of(a, &topo)
                .into_iter()
                .map(|r| (r.pid, r.cgroup))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cg(&mut a),
            [(100, Some("/first.scope".to_string())), (101, None)]
        );
        // The parent exits: the child names the address space now.
        os.state.borrow_mut().procs.remove(&100);
        a.forget_gone();
        assert_eq!(a.map.start_time_of(101), Some(7));
        assert_eq!(cg(&mut a), [(101, Some("/second.scope".to_string()))]);
    }

    /// A kernel with no cgroup hierarchy mounted (the VM's: nothing mounts one) prints an
    /// empty /proc/PID/cgroup. That is an answer, kept like any other: it was re-read (with
    /// a stat to check the pid) for every holder on every listing, 10-48 ms of a 100-holder
    /// departure's listing in the VM. A file that cannot be read is asked again.
    #[test]
    fn a_cgroup_file_naming_no_cgroup_is_read_once_and_an_unreadable_one_again() {
        let os = FakeOs::new(
            &[
                (
                    100,
                    FakeProc {
                        cgroup: Some(String::new()),
                        ..FakeProc::holder("none", 10)
                    },
                ),
                (
                    200,
                    FakeProc {
                        cgroup: None,
                        ..FakeProc::holder("unreadable", 11)
                    },
                ),
            ],
            &["/mnt/pmem0"],
        );
        let topo = topology(&["/mnt/pmem0"]);
        let mut a = Applier::new(os.procfs_box());
        a.reconcile(&topo);
        for _ in 0..3 {
            let r = rows_of(&mut a, &topo);
            assert!(r.iter().all(|r| r.cgroup.is_none()), "{r:?}");
        }
        let reads = |pid| {
            os.state
                .borrow()
                .cgroup_reads
                .iter()
                .filter(|&&p| p == pid)
                .count()
        };
        assert_eq!(reads(100), 1, "an empty answer is an answer");
        assert_eq!(reads(200), 3, "an error is no answer");
    }

    #[test]
    fn rows_name_cgroup_container_and_pod_read_once_per_process() {
        let pod = FakeProc {
            cgroup: Some(POD.into()),
            ..FakeProc::holder("db", 10)
        };
        let unreadable = FakeProc {
            cgroup: None,
            ..FakeProc::holder("gone", 11)
        };
        let os = FakeOs::new(
            &[
                (100, pod),
                (101, FakeProc::holder("plain", 12)),
                (102, unreadable),
            ],
            &["/mnt/pmem0"],
        );
        let topo = topology(&["/mnt/pmem0"]);
        let mut a = Applier::new(os.procfs_box());
        a.reconcile(&topo);
        let r = rows_of(&mut a, &topo);
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[0].pod_uid.as_deref(),
            Some("1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d")
        );
        let c = r[0].container.as_ref().unwrap();
        assert_eq!((c.runtime, &c.id[..4]), (Runtime::Containerd, "0123"));
        assert!(r[0].in_cgroup("1b2c3d4e-5f60"));
        // No layout: the plain path, no container, no pod.
        assert_eq!(r[1].cgroup.as_deref(), Some("/dax.slice/plain.scope"));
        assert_eq!((&r[1].container, &r[1].pod_uid), (&None, &None));
        assert!(!r[1].in_cgroup("1b2c3d4e-5f60"));
        // Unreadable: nothing claimed, and the row is still listed.
        assert_eq!(r[2].cgroup, None);
        assert!(!r[2].in_cgroup("/"));

        // Read once: a later change of the process's cgroup file is not re-read...
        os.state.borrow_mut().procs.get_mut(&100).unwrap().cgroup = Some("0::/moved\n".into());
        assert!(rows_of(&mut a, &topo)[0].pod_uid.is_some());
        // ...but a new process on the same pid is another holder, read afresh: the old
        // one's cgroup went with its holder.
        os.state.borrow_mut().procs.remove(&100);
        a.reconcile(&topo);
        for _ in 0..DYING_TICKS {
            a.tick();
        }
        assert!(a.map.holder_of(100).is_none());
        os.state.borrow_mut().procs.insert(
            100,
            FakeProc {
                cgroup: Some("0::/moved\n".into()),
                ..FakeProc::holder("db2", 20)
            },
        );
        a.reconcile(&topo);
        let r = rows_of(&mut a, &topo);
        assert_eq!(
            (r[0].start_time, r[0].cgroup.as_deref()),
            (20, Some("/moved"))
        );
        assert_eq!(r[0].pod_uid, None);
        // A process that left takes its cache entry with it: no holder, nothing kept.
        os.state.borrow_mut().procs.remove(&101);
        a.reconcile(&topo);
        for _ in 0..DYING_TICKS {
            a.tick();
        }
        assert!(a.map.holder_of(101).is_none());
        assert_eq!(
            a.map.holders().filter(|(_, h)| h.cgroup.is_some()).count(),
            1
        );
    }

    #[test]
    fn a_pid_reused_between_the_reads_is_not_believed() {
        let os = FakeOs::new(&[(100, FakeProc::holder("db", 10))], &["/mnt/pmem0"]);
        let topo = topology(&["/mnt/pmem0"]);
        let mut a = Applier::new(os.procfs_box());
        a.reconcile(&topo);
        // The holder's process left and its pid now names another one (start time 99).
        os.state
            .borrow_mut()
            .procs
            .get_mut(&100)
            .unwrap()
            .start_time = 99;
        let r = rows_of(&mut a, &topo);
        assert_eq!((r[0].start_time, &r[0].cgroup), (10, &None));
        assert!(a.map.holders().all(|(_, h)| h.cgroup.is_none()));
    }
}
