//! What a bad range of a block device backs on the file system mounted on it.
//!
//! How it decides, exactly and without guessing:
//! 1. Files: every regular file of the mount (not crossing into other mounts) is asked for
//!    its extents (`FS_IOC_FIEMAP`); a file whose extent overlaps the range is named with
//!    the file offsets it covers. Reflinked files share extents, so each of them is found;
//!    on xfs the kernel flags those extents `FIEMAP_EXTENT_SHARED`.
//! 2. The bytes no file covers are given to the file system's own space map
//!    (`FS_IOC_GETFSMAP`, ext4 and xfs, CAP_SYS_ADMIN): what it calls free is "free space",
//!    what it gives a special owner (superblock, group descriptors, bitmaps, inode tables,
//!    journal / log, btrees) is "file system metadata". ext4 has no reverse map: it says
//!    "owner unknown" for blocks in use, which without a file is reported as such
//!    (metadata such as extent-tree blocks or directories, or a file created since).
//!    Where GETFSMAP is refused the remainder is "not in any file; free space or metadata
//!    (the file system could not say: …)".
//!
//! The walk costs one FIEMAP per file; the monitor runs it only when a new range appears.

use std::{os::unix::fs::MetadataExt, path::Path};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::topology::Mount;

/// A file's extent on the file system's device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub shared: bool,
}

/// One file and its extents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileExtents {
    pub path: String,
    pub ino: u64,
    pub extents: Vec<Extent>,
}

/// What the file system's space map says of a byte range of its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SpaceKind {
    Free,
    Metadata,
    /// In use, owner not recorded (ext4), and no file names it.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceRec {
    pub physical: u64,
    pub len: u64,
    pub kind: SpaceKind,
    /// `superblock`, `inode table`, `log`, … as the file system names the owner.
    pub what: String,
}

/// The file system side of the machine: live (ioctls) or fake (tests).
pub trait FileSpace {
    /// Every regular file of the mount with its extents overlapping `[start, end)` (bytes
    /// of the device). Files that cannot be opened are named in the error list.
    fn files(&self, mount: &Mount, start: u64, end: u64) -> (Vec<FileExtents>, Vec<String>);
    /// The file system's space map over `[start, end)`.
    fn fsmap(&self, mount: &Mount, start: u64, end: u64) -> Result<Vec<SpaceRec>, String>;
}

/// A file a bad range lies under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BadFile {
    pub path: String,
    pub ino: u64,
    /// Byte range `[start, end)` of the file that lies on bad media.
    pub offset: u64,
    pub end: u64,
    /// The extent is shared with another file (reflink).
    #[serde(default)]
    pub shared: bool,
}

/// A part of a bad range no file covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BadSpace {
    pub kind: SpaceKind,
    /// What the file system says owns it, or why it could not say.
    pub what: String,
    /// Byte range on the device.
    pub dev_offset: u64,
    pub dev_end: u64,
}

/// The bad range `[start, end)` of the device `mount` sits on, in files and space.
pub fn locate(
    space: &dyn FileSpace,
    mount: &Mount,
    start: u64,
    end: u64,
) -> (Vec<BadFile>, Vec<BadSpace>, Vec<String>) {
    let (files, errors) = space.files(mount, start, end);
    let mut hits = Vec::new();
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for f in &files {
        for e in &f.extents {
            let (es, ee) = (e.physical, e.physical.saturating_add(e.len));
            let (s, t) = (es.max(start), ee.min(end));
            if s >= t {
                continue;
            }
            covered.push((s, t));
            let off = e.logical + (s - es);
            hits.push(BadFile {
                path: f.path.clone(),
                ino: f.ino,
                offset: off,
                end: off + (t - s),
                shared: e.shared,
            });
        }
    }
    hits.sort_by(|a, b| (&a.path, a.offset).cmp(&(&b.path, b.offset)));
    hits.dedup();
    let gaps = uncovered(start, end, &mut covered);
    let mut rest = Vec::new();
    if !gaps.is_empty() {
        match space.fsmap(mount, start, end) {
            Ok(recs) => {
                for (gs, ge) in gaps {
                    let mut at = gs;
                    let mut recs: Vec<&SpaceRec> = recs
                        .iter()
                        .filter(|r| r.physical < ge && gs < r.physical.saturating_add(r.len))
                        .collect();
                    recs.sort_by_key(|r| r.physical);
                    for r in recs {
                        let (s, t) = (r.physical.max(gs), r.physical.saturating_add(r.len).min(ge));
                        if s > at {
                            rest.push(unknown(at, s, "the file system's map skips it"));
                        }
                        rest.push(BadSpace {
                            kind: r.kind,
                            what: r.what.clone(),
                            dev_offset: s,
                            dev_end: t,
                        });
                        at = at.max(t);
                    }
                    if at < ge {
                        rest.push(unknown(at, ge, "the file system's map skips it"));
                    }
                }
            }
            Err(why) => {
                for (gs, ge) in gaps {
                    rest.push(unknown(
                        gs,
                        ge,
                        &format!(
                            "in no file: free space or file system metadata (the file \
                             system could not say: {why})"
                        ),
                    ));
                }
            }
        }
    }
    (hits, rest, errors)
}

fn unknown(s: u64, e: u64, what: &str) -> BadSpace {
    BadSpace {
        kind: SpaceKind::Unknown,
        what: what.into(),
        dev_offset: s,
        dev_end: e,
    }
}

/// The parts of `[start, end)` none of `covered` covers.
fn uncovered(start: u64, end: u64, covered: &mut [(u64, u64)]) -> Vec<(u64, u64)> {
    covered.sort();
    let mut out = Vec::new();
    let mut at = start;
    for &(s, e) in covered.iter() {
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    if at < end {
        out.push((at, end));
    }
    out
}

/// The machine's file systems, through FIEMAP and GETFSMAP.
pub struct LiveSpace;

/// `FS_IOC_FIEMAP` = `_IOWR('f', 11, struct fiemap)` (32-byte header).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `FS_IOC_GETFSMAP` = `_IOWR('X', 59, struct fsmap_head)` (192-byte header).
const FS_IOC_GETFSMAP: libc::c_ulong = 0xC0C0_583B;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// Files walked at most per mount: a bound on the work a crafted tree can make.
const MAX_FILES: usize = 1 << 20;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

const FIEMAP_BATCH: usize = 64;

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// A file's extents, all of them, by FIEMAP.
pub fn fiemap(file: &std::fs::File) -> std::io::Result<Vec<Extent>> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut from = 0u64;
    loop {
        let mut m = Fiemap {
            start: from,
            length: u64::MAX - from,
            flags: 0,
            mapped_extents: 0,
            extent_count: FIEMAP_BATCH as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); FIEMAP_BATCH],
        };
        // SAFETY: `m` is a struct fiemap followed by room for `extent_count` extents.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut m as *mut Fiemap) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = (m.mapped_extents as usize).min(FIEMAP_BATCH);
        if n == 0 {
            return Ok(out);
        }
        let mut last = false;
        for e in &m.extents[..n] {
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            if e.flags & (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DATA_INLINE) == 0 {
                out.push(Extent {
                    logical: e.logical,
                    physical: e.physical,
                    len: e.length,
                    shared: e.flags & FIEMAP_EXTENT_SHARED != 0,
                });
            }
        }
        let end = m.extents[n - 1]
            .logical
            .saturating_add(m.extents[n - 1].length);
        if last || end <= from {
            return Ok(out);
        }
        from = end;
    }
}

impl FileSpace for LiveSpace {
    fn files(&self, mount: &Mount, start: u64, end: u64) -> (Vec<FileExtents>, Vec<String>) {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        let root = Path::new(&mount.mount_point);
        let Ok(top) = std::fs::symlink_metadata(root) else {
            errors.push(format!(
                "{}: cannot stat the mount point",
                mount.mount_point
            ));
            return (out, errors);
        };
        let mut stack = vec![root.to_path_buf()];
        let mut seen = 0usize;
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                errors.push(format!("{}: cannot list it", dir.display()));
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                let Ok(md) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                // Stay on this file system (a mount below it is another device).
                if md.dev() != top.dev() {
                    continue;
                }
                if md.is_dir() {
                    stack.push(p);
                } else if md.is_file() {
                    seen += 1;
                    if seen > MAX_FILES {
                        errors.push(format!(
                            "{}: more than {MAX_FILES} files, the rest not looked at",
                            mount.mount_point
                        ));
                        return (out, errors);
                    }
                    let ext = std::fs::File::open(&p).and_then(|f| fiemap(&f));
                    match ext {
                        Ok(ext) => {
                            let ext: Vec<Extent> = ext
                                .into_iter()
                                .filter(|x| x.physical < end && start < x.physical + x.len)
                                .collect();
                            if !ext.is_empty() {
                                out.push(FileExtents {
                                    path: p.to_string_lossy().into_owned(),
                                    ino: md.ino(),
                                    extents: ext,
                                });
                            }
                        }
                        Err(err) => errors.push(format!("{}: FIEMAP: {err}", p.display())),
                    }
                }
            }
        }
        (out, errors)
    }

    fn fsmap(&self, mount: &Mount, start: u64, end: u64) -> Result<Vec<SpaceRec>, String> {
        getfsmap(mount, start, end)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Fsmap {
    device: u32,
    flags: u32,
    physical: u64,
    owner: u64,
    offset: u64,
    length: u64,
    reserved: [u64; 3],
}

const FSMAP_BATCH: usize = 128;

#[repr(C)]
struct FsmapHead {
    iflags: u32,
    oflags: u32,
    count: u32,
    entries: u32,
    reserved: [u64; 6],
    keys: [Fsmap; 2],
    recs: [Fsmap; FSMAP_BATCH],
}

/// include/uapi/linux/fsmap.h.
const FMR_OF_SPECIAL_OWNER: u32 = 0x10;
const FMR_OF_LAST: u32 = 0x20;

/// What a GETFSMAP record says of its bytes.
pub fn classify(flags: u32, owner: u64) -> (SpaceKind, String) {
    if flags & FMR_OF_SPECIAL_OWNER != 0 {
        let (k, w) = owner_name(owner);
        (k, w.to_string())
    } else {
        // An inode owns it (xfs rmapbt): FIEMAP found it unless it was made since.
        (
            SpaceKind::Unknown,
            format!("inode {owner} (no file found by that)"),
        )
    }
}

/// The name of a special owner (`FMR_OWNER(type, code)` of include/uapi/linux/fsmap.h,
/// fs/xfs/libxfs/xfs_fs.h and fs/ext4/fsmap.h: ext4 reuses xfs's 'X' codes for the
/// superblock, journal and inode tables).
pub fn owner_name(owner: u64) -> (SpaceKind, &'static str) {
    let (ty, code) = ((owner >> 32) as u8, owner as u32);
    match (ty, code) {
        (0, 1) => (SpaceKind::Free, "free space"),
        (0, 2) => (SpaceKind::Unknown, "in use, owner not recorded"),
        (0, 3) => (SpaceKind::Metadata, "file system metadata"),
        (b'X', 1) => (
            SpaceKind::Metadata,
            "static fs metadata (superblock, AG headers)",
        ),
        (b'X', 2) => (SpaceKind::Metadata, "journalling log"),
        (b'X', 3) => (SpaceKind::Metadata, "per-AG metadata (free space btrees)"),
        (b'X', 4) => (SpaceKind::Metadata, "inode btree"),
        (b'X', 5) => (
            SpaceKind::Metadata,
            "inodes (xfs inode chunks, ext4 inode tables)",
        ),
        (b'X', 6) => (SpaceKind::Metadata, "reference count btree"),
        (b'X', 7) => (SpaceKind::Metadata, "copy-on-write staging"),
        (b'X', 8) => (SpaceKind::Metadata, "known-bad blocks"),
        (b'f', 1) => (SpaceKind::Metadata, "group descriptors"),
        (b'f', 2) => (SpaceKind::Metadata, "reserved group descriptors"),
        (b'f', 3) => (SpaceKind::Metadata, "block bitmap"),
        (b'f', 4) => (SpaceKind::Metadata, "inode bitmap"),
        (b'f', _) => (SpaceKind::Metadata, "ext4 metadata"),
        _ => (SpaceKind::Metadata, "file system metadata (unnamed owner)"),
    }
}

/// Linux's `new_encode_dev`, the device number GETFSMAP keys and records carry.
fn encode_dev(d: crate::topology::DevId) -> u32 {
    (d.minor & 0xff) | (d.major << 8) | ((d.minor & !0xff) << 12)
}

fn getfsmap(mount: &Mount, start: u64, end: u64) -> Result<Vec<SpaceRec>, String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(&mount.mount_point).map_err(|e| e.to_string())?;
    let dev = encode_dev(mount.dev);
    let mut head = Box::new(FsmapHead {
        iflags: 0,
        oflags: 0,
        count: FSMAP_BATCH as u32,
        entries: 0,
        reserved: [0; 6],
        keys: [Fsmap::default(); 2],
        recs: [Fsmap::default(); FSMAP_BATCH],
    });
    head.keys[0] = Fsmap {
        device: dev,
        physical: start,
        ..Fsmap::default()
    };
    head.keys[1] = Fsmap {
        device: dev,
        flags: u32::MAX,
        physical: end.saturating_sub(1),
        owner: u64::MAX,
        offset: u64::MAX,
        ..Fsmap::default()
    };
    let mut out = Vec::new();
    // Bounded: a range of a few pages has a few records.
    for _ in 0..64 {
        head.entries = 0;
        // SAFETY: a struct fsmap_head with room for `count` records.
        let rc =
            unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFSMAP, &mut *head as *mut FsmapHead) };
        if rc != 0 {
            return Err(format!("GETFSMAP: {}", std::io::Error::last_os_error()));
        }
        let n = (head.entries as usize).min(FSMAP_BATCH);
        if n == 0 {
            break;
        }
        for r in &head.recs[..n] {
            if r.device != dev {
                continue;
            }
            let (kind, what) = classify(r.flags, r.owner);
            out.push(SpaceRec {
                physical: r.physical,
                len: r.length,
                kind,
                what,
            });
        }
        let last = head.recs[n - 1];
        if last.flags & FMR_OF_LAST != 0 {
            break;
        }
        // fsmap_advance: continue after the last record.
        head.keys[0] = last;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::fake::FakeSpace;

    fn mnt() -> Mount {
        crate::os::fake::mount("/mnt/x")
    }

    #[test]
    fn a_range_under_two_reflinked_files_names_both_with_their_offsets() {
        let mut s = FakeSpace::default();
        // a and b share the extent at 1 MiB (file offset 0 of a, 64 KiB of b).
        s.file("/mnt/x/a", 11, &[(0, 1 << 20, 256 << 10, true)]);
        s.file("/mnt/x/b", 12, &[(64 << 10, 1 << 20, 256 << 10, true)]);
        s.file("/mnt/x/c", 13, &[(0, 4 << 20, 4096, false)]);
        let bad = ((1 << 20) + 8192, (1 << 20) + 12288);
        let (files, rest, errs) = locate(&s, &mnt(), bad.0, bad.1);
        assert!(errs.is_empty() && rest.is_empty(), "{rest:?}");
        assert_eq!(
            files,
            vec![
                BadFile {
                    path: "/mnt/x/a".into(),
                    ino: 11,
                    offset: 8192,
                    end: 12288,
                    shared: true
                },
                BadFile {
                    path: "/mnt/x/b".into(),
                    ino: 12,
                    offset: (64 << 10) + 8192,
                    end: (64 << 10) + 12288,
                    shared: true
                },
            ]
        );
    }

    #[test]
    fn what_no_file_covers_is_what_the_fs_map_says() {
        let mut s = FakeSpace::default();
        s.file("/mnt/x/a", 11, &[(0, 8192, 4096, false)]);
        s.rec(0, 4096, SpaceKind::Metadata, "superblock");
        s.rec(12288, 1 << 20, SpaceKind::Free, "free space");
        // 0..4096 metadata, 4096..8192 nothing said, 8192..12288 file, 12288.. free
        let (files, rest, _) = locate(&s, &mnt(), 0, 16384);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].offset, 0);
        let kinds: Vec<(SpaceKind, u64, u64)> = rest
            .iter()
            .map(|r| (r.kind, r.dev_offset, r.dev_end))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (SpaceKind::Metadata, 0, 4096),
                (SpaceKind::Unknown, 4096, 8192),
                (SpaceKind::Free, 12288, 16384)
            ]
        );
    }

    #[test]
    fn free_space_names_no_file_and_a_refused_map_says_so() {
        let mut s = FakeSpace::default();
        s.file("/mnt/x/a", 11, &[(0, 0, 4096, false)]);
        s.rec(1 << 20, 1 << 20, SpaceKind::Free, "free space");
        let (files, rest, _) = locate(&s, &mnt(), 1 << 20, (1 << 20) + 512);
        assert!(files.is_empty());
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].kind, SpaceKind::Free);
        s.refuse("Operation not supported");
        let (_, rest, _) = locate(&s, &mnt(), 1 << 20, (1 << 20) + 512);
        assert_eq!(rest[0].kind, SpaceKind::Unknown);
        assert!(rest[0].what.contains("Operation not supported"));
    }

    /// The record flags of include/uapi/linux/fsmap.h (0x8 is FMR_OF_SHARED: a shared
    /// extent of a file, not a special owner). Seen in the VM: ext4 free space is owner 1
    /// with flags 0x10, the xfs log owner ('X', 2).
    #[test]
    fn records_are_classified_by_their_special_owner_flag() {
        assert_eq!(classify(0x10, 1), (SpaceKind::Free, "free space".into()));
        assert_eq!(
            classify(0x10, 377_957_122_050),
            (SpaceKind::Metadata, "journalling log".into())
        );
        let (k, w) = classify(0x8, 133);
        assert_eq!(k, SpaceKind::Unknown);
        assert!(w.contains("inode 133"), "{w}");
    }

    #[test]
    fn special_owners_are_named() {
        assert_eq!(owner_name(1).0, SpaceKind::Free);
        assert_eq!(owner_name((u64::from(b'X') << 32) | 2).1, "journalling log");
        assert_eq!(owner_name((u64::from(b'f') << 32) | 3).1, "block bitmap");
        assert_eq!(
            encode_dev(crate::topology::DevId {
                major: 259,
                minor: 0
            }),
            259 << 8
        );
    }

    #[test]
    fn fiemap_reads_a_real_files_extents_or_says_why_not() {
        // The host's file system may not support FIEMAP (overlayfs, tmpfs): either way no
        // panic and, when it does, the extents cover the written bytes.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 3 * 4096]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        f.sync_all().unwrap();
        if let Ok(ext) = fiemap(&f) {
            let total: u64 = ext.iter().map(|e| e.len).sum();
            assert!(ext.is_empty() || total >= 3 * 4096, "{total}");
        }
    }
}
