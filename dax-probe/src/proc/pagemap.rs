//! `/proc/PID/pagemap`: the kernel's own answer to "which pfn backs this address".
//!
//! Root (CAP_SYS_ADMIN) is needed to see pfns; without it the kernel reports them as zero,
//! which we treat as "unknown", never as pfn 0.

use std::{
    borrow::Borrow,
    fs::File,
    io,
    ops::ControlFlow,
    os::unix::{fs::FileExt, io::AsRawFd},
    path::Path,
};

use crate::probe::decode::PfnLookup;

/// Looks pfns up in the live process's pagemap.
pub struct PagemapLookup;

/// The pfn mapped at `address` in process `pid`, if present.
pub fn pfn_at(pid: u32, address: u64) -> Option<u64> {
    let proc = procfs::process::Process::new(pid as i32).ok()?;
    let mut pm = proc.pagemap().ok()?;
    match pm.get_info((address / 4096) as usize).ok()? {
        procfs::process::PageInfo::MemoryPage(flags) => {
            let pfn = flags.get_page_frame_number().0;
            (flags.contains(procfs::process::MemoryPageFlags::PRESENT) && pfn != 0).then_some(pfn)
        }
        procfs::process::PageInfo::SwapPage(_) => None,
    }
}

impl PfnLookup for PagemapLookup {
    fn pfn_of(&self, pid: u32, address: u64) -> Option<u64> {
        pfn_at(pid, address)
    }
}

// ---- bounded, chunked reading -----------------------------------------------------------
//
// A mapping's size is chosen by whoever maps it: any unprivileged user can map 64 TiB of a
// 16 KiB file. Everything that walks page tables goes through [`visit_present`], whose
// memory is one fixed buffer whatever the size of the range, and which asks the source to
// skip runs of non-present pages so that time follows what is mapped, not what is reserved.

/// Bit 63 of a pagemap entry: the page is present.
pub const PM_PRESENT: u64 = 1 << 63;
/// Bits 0-54: the pfn (zero without CAP_SYS_ADMIN).
pub const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// Entries read at a time (32 KiB of buffer).
pub const CHUNK_PAGES: usize = 4096;

/// Where pagemap entries come from: the live file, or a fixture.
pub trait PagemapSource {
    /// Fills `out` with the entries of virtual pages `[vpage, vpage + out.len())`;
    /// `out.len()` is never above [`CHUNK_PAGES`].
    fn read(&mut self, vpage: u64, out: &mut [u64]) -> io::Result<()>;
    /// The first page in `[vpage, vend)` that may be present, `None` when none is. The
    /// default knows nothing and answers `vpage`: every page is then read.
    fn next_present(&mut self, vpage: u64, _vend: u64) -> io::Result<Option<u64>> {
        Ok(Some(vpage))
    }
}

/// Calls `f(vpage, pfn)` for every present page with a known pfn in `[vstart, vend)`, in
/// order, until `f` breaks. Returns whether it broke.
pub fn visit_present(
    src: &mut dyn PagemapSource,
    vstart: u64,
    vend: u64,
    mut f: impl FnMut(u64, u64) -> ControlFlow<()>,
) -> io::Result<ControlFlow<()>> {
    let mut buf = [0u64; CHUNK_PAGES];
    let mut pos = vstart;
    while pos < vend {
        match src.next_present(pos, vend)? {
            Some(p) if p < vend => pos = pos.max(p),
            _ => break,
        }
        let n = (vend - pos).min(CHUNK_PAGES as u64) as usize;
        src.read(pos, &mut buf[..n])?;
        for (i, &pm) in buf[..n].iter().enumerate() {
            let pfn = pm & PM_PFN_MASK;
            // pfn 0 is what the kernel reports to the unprivileged: unknown, never pfn 0.
            if pm & PM_PRESENT != 0 && pfn != 0 && f(pos + i as u64, pfn).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        pos += n as u64;
    }
    Ok(ControlFlow::Continue(()))
}

/// `/proc/PID/pagemap`, opened once for a walk.
pub struct LivePagemap<F: Borrow<File> = File> {
    file: F,
    /// PAGEMAP_SCAN (Linux 6.7) works on this kernel; cleared at its first failure.
    scan: bool,
}

impl LivePagemap {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self::over(File::open(path)?))
    }
}

impl<F: Borrow<File>> LivePagemap<F> {
    /// Over a pagemap already open (a pinned holder's).
    pub fn over(file: F) -> Self {
        Self { file, scan: true }
    }
}

/// `struct pm_scan_arg` (include/uapi/linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;

impl<F: Borrow<File>> PagemapSource for LivePagemap<F> {
    fn read(&mut self, vpage: u64, out: &mut [u64]) -> io::Result<()> {
        let mut bytes = [0u8; CHUNK_PAGES * 8];
        let bytes = &mut bytes[..out.len() * 8];
        let off = vpage
            .checked_mul(8)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.file.borrow().read_exact_at(bytes, off)?;
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            *o = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        Ok(())
    }

    /// Asks the kernel for the first present region, so a huge sparse mapping costs one
    /// page-table walk instead of 8 bytes of output per reserved page.
    fn next_present(&mut self, vpage: u64, vend: u64) -> io::Result<Option<u64>> {
        if !self.scan {
            return Ok(Some(vpage));
        }
        let (Some(start), Some(end)) = (vpage.checked_mul(4096), vend.checked_mul(4096)) else {
            return Ok(Some(vpage));
        };
        let mut region = PageRegion::default();
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            start,
            end,
            vec: &mut region as *mut PageRegion as u64,
            vec_len: 1,
            category_mask: PAGE_IS_PRESENT,
            return_mask: PAGE_IS_PRESENT,
            ..Default::default()
        };
        // SAFETY: arg and region are valid for the call; the kernel writes at most vec_len
        // regions into region and updates arg.walk_end.
        let rc = unsafe {
            libc::ioctl(
                self.file.borrow().as_raw_fd(),
                PAGEMAP_SCAN as _,
                &mut arg as *mut PmScanArg,
            )
        };
        if rc < 0 {
            // Older kernel (ENOTTY/EINVAL) or a mapping it will not scan: read everything.
            self.scan = false;
            return Ok(Some(vpage));
        }
        if rc > 0 {
            return Ok(Some(region.start / 4096));
        }
        // Nothing present up to where the walk ended: normally `end`; should the kernel stop
        // early, continue from there (still progress, never a skipped page).
        Ok((arg.walk_end < end).then_some(arg.walk_end.max(start) / 4096))
    }
}
