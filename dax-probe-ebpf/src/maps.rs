//! Maps and globals shared by all programs.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use dax_probe_common::{
    COUNTER_SLOTS, Counter, DEVICE_RING_BYTES, EVENTS_RING_BYTES, FENCE_EXCLUDE_ENTRIES,
    FaultEvent, FenceCommKey, FencePidKey, GUARDED_ENTRIES, GuardKey, KernelLayout, TASK_COMM_LEN,
};

/// Faults and page-table events (ordered across CPUs, one reader).
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Departures, memory failures, kernel signals, denied mappings: a ring of their own so a
/// fault storm that fills [`EVENTS`] can neither drop nor delay them.
#[map(name = "DEVICE_EVENTS")]
pub static DEVICE_EVENTS: RingBuf = RingBuf::with_byte_size(DEVICE_RING_BYTES, 0);

/// Per-CPU counters, indexed by [`Counter`].
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// What the insert hook saw for the fault in progress on this CPU. Insert and fault-done
/// run microseconds apart in the same task; the slot remembers the task and the `vm_fault`
/// so that a fault that was preempted or migrated in between is not given another fault's
/// pfn (it goes out without one, is counted, and the agent looks the pfn up in pagemap).
/// A per-CPU slot costs a fraction of a hash-map update on the hottest path we hook.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct InsertStash {
    pub tid: u64,
    pub vmf: u64,
    pub pfn: u64,
    pub entry_flags: u64,
}

#[map(name = "INSERT_STASH")]
pub static INSERT_STASH: PerCpuArray<InsertStash> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's fault range still being extended (`pages == 0`: none). See `fault.rs`.
#[map(name = "PENDING")]
pub static PENDING: PerCpuArray<FaultEvent> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: boot time of the latest DAX page-table change (zap, copy-on-write, mremap) on any
/// CPU. A pending range that started before it is emitted instead of extended, so a range
/// never spans a change of the mappings it describes (the agent re-reads the rare range
/// that reaches it after such a change anyway: a plain store here can lose a race with
/// another CPU's store, never a page).
#[map(name = "LAST_CHANGE")]
pub static LAST_CHANGE: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn last_change() -> u64 {
    LAST_CHANGE.get(0).copied().unwrap_or(0)
}

#[inline(always)]
pub fn note_change(ts_ns: u64) {
    if let Some(slot) = LAST_CHANGE.get_ptr_mut(0) {
        // SAFETY: an aligned 8-byte store into a map value.
        unsafe { core::ptr::write_volatile(slot, ts_ns) };
    }
}

/// Flags for submitting a reserved event of `size` bytes: wake the reader only when this
/// event takes the unread data across the watermark. Edge-triggered, so a reader that is
/// slow (or stopped) is woken once per crossing, not once per event: a wakeup costs more
/// than the fault it reports. Below the watermark the reader's poll timer collects events.
#[inline(always)]
pub fn submit_flags(size: u64) -> u64 {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    // Reserved records count as available data already; add the 8-byte record header.
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA);
    let mark = crate::lay!(wakeup_bytes) as u64;
    if avail >= mark && avail < mark + size + 8 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Filled by the agent from the running kernel's BTF before load (read-only data).
#[unsafe(no_mangle)]
pub static LAYOUT: KernelLayout = KernelLayout::ZERO;

/// Processes (tgids) that hold DAX pages: only their forks and mremaps are reported. The
/// fault program adds a process the moment it maps a DAX page (so a fork right after its
/// first fault is not missed); the agent adds the holders its start-up scan finds and
/// removes processes that are gone.
#[map(name = "WATCHED")]
pub static WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// A device-dax fault between its entry and return probes, keyed by thread id (a fault may
/// sleep and migrate; these are rare enough for a hash map).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevdaxStash {
    pub vmf: u64,
    pub size: u64,
}

#[map(name = "DEVDAX_STASH")]
pub static DEVDAX_STASH: HashMap<u32, DevdaxStash> = HashMap::with_max_entries(4096, 0);

/// The `struct device` whose nvdimm-bus remove is running, by thread id, until its managed
/// resources are released (a kretprobe has no arguments).
#[map(name = "REMOVE_STASH")]
pub static REMOVE_STASH: HashMap<u32, u64> = HashMap::with_max_entries(256, 0);

/// User registers of an mremap in flight, by thread id (kprobe fallback).
#[map(name = "MREMAP_STASH")]
pub static MREMAP_STASH: HashMap<u32, u64> = HashMap::with_max_entries(1024, 0);

/// Marks the current process as a DAX holder (cheap when it already is one).
#[inline(always)]
pub fn watch(tgid: u32) {
    // SAFETY: read-only peek at a plain value.
    if unsafe { WATCHED.get(tgid) }.is_none() && WATCHED.insert(tgid, 1, 0).is_err() {
        count(Counter::WatchedFull);
    }
}

#[inline(always)]
pub fn watched(tgid: u32) -> bool {
    // SAFETY: read-only peek at a plain value.
    unsafe { WATCHED.get(tgid) }.is_some()
}

/// Reserves, fills and submits one event; counts it as dropped if the ring is full.
#[inline(always)]
pub fn emit<T: 'static>(event: T) {
    emit_with(event, submit_flags(core::mem::size_of::<T>() as u64));
}

/// Emits and wakes the reader at once: device departures and memory failures must reach
/// the agent within microseconds, not at its next poll.
#[inline(always)]
pub fn emit_urgent<T: 'static>(event: T) {
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    count(Counter::Attempted);
    match DEVICE_EVENTS.reserve::<T>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(BPF_RB_FORCE_WAKEUP);
        }
        None => {
            // Counted in both: RingFull stays "every event lost", so attempted = delivered
            // + RingFull still holds.
            count(Counter::RingFull);
            count(Counter::DeviceRingFull);
        }
    }
}

#[inline(always)]
fn emit_with<T: 'static>(event: T, flags: u64) {
    count(Counter::Attempted);
    match EVENTS.reserve::<T>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(flags);
        }
        None => count(Counter::RingFull),
    }
}

/// Fenced devices: kernel `dev_t` → signal for a task that faults on it (0: none).
#[map(name = "FENCED")]
pub static FENCED: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

/// Slot 0 non-zero while any device is fenced, so the fault path pays for a hash lookup
/// only then.
#[map(name = "FENCE_ACTIVE")]
pub static FENCE_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Is any device fenced? One array lookup: what every mmap and fault of the machine pays
/// while nothing is.
#[inline(always)]
pub fn fence_active() -> bool {
    FENCE_ACTIVE.get(0).copied().unwrap_or(0) != 0
}

#[inline(always)]
pub fn fence_signal(dev: u32) -> Option<u32> {
    if !fence_active() {
        return None;
    }
    // SAFETY: plain value.
    unsafe { FENCED.get(dev) }.copied()
}

/// Processes the fence must not signal, by (device, comm): the policy's exclusions for the
/// device's rule, written by the agent before it fences the device.
#[map(name = "FENCE_EXCLUDE_COMM")]
pub static FENCE_EXCLUDE_COMM: HashMap<FenceCommKey, u32> =
    HashMap::with_max_entries(FENCE_EXCLUDE_ENTRIES, 0);

/// Processes the fence must not signal, by (device, tgid): `pid:` exclusions, PID 1 and
/// the agent.
#[map(name = "FENCE_EXCLUDE_PID")]
pub static FENCE_EXCLUDE_PID: HashMap<FencePidKey, u32> =
    HashMap::with_max_entries(FENCE_EXCLUDE_ENTRIES, 0);

/// When the fence last signalled a process for a fault on a device (boot ns).
#[map(name = "FENCE_LAST")]
pub static FENCE_LAST: LruHashMap<FencePidKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// A process that keeps faulting on a fenced device (a SIGBUS handler that returns refaults
/// at once) is signalled, and reported, at most once per this many ns: a standard signal
/// still pending absorbs repeats anyway, and one report per fault would flood the device
/// ring and crowd out the departure events it exists for.
const FENCE_REPEAT_NS: u64 = 100_000_000;

/// Is this a repeat within [`FENCE_REPEAT_NS`] of the last signal to `tgid` for `dev`? If
/// not, `now` becomes the last.
#[inline(always)]
pub fn fence_repeat(dev: u32, tgid: u32, now: u64) -> bool {
    let key = FencePidKey { dev, tgid };
    // SAFETY: read-only peek at a plain value.
    if let Some(last) = unsafe { FENCE_LAST.get(&key) }
        && now.saturating_sub(*last) < FENCE_REPEAT_NS
    {
        return true;
    }
    let _ = FENCE_LAST.insert(&key, &now, 0);
    false
}

/// Does the policy exclude this task from the fence of `dev`? `comm` is the faulting
/// thread's (the agent matches the process's; they differ only for a thread that renamed
/// itself).
#[inline(always)]
pub fn fence_excluded(dev: u32, tgid: u32, comm: &[u8; TASK_COMM_LEN]) -> bool {
    // SAFETY: read-only peeks at plain values.
    unsafe {
        FENCE_EXCLUDE_PID.get(&FencePidKey { dev, tgid }).is_some()
            || FENCE_EXCLUDE_COMM
                .get(&FenceCommKey { dev, comm: *comm })
                .is_some()
    }
}

/// Device names the unbind guard protects now (see `guard.rs`), written by the agent.
#[map(name = "GUARDED")]
pub static GUARDED: HashMap<GuardKey, u32> = HashMap::with_max_entries(GUARDED_ENTRIES, 0);

/// The guard's settings: the agent's tgid, and whether anything is guarded at all.
#[map(name = "GUARD_CONF")]
pub static GUARD_CONF: Array<u32> = Array::with_max_entries(2, 0);

/// One field of [`LAYOUT`]. Volatile: the value is patched into .rodata at load time, and
/// without it the compiler would constant-fold the zero initialiser. One field at a time:
/// a volatile read of the whole 184-byte struct costs 46 loads, on every call, on the
/// hottest paths we hook (the verifier turns a frozen .rodata load into a constant, but only
/// the loads that are there).
#[macro_export]
macro_rules! lay {
    ($($f:tt)+) => {{
        // SAFETY: a plain read of a read-only global.
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&raw const $crate::maps::LAYOUT.$($f)+) };
        v
    }};
}

/// Adds `n` to a counter (a range's pages, once per range).
#[inline(always)]
pub fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: a plain add is race-free.
        unsafe { *slot += n };
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU touches it, a plain add is race-free.
        unsafe { *slot += 1 };
    }
}
