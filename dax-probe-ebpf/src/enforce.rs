//! Enforcement in the kernel for fenced devices (being drained, or departing under
//! `monitor --enforce`): new mappings are refused through the BPF LSM `mmap_file` hook where
//! the kernel runs the BPF LSM; a task that faults on a fenced device is signalled by the
//! fault program itself (see `fault.rs`) with the policy's signal, unless the policy excludes
//! it. A rule that only reports arms no fence at all: the agent neither refuses mappings nor
//! signals for it.

use aya_ebpf::{macros::lsm, programs::LsmContext};
use dax_probe_common::{EventKind, MmapDeniedEvent};

use crate::{
    fault::header,
    kernel::{Direct, Mem},
    lay,
    maps::{emit_urgent, fence_active, fence_signal},
};

const EPERM: i32 = 1;
const S_IFMT: u16 = 0o170000;
const S_IFCHR: u16 = 0o020000;

/// `mmap_file(struct file *file, unsigned long reqprot, unsigned long prot,
/// unsigned long flags)`; the previous LSM's verdict is the last argument.
#[lsm(hook = "mmap_file")]
pub fn fence_mmap(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(4);
    if prev != 0 {
        return prev;
    }
    let file: u64 = ctx.arg(0);
    if lay!(ready) == 0 || file == 0 || !fence_active() {
        return 0;
    }
    let inode: u64 = Direct::read(file, lay!(file_inode));
    let mode: u16 = Direct::read(inode, lay!(inode_mode));
    let dev: u32 = if mode & S_IFMT == S_IFCHR {
        Direct::read(inode, lay!(inode_rdev))
    } else {
        let sb: u64 = Direct::read(inode, lay!(inode_sb));
        Direct::read(sb, lay!(sb_dev))
    };
    if fence_signal(dev).is_none() {
        return 0;
    }
    emit_urgent(MmapDeniedEvent {
        hdr: header(
            EventKind::MmapDenied,
            core::mem::size_of::<MmapDeniedEvent>(),
        ),
        dev,
        _pad: 0,
        ino: Direct::read(inode, lay!(inode_ino)),
    });
    -EPERM
}
