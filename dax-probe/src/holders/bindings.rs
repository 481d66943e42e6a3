//! Which binding of a device a mapping belongs to. A device unbound and bound again is
//! live on the same physical range, but a mapping made through its old binding is not: its
//! file's superblock (or its `/dev/daxX.Y` inode) belongs to the binding that left. These
//! tell the two apart from sysfs, /dev, /proc/iomem and /proc/PID/maps alone; `audit` and
//! the monitor's `device_rebound` both ask them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use crate::{
    holders::scan::{Procfs, Vma},
    topology::{DevId, Topology},
};

/// What a mapping is checked against besides departed ranges: which device numbers the
/// kernel has now, which inode each live `/dev/daxX.Y` node is, and where persistent memory
/// lies at all. A rebound device's pfns are live again; the mapping of its old binding is
/// not, and these tell the two apart.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    /// Block device numbers that exist now (`/sys/dev/block`). Empty when unreadable: the
    /// check is then not made.
    pub live_blocks: BTreeSet<DevId>,
    /// `dax0.0` → (st_dev, st_ino) of `/dev/dax0.0` now.
    pub dax_nodes: BTreeMap<String, (DevId, u64)>,
    /// Every pfn range of persistent memory: each namespace's (bound or not) and /proc/iomem's.
    pub pmem: Vec<(u64, u64)>,
}

impl Bindings {
    pub fn read(root: &Path, topo: &Topology) -> Self {
        let live_blocks = std::fs::read_dir(root.join("sys/dev/block"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| DevId::parse(&e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        let dax_nodes = topo
            .namespaces
            .iter()
            .filter(|n| n.enabled)
            .filter_map(|n| n.chardev.as_ref())
            .filter_map(|(name, _)| {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(root.join("dev").join(name)).ok()?;
                Some((name.clone(), (DevId::from_user(m.dev()), m.ino())))
            })
            .collect();
        let mut pmem: Vec<(u64, u64)> = topo
            .namespaces
            .iter()
            .filter(|n| n.range_known)
            .map(|n| (n.namespace_range.first_pfn(), n.namespace_range.end_pfn()))
            .collect();
        pmem.extend(iomem_pmem(root));
        Self {
            live_blocks,
            dax_nodes,
            pmem,
        }
    }

    pub fn is_pmem(&self, pfn: u64) -> bool {
        self.pmem.iter().any(|&(s, e)| pfn >= s && pfn < e)
    }
}

/// Top-level "Persistent Memory" ranges of /proc/iomem, in pfns (none when the addresses
/// are hidden: not root).
pub fn iomem_pmem(root: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(root.join("proc/iomem"))
        .map(|t| parse_iomem_pmem(&t))
        .unwrap_or_default()
}

/// The "Persistent Memory" ranges of an iomem text, `[first pfn, end pfn)`. A `--root` tree
/// can hand over any text: an inverted range is dropped, and an end at the top of the
/// address space does not overflow (found by the procfs_text fuzz target's iomem arm).
pub fn parse_iomem_pmem(iomem: &str) -> Vec<(u64, u64)> {
    iomem
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let (range, what) = l.split_once(" : ")?;
            if !what.starts_with("Persistent Memory") {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            let (s, e) = (
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            );
            // The last byte's page, plus one: at most 2^52, so it fits.
            let end = ((u128::from(e) + 1) >> 12) as u64;
            (e != 0 && s <= e).then_some((s >> 12, end))
        })
        .collect()
}

/// The device whose binding a mapping's file belonged to, when that binding is gone: a
/// device-dax node that is gone or was replaced by a new binding's (another inode), or a
/// file whose superblock's block device no longer exists. The last is the robust signal
/// for a rebound fsdax device: the departed superblock keeps its block device open, so the
/// kernel does not hand its number to the new binding, and /proc/PID/maps goes on naming
/// it; the mount table may not (the mount can be detached).
///
/// `dax_evidence`: for a file whose device number is gone, whether it must also be under a
/// DAX mount to count (true when the page tables are not read: a plain file on a pulled
/// disk looks the same in /proc/PID/maps).
pub fn departed_file(topo: &Topology, b: &Bindings, v: &Vma, dax_evidence: bool) -> Option<String> {
    if let Some(rest) = v.path.strip_prefix("/dev/dax") {
        let (name, deleted) = match rest.strip_suffix(" (deleted)") {
            Some(n) => (format!("dax{n}"), true),
            None => (format!("dax{rest}"), false),
        };
        let live = topo.namespaces.iter().any(|n| {
            n.enabled
                && n.chardev
                    .as_ref()
                    .is_some_and(|(c, _)| c.strip_prefix("dax") == name.strip_prefix("dax"))
        });
        if !live {
            return Some(name);
        }
        let replaced = deleted
            || b.dax_nodes
                .get(&name)
                .is_some_and(|&(dev, ino)| (dev, ino) != (v.dev, v.ino));
        return replaced.then(|| format!("{name}, an earlier binding"));
    }
    let mount = topo.mount_of_dev(v.dev).filter(|m| m.dax.is_dax());
    let name = || {
        mount
            .map(|m| m.source.trim_start_matches("/dev/").to_string())
            .unwrap_or_else(|| format!("device {}", v.dev))
    };
    if v.dev.major != 0 && !b.live_blocks.is_empty() && !b.live_blocks.contains(&v.dev) {
        if dax_evidence && mount.is_none() {
            return None;
        }
        return Some(format!("{} (its block device {} is gone)", name(), v.dev));
    }
    mount?;
    // On dm over pmem: departed when any member did.
    let live = topo.live_dax_block(v.dev);
    (!live).then(name)
}

/// Every mapping of a binding of `device` (`pmem0`, `dax0.0`) that is gone, from
/// /proc/PID/maps alone (no page table is read): what a monitor names when that device
/// comes back. A file's old binding is named by its (DAX) mount's source, which keeps the
/// device's name; mappings of other gone bindings are not this device's.
pub fn old_binding_vmas(
    proc: &dyn Procfs,
    topo: &Topology,
    b: &Bindings,
    device: &str,
) -> Vec<(u32, Vma)> {
    let of_device = |v: &Vma| match v.path.strip_prefix("/dev/") {
        Some(rest) if rest.starts_with("dax") => rest.trim_end_matches(" (deleted)") == device,
        _ => topo
            .mount_of_dev(v.dev)
            .is_some_and(|m| m.source.trim_start_matches("/dev/") == device),
    };
    let mut out = Vec::new();
    for pid in proc.pids() {
        let Ok(maps) = proc.maps(pid) else { continue };
        for v in maps
            .into_iter()
            .filter(|v| v.ino != 0 || v.path.starts_with("/dev/dax"))
        {
            if of_device(&v) && departed_file(topo, b, &v, true).is_some() {
                out.push((pid, v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_iomem_ranges_neither_overflow_nor_invert() {
        let t = "100000000-13fffffff : Persistent Memory\n\
                 ffffffffff000-ffffffffffffffff : Persistent Memory (legacy)\n\
                 200000000-1ffffffff : Persistent Memory\n\
                 \x20 100000000-100000fff : namespace0.0\n\
                 0-0 : Persistent Memory\n";
        assert_eq!(
            parse_iomem_pmem(t),
            [(0x10_0000, 0x14_0000), (0xff_ffff_ffff, 1 << 52)]
        );
    }
}
