//! DAX fault path.
//!
//! fsdax: two hooks cooperate per fault:
//! 1. the DAX insert function (`dax_insert_entry`, in vmlinux on every supported kernel) sees
//!    the pfn about to be mapped and stashes it in a per-CPU slot;
//! 2. the `fs_dax:dax_{pte,pmd}_fault_done` tracepoint (identical arguments on 5.10 … 7.x)
//!    sees the inode, the `vm_fault` and the result, joins the stash and emits one
//!    [`FaultEvent`].
//!
//! The tracepoint alone cannot tell the pfn; the insert function alone cannot tell whether
//! the fault succeeded. Joining on (tid, vmf pointer) keeps a stale stash from a fault that
//! never reached "done" from being attributed to a later one.
//!
//! device-dax has no tracepoint: an entry probe on `dev_dax_huge_fault` remembers the
//! `vm_fault`, the return probe emits the event; the agent reads the pfn from pagemap.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id,
        bpf_ktime_get_boot_ns, generated,
    },
    macros::{btf_tracepoint, fentry, kprobe, kretprobe, raw_tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext, RetProbeContext,
    },
};
use dax_probe_common::{
    Counter, DAX_ENTRY_ZERO_PAGE, EventHeader, EventKind, FAULT_DEVDAX, FAULT_FLAG_USER,
    FAULT_FLAG_WRITE, FAULT_PFN_VALID, FAULT_PMD, FAULT_PUD, FaultEvent, FenceSignalEvent,
    RANGE_MAX_PAGES, TASK_COMM_LEN, VM_FAULT_NOPAGE, range_check,
};

use crate::{
    kernel::{Direct, Mem, Probe},
    lay,
    maps::{
        DEVDAX_STASH, DevdaxStash, EVENTS, INSERT_STASH, InsertStash, PENDING, add, count, emit,
        emit_urgent, fence_excluded, fence_repeat, fence_signal, last_change, submit_flags, watch,
    },
};

/// The common header for an event about the current task.
#[inline(always)]
pub fn header(kind: EventKind, size: usize) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u32,
        size: size as u32,
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0u8; TASK_COMM_LEN]),
    }
}

// ---- insert hook: remember the pfn ------------------------------------------------------
//
// `dax_insert_entry` has two argument orders: (xas, vmf, iter, entry, pfn, flags) from 6.1
// and (xas, mapping, vmf, entry, pfn, dirty…) with vmf third on 5.10. Positions are
// compile-time constants per program (the verifier rejects a context read at a computed
// offset), and the agent picks the program whose order matches the kernel's BTF prototype.

#[fentry(function = "dax_insert_entry")]
pub fn dax_insert_entry_fentry(ctx: FEntryContext) -> u32 {
    stash_insert(ctx.arg(1), ctx.arg(4), ctx.arg(5));
    0
}

#[kprobe]
pub fn dax_insert_entry_kprobe(ctx: ProbeContext) -> u32 {
    stash_insert(
        ctx.arg(1).unwrap_or(0),
        ctx.arg(4).unwrap_or(0),
        ctx.arg(5).unwrap_or(0),
    );
    0
}

#[kprobe]
pub fn dax_insert_entry_kprobe_vmf2(ctx: ProbeContext) -> u32 {
    stash_insert(
        ctx.arg(2).unwrap_or(0),
        ctx.arg(4).unwrap_or(0),
        ctx.arg(5).unwrap_or(0),
    );
    0
}

#[inline(always)]
fn stash_insert(vmf: u64, pfn: u64, entry_flags: u64) {
    if lay!(ready) == 0 || vmf == 0 {
        return;
    }
    let Some(slot) = INSERT_STASH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, programs do not nest on one CPU for these hooks.
    unsafe {
        *slot = InsertStash {
            tid: bpf_get_current_pid_tgid() & 0xffff_ffff,
            vmf,
            pfn: pfn & lay!(pfn_mask),
            entry_flags,
        }
    };
}

// ---- fault done: join, coalesce, emit ----------------------------------------------------
//
// Successive faults of one mapping are coalesced into one record per range: while the
// process, address space, vma, file, fault kind and access stay the same and the address, the
// file page and the pfn each advance by one page, the pending range on this CPU grows by a
// page (two stores); anything else emits it and starts another. A sequential touch of
// 64 MiB is one record instead of 16,384. A range never spans a page-table change: it is not
// extended once a zap, copy-on-write or mremap happened after its first fault
// (`LAST_CHANGE`). The agent reads every CPU's pending slot itself (`PENDING`), so a range
// is seen even when no later fault on its CPU emits it.

#[btf_tracepoint(function = "dax_pte_fault_done")]
pub fn dax_pte_fault_done_btf(ctx: BtfTracePointContext) -> u32 {
    // (inode, vmf, result)
    fault_done::<Direct>(ctx.arg(0), ctx.arg(1), ctx.arg::<u64>(2) as u32, false);
    0
}

#[btf_tracepoint(function = "dax_pmd_fault_done")]
pub fn dax_pmd_fault_done_btf(ctx: BtfTracePointContext) -> u32 {
    // (inode, vmf, max_pgoff, result)
    fault_done::<Direct>(ctx.arg(0), ctx.arg(1), ctx.arg::<u64>(3) as u32, true);
    0
}

#[raw_tracepoint(tracepoint = "dax_pte_fault_done")]
pub fn dax_pte_fault_done_raw(ctx: RawTracePointContext) -> i32 {
    fault_done::<Probe>(ctx.arg(0), ctx.arg(1), ctx.arg::<u64>(2) as u32, false);
    0
}

#[raw_tracepoint(tracepoint = "dax_pmd_fault_done")]
pub fn dax_pmd_fault_done_raw(ctx: RawTracePointContext) -> i32 {
    fault_done::<Probe>(ctx.arg(0), ctx.arg(1), ctx.arg::<u64>(3) as u32, true);
    0
}

/// The floor of the fault-overhead benchmark: an empty program on the same tracepoint,
/// attached alone (`dax-probe bench-floor`, see `dax-probe/src/probe/floor.rs`), so the cost of the agent's programs is printed
/// beside the cost of merely having a program there.
#[btf_tracepoint(function = "dax_pte_fault_done")]
pub fn floor_pte_fault_done(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "dax_pmd_fault_done")]
pub fn floor_pmd_fault_done(_ctx: BtfTracePointContext) -> u32 {
    0
}

/// What one fault tells, read field by field from the kernel's structures.
struct Seen {
    tgid: u32,
    tid: u32,
    dev: u32,
    ino: u64,
    mm: u64,
    vma: u64,
    vm_start: u64,
    /// The faulting address and its file page (4 KiB units), as the kernel passed them.
    address: u64,
    pgoff: u64,
    pfn: u64,
    fault_flags: u32,
    entry_flags: u32,
    flags: u32,
    result: u32,
    shift: u32,
}

/// `fault_flags` bits a range keeps for all its pages.
const RANGE_FAULT_FLAGS: u32 = FAULT_FLAG_WRITE | FAULT_FLAG_USER;

#[inline(always)]
fn fault_done<M: Mem>(inode: u64, vmf: u64, result: u32, pmd: bool) {
    if lay!(ready) == 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let mut pfn = 0u64;
    let mut entry_flags = 0u32;
    let mut flags = if pmd { FAULT_PMD } else { 0 };
    if let Some(slot) = INSERT_STASH.get_ptr_mut(0) {
        // SAFETY: per-CPU slot (see maps.rs); cleared so it cannot serve a second fault.
        unsafe {
            if (*slot).tid == tid as u64 && (*slot).vmf == vmf && vmf != 0 {
                pfn = (*slot).pfn;
                entry_flags = (*slot).entry_flags as u32;
                flags |= FAULT_PFN_VALID;
            }
            (*slot).vmf = 0;
        }
    }
    if flags & FAULT_PFN_VALID == 0 {
        count(Counter::FaultWithoutPfn);
    }
    let shift: u32 = if pmd { 21 } else { 12 };
    let vma: u64 = M::read(vmf, lay!(vmf_vma));
    let sb: u64 = M::read(inode, lay!(inode_sb));
    let s = Seen {
        tgid: (pid_tgid >> 32) as u32,
        tid,
        dev: M::read(sb, lay!(sb_dev)),
        ino: M::read(inode, lay!(inode_ino)),
        mm: M::read(vma, lay!(vma_mm)),
        vma,
        vm_start: M::read(vma, lay!(vma_start)),
        address: M::read(vmf, lay!(vmf_address)),
        pgoff: M::read(vmf, lay!(vmf_pgoff)),
        pfn,
        fault_flags: M::read(vmf, lay!(vmf_flags)),
        entry_flags,
        flags,
        result,
        shift,
    };
    fenced(s.dev, s.tgid, s.ino);
    let coalesce = lay!(coalesce) != 0
        && flags & FAULT_PFN_VALID != 0
        && result == VM_FAULT_NOPAGE
        && entry_flags & DAX_ENTRY_ZERO_PAGE == 0;
    let Some(slot) = PENDING.get_ptr_mut(0) else {
        single::<M>(&s);
        return;
    };
    // SAFETY: this CPU's slot; fault programs do not nest on a CPU.
    let p = unsafe { &mut *slot };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let prev_tgid = p.hdr.tgid;
    let prev_mm = p.mm;
    if p.pages != 0 {
        if coalesce && extends(p, &s) && last_change() < p.hdr.ts_ns {
            // SAFETY: aligned stores into this CPU's slot; `pages` last (a reader copies
            // a consistent prefix whichever it sees).
            unsafe {
                core::ptr::write_volatile(&raw mut p.last_ns, now);
                core::ptr::write_volatile(&raw mut p.pages, p.pages + 1);
            }
            return;
        }
        flush(p);
    }
    if !coalesce {
        single::<M>(&s);
        return;
    }
    // A new range. `pages` stays 0 until every other field, `check` last, is written.
    p.hdr.kind = EventKind::Fault as u32;
    p.hdr.size = core::mem::size_of::<FaultEvent>() as u32;
    p.hdr.ts_ns = now;
    p.hdr.tgid = s.tgid;
    p.hdr.tid = s.tid;
    // SAFETY: 16 bytes of the slot's comm.
    unsafe {
        generated::bpf_get_current_comm(p.hdr.comm.as_mut_ptr().cast(), TASK_COMM_LEN as u32);
    }
    p.ino = s.ino;
    // A range starts page-aligned: page i is at address + i * size.
    p.pgoff = s.pgoff & !((1u64 << (s.shift - 12)) - 1);
    p.address = s.address & !((1u64 << s.shift) - 1);
    p.pfn = s.pfn;
    p.vm_start = s.vm_start;
    p.vm_end = M::read(s.vma, lay!(vma_end));
    p.vm_flags = M::read(s.vma, lay!(vma_flags));
    p.mm = s.mm;
    p.dev = s.dev;
    p.result = s.result;
    p.fault_flags = s.fault_flags;
    p.entry_flags = s.entry_flags;
    p.flags = s.flags;
    p.page_shift = s.shift;
    p.cpu = unsafe { bpf_get_smp_processor_id() };
    p.seq += 1;
    p.last_ns = now;
    p.check = range_check(p);
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut p.pages, 1) };
    // The last range's process is already watched (it was on its first fault).
    if prev_tgid != s.tgid || prev_mm != s.mm {
        watch(s.tgid);
    }
}

/// Does fault `s` continue the pending range `p` by exactly one page?
#[inline(always)]
fn extends(p: &FaultEvent, s: &Seen) -> bool {
    let n = p.pages as u64;
    let step = 1u64 << (s.shift - 12);
    p.hdr.tgid == s.tgid
        && p.mm == s.mm
        && p.vm_start == s.vm_start
        && p.ino == s.ino
        && p.dev == s.dev
        && p.flags == s.flags
        && p.page_shift == s.shift
        && (p.fault_flags ^ s.fault_flags) & RANGE_FAULT_FLAGS == 0
        && s.address & !((1u64 << s.shift) - 1) == p.address + (n << s.shift)
        && s.pgoff & !(step - 1) == p.pgoff + n * step
        && s.pfn == p.pfn + n * step
        && p.pages < RANGE_MAX_PAGES
}

/// Emits the pending range and empties the slot.
#[inline(always)]
fn flush(p: &mut FaultEvent) {
    count(Counter::Attempted);
    add(Counter::FaultsSeen, p.pages as u64);
    if EVENTS
        .output::<FaultEvent>(&*p, submit_flags(core::mem::size_of::<FaultEvent>() as u64))
        .is_err()
    {
        count(Counter::RingFull);
    }
    // SAFETY: an aligned store into this CPU's slot.
    unsafe { core::ptr::write_volatile(&raw mut p.pages, 0) };
}

/// One record for one fault, written straight into its ring slot.
#[inline(always)]
fn single<M: Mem>(s: &Seen) {
    count(Counter::Attempted);
    count(Counter::FaultsSeen);
    watch(s.tgid);
    let Some(mut entry) = EVENTS.reserve::<FaultEvent>(0) else {
        count(Counter::RingFull);
        return;
    };
    let ev = entry.as_mut_ptr();
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: `ev` points at the reserved record; every field is written before the submit.
    unsafe {
        (*ev).hdr.kind = EventKind::Fault as u32;
        (*ev).hdr.size = core::mem::size_of::<FaultEvent>() as u32;
        (*ev).hdr.ts_ns = now;
        (*ev).hdr.tgid = s.tgid;
        (*ev).hdr.tid = s.tid;
        if generated::bpf_get_current_comm((*ev).hdr.comm.as_mut_ptr().cast(), TASK_COMM_LEN as u32)
            != 0
        {
            (*ev).hdr.comm = [0; TASK_COMM_LEN];
        }
        (*ev).ino = s.ino;
        (*ev).pgoff = s.pgoff;
        (*ev).address = s.address;
        (*ev).pfn = s.pfn;
        (*ev).vm_start = s.vm_start;
        (*ev).vm_end = M::read(s.vma, lay!(vma_end));
        (*ev).vm_flags = M::read(s.vma, lay!(vma_flags));
        (*ev).mm = s.mm;
        (*ev).dev = s.dev;
        (*ev).result = s.result;
        (*ev).fault_flags = s.fault_flags;
        (*ev).entry_flags = s.entry_flags;
        (*ev).flags = s.flags;
        (*ev).page_shift = s.shift;
        (*ev).pages = 1;
        (*ev).cpu = 0;
        (*ev).seq = 0;
        (*ev).last_ns = now;
        (*ev).check = 0;
    }
    entry.submit(submit_flags(core::mem::size_of::<FaultEvent>() as u64));
}

/// A fault on a fenced device: the task gets the policy's signal from here, before it can
/// touch the page (delivered on its way back to user mode), unless the policy excludes it.
/// Each signal is reported on the device ring: the agent audits it after the fact (the
/// kernel cannot wait for an audit write; the arming of the fence was audited before).
#[inline(always)]
fn fenced(dev: u32, tgid: u32, ino: u64) {
    let Some(sig) = fence_signal(dev) else {
        return;
    };
    if sig == 0 {
        return;
    }
    let hdr = header(
        EventKind::FenceSignal,
        core::mem::size_of::<FenceSignalEvent>(),
    );
    if fence_excluded(dev, tgid, &hdr.comm) {
        count(Counter::FenceExcluded);
        return;
    }
    if fence_repeat(dev, tgid, hdr.ts_ns) {
        return;
    }
    // SAFETY: plain helper call; the current task is the faulting one.
    let ret = unsafe { aya_ebpf::helpers::bpf_send_signal(sig) };
    count(Counter::FenceSignals);
    emit_urgent(FenceSignalEvent {
        hdr,
        dev,
        signal: sig,
        ino,
        ret: ret as i32,
        _pad: 0,
    });
}

/// A fault event with everything the `vm_fault` tells; file identity left to the caller.
#[inline(always)]
fn fault_event<M: Mem>(vmf: u64, result: u32, flags: u32, page_shift: u32) -> FaultEvent {
    let vma: u64 = M::read(vmf, lay!(vmf_vma));
    FaultEvent {
        hdr: header(EventKind::Fault, core::mem::size_of::<FaultEvent>()),
        ino: 0,
        pgoff: M::read(vmf, lay!(vmf_pgoff)),
        address: M::read(vmf, lay!(vmf_address)),
        pfn: 0,
        vm_start: M::read(vma, lay!(vma_start)),
        vm_end: M::read(vma, lay!(vma_end)),
        vm_flags: M::read(vma, lay!(vma_flags)),
        mm: M::read(vma, lay!(vma_mm)),
        dev: 0,
        result,
        fault_flags: M::read::<u32>(vmf, lay!(vmf_flags)),
        entry_flags: 0,
        flags,
        page_shift,
        pages: 1,
        cpu: 0,
        seq: 0,
        last_ns: 0,
        check: 0,
    }
}

// ---- device-dax ---------------------------------------------------------------------------

/// `dev_dax_huge_fault(vmf, pe_size | order)` entry (module function: kprobe on every kernel;
/// aya cannot fentry into modules).
#[kprobe]
pub fn devdax_fault_entry(ctx: ProbeContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let stash = DevdaxStash {
        vmf: ctx.arg(0).unwrap_or(0),
        size: ctx.arg(1).unwrap_or(0),
    };
    let _ = DEVDAX_STASH.insert(tid, stash, 0);
    0
}

#[kretprobe]
pub fn devdax_fault_exit(ctx: RetProbeContext) -> u32 {
    if lay!(ready) == 0 {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out before the remove.
    let Some(stash) = (unsafe { DEVDAX_STASH.get(tid) }).copied() else {
        return 0;
    };
    let _ = DEVDAX_STASH.remove(tid);
    count(Counter::FaultsSeen);
    let (flags, shift) = match (lay!(devdax_size_is_enum) != 0, stash.size) {
        (true, 1) | (false, 9) => (FAULT_DEVDAX | FAULT_PMD, 21),
        (true, 2) | (false, 18) => (FAULT_DEVDAX | FAULT_PUD, 30),
        _ => (FAULT_DEVDAX, 12),
    };
    let result: u64 = ctx.ret();
    let mut ev = fault_event::<Probe>(stash.vmf, result as u32, flags, shift);
    let vma: u64 = Probe::read(stash.vmf, lay!(vmf_vma));
    let file: u64 = Probe::read(vma, lay!(vma_file));
    let inode: u64 = Probe::read(file, lay!(file_inode));
    ev.dev = Probe::read(inode, lay!(inode_rdev));
    ev.last_ns = ev.hdr.ts_ns;
    watch(ev.hdr.tgid);
    fenced(ev.dev, ev.hdr.tgid, ev.ino);
    emit(ev);
    0
}
