//! What the agent knows: the pmem topology, the live holder map, the departures and
//! failures in progress, its counters; and the lines (`topology`, `holders`, `file`) that
//! describe that state to a reader or a replay. Nothing here talks to the kernel or to a
//! client.

use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    control::AgentStats,
    event::Event,
    holders::{Applier, FileKey, query::rows},
    incident::Incidents,
    probe::decode::{DecodeError, Decoder},
    proc::pagemap::PagemapLookup,
    schema::{FileName, Holders, HoldersReason, Line, Summary},
    topology::Topology,
};

pub struct State {
    /// The topology every walk and decision uses: sysfs's, with departing devices hidden
    /// where walking them oopses (see [`State::hide_departing`]).
    pub topology: Topology,
    /// The topology as sysfs last said it: what `topology` lines report, and what a new
    /// read is compared with (a hidden device is no change to report).
    read_topology: Topology,
    pub applier: Applier,
    pub incidents: Incidents,
    /// The machine's root (`--root`): procfs and sysfs are read below it.
    pub root: PathBuf,
    last_topology: Instant,
    started: Instant,
    /// Counts kept by the agent (the kernel's own counters are added by the caller).
    pub(super) counts: Summary,
    /// Files whose `file` line went out.
    announced: HashSet<FileKey>,
    /// Does the kernel survive a walk of page tables into a departing device (devmap DAX
    /// entries, up to 6.12)? Where it does not, a departing device counts as gone for
    /// every walk from its departure on (see [`State::hide_departing`]).
    pub devmap: bool,
}

impl State {
    pub fn new(topology: Topology, applier: Applier, incidents: Incidents, root: PathBuf) -> Self {
        Self {
            read_topology: topology.clone(),
            topology,
            applier,
            incidents,
            root,
            last_topology: Instant::now(),
            started: Instant::now(),
            counts: Summary::default(),
            announced: HashSet::new(),
            devmap: true,
        }
    }

    /// On a kernel without devmap DAX entries, marks the namespaces of every departure in
    /// progress as disabled in the topology, so no resync, reconcile or scan walks the
    /// page tables of their files from now on: once the unbind freed the memmap such a
    /// walk oopses the walker (the agent itself, in `pagemap_read`, on 7.2), and the
    /// unbind does not wait for the agent. Their holders were listed at the departure.
    pub fn hide_departing(&mut self) {
        if self.devmap {
            return;
        }
        let devs: Vec<_> = self
            .incidents
            .departing
            .iter()
            .flat_map(|d| d.devs.iter().copied())
            .collect();
        for n in &mut self.topology.namespaces {
            if n.devices().iter().any(|d| devs.contains(d)) {
                n.enabled = false;
            }
        }
    }

    /// Re-reads the topology (at most once a second); a `topology` line when it changed.
    pub fn refresh_topology(&mut self) -> Option<Line> {
        if self.last_topology.elapsed() > Duration::from_secs(1) {
            let read = Topology::read(&self.root);
            self.last_topology = Instant::now();
            return self.take_read(read);
        }
        None
    }

    /// A fresh read of sysfs: a `topology` line when sysfs changed. A device hidden for
    /// its departure is no change: reporting the hidden copy, then the read, would show a
    /// departed device come back and leave again (a replay then saw a second departure).
    pub fn take_read(&mut self, read: Topology) -> Option<Line> {
        if read == self.read_topology {
            return None;
        }
        self.read_topology = read.clone();
        self.topology = read;
        // sysfs may still list a device the unbind is taking away.
        self.hide_departing();
        Some(self.topology_line())
    }

    pub fn topology_line(&self) -> Line {
        Line::Topology(self.read_topology.clone())
    }

    /// The holder map (all of it, or the complete state of `pids`) as a `holders` line.
    pub fn holders_line(&mut self, reason: HoldersReason, pids: Option<Vec<u32>>) -> Line {
        self.forget_gone();
        let map = &self.applier.map;
        let sel = match &pids {
            None => map.all(),
            Some(p) => p
                .iter()
                .filter_map(|t| map.holder_of(*t))
                .flat_map(|h| map.of_holder(h))
                .collect(),
        };
        let mut r = rows(map, &sel, true);
        self.applier.only_live(&mut r);
        self.applier.name_files(&mut r, &self.topology);
        Line::Holders(Holders {
            reason,
            pids,
            rows: r,
        })
    }

    /// Drops processes that exited from the map and every per-process cache (a dead pid is
    /// never reported; the caches stay bounded by the live holders).
    pub fn forget_gone(&mut self) {
        self.applier.forget_gone();
        let held = self.applier.map.files_held();
        self.announced.retain(|f| held.contains(f));
    }

    /// Processes whose page tables the applier may have re-read for `ev`: the event's own,
    /// and for a zap every holder of the file (a truncate re-reads them all).
    pub fn touched_by(&self, ev: &Event) -> Vec<u32> {
        let mut pids = match ev {
            Event::Fault(f) => vec![f.tgid],
            Event::Fork(f) => vec![f.child_tgid, f.parent_tgid],
            Event::Mremap(m) => vec![m.tgid],
            Event::Zap(z) => {
                let file = FileKey {
                    dev: z.dev,
                    ino: z.ino,
                };
                let map = &self.applier.map;
                let mut p: Vec<u32> = map
                    .all()
                    .iter()
                    .filter(|v| v.file == file)
                    .filter_map(|v| map.info(v.holder).map(|i| i.tgid))
                    .collect();
                p.push(z.tgid);
                p.extend(z.owner_tgid);
                p
            }
            _ => Vec::new(),
        };
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// A `file` line the first time a fault names a file the recording has not named yet.
    pub fn announce_file(&mut self, ev: &Event) -> Option<Line> {
        let Event::Fault(f) = ev else { return None };
        let key = FileKey {
            dev: f.dev,
            ino: f.ino,
        };
        if self.announced.contains(&key) {
            return None;
        }
        let path = self.applier.path_of(&key)?.to_string();
        self.announced.insert(key);
        Some(Line::File(FileName {
            dev: key.dev,
            ino: key.ino,
            path,
        }))
    }

    pub fn decode(&self, rec: &[u8]) -> Result<Event, DecodeError> {
        Decoder {
            topology: &self.topology,
            lookup: PagemapLookup,
        }
        .decode(rec)
    }

    /// `dropped`: the kernel's count of events lost to a full ring.
    pub fn stats(&self, dropped: u64) -> AgentStats {
        AgentStats {
            holders: self.applier.map.holder_count(),
            extents: self.applier.map.extent_count(),
            map_bytes: self.applier.map.heap_bytes(),
            events: self.counts.events,
            dropped,
            map: self.applier.stats.into(),
        }
    }

    /// Totals the agent keeps (the kernel's counters are the caller's to add).
    pub fn summary(&self) -> Summary {
        let map = &self.applier.map;
        Summary {
            holders: map.holder_count(),
            holder_pages: map.holders().map(|(h, _)| map.pages_of(h)).sum(),
            drift_missing: self.applier.stats.drift_missing,
            drift_extra: self.applier.stats.drift_extra,
            reconciles: self.applier.stats.reconciles,
            duration_s: self.started.elapsed().as_secs_f64(),
            ..self.counts.clone()
        }
    }
}
