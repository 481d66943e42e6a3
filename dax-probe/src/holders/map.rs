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
const NONE: u32 = u32::MAX;

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

/// A process holding DAX pages.
#[derive(Clone, Debug, Serialize)]
pub struct Holder {
    pub tgid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): with the tgid, the
    /// process's identity (tgids are reused).
    pub start_time: u64,
    pub comm: String,
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
            if h.start_time == start_time || start_time == 0 || h.start_time == 0 {
                if h.start_time == 0 {
                    h.start_time = start_time;
                }
                if !comm.is_empty() && h.comm != comm {
                    h.comm = comm.to_string();
                }
                return id;
            }
            self.remove_holder(id);
        }
        let info = Holder {
            tgid,
            start_time,
            comm: comm.to_string(),
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

    pub fn holder_of(&self, tgid: u32) -> Option<HolderId> {
        self.by_tgid.get(&tgid).copied()
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

    pub fn holder_count(&self) -> usize {
        self.by_tgid.len()
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
            self.by_tgid.remove(&h.tgid);
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
            if e.holder == h
                && e.file == fid
                && r.vpage >= e.vpage
                && r.vpage + r.npages <= e.vpage + n
                && r.pfn == e.pfn + (r.vpage - e.vpage)
            {
                let f = e.flags();
                e.set(n, f | r.flags);
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
        let before: std::collections::HashSet<(u64, u64)> =
            self.pages_in(h, vstart, vend).collect();
        self.remove_vrange(h, vstart, vend);
        let mut missing = 0;
        let mut seen = 0;
        for (f, r) in runs {
            for i in 0..r.npages {
                if before.contains(&(r.vpage + i, r.pfn + i)) {
                    seen += 1;
                } else {
                    missing += 1;
                }
            }
            self.add(h, *f, *r);
        }
        let extra = before.len() as u64 - seen;
        (missing, extra)
    }

    /// (virtual page, pfn) of every page holder `h` maps in `[vstart, vend)`.
    pub fn pages_in(
        &self,
        h: HolderId,
        vstart: u64,
        vend: u64,
    ) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.holder_extents[h as usize]
            .iter()
            .flat_map(move |&idx| {
                let e = self.extents[idx as usize];
                let s = e.vpage.max(vstart);
                let end = (e.vpage + e.npages()).min(vend);
                (s..end.max(s)).map(move |v| (v, e.pfn + (v - e.vpage)))
            })
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
        let (cs, ce) = (
            start >> CHUNK_SHIFT,
            (end + (1 << CHUNK_SHIFT) - 1) >> CHUNK_SHIFT,
        );
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
