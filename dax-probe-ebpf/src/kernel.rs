//! Reading kernel memory at offsets the agent computed from BTF.
//!
//! Two ways, chosen per program type:
//! - [`Direct`]: plain loads through the BTF-typed pointers a tp_btf/fentry program gets.
//!   The offsets come from frozen .rodata, so the verifier sees constants, checks each load
//!   against the kernel's BTF and turns it into a fault-safe load: no helper call. This is
//!   the fast path: on the DAX fault path the helper calls cost more than everything else
//!   the programs do.
//! - [`Probe`]: `bpf_probe_read_kernel`, for raw tracepoints and kprobes, which carry
//!   untyped pointers.
//!
//! If the verifier refuses a direct load on some kernel, the loader falls back to the
//! raw tracepoint candidate, which uses `Probe`.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use dax_probe_common::Counter;

use crate::maps::count;

pub trait Mem {
    /// Reads a `T` at `base + off`. A failed read is counted and yields zero: a partly
    /// filled event is still worth more to the operator than a silently missing one.
    fn read<T: Copy + Default>(base: u64, off: u32) -> T;
}

pub struct Probe;

impl Mem for Probe {
    #[inline(always)]
    fn read<T: Copy + Default>(base: u64, off: u32) -> T {
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
}

pub struct Direct;

impl Mem for Direct {
    #[inline(always)]
    fn read<T: Copy + Default>(base: u64, off: u32) -> T {
        if base == 0 {
            count(Counter::ReadFailed);
            return T::default();
        }
        // SAFETY: `base` is a BTF-typed kernel pointer from the program context (or loaded
        // from one); the verifier rewrites this into an exception-handled load.
        unsafe { core::ptr::read_volatile((base + off as u64) as *const T) }
    }
}
