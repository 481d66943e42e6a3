//! Devices leaving and memory failing: the moments the kernel is about to pull pages out
//! from under their holders.
//!
//! - `device_release_driver_internal` (entry and return): a driver is being unbound from an
//!   nd or dax bus device (sysfs unbind, hot removal, module unload). Entry fires before the
//!   driver's remove runs, while the pages are still there.
//! - `kill_dax`: DAX access to the device is shut off.
//! - `dax_holder_notify_failure` (6.1+): a file system is told part of its device failed, or
//!   (with `MF_MEM_PRE_REMOVE`, 6.8+) that the device is about to be removed.
//! - `memory_failure` and `ras:memory_failure_event`: a poisoned pfn, and what the kernel
//!   concluded.
//! - `force_sig_mceerr` / `send_sig_mceerr`: the machine-check SIGBUS the kernel sends to a
//!   process, whatever the cause.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, raw_tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext,
        RetProbeContext,
    },
};
use dax_probe_common::{
    DEV_DAX_KILLED, DEV_DEPARTING, DEV_GONE, DEV_HOLDER_NOTIFY, DeviceEvent, EventKind,
    KernelSignalEvent, MF_RESULT, MF_START, MemoryFailureEvent, TASK_COMM_LEN,
};

use crate::{
    fault::header,
    kernel::{Direct, Mem, Probe},
    lay,
    maps::{REMOVE_STASH, emit_urgent},
};

/// Copies a kernel C string into `out` (NUL padded); an unreadable one leaves zeros.
#[inline(always)]
fn cstr<const N: usize>(ptr: u64, out: &mut [u8; N]) {
    if ptr != 0 {
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(ptr as *const u8, out) };
    }
}

// ---- driver unbind --------------------------------------------------------------------------

#[fentry(function = "device_release_driver_internal")]
pub fn release_entry(ctx: FEntryContext) -> u32 {
    release::<Direct>(ctx.arg(0), ctx.arg(1), DEV_DEPARTING);
    0
}

#[fexit(function = "device_release_driver_internal")]
pub fn release_exit(ctx: FExitContext) -> u32 {
    release::<Direct>(ctx.arg(0), ctx.arg(1), DEV_GONE);
    0
}

#[kprobe]
pub fn release_entry_kprobe(ctx: ProbeContext) -> u32 {
    release::<Probe>(
        ctx.arg(0).unwrap_or(0),
        ctx.arg(1).unwrap_or(0),
        DEV_DEPARTING,
    );
    0
}

/// `nvdimm_bus_remove(struct device *dev)`: the nvdimm bus's remove callback, called through a
/// function pointer and so never inlined. The device is remembered for this thread until
/// `devres_release_all` returns (see `nd_remove_exit`). `device_release_driver_internal` is inlined into
/// the sysfs unbind path on some kernels (5.8–5.15: 5.10 never calls it out of line), so
/// this one is attached beside it; the agent keeps the first report of each departure.
#[kprobe]
pub fn nd_remove_entry(ctx: ProbeContext) -> u32 {
    let dev: u64 = ctx.arg(0).unwrap_or(0);
    if dev != 0 && lay!(ready) != 0 {
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = REMOVE_STASH.insert(tid, dev, 0);
        let drv: u64 = Probe::read(dev, lay!(dev_driver));
        release::<Probe>(dev, drv, DEV_DEPARTING);
    }
    0
}

/// `devres_release_all(dev)` returning in the thread that ran the nvdimm bus's remove: the
/// driver's managed resources (disk, dax device, page map) are gone, which happens after
/// the bus callback returned (its return is too early to call the device gone).
#[kretprobe]
pub fn nd_remove_exit(_ctx: RetProbeContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: read-only copy of a plain value.
    let Some(dev) = (unsafe { REMOVE_STASH.get(tid) }).copied() else {
        return 0;
    };
    let _ = REMOVE_STASH.remove(tid);
    let drv: u64 = Probe::read(dev, lay!(dev_driver));
    release::<Probe>(dev, drv, DEV_GONE);
    0
}

#[inline(always)]
fn release<M: Mem>(dev: u64, drv: u64, phase: u32) {
    if lay!(ready) == 0 || dev == 0 {
        return;
    }
    let bus: u64 = M::read(dev, lay!(dev_bus));
    let bus_name_ptr: u64 = M::read(bus, lay!(bus_name));
    let mut bus_name = [0u8; 8];
    cstr(bus_name_ptr, &mut bus_name);
    // Only the nvdimm ("nd") and device-dax ("dax") buses.
    let ours = (bus_name[0] == b'n' && bus_name[1] == b'd' && bus_name[2] == 0)
        || (bus_name[0] == b'd' && bus_name[1] == b'a' && bus_name[2] == b'x' && bus_name[3] == 0);
    if !ours {
        return;
    }
    let mut ev = DeviceEvent {
        hdr: header(EventKind::Device, core::mem::size_of::<DeviceEvent>()),
        phase,
        bus_name,
        ..Default::default()
    };
    cstr(M::read::<u64>(dev, lay!(dev_name)), &mut ev.dev_name);
    if drv != 0 {
        cstr(M::read::<u64>(drv, lay!(drv_name)), &mut ev.drv_name);
    }
    emit_urgent(ev);
}

#[fentry(function = "kill_dax")]
pub fn kill_dax(_ctx: FEntryContext) -> u32 {
    if lay!(ready) != 0 {
        emit_urgent(DeviceEvent {
            hdr: header(EventKind::Device, core::mem::size_of::<DeviceEvent>()),
            phase: DEV_DAX_KILLED,
            ..Default::default()
        });
    }
    0
}

/// `dax_holder_notify_failure(dax_dev, off, len, mf_flags)`.
#[fentry(function = "dax_holder_notify_failure")]
pub fn holder_notify(ctx: FEntryContext) -> u32 {
    if lay!(ready) != 0 {
        emit_urgent(DeviceEvent {
            hdr: header(EventKind::Device, core::mem::size_of::<DeviceEvent>()),
            phase: DEV_HOLDER_NOTIFY,
            offset: ctx.arg(1),
            len: ctx.arg(2),
            mf_flags: ctx.arg::<u64>(3) as u32,
            ..Default::default()
        });
    }
    0
}

// ---- memory failure -------------------------------------------------------------------------

/// `memory_failure(unsigned long pfn, int flags)`.
#[fentry(function = "memory_failure")]
pub fn memory_failure(ctx: FEntryContext) -> u32 {
    if lay!(ready) != 0 {
        emit_urgent(MemoryFailureEvent {
            hdr: header(
                EventKind::MemoryFailure,
                core::mem::size_of::<MemoryFailureEvent>(),
            ),
            pfn: ctx.arg(0),
            phase: MF_START,
            flags: ctx.arg::<u64>(1) as u32,
            ..Default::default()
        });
    }
    0
}

/// `ras:memory_failure_event(pfn, type, result)`.
#[btf_tracepoint(function = "memory_failure_event")]
pub fn memory_failure_result_btf(ctx: BtfTracePointContext) -> u32 {
    mf_result(
        ctx.arg(0),
        ctx.arg::<u64>(1) as u32,
        ctx.arg::<u64>(2) as u32,
    );
    0
}

#[raw_tracepoint(tracepoint = "memory_failure_event")]
pub fn memory_failure_result_raw(ctx: RawTracePointContext) -> i32 {
    mf_result(
        ctx.arg(0),
        ctx.arg::<u64>(1) as u32,
        ctx.arg::<u64>(2) as u32,
    );
    0
}

#[inline(always)]
fn mf_result(pfn: u64, mf_type: u32, result: u32) {
    if lay!(ready) != 0 {
        emit_urgent(MemoryFailureEvent {
            hdr: header(
                EventKind::MemoryFailure,
                core::mem::size_of::<MemoryFailureEvent>(),
            ),
            pfn,
            phase: MF_RESULT,
            mf_type,
            result,
            ..Default::default()
        });
    }
}

// ---- the kernel's SIGBUS ---------------------------------------------------------------------

/// `force_sig_mceerr(int code, void *addr, short lsb)`: to the current task.
#[fentry(function = "force_sig_mceerr")]
pub fn force_sig_mceerr(ctx: FEntryContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut ev = sig_event(
        ctx.arg::<u64>(0) as i32,
        ctx.arg(1),
        ctx.arg::<u64>(2) as i16,
    );
    ev.victim_tgid = (pid_tgid >> 32) as u32;
    ev.victim_tid = pid_tgid as u32;
    ev.victim_comm = ev.hdr.comm;
    emit_urgent(ev);
    0
}

/// `send_sig_mceerr(int code, void *addr, short lsb, struct task_struct *t)`.
#[fentry(function = "send_sig_mceerr")]
pub fn send_sig_mceerr(ctx: FEntryContext) -> u32 {
    let t: u64 = ctx.arg(3);
    let mut ev = sig_event(
        ctx.arg::<u64>(0) as i32,
        ctx.arg(1),
        ctx.arg::<u64>(2) as i16,
    );
    ev.victim_tgid = Direct::read(t, lay!(task_tgid));
    ev.victim_tid = Direct::read(t, lay!(task_pid));
    let mut comm = [0u8; TASK_COMM_LEN];
    if t != 0 {
        let _ = unsafe {
            aya_ebpf::helpers::bpf_probe_read_kernel_buf(
                (t + lay!(task_comm) as u64) as *const u8,
                &mut comm,
            )
        };
    }
    ev.victim_comm = comm;
    emit_urgent(ev);
    0
}

#[inline(always)]
fn sig_event(code: i32, addr: u64, lsb: i16) -> KernelSignalEvent {
    KernelSignalEvent {
        hdr: header(
            EventKind::KernelSignal,
            core::mem::size_of::<KernelSignalEvent>(),
        ),
        addr,
        code,
        lsb: lsb as i32,
        ..Default::default()
    }
}
