//! Reading holders from procfs: which vmas of a process are DAX (from `/proc/PID/maps` and
//! the topology) and which of their pages are present, at which pfn (`/proc/PID/pagemap`).
//!
//! This is the start-up scan, the one-shot `holders` answer, the resync after events the
//! kernel cannot describe page by page (fork, mremap) and the reconciler's ground truth.
//! Access goes through [`Procfs`] so the logic is tested on fixture data.

use std::{
    io,
    ops::ControlFlow,
    path::{Path, PathBuf},
};

use super::map::{F_HUGE, F_SHARED, FileKey, Run};
use crate::{
    proc::pagemap::{LivePagemap, PM_PFN_MASK, PM_PRESENT, PagemapSource, visit_present},
    topology::{DaxOption, DevId, Mode, Topology},
};

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

impl Vma {
    /// Does this vma cover the virtual address `addr`?
    pub fn covers(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// What procfs offers the scanner.
pub trait Procfs {
    fn pids(&self) -> Vec<u32>;
    fn maps(&self, pid: u32) -> io::Result<Vec<Vma>>;
    /// The pagemap of `pid`, read through [`visit_present`] in bounded chunks (a mapping's
    /// size is the mapper's choice, and may be 64 TiB of a 16 KiB file).
    fn pagemap(&self, pid: u32) -> io::Result<Box<dyn PagemapSource + '_>>;
    /// (start time in clock ticks, comm).
    fn stat(&self, pid: u32) -> Option<(u64, String)>;
    /// The vma of `pid` that covers `addr`, if any. The live procfs asks the kernel for that
    /// one vma (`PROCMAP_QUERY`, 6.11+); the default reads every line of the maps.
    fn vma_at(&self, pid: u32, addr: u64) -> io::Result<Option<Vma>> {
        Ok(self.maps(pid)?.into_iter().find(|v| v.covers(addr)))
    }
    /// The size of the regular file `pid` maps at `v` (through /proc/PID/map_files), if it
    /// can be read: no page past the end of a file is ever mapped, so no page table past it
    /// needs reading.
    fn file_len(&self, _pid: u32, _v: &Vma) -> Option<u64> {
        None
    }
    /// Do processes `a` and `b` use one address space (`kcmp(KCMP_VM)`)? `None` when that
    /// cannot be known (a process gone, no kcmp, a procfs that is not this machine's).
    fn same_mm(&self, _a: u32, _b: u32) -> Option<bool> {
        None
    }
    /// Has process `pid` (started at `start_time`; 0: not known) exited? A pid now naming a
    /// process started at another time is another process: the one asked about is gone.
    fn gone(&self, pid: u32, start_time: u64) -> bool {
        !self
            .stat(pid)
            .is_some_and(|(s, _)| s == start_time || s == 0 || start_time == 0)
    }
    /// The text of /proc/PID/cgroup, at most [`crate::proc::cgroup::MAX_TEXT`] bytes.
    /// Sources without cgroups (recordings, test doubles) have none.
    fn cgroup(&self, _pid: u32) -> io::Result<Vec<u8>> {
        Err(io::ErrorKind::Unsupported.into())
    }
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

    fn vma_at(&self, pid: u32, addr: u64) -> io::Result<Option<Vma>> {
        use crate::proc::procmap::{Answer, vma_at};
        let maps = std::fs::File::open(self.root.join(format!("{pid}/maps")))?;
        match vma_at(&maps, addr)? {
            Answer::Vma(v) => Ok(Some(v)),
            Answer::None => Ok(None),
            Answer::Unsupported => {
                let text = std::io::read_to_string(maps)?;
                Ok(text
                    .lines()
                    .filter_map(parse_maps_line)
                    .find(|v| v.covers(addr)))
            }
        }
    }

    fn pagemap(&self, pid: u32) -> io::Result<Box<dyn PagemapSource + '_>> {
        Ok(Box::new(LivePagemap::open(
            &self.root.join(format!("{pid}/pagemap")),
        )?))
    }

    fn file_len(&self, pid: u32, v: &Vma) -> Option<u64> {
        let m = std::fs::metadata(
            self.root
                .join(format!("{pid}/map_files/{:x}-{:x}", v.start, v.end)),
        )
        .ok()?;
        m.is_file().then_some(m.len())
    }

    fn stat(&self, pid: u32) -> Option<(u64, String)> {
        let text = std::fs::read_to_string(self.root.join(format!("{pid}/stat"))).ok()?;
        parse_stat(&text)
    }

    /// Gone also when it is a zombie: it exited (its page tables with it) and waits for
    /// its parent, with its pid and start time still in /proc.
    fn gone(&self, pid: u32, start_time: u64) -> bool {
        let Ok(text) = std::fs::read_to_string(self.root.join(format!("{pid}/stat"))) else {
            return true;
        };
        let state = text
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next());
        matches!(state, Some("Z" | "X"))
            || !parse_stat(&text).is_some_and(|(s, _)| s == start_time || s == 0 || start_time == 0)
    }

    fn same_mm(&self, a: u32, b: u32) -> Option<bool> {
        // kcmp asks the running kernel: meaningless for a procfs under another root.
        if self.root != Path::new("/proc") {
            return None;
        }
        if a == b {
            return Some(true);
        }
        const KCMP_VM: libc::c_long = 1;
        // SAFETY: plain syscall with integer arguments.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                a as libc::pid_t,
                b as libc::pid_t,
                KCMP_VM,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        // 0: equal; 1, 2: ordered (different); -1: a process gone or no kcmp.
        match rc {
            0 => Some(true),
            1 | 2 => Some(false),
            _ => None,
        }
    }

    fn cgroup(&self, pid: u32) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let f = std::fs::File::open(self.root.join(format!("{pid}/cgroup")))?;
        let mut text = Vec::new();
        f.take(crate::proc::cgroup::MAX_TEXT as u64)
            .read_to_end(&mut text)?;
        Ok(text)
    }
}

/// `pid (comm) state ppid …`: comm may hold spaces and parentheses, so split at the last ')'.
pub fn parse_stat(text: &str) -> Option<(u64, String)> {
    let open = text.find('(')?;
    // ")(": no comm at all (found by the procfs_text fuzz target; the slice below panicked).
    let close = text.rfind(')').filter(|&c| c > open)?;
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
        // A file on device-mapper over pmem counts while every member is live fsdax: its
        // pages are attributed to the member their pfns lie in, like any other.
        if !self.topology.live_dax_block(v.dev) {
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

/// Paths of the DAX files seen, by key (maps name them; events only carry dev and inode).
pub type Paths = std::collections::HashMap<FileKey, String>;

/// Present DAX pages of the DAX vmas of `pid` inside virtual pages `[vstart, vend)`, as
/// runs. Pages whose pfn is not on a DAX device (copy-on-write copies, the zero page) are
/// not DAX holdings and are left out.
pub fn runs_in(
    proc: &dyn Procfs,
    class: &Classifier,
    pid: u32,
    vstart: u64,
    vend: u64,
    paths: &mut Paths,
) -> io::Result<Vec<(FileKey, Run)>> {
    let mut out: Vec<(FileKey, Run)> = Vec::new();
    visit_runs(proc, class, pid, vstart, vend, paths, |file, r| {
        out.push((file, r));
        ControlFlow::Continue(())
    })?;
    // Runs covering whole aligned 2 MiB blocks were, in all likelihood, PMD mappings:
    // pagemap cannot say, and the flag only decides how a partial unmap is re-checked.
    for (_, r) in out.iter_mut() {
        if r.npages >= 512 && r.vpage % 512 == 0 && r.pfn % 512 == 0 {
            r.flags |= F_HUGE;
        }
    }
    Ok(out)
}

/// The pages of `v` (`[start, end)`, page numbers) whose page tables can hold anything:
/// the whole vma, or, for a mapping of a regular file, only the part up to the file's
/// end. Without this a user's 64 TiB mapping of a 16 KiB file costs 16 Gi pagemap entries
/// per walk on kernels without PAGEMAP_SCAN (before 6.7): minutes of an agent held up.
pub fn walk_range(proc: &dyn Procfs, pid: u32, v: &Vma) -> (u64, u64) {
    let (s, e) = (v.start >> 12, v.end >> 12);
    match proc.file_len(pid, v) {
        Some(len) => {
            let in_file = len.div_ceil(4096).saturating_sub(v.offset >> 12);
            (s, e.min(s.saturating_add(in_file)))
        }
        None => (s, e),
    }
}

/// Is `pfn` in one of `ranges`, on a DAX device?
fn of_ranges(pfn: u64, class: &Classifier, ranges: &[(u64, u64)]) -> bool {
    ranges.iter().any(|&(s, e)| pfn >= s && pfn < e) && class.on_dax_device(pfn)
}

/// Is a page of `[vstart, vend)` (virtual page numbers) present at a DAX pfn in one of
/// `ranges`? Stops at the first.
fn present_in_ranges(
    src: &mut dyn PagemapSource,
    class: &Classifier,
    vstart: u64,
    vend: u64,
    ranges: &[(u64, u64)],
) -> io::Result<bool> {
    let flow = visit_present(src, vstart, vend, |_, pfn| {
        if of_ranges(pfn, class, ranges) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    Ok(flow.is_break())
}

/// Does one of the pages at `at` (virtual addresses the holder map says the process holds)
/// map a pfn in one of `ranges`, as its page tables `src` say? One entry read per address
/// and no maps: the guard's first try; `false` sends it to [`maps_any_pfn`].
pub fn pages_at_in_ranges(
    src: &mut dyn PagemapSource,
    class: &Classifier,
    at: &[u64],
    ranges: &[(u64, u64)],
) -> io::Result<bool> {
    for &a in at {
        let mut entry = [0u64];
        src.read(a >> 12, &mut entry)?;
        let pfn = entry[0] & PM_PFN_MASK;
        // pfn 0 is what the kernel reports to the unprivileged: unknown, never pfn 0.
        if entry[0] & PM_PRESENT != 0 && pfn != 0 && of_ranges(pfn, class, ranges) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Does `pid` map any pfn in one of `ranges` (`[start, end)`)? Stops at the first page that
/// does: the guard asks this right before a signal.
pub fn maps_any_pfn(
    proc: &dyn Procfs,
    class: &Classifier,
    pid: u32,
    ranges: &[(u64, u64)],
) -> io::Result<bool> {
    let mut pagemap: Option<Box<dyn PagemapSource + '_>> = None;
    for v in proc.maps(pid)? {
        if class.dax_file(&v).is_none() {
            continue;
        }
        let src = match &mut pagemap {
            Some(p) => p,
            None => pagemap.insert(proc.pagemap(pid)?),
        };
        let (s, e) = walk_range(proc, pid, &v);
        if present_in_ranges(src.as_mut(), class, s, e, ranges)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Calls `f` with the runs of present DAX pages of `pid` in `[vstart, vend)`, vma by vma,
/// until it breaks. Memory is bounded whatever the size of the mappings; a run is handed
/// over when it ends (a run never spans two vmas).
fn visit_runs(
    proc: &dyn Procfs,
    class: &Classifier,
    pid: u32,
    vstart: u64,
    vend: u64,
    paths: &mut Paths,
    mut f: impl FnMut(FileKey, Run) -> ControlFlow<()>,
) -> io::Result<()> {
    let mut pagemap: Option<Box<dyn PagemapSource + '_>> = None;
    for v in proc.maps(pid)? {
        let Some(file) = class.dax_file(&v) else {
            continue;
        };
        if !v.path.is_empty() {
            paths
                .entry(file)
                .or_insert_with(|| v.path.trim_end_matches(" (deleted)").to_string());
        }
        let (ws, we) = walk_range(proc, pid, &v);
        let s = ws.max(vstart);
        let e = we.min(vend);
        if s >= e {
            continue;
        }
        let src = match &mut pagemap {
            Some(p) => p,
            None => pagemap.insert(proc.pagemap(pid)?),
        };
        let pgoff0 = (v.offset >> 12).wrapping_add(s - (v.start >> 12));
        let flags = if v.shared { F_SHARED } else { 0 };
        let mut cur: Option<Run> = None;
        let flow = visit_present(src.as_mut(), s, e, |vpage, pfn| {
            if !class.on_dax_device(pfn) {
                return match cur.take() {
                    Some(r) => f(file, r),
                    None => ControlFlow::Continue(()),
                };
            }
            if let Some(r) = &mut cur
                && r.pfn + r.npages == pfn
                && r.vpage + r.npages == vpage
            {
                r.npages += 1;
                return ControlFlow::Continue(());
            }
            let prev = cur.replace(Run {
                vpage,
                pfn,
                pgoff: pgoff0.wrapping_add(vpage - s),
                npages: 1,
                flags,
            });
            match prev {
                Some(r) => f(file, r),
                None => ControlFlow::Continue(()),
            }
        })?;
        if flow.is_break() {
            return Ok(());
        }
        if let Some(r) = cur.take()
            && f(file, r).is_break()
        {
            return Ok(());
        }
    }
    Ok(())
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

    /// Files on a dm device over fsdax pmem are DAX files (the scan dropped every one of
    /// them: their `st_dev` is the dm device's, which no namespace owns); once a member is
    /// gone, or with a member that is not fsdax, they are not.
    #[test]
    fn files_on_dm_over_pmem_are_dax_while_every_member_is_live() {
        use crate::topology::stack::tests::{dm, namespaces};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        namespaces(root);
        dm(root, 0, "lin", &["pmem0", "pmem1"]);
        dm(root, 1, "mixed", &["pmem0", "pmem2"]);
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::write(
            root.join("proc/self/mountinfo"),
            "30 1 253:0 / /mnt/lin rw - ext4 /dev/mapper/lin rw,dax\n\
             31 1 253:1 / /mnt/mixed rw - ext4 /dev/mapper/mixed rw,dax\n",
        )
        .unwrap();
        let mut topo = crate::topology::Topology::read(root);
        let vma = |minor, path: &str| {
            parse_maps_line(&format!(
                "7f0000000000-7f0000400000 rw-s 00000000 fd:{minor:02x} 12 {path}"
            ))
            .unwrap()
        };
        let on_lin = vma(0, "/mnt/lin/f");
        assert_eq!(
            Classifier { topology: &topo }.dax_file(&on_lin),
            Some(FileKey {
                dev: DevId {
                    major: 253,
                    minor: 0
                },
                ino: 12
            })
        );
        assert_eq!(
            Classifier { topology: &topo }.dax_file(&vma(1, "/mnt/mixed/f")),
            None
        );
        topo.namespaces[1].enabled = false;
        assert_eq!(Classifier { topology: &topo }.dax_file(&on_lin), None);
    }

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
        assert_eq!(parse_stat("4) 0 (x"), None);
    }

    /// A process whose maps and page tables are given: pages present at `present`
    /// (vpage → pfn). Records the largest single read and the number of reads.
    pub(crate) struct Sparse {
        pub vmas: Vec<Vma>,
        pub present: std::collections::BTreeMap<u64, u64>,
        pub skips: bool,
        pub largest_read: std::cell::Cell<usize>,
        pub reads: std::cell::Cell<u64>,
        /// The mapped file's size, as /proc/PID/map_files would give it.
        pub file_len: Option<u64>,
    }

    struct SparsePagemap<'a>(&'a Sparse);

    impl PagemapSource for SparsePagemap<'_> {
        fn read(&mut self, vpage: u64, out: &mut [u64]) -> io::Result<()> {
            let s = self.0;
            s.largest_read.set(s.largest_read.get().max(out.len()));
            s.reads.set(s.reads.get() + 1);
            out.fill(0);
            for (&v, &pfn) in s.present.range(vpage..vpage + out.len() as u64) {
                out[(v - vpage) as usize] = crate::proc::pagemap::PM_PRESENT | pfn;
            }
            Ok(())
        }

        fn next_present(&mut self, vpage: u64, vend: u64) -> io::Result<Option<u64>> {
            if !self.0.skips {
                return Ok(Some(vpage));
            }
            Ok(self.0.present.range(vpage..vend).next().map(|(&v, _)| v))
        }
    }

    impl Procfs for Sparse {
        fn pids(&self) -> Vec<u32> {
            vec![42]
        }
        fn maps(&self, _pid: u32) -> io::Result<Vec<Vma>> {
            Ok(self.vmas.clone())
        }
        fn pagemap(&self, _pid: u32) -> io::Result<Box<dyn PagemapSource + '_>> {
            Ok(Box::new(SparsePagemap(self)))
        }
        fn stat(&self, _pid: u32) -> Option<(u64, String)> {
            Some((7, "huge".into()))
        }
        fn file_len(&self, _pid: u32, _v: &Vma) -> Option<u64> {
            self.file_len
        }
    }

    #[test]
    fn a_zombie_or_a_recycled_pid_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let stat = |pid: u32, state: &str, start: u64| {
            let dir = d.path().join(format!("proc/{pid}"));
            std::fs::create_dir_all(&dir).unwrap();
            // pid (comm) state ppid … field 22 is the start time.
            let mut f: Vec<String> = vec![format!("{pid}"), "(a b)".into(), state.into()];
            f.extend((4..22).map(|_| "0".to_string()));
            f.push(start.to_string());
            f.push("0".into());
            std::fs::write(dir.join("stat"), f.join(" ")).unwrap();
        };
        stat(10, "S", 500);
        stat(11, "Z", 600);
        let p = LiveProc::new(d.path());
        assert!(!p.gone(10, 500));
        assert!(p.gone(10, 501), "the pid names another process now");
        assert!(p.gone(11, 600), "a zombie's page tables went with its exit");
        assert!(p.gone(12, 700), "no such pid");
        // Not this machine's /proc: kcmp cannot tell.
        assert_eq!(p.same_mm(10, 10), None);
    }

    pub(crate) const TIB: u64 = 1 << 40;

    /// A 64 TiB shared mapping of a file on the DAX mount with pages touched at both ends.
    pub(crate) fn huge_mapping(skips: bool) -> Sparse {
        let start = 0x10_0000_0000u64;
        let vp = start >> 12;
        let pages = (64 * TIB) >> 12;
        Sparse {
            vmas: vec![Vma {
                start,
                end: start + 64 * TIB,
                shared: true,
                write: false,
                offset: 0,
                dev: DevId {
                    major: 259,
                    minor: 0,
                },
                ino: 12,
                path: "/mnt/ext4/small".into(),
            }],
            present: [
                (vp, 0x100900),
                (vp + 1, 0x100901),
                (vp + pages - 1, 0x100a00),
            ]
            .into_iter()
            .collect(),
            skips,
            largest_read: Default::default(),
            reads: Default::default(),
            file_len: None,
        }
    }

    /// Found by the hostile-unbind VM scenario on 5.10 (no PAGEMAP_SCAN): every walk of a
    /// 64 TiB mapping of a 16 KiB file read 16 Gi pagemap entries, and the agent's
    /// reconcile, `holders --scan` and `audit` did not finish in 13 minutes.
    #[test]
    fn no_page_table_past_the_end_of_the_file_is_read() {
        let topo = crate::holders::query::tests::topo();
        let class = Classifier { topology: &topo };
        let mut p = huge_mapping(false);
        p.file_len = Some(16 << 10);
        // 1 GiB of the mapping asked for: only the file's 4 pages are read, one chunk.
        let vp = 0x10_0000_0000u64 >> 12;
        let runs = runs_in(&p, &class, 42, vp, vp + (1 << 18), &mut Paths::new()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].1.npages, 2);
        assert_eq!(p.reads.get(), 1, "one chunk, not 64");
        assert!(p.largest_read.get() <= 4, "{}", p.largest_read.get());
        assert_eq!(walk_range(&p, 42, &p.vmas[0]), (vp, vp + 4));
        // A mapping that starts past the end of the file holds nothing.
        let mut past = p.vmas[0].clone();
        past.offset = 1 << 20;
        assert_eq!(walk_range(&p, 42, &past), (vp, vp));
    }

    #[test]
    fn a_64_tib_sparse_mapping_is_read_in_bounded_chunks() {
        let topo = crate::holders::query::tests::topo();
        let class = Classifier { topology: &topo };
        let p = huge_mapping(true);
        let runs = runs_in(&p, &class, 42, 0, u64::MAX >> 12, &mut Paths::new()).unwrap();
        let vp = 0x10_0000_0000u64 >> 12;
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].1.vpage, runs[0].1.pfn, runs[0].1.npages),
            (vp, 0x100900, 2)
        );
        assert_eq!(runs[1].1.pfn, 0x100a00);
        assert_eq!(runs[1].1.pgoff, ((64 * TIB) >> 12) - 1);
        assert!(p.largest_read.get() <= crate::proc::pagemap::CHUNK_PAGES);
        // Two touched places: two chunks read, not 2^34 pages.
        assert_eq!(p.reads.get(), 2);
    }

    #[test]
    fn without_skipping_every_read_is_still_one_chunk() {
        let topo = crate::holders::query::tests::topo();
        let class = Classifier { topology: &topo };
        let mut p = huge_mapping(false);
        // 1 GiB of the mapping: 64 chunks, each read into the same fixed buffer.
        let vp = 0x10_0000_0000u64 >> 12;
        let runs = runs_in(&p, &class, 42, vp, vp + (1 << 18), &mut Paths::new()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(
            p.reads.get(),
            (1 << 18) / crate::proc::pagemap::CHUNK_PAGES as u64
        );
        assert!(p.largest_read.get() <= crate::proc::pagemap::CHUNK_PAGES);
        p.reads.set(0);
        p.present.clear();
        assert!(
            runs_in(&p, &class, 42, vp, vp + 4096, &mut Paths::new())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_guard_question_stops_at_the_first_hit() {
        let topo = crate::holders::query::tests::topo();
        let class = Classifier { topology: &topo };
        let p = huge_mapping(true);
        assert!(maps_any_pfn(&p, &class, 42, &[(0x100900, 0x100901)]).unwrap());
        // The hit was in the first chunk: the page at the far end was never read.
        assert_eq!(p.reads.get(), 1);
        assert!(!maps_any_pfn(&p, &class, 42, &[(0x110000, 0x120000)]).unwrap());
    }
}
