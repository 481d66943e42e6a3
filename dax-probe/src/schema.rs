//! The one typed definition of every JSON line dax-probe prints: `monitor --json`, `drain
//! --json` and `audit --json`. Each line is one [`Line`], tagged by `type`.
//!
//! Everything that writes a line builds a [`Line`] and serializes it; everything that reads
//! one (the dashboard's replay, the VM scenarios) parses it back into a [`Line`]. A renamed
//! or retyped field therefore breaks the round-trip tests below instead of silently reading
//! as `?` or 0. `dax-probe schema` prints the JSON Schema generated from these types; the
//! copy checked in at `docs/events.schema.json` is tested to be current.
//!
//! Field names are the documented ones (README, "With `--json` every line is an object with
//! a `type`"). Fields added after the first recordings were made carry `#[serde(default)]`
//! so older recordings still replay.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::{
    event::{
        DeviceChange, Fault, FenceSignal, Fork, GuardVerdict, KernelSigbus, MmapDenied, Mremap,
        UnbindGuarded, Zap,
    },
    history::{Incident, IncidentKind},
    holders::query::HolderRow,
    policy::enforce::ActionReport,
    probe::{loader::Upgrade, plan::Concern},
    topology::{DevId, Topology},
    ui::audit::Stale,
};

/// One line of JSON output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    /// First line of `monitor --json`: what is attached.
    Attached(Attached),

    // Kernel events, as decoded (`event.rs`).
    /// One completed DAX page fault.
    Fault(Fault),
    /// PTEs of a DAX mapping torn down.
    Zap(Zap),
    /// A holder forked.
    Fork(Fork),
    /// A holder called mremap.
    Mremap(Mremap),
    /// A raw device event (the agent also turns these into the reports below).
    Device(DeviceChange),

    // Operator-level reports (`incident.rs` builds them).
    /// The unbind hook fired; teardown has not started. The holders are the live map's at
    /// that instant. It precedes the enforcement lines it triggered.
    DeviceDeparting {
        ts_ns: u64,
        device: String,
        namespaces: Vec<String>,
        /// pfn ranges `[start, end)`.
        pfn_ranges: Vec<(u64, u64)>,
        /// Who unbinds it.
        #[serde(default)]
        by_pid: u32,
        #[serde(default)]
        by_comm: String,
        #[serde(default)]
        driver: String,
        holders: Vec<HolderRow>,
        #[serde(default)]
        holder_pages: u64,
        /// No kernel hook reported this departure: the agent's topology re-read found the
        /// device gone from sysfs, after the fact (`ts_ns` is when it looked; nothing was
        /// fenced or signalled). Absent when false.
        #[serde(default, skip_serializing_if = "is_false")]
        synthesised: bool,
    },
    /// The unbind finished.
    DeviceGone {
        ts_ns: u64,
        device: String,
        /// Holders whose pages of the device are still in the map (stale mappings: the
        /// kernel did not tear them down). `audit` checks page tables.
        still_mapped: Vec<HolderRow>,
        #[serde(default)]
        took_ms: f64,
        /// No kernel hook reported the end of the teardown (a departure hook without an
        /// exit probe, or none at all): the agent's topology re-read found the device gone
        /// from sysfs (`ts_ns` and `took_ms` are when it looked). Absent when false.
        #[serde(default, skip_serializing_if = "is_false")]
        synthesised: bool,
    },
    /// A device that departed is bound again (its physical range belongs to a live device
    /// once more) while processes still map its old binding: their page-table entries point
    /// at pfns the new binding hands to a new tenant (the rebind leak). `audit` names their
    /// stale pages; nothing is signalled for this line.
    DeviceRebound {
        ts_ns: u64,
        device: String,
        namespace: String,
        /// When the agent saw the old binding leave (boot time, ns).
        departed_ns: u64,
        /// Holders whose pages in the map are of the old binding.
        old_binding: Vec<HolderRow>,
        #[serde(default)]
        old_binding_pages: u64,
    },
    /// A driver leaves a device-dax device on the dax bus while its namespace stays (a
    /// reconfiguration such as `daxctl reconfigure-device`: device_dax → kmem, or back): not
    /// a departure. The kernel zaps the holders' mappings itself; nothing is fenced or
    /// signalled. The new personality shows in the next `topology` line.
    DeviceReconfiguring {
        ts_ns: u64,
        device: String,
        namespaces: Vec<String>,
        /// The personality it had (devdax, system-ram).
        mode: crate::topology::Mode,
        /// The driver leaving it (`device_dax`, `kmem`).
        driver: String,
        by_pid: u32,
        by_comm: String,
        /// Processes that mapped it: their mappings are gone, their next access faults.
        holders: Vec<HolderRow>,
        #[serde(default)]
        holder_pages: u64,
    },
    /// `kill_dax()`: DAX access to a device shut off.
    DaxShutOff { ts_ns: u64, device: Option<String> },
    /// A file system was told of a failure or of a pending removal of its device.
    FsNotified {
        ts_ns: u64,
        device: Option<String>,
        offset: u64,
        len: u64,
        pre_remove: bool,
        meaning: String,
    },
    /// A memory failure (poisoned pfn) began.
    MemoryFailure {
        ts_ns: u64,
        pfn: u64,
        device: Option<String>,
        /// Every file (and offset) the page backs: several for reflinked extents.
        files: Vec<FileRef>,
        holders: Vec<HolderRow>,
        by_pid: u32,
        by_comm: String,
        /// The known-bad media range (an earlier `media_error`) the pfn lies in.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media_error: Option<String>,
    },
    /// A known-bad media range (a badblocks list) appeared: its pfns, the files and
    /// offsets on it, and who maps it now. Precedes the enforcement lines it triggered.
    MediaError(crate::badblocks::MediaError),
    /// The kernel's verdict on a memory failure.
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
    /// The kernel's machine-check SIGBUS to a process, with why it was sent.
    KernelSigbus {
        #[serde(flatten)]
        sigbus: KernelSigbus,
        cause: String,
        /// The known-bad media range (an earlier `media_error`) the page lies in.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media_error: Option<String>,
    },
    /// A new mapping of a fenced device was refused.
    MmapDenied {
        #[serde(flatten)]
        denied: MmapDenied,
        device: Option<String>,
    },
    /// The kernel's fence signalled a task that faulted on a fenced device. Reported (and
    /// audited) after the signal: the arming of the fence was audited before it.
    FenceSignal {
        #[serde(flatten)]
        sent: FenceSignal,
        device: Option<String>,
    },
    /// The unbind guard refused a write to an nd/dax driver's `unbind` file with EBUSY
    /// (policy `guard = "refuse-unbind"`): it named a guarded device that has holders, or
    /// the guard could not read which device it named. Audited.
    UnbindRefused {
        #[serde(flatten)]
        refused: UnbindGuarded,
        /// The device as operators know it (`pmem0`, `dax0.0`), when the name written is
        /// one of its.
        device: Option<String>,
        /// The writer's command line (`/proc/PID/cmdline`, arguments joined by spaces),
        /// when it could still be read.
        #[serde(default)]
        cmdline: Option<String>,
        /// The holders the refusal kept their mappings for.
        #[serde(default)]
        holders: Vec<HolderRow>,
    },

    // What the agent, drain and audit did.
    /// One enforcement action (or refusal), flat: the same shape from the monitor and drain.
    Enforcement(ActionReport),
    /// A reconcile with procfs (periodic ones only when they corrected something).
    Reconcile(Reconcile),
    /// A concern moved to a kernel hook after a module loaded.
    HooksChanged(Upgrade),
    /// One step of `drain`.
    Drain(DrainStep),
    /// The result of `audit`.
    Audit(Audit),
    /// Totals, last line of `monitor --json`.
    Summary(Summary),
    /// One stored incident, as `history --json` prints it (newest first).
    Incident(Incident),

    // State a recording needs to be replayed without the machine (`tui --replay`); the
    // text monitor leaves these out.
    /// The pmem topology: at start and whenever the agent reads a different one.
    Topology(Topology),
    /// Holder state (see [`Holders`]).
    Holders(Holders),
    /// A DAX file's name, once per file, before the first fault on it.
    File(FileName),
    /// Events lost so far because the ring buffer was full: printed when the count grows,
    /// right before the reconcile that repairs the map.
    Dropped(Dropped),

    /// A `type` this version does not know (a newer agent's line). Only ever parsed, never
    /// printed.
    #[serde(other, skip_serializing)]
    #[schemars(skip)]
    Unknown,
}

impl Line {
    /// Lines that carry state for replay rather than news for a reader (the text monitor
    /// leaves them out).
    pub fn is_state(&self) -> bool {
        matches!(
            self,
            Line::Topology(_) | Line::Holders(_) | Line::File(_) | Line::Dropped(_)
        )
    }

    /// The kernel events that are printed as they are; the others (memory failures, the
    /// kernel's SIGBUS, refused mmaps) reach the output as reports.
    pub fn from_event(ev: crate::event::Event) -> Option<Line> {
        use crate::event::Event;
        Some(match ev {
            Event::Fault(f) => Line::Fault(f),
            Event::Zap(z) => Line::Zap(z),
            Event::Fork(f) => Line::Fork(f),
            Event::Mremap(m) => Line::Mremap(m),
            Event::Device(d) => Line::Device(d),
            Event::MemoryFailure(_)
            | Event::KernelSigbus(_)
            | Event::MmapDenied(_)
            | Event::FenceSignal(_)
            | Event::UnbindGuard(_) => {
                return None;
            }
        })
    }

    /// The line as `--json` prints it (no newline).
    pub fn to_json(&self) -> String {
        // Serializing plain data into a String cannot fail, except for `Unknown`, which is
        // never built by a writer.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// For `skip_serializing_if`: a flag that is false is left out of the line.
fn is_false(b: &bool) -> bool {
    !*b
}

/// First line of `monitor --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Attached {
    /// The running kernel's release.
    pub kernel: String,
    /// The way chosen for each concern.
    #[serde(default)]
    pub hooks: Vec<Hook>,
    pub holders: usize,
    #[serde(default)]
    pub holder_pages: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Hook {
    pub concern: Concern,
    /// The kernel program serving it, or none.
    pub chosen: Option<Cow<'static, str>>,
    /// Served from userspace (procfs) instead.
    pub userspace: bool,
}

/// A file (or device) offset range of a memory failure's page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FileRef {
    pub dev: DevId,
    pub ino: u64,
    pub path: Option<String>,
    pub offset: u64,
}

/// A reconcile's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Reconcile {
    /// Pages the kernel maps that the map lacked.
    pub missing: u64,
    /// Pages in the map the kernel no longer maps.
    pub extra: u64,
    pub holders: usize,
    /// `periodic`, `events lost`, `hooks changed`.
    pub reason: Cow<'static, str>,
}

/// Why a `holders` line was printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldersReason {
    /// Mappings made before the agent started.
    Start,
    /// After procfs corrected the map.
    Reconcile,
    /// A consumer (a lagging dashboard) asked for the whole map.
    Requested,
    /// The complete state of `pids`, re-read for the event on the next line.
    Resync,
}

impl HoldersReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldersReason::Start => "start",
            HoldersReason::Reconcile => "reconcile",
            HoldersReason::Requested => "requested",
            HoldersReason::Resync => "resync",
        }
    }
}

/// Holder state. Without `pids` it is the whole map. With `pids` it is the complete state
/// of those processes right after the agent re-read their page tables for the event on the
/// next line (fork, mremap, a partial huge unmap); a listed pid without rows maps nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Holders {
    pub reason: HoldersReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<Vec<u32>>,
    /// One row per (process, file), with every extent.
    pub rows: Vec<HolderRow>,
}

/// A DAX file's name (events carry only device and inode).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FileName {
    pub dev: DevId,
    pub ino: u64,
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Dropped {
    pub dropped: u64,
}

/// One step of `drain`. `step` names it (`fence` once the device refuses new mappings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DrainStep {
    pub step: String,
    pub message: String,
}

impl DrainStep {
    /// The step after which the device refuses new mappings.
    pub const FENCE: &'static str = "fence";

    pub fn is_fence(&self) -> bool {
        self.step == Self::FENCE
    }
}

/// What `audit` found: the departed ranges it checked and the mappings still into them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Audit {
    pub departed_ranges: Vec<DepartedRange>,
    pub stale: Vec<Stale>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DepartedRange {
    pub first_pfn: u64,
    pub end_pfn: u64,
    pub device: String,
}

/// Totals for the final summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Summary {
    pub events: u64,
    pub faults: u64,
    /// Lost in the kernel: ring buffer full.
    pub dropped: u64,
    /// Records the agent could not decode.
    pub undecodable: u64,
    /// Kernel reads that failed (fields zeroed).
    pub kernel_read_errors: u64,
    /// Faults the kernel programs saw.
    pub faults_seen_by_kernel: u64,
    /// Events of every kind the kernel programs tried to emit: delivered + dropped.
    pub events_attempted_by_kernel: u64,
    /// Each attached program's runs and run time, when the kernel counts them
    /// (`sysctl kernel.bpf_stats_enabled=1`; empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<crate::probe::stats::ProgramStat>,
    pub holders: usize,
    pub holder_pages: u64,
    pub drift_missing: u64,
    pub drift_extra: u64,
    pub reconciles: u64,
    pub duration_s: f64,
}

/// The JSON Schema of [`Line`], as `dax-probe schema` prints it and
/// `docs/events.schema.json` holds it.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(Line);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{DevicePhase, PfnSource},
        holders::query::RowExtent,
        topology::{DaxOption, Mode, Mount, Namespace, PhysRange},
    };

    const DEV: DevId = DevId {
        major: 259,
        minor: 1,
    };

    fn row() -> HolderRow {
        HolderRow {
            pid: 150,
            start_time: 1200,
            comm: "postgres".into(),
            dev: DEV,
            ino: 12,
            file: Some("/mnt/xfs/db".into()),
            pages: 2,
            offsets: vec![(0, 8192)],
            probe_at: Vec::new(),
            extents: Some(vec![RowExtent {
                vaddr: 0x7f00_0000_0000,
                pfn: 0x10_9000,
                offset: 0,
                pages: 2,
            }]),
            cgroup: Some("/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope".into()),
            container: Some(crate::proc::cgroup::Container {
                runtime: crate::proc::cgroup::Runtime::Docker,
                id: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            }),
            pod_uid: None,
        }
    }

    fn sigbus() -> KernelSigbus {
        KernelSigbus {
            ts_ns: 5,
            pid: 150,
            tid: 151,
            comm: "postgres".into(),
            addr: 0x7f00_0000_1000,
            code: "BUS_MCEERR_AR".into(),
            lsb: 12,
            sender_pid: 150,
        }
    }

    /// One of each variant, with every optional field set (a `None` round-trips trivially).
    fn samples() -> Vec<Line> {
        vec![
            Line::Attached(Attached {
                kernel: "6.12.43+deb13-amd64".into(),
                hooks: vec![Hook {
                    concern: Concern::FaultDone,
                    chosen: Some("tp_btf".into()),
                    userspace: false,
                }],
                holders: 1,
                holder_pages: 512,
            }),
            Line::Fault(Fault {
                ts_ns: 12_649_205_000,
                tgid: 165,
                tid: 166,
                comm: "dax-workload".into(),
                dev: DEV,
                ino: 12,
                offset: 4096,
                address: 0x7f06_4360_0010,
                page_address: 0x7f06_4360_0000,
                pfn: Some(0x10_9000),
                pfn_source: Some(PfnSource::Pagemap),
                page_size: 4096,
                write: true,
                user: true,
                mapped: true,
                zero_page: false,
                result: "NOPAGE".into(),
                result_raw: 0x100,
                vma_start: 0x7f06_4360_0000,
                vma_end: 0x7f06_4380_0000,
                shared: true,
                device: Some("pmem1".into()),
                devdax: false,
                mm: 0,
                pages: 3,
                last_ts_ns: 12_649_209_000,
                range: None,
            }),
            Line::Zap(Zap {
                ts_ns: 7,
                tgid: 165,
                tid: 165,
                comm: "dax-workload".into(),
                start: 0x1000,
                end: 0x3000,
                vma_start: 0,
                vma_end: 0x4000,
                offset: 0x1000,
                dev: DEV,
                ino: 12,
                devdax: true,
                own_mm: true,
                exiting: true,
                cow: true,
                owner_tgid: Some(165),
                mm: 0,
            }),
            Line::Fork(Fork {
                ts_ns: 8,
                parent_tgid: 165,
                comm: "dax-workload".into(),
                child_tgid: 170,
                child_mm: 0,
            }),
            Line::Mremap(Mremap {
                ts_ns: 9,
                tgid: 165,
                comm: "dax-workload".into(),
                old_addr: 0x1000,
                old_len: 0x2000,
                new_len: 0x4000,
                flags: 1,
                new_addr: 0x9000,
            }),
            Line::Device(DeviceChange {
                ts_ns: 10,
                phase: DevicePhase::HolderNotify,
                tgid: 1,
                tid: 2,
                comm: "sh".into(),
                device: "pfn1.0".into(),
                driver: "nd_pmem".into(),
                bus: "nd".into(),
                offset: 4096,
                len: 8192,
                mf_flags: 0x40,
                pre_remove: true,
            }),
            Line::DeviceDeparting {
                ts_ns: 11,
                device: "pmem1".into(),
                namespaces: vec!["namespace1.0".into()],
                pfn_ranges: vec![(0x12_8000, 0x14_8000)],
                by_pid: 300,
                by_comm: "sh".into(),
                driver: "nd_pmem".into(),
                holders: vec![row()],
                holder_pages: 2,
                synthesised: false,
            },
            Line::DeviceGone {
                ts_ns: 12,
                device: "pmem1".into(),
                still_mapped: vec![row()],
                took_ms: 3.25,
                synthesised: true,
            },
            Line::DeviceRebound {
                ts_ns: 12,
                device: "pmem1".into(),
                namespace: "namespace1.0".into(),
                departed_ns: 11,
                old_binding: vec![row()],
                old_binding_pages: 2,
            },
            Line::DeviceReconfiguring {
                ts_ns: 12,
                device: "dax1.0".into(),
                namespaces: vec!["namespace1.0".into()],
                mode: Mode::Devdax,
                driver: "device_dax".into(),
                by_pid: 300,
                by_comm: "daxctl".into(),
                holders: vec![row()],
                holder_pages: 2,
            },
            Line::DaxShutOff {
                ts_ns: 13,
                device: Some("pmem1".into()),
            },
            Line::UnbindRefused {
                refused: UnbindGuarded {
                    ts_ns: 18,
                    pid: 190,
                    tid: 190,
                    comm: "sh".into(),
                    written: "pfn0.0".into(),
                    driver: "nd_pmem".into(),
                    bus: "nd".into(),
                    syscall: 1,
                    verdict: GuardVerdict::Refused,
                    errno: Some(16),
                },
                device: Some("pmem0".into()),
                cmdline: Some("sh -c echo pfn0.0 > unbind".into()),
                holders: vec![row()],
            },
            Line::FsNotified {
                ts_ns: 14,
                device: Some("pmem1".into()),
                offset: 0,
                len: 1 << 30,
                pre_remove: true,
                meaning: "xfs told: pre-remove".into(),
            },
            Line::MemoryFailure {
                ts_ns: 15,
                pfn: 0x10_8410,
                device: Some("pmem0".into()),
                files: vec![FileRef {
                    dev: DEV,
                    ino: 12,
                    path: Some("/mnt/xfs/db".into()),
                    offset: 65536,
                }],
                holders: vec![row()],
                by_pid: 201,
                by_comm: "inject".into(),
                media_error: Some("pmem0 sectors 16+8".into()),
            },
            Line::MemoryFailureResult {
                ts_ns: 16,
                pfn: 0x10_8410,
                result: Some("Recovered".into()),
                page_type: Some("page type 3".into()),
                signalled: vec![150],
                not_signalled: vec![151],
            },
            Line::KernelSigbus {
                sigbus: sigbus(),
                cause: "memory failure at pfn 0x108410".into(),
                media_error: Some("pmem0 sectors 16+8".into()),
            },
            Line::MediaError(crate::badblocks::MediaError {
                ts_ns: 16,
                device: "pmem0".into(),
                list: "/sys/block/pmem0/badblocks".into(),
                scope: crate::badblocks::Scope::Block,
                sector: 16,
                sectors: 8,
                namespace: Some("namespace0.0".into()),
                phys: Some(crate::topology::PhysRange {
                    start: 0x1_0080_2000,
                    end: 0x1_0080_3000,
                }),
                pfns: Some((0x10_0802, 0x10_0803)),
                dev_bytes: Some((8192, 12288)),
                mount: Some("/mnt/xfs".into()),
                files: vec![crate::badblocks::locate::BadFile {
                    path: "/mnt/xfs/db".into(),
                    ino: 12,
                    offset: 65536,
                    end: 69632,
                    shared: true,
                }],
                space: vec![crate::badblocks::locate::BadSpace {
                    kind: crate::badblocks::locate::SpaceKind::Free,
                    what: "free space".into(),
                    dev_offset: 0,
                    dev_end: 512,
                }],
                holders: vec![row()],
                notes: vec!["x".into()],
            }),
            Line::MmapDenied {
                denied: MmapDenied {
                    ts_ns: 17,
                    pid: 180,
                    comm: "reader".into(),
                    dev: DEV,
                    ino: 13,
                },
                device: Some("pmem1".into()),
            },
            Line::FenceSignal {
                sent: FenceSignal {
                    ts_ns: 18,
                    pid: 181,
                    tid: 182,
                    comm: "writer".into(),
                    signal: "SIGTERM".into(),
                    dev: DEV,
                    ino: 13,
                    error: None,
                },
                device: Some("pmem1".into()),
            },
            Line::Enforcement(ActionReport {
                device: "pmem1".into(),
                pid: 150,
                comm: "postgres".into(),
                action: "signal".into(),
                signal: Some("TERM".into()),
                reason: "device departing".into(),
                since_departure_us: Some(1200),
                received_us: None,
                listed_us: None,
                fenced_us: None,
                verdict_us: None,
                cgroup: Some(
                    "/kubepods.slice/kubepods-pod1b2c3d4e_5f60_4a7b_8c9d_0e1f2a3b4c5d.slice".into(),
                ),
                container: None,
                pod_uid: Some("1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d".into()),
            }),
            Line::Reconcile(Reconcile {
                missing: 1,
                extra: 2,
                holders: 3,
                reason: "events lost".into(),
            }),
            Line::HooksChanged(Upgrade {
                concern: Concern::DevdaxFault,
                was: Some("kprobe".into()),
                chosen: "fentry".into(),
            }),
            Line::Drain(DrainStep {
                step: DrainStep::FENCE.into(),
                message: "pmem1 fenced".into(),
            }),
            Line::Audit(Audit {
                departed_ranges: vec![DepartedRange {
                    first_pfn: 0x12_8000,
                    end_pfn: 0x14_8000,
                    device: "pmem1 (namespace1.0, driver unbound)".into(),
                }],
                stale: vec![Stale {
                    pid: 180,
                    comm: "reader".into(),
                    vaddr_start: 0x1000,
                    vaddr_end: 0x3000,
                    pages: 2,
                    first_pfn: 0x12_8000,
                    former_device: "pmem1".into(),
                    file: "/mnt/xfs/db".into(),
                    verified: true,
                }],
            }),
            Line::Summary(Summary {
                events: 12,
                faults: 8,
                dropped: 37,
                undecodable: 1,
                kernel_read_errors: 2,
                faults_seen_by_kernel: 45,
                events_attempted_by_kernel: 49,
                programs: vec![crate::probe::stats::ProgramStat {
                    name: "dax_pte_fault_done_btf".into(),
                    run_count: 45,
                    run_time_ns: 9_000,
                }],
                holders: 4,
                holder_pages: 1031,
                drift_missing: 3,
                drift_extra: 4,
                reconciles: 2,
                duration_s: 5.5,
            }),
            Line::Topology(Topology {
                dm: Vec::new(),
                namespaces: vec![Namespace {
                    name: "namespace1.0".into(),
                    region: "region1".into(),
                    mode: Mode::Fsdax,
                    holder: Some("pfn1.0".into()),
                    namespace_range: PhysRange {
                        start: 0x1_2800_0000,
                        end: 0x1_4800_0000,
                    },
                    data_range: PhysRange {
                        start: 0x1_2820_0000,
                        end: 0x1_4800_0000,
                    },
                    block: Some(("pmem1".into(), DEV)),
                    chardev: Some((
                        "dax1.0".into(),
                        DevId {
                            major: 252,
                            minor: 0,
                        },
                    )),
                    align: Some(2 << 20),
                    enabled: true,
                    range_known: true,
                }],
                mounts: vec![Mount {
                    dev: DEV,
                    mount_point: "/mnt/xfs".into(),
                    fstype: "xfs".into(),
                    source: "/dev/pmem1".into(),
                    dax: DaxOption::Always,
                    rtdev: None,
                }],
            }),
            Line::Holders(Holders {
                reason: HoldersReason::Resync,
                pids: Some(vec![150, 170]),
                rows: vec![row()],
            }),
            Line::File(FileName {
                dev: DEV,
                ino: 12,
                path: "/mnt/xfs/db".into(),
            }),
            Line::Dropped(Dropped { dropped: 37 }),
            Line::Incident(Incident {
                id: 3,
                time: 1_796_170_496.5,
                kind: IncidentKind::MemoryFailure,
                device: Some("pmem0".into()),
                pfn: Some(0x10_8410),
                result: Some("Recovered".into()),
                action: Some("signal".into()),
                pid: Some(150),
                signal: Some("TERM".into()),
                files: vec![FileRef {
                    dev: DEV,
                    ino: 12,
                    path: Some("/mnt/xfs/db".into()),
                    offset: 65536,
                }],
                holders: vec![row()],
                signalled: vec![150],
                not_signalled: vec![151],
                detail: "memory failure at pfn 0x108410".into(),
            }),
        ]
    }

    fn type_of(json: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["type"].as_str().unwrap().to_string()
    }

    #[test]
    fn every_variant_round_trips() {
        for line in samples() {
            let json = line.to_json();
            let back: Line = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("{json} does not parse back: {e}"));
            assert_eq!(back, line, "{json}");
        }
    }

    #[test]
    fn the_samples_cover_every_type_of_the_schema() {
        let schema: serde_json::Value = serde_json::from_str(&json_schema()).unwrap();
        let mut in_schema: Vec<String> = schema["oneOf"]
            .as_array()
            .expect("the schema is a oneOf of the line types")
            .iter()
            .map(|v| {
                v["properties"]["type"]["const"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no const type in {v}"))
                    .to_string()
            })
            .collect();
        let mut sampled: Vec<String> = samples().iter().map(|l| type_of(&l.to_json())).collect();
        in_schema.sort();
        sampled.sort();
        assert_eq!(sampled, in_schema);
    }

    #[test]
    fn documented_names_are_kept() {
        let types: Vec<String> = samples().iter().map(|l| type_of(&l.to_json())).collect();
        for t in [
            "attached",
            "fault",
            "zap",
            "fork",
            "mremap",
            "device_departing",
            "device_gone",
            "dax_shut_off",
            "fs_notified",
            "memory_failure",
            "memory_failure_result",
            "kernel_sigbus",
            "mmap_denied",
            "enforcement",
            "reconcile",
            "hooks_changed",
            "topology",
            "holders",
            "file",
            "dropped",
            "summary",
            "drain",
            "incident",
        ] {
            assert!(types.iter().any(|x| x == t), "{t} missing");
        }
        // Enforcement is flat, as the monitor always printed it (drain used to nest it).
        let e = samples()
            .into_iter()
            .find(|l| matches!(l, Line::Enforcement(_)))
            .unwrap()
            .to_json();
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["action"], "signal");
        assert_eq!(v["pid"], 150);
        // The kernel's SIGBUS report carries the event's fields at the top level.
        let s = Line::KernelSigbus {
            sigbus: sigbus(),
            cause: "x".into(),
            media_error: None,
        }
        .to_json();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["code"], "BUS_MCEERR_AR");
        assert_eq!(v["cause"], "x");
        // A holder row names its cgroup and container; an unknown pod is left out.
        let v = serde_json::to_value(row()).unwrap();
        assert!(
            v["cgroup"]
                .as_str()
                .unwrap()
                .starts_with("/system.slice/docker-")
        );
        assert_eq!(v["container"]["runtime"], "docker");
        assert_eq!(v["container"]["id"].as_str().unwrap().len(), 64);
        assert!(v.get("pod_uid").is_none());
    }

    #[test]
    fn unknown_types_parse_as_unknown_and_bad_fields_fail() {
        let l: Line = serde_json::from_str(r#"{"type":"from_the_future","x":1}"#).unwrap();
        assert_eq!(l, Line::Unknown);
        assert!(serde_json::from_str::<Line>(r#"{"type":"fault","tgid":1}"#).is_err());
        assert!(serde_json::from_str::<Line>(r#"{"tgid":1}"#).is_err());
    }

    #[test]
    fn the_fixture_parses_with_no_unknown_line() {
        let text = include_str!("../tests/fixtures/monitor-6.12.jsonl");
        let (mut n, mut torn) = (0, Vec::new());
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str::<Line>(l) {
                Ok(line) => {
                    assert_ne!(line, Line::Unknown, "fixture line {}: {l}", i + 1);
                    n += 1;
                }
                // The fixture tears one line on purpose (a crash mid-write): it is not JSON.
                Err(e) if e.is_eof() => torn.push(i + 1),
                Err(e) => panic!("fixture line {}: {e}: {l}", i + 1),
            }
        }
        assert_eq!(torn, [11]);
        assert!(n >= 29, "{n} lines");
    }

    #[test]
    fn checked_in_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/events.schema.json");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == json_schema(),
            "docs/events.schema.json is not the schema of the current types: regenerate it \
             with `DAX_PROBE_EBPF=placeholder cargo run -p dax-probe -- schema > \
             docs/events.schema.json`"
        );
    }
}
