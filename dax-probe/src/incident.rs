//! Turning the kernel's raw device and failure events into what an operator needs to know:
//! which device is leaving and who still maps it, what a memory failure hits (every file and
//! holder of the page, reflinked files included), what the kernel did about it, and why a
//! process got a machine-check SIGBUS — including the case where the kernel calls an unbind
//! "hardware memory corruption" (`MF_MEM_PRE_REMOVE`).

use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    event::{DeviceChange, DevicePhase, Event, FenceSignal, KernelSigbus, MemoryFailure},
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
    /// When a live device held this range again (reported once as `device_rebound`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebound_ns: Option<u64>,
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
    /// When the agent read the kernel's report and listed the holders (0: not from one).
    pub stamps: crate::policy::guard::Stamps,
    pub tid: u32,
    pub pre_remove: bool,
    pub holders: Vec<HolderRow>,
}

/// Operator-level reports are lines of the one output schema (`schema.rs`): the
/// `device_departing`, `device_gone`, `dax_shut_off`, `fs_notified`, `memory_failure`,
/// `memory_failure_result`, `kernel_sigbus` and `mmap_denied` variants of [`Line`].
///
/// [`Line`]: crate::schema::Line
pub use crate::schema::{FileRef, Line as Report};

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
    /// Does the attached departure hook report the end of a teardown (`device_gone`)? When
    /// it does not (a kprobe without its exit probe) the end is taken from sysfs at once;
    /// when it does, sysfs only stands in after [`GONE_SAFETY_NET`] (a lost event).
    pub end_hooked: bool,
    /// Devices of departures that ended since the last look at the topology: their
    /// vanishing from sysfs is explained and is not a departure of its own.
    ended_devs: Vec<DevId>,
    /// The topology as the last [`Incidents::topology_seen`] saw it.
    seen: Option<Topology>,
    /// Each namespace as last seen with its device files: what a departure resolved
    /// against a topology read mid-teardown (the block device already gone from sysfs)
    /// takes its name, devices and range from. Bounded by the namespaces the machine has.
    known: HashMap<String, Namespace>,
}

/// What one event did to the incidents.
#[derive(Default)]
pub struct Outcome {
    pub reports: Vec<Report>,
    /// A departure that just started (for enforcement).
    pub started: Option<Departure>,
    /// A departure that just ended: its own devices are the ones to unfence (the topology
    /// no longer lists them by then).
    pub ended: Option<Departure>,
}

/// How long a departure whose hook reports no end stays "departing" after its device left
/// sysfs: the device files go before the driver's remove returns, so a moment is left for
/// the teardown to finish.
pub const GONE_FROM_SYSFS: Duration = Duration::from_secs(1);
/// How long a departure whose hook does report its end waits for that report once its
/// device left sysfs, before the agent ends it itself (the event was lost): the teardown
/// may wait long for page references to drop, and the fence must hold until then.
pub const GONE_SAFETY_NET: Duration = Duration::from_secs(30);

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
    /// Remembers every namespace that shows its device files.
    fn learn(&mut self, topo: &Topology) {
        for n in topo.namespaces.iter().filter(|n| !n.devices().is_empty()) {
            self.known.insert(n.name.clone(), n.clone());
        }
    }

    /// `n`, or when its device files are gone already (a topology read during the
    /// teardown), the namespace as last seen with them.
    fn identity(&self, n: &Namespace) -> Namespace {
        match self.known.get(&n.name) {
            Some(k) if n.devices().is_empty() => k.clone(),
            _ => n.clone(),
        }
    }

    pub fn new(persist: Option<PathBuf>) -> Self {
        let departed = persist
            .as_ref()
            .and_then(|p| {
                crate::fsutil::read_root_owned(p)
                    .map_err(|e| log::warn!("departed devices: {e}"))
                    .ok()?
            })
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            departed,
            persist,
            ..Default::default()
        }
    }

    fn save(&self) {
        if let Some(p) = &self.persist
            && let Ok(b) = serde_json::to_vec_pretty(&self.departed)
        {
            let _ = crate::fsutil::write_atomic(p, &b);
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

    /// The reports for `ev`, and the departure it started or ended.
    pub fn handle(&mut self, ev: &Event, app: &mut Applier, topo: &Topology) -> Outcome {
        match ev {
            Event::Device(d) => self.device(d, app, topo),
            Event::MemoryFailure(m) => Outcome {
                reports: self.failure(m, app, topo),
                ..Default::default()
            },
            Event::KernelSigbus(k) => Outcome {
                reports: vec![self.sigbus(k)],
                ..Default::default()
            },
            Event::Fault(f) => Outcome {
                reports: refused_in_user_mode(f)
                    .map(|k| self.fault_sigbus(&k, f.dev, topo))
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
            Event::MmapDenied(m) => Outcome {
                reports: vec![Report::MmapDenied {
                    denied: m.clone(),
                    device: self.device_of(m.dev, topo),
                }],
                ..Default::default()
            },
            Event::FenceSignal(f) => Outcome {
                reports: vec![self.fence_signal(f, topo)],
                ..Default::default()
            },
            _ => Outcome::default(),
        }
    }

    /// The name of the device a fenced `dev` belongs to: the departure's (the topology may
    /// have lost it already), else the topology's.
    fn device_of(&self, dev: DevId, topo: &Topology) -> Option<String> {
        self.departing
            .iter()
            .find(|d| d.devs.contains(&dev))
            .map(|d| d.device.clone())
            .or_else(|| {
                topo.namespace_of_block(dev)
                    .or_else(|| {
                        topo.namespaces
                            .iter()
                            .find(|n| n.chardev.as_ref().is_some_and(|(_, d)| *d == dev))
                    })
                    .map(|n| n.device_name().to_string())
            })
    }

    fn fence_signal(&self, f: &FenceSignal, topo: &Topology) -> Report {
        Report::FenceSignal {
            sent: f.clone(),
            device: self.device_of(f.dev, topo),
        }
    }

    /// The agent's topology at boot time `now_ns` (compared with the one the last call saw).
    /// Departures whose devices left sysfs end here when no kernel hook reports their end
    /// (or its report was lost); a device that vanished without any departure event (no
    /// hook saw it) is reported as a departure, marked synthesised, and ended at once.
    /// Nothing is fenced or signalled for that one: the device is already gone.
    pub fn topology_seen(&mut self, topo: &Topology, now_ns: u64, app: &mut Applier) -> Outcome {
        self.learn(topo);
        let old = self.seen.replace(topo.clone());
        let present: Vec<DevId> = topo.namespaces.iter().flat_map(|n| n.devices()).collect();
        let wait = if self.end_hooked {
            GONE_SAFETY_NET
        } else {
            GONE_FROM_SYSFS
        };
        let mut out = Outcome::default();
        if let Some(pos) = self.departing.iter().position(|d| {
            !d.devs.is_empty()
                && d.devs.iter().all(|x| !present.contains(x))
                && now_ns.saturating_sub(d.started_ns) >= wait.as_nanos() as u64
        }) {
            let dep = self.departing.remove(pos);
            out.reports.push(self.end(&dep, now_ns, true, app, topo));
            out.ended = Some(dep);
        }
        if let Some(old) = &old {
            let explained: Vec<DevId> = self
                .departing
                .iter()
                .flat_map(|d| d.devs.iter().copied())
                .chain(self.ended_devs.iter().copied())
                .chain(out.ended.iter().flat_map(|d| d.devs.iter().copied()))
                .collect();
            for n in &old.namespaces {
                let devs = n.devices();
                if !n.range_known
                    || devs.is_empty()
                    || devs
                        .iter()
                        .any(|d| present.contains(d) || explained.contains(d))
                {
                    continue;
                }
                let pfn_ranges = vec![(n.data_range.first_pfn(), n.data_range.end_pfn())];
                let holders = app.rows_in_pfn_ranges(old, &pfn_ranges);
                let dep = Departure {
                    device: n.device_name().to_string(),
                    namespaces: vec![n.name.clone()],
                    pfn_ranges: pfn_ranges.clone(),
                    devs,
                    names: vec![n.name.clone(), n.device_name().to_string()],
                    started_ns: now_ns,
                    stamps: Default::default(),
                    tid: 0,
                    pre_remove: false,
                    holders: holders.clone(),
                };
                out.reports.push(Report::DeviceDeparting {
                    ts_ns: now_ns,
                    device: dep.device.clone(),
                    namespaces: dep.namespaces.clone(),
                    pfn_ranges,
                    by_pid: 0,
                    by_comm: String::new(),
                    driver: String::new(),
                    holder_pages: pages(&holders),
                    holders,
                    synthesised: true,
                });
                out.reports.push(self.end(&dep, now_ns, true, app, old));
            }
        }
        // Re-read: what vanished by now has been accounted for.
        self.ended_devs.clear();
        out
    }

    /// Departed ranges that a live device holds again, each reported once: the pfns are
    /// the new binding's, but the holders still in the map for them mapped the old one
    /// (a file on the departed superblock, an old /dev/dax inode). Rows whose file is on
    /// the new binding's own block device are not of the old binding and are left out.
    /// A reconcile may have dropped such holders from the map already (their files are
    /// on no live device), so /proc/PID/maps below `root` is read too, never page tables:
    /// on kernels without devmap DAX entries reading those oopses.
    pub fn rebound(
        &mut self,
        topo: &Topology,
        now_ns: u64,
        app: &mut Applier,
        root: &std::path::Path,
    ) -> Vec<Report> {
        let mut out = Vec::new();
        let mut changed = false;
        for d in self.departed.iter_mut().filter(|d| d.rebound_ns.is_none()) {
            let Some(n) = topo.namespaces.iter().find(|n| {
                n.enabled
                    && n.range_known
                    && !n.devices().is_empty()
                    && d.pfn_ranges.iter().any(|&(s, e)| {
                        s < n.namespace_range.end_pfn() && e > n.namespace_range.first_pfn()
                    })
            }) else {
                continue;
            };
            d.rebound_ns = Some(now_ns);
            changed = true;
            let new_devs = n.devices();
            let mut old_binding: Vec<HolderRow> = app
                .rows_in_pfn_ranges(topo, &d.pfn_ranges)
                .into_iter()
                .filter(|r| n.mode == Mode::Devdax || !new_devs.contains(&r.dev))
                .collect();
            let bindings = crate::holders::bindings::Bindings::read(root, topo);
            let device = n.device_name().to_string();
            for (pid, v) in
                crate::holders::bindings::old_binding_vmas(app.procfs(), topo, &bindings, &device)
            {
                if old_binding.iter().any(|r| r.pid == pid) {
                    continue;
                }
                let (start_time, comm) = app.procfs().stat(pid).unwrap_or_default();
                let len = v.end - v.start;
                old_binding.push(HolderRow {
                    pid,
                    start_time,
                    comm,
                    dev: v.dev,
                    ino: v.ino,
                    file: Some(v.path.clone()),
                    pages: len >> 12,
                    offsets: vec![(v.offset, v.offset + len)],
                    extents: None,
                    probe_at: Vec::new(),
                    cgroup: None,
                    container: None,
                    pod_uid: None,
                });
            }
            if old_binding.is_empty() {
                continue;
            }
            out.push(Report::DeviceRebound {
                ts_ns: now_ns,
                device: n.device_name().to_string(),
                namespace: n.name.clone(),
                departed_ns: d.ts_ns,
                old_binding_pages: pages(&old_binding),
                old_binding,
            });
        }
        if changed {
            self.save();
        }
        out
    }

    /// A departure ended (the kernel said so, or sysfs did): remembered as departed, and
    /// its `device_gone` report.
    fn end(
        &mut self,
        dep: &Departure,
        ts_ns: u64,
        synthesised: bool,
        app: &mut Applier,
        topo: &Topology,
    ) -> Report {
        let still = app.rows_in_pfn_ranges(topo, &dep.pfn_ranges);
        self.departed.push(Departed {
            device: dep.device.clone(),
            namespace: dep.namespaces.join(","),
            pfn_ranges: dep.pfn_ranges.clone(),
            ts_ns,
            rebound_ns: None,
        });
        self.ended_devs.extend(dep.devs.iter().copied());
        self.save();
        Report::DeviceGone {
            ts_ns,
            device: dep.device.clone(),
            still_mapped: still,
            took_ms: ts_ns.saturating_sub(dep.started_ns) as f64 / 1e6,
            synthesised,
        }
    }

    /// A driver leaves a device-dax device on the dax bus while its namespace stays bound:
    /// `daxctl reconfigure-device` (device_dax → kmem and back), `disable-device`, a driver
    /// module unloaded. A change of personality, not a departure: the memory stays the
    /// namespace's, and the kernel zaps every mapping of /dev/daxX.Y itself
    /// (`kill_dev_dax` → `unmap_mapping_range`), so no page-table entry outlives it and
    /// nothing is fenced or signalled. Holders are named: their next access faults.
    fn reconfiguring(
        &mut self,
        d: &DeviceChange,
        nss: &[Namespace],
        app: &mut Applier,
        topo: &Topology,
    ) -> Report {
        let pfn_ranges: Vec<(u64, u64)> = nss
            .iter()
            .filter(|n| n.range_known)
            .map(|n| (n.data_range.first_pfn(), n.data_range.end_pfn()))
            .collect();
        let holders = app.rows_in_pfn_ranges(topo, &pfn_ranges);
        Report::DeviceReconfiguring {
            ts_ns: d.ts_ns,
            device: d.device.clone(),
            namespaces: nss.iter().map(|n| n.name.clone()).collect(),
            mode: nss[0].mode,
            driver: d.driver.clone(),
            by_pid: d.tgid,
            by_comm: d.comm.clone(),
            holder_pages: pages(&holders),
            holders,
        }
    }

    fn device(&mut self, d: &DeviceChange, app: &mut Applier, topo: &Topology) -> Outcome {
        match d.phase {
            DevicePhase::Departing => {
                // Read off the ring now: listing the holders below is the agent's work.
                let received_ns = crate::policy::enforce::boottime_ns();
                self.learn(topo);
                let nss: Vec<Namespace> = namespaces_for(topo, &d.device)
                    .into_iter()
                    .map(|n| self.identity(n))
                    .collect();
                // Several hooks may report one unbind (see the departure plan): the first wins.
                // A namespace's removal unbinds its nd device first and its device-dax device
                // on the dax bus after: that second report is part of the departure.
                if self.departing.iter().any(|x| x.names.contains(&d.device)) {
                    return Outcome::default();
                }
                if d.bus == "dax" && !nss.is_empty() {
                    return Outcome {
                        reports: vec![self.reconfiguring(d, &nss, app, topo)],
                        ..Default::default()
                    };
                }
                let nss: Vec<&Namespace> = nss
                    .iter()
                    .filter(|n| matches!(n.mode, Mode::Fsdax | Mode::Devdax | Mode::Raw))
                    .collect();
                if nss.is_empty() {
                    return Outcome::default();
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
                    devs: nss.iter().flat_map(|n| n.devices()).collect(),
                    names,
                    started_ns: d.ts_ns,
                    stamps: crate::policy::guard::Stamps {
                        received_ns,
                        listed_ns: crate::policy::enforce::boottime_ns(),
                        fenced_ns: 0,
                    },
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
                    synthesised: false,
                };
                Outcome {
                    reports: vec![report],
                    started: Some(dep),
                    ended: None,
                }
            }
            DevicePhase::Gone => {
                let Some(pos) = self
                    .departing
                    .iter()
                    .position(|x| x.names.contains(&d.device))
                else {
                    return Outcome::default();
                };
                let dep = self.departing.remove(pos);
                Outcome {
                    reports: vec![self.end(&dep, d.ts_ns, false, app, topo)],
                    started: None,
                    ended: Some(dep),
                }
            }
            DevicePhase::DaxKilled => Outcome {
                reports: vec![Report::DaxShutOff {
                    ts_ns: d.ts_ns,
                    device: self.departure_of(d.tid).map(|x| x.device.clone()),
                }],
                ..Default::default()
            },
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
                Outcome {
                    reports: vec![Report::FsNotified {
                        ts_ns: d.ts_ns,
                        device,
                        offset: d.offset,
                        len: d.len,
                        pre_remove: d.pre_remove,
                        meaning,
                    }],
                    ..Default::default()
                }
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
                media_error: None,
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

    /// The SIGBUS a refused user-mode DAX fault brings: no memory failure is involved (that
    /// one is `VM_FAULT_HWPOISON`, signalled through `force_sig_mceerr`), so the cause is
    /// the device's departure when one is under way, else the fault handler's refusal (the
    /// agent names a known-bad range it lies in, `media_error`, after this).
    fn fault_sigbus(&self, k: &KernelSigbus, dev: DevId, topo: &Topology) -> Report {
        let cause = match self.departing.iter().find(|d| d.devs.contains(&dev)) {
            Some(d) => format!("unbind of {} in progress", d.device),
            None => match self.device_of(dev, topo) {
                Some(name) => format!(
                    "the DAX fault handler refused the access on {name} (VM_FAULT_SIGBUS: \
                     unreadable media, a departed device or past the end of the file)"
                ),
                None => format!(
                    "the DAX fault handler refused the access (VM_FAULT_SIGBUS) on a file \
                     system whose device ({dev}) the agent no longer sees: its device left"
                ),
            },
        };
        Report::KernelSigbus {
            sigbus: k.clone(),
            cause,
            media_error: None,
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
            media_error: None,
        }
    }
}

/// The SIGBUS the kernel sends for `f`, if it refused a fault taken in user mode with a
/// plain `VM_FAULT_SIGBUS` (x86's `do_sigbus`: BUS_ADRERR at the faulting address, to the
/// faulting thread). No hook sees that signal; the fault record is its ground truth. A
/// `VM_FAULT_HWPOISON` refusal is left out: `force_sig_mceerr` reports it (hooked), and a
/// kernel-mode fault gets an error return, not a signal.
pub fn refused_in_user_mode(f: &crate::event::Fault) -> Option<KernelSigbus> {
    use dax_probe_common::{VM_FAULT_HWPOISON, VM_FAULT_HWPOISON_LARGE, VM_FAULT_SIGBUS};
    let plain = f.result_raw & VM_FAULT_SIGBUS != 0
        && f.result_raw & (VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE) == 0;
    (f.user && plain).then(|| KernelSigbus {
        ts_ns: f.ts_ns,
        pid: f.tgid,
        tid: f.tid,
        comm: f.comm.clone(),
        addr: f.address,
        code: "BUS_ADRERR".into(),
        lsb: 0,
        sender_pid: f.tgid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        os::fake::{self, FakeOs},
        topology::DevId,
    };

    /// namespace0.0 as device-dax `dax0.0` (the fake machine's pmem0 range).
    fn devdax() -> Topology {
        let mut t = fake::topology(&[]);
        let n = &mut t.namespaces[0];
        n.mode = Mode::Devdax;
        n.holder = Some("dax0.0".into());
        n.block = None;
        n.chardev = Some((
            "dax0.0".into(),
            DevId {
                major: 252,
                minor: 0,
            },
        ));
        t
    }

    fn unbind(bus: &str, driver: &str) -> Event {
        Event::Device(DeviceChange {
            ts_ns: 5,
            phase: DevicePhase::Departing,
            tgid: 300,
            tid: 300,
            comm: "daxctl".into(),
            device: "dax0.0".into(),
            driver: driver.into(),
            bus: bus.into(),
            offset: 0,
            len: 0,
            mf_flags: 0,
            pre_remove: false,
        })
    }

    fn applier() -> Applier {
        Applier::new(Box::new(FakeOs::new(&[], &[])))
    }

    #[test]
    fn device_dax_leaving_on_the_dax_bus_is_a_reconfiguration_not_a_departure() {
        let t = devdax();
        let mut app = applier();
        let mut inc = Incidents::default();
        let o = inc.handle(&unbind("dax", "device_dax"), &mut app, &t);
        assert!(o.started.is_none(), "nothing to fence or signal");
        assert!(inc.departing.is_empty());
        assert!(
            matches!(&o.reports[..], [Report::DeviceReconfiguring { device, driver, mode: Mode::Devdax, .. }]
                if device == "dax0.0" && driver == "device_dax"),
            "{:?}",
            o.reports
        );
        // Its end (the driver's unbind returning) ends nothing.
        let mut gone = unbind("dax", "device_dax");
        if let Event::Device(d) = &mut gone {
            d.phase = DevicePhase::Gone;
        }
        assert!(inc.handle(&gone, &mut app, &t).reports.is_empty());
        // kmem leaving a System RAM device: the same.
        let mut t = devdax();
        t.namespaces[0].mode = Mode::SystemRam;
        let o = inc.handle(&unbind("dax", "kmem"), &mut app, &t);
        assert!(o.started.is_none());
        assert!(matches!(
            &o.reports[..],
            [Report::DeviceReconfiguring {
                mode: Mode::SystemRam,
                ..
            }]
        ));
    }

    #[test]
    fn a_namespace_removal_stays_one_departure_with_its_dax_bus_unbind() {
        let t = devdax();
        let mut app = applier();
        let mut inc = Incidents::default();
        let o = inc.handle(&unbind("nd", "dax_pmem"), &mut app, &t);
        assert!(o.started.is_some(), "{:?}", o.reports);
        assert!(matches!(&o.reports[..], [Report::DeviceDeparting { .. }]));
        // The device-dax device unbinds inside that removal: part of it, nothing new.
        let o = inc.handle(&unbind("dax", "device_dax"), &mut app, &t);
        assert!(
            o.reports.is_empty() && o.started.is_none(),
            "{:?}",
            o.reports
        );
        assert_eq!(inc.departing.len(), 1);
    }

    /// A refused user-mode fault of `dev` (SIGBUS, no page mapped).
    fn refused(dev: DevId, user: bool) -> crate::event::Fault {
        crate::event::Fault {
            ts_ns: 9,
            tgid: 150,
            tid: 151,
            comm: "db".into(),
            dev,
            ino: 0,
            offset: 0,
            address: 0x7f00_0000_0010,
            page_address: 0x7f00_0000_0000,
            pfn: None,
            pfn_source: None,
            page_size: 4096,
            write: false,
            user,
            mapped: false,
            zero_page: false,
            result: "SIGBUS".into(),
            result_raw: dax_probe_common::VM_FAULT_SIGBUS,
            vma_start: 0x7f00_0000_0000,
            vma_end: 0x7f00_0020_0000,
            shared: true,
            device: None,
            devdax: true,
            mm: 0,
            pages: 1,
            last_ts_ns: 0,
            range: None,
        }
    }

    /// The kernel's SIGBUS for a refused user-mode fault is reported with what explains it:
    /// the departure of the fault's device while one runs, else that the device left.
    #[test]
    fn a_refused_user_fault_is_a_kernel_sigbus_with_its_cause() {
        let t = devdax();
        let mut app = applier();
        let mut inc = Incidents::default();
        let chardev = t.namespaces[0].chardev.as_ref().unwrap().1;
        let gone = DevId {
            major: 259,
            minor: 99,
        };
        let sigbus = |inc: &mut Incidents, app: &mut Applier, f| match &inc
            .handle(&Event::Fault(f), app, &t)
            .reports[..]
        {
            [Report::KernelSigbus { sigbus, cause, .. }] => Some((sigbus.clone(), cause.clone())),
            [] => None,
            other => panic!("{other:?}"),
        };
        let (k, cause) = sigbus(&mut inc, &mut app, refused(gone, true)).unwrap();
        assert_eq!(
            (k.pid, k.tid, k.addr, k.code.as_str(), k.sender_pid),
            (150, 151, 0x7f00_0000_0010, "BUS_ADRERR", 150)
        );
        assert!(cause.contains("its device left"), "{cause}");
        let (_, cause) = sigbus(&mut inc, &mut app, refused(chardev, true)).unwrap();
        assert!(cause.contains("refused the access on dax0.0"), "{cause}");
        inc.handle(&unbind("nd", "dax_pmem"), &mut app, &t);
        let (_, cause) = sigbus(&mut inc, &mut app, refused(chardev, true)).unwrap();
        assert_eq!(cause, "unbind of dax0.0 in progress");
        assert!(sigbus(&mut inc, &mut app, refused(chardev, false)).is_none());
        let mut mce = refused(chardev, true);
        mce.result_raw = dax_probe_common::VM_FAULT_HWPOISON;
        assert!(sigbus(&mut inc, &mut app, mce).is_none());
    }
}
