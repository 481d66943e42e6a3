//! Kernel structure layout handed to the programs at load time.
//!
//! aya-ebpf has no CO-RE field relocations, and `struct vm_fault` alone has two layouts across
//! the Debian kernels we support (flat on 5.10, an anonymous const struct from 6.1). So the
//! agent reads the running kernel's BTF, computes every offset the programs dereference, and
//! writes them into the read-only global [`crate::LAYOUT_GLOBAL`] before loading. The programs
//! refuse to emit anything while `ready == 0`, so a layout the agent could not fill never turns
//! into garbage events. Offsets are in bytes.
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
    pub vma_mm: u32,
    pub vma_file: u32,
    pub vma_pgoff: u32,
    /// `struct file`
    pub file_inode: u32,
    /// `struct inode`
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub inode_flags: u32,
    pub inode_mode: u32,
    pub inode_rdev: u32,
    /// `struct super_block`
    pub sb_dev: u32,
    /// `struct task_struct`
    pub task_tgid: u32,
    pub task_pid: u32,
    pub task_mm: u32,
    pub task_comm: u32,
    /// `struct mm_struct`: `owner` (CONFIG_MEMCG); 0 when the kernel has no such member.
    pub mm_owner: u32,
    /// `struct device`: `kobj.name`, `bus`; `struct bus_type`: `name`;
    /// `struct device_driver`: `name`.
    pub dev_name: u32,
    pub dev_bus: u32,
    pub bus_name: u32,
    pub drv_name: u32,
    /// `struct device`: `driver` (still set while the bus's remove callback runs).
    pub dev_driver: u32,
    pub _pad0: u32,
    /// `struct pt_regs` (x86-64 syscall arguments 1, 2, 3, 4, 5: di, si, dx, r10, r8).
    pub regs_arg: [u32; 5],
    /// `S_DAX` in `inode->i_flags` (a macro, not in BTF; 1 << 13 on every kernel we support).
    pub s_dax: u32,
    /// Character-device major of device-dax (`/dev/daxX.Y`), 0 while unknown.
    pub dax_major: u32,
    /// `dev_dax_huge_fault`'s size argument is an `enum page_entry_size` (0/1/2 for
    /// PTE/PMD/PUD) when 1, a page order (0/9/18) when 0.
    pub devdax_size_is_enum: u32,
    /// Unread bytes in the event ring above which a submit wakes the reader at once.
    /// Below it events are submitted without a wakeup and the reader collects them on its
    /// short poll timer: one wakeup per fault would cost more than the fault itself.
    pub wakeup_bytes: u32,
    /// `struct file`: `f_path.dentry`; `struct dentry`: `d_parent`, `d_name.name`;
    /// `struct super_block`: `s_magic`; `struct pt_regs`: `orig_ax` (the syscall number).
    /// For the unbind guard.
    pub file_dentry: u32,
    pub dentry_parent: u32,
    pub dentry_name: u32,
    pub sb_magic: u32,
    pub regs_nr: u32,
    /// Non-zero: successive faults of one mapping are coalesced into ranges (the default);
    /// 0: one record per fault (`monitor --per-fault`, for debugging).
    pub coalesce: u32,
    /// Mask applied to the insert function's pfn argument: `pfn_t` carries flag bits in its
    /// top 12 bits up to 6.12; from 7.x it is a plain `unsigned long`.
    pub pfn_mask: u64,
}

impl KernelLayout {
    /// All zero: the programs stay silent until the agent fills it.
    pub const ZERO: Self = Self {
        ready: 0,
        vmf_vma: 0,
        vmf_address: 0,
        vmf_pgoff: 0,
        vmf_flags: 0,
        vma_start: 0,
        vma_end: 0,
        vma_flags: 0,
        vma_mm: 0,
        vma_file: 0,
        vma_pgoff: 0,
        file_inode: 0,
        inode_ino: 0,
        inode_sb: 0,
        inode_flags: 0,
        inode_mode: 0,
        inode_rdev: 0,
        sb_dev: 0,
        task_tgid: 0,
        task_pid: 0,
        task_mm: 0,
        task_comm: 0,
        mm_owner: 0,
        dev_name: 0,
        dev_bus: 0,
        bus_name: 0,
        drv_name: 0,
        dev_driver: 0,
        _pad0: 0,
        regs_arg: [0; 5],
        s_dax: 0,
        dax_major: 0,
        devdax_size_is_enum: 0,
        wakeup_bytes: 0,
        file_dentry: 0,
        dentry_parent: 0,
        dentry_name: 0,
        sb_magic: 0,
        regs_nr: 0,
        coalesce: 0,
        pfn_mask: 0,
    };
}

const _: () = assert!(core::mem::size_of::<KernelLayout>() == 184);
