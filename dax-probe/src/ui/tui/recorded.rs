//! Procfs as a recording describes it, so replay runs the agent's own [`Applier`] unchanged.
//!
//! The applier re-reads page tables where an event cannot describe the change (fork,
//! mremap, a partial huge unmap, a truncate). The live agent prints, right before such an
//! event, a `holders` line with the complete state of the processes it re-read; full
//! snapshots come at start and after reconciles. [`RecordedProc`] answers `maps`, `pagemap`
//! and `stat` from the latest of these, so applying the same event gives the same map.
//!
//! [`Applier`]: crate::holders::Applier

use std::{cell::RefCell, collections::HashMap, io, rc::Rc};

use crate::{
    holders::{
        query::HolderRow,
        scan::{Procfs, Vma},
    },
    proc::pagemap::{PM_PRESENT, PagemapSource},
    topology::{Mode, Topology},
};

#[derive(Clone, Debug, Default)]
struct ProcState {
    start_time: u64,
    comm: String,
    rows: Vec<HolderRow>,
}

/// What the recording said about processes, shared between the replay model and the
/// applier's [`RecordedProc`].
#[derive(Default)]
pub struct Recorded {
    procs: HashMap<u32, ProcState>,
    pub topology: Topology,
}

impl Recorded {
    /// A full snapshot: these processes, and no others, hold DAX pages.
    pub fn replace_all(&mut self, rows: &[HolderRow]) {
        self.procs.clear();
        self.set(None, rows);
    }

    /// The complete state of `pids` (a pid without rows maps nothing).
    pub fn set(&mut self, pids: Option<&[u32]>, rows: &[HolderRow]) {
        if let Some(pids) = pids {
            for p in pids {
                self.procs.remove(p);
            }
        }
        for r in rows {
            let st = self.procs.entry(r.pid).or_insert_with(|| ProcState {
                start_time: r.start_time,
                comm: r.comm.clone(),
                rows: Vec::new(),
            });
            st.rows.push(r.clone());
        }
    }

    fn vmas(&self, pid: u32) -> io::Result<Vec<Vma>> {
        let st = self
            .procs
            .get(&pid)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let mut out = Vec::new();
        for r in &st.rows {
            // Device-dax is named by its character device in maps; fsdax by its path.
            let devdax = r.ino == 0;
            let path = if devdax {
                self.topology
                    .namespaces
                    .iter()
                    .filter(|n| n.mode == Mode::Devdax)
                    .find_map(|n| n.chardev.as_ref().filter(|(_, d)| *d == r.dev))
                    .map(|(name, _)| format!("/dev/{name}"))
                    .unwrap_or_default()
            } else {
                r.file.clone().unwrap_or_default()
            };
            for e in r.extents.iter().flatten() {
                out.push(Vma {
                    start: e.vaddr,
                    end: e.vaddr + (e.pages << 12),
                    shared: true,
                    write: true,
                    offset: e.offset,
                    dev: r.dev,
                    ino: if devdax { 1 } else { r.ino },
                    path: path.clone(),
                });
            }
        }
        out.sort_by_key(|v| v.start);
        Ok(out)
    }
}

pub struct RecordedProc(pub Rc<RefCell<Recorded>>);

impl Procfs for RecordedProc {
    fn pids(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self.0.borrow().procs.keys().copied().collect();
        p.sort_unstable();
        p
    }

    fn maps(&self, pid: u32) -> io::Result<Vec<Vma>> {
        self.0.borrow().vmas(pid)
    }

    fn pagemap(&self, pid: u32) -> io::Result<Box<dyn PagemapSource + '_>> {
        let rec = self.0.borrow();
        let st = rec
            .procs
            .get(&pid)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        // (first vpage, pfn, pages), sorted: answers are built per chunk, never per mapping.
        let mut extents: Vec<(u64, u64, u64)> = st
            .rows
            .iter()
            .flat_map(|r| r.extents.iter().flatten())
            .map(|e| (e.vaddr >> 12, e.pfn, e.pages))
            .collect();
        extents.sort_unstable();
        Ok(Box::new(RecordedPagemap(extents)))
    }

    fn stat(&self, pid: u32) -> Option<(u64, String)> {
        self.0
            .borrow()
            .procs
            .get(&pid)
            .map(|s| (s.start_time, s.comm.clone()))
    }

    /// A recording says when a process mapped and unmapped, not when it exited: none is
    /// taken for gone (its pages leave with the recorded zaps).
    fn gone(&self, _pid: u32, _start_time: u64) -> bool {
        false
    }
}

/// A recorded process's page tables: its extents as (first vpage, pfn, pages), by vpage.
struct RecordedPagemap(Vec<(u64, u64, u64)>);

impl PagemapSource for RecordedPagemap {
    fn read(&mut self, vpage: u64, out: &mut [u64]) -> io::Result<()> {
        out.fill(0);
        let end = vpage.saturating_add(out.len() as u64);
        for &(s, pfn, n) in &self.0 {
            let (lo, hi) = (s.max(vpage), s.saturating_add(n).min(end));
            for v in lo..hi {
                out[(v - vpage) as usize] = PM_PRESENT | (pfn + (v - s));
            }
        }
        Ok(())
    }

    fn next_present(&mut self, vpage: u64, vend: u64) -> io::Result<Option<u64>> {
        Ok(self
            .0
            .iter()
            .filter(|&&(s, _, n)| s.saturating_add(n) > vpage && s < vend)
            .map(|&(s, _, _)| s.max(vpage))
            .min())
    }
}
