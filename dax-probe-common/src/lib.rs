//! Types shared by the dax-probe kernel programs (`dax-probe-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, fixed-size and free of pointers so the same bytes mean the
//! same thing on both sides of the ring buffer. Every event starts with [`EventHeader`]; its
//! `kind` is one of the stable numbers in [`EventKind`] and its `size` is the size of the whole
//! record, so a reader can skip kinds it does not know. Sizes and offsets are pinned by
//! compile-time asserts below: changing a layout is a deliberate act that must bump
//! [`ABI_VERSION`].
#![no_std]

pub mod layout;

pub use layout::KernelLayout;

/// Bumped whenever an event or map layout changes. The agent refuses an object built for
/// another ABI (both are built from the same tree, so this only guards stale build outputs).
pub const ABI_VERSION: u32 = 6;

pub const TASK_COMM_LEN: usize = 16;

/// Name of the ring buffer map that carries faults and page-table events.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the ring buffer map that carries device events (departures), memory failures,
/// the kernel's machine-check signals and denied mappings: they never queue behind, or are
/// dropped because of, a fault storm.
pub const DEVICE_EVENTS_MAP: &str = "DEVICE_EVENTS";
/// Size of the device ring: thousands of device events, far more than a machine makes
/// between two polls of the reader.
pub const DEVICE_RING_BYTES: u32 = 256 << 10;
/// Name of the per-CPU array holding each CPU's fault range still being extended (one
/// [`FaultEvent`] with `pages > 0`, or `pages == 0` for none). The agent reads every CPU's
/// slot on its poll, before it answers a question and at a departure, so no range waits
/// for the next fault on its CPU to be seen.
pub const PENDING_MAP: &str = "PENDING";
/// Name of the one-slot array holding the boot time of the latest DAX page-table change
/// (zap, copy-on-write, mremap): a pending range started before it is not extended.
pub const LAST_CHANGE_MAP: &str = "LAST_CHANGE";
/// A pending range is emitted once it covers this many pages (bounds what one record says
/// and how late the agent can learn a page of a range it never polled).
pub const RANGE_MAX_PAGES: u32 = 1 << 16;
/// Name of the per-CPU counter array (see [`Counter`]).
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Name of the hash map of DAX-holding processes (tgid → 1).
pub const WATCHED_MAP: &str = "WATCHED";
/// Name of the hash map of fenced devices (kernel dev_t → signal for faulting tasks, 0 for
/// none): new mappings are denied (BPF LSM) and faults are signalled.
pub const FENCED_MAP: &str = "FENCED";
/// Name of the hash map of processes the fence must not signal, by command name
/// ([`FenceCommKey`] → 1): the policy's `exclude = ["sshd"]`.
pub const FENCE_EXCLUDE_COMM_MAP: &str = "FENCE_EXCLUDE_COMM";
/// Name of the hash map of processes the fence must not signal, by tgid ([`FencePidKey`] →
/// 1): the policy's `exclude = ["pid:42"]`, PID 1 and the agent itself.
pub const FENCE_EXCLUDE_PID_MAP: &str = "FENCE_EXCLUDE_PID";
/// Capacity of each exclusion map: a policy's list per fenced device.
pub const FENCE_EXCLUDE_ENTRIES: u32 = 1024;
/// Name of the hash map of device names the unbind guard protects right now ([`GuardKey`]
/// → 1): the bus device names (`namespace0.0`, `pfn0.0`, `dax0.0`, `region0`) of every
/// device whose policy says `guard = "refuse-unbind"` and that has holders. Written by the
/// agent as its holder map changes.
pub const GUARDED_MAP: &str = "GUARDED";
/// Name of the array that configures the guard: slot [`GUARD_SLOT_AGENT`] the agent's tgid
/// (its own writes pass, reported), slot [`GUARD_SLOT_ACTIVE`] non-zero while [`GUARDED_MAP`]
/// has any entry (so every other write on the machine pays one array lookup, no more).
pub const GUARD_CONF_MAP: &str = "GUARD_CONF";
pub const GUARD_SLOT_AGENT: u32 = 0;
pub const GUARD_SLOT_ACTIVE: u32 = 1;
/// Capacity of [`GUARDED_MAP`] (names, several per device).
pub const GUARDED_ENTRIES: u32 = 1024;
/// Bytes of a guarded name as the guard compares it (at most 31, NUL padded).
pub const GUARD_NAME_LEN: usize = 32;
/// The errno a refused unbind write fails with: the device is busy (it has holders).
pub const GUARD_ERRNO: i32 = 16; // EBUSY
/// Name of the global that carries [`KernelLayout`] into the programs.
pub const LAYOUT_GLOBAL: &str = "LAYOUT";
/// Default ring buffer size: 4 MiB holds ~35k fault events, several seconds of a fault storm
/// on a busy server before the reader has to catch up.
pub const EVENTS_RING_BYTES: u32 = 4 << 20;

/// Stable event kinds. Numbers are never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A DAX page fault completed (fsdax PTE/PMD fault, or a device-dax fault).
    Fault = 1,
    /// Page table entries of a DAX mapping were torn down (munmap, exit, exec, truncate,
    /// hole punch, mremap's source, madvise).
    Zap = 2,
    /// A process that maps DAX pages forked: the child may hold copies of its PTEs.
    Fork = 3,
    /// A process that maps DAX pages moved or resized a mapping (mremap): PTEs moved
    /// without faulting.
    Mremap = 4,
    /// A pmem/dax device is leaving (driver unbind, removal) or left; DAX access shut off;
    /// a file system was told its device fails or is about to be removed.
    Device = 5,
    /// The kernel handles a memory failure (poisoned pfn) or reports its outcome.
    MemoryFailure = 6,
    /// The kernel sends a machine-check SIGBUS to a process.
    KernelSignal = 7,
    /// A new mapping of a fenced device was denied.
    MmapDenied = 8,
    /// The fence signalled a task that faulted on a fenced device (from the fault program:
    /// the agent learns of it only afterwards).
    FenceSignal = 9,
    /// The unbind guard saw a write to an nd/dax driver's `unbind` file naming a guarded
    /// device with holders: refused, or passed because the agent wrote it.
    UnbindGuard = 10,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Fault),
            2 => Some(Self::Zap),
            3 => Some(Self::Fork),
            4 => Some(Self::Mremap),
            5 => Some(Self::Device),
            6 => Some(Self::MemoryFailure),
            7 => Some(Self::KernelSignal),
            8 => Some(Self::MmapDenied),
            9 => Some(Self::FenceSignal),
            10 => Some(Self::UnbindGuard),
            _ => None,
        }
    }
}

/// Per-CPU counters kept by the kernel programs, summed by the agent.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// An event was lost because the ring buffer was full.
    RingFull = 0,
    /// A kernel read (bpf_probe_read_kernel) failed; the event went out with zeroed fields.
    ReadFailed = 1,
    /// A fault completed without a pfn recorded by the insert hook (hole, error, fallback).
    FaultWithoutPfn = 2,
    /// Faults (pages) in the fault records the programs tried to emit, delivered or not;
    /// counted once per record (a range adds its page count), never per fault.
    FaultsSeen = 3,
    /// Records of every kind the programs tried to emit (delivered + dropped).
    Attempted = 4,
    /// Signals sent by a kernel program to a task faulting on a fenced device.
    FenceSignals = 5,
    /// Of [`Counter::RingFull`]: lost on the device ring (a departure or memory failure the
    /// agent never saw; it then re-reads the topology and page tables).
    DeviceRingFull = 6,
    /// The WATCHED map was full: a new holder is not watched (its forks and mremaps go
    /// unreported until the agent's sweep and reconcile catch up).
    WatchedFull = 7,
    /// A task faulted on a fenced device and was not signalled: the policy excludes it.
    FenceExcluded = 8,
    /// Counted by the agent, not the kernel (no slot in the kernel map): page-table events
    /// its reader dropped because the agent's queue was full (it then re-reads the page
    /// tables, as for [`Counter::RingFull`]). Device events are never dropped there.
    ChannelFull = 9,
}

/// Slots of the kernel's counter map (the agent-side counters come after).
pub const COUNTER_SLOTS: u32 = 9;

/// Common prefix of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// [`EventKind`] as a number.
    pub kind: u32,
    /// Size in bytes of the whole event including this header.
    pub size: u32,
    /// `bpf_ktime_get_boot_ns()`: nanoseconds since boot, suspend included.
    pub ts_ns: u64,
    /// Process id (kernel tgid).
    pub tgid: u32,
    /// Thread id (kernel pid).
    pub tid: u32,
    /// `comm` of the current task, NUL padded.
    pub comm: [u8; TASK_COMM_LEN],
}

/// `FaultEvent::flags`: the pfn came from the insert hook and is trustworthy.
pub const FAULT_PFN_VALID: u32 = 1 << 0;
/// `FaultEvent::flags`: the fault was a PMD (2 MiB) fault attempt.
pub const FAULT_PMD: u32 = 1 << 1;
/// `FaultEvent::flags`: a device-dax fault (`dev` is the character device, `ino` 0).
pub const FAULT_DEVDAX: u32 = 1 << 2;
/// `FaultEvent::flags`: the fault was a PUD (1 GiB) fault attempt (device-dax only).
pub const FAULT_PUD: u32 = 1 << 3;

/// `FaultEvent::fault_flags` bit for a write fault (`FAULT_FLAG_WRITE`, 1 on every kernel since
/// 2.6).
pub const FAULT_FLAG_WRITE: u32 = 1 << 0;
/// `FaultEvent::fault_flags` bit for a fault taken in user mode (`FAULT_FLAG_USER`, 1 << 6 on
/// every kernel since 5.10's `enum fault_flag`): a `VM_FAULT_SIGBUS` then becomes the arch
/// fault handler's SIGBUS (BUS_ADRERR) to the faulting thread; a kernel-mode fault (copy to
/// or from user memory, GUP) gets an error return instead.
pub const FAULT_FLAG_USER: u32 = 1 << 6;

/// DAX radix-tree entry flags recorded at insert time (fs/dax.c; stable since 4.15, not in BTF).
pub const DAX_ENTRY_PMD: u32 = 1 << 1;
pub const DAX_ENTRY_ZERO_PAGE: u32 = 1 << 2;

/// `vm_fault_t` bits the agent interprets (include/linux/mm_types.h, stable since 4.17).
pub const VM_FAULT_OOM: u32 = 0x0001;
pub const VM_FAULT_SIGBUS: u32 = 0x0002;
pub const VM_FAULT_NOPAGE: u32 = 0x0100;
pub const VM_FAULT_FALLBACK: u32 = 0x0800;
pub const VM_FAULT_SIGSEGV: u32 = 0x0040;
pub const VM_FAULT_HWPOISON: u32 = 0x0010;
pub const VM_FAULT_HWPOISON_LARGE: u32 = 0x0020;

/// One completed DAX page fault.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultEvent {
    pub hdr: EventHeader,
    /// Inode number of the faulting file.
    pub ino: u64,
    /// File page offset (4 KiB pages) of the faulting address.
    pub pgoff: u64,
    /// Faulting user virtual address (not aligned).
    pub address: u64,
    /// First pfn mapped by this fault (valid when `flags & FAULT_PFN_VALID`).
    pub pfn: u64,
    /// The vma the fault happened in.
    pub vm_start: u64,
    pub vm_end: u64,
    pub vm_flags: u64,
    /// The address space (`vma->vm_mm`): the holder's identity inside the kernel.
    pub mm: u64,
    /// Device of the file system (`sb->s_dev`, kernel encoding: major << 20 | minor); for
    /// device-dax the character device (`i_rdev`).
    pub dev: u32,
    /// `vm_fault_t` the fault handler returned.
    pub result: u32,
    /// `vmf->flags` (FAULT_FLAG_*).
    pub fault_flags: u32,
    /// DAX entry flags passed to the insert function.
    pub entry_flags: u32,
    /// FAULT_* flags above.
    pub flags: u32,
    /// log2 of the size this fault tried to map: 12 (PTE), 21 (PMD) or 30 (PUD).
    pub page_shift: u32,
    /// Faults this record stands for: page `i` (of `1 << page_shift` bytes) is at
    /// `address + i * size`, file page `pgoff + i * size / 4096`, pfn `pfn + i * size / 4096`.
    /// 1 for a single fault; a coalesced range (`seq != 0`) has its start `address` and
    /// `pgoff` aligned to the page size.
    pub pages: u32,
    /// CPU whose pending slot built the range (with `seq`: the range's identity).
    pub cpu: u32,
    /// Per-CPU sequence number of a coalesced range; 0 for a single fault.
    pub seq: u64,
    /// Boot time of the range's last fault (`hdr.ts_ns` is its first).
    pub last_ns: u64,
    /// [`range_check`] of the fields above that never change while a range grows: a reader
    /// of a pending slot that copied it while the kernel refilled it sees a mismatch.
    pub check: u64,
}

/// Checksum of a range's fixed fields (everything but `pages` and `last_ns`, the only two the
/// kernel updates in place). Cheap enough for the fault path: three multiplies.
#[inline(always)]
pub fn range_check(ev: &FaultEvent) -> u64 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    const K3: u64 = 0x1656_67b1_9e37_79f9;
    let a = (ev.address ^ ev.seq).wrapping_mul(K1);
    let b = (ev.pfn ^ ev.mm ^ ((ev.hdr.tgid as u64) << 32)).wrapping_mul(K2);
    let c =
        (ev.pgoff ^ ev.ino ^ ev.hdr.ts_ns ^ ((ev.dev as u64) << 32) ^ ev.vm_start).wrapping_mul(K3);
    a ^ b.rotate_left(21) ^ c.rotate_left(42) ^ ev.cpu as u64
}

/// `ZapEvent::flags`: the zap runs in the address space's own process.
pub const ZAP_OWN_MM: u32 = 1 << 0;
/// `ZapEvent::flags`: the current task has no mm any more (it is exiting).
pub const ZAP_EXITING: u32 = 1 << 1;
/// `ZapEvent::flags`: a device-dax mapping (`dev` is the character device).
pub const ZAP_DEVDAX: u32 = 1 << 2;
/// `ZapEvent::flags`: copy-on-write: a private page now maps an anonymous copy.
pub const ZAP_COW: u32 = 1 << 3;

/// PTEs of `[start, end)` in a DAX vma of `mm` were torn down.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZapEvent {
    /// The current task, which may not be the mapping's owner (truncate by another process).
    pub hdr: EventHeader,
    pub mm: u64,
    pub start: u64,
    pub end: u64,
    pub vm_start: u64,
    pub vm_end: u64,
    /// File page offset of `vm_start`.
    pub vm_pgoff: u64,
    pub ino: u64,
    pub dev: u32,
    pub flags: u32,
    /// `mm->owner`'s tgid where the kernel keeps an owner (CONFIG_MEMCG), else 0.
    pub owner_tgid: u32,
    pub _pad: u32,
}

/// A DAX-holding process forked (threads are not reported).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkEvent {
    /// The parent.
    pub hdr: EventHeader,
    pub child_tgid: u32,
    pub child_tid: u32,
    pub child_mm: u64,
}

/// `DeviceEvent::phase` values.
pub const DEV_DEPARTING: u32 = 1;
pub const DEV_GONE: u32 = 2;
/// `kill_dax()`: DAX access to the device is shut off from here on.
pub const DEV_DAX_KILLED: u32 = 3;
/// `dax_holder_notify_failure()`: the file system is told about a failure of
/// `[offset, offset+len)` of its device (with `MF_MEM_PRE_REMOVE` in `mf_flags`: a removal).
pub const DEV_HOLDER_NOTIFY: u32 = 4;

/// `mf_flags` bit the kernel sets when it notifies a removal, not a failure (6.8+).
pub const MF_MEM_PRE_REMOVE: u32 = 0x80;

/// A device leaving, or the kernel's DAX teardown steps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceEvent {
    pub hdr: EventHeader,
    pub phase: u32,
    pub mf_flags: u32,
    pub offset: u64,
    pub len: u64,
    /// Device name (`pfn0.0`, `namespace0.0`, `dax0.0`, `region0`), NUL padded.
    pub dev_name: [u8; 32],
    /// Driver being unbound (`nd_pmem`, `dax_pmem`, `device_dax`, …).
    pub drv_name: [u8; 16],
    /// Bus (`nd`, `dax`).
    pub bus_name: [u8; 8],
}

/// `MemoryFailureEvent::phase` values.
pub const MF_START: u32 = 1;
pub const MF_RESULT: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryFailureEvent {
    pub hdr: EventHeader,
    pub pfn: u64,
    pub phase: u32,
    /// `memory_failure()`'s flags at start (MF_ACTION_REQUIRED, MF_COUNT_INCREASED, …).
    pub flags: u32,
    /// `ras:memory_failure_event` page type and result at the end.
    pub mf_type: u32,
    pub result: u32,
}

/// `force_sig_mceerr`/`send_sig_mceerr`: the kernel's SIGBUS to a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSignalEvent {
    /// The sending context (for `force_sig_mceerr` the victim itself).
    pub hdr: EventHeader,
    pub victim_tgid: u32,
    pub victim_tid: u32,
    pub addr: u64,
    /// BUS_MCEERR_AR (4) or BUS_MCEERR_AO (5).
    pub code: i32,
    /// log2 of the affected size.
    pub lsb: i32,
    pub victim_comm: [u8; TASK_COMM_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmapDeniedEvent {
    pub hdr: EventHeader,
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

/// The fence sent `signal` to the current task (`hdr`) for a fault on `dev`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FenceSignalEvent {
    pub hdr: EventHeader,
    /// The fenced device the fault was on (kernel encoding).
    pub dev: u32,
    pub signal: u32,
    /// The faulting file's inode (0 for device-dax).
    pub ino: u64,
    /// `bpf_send_signal`'s result: 0 sent, else a negative errno (not delivered).
    pub ret: i32,
    pub _pad: u32,
}

/// Key of [`FENCE_EXCLUDE_COMM_MAP`]: a command name excluded on one fenced device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FenceCommKey {
    pub dev: u32,
    /// `comm` as the kernel keeps it: at most 15 bytes, NUL padded.
    pub comm: [u8; TASK_COMM_LEN],
}

/// Key of [`FENCE_EXCLUDE_PID_MAP`]: a process excluded on one fenced device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FencePidKey {
    pub dev: u32,
    pub tgid: u32,
}

/// Key of [`GUARDED_MAP`]: a device name as the guard compares it (see [`guard_key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuardKey {
    pub name: [u8; GUARD_NAME_LEN],
}

/// `UnbindGuardEvent::verdict`: the write was refused with [`GUARD_ERRNO`].
pub const GUARD_REFUSED: u32 = 1;
/// `UnbindGuardEvent::verdict`: the agent's own write (drain), let through.
pub const GUARD_AGENT_PASSED: u32 = 2;
/// `UnbindGuardEvent::verdict`: refused because the guard could not read which device the
/// write names (not a write/pwrite64 or a one-iovec writev/pwritev from user space:
/// several iovecs, io_uring, splice, sendfile, or an unreadable buffer) while a guarded
/// device has holders.
pub const GUARD_REFUSED_UNREAD: u32 = 3;

/// A write to `/sys/bus/{nd,dax}/drivers/<drv>/unbind` the guard acted on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnbindGuardEvent {
    /// The writer.
    pub hdr: EventHeader,
    /// The device name written (normalised as [`guard_key`]; empty when unreadable).
    pub name: [u8; GUARD_NAME_LEN],
    /// The driver directory the `unbind` file is in (`nd_pmem`, `device_dax`, …).
    pub drv_name: [u8; 16],
    /// The bus (`nd` or `dax`).
    pub bus_name: [u8; 8],
    /// x86-64 syscall number of the write (1 write, 18 pwrite64, 20 writev, …).
    pub syscall: u32,
    /// `GUARD_*` verdict above.
    pub verdict: u32,
    /// What the hook returned: 0, or `-GUARD_ERRNO`.
    pub ret: i32,
    pub _pad: u32,
}

/// The name the kernel's `unbind_store` looks up, from the first `min(count, 32)` bytes the
/// writer passed: up to the first NUL, one trailing newline dropped (`sysfs_streq`), NUL
/// padded. A name of 32 bytes or more cannot be a guarded one (they are all shorter); it
/// comes out with a non-zero last byte and matches no key. One definition for the kernel
/// program and the agent, with constant indices only (the verifier sees no variable
/// offsets into the stack buffer).
#[inline(always)]
pub fn guard_key(raw: &[u8; GUARD_NAME_LEN], count: u64) -> GuardKey {
    let mut name = *raw;
    let mut ended = false;
    let mut i = 0;
    while i < GUARD_NAME_LEN {
        if ended || i as u64 >= count || name[i] == 0 {
            ended = true;
            name[i] = 0;
        }
        i += 1;
    }
    // One trailing newline is not part of the name (only when the name ended within the
    // buffer: a longer name keeps its last byte and so matches nothing).
    let mut j = GUARD_NAME_LEN;
    while j > 0 {
        j -= 1;
        if name[j] != 0 {
            if name[j] == b'\n' && (j + 1 < GUARD_NAME_LEN || count <= GUARD_NAME_LEN as u64) {
                name[j] = 0;
            }
            break;
        }
    }
    GuardKey { name }
}

/// The key of a device name the agent guards; `None` for a name the guard cannot hold
/// (empty, 32 bytes or longer, or with a NUL or newline in it).
pub fn guard_key_of(name: &str) -> Option<GuardKey> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= GUARD_NAME_LEN || b.iter().any(|&c| c == 0 || c == b'\n') {
        return None;
    }
    let mut k = GuardKey::default();
    k.name[..b.len()].copy_from_slice(b);
    Some(k)
}

/// A DAX-holding process called mremap successfully.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MremapEvent {
    pub hdr: EventHeader,
    pub old_addr: u64,
    pub old_len: u64,
    pub new_len: u64,
    pub flags: u64,
    /// Where the mapping is now (the syscall's result).
    pub new_addr: u64,
}

const _: () = {
    assert!(core::mem::size_of::<EventHeader>() == 40);
    assert!(core::mem::offset_of!(EventHeader, ts_ns) == 8);
    assert!(core::mem::offset_of!(EventHeader, comm) == 24);
    assert!(core::mem::size_of::<FaultEvent>() == 160);
    assert!(core::mem::offset_of!(FaultEvent, ino) == 40);
    assert!(core::mem::offset_of!(FaultEvent, mm) == 96);
    assert!(core::mem::offset_of!(FaultEvent, page_shift) == 124);
    assert!(core::mem::size_of::<ZapEvent>() == 112);
    assert!(core::mem::size_of::<ForkEvent>() == 56);
    assert!(core::mem::size_of::<MremapEvent>() == 80);
    assert!(core::mem::size_of::<DeviceEvent>() == 120);
    assert!(core::mem::size_of::<MemoryFailureEvent>() == 64);
    assert!(core::mem::size_of::<KernelSignalEvent>() == 80);
    assert!(core::mem::size_of::<MmapDeniedEvent>() == 56);
    assert!(core::mem::size_of::<FenceSignalEvent>() == 64);
    assert!(core::mem::size_of::<FenceCommKey>() == 20);
    assert!(core::mem::size_of::<FencePidKey>() == 8);
    assert!(core::mem::size_of::<GuardKey>() == 32);
    assert!(core::mem::size_of::<UnbindGuardEvent>() == 112);
};

/// Marker for plain-old-data events that may be viewed as bytes and rebuilt from bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain only integer fields and arrays of them, and have
/// no padding that could leak uninitialised memory.
pub unsafe trait Event: Copy + 'static {
    const KIND: EventKind;

    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Self is POD without padding (trait contract).
        unsafe {
            core::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                core::mem::size_of::<Self>(),
            )
        }
    }

    /// Rebuilds an event from ring-buffer bytes; `None` if the slice is too short.
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked; every bit pattern is valid for integer-only POD.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

// SAFETY (all four): repr(C), integers only, sizes asserted above without padding:
// Fault 40 + 8*8 + 6*4 = 128; Zap 40 + 7*8 + 4*4 = 112; Fork 40 + 2*4 + 8 = 56;
// Mremap 40 + 5*8 = 80.
unsafe impl Event for FaultEvent {
    const KIND: EventKind = EventKind::Fault;
}
unsafe impl Event for ZapEvent {
    const KIND: EventKind = EventKind::Zap;
}
unsafe impl Event for ForkEvent {
    const KIND: EventKind = EventKind::Fork;
}
unsafe impl Event for MremapEvent {
    const KIND: EventKind = EventKind::Mremap;
}
// Device 40 + 2*4 + 2*8 + 32 + 16 + 8 = 120; MemoryFailure 40 + 8 + 4*4 = 64;
// KernelSignal 40 + 2*4 + 8 + 2*4 + 16 = 80; MmapDenied 40 + 2*4 + 8 = 56.
unsafe impl Event for DeviceEvent {
    const KIND: EventKind = EventKind::Device;
}
unsafe impl Event for MemoryFailureEvent {
    const KIND: EventKind = EventKind::MemoryFailure;
}
unsafe impl Event for KernelSignalEvent {
    const KIND: EventKind = EventKind::KernelSignal;
}
unsafe impl Event for MmapDeniedEvent {
    const KIND: EventKind = EventKind::MmapDenied;
}
// FenceSignal 40 + 2*4 + 8 + 2*4 = 64.
unsafe impl Event for FenceSignalEvent {
    const KIND: EventKind = EventKind::FenceSignal;
}
// UnbindGuard 40 + 32 + 16 + 8 + 4*4 = 112.
unsafe impl Event for UnbindGuardEvent {
    const KIND: EventKind = EventKind::UnbindGuard;
}

/// Reads the header of any event, `None` if the bytes are too short for one.
pub fn header_of(bytes: &[u8]) -> Option<EventHeader> {
    if bytes.len() < core::mem::size_of::<EventHeader>() {
        return None;
    }
    // SAFETY: length checked; EventHeader is integer-only POD.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<EventHeader>()) })
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C) integer-only types without padding (asserted in the parent module).
    unsafe impl aya::Pod for super::FaultEvent {}
    unsafe impl aya::Pod for super::ZapEvent {}
    unsafe impl aya::Pod for super::ForkEvent {}
    unsafe impl aya::Pod for super::MremapEvent {}
    unsafe impl aya::Pod for super::DeviceEvent {}
    unsafe impl aya::Pod for super::MemoryFailureEvent {}
    unsafe impl aya::Pod for super::KernelSignalEvent {}
    unsafe impl aya::Pod for super::MmapDeniedEvent {}
    unsafe impl aya::Pod for super::FenceSignalEvent {}
    unsafe impl aya::Pod for super::FenceCommKey {}
    unsafe impl aya::Pod for super::FencePidKey {}
    unsafe impl aya::Pod for super::GuardKey {}
    unsafe impl aya::Pod for super::UnbindGuardEvent {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::KernelLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_event_round_trips_through_bytes() {
        let ev = FaultEvent {
            hdr: EventHeader {
                kind: EventKind::Fault as u32,
                size: core::mem::size_of::<FaultEvent>() as u32,
                ts_ns: 123_456_789,
                tgid: 42,
                tid: 43,
                comm: *b"workload\0\0\0\0\0\0\0\0",
            },
            ino: 12,
            pgoff: 512,
            address: 0x7f00_0020_0000,
            pfn: 0x10_0200,
            vm_start: 0x7f00_0000_0000,
            vm_end: 0x7f00_0080_0000,
            vm_flags: 0xfb,
            mm: 0xffff_8880_1234_5000,
            dev: (259 << 20) | 1,
            result: VM_FAULT_NOPAGE,
            fault_flags: FAULT_FLAG_WRITE,
            entry_flags: DAX_ENTRY_PMD,
            flags: FAULT_PFN_VALID | FAULT_PMD,
            page_shift: 21,
            pages: 3,
            cpu: 1,
            seq: 7,
            last_ns: 123_999_999,
            check: 0,
        };
        let bytes = ev.as_bytes();
        assert_eq!(bytes.len(), 160);
        assert_eq!(header_of(bytes).unwrap().kind, 1);
        assert_eq!(FaultEvent::from_bytes(bytes), Some(ev));
        assert_eq!(FaultEvent::from_bytes(&bytes[..159]), None);
    }

    #[test]
    fn a_torn_range_fails_its_check() {
        let mut ev = FaultEvent {
            address: 0x7f00_0000_0000,
            pfn: 0x10_0000,
            mm: 0xffff_8880_0000_1000,
            seq: 5,
            pages: 1,
            ..Default::default()
        };
        ev.check = range_check(&ev);
        // Growing touches only pages and last_ns.
        let mut grown = ev;
        grown.pages = 900;
        grown.last_ns = 77;
        assert_eq!(range_check(&grown), ev.check);
        // A copy that caught half of a refill: one identity field from the next range.
        for torn in [
            FaultEvent { seq: 6, ..ev },
            FaultEvent {
                address: ev.address + 4096,
                ..ev
            },
            FaultEvent {
                pfn: ev.pfn + 1,
                ..ev
            },
            FaultEvent {
                mm: ev.mm + 64,
                ..ev
            },
        ] {
            assert_ne!(range_check(&torn), ev.check, "{torn:?}");
        }
    }

    #[test]
    fn lifecycle_events_round_trip() {
        let z = ZapEvent {
            hdr: EventHeader {
                kind: EventKind::Zap as u32,
                size: 112,
                ..Default::default()
            },
            mm: 1,
            start: 0x1000,
            end: 0x3000,
            flags: ZAP_OWN_MM,
            ..Default::default()
        };
        assert_eq!(ZapEvent::from_bytes(z.as_bytes()), Some(z));
        let f = ForkEvent {
            child_tgid: 9,
            child_tid: 9,
            child_mm: 7,
            ..Default::default()
        };
        assert_eq!(ForkEvent::from_bytes(f.as_bytes()), Some(f));
        let m = MremapEvent {
            new_addr: 0x7f00_0000_0000,
            ..Default::default()
        };
        assert_eq!(MremapEvent::from_bytes(m.as_bytes()), Some(m));
    }

    fn raw(s: &[u8]) -> [u8; GUARD_NAME_LEN] {
        let mut r = [0xAAu8; GUARD_NAME_LEN];
        r[..s.len()].copy_from_slice(s);
        r
    }

    #[test]
    fn the_guard_reads_the_name_unbind_store_looks_up() {
        let want = guard_key_of("namespace0.0").unwrap();
        // echo: one trailing newline; bytes past `count` are not the writer's.
        assert_eq!(guard_key(&raw(b"namespace0.0\n"), 13), want);
        assert_eq!(guard_key(&raw(b"namespace0.0"), 12), want);
        // printf with a NUL: the kernel's C string ends there.
        assert_eq!(guard_key(&raw(b"namespace0.0\0junk"), 17), want);
        // Two newlines are not stripped (sysfs_streq drops one): no match, as in the kernel.
        assert_ne!(guard_key(&raw(b"namespace0.0\n\n"), 14), want);
        // A prefix written short is another name.
        assert_ne!(guard_key(&raw(b"namespace0.0"), 11), want);
        assert_eq!(guard_key(&raw(b""), 0), GuardKey::default());
        // 32 bytes and more: never a guarded name, whatever the tail.
        let long = guard_key(&[b'x'; GUARD_NAME_LEN], 64);
        assert_ne!(long.name[GUARD_NAME_LEN - 1], 0);
        let mut nl = [b'x'; GUARD_NAME_LEN];
        nl[GUARD_NAME_LEN - 1] = b'\n';
        assert_ne!(guard_key(&nl, 40).name[GUARD_NAME_LEN - 1], 0);
    }

    #[test]
    fn names_the_guard_cannot_hold_are_refused() {
        assert!(guard_key_of("").is_none());
        assert!(guard_key_of(&"x".repeat(32)).is_none());
        assert!(guard_key_of("a\nb").is_none());
        assert!(guard_key_of(&"x".repeat(31)).is_some());
    }

    #[test]
    fn unknown_kinds_are_not_decoded() {
        assert_eq!(EventKind::from_u32(0), None);
        assert_eq!(EventKind::from_u32(999), None);
        assert_eq!(EventKind::from_u32(1), Some(EventKind::Fault));
        assert_eq!(EventKind::from_u32(4), Some(EventKind::Mremap));
        assert_eq!(EventKind::from_u32(9), Some(EventKind::FenceSignal));
    }
}
