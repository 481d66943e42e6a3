//! Kernel structure layout handed to the programs at load time.
//!
//! aya-ebpf has no CO-RE field relocations, and `struct vm_fault` alone has two layouts across
//! the Debian kernels we support (flat on 5.10, an anonymous const struct from 6.1). So the
//! agent reads the running kernel's BTF, computes every offset the programs dereference, and
//! writes them into the read-only global [`crate::LAYOUT_GLOBAL`] before loading. The programs
//! refuse to emit anything while `ready == 0`, so a layout the agent could not fill never turns
//! into garbage events.

/// Byte offsets (and argument positions) in the running kernel. All offsets are in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// Non-zero once the agent filled every field from BTF.
    pub ready: u32,
    /// `struct vm_fault`
    pub vmf_vma: u32,
    pub vmf_address: u32,
    pub vmf_pgoff: u32,
    pub vmf_flags: u32,
    /// `struct vm_area_struct`
    pub vma_start: u32,
    pub vma_end: u32,
    pub vma_flags: u32,
    /// `struct inode`
    pub inode_ino: u32,
    pub inode_sb: u32,
    /// `struct super_block`
    pub sb_dev: u32,
    /// Unread bytes in the event ring above which a submit wakes the reader at once.
    /// Below it events are submitted without a wakeup and the reader collects them on its
    /// short poll timer: one wakeup per fault would cost more than the fault itself.
    pub wakeup_bytes: u32,
    pub _reserved: [u32; 2],
    /// Mask applied to the insert function's pfn argument: `pfn_t` carries flag bits in its
    /// top 12 bits up to 6.12; from 7.x it is a plain `unsigned long`.
    pub pfn_mask: u64,
}

const _: () = assert!(core::mem::size_of::<KernelLayout>() == 64);
