//! Computes [`KernelLayout`] (the offsets the kernel programs dereference) from BTF.

use dax_probe_common::KernelLayout;

use super::{btf::Btf, facts::KernelFacts, plan::insert_args};

/// Did BTF give every offset the unbind guard reads? (All are non-zero on every kernel:
/// none of these members is the first of its struct.)
pub fn guard_ready(l: &KernelLayout) -> bool {
    [
        l.file_dentry,
        l.dentry_parent,
        l.dentry_name,
        l.sb_magic,
        l.regs_nr,
    ]
    .iter()
    .all(|&o| o != 0)
}

#[derive(Debug, thiserror::Error)]
#[error(
    "this kernel's BTF has no {what}: dax-probe cannot read DAX mappings on it \
     (please report the kernel version)"
)]
pub struct LayoutError {
    pub what: String,
}

/// `pfn_t` keeps flag bits (PFN_DEV, PFN_MAP, …) in its top 12 bits; a plain pfn does not.
const PFN_T_MASK: u64 = (1 << 52) - 1;
/// `S_DAX` (include/linux/fs.h): 1 << 13 since 4.x, on every kernel we test.
const S_DAX: u32 = 1 << 13;

/// What the layout needs from outside BTF.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extra {
    /// Character-device major of device-dax, when the topology knows one.
    pub dax_major: Option<u32>,
}

pub fn compute(
    btf: &Btf,
    facts: &dyn KernelFacts,
    extra: Extra,
) -> Result<KernelLayout, LayoutError> {
    let off = |s: &str, f: &str| {
        btf.member_offset(s, &[f]).ok_or_else(|| LayoutError {
            what: format!("member {f} in struct {s}"),
        })
    };
    let mut l = KernelLayout {
        ready: 1,
        vmf_vma: off("vm_fault", "vma")?,
        vmf_address: off("vm_fault", "address")?,
        vmf_pgoff: off("vm_fault", "pgoff")?,
        vmf_flags: off("vm_fault", "flags")?,
        vma_start: off("vm_area_struct", "vm_start")?,
        vma_end: off("vm_area_struct", "vm_end")?,
        vma_flags: off("vm_area_struct", "vm_flags")?,
        vma_mm: off("vm_area_struct", "vm_mm")?,
        vma_file: off("vm_area_struct", "vm_file")?,
        vma_pgoff: off("vm_area_struct", "vm_pgoff")?,
        file_inode: off("file", "f_inode")?,
        inode_ino: off("inode", "i_ino")?,
        inode_sb: off("inode", "i_sb")?,
        inode_flags: off("inode", "i_flags")?,
        inode_mode: off("inode", "i_mode")?,
        inode_rdev: off("inode", "i_rdev")?,
        sb_dev: off("super_block", "s_dev")?,
        task_tgid: off("task_struct", "tgid")?,
        task_pid: off("task_struct", "pid")?,
        task_mm: off("task_struct", "mm")?,
        task_comm: off("task_struct", "comm")?,
        // Only with CONFIG_MEMCG; without it foreign zaps are attributed by other means.
        mm_owner: btf.member_offset("mm_struct", &["owner"]).unwrap_or(0),
        dev_name: btf
            .member_offset("device", &["kobj", "name"])
            .ok_or_else(|| LayoutError {
                what: "member kobj.name in struct device".into(),
            })?,
        dev_bus: off("device", "bus")?,
        bus_name: off("bus_type", "name")?,
        drv_name: off("device_driver", "name")?,
        dev_driver: off("device", "driver")?,
        _pad0: 0,
        regs_arg: [
            off("pt_regs", "di")?,
            off("pt_regs", "si")?,
            off("pt_regs", "dx")?,
            off("pt_regs", "r10")?,
            off("pt_regs", "r8")?,
        ],
        s_dax: S_DAX,
        dax_major: extra.dax_major.unwrap_or(0),
        // 5.10/6.1 pass `enum page_entry_size`, 6.12+ a page order.
        devdax_size_is_enum: u32::from(btf.enum_value("page_entry_size", "PE_SIZE_PMD").is_some()),
        wakeup_bytes: 0,
        // The unbind guard's: absent members leave them 0 and the guard refuses to run
        // (`guard_ready`), the rest of the layout stays valid.
        file_dentry: btf
            .member_offset("file", &["f_path", "dentry"])
            .unwrap_or(0),
        dentry_parent: btf.member_offset("dentry", &["d_parent"]).unwrap_or(0),
        dentry_name: btf
            .member_offset("dentry", &["d_name", "name"])
            .unwrap_or(0),
        sb_magic: btf.member_offset("super_block", &["s_magic"]).unwrap_or(0),
        regs_nr: btf.member_offset("pt_regs", &["orig_ax"]).unwrap_or(0),
        coalesce: 1,
        pfn_mask: u64::MAX,
    };
    // Absent insert function: the pfn concern falls back to userspace, layout stays valid.
    if let Some((_, _, _, true)) = insert_args(facts) {
        l.pfn_mask = PFN_T_MASK;
    }
    Ok(l)
}
