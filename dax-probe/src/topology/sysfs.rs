//! libnvdimm topology from `/sys/bus/nd/devices` and `/sys/bus/dax/devices`.
//!
//! A namespace (`namespaceX.Y`) is either used raw (block device `pmemX` on the namespace),
//! or claimed by a "holder" that gives it a personality: `pfnX.Y` (fsdax: block device with
//! struct pages), `daxX.Y` (devdax: character device) or `bttX.Y` (sector mode). The
//! holder's `resource`/`size` give the part of the namespace that user mappings reach.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::{DevId, Mode, Namespace, PhysRange};

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn read_u64(p: &Path) -> Option<u64> {
    let s = read_trim(p)?;
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn range(dir: &Path) -> Option<PhysRange> {
    let start = read_u64(&dir.join("resource"))?;
    let size = read_u64(&dir.join("size"))?;
    Some(PhysRange {
        start,
        end: start + size,
    })
}

/// The single entry of `dir/<sub>/` (e.g. `pfn0.0/block/pmem0`) with its `dev` number.
fn child_dev(dir: &Path, sub: &str) -> Option<(String, DevId)> {
    let entries = fs::read_dir(dir.join(sub)).ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(dev) = read_trim(&e.path().join("dev")).and_then(|s| DevId::parse(&s)) {
            return Some((name, dev));
        }
    }
    None
}

/// The devdax character device under an nd `daxX.Y` holder. Depending on the kernel it is a
/// child directory in the dax bus class (`daxX.Y/daxX.Y/dev`) or only visible in
/// `/sys/bus/dax/devices`.
fn devdax_char(root: &Path, holder_dir: &Path, holder: &str) -> Option<(String, DevId)> {
    if let Some(found) = child_dev(holder_dir, "dax") {
        return Some(found);
    }
    if let Ok(entries) = fs::read_dir(holder_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("dax")
                && let Some(dev) = read_trim(&e.path().join("dev")).and_then(|s| DevId::parse(&s))
            {
                return Some((name, dev));
            }
        }
    }
    let p = root.join("sys/bus/dax/devices").join(holder);
    read_trim(&p.join("dev"))
        .and_then(|s| DevId::parse(&s))
        .map(|d| (holder.to_string(), d))
}

fn has_driver(dir: &Path) -> bool {
    dir.join("driver").exists()
}

/// The driver a device is bound to (`dir/driver` links to `.../drivers/NAME`).
pub(super) fn driver_name(dir: &Path) -> Option<String> {
    fs::read_link(dir.join("driver"))
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The personality a device-dax device's driver on the dax bus gives it: `device_dax` makes
/// `/dev/daxX.Y` mappable, `kmem` makes the memory System RAM. Any other driver (or none)
/// leaves it devdax by mode; `doctor` says what is observable for each.
fn dax_bus_mode(root: &Path, chardev: &str) -> Mode {
    match driver_name(&root.join("sys/bus/dax/devices").join(chardev)).as_deref() {
        Some("kmem") => Mode::SystemRam,
        _ => Mode::Devdax,
    }
}

pub(super) fn read_namespaces(root: &Path) -> Vec<Namespace> {
    let bus = root.join("sys/bus/nd/devices");
    let Ok(entries) = fs::read_dir(&bus) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("namespace"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let dir: PathBuf = bus.join(&name);
        // `resource` is root-only: without it the range is unknown but the namespace is
        // still worth listing (size and mode are world-readable).
        let size = read_u64(&dir.join("size")).unwrap_or(0);
        if size == 0 {
            // An unconfigured seed namespace: nothing to report.
            continue;
        }
        let known = range(&dir);
        let namespace_range = known.unwrap_or(PhysRange { start: 0, end: 0 });
        let region = name
            .strip_prefix("namespace")
            .and_then(|s| s.split('.').next())
            .map(|id| format!("region{id}"))
            .unwrap_or_default();
        let holder = read_trim(&dir.join("holder")).filter(|h| !h.is_empty());
        let raw_mode = read_trim(&dir.join("mode")).unwrap_or_default();
        let mut ns = Namespace {
            name: name.clone(),
            region,
            mode: match raw_mode.as_str() {
                "raw" => Mode::Raw,
                "memory" | "fsdax" => Mode::Fsdax,
                "dax" | "devdax" => Mode::Devdax,
                "safe" | "sector" => Mode::Sector,
                _ => Mode::Unknown,
            },
            holder: holder.clone(),
            namespace_range,
            data_range: namespace_range,
            block: None,
            chardev: None,
            align: None,
            enabled: has_driver(&dir),
            range_known: known.is_some(),
        };
        match holder.as_deref() {
            Some(h) => {
                let hdir = bus.join(h);
                if let Some(r) = range(&hdir) {
                    ns.data_range = r;
                }
                ns.align = read_u64(&hdir.join("align"));
                ns.enabled = has_driver(&hdir);
                if h.starts_with("pfn") {
                    ns.mode = Mode::Fsdax;
                    ns.block = child_dev(&hdir, "block");
                } else if h.starts_with("dax") {
                    ns.mode = Mode::Devdax;
                    ns.chardev = devdax_char(root, &hdir, h);
                    // The device-dax device's own range is authoritative (the nd holder's
                    // attributes are unreadable on some kernels once bound).
                    if let Some((name, _)) = &ns.chardev
                        && let Some(r) = range(&root.join("sys/bus/dax/devices").join(name))
                    {
                        ns.data_range = r;
                    }
                    if let Some((name, _)) = &ns.chardev {
                        ns.mode = dax_bus_mode(root, name);
                    }
                } else if h.starts_with("btt") {
                    ns.mode = Mode::Sector;
                    ns.block = child_dev(&hdir, "block");
                }
            }
            None => {
                ns.block = child_dev(&dir, "block");
            }
        }
        out.push(ns);
    }
    out
}

/// Every nvdimm region below `root` with its physical range (root-only: None without it).
pub(super) fn read_regions(root: &Path) -> Vec<(String, Option<PhysRange>)> {
    let bus = root.join("sys/bus/nd/devices");
    let Ok(entries) = fs::read_dir(&bus) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Option<PhysRange>)> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("region"))
        .map(|n| {
            let r = range(&bus.join(&n));
            (n, r)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::topology::Topology;

    /// Writes the sysfs files a Debian 6.1 guest shows for a fsdax namespace on an emulated
    /// nvdimm (values copied from the VM).
    pub(crate) fn fsdax_fixture(root: &Path) {
        let nd = root.join("sys/bus/nd/devices");
        let w = |p: &str, v: &str| {
            let p = nd.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, format!("{v}\n")).unwrap();
        };
        w("region0/resource", "0x100000000");
        w("region0/size", "534773760");
        w("namespace0.0/resource", "0x100000000");
        w("namespace0.0/size", "534773760");
        w("namespace0.0/mode", "memory");
        w("namespace0.0/holder", "pfn0.0");
        w("pfn0.0/resource", "0x100800000");
        w("pfn0.0/size", "526385152");
        w("pfn0.0/align", "2097152");
        w("pfn0.0/mode", "pmem");
        w("pfn0.0/block/pmem0/dev", "259:0");
        fs::create_dir_all(nd.join("pfn0.0/driver")).unwrap();
        // An unused seed namespace of size 0 must not show up.
        w("namespace0.1/resource", "0");
        w("namespace0.1/size", "0");
        w("namespace0.1/mode", "raw");
    }

    #[test]
    fn reads_an_fsdax_namespace() {
        let dir = tempfile::tempdir().unwrap();
        fsdax_fixture(dir.path());
        let t = Topology::read(dir.path());
        assert_eq!(t.namespaces.len(), 1);
        let ns = &t.namespaces[0];
        assert_eq!(ns.name, "namespace0.0");
        assert_eq!(ns.region, "region0");
        assert_eq!(ns.mode, Mode::Fsdax);
        assert_eq!(ns.holder.as_deref(), Some("pfn0.0"));
        assert_eq!(ns.data_range.start, 0x1_0080_0000);
        assert_eq!(ns.data_range.len(), 526_385_152);
        assert_eq!(
            ns.block,
            Some((
                "pmem0".into(),
                DevId {
                    major: 259,
                    minor: 0
                }
            ))
        );
        assert_eq!(ns.align, Some(2 << 20));
        assert!(ns.enabled);
        assert_eq!(ns.device_name(), "pmem0");
        assert_eq!(t.namespace_of_pfn(0x100800).unwrap().name, "namespace0.0");
        // The pfn info block / memmap reservation is not user-reachable.
        assert!(t.namespace_of_pfn(0x100000).is_none());
        assert!(t.has_dax());
    }

    #[test]
    fn reads_a_devdax_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let w = |p: &str, v: &str| {
            let p = root.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, format!("{v}\n")).unwrap();
        };
        let nd = "sys/bus/nd/devices";
        w(&format!("{nd}/namespace2.0/resource"), "0x140000000");
        w(&format!("{nd}/namespace2.0/size"), "534773760");
        w(&format!("{nd}/namespace2.0/mode"), "dax");
        w(&format!("{nd}/namespace2.0/holder"), "dax2.0");
        w(&format!("{nd}/dax2.0/align"), "2097152");
        w("sys/bus/dax/devices/dax2.0/dev", "252:0");
        w("sys/bus/dax/devices/dax2.0/resource", "0x140800000");
        w("sys/bus/dax/devices/dax2.0/size", "526385152");
        let t = Topology::read(root);
        let ns = &t.namespaces[0];
        assert_eq!(ns.mode, Mode::Devdax);
        assert_eq!(
            ns.chardev,
            Some((
                "dax2.0".into(),
                DevId {
                    major: 252,
                    minor: 0
                }
            ))
        );
        assert_eq!(ns.data_range.start, 0x1_4080_0000);
        assert_eq!(ns.device_name(), "dax2.0");
        assert_eq!(t.namespace_of_pfn(0x140800).unwrap().name, "namespace2.0");
    }

    /// `daxctl reconfigure-device -m system-ram`: dax2.0 unbound from device_dax and bound
    /// to kmem. Its namespace stays; its personality is System RAM.
    #[test]
    fn a_device_dax_device_bound_to_kmem_is_system_ram() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let w = |p: &str, v: &str| {
            let p = root.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, format!("{v}\n")).unwrap();
        };
        let nd = "sys/bus/nd/devices";
        w(&format!("{nd}/namespace2.0/resource"), "0x140000000");
        w(&format!("{nd}/namespace2.0/size"), "534773760");
        w(&format!("{nd}/namespace2.0/mode"), "dax");
        w(&format!("{nd}/namespace2.0/holder"), "dax2.0");
        fs::create_dir_all(root.join(format!("{nd}/dax2.0/driver"))).unwrap();
        w("sys/bus/dax/devices/dax2.0/dev", "252:0");
        w("sys/bus/dax/devices/dax2.0/resource", "0x140800000");
        w("sys/bus/dax/devices/dax2.0/size", "526385152");
        let drivers = root.join("sys/bus/dax/drivers");
        fs::create_dir_all(drivers.join("kmem")).unwrap();
        fs::create_dir_all(drivers.join("device_dax")).unwrap();
        let link = root.join("sys/bus/dax/devices/dax2.0/driver");
        std::os::unix::fs::symlink(drivers.join("device_dax"), &link).unwrap();
        assert_eq!(Topology::read(root).namespaces[0].mode, Mode::Devdax);
        fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(drivers.join("kmem"), &link).unwrap();
        let t = Topology::read(root);
        let ns = &t.namespaces[0];
        assert_eq!(ns.mode, Mode::SystemRam);
        assert_eq!(ns.mode.to_string(), "system-ram (kmem)");
        assert!(ns.enabled, "the namespace stays bound");
        assert_eq!(ns.device_name(), "dax2.0");
        // No driver on the dax bus: still devdax by mode (nothing can map it).
        fs::remove_file(&link).unwrap();
        assert_eq!(Topology::read(root).namespaces[0].mode, Mode::Devdax);
    }

    #[test]
    fn an_empty_machine_has_no_dax() {
        let dir = tempfile::tempdir().unwrap();
        let t = Topology::read(dir.path());
        assert!(t.namespaces.is_empty());
        assert!(!t.has_dax());
    }
}
