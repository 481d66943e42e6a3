//! Where persistent memory lives on this machine: nvdimm regions, namespaces and their
//! fsdax/devdax personalities, physical ranges, block and character devices, and DAX mounts.
//!
//! Everything is read below a root directory (normally `/`) so tests can point it at a
//! fixture tree. Nothing here needs privileges.

pub mod dm;
mod mounts;
pub mod personality;
pub mod stack;
mod sysfs;

use std::{fmt, path::Path};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use mounts::{DaxOption, Mount, parse_mountinfo, read_mounts};
pub use stack::{DmDevice, FsUser, Role, describe_dm};

/// A device number as userspace sees it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl DevId {
    /// From the kernel's internal `dev_t` (`MAJOR << 20 | MINOR`), as in `sb->s_dev`.
    pub fn from_kernel(dev: u32) -> Self {
        Self {
            major: dev >> 20,
            minor: dev & 0xfffff,
        }
    }

    /// The kernel's internal `dev_t` (`MAJOR << 20 | MINOR`), the key of the BPF maps. The
    /// only place that encodes it.
    pub fn to_kernel(self) -> u32 {
        (self.major << 20) | (self.minor & 0xfffff)
    }

    /// From userspace's `st_dev` / `st_rdev` encoding (glibc `gnu_dev_major/minor`).
    pub fn from_user(dev: u64) -> Self {
        Self {
            major: (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32,
            minor: (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32,
        }
    }

    /// Parses "259:0".
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.trim().split_once(':')?;
        Some(Self {
            major: a.parse().ok()?,
            minor: b.parse().ok()?,
        })
    }
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// A half-open physical address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PhysRange {
    pub start: u64,
    pub end: u64,
}

impl PhysRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }
    pub fn contains_pfn(&self, pfn: u64) -> bool {
        let addr = pfn << 12;
        addr >= self.start && addr < self.end
    }
    pub fn first_pfn(&self) -> u64 {
        self.start >> 12
    }
    pub fn end_pfn(&self) -> u64 {
        self.end >> 12
    }
}

/// What a namespace is used as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plain block device, no struct pages (`raw`): DAX mounts are refused by the kernel.
    Raw,
    /// Block device with struct pages, for DAX file systems (`fsdax`, sysfs says `memory`).
    Fsdax,
    /// Character device `/dev/daxX.Y` mapped directly (`devdax`).
    Devdax,
    /// BTT sector mode: no DAX.
    Sector,
    /// A device-dax device handed to the kernel as System RAM (the `kmem` driver, what
    /// `daxctl reconfigure-device -m system-ram` does): ordinary memory of a NUMA node, no
    /// DAX mapping of it exists.
    #[serde(rename = "system-ram")]
    SystemRam,
    Unknown,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Raw => "raw",
            Mode::Fsdax => "fsdax",
            Mode::Devdax => "devdax",
            Mode::Sector => "sector",
            Mode::SystemRam => "system-ram (kmem)",
            Mode::Unknown => "unknown",
        })
    }
}

/// One pmem namespace with everything an operator asks about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Namespace {
    /// `namespace0.0`
    pub name: String,
    /// `region0`
    pub region: String,
    pub mode: Mode,
    /// `pfn0.0` (fsdax), `dax0.0` (devdax), `btt0.0` (sector), when claimed.
    pub holder: Option<String>,
    /// The whole namespace.
    pub namespace_range: PhysRange,
    /// The part user mappings can reach (after the pfn info block and memmap reservation for
    /// fsdax/devdax); equal to `namespace_range` for raw.
    pub data_range: PhysRange,
    /// `pmem0` and its device number, for raw/fsdax/sector.
    pub block: Option<(String, DevId)>,
    /// `dax0.0` and its device number, for devdax.
    pub chardev: Option<(String, DevId)>,
    /// Mapping alignment (bytes) of the pfn/dax device.
    pub align: Option<u64>,
    /// Is a driver bound (the device is live)?
    pub enabled: bool,
    /// False when the physical range could not be read (sysfs `resource` is root-only).
    pub range_known: bool,
}

impl Namespace {
    /// The name operators know the device by: `pmem0`, `dax0.0`, else the namespace.
    pub fn device_name(&self) -> &str {
        self.block
            .as_ref()
            .map(|(n, _)| n.as_str())
            .or(self.chardev.as_ref().map(|(n, _)| n.as_str()))
            .unwrap_or(&self.name)
    }

    /// The device numbers user space reaches this namespace through: its block device
    /// (raw, fsdax, sector) and its character device (devdax). What a fence covers; the
    /// only place that lists them.
    pub fn devices(&self) -> Vec<DevId> {
        self.block
            .iter()
            .chain(self.chardev.iter())
            .map(|(_, d)| *d)
            .collect()
    }
}

/// A snapshot of the machine's pmem topology.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Topology {
    pub namespaces: Vec<Namespace>,
    pub mounts: Vec<Mount>,
    /// device-mapper devices built on the namespaces' block devices (their kernel holders).
    #[serde(default)]
    pub dm: Vec<DmDevice>,
}

impl Topology {
    /// Reads the topology below `root` (normally `/`).
    pub fn read(root: &Path) -> Self {
        let namespaces = sysfs::read_namespaces(root);
        let mounts = mounts::read_mounts(root);
        let dm = stack::read_dm(root, &namespaces, &|name| dm::table(root, name));
        Self {
            namespaces,
            mounts,
            dm,
        }
    }

    /// The namespace whose user-reachable range holds `pfn`.
    pub fn namespace_of_pfn(&self, pfn: u64) -> Option<&Namespace> {
        self.namespaces
            .iter()
            .find(|n| n.range_known && n.data_range.contains_pfn(pfn))
    }

    /// The namespace behind a block device number (`sb->s_dev` of a DAX mount).
    pub fn namespace_of_block(&self, dev: DevId) -> Option<&Namespace> {
        self.namespaces
            .iter()
            .find(|n| n.block.as_ref().is_some_and(|(_, d)| *d == dev))
    }

    pub fn mount_of_dev(&self, dev: DevId) -> Option<&Mount> {
        self.mounts.iter().find(|m| m.dev == dev)
    }

    /// Is there anything DAX-capable at all: an fsdax or devdax namespace, or a DAX mount?
    pub fn has_dax(&self) -> bool {
        self.namespaces
            .iter()
            .any(|n| matches!(n.mode, Mode::Fsdax | Mode::Devdax))
            || self.mounts.iter().any(|m| m.dax.is_dax())
    }
}

/// Every nvdimm region (`region0`, …) with its physical range when readable (root-only).
pub fn regions(root: &Path) -> Vec<(String, Option<PhysRange>)> {
    sysfs::read_regions(root)
}

/// Fixture trees for other modules' tests.
#[cfg(test)]
pub(crate) mod tests_fixture {
    /// The sysfs files of a Debian 6.1 guest's fsdax namespace (region0, pfn0.0, pmem0).
    pub fn fsdax(root: &std::path::Path) {
        super::sysfs::tests::fsdax_fixture(root)
    }
}

/// The character-device major of device-dax (`dax` in /proc/devices; registered by the
/// built-in dax core, so present even before a devdax device exists).
pub fn dax_char_major(root: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(root.join("proc/devices")).ok()?;
    parse_dax_major(&text)
}

fn parse_dax_major(text: &str) -> Option<u32> {
    let chars = text.split("Block devices:").next()?;
    chars.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let major = it.next()?.parse().ok()?;
        (it.next()? == "dax").then_some(major)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_dax_character_major() {
        let text = "Character devices:\n  1 mem\n252 dax\n253 bsg\n\nBlock devices:\n259 blkext\n252 dax\n";
        assert_eq!(parse_dax_major(text), Some(252));
        assert_eq!(parse_dax_major("Character devices:\n  1 mem\n"), None);
    }

    #[test]
    fn device_numbers_convert_both_encodings() {
        let k = DevId::from_kernel((259 << 20) | 3);
        assert_eq!(k.to_kernel(), (259 << 20) | 3);
        assert_eq!(
            k,
            DevId {
                major: 259,
                minor: 3
            }
        );
        // glibc makedev(259, 3)
        let user = ((259u64 & 0xfff) << 8) | (3u64 & 0xff);
        assert_eq!(DevId::from_user(user), k);
        // large minor numbers use the high bits
        let user = ((8u64 & 0xfff) << 8) | (0x1234u64 & 0xff) | ((0x1234u64 & !0xff) << 12);
        assert_eq!(
            DevId::from_user(user),
            DevId {
                major: 8,
                minor: 0x1234
            }
        );
        assert_eq!(
            DevId::parse("259:0"),
            Some(DevId {
                major: 259,
                minor: 0
            })
        );
        assert_eq!(DevId::parse("x"), None);
    }

    #[test]
    fn ranges_hold_pfns() {
        let r = PhysRange {
            start: 0x1_0080_0000,
            end: 0x1_2000_0000,
        };
        assert!(r.contains_pfn(0x100800));
        assert!(!r.contains_pfn(0x1007ff));
        assert!(!r.contains_pfn(0x120000));
        assert_eq!(r.first_pfn(), 0x100800);
    }
}
