//! What the kernel itself builds on a pmem device: device-mapper devices
//! (`/sys/block/pmemN/holders/dm-X`, their members in `slaves/`, their table through the
//! control device) and the file systems mounted on it directly, through dm, or as an XFS
//! realtime device (`rtdev=` in mountinfo).
//!
//! This is the view of users above a device; which device a *page* belongs to stays
//! physical (`Topology::namespace_of_pfn`): a page belongs to the member whose range holds
//! its pfn, whatever stack sits above.

use std::{fs, path::Path};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{DevId, Mount, Namespace, Topology, dm::DmTarget};

/// A device-mapper device built on pmem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DmDevice {
    /// `dm-0`
    pub node: String,
    /// Its name (`/dev/mapper/NAME`), from `/sys/block/dm-X/dm/name`.
    pub name: String,
    pub dev: DevId,
    /// Its members (`slaves/`): `pmem0`, `pmem1`, `loop0`, `dm-1`, …
    pub members: Vec<String>,
    /// Its table; None when it could not be read (`table_error` says why: it needs root).
    pub table: Option<Vec<DmTarget>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_error: Option<String>,
}

/// How a file system uses a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Its data device (mounted on it, or on a dm device above it).
    Data,
    /// XFS realtime device (`rtdev=`).
    Realtime,
}

/// A file system that uses a device, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsUser<'a> {
    pub mount: &'a Mount,
    pub role: Role,
    /// The dm device between the mount and the device, when there is one.
    pub via: Option<&'a DmDevice>,
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Reads every dm device that holds one of `namespaces`' block devices, directly or through
/// another dm device. Tables come from `table` (the control device live; fixtures in tests).
pub(super) fn read_dm(
    root: &Path,
    namespaces: &[Namespace],
    table: &dyn Fn(&str) -> std::io::Result<Vec<DmTarget>>,
) -> Vec<DmDevice> {
    let block = root.join("sys/block");
    let mut todo: Vec<String> = namespaces
        .iter()
        .filter_map(|n| n.block.as_ref().map(|(b, _)| b.clone()))
        .collect();
    let mut out: Vec<DmDevice> = Vec::new();
    // Depth is bounded by the number of dm devices; a crafted holders/ loop ends when
    // every node was seen.
    while let Some(dev) = todo.pop() {
        for node in entries(&block.join(&dev).join("holders")) {
            if !node.starts_with("dm-") || out.iter().any(|d| d.node == node) {
                continue;
            }
            let dir = block.join(&node);
            let name = read_trim(&dir.join("dm/name")).unwrap_or_else(|| node.clone());
            let Some(devid) = read_trim(&dir.join("dev")).and_then(|s| DevId::parse(&s)) else {
                continue;
            };
            let (table, table_error) = match table(&name) {
                Ok(t) => (Some(t), None),
                Err(e) => (None, Some(e.to_string())),
            };
            out.push(DmDevice {
                members: entries(&dir.join("slaves")),
                node: node.clone(),
                name,
                dev: devid,
                table,
                table_error,
            });
            todo.push(node);
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

/// The block device name a mount option path names: `/dev/pmem1` → `pmem1`,
/// `/dev/mapper/NAME` → the dm device's node (`dm-0`).
fn node_of_path<'a>(path: &'a str, dms: &'a [DmDevice]) -> &'a str {
    if let Some(name) = path.strip_prefix("/dev/mapper/")
        && let Some(d) = dms.iter().find(|d| d.name == name)
    {
        return &d.node;
    }
    path.rsplit('/').next().unwrap_or(path)
}

impl Topology {
    /// The dm devices built on `ns`, nearest first (a dm over a dm over pmem lists both).
    pub fn dm_above(&self, ns: &Namespace) -> Vec<&DmDevice> {
        let Some((block, _)) = &ns.block else {
            return Vec::new();
        };
        let mut names = vec![block.as_str()];
        let mut out: Vec<&DmDevice> = Vec::new();
        while let Some(n) = names.pop() {
            for d in &self.dm {
                if d.members.iter().any(|m| m == n) && !out.iter().any(|o| o.node == d.node) {
                    out.push(d);
                    names.push(&d.node);
                }
            }
        }
        out
    }

    /// Every file system that uses `ns`: mounted on it, on a dm device above it, or with it
    /// as XFS realtime device.
    pub fn fs_users(&self, ns: &Namespace) -> Vec<FsUser<'_>> {
        let Some((block, dev)) = &ns.block else {
            return Vec::new();
        };
        let above = self.dm_above(ns);
        let mut out = Vec::new();
        for m in &self.mounts {
            if m.dev == *dev {
                out.push(FsUser {
                    mount: m,
                    role: Role::Data,
                    via: None,
                });
            } else if let Some(d) = above.iter().find(|d| d.dev == m.dev) {
                out.push(FsUser {
                    mount: m,
                    role: Role::Data,
                    via: Some(d),
                });
            }
            if let Some(rt) = &m.rtdev {
                let node = node_of_path(rt, &self.dm);
                if node == block {
                    out.push(FsUser {
                        mount: m,
                        role: Role::Realtime,
                        via: None,
                    });
                } else if let Some(d) = above.iter().find(|d| d.node == node) {
                    out.push(FsUser {
                        mount: m,
                        role: Role::Realtime,
                        via: Some(d),
                    });
                }
            }
        }
        out
    }

    /// The device numbers of everything above `ns` that user space opens files through:
    /// its dm devices and the data devices of file systems using it (an XFS realtime file's
    /// `st_dev` is the data device's). What a fence of `ns` must cover besides its own.
    pub fn devices_above(&self, ns: &Namespace) -> Vec<DevId> {
        let mut v: Vec<DevId> = self.dm_above(ns).iter().map(|d| d.dev).collect();
        for u in self.fs_users(ns) {
            v.push(u.mount.dev);
        }
        let own = ns.devices();
        v.retain(|d| !own.contains(d));
        v.sort();
        v.dedup();
        v
    }

    /// Is `dev` a live DAX block device: an enabled fsdax namespace, or a dm device whose
    /// members are all enabled fsdax namespaces (through nested dm devices too)? A dm device
    /// that lost a member (its `slaves/` entry goes with the member's disk) is not: its
    /// pages on the departed member belong to no device any more.
    pub fn live_dax_block(&self, dev: DevId) -> bool {
        if let Some(n) = self.namespace_of_block(dev) {
            return n.enabled && n.mode == super::Mode::Fsdax;
        }
        self.dm.iter().find(|d| d.dev == dev).is_some_and(|d| {
            !d.members.is_empty()
                && self.non_dax_members(d).is_empty()
                && self.pmem_members(d).iter().all(|n| n.enabled)
        })
    }

    /// The namespace behind a block device name (`pmem1`).
    pub fn namespace_of_block_name(&self, name: &str) -> Option<&Namespace> {
        self.namespaces
            .iter()
            .find(|n| n.block.as_ref().is_some_and(|(b, _)| b == name))
    }

    /// The members of `d` that are not fsdax pmem (a loop or SCSI disk, a raw or sector
    /// namespace): with one of them no file system above `d` gets DAX.
    pub fn non_dax_members<'a>(&self, d: &'a DmDevice) -> Vec<&'a str> {
        d.members
            .iter()
            .filter(|m| {
                // A dm member is judged by its own members.
                if let Some(inner) = self.dm.iter().find(|x| &x.node == *m) {
                    return !self.non_dax_members(inner).is_empty();
                }
                !self
                    .namespace_of_block_name(m)
                    .is_some_and(|n| n.mode == super::Mode::Fsdax)
            })
            .map(|m| m.as_str())
            .collect()
    }

    /// The members of `d` that are pmem namespaces, through nested dm devices too.
    pub fn pmem_members(&self, d: &DmDevice) -> Vec<&Namespace> {
        let mut out = Vec::new();
        for m in &d.members {
            if let Some(inner) = self.dm.iter().find(|x| &x.node == m) {
                out.extend(self.pmem_members(inner));
            } else if let Some(n) = self.namespace_of_block_name(m) {
                out.push(n);
            }
        }
        out
    }

    /// The namespaces a realtime device path of a mount names (directly or through dm).
    pub fn realtime_namespaces(&self, m: &Mount) -> Vec<&Namespace> {
        let Some(rt) = &m.rtdev else {
            return Vec::new();
        };
        let node = node_of_path(rt, &self.dm);
        if let Some(d) = self.dm.iter().find(|d| d.node == node) {
            return self.pmem_members(d);
        }
        self.namespace_of_block_name(node).into_iter().collect()
    }
}

/// One line about a dm device: `dm-0 (stack0, 253:0): linear pmem0+0 pmem1+0`.
pub fn describe_dm(topo: &Topology, d: &DmDevice) -> String {
    let name_of = |dev: DevId| {
        topo.namespaces
            .iter()
            .find_map(|n| n.block.as_ref().filter(|(_, b)| *b == dev).map(|(b, _)| b))
            .cloned()
            .or_else(|| {
                topo.dm
                    .iter()
                    .find(|x| x.dev == dev)
                    .map(|x| x.node.clone())
            })
            .unwrap_or_else(|| dev.to_string())
    };
    let table = match &d.table {
        Some(t) if t.is_empty() => "no table loaded".to_string(),
        Some(t) => t
            .iter()
            .map(|t| {
                let members: Vec<String> = t
                    .members()
                    .into_iter()
                    .map(|(dev, off)| format!("{}+{off}", name_of(dev)))
                    .collect();
                let chunk = t
                    .chunk_sectors()
                    .map(|c| format!(" chunk {c}"))
                    .unwrap_or_default();
                format!(
                    "{} {}+{}{chunk}: {}",
                    t.target_type,
                    t.start,
                    t.length,
                    if members.is_empty() {
                        t.params.clone()
                    } else {
                        members.join(" ")
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        None => format!(
            "members {} (table unknown: {})",
            d.members.join(" "),
            d.table_error.as_deref().unwrap_or("not read")
        ),
    };
    format!("{} ({}, {}): {table}", d.node, d.name, d.dev)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::topology::{Mode, parse_mountinfo};

    fn w(root: &Path, p: &str, v: &str) {
        let p = root.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, format!("{v}\n")).unwrap();
    }

    /// Two fsdax namespaces (pmem0 259:0, pmem1 259:1), a raw one (pmem2 259:2), as the
    /// sysfs fixture of `sysfs.rs` writes them.
    pub(crate) fn namespaces(root: &Path) {
        for (i, mode, holder) in [(0, "memory", true), (1, "memory", true), (2, "raw", false)] {
            let nd = "sys/bus/nd/devices";
            let base = 0x1_0000_0000u64 + i * 0x2000_0000;
            w(
                root,
                &format!("{nd}/namespace{i}.0/resource"),
                &format!("{base:#x}"),
            );
            w(root, &format!("{nd}/namespace{i}.0/size"), "534773760");
            w(root, &format!("{nd}/namespace{i}.0/mode"), mode);
            if holder {
                w(
                    root,
                    &format!("{nd}/namespace{i}.0/holder"),
                    &format!("pfn{i}.0"),
                );
                w(
                    root,
                    &format!("{nd}/pfn{i}.0/resource"),
                    &format!("{:#x}", base + 0x80_0000),
                );
                w(root, &format!("{nd}/pfn{i}.0/size"), "526385152");
                w(
                    root,
                    &format!("{nd}/pfn{i}.0/block/pmem{i}/dev"),
                    &format!("259:{i}"),
                );
                fs::create_dir_all(root.join(format!("{nd}/pfn{i}.0/driver"))).unwrap();
            } else {
                w(
                    root,
                    &format!("{nd}/namespace{i}.0/block/pmem{i}/dev"),
                    &format!("259:{i}"),
                );
            }
            fs::create_dir_all(root.join(format!("sys/block/pmem{i}/holders"))).unwrap();
        }
    }

    /// dm device `name` (node dm-`n`, 253:`n`) over `members`.
    pub(crate) fn dm(root: &Path, n: u32, name: &str, members: &[&str]) {
        w(root, &format!("sys/block/dm-{n}/dm/name"), name);
        w(root, &format!("sys/block/dm-{n}/dev"), &format!("253:{n}"));
        for m in members {
            fs::create_dir_all(root.join(format!("sys/block/dm-{n}/slaves/{m}"))).unwrap();
            fs::create_dir_all(root.join(format!("sys/block/{m}/holders/dm-{n}"))).unwrap();
        }
    }

    fn tables(name: &str) -> std::io::Result<Vec<DmTarget>> {
        let lin = |start, dev: &str| DmTarget {
            start,
            length: 1_028_096,
            target_type: "linear".into(),
            params: format!("{dev} 0"),
        };
        match name {
            "lin" => Ok(vec![lin(0, "259:0"), lin(1_028_096, "259:1")]),
            "top" => Ok(vec![lin(0, "253:0")]),
            _ => Err(std::io::Error::from_raw_os_error(libc::EACCES)),
        }
    }

    fn read(root: &Path, mountinfo: &str) -> Topology {
        let namespaces = crate::topology::sysfs::read_namespaces(root);
        Topology {
            dm: read_dm(root, &namespaces, &tables),
            namespaces,
            mounts: parse_mountinfo(mountinfo),
        }
    }

    #[test]
    fn a_linear_stack_over_two_members_names_both_and_its_mount() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        namespaces(root);
        dm(root, 0, "lin", &["pmem0", "pmem1"]);
        let t = read(
            root,
            "30 1 253:0 / /mnt/lin rw - ext4 /dev/mapper/lin rw,dax\n\
             31 1 259:2 / /mnt/raw rw - ext4 /dev/pmem2 rw\n",
        );
        assert_eq!(t.dm.len(), 1);
        let d = &t.dm[0];
        assert_eq!((d.node.as_str(), d.name.as_str()), ("dm-0", "lin"));
        assert_eq!(d.members, ["pmem0", "pmem1"]);
        assert_eq!(d.table.as_ref().unwrap().len(), 2);
        let pmem1 = t.namespace_of_block_name("pmem1").unwrap();
        let users = t.fs_users(pmem1);
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].mount.mount_point, "/mnt/lin");
        assert_eq!(users[0].role, Role::Data);
        assert_eq!(users[0].via.unwrap().name, "lin");
        assert_eq!(
            t.devices_above(pmem1),
            [DevId {
                major: 253,
                minor: 0
            }]
        );
        assert!(t.non_dax_members(d).is_empty());
        assert!(t.live_dax_block(d.dev));
        assert_eq!(
            describe_dm(&t, d),
            "dm-0 (lin, 253:0): linear 0+1028096: pmem0+0; linear 1028096+1028096: pmem1+0"
        );
        // The raw namespace is used by nobody above it.
        let pmem2 = t.namespace_of_block_name("pmem2").unwrap();
        assert!(t.dm_above(pmem2).is_empty());
        assert_eq!(t.fs_users(pmem2)[0].role, Role::Data);
    }

    #[test]
    fn nested_dm_non_dax_members_and_unreadable_tables() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        namespaces(root);
        dm(root, 0, "lin", &["pmem0", "pmem2"]);
        dm(root, 1, "top", &["dm-0"]);
        dm(root, 2, "secret", &["pmem1", "loop0"]);
        // A crafted loop in holders/ must end.
        fs::create_dir_all(root.join("sys/block/dm-1/holders/dm-0")).unwrap();
        let t = read(
            root,
            "30 1 253:1 / /mnt/top rw - xfs /dev/mapper/top rw,dax=always\n",
        );
        assert_eq!(t.dm.len(), 3);
        let pmem0 = t.namespace_of_block_name("pmem0").unwrap();
        let above: Vec<&str> = t.dm_above(pmem0).iter().map(|d| d.name.as_str()).collect();
        assert_eq!(above, ["lin", "top"]);
        assert_eq!(t.fs_users(pmem0)[0].via.unwrap().name, "top");
        assert_eq!(t.non_dax_members(&t.dm[0]), ["pmem2"]);
        assert_eq!(t.non_dax_members(&t.dm[1]), ["dm-0"]);
        assert_eq!(t.non_dax_members(&t.dm[2]), ["loop0"]);
        assert_eq!(t.pmem_members(&t.dm[1]).len(), 2);
        // A stack with a raw member is no DAX device, nor is one above it.
        assert!(!t.live_dax_block(t.dm[0].dev));
        assert!(!t.live_dax_block(t.dm[1].dev));
        let secret = &t.dm[2];
        assert!(secret.table.is_none());
        assert!(describe_dm(&t, secret).contains("members loop0 pmem1 (table unknown:"));
    }

    #[test]
    fn an_xfs_realtime_device_is_a_role_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        namespaces(root);
        let t = read(
            root,
            "30 1 259:0 / /mnt/rt rw - xfs /dev/pmem0 rw,attr2,dax=always,rtdev=/dev/pmem1,noquota\n",
        );
        let pmem0 = t.namespace_of_block_name("pmem0").unwrap();
        let pmem1 = t.namespace_of_block_name("pmem1").unwrap();
        assert_eq!(t.fs_users(pmem0)[0].role, Role::Data);
        let rt = t.fs_users(pmem1);
        assert_eq!(rt.len(), 1);
        assert_eq!(rt[0].role, Role::Realtime);
        assert_eq!(rt[0].mount.mount_point, "/mnt/rt");
        // A realtime file's st_dev is the data device: the fence of pmem1 covers it.
        assert_eq!(
            t.devices_above(pmem1),
            [DevId {
                major: 259,
                minor: 0
            }]
        );
        assert_eq!(t.realtime_namespaces(rt[0].mount)[0].name, "namespace1.0");
        assert_eq!(
            t.namespace_of_block_name("pmem1").unwrap().mode,
            Mode::Fsdax
        );
    }
}
