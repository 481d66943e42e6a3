//! `/proc/PID/pagemap`: the kernel's own answer to "which pfn backs this address".
//!
//! Root (CAP_SYS_ADMIN) is needed to see pfns; without it the kernel reports them as zero,
//! which we treat as "unknown", never as pfn 0.

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
