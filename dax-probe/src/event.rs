//! Decoded events: what the rest of the agent (state, policy, outputs) works with. Field names
//! here are the stable JSON names of `monitor --json`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::topology::DevId;

/// Where a fault's pfn came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PfnSource {
    /// The kernel's DAX insert hook saw it.
    Kernel,
    /// Looked up in `/proc/PID/pagemap` when the event arrived (fallback).
    Pagemap,
}

/// One completed DAX page fault, or a run of successive ones (`pages > 1`): page `i` of the
/// run is at `page_address + i * page_size`, file `offset + i * page_size`, pfn
/// `pfn + i * page_size / 4096`, all faulted with the same access and result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Fault {
    /// Nanoseconds since boot (CLOCK_BOOTTIME).
    pub ts_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub comm: String,
    /// Device of the file system holding the file.
    pub dev: DevId,
    pub ino: u64,
    /// File offset of the mapped page, in bytes, aligned to `page_size`.
    pub offset: u64,
    /// Faulting virtual address.
    pub address: u64,
    /// First virtual address of the mapped page (aligned to `page_size`).
    pub page_address: u64,
    /// First pfn mapped, when known.
    pub pfn: Option<u64>,
    pub pfn_source: Option<PfnSource>,
    /// 4096 or 2097152: the size this fault mapped (or tried to).
    pub page_size: u64,
    pub write: bool,
    /// Taken in user mode (`FAULT_FLAG_USER`): a refused fault is the kernel's SIGBUS to the
    /// thread (reported as `kernel_sigbus` with `BUS_ADRERR`).
    #[serde(default)]
    pub user: bool,
    /// Did the fault install a mapping?
    pub mapped: bool,
    /// The kernel mapped its shared zero page (a read of a hole), not pmem.
    pub zero_page: bool,
    /// `vm_fault_t` decoded, e.g. `NOPAGE` or `FALLBACK`.
    pub result: String,
    #[serde(default)]
    pub result_raw: u32,
    #[serde(default)]
    pub vma_start: u64,
    #[serde(default)]
    pub vma_end: u64,
    /// MAP_SHARED (VM_SHARED) mapping.
    #[serde(default)]
    pub shared: bool,
    /// Device that owns the pfn (`pmem0`, `dax0.0`), when the topology knows it.
    pub device: Option<String>,
    /// A device-dax fault: `dev` is the character device, `ino` 0, `offset` into the device.
    #[serde(default)]
    pub devdax: bool,
    /// Kernel address of the address space (the holder's identity in the kernel).
    #[serde(skip)]
    pub mm: u64,
    /// Faults (pages of `page_size`) this line stands for; `ts_ns` is the first's time.
    #[serde(default = "one")]
    pub pages: u64,
    /// Boot time of the last of them (equal to `ts_ns` for one fault).
    #[serde(default)]
    pub last_ts_ns: u64,
    /// Identity of a coalesced range in the kernel (CPU, per-CPU sequence; seq 0: a single
    /// fault). Internal: the agent reports every page once, whichever way it learned it.
    #[serde(skip)]
    pub range: Option<(u32, u64)>,
}

fn one() -> u64 {
    1
}

impl Fault {
    /// Bytes of address space the line covers.
    pub fn span(&self) -> u64 {
        self.page_size.saturating_mul(self.pages)
    }

    /// The pfn backing virtual address `va`, if this line covers it and names a pfn.
    pub fn pfn_at(&self, va: u64) -> Option<u64> {
        let off = va.checked_sub(self.page_address)?;
        (off < self.span()).then_some(self.pfn?.saturating_add(off / 4096))
    }

    /// Pages `from..` of the run, as a line of their own (the same fault kind, later start).
    pub fn tail(&self, from: u64) -> Fault {
        let skip = from.min(self.pages);
        // Saturating: a corrupt record must not panic the agent (the applier refuses it).
        let bytes = skip.saturating_mul(self.page_size);
        Fault {
            address: self.page_address.saturating_add(bytes),
            page_address: self.page_address.saturating_add(bytes),
            offset: self.offset.saturating_add(bytes),
            pfn: self.pfn.map(|p| p.saturating_add(bytes / 4096)),
            pages: self.pages - skip,
            ..self.clone()
        }
    }
}

/// PTEs of a DAX mapping torn down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Zap {
    pub ts_ns: u64,
    /// The task that tore them down (not always the mapping's owner).
    pub tgid: u32,
    pub tid: u32,
    pub comm: String,
    pub start: u64,
    pub end: u64,
    #[serde(default)]
    pub vma_start: u64,
    #[serde(default)]
    pub vma_end: u64,
    /// File (or device) offset of `start`, in bytes.
    pub offset: u64,
    pub dev: DevId,
    pub ino: u64,
    #[serde(default)]
    pub devdax: bool,
    /// The owner's own task did it (munmap, mremap, exit).
    pub own_mm: bool,
    /// The task doing it is exiting (exit or exec teardown).
    pub exiting: bool,
    /// Copy-on-write of one private page (it now maps an anonymous copy).
    #[serde(default)]
    pub cow: bool,
    /// `mm->owner`'s tgid where the kernel tracks it.
    pub owner_tgid: Option<u32>,
    #[serde(skip)]
    pub mm: u64,
}

/// A holder forked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Fork {
    pub ts_ns: u64,
    pub parent_tgid: u32,
    pub comm: String,
    pub child_tgid: u32,
    #[serde(skip)]
    pub child_mm: u64,
}

/// A holder called mremap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Mremap {
    pub ts_ns: u64,
    pub tgid: u32,
    pub comm: String,
    pub old_addr: u64,
    pub old_len: u64,
    pub new_len: u64,
    #[serde(default)]
    pub flags: u64,
    pub new_addr: u64,
}

/// What the kernel is doing to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DevicePhase {
    /// A driver is being unbound from an nd/dax device (before its remove runs).
    Departing,
    /// The unbind finished.
    Gone,
    /// `kill_dax()`: DAX access to a device shut off.
    DaxKilled,
    /// `dax_holder_notify_failure()`: a file system is told part of its device fails, or is
    /// about to be removed.
    HolderNotify,
}

/// A raw device event from the kernel (the agent turns these into departure reports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceChange {
    pub ts_ns: u64,
    pub phase: DevicePhase,
    /// The task doing it (the one writing to sysfs `unbind`, for instance).
    pub tgid: u32,
    pub tid: u32,
    pub comm: String,
    /// `pfn0.0`, `namespace0.0`, `dax0.0`, `region0`.
    pub device: String,
    pub driver: String,
    pub bus: String,
    pub offset: u64,
    pub len: u64,
    pub mf_flags: u32,
    /// `MF_MEM_PRE_REMOVE`: the notification is a removal, not a failure.
    pub pre_remove: bool,
}

/// A memory failure (poisoned pfn) starting, or its verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryFailure {
    pub ts_ns: u64,
    pub pfn: u64,
    /// `start` (memory_failure() entered) or `result` (the kernel's verdict).
    pub phase: &'static str,
    pub tgid: u32,
    pub comm: String,
    pub flags: u32,
    pub page_type: Option<String>,
    pub result: Option<String>,
}

/// The kernel's SIGBUS to a process: a machine check (`force_sig_mceerr`, hooked), or a
/// user-mode DAX fault the handler refused with `VM_FAULT_SIGBUS` (read off the fault record:
/// `BUS_ADRERR`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KernelSigbus {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub addr: u64,
    /// `BUS_MCEERR_AR` (action required: the task touched it), `BUS_MCEERR_AO` (action
    /// optional: a warning) or `BUS_ADRERR` (a refused fault: no memory failure involved).
    pub code: String,
    pub lsb: i32,
    /// Who sent it (for `force_sig_mceerr`, the victim itself).
    pub sender_pid: u32,
}

/// A new mapping of a fenced device was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MmapDenied {
    pub ts_ns: u64,
    pub pid: u32,
    pub comm: String,
    pub dev: DevId,
    pub ino: u64,
}

/// The kernel's fence signalled a task that faulted on a fenced device (reported after the
/// signal: the fault program cannot wait for the agent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FenceSignal {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// `SIGTERM`, `SIGBUS`, …: the policy's signal for the device.
    pub signal: String,
    /// The fenced device the fault was on.
    pub dev: DevId,
    /// The faulting file's inode (0 for device-dax).
    pub ino: u64,
    /// Why the kernel could not send it (`bpf_send_signal`'s errno), when it could not.
    #[serde(default)]
    pub error: Option<i32>,
}

/// What the unbind guard did with a write to an nd/dax driver's `unbind` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuardVerdict {
    /// Refused with EBUSY: it named a guarded device that has holders.
    Refused,
    /// Refused with EBUSY: the guard could not read which device it names (not a plain
    /// write/pwrite/writev: io_uring, splice, sendfile) while a guarded device has holders.
    RefusedUnreadable,
    /// The agent's own write (drain): let through.
    AgentPassed,
}

/// The unbind guard's report of one write (from the BPF LSM program).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UnbindGuarded {
    pub ts_ns: u64,
    /// The writer.
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The device name written (`namespace0.0`, `pfn0.0`, `dax0.0`, `region0`); empty when
    /// unreadable.
    pub written: String,
    /// The driver whose `unbind` file it was (`nd_pmem`, `device_dax`, …) and its bus.
    pub driver: String,
    pub bus: String,
    /// x86-64 syscall number of the write.
    pub syscall: u32,
    pub verdict: GuardVerdict,
    /// The errno the write failed with (EBUSY), none when it passed.
    #[serde(default)]
    pub errno: Option<i32>,
}

/// Everything the agent reports, tagged by `type` in JSON.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Fault(Fault),
    Zap(Zap),
    Fork(Fork),
    Mremap(Mremap),
    Device(DeviceChange),
    MemoryFailure(MemoryFailure),
    KernelSigbus(KernelSigbus),
    MmapDenied(MmapDenied),
    FenceSignal(FenceSignal),
    UnbindGuard(UnbindGuarded),
}

/// `enum mf_result` (include/ras/ras_event.h; stable since 4.x).
pub fn mf_result_name(r: u32) -> String {
    match r {
        0 => "Ignored".into(),
        1 => "Failed".into(),
        2 => "Delayed".into(),
        3 => "Recovered".into(),
        other => format!("result {other}"),
    }
}

/// `enum mf_action_page_type`: the kernel's name for what kind of page failed. The numbering
/// moved between kernels; the DAX entry is the one that matters here.
pub fn mf_page_type_name(t: u32) -> String {
    format!("page type {t}")
}

const VM_FAULT_NAMES: &[(u32, &str)] = &[
    (0x0001, "OOM"),
    (0x0002, "SIGBUS"),
    (0x0004, "MAJOR"),
    (0x0010, "HWPOISON"),
    (0x0020, "HWPOISON_LARGE"),
    (0x0040, "SIGSEGV"),
    (0x0100, "NOPAGE"),
    (0x0200, "LOCKED"),
    (0x0400, "RETRY"),
    (0x0800, "FALLBACK"),
    (0x1000, "DONE_COW"),
    (0x2000, "NEEDDSYNC"),
    (0x4000, "COMPLETED"),
];

/// Bits that mean "no mapping was installed".
pub const VM_FAULT_ERROR_BITS: u32 = 0x0001 | 0x0002 | 0x0010 | 0x0020 | 0x0040 | 0x0400 | 0x0800;

/// `vm_fault_t` as `NOPAGE|MAJOR`; `0` when no bit is set.
pub fn vm_fault_name(v: u32) -> String {
    let mut parts: Vec<String> = VM_FAULT_NAMES
        .iter()
        .filter(|(bit, _)| v & bit != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let known: u32 = VM_FAULT_NAMES.iter().map(|(b, _)| b).fold(0, |a, b| a | b);
    if v & !known != 0 {
        parts.push(format!("{:#x}", v & !known));
    }
    if parts.is_empty() {
        "0".into()
    } else {
        parts.join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_vm_fault_bits() {
        assert_eq!(vm_fault_name(0x100), "NOPAGE");
        assert_eq!(vm_fault_name(0x104), "MAJOR|NOPAGE");
        assert_eq!(vm_fault_name(0x800), "FALLBACK");
        assert_eq!(vm_fault_name(0), "0");
        assert_eq!(vm_fault_name(0x10_0000), "0x100000");
    }
}
