//! "Who maps X?": parsing a target (device, file, mount point, pfn or pfn range) and
//! answering it from a [`HolderMap`].

use std::{os::unix::fs::MetadataExt, path::Path};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::map::{ExtentView, FileKey, HolderMap, Process};
use crate::{
    proc::cgroup::{Cgroup, Container},
    topology::{DevId, Mode, Topology},
};

/// What the operator asked about, resolved against the topology.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Every DAX page of every device.
    All,
    /// A pmem/dax device: the pfns of its data range.
    Device {
        name: String,
        first_pfn: u64,
        end_pfn: u64,
    },
    /// One file (or one device-dax device as a file).
    File { path: String, dev: DevId, ino: u64 },
    /// A mounted DAX file system: every file on it.
    Mount { path: String, dev: DevId },
    /// A pfn range `[first, end)`.
    Pfns { first: u64, end: u64 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error(
        "unknown target {0:?}: not a pmem/dax device, a file, a mount point or a pfn \
         (see `dax-probe devices`)"
    )]
    Unknown(String),
    #[error("{0} is not on a DAX file system (mount it with -o dax, or pick another target)")]
    NotDax(String),
    #[error("{0}: device {1} is {2}, not fsdax or devdax: nothing can map it directly")]
    NotDaxDevice(String, String, String),
    #[error("bad pfn range {0:?}: use 0xSTART, 0xSTART-0xEND or 0xSTART+PAGES")]
    BadPfn(String),
    #[error(
        "pfn range {0:?} goes beyond the largest possible pfn {limit:#x} (52-bit physical \
         addresses)",
        limit = super::map::PFN_LIMIT
    )]
    PfnTooLarge(String),
}

fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Resolves what the operator typed. `root` prefixes paths for tests.
pub fn resolve(arg: &str, topo: &Topology, root: &Path) -> Result<Target, TargetError> {
    if arg == "all" {
        return Ok(Target::All);
    }
    // pfn or pfn range
    if arg.starts_with("0x") || arg.chars().all(|c| c.is_ascii_digit()) {
        let bad = || TargetError::BadPfn(arg.to_string());
        let too_large = || TargetError::PfnTooLarge(arg.to_string());
        let (first, end) = if let Some((a, b)) = arg.split_once('-') {
            (parse_num(a).ok_or_else(bad)?, parse_num(b).ok_or_else(bad)?)
        } else if let Some((a, n)) = arg.split_once('+') {
            let a = parse_num(a).ok_or_else(bad)?;
            let n = parse_num(n).ok_or_else(bad)?;
            (a, a.checked_add(n).ok_or_else(too_large)?)
        } else {
            let a = parse_num(arg).ok_or_else(bad)?;
            (a, a.checked_add(1).ok_or_else(too_large)?)
        };
        if end <= first {
            return Err(bad());
        }
        if end > super::map::PFN_LIMIT {
            return Err(too_large());
        }
        return Ok(Target::Pfns { first, end });
    }
    // device names: pmem0, /dev/pmem0, namespace0.0, pfn0.0, dax0.0, /dev/dax0.0
    let name = arg.strip_prefix("/dev/").unwrap_or(arg);
    if let Some(ns) = topo.namespaces.iter().find(|n| {
        n.name == name
            || n.holder.as_deref() == Some(name)
            || n.block.as_ref().is_some_and(|(b, _)| b == name)
            || n.chardev.as_ref().is_some_and(|(c, _)| c == name)
    }) {
        if !matches!(ns.mode, Mode::Fsdax | Mode::Devdax) {
            return Err(TargetError::NotDaxDevice(
                arg.to_string(),
                ns.device_name().to_string(),
                ns.mode.to_string(),
            ));
        }
        return Ok(Target::Device {
            name: ns.device_name().to_string(),
            first_pfn: ns.data_range.first_pfn(),
            end_pfn: ns.data_range.end_pfn(),
        });
    }
    // files and mount points
    let full = root.join(arg.trim_start_matches('/'));
    let meta = std::fs::metadata(&full).map_err(|_| TargetError::Unknown(arg.to_string()))?;
    let dev = DevId::from_user(meta.dev());
    let mount = topo.mount_of_dev(dev);
    if meta.is_dir() {
        let m = topo
            .mounts
            .iter()
            .find(|m| m.mount_point == arg.trim_end_matches('/') || m.mount_point == arg)
            .ok_or_else(|| TargetError::Unknown(arg.to_string()))?;
        if !m.dax.is_dax() {
            return Err(TargetError::NotDax(arg.to_string()));
        }
        return Ok(Target::Mount {
            path: arg.to_string(),
            dev: m.dev,
        });
    }
    if !mount.is_some_and(|m| m.dax.is_dax()) {
        return Err(TargetError::NotDax(arg.to_string()));
    }
    Ok(Target::File {
        path: arg.to_string(),
        dev,
        ino: meta.ino(),
    })
}

/// Extents matching a target.
pub fn select(map: &HolderMap, t: &Target) -> Vec<ExtentView> {
    match t {
        Target::All => map.all(),
        Target::Device {
            first_pfn, end_pfn, ..
        } => map.in_pfn_range(*first_pfn, *end_pfn),
        Target::Pfns { first, end } => {
            if *end - *first == 1 {
                map.who_maps(*first)
                    .into_iter()
                    .map(|mut v| {
                        let skip = first - v.pfn;
                        v.vaddr += skip << 12;
                        v.offset += skip << 12;
                        v.pfn = *first;
                        v.pages = 1;
                        v
                    })
                    .collect()
            } else {
                map.in_pfn_range(*first, *end)
            }
        }
        Target::File { dev, ino, .. } => {
            let key = FileKey {
                dev: *dev,
                ino: *ino,
            };
            map.all().into_iter().filter(|v| v.file == key).collect()
        }
        Target::Mount { dev, .. } => map
            .all()
            .into_iter()
            .filter(|v| v.file.dev == *dev)
            .collect(),
    }
}

/// How many addresses a row carries for the re-check (see [`HolderRow::probe_at`]).
pub const PROBES: usize = 4;

/// One holder of one file, as `holders` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HolderRow {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub dev: DevId,
    pub ino: u64,
    /// Path as the process's maps name it, when it still can.
    pub file: Option<String>,
    pub pages: u64,
    /// Byte ranges of the file (or device) held: `[start, end)`.
    pub offsets: Vec<(u64, u64)>,
    /// Every extent, when asked for (`--pages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extents: Option<Vec<RowExtent>>,
    /// Virtual addresses of the first page of up to [`PROBES`] held extents: where the
    /// re-check before a signal looks first (one page-table entry or one vma each,
    /// instead of the whole maps). Never printed; empty when not known (a recording).
    #[serde(skip)]
    pub probe_at: Vec<u64>,
    /// The process's cgroup path (/proc/PID/cgroup), when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The container the cgroup path names, when it follows a known runtime's layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    /// The Kubernetes pod UID the cgroup path names (with dashes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl HolderRow {
    /// Copies what the process's cgroup says into the row.
    pub fn set_cgroup(&mut self, c: &Cgroup) {
        self.cgroup = Some(c.path.clone());
        self.container = c.container.clone();
        self.pod_uid = c.pod_uid.clone();
    }

    /// Is the row's process selected by `holders --cgroup PATTERN` (see
    /// [`crate::proc::cgroup::matches`])? A row whose cgroup is unknown never is.
    pub fn in_cgroup(&self, pattern: &str) -> bool {
        self.cgroup.as_deref().is_some_and(|path| {
            crate::proc::cgroup::matches(
                pattern,
                path,
                self.container.as_ref().map(|c| c.id.as_str()),
                self.pod_uid.as_deref(),
            )
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RowExtent {
    pub vaddr: u64,
    pub pfn: u64,
    pub offset: u64,
    pub pages: u64,
}

/// Why a row (from a recording) lists pages no agent could have reported, if it does.
pub fn check_row(r: &HolderRow) -> Result<(), String> {
    for e in r.extents.iter().flatten() {
        if e.pages == 0 || e.pages > super::map::MAX_EXTENT_PAGES {
            return Err(format!(
                "pid {}: an extent of {} pages (1 to {} in a row)",
                r.pid,
                e.pages,
                super::map::MAX_EXTENT_PAGES
            ));
        }
        super::map::check_pages(e.vaddr >> 12, e.pfn, e.pages)
            .map_err(|m| format!("pid {}: {m}", r.pid))?;
        if e.offset.checked_add(e.pages << 12).is_none() {
            return Err(format!("pid {}: file offset {:#x} wraps", r.pid, e.offset));
        }
    }
    Ok(())
}

/// Groups extents into one row per (process, file), sorted by pid. Every process sharing
/// an address space gets a row of its own: each holds every page of it.
pub fn rows(map: &HolderMap, extents: &[ExtentView], with_extents: bool) -> Vec<HolderRow> {
    let mut groups: std::collections::BTreeMap<(u32, FileKey), (Process, Vec<&ExtentView>)> =
        Default::default();
    for v in extents {
        if let Some(h) = map.info(v.holder) {
            for p in h.processes() {
                groups
                    .entry((p.tgid, v.file))
                    .or_insert_with(|| (p, Vec::new()))
                    .1
                    .push(v);
            }
        }
    }
    groups
        .into_iter()
        .map(|((tgid, file), (h, mut vs))| {
            // The cgroup is known for the process an address space is named by (sharers:
            // not read, never guessed).
            let cg = map
                .info(vs[0].holder)
                .filter(|a| a.tgid == tgid && a.start_time == h.start_time)
                .and_then(|a| a.cgroup.as_deref());
            vs.sort_by_key(|v| v.offset);
            let mut offsets: Vec<(u64, u64)> = Vec::new();
            for v in &vs {
                let (s, e) = (v.offset, v.offset + (v.pages << 12));
                match offsets.last_mut() {
                    Some(last) if last.1 >= s => last.1 = last.1.max(e),
                    _ => offsets.push((s, e)),
                }
            }
            HolderRow {
                pid: tgid,
                start_time: h.start_time,
                comm: h.comm.clone(),
                dev: file.dev,
                ino: file.ino,
                file: None,
                pages: vs.iter().map(|v| v.pages).sum(),
                offsets,
                extents: with_extents.then(|| {
                    vs.iter()
                        .map(|v| RowExtent {
                            vaddr: v.vaddr,
                            pfn: v.pfn,
                            offset: v.offset,
                            pages: v.pages,
                        })
                        .collect()
                }),
                probe_at: vs.iter().take(PROBES).map(|v| v.vaddr).collect(),
                cgroup: cg.map(|c| c.path.clone()),
                container: cg.and_then(|c| c.container.clone()),
                pod_uid: cg.and_then(|c| c.pod_uid.clone()),
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::topology::{DaxOption, Mount, Namespace, PhysRange};

    /// pmem0: pfns 0x100800..0x120000, ext4 with dax=always on /mnt/ext4.
    pub(crate) fn topo() -> Topology {
        Topology {
            dm: Vec::new(),
            namespaces: vec![Namespace {
                name: "namespace0.0".into(),
                region: "region0".into(),
                mode: Mode::Fsdax,
                holder: Some("pfn0.0".into()),
                namespace_range: PhysRange {
                    start: 0x1_0000_0000,
                    end: 0x1_2000_0000,
                },
                data_range: PhysRange {
                    start: 0x1_0080_0000,
                    end: 0x1_2000_0000,
                },
                block: Some((
                    "pmem0".into(),
                    DevId {
                        major: 259,
                        minor: 0,
                    },
                )),
                chardev: None,
                align: Some(2 << 20),
                enabled: true,
                range_known: true,
            }],
            mounts: vec![Mount {
                dev: DevId {
                    major: 259,
                    minor: 0,
                },
                mount_point: "/mnt/ext4".into(),
                fstype: "ext4".into(),
                source: "/dev/pmem0".into(),
                dax: DaxOption::Always,
                rtdev: None,
            }],
        }
    }

    #[test]
    fn resolves_devices_by_every_name() {
        let t = topo();
        let root = Path::new("/nonexistent");
        for name in ["pmem0", "/dev/pmem0", "namespace0.0", "pfn0.0"] {
            match resolve(name, &t, root).unwrap() {
                Target::Device {
                    name, first_pfn, ..
                } => {
                    assert_eq!(name, "pmem0");
                    assert_eq!(first_pfn, 0x100800);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn pfn_targets_beyond_physical_memory_are_refused_not_wrapped() {
        let t = topo();
        let root = Path::new("/");
        for arg in [
            "0x0-0xffffffffffffffff",
            "0xffffffffffffffff",
            "0xffffffffffffffff+2",
            "0x10000000000",
        ] {
            assert_eq!(
                resolve(arg, &t, root),
                Err(TargetError::PfnTooLarge(arg.into())),
                "{arg}"
            );
        }
        assert!(resolve("0x0-0x10000000000", &t, root).is_ok());
    }

    #[test]
    fn crafted_rows_are_refused() {
        let row = |pages, pfn, vaddr| HolderRow {
            pid: 9,
            start_time: 1,
            comm: "x".into(),
            dev: DevId { major: 1, minor: 2 },
            ino: 3,
            file: None,
            pages,
            offsets: vec![],
            probe_at: Vec::new(),
            extents: Some(vec![RowExtent {
                vaddr,
                pfn,
                offset: 0,
                pages,
            }]),
            cgroup: None,
            container: None,
            pod_uid: None,
        };
        assert!(check_row(&row(512, 0x100800, 0x7000_0000)).is_ok());
        assert!(check_row(&row(1 << 40, 0x100800, 0x7000_0000)).is_err());
        assert!(check_row(&row(0, 0x100800, 0x7000_0000)).is_err());
        assert!(check_row(&row(1, u64::MAX, 0x7000_0000)).is_err());
        assert!(check_row(&row(2, 0x100800, u64::MAX - 4095)).is_err());
    }

    #[test]
    fn resolves_pfns_and_ranges() {
        let t = topo();
        let root = Path::new("/");
        assert_eq!(
            resolve("0x100800", &t, root).unwrap(),
            Target::Pfns {
                first: 0x100800,
                end: 0x100801
            }
        );
        assert_eq!(
            resolve("0x1000-0x2000", &t, root).unwrap(),
            Target::Pfns {
                first: 0x1000,
                end: 0x2000
            }
        );
        assert_eq!(
            resolve("0x1000+16", &t, root).unwrap(),
            Target::Pfns {
                first: 0x1000,
                end: 0x1010
            }
        );
        assert!(matches!(
            resolve("0x2000-0x1000", &t, root),
            Err(TargetError::BadPfn(_))
        ));
        assert!(matches!(
            resolve("0xzz", &t, root),
            Err(TargetError::BadPfn(_))
        ));
    }

    #[test]
    fn unknown_and_non_dax_targets_are_refused() {
        let t = topo();
        let root = Path::new("/");
        assert!(matches!(
            resolve("nvme0n1", &t, root),
            Err(TargetError::Unknown(_))
        ));
        // /proc is a directory but not a DAX mount in this topology.
        assert!(matches!(
            resolve("/proc", &t, root),
            Err(TargetError::Unknown(_))
        ));
        // A regular file on a non-DAX file system.
        assert!(matches!(
            resolve("/etc/hostname", &t, root),
            Err(TargetError::NotDax(_))
        ));
        let mut raw = topo();
        raw.namespaces[0].mode = Mode::Raw;
        assert!(matches!(
            resolve("pmem0", &raw, root),
            Err(TargetError::NotDaxDevice(..))
        ));
    }
}
