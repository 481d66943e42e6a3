//! Reading holders from procfs: which vmas of a process are DAX (from `/proc/PID/maps` and
//! the topology) and which of their pages are present, at which pfn (`/proc/PID/pagemap`).
//!
//! This is the start-up scan, the one-shot `holders` answer, the resync after events the
//! kernel cannot describe page by page (fork, mremap) and the reconciler's ground truth.
//! Access goes through [`Procfs`] so the logic is tested on fixture data.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use super::map::{F_HUGE, F_SHARED, FileKey, Run};
use crate::topology::{DaxOption, DevId, Mode, Topology};

/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub shared: bool,
    pub write: bool,
    /// File offset of `start`.
    pub offset: u64,
    pub dev: DevId,
    pub ino: u64,
    pub path: String,
}

/// What procfs offers the scanner.
pub trait Procfs {
    fn pids(&self) -> Vec<u32>;
    fn maps(&self, pid: u32) -> io::Result<Vec<Vma>>;
    /// Raw pagemap entries for `npages` pages from virtual page `vpage`.
    fn pagemap(&self, pid: u32, vpage: u64, npages: u64) -> io::Result<Vec<u64>>;
    /// (start time in clock ticks, comm).
    fn stat(&self, pid: u32) -> Option<(u64, String)>;
}

/// The live /proc below a root.
pub struct LiveProc {
    pub root: PathBuf,
}

impl LiveProc {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.join("proc"),
        }
    }
}

impl Procfs for LiveProc {
    fn pids(&self) -> Vec<u32> {
        std::fs::read_dir(&self.root)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn maps(&self, pid: u32) -> io::Result<Vec<Vma>> {
        let text = std::fs::read_to_string(self.root.join(format!("{pid}/maps")))?;
        Ok(text.lines().filter_map(parse_maps_line).collect())
    }

    fn pagemap(&self, pid: u32, vpage: u64, npages: u64) -> io::Result<Vec<u64>> {
        let f = File::open(self.root.join(format!("{pid}/pagemap")))?;
        let mut buf = vec![0u8; npages as usize * 8];
        f.read_exact_at(&mut buf, vpage * 8)?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    fn stat(&self, pid: u32) -> Option<(u64, String)> {
        let text = std::fs::read_to_string(self.root.join(format!("{pid}/stat"))).ok()?;
        parse_stat(&text)
    }
}

/// `pid (comm) state ppid …`: comm may hold spaces and parentheses, so split at the last ')'.
pub fn parse_stat(text: &str) -> Option<(u64, String)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    // Field 22 (starttime) is the 20th after the comm.
    let start = text[close + 1..].split_whitespace().nth(19)?.parse().ok()?;
    Some((start, comm))
}

/// `7f..-7f.. rw-s 00000000 103:01 12 /mnt/ext4/file`
pub fn parse_maps_line(line: &str) -> Option<Vma> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let ino = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    Some(Vma {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        shared: perms.as_bytes().get(3) == Some(&b's'),
        write: perms.as_bytes().get(1) == Some(&b'w'),
        offset,
        dev: DevId {
            major: u32::from_str_radix(maj, 16).ok()?,
            minor: u32::from_str_radix(min, 16).ok()?,
        },
        ino,
        path,
    })
}

/// Decides which vmas map DAX memory, and what they map.
pub struct Classifier<'a> {
    pub topology: &'a Topology,
}

impl Classifier<'_> {
    /// The file (or device-dax device) a vma maps, when that is DAX memory.
    pub fn dax_file(&self, v: &Vma) -> Option<FileKey> {
        if v.ino == 0 {
            return None;
        }
        if let Some(name) = v.path.strip_prefix("/dev/") {
            let ns = self.topology.namespaces.iter().find(|n| {
                n.mode == Mode::Devdax && n.chardev.as_ref().is_some_and(|(c, _)| c == name)
            })?;
            let (_, dev) = ns.chardev.as_ref()?;
            return Some(FileKey { dev: *dev, ino: 0 });
        }
        let m = self.topology.mount_of_dev(v.dev)?;
        // Only files on a live DAX device: a file system whose device was pulled stays
        // mounted, but its pages belong to no device any more (`audit` finds those), and on
        // kernels without devmap entries even reading their page tables oopses.
        if !self
            .topology
            .namespace_of_block(v.dev)
            .is_some_and(|n| n.enabled && matches!(n.mode, Mode::Fsdax))
        {
            return None;
        }
        match m.dax {
            DaxOption::Always => Some(FileKey {
                dev: v.dev,
                ino: v.ino,
            }),
            // Per-file DAX: ask the file itself.
            DaxOption::Inode if is_dax_path(&v.path) => Some(FileKey {
                dev: v.dev,
                ino: v.ino,
            }),
            _ => None,
        }
    }

    fn on_dax_device(&self, pfn: u64) -> bool {
        self.topology
            .namespace_of_pfn(pfn)
            .is_some_and(|n| matches!(n.mode, Mode::Fsdax | Mode::Devdax))
    }
}

fn is_dax_path(path: &str) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const STATX_ATTR_DAX: u64 = 0x0020_0000;
    let Ok(c) = std::ffi::CString::new(Path::new(path).as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statx is a valid out-parameter; c is NUL-terminated.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, 0, &mut stx) };
    rc == 0 && stx.stx_attributes & STATX_ATTR_DAX != 0
}

const PM_PRESENT: u64 = 1 << 63;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Present DAX pages of the DAX vmas of `pid` inside virtual pages `[vstart, vend)`, as
/// runs. Pages whose pfn is not on a DAX device (copy-on-write copies, the zero page) are
/// not DAX holdings and are left out.
/// Paths of the DAX files seen, by key (maps name them; events only carry dev and inode).
pub type Paths = std::collections::HashMap<FileKey, String>;

pub fn runs_in(
    proc: &dyn Procfs,
    class: &Classifier,
    pid: u32,
    vstart: u64,
    vend: u64,
    paths: &mut Paths,
) -> io::Result<Vec<(FileKey, Run)>> {
    let mut out = Vec::new();
    for v in proc.maps(pid)? {
        let Some(file) = class.dax_file(&v) else {
            continue;
        };
        if !v.path.is_empty() {
            paths
                .entry(file)
                .or_insert_with(|| v.path.trim_end_matches(" (deleted)").to_string());
        }
        let s = (v.start >> 12).max(vstart);
        let e = (v.end >> 12).min(vend);
        if s >= e {
            continue;
        }
        let entries = proc.pagemap(pid, s, e - s)?;
        let pgoff0 = (v.offset >> 12) + (s - (v.start >> 12));
        let flags = if v.shared { F_SHARED } else { 0 };
        let mut cur: Option<Run> = None;
        for (i, &pm) in entries.iter().enumerate() {
            let pfn = pm & PM_PFN_MASK;
            let present = pm & PM_PRESENT != 0 && pfn != 0 && class.on_dax_device(pfn);
            let vpage = s + i as u64;
            match (&mut cur, present) {
                (Some(r), true) if r.pfn + r.npages == pfn && r.vpage + r.npages == vpage => {
                    r.npages += 1;
                }
                (_, true) => {
                    if let Some(r) = cur.take() {
                        out.push((file, r));
                    }
                    cur = Some(Run {
                        vpage,
                        pfn,
                        pgoff: pgoff0 + i as u64,
                        npages: 1,
                        flags,
                    });
                }
                (_, false) => {
                    if let Some(r) = cur.take() {
                        out.push((file, r));
                    }
                }
            }
        }
        if let Some(r) = cur.take() {
            out.push((file, r));
        }
    }
    // Runs covering whole aligned 2 MiB blocks were, in all likelihood, PMD mappings:
    // pagemap cannot say, and the flag only decides how a partial unmap is re-checked.
    for (_, r) in out.iter_mut() {
        if r.npages >= 512 && r.vpage % 512 == 0 && r.pfn % 512 == 0 {
            r.flags |= F_HUGE;
        }
    }
    Ok(out)
}

/// Every DAX vma range of `pid`, as virtual page ranges.
pub fn dax_vranges(proc: &dyn Procfs, class: &Classifier, pid: u32) -> io::Result<Vec<(u64, u64)>> {
    Ok(proc
        .maps(pid)?
        .iter()
        .filter(|v| class.dax_file(v).is_some())
        .map(|v| (v.start >> 12, v.end >> 12))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let v = parse_maps_line("7f1c2e600000-7f1c2ea00000 rw-s 00200000 103:01 12 /mnt/ext4/a b")
            .unwrap();
        assert_eq!(v.start, 0x7f1c2e600000);
        assert_eq!(v.end, 0x7f1c2ea00000);
        assert!(v.shared && v.write);
        assert_eq!(v.offset, 0x200000);
        assert_eq!(
            v.dev,
            DevId {
                major: 259,
                minor: 1
            }
        );
        assert_eq!(v.ino, 12);
        assert_eq!(v.path, "/mnt/ext4/a b");
        let anon = parse_maps_line("7ffd1000-7ffd2000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(anon.ino, 0);
        assert!(!anon.shared);
        assert!(parse_maps_line("garbage").is_none());
    }

    #[test]
    fn parses_stat_with_awkward_comm() {
        let stat =
            "42 (my (odd) prog) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(stat), Some((98765, "my (odd) prog".into())));
    }
}
