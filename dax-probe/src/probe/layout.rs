//! Computes [`KernelLayout`] (the offsets the kernel programs dereference) from BTF.

use dax_probe_common::KernelLayout;

use super::{btf::Btf, facts::KernelFacts, plan::insert_args};

#[derive(Debug, thiserror::Error)]
#[error(
    "this kernel's BTF has no {what}: dax-probe cannot read DAX faults on it \
     (please report the kernel version)"
)]
pub struct LayoutError {
    pub what: String,
}

/// `pfn_t` keeps flag bits (PFN_DEV, PFN_MAP, …) in its top 12 bits; a plain pfn does not.
const PFN_T_MASK: u64 = (1 << 52) - 1;

pub fn compute(btf: &Btf, facts: &dyn KernelFacts) -> Result<KernelLayout, LayoutError> {
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
        inode_ino: off("inode", "i_ino")?,
        inode_sb: off("inode", "i_sb")?,
        sb_dev: off("super_block", "s_dev")?,
        wakeup_bytes: 0,
        _reserved: [0; 2],
        pfn_mask: u64::MAX,
    };
    // Absent insert function: the pfn concern falls back to userspace, layout stays valid.
    if let Some((_, _, _, true)) = insert_args(facts) {
        l.pfn_mask = PFN_T_MASK;
    }
    Ok(l)
}
