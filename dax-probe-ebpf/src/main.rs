//! dax-probe kernel programs.
//!
//! Every program here is optional: the agent picks, per concern, the first candidate the
//! running kernel offers (see `dax-probe/src/probe/plan.rs`) and loads only those. Programs
//! that serve the same concern through different attach types (fentry vs kprobe, tp_btf vs
//! raw_tp) share one body so they cannot drift apart.
#![no_std]
#![no_main]

mod departure;
mod enforce;
mod fault;
mod guard;
mod kernel;
mod maps;
mod task;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this, so it is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// The event/map ABI this object was built for. The agent reads it from the ELF before
/// loading anything and refuses a mismatch (a stale object next to a newer agent would
/// decode every record wrongly).
#[unsafe(link_section = "dax_probe_abi")]
#[unsafe(no_mangle)]
static DAX_PROBE_ABI: [u8; 4] = dax_probe_common::ABI_VERSION.to_le_bytes();
