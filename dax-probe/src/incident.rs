//! Turning the kernel's raw device and failure events into what an operator needs to know:
//! which device is leaving and who still maps it, what a memory failure hits (every file and
//! holder of the page, reflinked files included), what the kernel did about it, and why a
//! process got a machine-check SIGBUS — including the case where the kernel calls an unbind
//! "hardware memory corruption" (`MF_MEM_PRE_REMOVE`).

use std::{collections::HashMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    event::{DeviceChange, DevicePhase, Event, KernelSigbus, MemoryFailure, MmapDenied},
    holders::{
        Applier,
        query::{HolderRow, rows},
    },
    topology::{DevId, Mode, Namespace, Topology},
};

/// A device that left, remembered (and persisted) so `audit` can find stale mappings into
/// it later, even after its sysfs entries are gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departed {
    pub device: String,
    pub namespace: String,
    /// pfn ranges `[start, end)`.
    pub pfn_ranges: Vec<(u64, u64)>,
    pub ts_ns: u64,
}

pub const DEFAULT_DEPARTED: &str = "/run/dax-probe/departed.json";

/// A departure in progress.
#[derive(Clone, Debug)]
pub struct Departure {
    pub device: String,
    pub namespaces: Vec<String>,
    pub pfn_ranges: Vec<(u64, u64)>,
    /// Devices to fence: block devices (fsdax) and character devices (devdax).
    pub devs: Vec<DevId>,
    /// Every name the policy may know the device by.
    pub names: Vec<String>,
    pub started_ns: u64,
    pub tid: u32,
    pub pre_remove: bool,
    pub holders: Vec<HolderRow>,
}

/// Operator-level reports, tagged by `type` in JSON.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    DeviceDeparting {
        ts_ns: u64,
        device: String,
        namespaces: Vec<String>,
        pfn_ranges: Vec<(u64, u64)>,
        /// Who unbinds it.
        by_pid: u32,
        by_comm: String,
        driver: String,
        holders: Vec<HolderRow>,
        holder_pages: u64,
    },
    DeviceGone {
        ts_ns: u64,
        device: String,
        /// Holders whose pages of the device are still in the map (stale mappings: the
        /// kernel did not tear them down). `audit` checks page tables.
        still_mapped: Vec<HolderRow>,
        took_ms: f64,
    },
    DaxShutOff {
        ts_ns: u64,
        device: Option<String>,
    },
    FsNotified {
        ts_ns: u64,
        device: Option<String>,
        offset: u64,
        len: u64,
        pre_remove: bool,
        meaning: String,
    },
    MemoryFailure {
        ts_ns: u64,
        pfn: u64,
        device: Option<String>,
        /// Every file (and offset) the page backs: several for reflinked extents.
        files: Vec<FileRef>,
        holders: Vec<HolderRow>,
        by_pid: u32,
        by_comm: String,
    },
    MemoryFailureResult {
        ts_ns: u64,
        pfn: u64,
        result: Option<String>,
        page_type: Option<String>,
        /// Processes the kernel sent SIGBUS during this failure.
        signalled: Vec<u32>,
        /// Holders of the page the kernel left alone: they can still reach it.
        not_signalled: Vec<u32>,
    },
    KernelSigbus {
        #[serde(flatten)]
        sigbus: KernelSigbus,
        cause: String,
    },
    MmapDenied {
        #[serde(flatten)]
        denied: MmapDenied,
        device: Option<String>,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct FileRef {
    pub dev: DevId,
    pub ino: u64,
    pub path: Option<String>,
    pub offset: u64,
}

struct Failure {
    pfn: u64,
    holders: Vec<u32>,
    signalled: Vec<u32>,
    started_ns: u64,
}

#[derive(Default)]
pub struct Incidents {
    pub departing: Vec<Departure>,
    pub departed: Vec<Departed>,
    failures: HashMap<u64, Failure>,
    /// The last MF_MEM_PRE_REMOVE notification: (time, device).
    pre_remove: Option<(u64, Option<String>)>,
    persist: Option<PathBuf>,
}

/// What a departing device name covers.
fn namespaces_for<'a>(topo: &'a Topology, name: &str) -> Vec<&'a Namespace> {
    topo.namespaces
        .iter()
        .filter(|n| {
            n.name == name
                || n.holder.as_deref() == Some(name)
                || n.region == name
                || n.chardev.as_ref().is_some_and(|(c, _)| c == name)
                || name.starts_with("ndbus")
        })
        .filter(|n| n.range_known)
        .collect()
}

fn pages(rows: &[HolderRow]) -> u64 {
    rows.iter().map(|r| r.pages).sum()
}

impl Incidents {
    pub fn new(persist: Option<PathBuf>) -> Self {
        let departed = persist
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            departed,
            persist,
            ..Default::default()
        }
    }

    fn save(&self) {
        if let Some(p) = &self.persist {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            if let Ok(b) = serde_json::to_vec_pretty(&self.departed) {
                let _ = std::fs::write(p, b);
            }
        }
    }

    /// The departure a task is running (sysfs unbind runs in one task throughout).
    fn departure_of(&self, tid: u32) -> Option<&Departure> {
        self.departing
            .iter()
            .rev()
            .find(|d| d.tid == tid)
            .or(self.departing.last())
    }

    /// Returns the reports for `ev` and, for a departure that just started, its description
    /// (for enforcement).
    pub fn handle(
        &mut self,
        ev: &Event,
        app: &mut Applier,
        topo: &Topology,
    ) -> (Vec<Report>, Option<Departure>) {
        match ev {
            Event::Device(d) => self.device(d, app, topo),
            Event::MemoryFailure(m) => (self.failure(m, app, topo), None),
            Event::KernelSigbus(k) => (vec![self.sigbus(k)], None),
            Event::MmapDenied(m) => (
                vec![Report::MmapDenied {
                    denied: m.clone(),
                    device: topo
                        .namespace_of_block(m.dev)
                        .or_else(|| {
                            topo.namespaces
                                .iter()
                                .find(|n| n.chardev.as_ref().is_some_and(|(_, d)| *d == m.dev))
                        })
                        .map(|n| n.device_name().to_string()),
                }],
                None,
            ),
            _ => (Vec::new(), None),
        }
    }

    fn device(
        &mut self,
        d: &DeviceChange,
        app: &mut Applier,
        topo: &Topology,
    ) -> (Vec<Report>, Option<Departure>) {
        match d.phase {
            DevicePhase::Departing => {
                let nss = namespaces_for(topo, &d.device);
                let nss: Vec<&Namespace> = nss
                    .into_iter()
                    .filter(|n| matches!(n.mode, Mode::Fsdax | Mode::Devdax | Mode::Raw))
                    .collect();
                // Several hooks may report one unbind (see the departure plan): the first wins.
                if nss.is_empty() || self.departing.iter().any(|x| x.names.contains(&d.device)) {
                    return (Vec::new(), None);
                }
                let pfn_ranges: Vec<(u64, u64)> = nss
                    .iter()
                    .map(|n| (n.data_range.first_pfn(), n.data_range.end_pfn()))
                    .collect();
                let mut names = vec![d.device.clone()];
                for n in &nss {
                    names.push(n.name.clone());
                    names.push(n.device_name().to_string());
                    names.extend(n.holder.clone());
                }
                let holders = app.rows_in_pfn_ranges(topo, &pfn_ranges);
                let dep = Departure {
                    device: nss
                        .first()
                        .map(|n| n.device_name().to_string())
                        .unwrap_or_else(|| d.device.clone()),
                    namespaces: nss.iter().map(|n| n.name.clone()).collect(),
                    pfn_ranges: pfn_ranges.clone(),
                    devs: nss
                        .iter()
                        .flat_map(|n| n.block.iter().chain(n.chardev.iter()).map(|(_, d)| *d))
                        .collect(),
                    names,
                    started_ns: d.ts_ns,
                    tid: d.tid,
                    pre_remove: false,
                    holders: holders.clone(),
                };
                self.departing.push(dep.clone());
                let report = Report::DeviceDeparting {
                    ts_ns: d.ts_ns,
                    device: dep.device.clone(),
                    namespaces: dep.namespaces.clone(),
                    pfn_ranges,
                    by_pid: d.tgid,
                    by_comm: d.comm.clone(),
                    driver: d.driver.clone(),
                    holder_pages: pages(&holders),
                    holders,
                };
                (vec![report], Some(dep))
            }
            DevicePhase::Gone => {
                let Some(pos) = self
                    .departing
                    .iter()
                    .position(|x| x.names.contains(&d.device))
                else {
                    return (Vec::new(), None);
                };
                let dep = self.departing.remove(pos);
                let still = app.rows_in_pfn_ranges(topo, &dep.pfn_ranges);
                self.departed.push(Departed {
                    device: dep.device.clone(),
                    namespace: dep.namespaces.join(","),
                    pfn_ranges: dep.pfn_ranges.clone(),
                    ts_ns: d.ts_ns,
                });
                self.save();
                (
                    vec![Report::DeviceGone {
                        ts_ns: d.ts_ns,
                        device: dep.device,
                        still_mapped: still,
                        took_ms: d.ts_ns.saturating_sub(dep.started_ns) as f64 / 1e6,
                    }],
                    None,
                )
            }
            DevicePhase::DaxKilled => (
                vec![Report::DaxShutOff {
                    ts_ns: d.ts_ns,
                    device: self.departure_of(d.tid).map(|x| x.device.clone()),
                }],
                None,
            ),
            DevicePhase::HolderNotify => {
                let device = self.departure_of(d.tid).map(|x| x.device.clone());
                let meaning = if d.pre_remove {
                    self.pre_remove = Some((d.ts_ns, device.clone()));
                    if let Some(x) = self
                        .departing
                        .iter_mut()
                        .find(|x| Some(&x.device) == device.as_ref())
                    {
                        x.pre_remove = true;
                    }
                    format!(
                        "the file system is told {} is about to be removed (MF_MEM_PRE_REMOVE): \
                         it will SIGBUS every process mapping it, reported by the kernel as \
                         memory failure; this is an unbind, not hardware corruption",
                        device.as_deref().unwrap_or("the device")
                    )
                } else if device.is_some() {
                    "the file system is told its device fails (a removal on a kernel without \
                     MF_MEM_PRE_REMOVE)"
                        .into()
                } else {
                    "the file system is told part of its device failed".into()
                };
                (
                    vec![Report::FsNotified {
                        ts_ns: d.ts_ns,
                        device,
                        offset: d.offset,
                        len: d.len,
                        pre_remove: d.pre_remove,
                        meaning,
                    }],
                    None,
                )
            }
        }
    }

    fn failure(&mut self, m: &MemoryFailure, app: &mut Applier, topo: &Topology) -> Vec<Report> {
        if m.phase == "start" {
            let views = app.map.who_maps(m.pfn);
            let mut files: Vec<FileRef> = Vec::new();
            for v in &views {
                let offset = v.offset + ((m.pfn - v.pfn) << 12);
                if !files
                    .iter()
                    .any(|f| f.dev == v.file.dev && f.ino == v.file.ino && f.offset == offset)
                {
                    files.push(FileRef {
                        dev: v.file.dev,
                        ino: v.file.ino,
                        path: None,
                        offset,
                    });
                }
            }
            let mut holders = rows(&app.map, &views, false);
            app.name_files(&mut holders, topo);
            for f in &mut files {
                f.path = holders
                    .iter()
                    .find(|h| h.dev == f.dev && h.ino == f.ino)
                    .and_then(|h| h.file.clone());
            }
            let mut pids: Vec<u32> = holders.iter().map(|h| h.pid).collect();
            pids.dedup();
            self.failures.insert(
                m.pfn,
                Failure {
                    pfn: m.pfn,
                    holders: pids,
                    signalled: Vec::new(),
                    started_ns: m.ts_ns,
                },
            );
            vec![Report::MemoryFailure {
                ts_ns: m.ts_ns,
                pfn: m.pfn,
                device: topo
                    .namespace_of_pfn(m.pfn)
                    .map(|n| n.device_name().to_string()),
                files,
                holders,
                by_pid: m.tgid,
                by_comm: m.comm.clone(),
            }]
        } else {
            let f = self.failures.remove(&m.pfn);
            let (signalled, not_signalled) = match &f {
                Some(f) => (
                    f.signalled.clone(),
                    f.holders
                        .iter()
                        .copied()
                        .filter(|p| !f.signalled.contains(p))
                        .collect(),
                ),
                None => (Vec::new(), Vec::new()),
            };
            vec![Report::MemoryFailureResult {
                ts_ns: m.ts_ns,
                pfn: m.pfn,
                result: m.result.clone(),
                page_type: m.page_type.clone(),
                signalled,
                not_signalled,
            }]
        }
    }

    fn sigbus(&mut self, k: &KernelSigbus) -> Report {
        // A departure in flight (or its pre-remove notice within the last second) explains a
        // machine-check SIGBUS better than a memory failure no one reported.
        let recent_pre_remove = self
            .pre_remove
            .as_ref()
            .filter(|(ts, _)| k.ts_ns.saturating_sub(*ts) < 1_000_000_000);
        let cause = if let Some((_, dev)) = recent_pre_remove {
            format!(
                "unbind of {} (MF_MEM_PRE_REMOVE): the kernel reports it as hardware memory \
                 corruption, but nothing was corrupt",
                dev.as_deref().unwrap_or("a pmem device")
            )
        } else if let Some(d) = self.departing.last() {
            format!("unbind of {} in progress", d.device)
        } else if let Some(f) = self.failures.values_mut().max_by_key(|f| f.started_ns) {
            f.signalled.push(k.pid);
            format!("memory failure at pfn {:#x}", f.pfn)
        } else {
            "no memory failure or unbind seen by the agent".into()
        };
        Report::KernelSigbus {
            sigbus: k.clone(),
            cause,
        }
    }
}
