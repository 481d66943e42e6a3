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
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns},
    macros::{btf_tracepoint, fentry, kprobe, kretprobe, raw_tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext, RetProbeContext,
    },
};
use dax_probe_common::{
    Counter, EventHeader, EventKind, FAULT_DEVDAX, FAULT_PFN_VALID, FAULT_PMD, FAULT_PUD,
    FaultEvent, FenceSignalEvent, TASK_COMM_LEN,
};

use crate::{
    kernel::{Direct, Mem, Probe},
    maps::{
        DEVDAX_STASH, DevdaxStash, INSERT_STASH, InsertStash, count, emit, emit_urgent,
        fence_excluded, fence_repeat, fence_signal, layout, watch,
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
    let l = layout();
    if l.ready == 0 || vmf == 0 {
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
            pfn: pfn & l.pfn_mask,
            entry_flags,
        }
    };
}

// ---- fault done: join and emit -----------------------------------------------------------

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

#[inline(always)]
fn fault_done<M: Mem>(inode: u64, vmf: u64, result: u32, pmd: bool) {
    let l = layout();
    if l.ready == 0 {
        return;
    }
    count(Counter::FaultsSeen);
    let tid = bpf_get_current_pid_tgid() as u32;

    let mut pfn = 0u64;
    let mut entry_flags = 0u32;
    let mut flags = if pmd { FAULT_PMD } else { 0 };
    if let Some(slot) = INSERT_STASH.get_ptr_mut(0) {
        // SAFETY: per-CPU slot (see maps.rs); cleared so it cannot serve a second fault.
        unsafe {
            let stash = *slot;
            if stash.tid == tid as u64 && stash.vmf == vmf && vmf != 0 {
                pfn = stash.pfn;
                entry_flags = stash.entry_flags as u32;
                flags |= FAULT_PFN_VALID;
            }
            (*slot).vmf = 0;
        }
    }
    if flags & FAULT_PFN_VALID == 0 {
        count(Counter::FaultWithoutPfn);
    }
    let sb: u64 = M::read(inode, l.inode_sb);
    let mut ev = fault_event::<M>(vmf, result, flags, if pmd { 21 } else { 12 });
    ev.ino = M::read(inode, l.inode_ino);
    ev.dev = M::read(sb, l.sb_dev);
    ev.pfn = pfn;
    ev.entry_flags = entry_flags;
    watch(ev.hdr.tgid);
    fenced(&ev);
    emit(ev);
}

/// A fault on a fenced device: the task gets the policy's signal from here, before it can
/// touch the page (delivered on its way back to user mode), unless the policy excludes it.
/// Each signal is reported on the device ring: the agent audits it after the fact (the
/// kernel cannot wait for an audit write; the arming of the fence was audited before).
#[inline(always)]
fn fenced(ev: &FaultEvent) {
    let Some(sig) = fence_signal(ev.dev) else {
        return;
    };
    if sig == 0 {
        return;
    }
    if fence_excluded(ev.dev, ev.hdr.tgid, &ev.hdr.comm) {
        count(Counter::FenceExcluded);
        return;
    }
    if fence_repeat(ev.dev, ev.hdr.tgid, ev.hdr.ts_ns) {
        return;
    }
    // SAFETY: plain helper call; the current task is the faulting one.
    let ret = unsafe { aya_ebpf::helpers::bpf_send_signal(sig) };
    count(Counter::FenceSignals);
    let mut hdr = ev.hdr;
    hdr.kind = EventKind::FenceSignal as u32;
    hdr.size = core::mem::size_of::<FenceSignalEvent>() as u32;
    emit_urgent(FenceSignalEvent {
        hdr,
        dev: ev.dev,
        signal: sig,
        ino: ev.ino,
        ret: ret as i32,
        _pad: 0,
    });
}

/// A fault event with everything the `vm_fault` tells; file identity left to the caller.
#[inline(always)]
fn fault_event<M: Mem>(vmf: u64, result: u32, flags: u32, page_shift: u32) -> FaultEvent {
    let l = layout();
    let vma: u64 = M::read(vmf, l.vmf_vma);
    FaultEvent {
        hdr: header(EventKind::Fault, core::mem::size_of::<FaultEvent>()),
        ino: 0,
        pgoff: M::read(vmf, l.vmf_pgoff),
        address: M::read(vmf, l.vmf_address),
        pfn: 0,
        vm_start: M::read(vma, l.vma_start),
        vm_end: M::read(vma, l.vma_end),
        vm_flags: M::read(vma, l.vma_flags),
        mm: M::read(vma, l.vma_mm),
        dev: 0,
        result,
        fault_flags: M::read::<u32>(vmf, l.vmf_flags),
        entry_flags: 0,
        flags,
        page_shift,
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
    let l = layout();
    if l.ready == 0 {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out before the remove.
    let Some(stash) = (unsafe { DEVDAX_STASH.get(tid) }).copied() else {
        return 0;
    };
    let _ = DEVDAX_STASH.remove(tid);
    count(Counter::FaultsSeen);
    let (flags, shift) = match (l.devdax_size_is_enum != 0, stash.size) {
        (true, 1) | (false, 9) => (FAULT_DEVDAX | FAULT_PMD, 21),
        (true, 2) | (false, 18) => (FAULT_DEVDAX | FAULT_PUD, 30),
        _ => (FAULT_DEVDAX, 12),
    };
    let result: u64 = ctx.ret();
    let mut ev = fault_event::<Probe>(stash.vmf, result as u32, flags, shift);
    let vma: u64 = Probe::read(stash.vmf, l.vmf_vma);
    let file: u64 = Probe::read(vma, l.vma_file);
    let inode: u64 = Probe::read(file, l.file_inode);
    ev.dev = Probe::read(inode, l.inode_rdev);
    watch(ev.hdr.tgid);
    fenced(&ev);
    emit(ev);
    0
}
