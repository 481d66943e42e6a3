//! The live map: physical page ranges → the processes whose page tables map them.
//!
//! Storage is range-based and compact, so memory grows with mappings, never with device
//! size:
//! - an [`Extent`] (40 bytes) is a run of pages one holder maps contiguously: consecutive
//!   virtual pages → consecutive pfns → consecutive file pages of one file. Sequential 4 KiB
//!   faults extend the holder's last extent in place;
//! - extents never cross a 2 MiB-aligned pfn boundary ("chunk"), so "who maps pfn X" is one
//!   hash lookup of X's chunk and a walk of that chunk's short list, whatever the size of the
//!   device or the number of holders elsewhere;
//! - each holder keeps the indices of its extents, for munmap-style removal by virtual
//!   range and for dropping a process at once.
//!
//! Several holders may map the same pfn (shared files, fork, reflinked files): each has its
//! own extents in the same chunk list.

use std::collections::HashMap;

use serde::Serialize;

use crate::topology::DevId;

/// log2 of pages per chunk (2 MiB of 4 KiB pages).
const CHUNK_SHIFT: u32 = 9;

/// No pfn reaches this: physical addresses have at most 52 bits.
pub const PFN_LIMIT: u64 = 1 << 40;
/// The longest extent the map holds (and so the longest a `holders` row can list): extents
/// never cross a chunk.
pub const MAX_EXTENT_PAGES: u64 = 1 << CHUNK_SHIFT;

/// 4 KiB pages in one page of `bytes`: the kernel maps DAX with 4 KiB PTEs, 2 MiB PMDs and
/// 1 GiB PUDs, nothing else.
pub fn pages_of_page_size(bytes: u64) -> Option<u64> {
    match bytes {
        4096 => Some(1),
        0x20_0000 => Some(512),
        0x4000_0000 => Some(1 << 18),
        _ => None,
    }
}

/// Why pages `[pfn, pfn + npages)` at virtual page `vpage` cannot exist, if they cannot.
pub fn check_pages(vpage: u64, pfn: u64, npages: u64) -> Result<(), String> {
    if pfn.checked_add(npages).is_none_or(|e| e > PFN_LIMIT) {
        return Err(format!(
            "pfns {pfn:#x}+{npages} go beyond the largest possible pfn {PFN_LIMIT:#x}"
        ));
    }
    if vpage.checked_add(npages).is_none_or(|e| e > u64::MAX >> 12) {
        return Err(format!(
            "virtual pages {vpage:#x}+{npages} go beyond the address space"
        ));
    }
    Ok(())
}
const NONE: u32 = u32::MAX;

/// Two start times name the same process (0: not known, matches any).
fn same_start(a: u64, b: u64) -> bool {
    a == b || a == 0 || b == 0
}

/// What file (or device) an extent maps. Device-dax: `dev` is the character device, `ino` 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FileKey {
    pub dev: DevId,
    pub ino: u64,
}

impl FileKey {
    pub fn is_devdax(&self) -> bool {
        self.ino == 0
    }
}

pub type HolderId = u32;

/// An address space (a kernel mm) holding DAX pages, named by a process that uses it. Page
/// tables belong to the mm, not to a process: every process sharing it without being a
/// thread of `tgid` (`clone(CLONE_VM)` without `CLONE_THREAD`, a vfork child before its exec)
/// holds every page too, and is in `sharers`.
#[derive(Clone, Debug, Serialize)]
pub struct Holder {
    pub tgid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): with the tgid, the
    /// process's identity (tgids are reused).
    pub start_time: u64,
    pub comm: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sharers: Vec<Process>,
    /// The process's cgroup, read once per (tgid, start time) and dropped with the holder.
    #[serde(skip)]
    pub cgroup: Option<std::sync::Arc<crate::proc::cgroup::Cgroup>>,
    /// `cgroup` was read: `None` then means the kernel named no cgroup (no hierarchy
    /// mounted: /proc/PID/cgroup is empty), not "not read yet".
    #[serde(skip)]
    pub cgroup_read: bool,
}

/// One process, as a holder's identity or one of its sharers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    pub tgid: u32,
    pub start_time: u64,
    pub comm: String,
}

impl Holder {
    /// Every process using the address space: the one it is named by, then its sharers.
    pub fn processes(&self) -> impl Iterator<Item = Process> + '_ {
        std::iter::once(Process {
            tgid: self.tgid,
            start_time: self.start_time,
            comm: self.comm.clone(),
        })
        .chain(self.sharers.iter().cloned())
    }
}

/// A run of pages as events and scans produce it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First virtual page number (address >> 12).
    pub vpage: u64,
    pub pfn: u64,
    /// First file page (offset >> 12); device page for device-dax.
    pub pgoff: u64,
    pub npages: u64,
    pub flags: u16,
}

pub const F_SHARED: u16 = 1 << 0;
pub const F_WRITE: u16 = 1 << 1;
/// Mapped by a PMD (or PUD) in the kernel: a partial unmap drops the whole huge entry.
pub const F_HUGE: u16 = 1 << 2;
const FLAG_BITS: u32 = 12;
const NPAGES_MASK: u32 = (1 << (32 - FLAG_BITS)) - 1;

#[derive(Clone, Copy, Debug)]
struct Extent {
    pfn: u64,
    vpage: u64,
    pgoff: u64,
    holder: u32,
    file: u32,
    /// npages in the low 20 bits, flags in the high 12.
    len_flags: u32,
    /// Next extent in the same chunk, or NONE; for a free slot, the next free slot.
    next: u32,
}

impl Extent {
    fn npages(&self) -> u64 {
        (self.len_flags & NPAGES_MASK) as u64
    }
    fn flags(&self) -> u16 {
        (self.len_flags >> (32 - FLAG_BITS)) as u16
    }
    fn set(&mut self, npages: u64, flags: u16) {
        debug_assert!(npages <= NPAGES_MASK as u64);
        self.len_flags = (npages as u32) | ((flags as u32) << (32 - FLAG_BITS));
    }
    fn chunk(&self) -> u64 {
        self.pfn >> CHUNK_SHIFT
    }
}

const _: () = assert!(std::mem::size_of::<Extent>() == 40);

/// One extent as queries return it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ExtentView {
    pub holder: HolderId,
    pub file: FileKey,
    pub vaddr: u64,
    pub pfn: u64,
    /// File (or device) offset in bytes.
    pub offset: u64,
    pub pages: u64,
    pub shared: bool,
    pub write: bool,
    pub huge: bool,
}

#[derive(Default)]
pub struct HolderMap {
    extents: Vec<Extent>,
    free_head: u32,
    live: usize,
    chunks: HashMap<u64, u32>,
    holders: Vec<Option<Holder>>,
    /// Extent indices per holder, and the one most recently added or extended.
    holder_extents: Vec<Vec<u32>>,
    holder_last: Vec<u32>,
    free_holders: Vec<u32>,
    by_tgid: HashMap<u32, HolderId>,
    files: Vec<FileKey>,
    file_ids: HashMap<FileKey, u32>,
}

impl HolderMap {
    pub fn new() -> Self {
        Self {
            free_head: NONE,
            ..Default::default()
        }
    }

    // ---- holders ----------------------------------------------------------------------

    /// The holder for this process, created if needed. A different start time means the tgid
    /// was reused: the old holder's extents are dropped first.
    pub fn holder(&mut self, tgid: u32, start_time: u64, comm: &str) -> HolderId {
        if let Some(&id) = self.by_tgid.get(&tgid) {
            let h = self.holders[id as usize].as_mut().expect("live holder");
            if let Some(i) = h.sharers.iter().position(|p| p.tgid == tgid) {
                let p = &mut h.sharers[i];
                if same_start(p.start_time, start_time) {
                    if p.start_time == 0 {
                        p.start_time = start_time;
                    }
                    return id;
                }
                // A reused tgid: the process that shared the address space is gone.
                h.sharers.remove(i);
                self.by_tgid.remove(&tgid);
                return self.holder(tgid, start_time, comm);
            }
            if same_start(h.start_time, start_time) {
                if h.start_time == 0 {
                    h.start_time = start_time;
                }
                if !comm.is_empty() && h.comm != comm {
                    h.comm = comm.to_string();
                }
                return id;
            }
            // A reused tgid: the old process is gone; its address space stays while a
            // sharer uses it.
            self.remove_process(id, tgid);
        }
        let info = Holder {
            tgid,
            start_time,
            comm: comm.to_string(),
            sharers: Vec::new(),
            cgroup: None,
            cgroup_read: false,
        };
        let id = match self.free_holders.pop() {
            Some(id) => {
                self.holders[id as usize] = Some(info);
                id
            }
            None => {
                self.holders.push(Some(info));
                self.holder_extents.push(Vec::new());
                self.holder_last.push(NONE);
                (self.holders.len() - 1) as u32
            }
        };
        self.by_tgid.insert(tgid, id);
        id
    }

    /// Caches what the holder's process's cgroup says (see [`Holder::cgroup`]); `None`:
    /// it names none.
    pub fn set_cgroup(
        &mut self,
        id: HolderId,
        c: Option<std::sync::Arc<crate::proc::cgroup::Cgroup>>,
    ) {
        if let Some(Some(h)) = self.holders.get_mut(id as usize) {
            h.cgroup = c;
            h.cgroup_read = true;
        }
    }

    pub fn holder_of(&self, tgid: u32) -> Option<HolderId> {
        self.by_tgid.get(&tgid).copied()
    }

    /// The start time of process `tgid` as the map knows it (named holder or sharer).
    pub fn start_time_of(&self, tgid: u32) -> Option<u64> {
        let h = self.info(self.holder_of(tgid)?)?;
        if h.tgid == tgid {
            return Some(h.start_time);
        }
        h.sharers
            .iter()
            .find(|p| p.tgid == tgid)
            .map(|p| p.start_time)
    }

    /// Every process holding pages, with its start time.
    pub fn processes(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.holders().flat_map(|(_, h)| {
            std::iter::once((h.tgid, h.start_time))
                .chain(h.sharers.iter().map(|p| (p.tgid, p.start_time)))
        })
    }

    pub fn info(&self, id: HolderId) -> Option<&Holder> {
        self.holders.get(id as usize)?.as_ref()
    }

    pub fn holders(&self) -> impl Iterator<Item = (HolderId, &Holder)> {
        self.holders
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|h| (i as HolderId, h)))
    }

    /// Processes holding pages (every sharer of an address space counts).
    pub fn holder_count(&self) -> usize {
        self.by_tgid.len()
    }

    /// Records that process `tgid` uses address space `id` too (learned from a fork with
    /// `CLONE_VM`, a fault in the same mm, or `kcmp(KCMP_VM)`). A holder the process had
    /// on its own is dropped: its pages are the address space's, recorded once.
    pub fn add_sharer(&mut self, id: HolderId, tgid: u32, start_time: u64, comm: &str) {
        match self.by_tgid.get(&tgid) {
            Some(&cur) if cur == id => return,
            Some(&cur) => {
                self.remove_process(cur, tgid);
            }
            None => {}
        }
        let Some(h) = self.holders.get_mut(id as usize).and_then(Option::as_mut) else {
            return;
        };
        h.sharers.push(Process {
            tgid,
            start_time,
            comm: comm.to_string(),
        });
        self.by_tgid.insert(tgid, id);
    }

    /// Process `tgid` no longer uses address space `id` (it exited, or exec'd a new one).
    /// The pages stay while another process uses it; with the last one they go. Returns
    /// whether the holder (and its pages) went.
    pub fn remove_process(&mut self, id: HolderId, tgid: u32) -> bool {
        let Some(h) = self.holders.get_mut(id as usize).and_then(Option::as_mut) else {
            return false;
        };
        if let Some(i) = h.sharers.iter().position(|p| p.tgid == tgid) {
            h.sharers.remove(i);
        } else if h.tgid == tgid {
            if h.sharers.is_empty() {
                self.remove_holder(id);
                return true;
            }
            // The next sharer names the address space now; the cgroup read was the exited
            // process's, not its.
            let p = h.sharers.remove(0);
            h.tgid = p.tgid;
            h.start_time = p.start_time;
            h.comm = p.comm;
            h.cgroup = None;
            h.cgroup_read = false;
        } else {
            return false;
        }
        if self.by_tgid.get(&tgid) == Some(&id) {
            self.by_tgid.remove(&tgid);
        }
        false
    }

    /// Drops a holder and every page it maps.
    pub fn remove_holder(&mut self, id: HolderId) {
        let list = std::mem::take(&mut self.holder_extents[id as usize]);
        for idx in list {
            self.unlink_chunk(idx);
            self.free_extent(idx);
        }
        self.holder_last[id as usize] = NONE;
        if let Some(h) = self.holders[id as usize].take() {
            for p in h.processes() {
                self.by_tgid.remove(&p.tgid);
            }
            self.free_holders.push(id);
        }
    }

    /// Pages a holder maps.
    pub fn pages_of(&self, id: HolderId) -> u64 {
        self.holder_extents
            .get(id as usize)
            .map(|l| l.iter().map(|&i| self.extents[i as usize].npages()).sum())
            .unwrap_or(0)
    }

    // ---- files ----------------------------------------------------------------------------

    fn file_id(&mut self, f: FileKey) -> u32 {
        if let Some(&id) = self.file_ids.get(&f) {
            return id;
        }
        self.files.push(f);
        let id = (self.files.len() - 1) as u32;
        self.file_ids.insert(f, id);
        id
    }

    // ---- adding -------------------------------------------------------------------------

    /// Records that holder `h` maps `run` of `file`. Pages already recorded at the same
    /// virtual page with the same pfn are not duplicated (a write fault after a read fault);
    /// flags accumulate.
    pub fn add(&mut self, h: HolderId, file: FileKey, run: Run) {
        // Callers check their input; pages that cannot exist would otherwise wrap below.
        if check_pages(run.vpage, run.pfn, run.npages).is_err() {
            debug_assert!(false, "impossible run {run:?}");
            return;
        }
        let fid = self.file_id(file);
        let mut done = 0;
        while done < run.npages {
            // Split at chunk boundaries of the pfn.
            let pfn = run.pfn + done;
            let room = (1 << CHUNK_SHIFT) - (pfn & ((1 << CHUNK_SHIFT) - 1));
            let n = room.min(run.npages - done);
            self.add_piece(
                h,
                fid,
                Run {
                    vpage: run.vpage + done,
                    pfn,
                    pgoff: run.pgoff + done,
                    npages: n,
                    flags: run.flags,
                },
            );
            done += n;
        }
    }

    fn add_piece(&mut self, h: HolderId, fid: u32, r: Run) {
        // Fast path: the holder's last extent continues into this piece, or already holds it.
        let last = self.holder_last[h as usize];
        if last != NONE {
            let e = &mut self.extents[last as usize];
            if e.file == fid && e.chunk() == r.pfn >> CHUNK_SHIFT {
                let n = e.npages();
                let f = e.flags();
                if r.vpage >= e.vpage
                    && r.vpage + r.npages <= e.vpage + n
                    && r.pfn == e.pfn + (r.vpage - e.vpage)
                {
                    e.set(n, f | r.flags);
                    return;
                }
                if e.vpage + n == r.vpage
                    && e.pfn + n == r.pfn
                    && e.pgoff + n == r.pgoff
                    && (f & F_SHARED) == (r.flags & F_SHARED)
                    && (f & F_HUGE) == (r.flags & F_HUGE)
                {
                    e.set(n + r.npages, f | r.flags);
                    return;
                }
            }
        }
        // Already recorded elsewhere in this chunk?
        let chunk = r.pfn >> CHUNK_SHIFT;
        let mut cur = self.chunks.get(&chunk).copied().unwrap_or(NONE);
        while cur != NONE {
            let e = &mut self.extents[cur as usize];
            let n = e.npages();
            let (es, ee) = (e.vpage, e.vpage + n);
            if e.holder == h
                && e.file == fid
                && r.vpage < ee
                && es < r.vpage + r.npages
                && r.pfn.wrapping_sub(r.vpage) == e.pfn.wrapping_sub(es)
            {
                // The same pages at the same addresses, at least in part: only what lies
                // outside this extent is new (a page is never listed twice).
                let f = e.flags();
                e.set(n, f | r.flags);
                if r.vpage < es {
                    let k = es - r.vpage;
                    self.add_piece(h, fid, Run { npages: k, ..r });
                }
                let re = r.vpage + r.npages;
                if ee < re {
                    let k = ee - r.vpage;
                    self.add_piece(
                        h,
                        fid,
                        Run {
                            vpage: ee,
                            pfn: r.pfn + k,
                            pgoff: r.pgoff + k,
                            npages: re - ee,
                            flags: r.flags,
                        },
                    );
                }
                return;
            }
            cur = e.next;
        }
        let idx = self.alloc_extent(Extent {
            pfn: r.pfn,
            vpage: r.vpage,
            pgoff: r.pgoff,
            holder: h,
            file: fid,
            len_flags: 0,
            next: NONE,
        });
        self.extents[idx as usize].set(r.npages, r.flags);
        let head = self.chunks.entry(chunk).or_insert(NONE);
        self.extents[idx as usize].next = *head;
        *head = idx;
        self.holder_extents[h as usize].push(idx);
        self.holder_last[h as usize] = idx;
    }

    fn alloc_extent(&mut self, e: Extent) -> u32 {
        self.live += 1;
        if self.free_head != NONE {
            let idx = self.free_head;
            self.free_head = self.extents[idx as usize].next;
            self.extents[idx as usize] = e;
            idx
        } else {
            self.extents.push(e);
            (self.extents.len() - 1) as u32
        }
    }

    fn free_extent(&mut self, idx: u32) {
        self.live -= 1;
        let e = &mut self.extents[idx as usize];
        e.len_flags = 0;
        e.next = self.free_head;
        self.free_head = idx;
    }

    fn unlink_chunk(&mut self, idx: u32) {
        let chunk = self.extents[idx as usize].chunk();
        let Some(&head) = self.chunks.get(&chunk) else {
            return;
        };
        if head == idx {
            let next = self.extents[idx as usize].next;
            if next == NONE {
                self.chunks.remove(&chunk);
            } else {
                self.chunks.insert(chunk, next);
            }
            return;
        }
        let mut cur = head;
        while cur != NONE {
            let next = self.extents[cur as usize].next;
            if next == idx {
                self.extents[cur as usize].next = self.extents[idx as usize].next;
                return;
            }
            cur = next;
        }
    }

    // ---- removing -----------------------------------------------------------------------

    /// Removes holder `h`'s pages in virtual pages `[vstart, vend)`. Returns the pages
    /// removed and the huge (PMD/PUD-mapped) extents that were only partly inside, as
    /// virtual page ranges the kernel may have dropped entirely (a DAX huge entry is not
    /// split, it is zapped whole) and which the caller should re-check.
    pub fn remove_vrange(&mut self, h: HolderId, vstart: u64, vend: u64) -> (u64, Vec<(u64, u64)>) {
        let list = std::mem::take(&mut self.holder_extents[h as usize]);
        let mut keep = Vec::with_capacity(list.len());
        let mut removed = 0;
        let mut recheck = Vec::new();
        let mut additions: Vec<(u32, Run)> = Vec::new();
        for idx in list {
            let e = self.extents[idx as usize];
            let (es, n) = (e.vpage, e.npages());
            let ee = es + n;
            if ee <= vstart || es >= vend {
                keep.push(idx);
                continue;
            }
            let cut_s = es.max(vstart);
            let cut_e = ee.min(vend);
            removed += cut_e - cut_s;
            if e.flags() & F_HUGE != 0 && (cut_s > es || cut_e < ee) {
                recheck.push((es, ee));
            }
            // Pieces outside the cut survive.
            if es < cut_s {
                additions.push((
                    e.file,
                    Run {
                        vpage: es,
                        pfn: e.pfn,
                        pgoff: e.pgoff,
                        npages: cut_s - es,
                        flags: e.flags(),
                    },
                ));
            }
            if cut_e < ee {
                let skip = cut_e - es;
                additions.push((
                    e.file,
                    Run {
                        vpage: cut_e,
                        pfn: e.pfn + skip,
                        pgoff: e.pgoff + skip,
                        npages: ee - cut_e,
                        flags: e.flags(),
                    },
                ));
            }
            self.unlink_chunk(idx);
            self.free_extent(idx);
        }
        self.holder_extents[h as usize] = keep;
        self.holder_last[h as usize] = NONE;
        for (fid, r) in additions {
            self.add_piece(h, fid, r);
        }
        (removed, recheck)
    }

    /// Replaces holder `h`'s pages in `[vstart, vend)` with `runs` (from a pagemap read).
    /// Returns (pages that were missing, pages that were extra): the drift corrected.
    pub fn replace_vrange(
        &mut self,
        h: HolderId,
        vstart: u64,
        vend: u64,
        runs: &[(FileKey, Run)],
    ) -> (u64, u64) {
        // Diffed extent by extent (never page by page: a range may be terabytes). Extents
        // of one holder do not overlap in virtual pages, nor do the runs of one read.
        let before = self.mappings_in(h, vstart, vend);
        self.remove_vrange(h, vstart, vend);
        for (f, r) in runs {
            self.add(h, *f, *r);
        }
        // Counted on what the map holds, not on the runs given: runs of a crafted or racing
        // read may overlap each other, and then their sum is no count of pages.
        let after = self.mappings_in(h, vstart, vend);
        let same = common_pages(&before, &after);
        (total_pages(&after) - same, total_pages(&before) - same)
    }

    /// Holder `h`'s (virtual page, pfn) mappings inside `[vstart, vend)`, as disjoint runs
    /// `(delta, first vpage, end vpage)` sorted, where `pfn = vpage + delta` (wrapping):
    /// a page listed twice by overlapping extents counts once.
    fn mappings_in(&self, h: HolderId, vstart: u64, vend: u64) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<(u64, u64, u64)> = self.holder_extents[h as usize]
            .iter()
            .filter_map(|&idx| {
                let e = self.extents[idx as usize];
                let s = e.vpage.max(vstart);
                let end = (e.vpage + e.npages()).min(vend);
                (s < end).then(|| (e.pfn.wrapping_sub(e.vpage), s, end))
            })
            .collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64, u64)> = Vec::with_capacity(v.len());
        for (d, s, e) in v {
            match out.last_mut() {
                Some(last) if last.0 == d && s <= last.2 => last.2 = last.2.max(e),
                _ => out.push((d, s, e)),
            }
        }
        out
    }

    // ---- queries --------------------------------------------------------------------------

    fn view(&self, idx: u32) -> ExtentView {
        let e = self.extents[idx as usize];
        let f = e.flags();
        ExtentView {
            holder: e.holder,
            file: self.files[e.file as usize],
            vaddr: e.vpage << 12,
            pfn: e.pfn,
            offset: e.pgoff << 12,
            pages: e.npages(),
            shared: f & F_SHARED != 0,
            write: f & F_WRITE != 0,
            huge: f & F_HUGE != 0,
        }
    }

    /// Every extent containing `pfn`: one per holder mapping (a holder mapping the page at
    /// two addresses appears twice).
    pub fn who_maps(&self, pfn: u64) -> Vec<ExtentView> {
        self.who_maps_iter(pfn).collect()
    }

    /// As [`Self::who_maps`], without allocating: one hash lookup and a walk of the pfn's
    /// chunk list.
    pub fn who_maps_iter(&self, pfn: u64) -> impl Iterator<Item = ExtentView> + '_ {
        let mut cur = self
            .chunks
            .get(&(pfn >> CHUNK_SHIFT))
            .copied()
            .unwrap_or(NONE);
        std::iter::from_fn(move || {
            while cur != NONE {
                let idx = cur;
                let e = &self.extents[idx as usize];
                cur = e.next;
                if pfn >= e.pfn && pfn < e.pfn + e.npages() {
                    return Some(self.view(idx));
                }
            }
            None
        })
    }

    /// Every extent overlapping pfns `[start, end)`, clipped to it.
    pub fn in_pfn_range(&self, start: u64, end: u64) -> Vec<ExtentView> {
        // An inverted range (a crafted recording's topology) holds nothing; the chunk count
        // below would underflow.
        if end <= start {
            return Vec::new();
        }
        // div_ceil: `end + 511` wrapped for end near 2^64 and the range came out empty.
        let (cs, ce) = (start >> CHUNK_SHIFT, end.div_ceil(1 << CHUNK_SHIFT));
        let mut out = Vec::new();
        let mut visit = |head: u32| {
            let mut cur = head;
            while cur != NONE {
                let e = self.extents[cur as usize];
                let (s, n) = (e.pfn, e.npages());
                if s < end && s + n > start {
                    let mut v = self.view(cur);
                    let lo = s.max(start);
                    let hi = (s + n).min(end);
                    v.vaddr += (lo - s) << 12;
                    v.offset += (lo - s) << 12;
                    v.pfn = lo;
                    v.pages = hi - lo;
                    out.push(v);
                }
                cur = e.next;
            }
        };
        // Walk the chunks in range directly when that is cheaper than walking all chunks.
        if ce - cs <= self.chunks.len() as u64 {
            for c in cs..ce {
                if let Some(&h) = self.chunks.get(&c) {
                    visit(h);
                }
            }
        } else {
            for (&c, &h) in &self.chunks {
                if c >= cs && c < ce {
                    visit(h);
                }
            }
        }
        out
    }

    /// Does any extent overlap pfns `[start, end)`? Stops at the first (the unbind guard
    /// asks this of every guarded device after each event).
    pub fn holds_any(&self, start: u64, end: u64) -> bool {
        if end <= start {
            return false;
        }
        let (cs, ce) = (start >> CHUNK_SHIFT, end.div_ceil(1 << CHUNK_SHIFT));
        let hit = |head: u32| {
            let mut cur = head;
            while cur != NONE {
                let e = self.extents[cur as usize];
                if e.pfn < end && e.pfn + e.npages() > start {
                    return true;
                }
                cur = e.next;
            }
            false
        };
        if ce - cs <= self.chunks.len() as u64 {
            (cs..ce).any(|c| self.chunks.get(&c).is_some_and(|&h| hit(h)))
        } else {
            self.chunks
                .iter()
                .any(|(&c, &h)| c >= cs && c < ce && hit(h))
        }
    }

    /// Every extent of one holder.
    pub fn of_holder(&self, h: HolderId) -> Vec<ExtentView> {
        self.holder_extents
            .get(h as usize)
            .map(|l| l.iter().map(|&i| self.view(i)).collect())
            .unwrap_or_default()
    }

    /// Every extent.
    pub fn all(&self) -> Vec<ExtentView> {
        self.holders()
            .flat_map(|(h, _)| self.of_holder(h))
            .collect()
    }

    /// Every file some holder maps a page of.
    pub fn files_held(&self) -> std::collections::HashSet<FileKey> {
        self.holder_extents
            .iter()
            .flatten()
            .map(|&i| self.files[self.extents[i as usize].file as usize])
            .collect()
    }

    pub fn extent_count(&self) -> usize {
        self.live
    }

    /// Heap bytes the map holds (capacity, not just length), for the benchmark and stats.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.extents.capacity() * size_of::<Extent>()
            + self.chunks.capacity() * (size_of::<u64>() + size_of::<u32>() + 1)
            + self
                .holder_extents
                .iter()
                .map(|v| v.capacity() * size_of::<u32>())
                .sum::<usize>()
            + self.holders.capacity() * size_of::<Option<Holder>>()
            + self.files.capacity() * size_of::<FileKey>()
    }
}

/// Pages of `r` that `before` (sorted (vpage, pfn, pages), not overlapping) maps to the
/// same pfns.
fn total_pages(m: &[(u64, u64, u64)]) -> u64 {
    m.iter().map(|&(_, s, e)| e - s).sum()
}

/// Pages mapped to the same pfn in both (each disjoint and sorted, as `mappings_in` gives).
fn common_pages(a: &[(u64, u64, u64)], b: &[(u64, u64, u64)]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        if x.0 == y.0 {
            let (s, e) = (x.1.max(y.1), x.2.min(y.2));
            if s < e {
                n += e - s;
            }
            if x.2 <= y.2 {
                i += 1;
            } else {
                j += 1;
            }
        } else if x.0 < y.0 {
            i += 1;
        } else {
            j += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzz smoke test: a recording whose topology has a data range ending
    /// before it starts made the dashboard's snapshot underflow here.
    #[test]
    fn an_inverted_pfn_range_holds_nothing() {
        let mut m = HolderMap::new();
        let h = m.holder(100, 1, "app");
        m.add(
            h,
            file(12),
            Run {
                vpage: 0x7f000,
                pfn: 0x100800,
                pgoff: 0,
                npages: 4,
                flags: F_SHARED,
            },
        );
        assert!(m.in_pfn_range(0x200000, 0x100800).is_empty());
        assert!(m.in_pfn_range(0x100800, 0x100800).is_empty());
        assert_eq!(m.in_pfn_range(0x100800, 0x100802).len(), 1);
    }

    /// A run that overlaps pages already held (same address, same pfn) in part: before,
    /// only a run wholly inside an extent was recognised, and the overlap was listed twice.
    #[test]
    fn a_partly_known_run_adds_only_its_new_pages() {
        let mut m = HolderMap::new();
        let h = m.holder(100, 5, "app");
        m.add(h, file(12), run(0x1002, 0x100002, 4));
        // Another holder's extent in between, so the fast path cannot extend the last one.
        let o = m.holder(200, 5, "other");
        m.add(o, file(12), run(0x1000, 0x100100, 1));
        m.add(h, file(12), run(0x1000, 0x100000, 8));
        assert_eq!(m.pages_of(h), 8, "pages 0x1000..0x1008 once each");
        for pfn in 0x100000..0x100008 {
            assert_eq!(m.who_maps(pfn).len(), 1, "pfn {pfn:#x}");
        }
    }

    /// Found by the fuzz smoke test (a crafted recording's overlapping vmas): a resync whose
    /// runs overlap each other made the drift count underflow ("attempt to subtract with
    /// overflow" in replace_vrange).
    #[test]
    fn a_resync_with_overlapping_runs_counts_each_page_once() {
        let mut m = HolderMap::new();
        let h = m.holder(100, 5, "app");
        m.add(h, file(12), run(0x1000, 0x100000, 4));
        let runs = [
            (file(12), run(0x1000, 0x100000, 4)),
            (file(12), run(0x1002, 0x100002, 4)),
        ];
        let (missing, extra) = m.replace_vrange(h, 0, u64::MAX >> 12, &runs);
        assert_eq!((missing, extra), (2, 0));
        assert_eq!(m.pages_of(h), 6);
        // And back: every page it held and no longer does is counted once.
        let (missing, extra) = m.replace_vrange(
            h,
            0,
            u64::MAX >> 12,
            &[(file(12), run(0x1005, 0x100005, 1))],
        );
        assert_eq!((missing, extra), (0, 5));
        assert_eq!(m.pages_of(h), 1);
    }

    fn file(ino: u64) -> FileKey {
        FileKey {
            dev: DevId {
                major: 259,
                minor: 0,
            },
            ino,
        }
    }

    fn run(vpage: u64, pfn: u64, npages: u64) -> Run {
        Run {
            vpage,
            pfn,
            pgoff: vpage - 0x1000,
            npages,
            flags: F_SHARED,
        }
    }

    #[test]
    fn sequential_faults_merge_into_one_extent_per_chunk() {
        let mut m = HolderMap::new();
        let h = m.holder(100, 5, "app");
        for i in 0..1024 {
            m.add(h, file(1), run(0x1000 + i, 0x10_0000 + i, 1));
        }
        // 1024 pages over two 2 MiB chunks: two extents.
        assert_eq!(m.extent_count(), 2);
        assert_eq!(m.pages_of(h), 1024);
        let who = m.who_maps(0x10_0200);
        assert_eq!(who.len(), 1);
        assert_eq!(who[0].vaddr, 0x1200 << 12);
        assert_eq!(who[0].pages, 512);
    }

    #[test]
    fn repeated_faults_on_a_page_do_not_duplicate_it() {
        let mut m = HolderMap::new();
        let h = m.holder(1, 1, "a");
        m.add(h, file(1), run(0x1000, 0x5000, 4));
        m.add(h, file(1), run(0x2000, 0x9000, 1)); // elsewhere: now "last"
        let mut w = run(0x1001, 0x5001, 1);
        w.flags |= F_WRITE;
        m.add(h, file(1), w); // write fault on a page read earlier
        assert_eq!(m.pages_of(h), 5);
        assert!(m.who_maps(0x5001)[0].write);
    }

    #[test]
    fn shared_pages_have_every_holder() {
        let mut m = HolderMap::new();
        let a = m.holder(1, 1, "a");
        let b = m.holder(2, 1, "b");
        m.add(a, file(1), run(0x1000, 0x5000, 8));
        m.add(b, file(1), run(0x7000, 0x5000, 8));
        // A reflinked second file mapping the same pfns.
        m.add(b, file(2), run(0x9000, 0x5000, 1));
        let mut who: Vec<_> = m
            .who_maps(0x5000)
            .iter()
            .map(|v| (v.holder, v.file.ino))
            .collect();
        who.sort();
        assert_eq!(who, vec![(a, 1), (b, 1), (b, 2)]);
    }

    #[test]
    fn partial_removal_splits_and_reports_huge_extents() {
        let mut m = HolderMap::new();
        let h = m.holder(1, 1, "a");
        m.add(h, file(1), run(0x1000, 0x5000, 16));
        let mut huge = run(0x1200, 0x5200, 512);
        huge.flags |= F_HUGE;
        m.add(h, file(1), huge);
        let (removed, recheck) = m.remove_vrange(h, 0x1004, 0x1008);
        assert_eq!(removed, 4);
        assert!(recheck.is_empty());
        assert_eq!(m.pages_of(h), 12 + 512);
        assert!(m.who_maps(0x5005).is_empty());
        assert_eq!(m.who_maps(0x5008)[0].vaddr, 0x1008 << 12);
        let (removed, recheck) = m.remove_vrange(h, 0x1300, 0x1301);
        assert_eq!(removed, 1);
        assert_eq!(recheck, vec![(0x1200, 0x1400)]);
    }

    #[test]
    fn replacing_a_range_counts_drift_both_ways() {
        let mut m = HolderMap::new();
        let h = m.holder(1, 1, "a");
        m.add(h, file(1), run(0x1000, 0x5000, 4));
        // Truth: pages 0..2 as before, page 3 gone, page 5 new.
        let truth = [
            (file(1), run(0x1000, 0x5000, 3)),
            (file(1), run(0x1005, 0x5005, 1)),
        ];
        let (missing, extra) = m.replace_vrange(h, 0x1000, 0x1010, &truth);
        assert_eq!((missing, extra), (1, 1));
        assert_eq!(m.pages_of(h), 4);
    }

    #[test]
    fn a_reused_tgid_is_a_new_holder() {
        let mut m = HolderMap::new();
        let h = m.holder(7, 100, "old");
        m.add(h, file(1), run(0x1000, 0x5000, 1));
        let h2 = m.holder(7, 200, "new");
        assert_eq!(m.pages_of(h2), 0);
        assert!(m.who_maps(0x5000).is_empty());
        assert_eq!(m.info(h2).unwrap().comm, "new");
    }

    #[test]
    fn pfn_range_queries_clip_to_the_range() {
        let mut m = HolderMap::new();
        let h = m.holder(1, 1, "a");
        m.add(h, file(1), run(0x1000, 0x5000, 100));
        let v = m.in_pfn_range(0x5010, 0x5020);
        assert_eq!(v.len(), 1);
        assert_eq!(
            (v[0].pfn, v[0].pages, v[0].vaddr),
            (0x5010, 16, 0x1010 << 12)
        );
        assert!(m.in_pfn_range(0x6000, 0x7000).is_empty());
        // The widest range: used to wrap and answer "nobody".
        assert_eq!(m.in_pfn_range(0, u64::MAX).len(), 1);
        assert_eq!(m.in_pfn_range(0x5000, u64::MAX)[0].pages, 100);
        // holds_any agrees with in_pfn_range on every one of these.
        for (s, e) in [
            (0x5010, 0x5020),
            (0x6000, 0x7000),
            (0, u64::MAX),
            (0x5000, u64::MAX),
            (0x5063, 0x5064),
            (0x5064, 0x5065),
            (0x4fff, 0x5000),
            (0x5020, 0x5010),
        ] {
            assert_eq!(
                m.holds_any(s, e),
                !m.in_pfn_range(s, e).is_empty(),
                "{s:#x}..{e:#x}"
            );
        }
    }

    #[test]
    fn only_real_page_sizes_and_pages_are_accepted() {
        assert_eq!(pages_of_page_size(4096), Some(1));
        assert_eq!(pages_of_page_size(2 << 20), Some(512));
        assert_eq!(pages_of_page_size(1 << 30), Some(1 << 18));
        for bad in [0, 1, 8192, 1 << 40, u64::MAX] {
            assert_eq!(pages_of_page_size(bad), None);
        }
        assert!(check_pages(0x1000, 0x5000, 512).is_ok());
        assert!(check_pages(0x1000, u64::MAX, 2).is_err());
        assert!(check_pages(0x1000, PFN_LIMIT - 1, 2).is_err());
        assert!(check_pages(u64::MAX >> 12, 0x5000, 1).is_err());
    }

    #[test]
    fn removing_a_holder_frees_everything() {
        let mut m = HolderMap::new();
        let h = m.holder(1, 1, "a");
        m.add(h, file(1), run(0x1000, 0x5000, 2000));
        m.remove_holder(h);
        assert_eq!(m.extent_count(), 0);
        assert_eq!(m.holder_count(), 0);
        assert!(m.who_maps(0x5100).is_empty());
        // Slots are reused.
        let h = m.holder(2, 1, "b");
        m.add(h, file(1), run(0x1000, 0x5000, 1));
        assert_eq!(m.extent_count(), 1);
    }

    #[test]
    fn replacing_a_terabyte_range_diffs_extents_not_pages() {
        // 256 GiB mapped contiguously: the old per-page set held 2^26 entries (1.5 GiB).
        let mut m = HolderMap::new();
        let h = m.holder(1, 1, "a");
        let pages = 1u64 << 26;
        m.add(h, file(1), run(0x1000, 0x100_0000, pages));
        // Truth: the same, except the first page moved to another pfn and one more page.
        let truth = [
            (file(1), run(0x1000, 0x900_0000, 1)),
            (file(1), run(0x1001, 0x100_0001, pages - 1)),
            (file(1), run(0x1000 + pages + 10, 0x900_0100, 1)),
        ];
        let (missing, extra) = m.replace_vrange(h, 0, u64::MAX >> 12, &truth);
        assert_eq!((missing, extra), (2, 1));
        assert_eq!(m.pages_of(h), pages + 1);
    }
}
