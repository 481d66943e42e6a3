//! The life of a DAX mapping after its faults: PTE teardown (munmap, exit, exec, truncate,
//! hole punch, mremap's source), fork (the child may hold copies of the parent's PTEs without
//! ever faulting) and mremap (PTEs move without faulting).
//!
//! Teardown is observed where the kernel zaps page tables (`unmap_page_range` up to 6.12,
//! `__zap_vma_range` from 7.x: same argument positions), filtered to DAX vmas: a file with
//! `S_DAX`, or the device-dax character device. Forks and mremaps are reported only for
//! processes in `WATCHED`.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, raw_tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext,
        RetProbeContext,
    },
};
use dax_probe_common::{
    EventKind, ForkEvent, MremapEvent, ZAP_COW, ZAP_DEVDAX, ZAP_EXITING, ZAP_OWN_MM, ZapEvent,
};

use crate::{
    fault::header,
    kernel::{Direct, Mem, Probe},
    lay,
    maps::{MREMAP_STASH, emit, note_change, watch, watched},
};

// ---- PTE teardown ---------------------------------------------------------------------------

/// `unmap_page_range(tlb, vma, addr, end, details)`, 5.10 … 6.12.
#[fentry(function = "unmap_page_range")]
pub fn zap_unmap_page_range(ctx: FEntryContext) -> u32 {
    zap::<Direct>(ctx.arg(1), ctx.arg(2), ctx.arg(3), 0);
    0
}

/// `__zap_vma_range(tlb, vma, start, end, details)`, 7.x.
#[fentry(function = "__zap_vma_range")]
pub fn zap_zap_vma_range(ctx: FEntryContext) -> u32 {
    zap::<Direct>(ctx.arg(1), ctx.arg(2), ctx.arg(3), 0);
    0
}

/// A new anonymous page is being mapped at `address` of `vma` (6.12+:
/// `folio_add_new_anon_rmap`, older: `page_add_new_anon_rmap`; vma and address in the same
/// positions). Where `wp_page_copy` is inlined (6.12, 7.x) this is how a copy-on-write of a
/// private DAX page shows: the copy is made and about to replace the pmem page. Runs for
/// every new anonymous page, so the first test (no file: plain anonymous memory) is cheap.
#[fentry(function = "folio_add_new_anon_rmap")]
pub fn cow_new_anon_folio(ctx: FEntryContext) -> u32 {
    new_anon(ctx.arg(1), ctx.arg(2));
    0
}

#[fentry(function = "page_add_new_anon_rmap")]
pub fn cow_new_anon_page(ctx: FEntryContext) -> u32 {
    new_anon(ctx.arg(1), ctx.arg(2));
    0
}

#[inline(always)]
fn new_anon(vma: u64, address: u64) {
    if lay!(ready) == 0 || vma == 0 {
        return;
    }
    let file: u64 = Direct::read(vma, lay!(vma_file));
    if file == 0 {
        return;
    }
    let addr = address & !0xfff;
    zap::<Direct>(vma, addr, addr + 4096, ZAP_COW);
}

/// `wp_page_copy(vmf)` returned: a write to a private mapping replaced the page by an
/// anonymous copy. For a DAX vma that page no longer maps the device: reported as a
/// one-page zap. Failed copies (OOM) leave the old page and are not reported.
#[fexit(function = "wp_page_copy")]
pub fn cow_exit(ctx: FExitContext) -> u32 {
    const VM_FAULT_ERROR: u64 = 0x0001 | 0x0002 | 0x0010 | 0x0020 | 0x0040 | 0x0400;
    let ret: u64 = ctx.arg(1);
    if ret & VM_FAULT_ERROR != 0 {
        return 0;
    }
    let vmf: u64 = ctx.arg(0);
    let vma: u64 = Direct::read(vmf, lay!(vmf_vma));
    let addr: u64 = Direct::read::<u64>(vmf, lay!(vmf_address)) & !0xfff;
    zap::<Direct>(vma, addr, addr + 4096, ZAP_COW);
    0
}

/// Either of the above through a kprobe (same argument positions).
#[kprobe]
pub fn zap_kprobe(ctx: ProbeContext) -> u32 {
    zap::<Probe>(
        ctx.arg(1).unwrap_or(0),
        ctx.arg(2).unwrap_or(0),
        ctx.arg(3).unwrap_or(0),
        0,
    );
    0
}

const S_IFMT: u16 = 0o170000;
const S_IFCHR: u16 = 0o020000;

#[inline(always)]
fn zap<M: Mem>(vma: u64, start: u64, end: u64, extra_flags: u32) {
    if lay!(ready) == 0 || vma == 0 {
        return;
    }
    let file: u64 = M::read(vma, lay!(vma_file));
    if file == 0 {
        return; // anonymous memory
    }
    let inode: u64 = M::read(file, lay!(file_inode));
    let iflags: u32 = M::read(inode, lay!(inode_flags));
    let mut flags = extra_flags;
    let dev: u32;
    let ino: u64;
    if iflags & lay!(s_dax) != 0 {
        let sb: u64 = M::read(inode, lay!(inode_sb));
        dev = M::read(sb, lay!(sb_dev));
        ino = M::read(inode, lay!(inode_ino));
    } else {
        let mode: u16 = M::read(inode, lay!(inode_mode));
        if mode & S_IFMT != S_IFCHR || lay!(dax_major) == 0 {
            return;
        }
        let rdev: u32 = M::read(inode, lay!(inode_rdev));
        if rdev >> 20 != lay!(dax_major) {
            return;
        }
        dev = rdev;
        ino = 0;
        flags |= ZAP_DEVDAX;
    }
    let mm: u64 = M::read(vma, lay!(vma_mm));
    // The current task is untyped here (bpf_get_current_task): read it with the helper.
    let task = unsafe { bpf_get_current_task() };
    let cur_mm: u64 = Probe::read(task, lay!(task_mm));
    if cur_mm == mm {
        flags |= ZAP_OWN_MM;
    } else if cur_mm == 0 {
        flags |= ZAP_EXITING;
    }
    let mut owner_tgid = 0u32;
    if lay!(mm_owner) != 0 {
        let owner: u64 = M::read(mm, lay!(mm_owner));
        if owner != 0 {
            owner_tgid = M::read(owner, lay!(task_tgid));
        }
    }
    let hdr = header(EventKind::Zap, core::mem::size_of::<ZapEvent>());
    note_change(hdr.ts_ns);
    emit(ZapEvent {
        hdr,
        mm,
        start,
        end,
        vm_start: M::read(vma, lay!(vma_start)),
        vm_end: M::read(vma, lay!(vma_end)),
        vm_pgoff: M::read(vma, lay!(vma_pgoff)),
        ino,
        dev,
        flags,
        owner_tgid,
        _pad: 0,
    });
}

// ---- fork ---------------------------------------------------------------------------------

#[btf_tracepoint(function = "sched_process_fork")]
pub fn fork_btf(ctx: BtfTracePointContext) -> u32 {
    fork::<Direct>(ctx.arg(1));
    0
}

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn fork_raw(ctx: RawTracePointContext) -> i32 {
    fork::<Probe>(ctx.arg(1));
    0
}

#[inline(always)]
fn fork<M: Mem>(child: u64) {
    if lay!(ready) == 0 {
        return;
    }
    // The tracepoint runs in the parent.
    let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !watched(parent_tgid) {
        return;
    }
    let child_tgid: u32 = M::read(child, lay!(task_tgid));
    if child_tgid == parent_tgid {
        return; // a thread: same address space
    }
    watch(child_tgid);
    emit(ForkEvent {
        hdr: header(EventKind::Fork, core::mem::size_of::<ForkEvent>()),
        child_tgid,
        child_tid: M::read(child, lay!(task_pid)),
        child_mm: M::read(child, lay!(task_mm)),
    });
}

// ---- mremap -------------------------------------------------------------------------------

/// `__x64_sys_mremap(const struct pt_regs *regs)` returning the new address or -errno.
#[fexit(function = "__x64_sys_mremap")]
pub fn mremap_exit(ctx: FExitContext) -> u32 {
    mremap::<Direct>(ctx.arg(0), ctx.arg(1));
    0
}

/// The same with helper reads of `regs` (5.10's verifier refuses direct loads through the
/// syscall wrapper's `const struct pt_regs *`).
#[fexit(function = "__x64_sys_mremap")]
pub fn mremap_exit_probe(ctx: FExitContext) -> u32 {
    mremap::<Probe>(ctx.arg(0), ctx.arg(1));
    0
}

/// 5.10's BTF describes the syscall wrapper's `pt_regs` only as a forward declaration, so
/// no fexit there: an entry probe remembers the user registers, the return probe reports.
#[kprobe]
pub fn mremap_entry_kprobe(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if lay!(ready) == 0 || !watched(tgid) {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let regs: u64 = ctx.arg(0).unwrap_or(0);
    let _ = MREMAP_STASH.insert(tid, regs, 0);
    0
}

#[kretprobe]
pub fn mremap_exit_kretprobe(ctx: RetProbeContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out before the remove.
    let Some(regs) = (unsafe { MREMAP_STASH.get(tid) }).copied() else {
        return 0;
    };
    let _ = MREMAP_STASH.remove(tid);
    mremap::<Probe>(regs, ctx.ret());
    0
}

#[inline(always)]
fn mremap<M: Mem>(regs: u64, ret: i64) {
    if lay!(ready) == 0 {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !watched(tgid) || ret < 0 {
        return;
    }
    let hdr = header(EventKind::Mremap, core::mem::size_of::<MremapEvent>());
    note_change(hdr.ts_ns);
    emit(MremapEvent {
        hdr,
        old_addr: M::read(regs, lay!(regs_arg[0])),
        old_len: M::read(regs, lay!(regs_arg[1])),
        new_len: M::read(regs, lay!(regs_arg[2])),
        flags: M::read(regs, lay!(regs_arg[3])),
        new_addr: ret as u64,
    });
}
