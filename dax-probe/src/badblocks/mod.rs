//! Known-bad media: the kernel's badblocks lists, translated to physical pfns, to the files
//! (and offsets) they back on a mounted file system, and to the processes that map them.
//!
//! Where the lists are (libnvdimm, `drivers/nvdimm`, `block/genhd.c`):
//! - `/sys/block/pmemN/badblocks`: the block device's list, in 512-byte sectors relative to
//!   the block device's first byte, i.e. to the namespace's data start after the pfn info
//!   block (`pmem_attach_disk` populates it from the region's list over `bb_range`, which
//!   starts at `phys_addr + data_offset`). Root may add a range by writing "SECTOR COUNT"
//!   to it (`disk_badblocks_store` → `badblocks_store`); the pmem driver then refuses DAX
//!   access to those sectors (`__pmem_direct_access` → -EIO / -EHWPOISON), so a fault on
//!   them gets SIGBUS.
//! - `/sys/bus/nd/devices/regionX/badblocks`: the region's list (read-only), relative to the
//!   region's start (`regionX/resource`). It is the only list that covers device-dax
//!   namespaces (no block device); ranges it shares with a block device's list are reported
//!   once, from the block device.
//!
//! The kernel's `badblocks_show` prints "SECTOR COUNT" per line (`%llu %u`), at most one
//! page of them. Both attributes are sysfs_notify'd only after an address range scrub
//! (`nd_pmem_notify`, `nd_region_notify`), never for a write to the file: the monitor
//! therefore polls them on its reconcile tick.

pub mod locate;
pub mod watch;

use std::{
    fs,
    path::{Path, PathBuf},
};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::topology::{Mode, PhysRange, Topology};

/// The sector unit of every badblocks list.
pub const SECTOR: u64 = 512;

/// One "SECTOR COUNT" line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sectors {
    pub first: u64,
    pub count: u64,
}

impl Sectors {
    /// Byte range `[start, end)` relative to the list's base.
    pub fn bytes(&self) -> (u64, u64) {
        (self.first * SECTOR, (self.first + self.count) * SECTOR)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {why} (got {text:?}; want \"SECTOR COUNT\")")]
pub struct ParseError {
    pub line: usize,
    pub text: String,
    pub why: &'static str,
}

/// Largest sector whose byte address fits in 64 bits.
const MAX_SECTOR: u64 = u64::MAX / SECTOR;

/// Parses a badblocks list. Any line that is not two decimal numbers, a count of zero, or
/// a range whose end overflows makes the whole list garbled: a partial list would read as
/// "these are all the bad blocks".
pub fn parse(text: &str) -> Result<Vec<Sectors>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |why| ParseError {
            line: i + 1,
            text: raw.chars().take(80).collect(),
            why,
        };
        let l = raw.trim();
        if l.is_empty() {
            continue;
        }
        let mut it = l.split_ascii_whitespace();
        let (Some(a), Some(b), None) = (it.next(), it.next(), it.next()) else {
            return Err(err("not two numbers"));
        };
        let dec = |s: &str| -> Option<u64> {
            (s.bytes().all(|c| c.is_ascii_digit()) && !s.is_empty())
                .then(|| s.parse().ok())
                .flatten()
        };
        let (Some(first), Some(count)) = (dec(a), dec(b)) else {
            return Err(err("not decimal numbers"));
        };
        if count == 0 {
            return Err(err("a range of no sectors"));
        }
        match first.checked_add(count) {
            Some(end) if end <= MAX_SECTOR => {}
            _ => return Err(err("the range ends beyond the 64-bit address space")),
        }
        out.push(Sectors { first, count });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Which kind of list a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// A pmem block device's list (relative to the block device).
    Block,
    /// An nvdimm region's list (relative to the region).
    Region,
}

/// One badblocks file and what its sector 0 is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// `pmem0` or `region3`.
    pub device: String,
    pub path: PathBuf,
    pub scope: Scope,
    /// Physical address of sector 0, when known (`resource` files are root-only).
    pub base: Option<u64>,
    /// Why sectors of this list do not map linearly to physical memory (BTT sector mode).
    pub nonlinear: Option<&'static str>,
}

/// Every badblocks list of the machine below `root`: each pmem block device's, then each
/// region's.
pub fn sources(root: &Path, topo: &Topology) -> Vec<Source> {
    let mut out = Vec::new();
    for ns in &topo.namespaces {
        let Some((blk, _)) = &ns.block else { continue };
        out.push(Source {
            device: blk.clone(),
            path: root.join("sys/block").join(blk).join("badblocks"),
            scope: Scope::Block,
            base: ns.range_known.then_some(ns.data_range.start),
            nonlinear: (ns.mode == Mode::Sector)
                .then_some("BTT sector mode remaps sectors: no physical address"),
        });
    }
    for (region, range) in crate::topology::regions(root) {
        let path = root
            .join("sys/bus/nd/devices")
            .join(&region)
            .join("badblocks");
        if !path.exists() {
            continue;
        }
        out.push(Source {
            device: region,
            path,
            scope: Scope::Region,
            base: range.map(|r| r.start),
            nonlinear: None,
        });
    }
    out
}

/// A list that could not be read or parsed: named, so the rest is still answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub path: PathBuf,
    pub why: String,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.why)
    }
}

/// One bad range as a list states it, placed in physical memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The device operators know: `pmem0`, `dax1.0`, or the region when no namespace holds
    /// the range.
    pub device: String,
    /// The list it came from.
    pub source: PathBuf,
    pub scope: Scope,
    pub sectors: Sectors,
    /// Physical byte range, when the base is known.
    pub phys: Option<PhysRange>,
    /// The namespace whose user-reachable range it overlaps.
    pub namespace: Option<String>,
    /// Byte range on the block device (what file systems address), for block lists.
    pub dev_bytes: Option<(u64, u64)>,
    /// Why something is not known.
    pub note: Option<String>,
}

impl Placed {
    /// Pfns `[first, end)` of the physical range, partial pages included.
    pub fn pfns(&self) -> Option<(u64, u64)> {
        self.phys
            .map(|p| (p.start >> 12, p.end.div_ceil(4096).max((p.start >> 12) + 1)))
    }

    /// A stable identity of the range (device and sectors), for telling new ones apart.
    pub fn key(&self) -> (String, Sectors) {
        (self.device.clone(), self.sectors)
    }
}

/// Reads every list and places its ranges. `only` restricts to one device (`pmem0`,
/// `dax1.0`, `region2`, `namespace1.0`). Unreadable lists are returned beside the ranges.
pub fn read(root: &Path, topo: &Topology, only: Option<&str>) -> (Vec<Placed>, Vec<Unreadable>) {
    let mut placed = Vec::new();
    let mut bad = Vec::new();
    for src in sources(root, topo) {
        let text = match fs::read(&src.path) {
            Ok(b) => match String::from_utf8(b) {
                Ok(t) => t,
                Err(_) => {
                    bad.push(Unreadable {
                        path: src.path.clone(),
                        why: "not text".into(),
                    });
                    continue;
                }
            },
            // No list: the attribute is hidden for a disk without one, or the device left.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                bad.push(Unreadable {
                    path: src.path.clone(),
                    why: format!("cannot read it: {e}"),
                });
                continue;
            }
        };
        match parse(&text) {
            Ok(list) => {
                for s in list {
                    placed.extend(place(&src, s, topo));
                }
            }
            Err(e) => bad.push(Unreadable {
                path: src.path.clone(),
                why: format!("garbled: {e}"),
            }),
        }
    }
    if let Some(d) = only {
        let ns_dev = topo
            .namespaces
            .iter()
            .find(|n| n.name == d)
            .map(|n| n.device_name().to_string());
        placed.retain(|p| {
            p.device == d
                || p.namespace.as_deref() == Some(d)
                || ns_dev.as_deref() == Some(p.device.as_str())
                || (p.scope == Scope::Region
                    && p.source.parent().and_then(|x| x.file_name())
                        == Some(std::ffi::OsStr::new(d)))
        });
    }
    (placed, bad)
}

/// Places every range of one parsed list (see [`read`]).
pub fn place_all(src: &Source, list: &[Sectors], topo: &Topology) -> Vec<Placed> {
    list.iter().filter_map(|s| place(src, *s, topo)).collect()
}

/// Is `name` a device a badblocks question can be about?
pub fn knows_device(root: &Path, topo: &Topology, name: &str) -> bool {
    topo.namespaces
        .iter()
        .any(|n| n.name == name || n.device_name() == name)
        || crate::topology::regions(root)
            .iter()
            .any(|(r, _)| r == name)
}

/// Places one range of one list. A region range inside a block device's namespace is left
/// to that device's own list (the kernel copies region poison into it), so it yields none.
fn place(src: &Source, s: Sectors, topo: &Topology) -> Option<Placed> {
    let (b0, b1) = s.bytes();
    let mut p = Placed {
        device: src.device.clone(),
        source: src.path.clone(),
        scope: src.scope,
        sectors: s,
        phys: None,
        namespace: None,
        dev_bytes: None,
        note: None,
    };
    if src.scope == Scope::Block {
        p.dev_bytes = Some((b0, b1));
        p.namespace = topo
            .namespaces
            .iter()
            .find(|n| n.block.as_ref().is_some_and(|(b, _)| *b == src.device))
            .map(|n| n.name.clone());
    }
    if let Some(why) = src.nonlinear {
        p.note = Some(why.into());
        return Some(p);
    }
    let Some(base) = src.base else {
        p.note = Some("physical address unknown: the namespace's resource is root-only".into());
        return Some(p);
    };
    let (Some(start), Some(end)) = (base.checked_add(b0), base.checked_add(b1)) else {
        p.note = Some("the range lies beyond the 64-bit address space".into());
        return Some(p);
    };
    let phys = PhysRange { start, end };
    p.phys = Some(phys);
    if src.scope == Scope::Region {
        let overlapping = |r: &PhysRange| r.start < phys.end && phys.start < r.end;
        if let Some(ns) = topo
            .namespaces
            .iter()
            .find(|n| n.range_known && overlapping(&n.data_range))
        {
            if ns.block.is_some() {
                return None;
            }
            p.device = ns.device_name().to_string();
            p.namespace = Some(ns.name.clone());
        } else if let Some(ns) = topo
            .namespaces
            .iter()
            .find(|n| n.range_known && overlapping(&n.namespace_range))
        {
            p.namespace = Some(ns.name.clone());
            p.note = Some(format!(
                "in {}'s info block / memmap reservation: no process or file can map it",
                ns.name
            ));
        } else {
            p.note = Some("in no namespace: unallocated region capacity".into());
        }
    }
    Some(p)
}

/// A known-bad range and everything it will hurt: the `media_error` line of `monitor
/// --json` and `badblocks --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MediaError {
    /// When the agent first saw it (0 from `badblocks`).
    #[serde(default)]
    pub ts_ns: u64,
    /// `pmem0`, `dax1.0`, or the region when no namespace holds it.
    pub device: String,
    /// The badblocks file that lists it.
    pub list: String,
    pub scope: Scope,
    /// First 512-byte sector, relative to the list's base, and how many.
    pub sector: u64,
    pub sectors: u64,
    pub namespace: Option<String>,
    /// Physical byte range `[start, end)`.
    pub phys: Option<PhysRange>,
    /// Pfns `[first, end)` (partial pages count whole).
    pub pfns: Option<(u64, u64)>,
    /// Byte range on the block device.
    pub dev_bytes: Option<(u64, u64)>,
    /// The file system the device carries, when mounted.
    pub mount: Option<String>,
    /// The files (and file byte ranges) on the bad media: every one for reflinked extents.
    pub files: Vec<locate::BadFile>,
    /// The parts no file covers: free space, file system metadata, or unknown (and why).
    pub space: Vec<locate::BadSpace>,
    /// The processes that map the pfns now.
    pub holders: Vec<crate::holders::query::HolderRow>,
    /// What could not be found out, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl MediaError {
    /// Does the range hold `pfn`?
    pub fn holds_pfn(&self, pfn: u64) -> bool {
        self.pfns.is_some_and(|(a, b)| a <= pfn && pfn < b)
    }

    /// One line for the monitor and the dashboard's event pane.
    pub fn summary(&self) -> String {
        let mut s = format!("MEDIA ERROR {}", self.name());
        if let Some((a, b)) = self.pfns {
            s.push_str(&format!(" pfn {a:#x}-{b:#x}"));
        }
        if !self.files.is_empty() {
            let f: Vec<String> = self
                .files
                .iter()
                .map(|f| format!("{}@{:#x}-{:#x}", f.path, f.offset, f.end))
                .collect();
            s.push_str(&format!(": backs {}", f.join(", ")));
        }
        for sp in &self.space {
            let kind = match sp.kind {
                locate::SpaceKind::Free => "free space",
                locate::SpaceKind::Metadata => "file system metadata",
                locate::SpaceKind::Unknown => "in no file",
            };
            s.push_str(&format!(
                "; {kind} at device bytes {:#x}-{:#x} ({})",
                sp.dev_offset, sp.dev_end, sp.what
            ));
        }
        let mut pids: Vec<String> = self
            .holders
            .iter()
            .map(|h| format!("{} {}", h.pid, h.comm))
            .collect();
        pids.dedup();
        if pids.is_empty() {
            s.push_str("; mapped by nobody");
        } else {
            s.push_str(&format!("; mapped by {}", pids.join(", ")));
        }
        for n in &self.notes {
            s.push_str(&format!("; {n}"));
        }
        s
    }

    /// "pmem0 sectors 16+8" — how reports name the range.
    pub fn name(&self) -> String {
        format!("{} sectors {}+{}", self.device, self.sector, self.sectors)
    }
}

/// Describes one placed range: its files (when a file system is mounted on its block
/// device), its device-dax offset, and its holders (`holders(first_pfn, end_pfn)`).
pub fn describe(
    p: &Placed,
    topo: &Topology,
    space: &dyn locate::FileSpace,
    holders: &mut dyn FnMut(u64, u64) -> Result<Vec<crate::holders::query::HolderRow>, String>,
) -> MediaError {
    let mut m = MediaError {
        ts_ns: 0,
        device: p.device.clone(),
        list: p.source.to_string_lossy().into_owned(),
        scope: p.scope,
        sector: p.sectors.first,
        sectors: p.sectors.count,
        namespace: p.namespace.clone(),
        phys: p.phys,
        pfns: p.pfns(),
        dev_bytes: p.dev_bytes,
        mount: None,
        files: Vec::new(),
        space: Vec::new(),
        holders: Vec::new(),
        notes: p.note.iter().cloned().collect(),
    };
    let ns = p
        .namespace
        .as_deref()
        .and_then(|n| topo.namespaces.iter().find(|x| x.name == n));
    if let (Some((s, e)), Some(ns)) = (p.dev_bytes, ns) {
        let mount = ns
            .block
            .as_ref()
            .and_then(|(_, dev)| topo.mount_of_dev(*dev));
        match mount {
            Some(mnt) => {
                m.mount = Some(mnt.mount_point.clone());
                let (files, rest, errors) = locate::locate(space, mnt, s, e);
                m.files = files;
                m.space = rest;
                m.notes.extend(errors);
            }
            None => m.notes.push(format!(
                "{} is not mounted: no file system names these bytes",
                p.device
            )),
        }
    } else if let (Some(ns), Some(phys)) = (ns, p.phys)
        && ns.mode == Mode::Devdax
        && ns.data_range.start <= phys.start
    {
        m.notes.push(format!(
            "device-dax: bytes {:#x}-{:#x} of /dev/{}",
            phys.start - ns.data_range.start,
            phys.end - ns.data_range.start,
            p.device
        ));
    }
    if let Some((a, b)) = m.pfns
        && p.note.is_none()
    {
        match holders(a, b) {
            Ok(h) => m.holders = h,
            Err(why) => m.notes.push(format!("holders unknown: {why}")),
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_format() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(
            parse("8 8\n1024 1\n").unwrap(),
            vec![
                Sectors { first: 8, count: 8 },
                Sectors {
                    first: 1024,
                    count: 1
                }
            ]
        );
        // Order and duplicates do not matter.
        assert_eq!(parse("16 1\n8 1\n8 1\n").unwrap().len(), 2);
    }

    #[test]
    fn a_garbled_list_is_refused_whole_and_names_the_line() {
        for (text, line) in [
            ("8 8\nfoo\n", 2),
            ("8\n", 1),
            ("8 8 8\n", 1),
            ("-8 8\n", 1),
            ("0x10 8\n", 1),
            ("8 0\n", 1),
            ("18446744073709551615 1\n", 1),
            ("36028797018963967 2\n", 1),
            ("99999999999999999999 1\n", 1),
            ("+8 8\n", 1),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains("SECTOR COUNT"));
        }
    }

    fn fixture(root: &Path) -> Topology {
        crate::topology::tests_fixture::fsdax(root);
        let w = |p: &str, v: &str| {
            let p = root.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, v).unwrap();
        };
        // A second region with a devdax namespace.
        let nd = "sys/bus/nd/devices";
        w(&format!("{nd}/region1/resource"), "0x140000000\n");
        w(&format!("{nd}/region1/size"), "534773760\n");
        w(&format!("{nd}/namespace1.0/resource"), "0x140000000\n");
        w(&format!("{nd}/namespace1.0/size"), "534773760\n");
        w(&format!("{nd}/namespace1.0/mode"), "dax\n");
        w(&format!("{nd}/namespace1.0/holder"), "dax1.0\n");
        w("sys/bus/dax/devices/dax1.0/dev", "252:0\n");
        w("sys/bus/dax/devices/dax1.0/resource", "0x140800000\n");
        w("sys/bus/dax/devices/dax1.0/size", "526385152\n");
        Topology::read(root)
    }

    fn write(root: &Path, p: &str, v: &str) {
        let p = root.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, v).unwrap();
    }

    #[test]
    fn block_ranges_are_relative_to_the_data_start() {
        let dir = tempfile::tempdir().unwrap();
        let topo = fixture(dir.path());
        write(dir.path(), "sys/block/pmem0/badblocks", "16 8\n");
        let (p, bad) = read(dir.path(), &topo, None);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(p.len(), 1);
        let r = &p[0];
        assert_eq!(r.device, "pmem0");
        assert_eq!(r.namespace.as_deref(), Some("namespace0.0"));
        assert_eq!(r.dev_bytes, Some((8192, 12288)));
        // pfn0.0/resource is 0x100800000: sector 16 is the data start's third page.
        assert_eq!(
            r.phys,
            Some(PhysRange {
                start: 0x1_0080_2000,
                end: 0x1_0080_3000
            })
        );
        assert_eq!(r.pfns(), Some((0x100802, 0x100803)));
    }

    #[test]
    fn a_partial_page_counts_as_its_whole_page() {
        let p = Placed {
            device: "pmem0".into(),
            source: PathBuf::new(),
            scope: Scope::Block,
            sectors: Sectors { first: 7, count: 2 },
            phys: Some(PhysRange {
                start: 0x1000 + 7 * 512,
                end: 0x1000 + 9 * 512,
            }),
            namespace: None,
            dev_bytes: None,
            note: None,
        };
        assert_eq!(p.pfns(), Some((1, 3)));
    }

    #[test]
    fn region_ranges_name_devdax_and_leave_block_devices_to_their_own_list() {
        let dir = tempfile::tempdir().unwrap();
        let topo = fixture(dir.path());
        let nd = "sys/bus/nd/devices";
        // region0 holds pmem0: its poison shows in pmem0's list, not twice.
        write(dir.path(), &format!("{nd}/region0/badblocks"), "16400 8\n");
        // region1: one range in dax1.0's data, one in its info block.
        write(
            dir.path(),
            &format!("{nd}/region1/badblocks"),
            "16392 8\n8 1\n",
        );
        let (p, bad) = read(dir.path(), &topo, None);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(p.len(), 2, "{p:?}");
        let dax = p.iter().find(|r| r.device == "dax1.0").unwrap();
        assert_eq!(dax.namespace.as_deref(), Some("namespace1.0"));
        // 0x140000000 + 16392 * 512 = 0x140801000
        assert_eq!(dax.pfns(), Some((0x140801, 0x140802)));
        assert!(dax.note.is_none());
        let meta = p.iter().find(|r| r.device == "region1").unwrap();
        assert!(
            meta.note.as_deref().unwrap().contains("info block"),
            "{meta:?}"
        );
        // Restricting to the devdax device keeps only its range.
        let (only, _) = read(dir.path(), &topo, Some("dax1.0"));
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].device, "dax1.0");
    }

    #[test]
    fn an_unreadable_or_garbled_list_is_named_and_the_rest_still_answered() {
        let dir = tempfile::tempdir().unwrap();
        let topo = fixture(dir.path());
        let nd = "sys/bus/nd/devices";
        write(dir.path(), "sys/block/pmem0/badblocks", "16 8\n");
        write(dir.path(), &format!("{nd}/region1/badblocks"), "garbage\n");
        write(dir.path(), &format!("{nd}/region0/badblocks"), "\u{0}\u{1}");
        let (p, bad) = read(dir.path(), &topo, None);
        assert_eq!(p.len(), 1);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad.iter().any(|b| b.path.ends_with("region1/badblocks")
            && b.why.contains("garbled")
            && b.to_string().contains("region1/badblocks")));
        // A list that cannot be read at all (a directory here).
        fs::remove_file(dir.path().join("sys/block/pmem0/badblocks")).unwrap();
        fs::create_dir_all(dir.path().join("sys/block/pmem0/badblocks")).unwrap();
        let (p, bad) = read(dir.path(), &topo, None);
        assert!(p.is_empty());
        assert!(
            bad.iter()
                .any(|b| b.path.ends_with("pmem0/badblocks") && b.why.contains("cannot read"))
        );
    }

    #[test]
    fn without_the_root_only_resource_the_range_is_kept_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let mut topo = fixture(dir.path());
        for n in &mut topo.namespaces {
            n.range_known = false;
        }
        write(dir.path(), "sys/block/pmem0/badblocks", "16 8\n");
        let (p, _) = read(dir.path(), &topo, Some("pmem0"));
        assert_eq!(p.len(), 1);
        assert!(p[0].phys.is_none());
        assert!(p[0].note.as_deref().unwrap().contains("root-only"));
        assert_eq!(p[0].dev_bytes, Some((8192, 12288)));
    }

    #[test]
    fn known_devices() {
        let dir = tempfile::tempdir().unwrap();
        let topo = fixture(dir.path());
        for d in ["pmem0", "dax1.0", "namespace0.0", "region1"] {
            assert!(knows_device(dir.path(), &topo, d), "{d}");
        }
        assert!(!knows_device(dir.path(), &topo, "pmem9"));
    }
}
