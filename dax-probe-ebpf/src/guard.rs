//! The unbind guard (policy `guard = "refuse-unbind"`): a write to an nd or dax driver's
//! `unbind` file (`/sys/bus/{nd,dax}/drivers/<driver>/unbind`, also reached as
//! `/sys/bus/*/devices/<dev>/driver/unbind`, which is how ndctl and daxctl disable a
//! namespace, region or dax device) that names a device the agent lists in `GUARDED` fails
//! with EBUSY. The agent lists a guarded device's bus names only while it has holders.
//!
//! The BPF LSM `file_permission(file, mask)` hook runs before the kernel copies the bytes
//! written, so the name is read from the writer's own syscall arguments: the task's user
//! registers (`bpf_task_pt_regs`) hold write(2)/pwrite64(2)'s buffer and count, or
//! writev(2)/pwritev(2)'s iovec when there is exactly one. A write the guard cannot read that way (io_uring,
//! splice, sendfile, an unreadable buffer) is refused while any guarded device has holders:
//! the guard cannot tell which device it names. The agent's own writes (drain) pass and are
//! reported so the agent audits them.
//!
//! `file_permission` runs for every read and write on the machine: while nothing is guarded
//! a write costs one array lookup here.

use aya_ebpf::{
    bindings::task_struct,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_probe_read_user, bpf_task_pt_regs},
    },
    macros::lsm,
    programs::LsmContext,
};
use dax_probe_common::{
    EventKind, GUARD_AGENT_PASSED, GUARD_ERRNO, GUARD_NAME_LEN, GUARD_REFUSED,
    GUARD_REFUSED_UNREAD, GUARD_SLOT_ACTIVE, GUARD_SLOT_AGENT, UnbindGuardEvent, guard_key,
};

use crate::{
    fault::header,
    kernel::{Direct, Mem},
    lay,
    maps::{GUARD_CONF, GUARDED, emit_urgent},
};

const MAY_WRITE: i32 = 2;
/// `SYSFS_MAGIC` (include/uapi/linux/magic.h).
const SYSFS_MAGIC: u64 = 0x6265_6572;
/// x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl, stable ABI).
const NR_WRITE: u64 = 1;
const NR_PWRITE64: u64 = 18;
const NR_WRITEV: u64 = 20;
const NR_PWRITEV: u64 = 296;
const NR_PWRITEV2: u64 = 328;

/// The first `N` bytes of a dentry's name, NUL padded (zeros when unreadable).
#[inline(always)]
fn dentry_name<const N: usize>(dentry: u64, off_name: u32) -> [u8; N] {
    let mut out = [0u8; N];
    let ptr: u64 = Direct::read(dentry, off_name);
    if ptr != 0 {
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(ptr as *const u8, &mut out) };
    }
    out
}

#[inline(always)]
fn conf(slot: u32) -> u32 {
    GUARD_CONF.get(slot).copied().unwrap_or(0)
}

/// `file_permission(struct file *file, int mask)`; the previous LSM's verdict is the last
/// argument.
#[lsm(hook = "file_permission")]
pub fn guard_unbind(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(2);
    if prev != 0 {
        return prev;
    }
    let mask: i32 = ctx.arg(1);
    if mask & MAY_WRITE == 0 || conf(GUARD_SLOT_ACTIVE) == 0 {
        return 0;
    }
    let file: u64 = ctx.arg(0);
    if lay!(ready) == 0
        || lay!(file_dentry) == 0
        || lay!(dentry_parent) == 0
        || lay!(regs_nr) == 0
        || file == 0
    {
        return 0;
    }
    // Which file: `unbind` in <bus>/drivers/<driver>/ on sysfs, bus nd or dax.
    let inode: u64 = Direct::read(file, lay!(file_inode));
    let sb: u64 = Direct::read(inode, lay!(inode_sb));
    let magic: u64 = Direct::read(sb, lay!(sb_magic));
    if magic != SYSFS_MAGIC {
        return 0;
    }
    let dentry: u64 = Direct::read(file, lay!(file_dentry));
    if dentry_name::<8>(dentry, lay!(dentry_name)) != *b"unbind\0\0" {
        return 0;
    }
    let drv: u64 = Direct::read(dentry, lay!(dentry_parent));
    let drivers: u64 = Direct::read(drv, lay!(dentry_parent));
    if dentry_name::<8>(drivers, lay!(dentry_name)) != *b"drivers\0" {
        return 0;
    }
    let bus: u64 = Direct::read(drivers, lay!(dentry_parent));
    let bus_name = dentry_name::<8>(bus, lay!(dentry_name));
    if bus_name != *b"nd\0\0\0\0\0\0" && bus_name != *b"dax\0\0\0\0\0" {
        return 0;
    }

    // What the writer writes: its own syscall's arguments.
    let task = unsafe { bpf_get_current_task_btf() };
    let regs = unsafe { bpf_task_pt_regs(task as *mut task_struct) } as u64;
    let nr: u64 = Direct::read(regs, lay!(regs_nr));
    let a1: u64 = Direct::read(regs, lay!(regs_arg[1]));
    let a2: u64 = Direct::read(regs, lay!(regs_arg[2]));
    let (buf, count) = match nr {
        NR_WRITE | NR_PWRITE64 => (a1, a2),
        // One iovec is the whole write; with more the kernel joins them into one name,
        // which the guard does not reassemble: unreadable.
        NR_WRITEV | NR_PWRITEV | NR_PWRITEV2 if a2 == 1 => {
            let mut iov = [0u64; 2];
            let r = unsafe {
                bpf_probe_read_user(iov.as_mut_ptr().cast(), 16, a1 as *const core::ffi::c_void)
            };
            if r == 0 { (iov[0], iov[1]) } else { (0, 0) }
        }
        _ => (0, 0),
    };
    let mut raw = [0u8; GUARD_NAME_LEN];
    let mut readable = false;
    if buf != 0 && count > 0 {
        // A short read keeps the verifier's bound: 1..=32 bytes into a 32-byte buffer.
        let n = if count >= GUARD_NAME_LEN as u64 {
            GUARD_NAME_LEN as u32
        } else {
            (count as u32) & (GUARD_NAME_LEN as u32 - 1)
        };
        if n > 0 {
            let r = unsafe {
                bpf_probe_read_user(raw.as_mut_ptr().cast(), n, buf as *const core::ffi::c_void)
            };
            readable = r == 0;
        }
    }

    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let agent = tgid != 0 && tgid == conf(GUARD_SLOT_AGENT);
    let (verdict, key) = if readable {
        let key = guard_key(&raw, count);
        // SAFETY: read-only peek at a plain value.
        if unsafe { GUARDED.get(&key) }.is_none() {
            return 0;
        }
        (
            if agent {
                GUARD_AGENT_PASSED
            } else {
                GUARD_REFUSED
            },
            key,
        )
    } else if count == 0 && (nr == NR_WRITE || nr == NR_PWRITE64) {
        // An empty write names no device (the kernel answers ENODEV).
        return 0;
    } else if agent {
        return 0;
    } else {
        (GUARD_REFUSED_UNREAD, guard_key(&[0u8; GUARD_NAME_LEN], 0))
    };
    let ret = if verdict == GUARD_AGENT_PASSED {
        0
    } else {
        -GUARD_ERRNO
    };
    emit_urgent(UnbindGuardEvent {
        hdr: header(
            EventKind::UnbindGuard,
            core::mem::size_of::<UnbindGuardEvent>(),
        ),
        name: key.name,
        drv_name: dentry_name::<16>(drv, lay!(dentry_name)),
        bus_name,
        syscall: nr as u32,
        verdict,
        ret,
        _pad: 0,
    });
    ret
}
