//! Reading kernel memory at offsets the agent computed from BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use dax_probe_common::Counter;

use crate::maps::count;

/// Reads a `T` at `base + off`. A failed read is counted and yields zero: a partly filled
/// event is still worth more to the operator than a silently missing one.
#[inline(always)]
pub fn read<T: Copy + Default>(base: u64, off: u32) -> T {
    if base == 0 {
        count(Counter::ReadFailed);
        return T::default();
    }
    match unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) } {
        Ok(v) => v,
        Err(_) => {
            count(Counter::ReadFailed);
            T::default()
        }
    }
}
