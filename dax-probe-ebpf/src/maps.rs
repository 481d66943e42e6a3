//! Maps and globals shared by all programs.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use dax_probe_common::{COUNTER_SLOTS, Counter, EVENTS_RING_BYTES, KernelLayout};

/// Every event goes out through this one ring buffer (ordered across CPUs, one reader).
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Per-CPU counters, indexed by [`Counter`].
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// What the insert hook saw for a fault still in progress, keyed by thread id. A fault can
/// sleep and migrate between CPUs, so a per-CPU slot would be wrong; LRU keeps a thread that
/// died mid-fault from leaking an entry forever.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct InsertStash {
    pub vmf: u64,
    pub pfn: u64,
    pub entry_flags: u64,
}

#[map(name = "INSERT_STASH")]
pub static INSERT_STASH: LruHashMap<u32, InsertStash> = LruHashMap::with_max_entries(16384, 0);

/// Filled by the agent from the running kernel's BTF before load (read-only data).
#[unsafe(no_mangle)]
pub static LAYOUT: KernelLayout = KernelLayout {
    ready: 0,
    vmf_vma: 0,
    vmf_address: 0,
    vmf_pgoff: 0,
    vmf_flags: 0,
    vma_start: 0,
    vma_end: 0,
    vma_flags: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    _reserved: [0; 3],
    pfn_mask: 0,
};

#[inline(always)]
pub fn layout() -> KernelLayout {
    // Volatile: the value is patched into .rodata at load time; without it the compiler would
    // constant-fold the zero initialiser above.
    unsafe { core::ptr::read_volatile(&raw const LAYOUT) }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU touches it, a plain add is race-free.
        unsafe { *slot += 1 };
    }
}
