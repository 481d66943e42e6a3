//! Ring-buffer bytes → [`Event`]s.

use dax_probe_common::{
    DAX_ENTRY_ZERO_PAGE, DEV_DAX_KILLED, DEV_DEPARTING, DEV_GONE, DeviceEvent, Event as RawEvent,
    EventKind, FAULT_DEVDAX, FAULT_FLAG_USER, FAULT_FLAG_WRITE, FAULT_PFN_VALID, FaultEvent,
    FenceSignalEvent, ForkEvent, GUARD_AGENT_PASSED, GUARD_REFUSED_UNREAD, KernelSignalEvent,
    MF_MEM_PRE_REMOVE, MF_RESULT, MemoryFailureEvent, MmapDeniedEvent, MremapEvent,
    UnbindGuardEvent, ZAP_COW, ZAP_DEVDAX, ZAP_EXITING, ZAP_OWN_MM, ZapEvent, header_of,
};

use crate::{
    event::{
        DeviceChange, DevicePhase, Event, Fault, FenceSignal, Fork, GuardVerdict, KernelSigbus,
        MemoryFailure, MmapDenied, Mremap, PfnSource, UnbindGuarded, VM_FAULT_ERROR_BITS, Zap,
        mf_page_type_name, mf_result_name, vm_fault_name,
    },
    topology::{DevId, Topology},
};

/// `VM_SHARED` in `vm_flags` (stable since 2.6).
const VM_SHARED: u64 = 0x8;

/// Looks a pfn up when the kernel could not tell it (no insert hook on this kernel).
pub trait PfnLookup {
    fn pfn_of(&self, pid: u32, address: u64) -> Option<u64>;
}

/// No fallback lookup.
pub struct NoLookup;

impl PfnLookup for NoLookup {
    fn pfn_of(&self, _: u32, _: u64) -> Option<u64> {
        None
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("unknown event kind {0} (agent and kernel programs from different builds?)")]
    UnknownKind(u32),
    #[error("event kind {kind} claims {claimed} bytes but {got} arrived")]
    Truncated { kind: u32, claimed: u32, got: usize },
}

pub struct Decoder<'a, L: PfnLookup> {
    pub topology: &'a Topology,
    pub lookup: L,
}

impl<L: PfnLookup> Decoder<'_, L> {
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, DecodeError> {
        let hdr = header_of(bytes).ok_or(DecodeError::Short(bytes.len()))?;
        if (hdr.size as usize) > bytes.len() {
            return Err(DecodeError::Truncated {
                kind: hdr.kind,
                claimed: hdr.size,
                got: bytes.len(),
            });
        }
        match EventKind::from_u32(hdr.kind) {
            Some(EventKind::Fault) => Ok(Event::Fault(self.fault(&raw::<FaultEvent>(bytes)?))),
            Some(EventKind::Zap) => Ok(Event::Zap(zap(&raw::<ZapEvent>(bytes)?))),
            Some(EventKind::Fork) => {
                let f = raw::<ForkEvent>(bytes)?;
                Ok(Event::Fork(Fork {
                    ts_ns: f.hdr.ts_ns,
                    parent_tgid: f.hdr.tgid,
                    comm: comm_string(&f.hdr.comm),
                    child_tgid: f.child_tgid,
                    child_mm: f.child_mm,
                }))
            }
            Some(EventKind::Mremap) => {
                let m = raw::<MremapEvent>(bytes)?;
                Ok(Event::Mremap(Mremap {
                    ts_ns: m.hdr.ts_ns,
                    tgid: m.hdr.tgid,
                    comm: comm_string(&m.hdr.comm),
                    old_addr: m.old_addr,
                    old_len: m.old_len,
                    new_len: m.new_len,
                    flags: m.flags,
                    new_addr: m.new_addr,
                }))
            }
            Some(EventKind::Device) => {
                let d = raw::<DeviceEvent>(bytes)?;
                Ok(Event::Device(DeviceChange {
                    ts_ns: d.hdr.ts_ns,
                    phase: match d.phase {
                        DEV_DEPARTING => DevicePhase::Departing,
                        DEV_GONE => DevicePhase::Gone,
                        DEV_DAX_KILLED => DevicePhase::DaxKilled,
                        _ => DevicePhase::HolderNotify,
                    },
                    tgid: d.hdr.tgid,
                    tid: d.hdr.tid,
                    comm: comm_string(&d.hdr.comm),
                    device: comm_string(&d.dev_name),
                    driver: comm_string(&d.drv_name),
                    bus: comm_string(&d.bus_name),
                    offset: d.offset,
                    len: d.len,
                    mf_flags: d.mf_flags,
                    pre_remove: d.mf_flags & MF_MEM_PRE_REMOVE != 0,
                }))
            }
            Some(EventKind::MemoryFailure) => {
                let m = raw::<MemoryFailureEvent>(bytes)?;
                let result = m.phase == MF_RESULT;
                Ok(Event::MemoryFailure(MemoryFailure {
                    ts_ns: m.hdr.ts_ns,
                    pfn: m.pfn,
                    phase: if result { "result" } else { "start" },
                    tgid: m.hdr.tgid,
                    comm: comm_string(&m.hdr.comm),
                    flags: m.flags,
                    page_type: result.then(|| mf_page_type_name(m.mf_type)),
                    result: result.then(|| mf_result_name(m.result)),
                }))
            }
            Some(EventKind::KernelSignal) => {
                let k = raw::<KernelSignalEvent>(bytes)?;
                Ok(Event::KernelSigbus(KernelSigbus {
                    ts_ns: k.hdr.ts_ns,
                    pid: k.victim_tgid,
                    tid: k.victim_tid,
                    comm: comm_string(&k.victim_comm),
                    addr: k.addr,
                    code: match k.code {
                        4 => "BUS_MCEERR_AR".into(),
                        5 => "BUS_MCEERR_AO".into(),
                        c => format!("code {c}"),
                    },
                    lsb: k.lsb,
                    sender_pid: k.hdr.tgid,
                }))
            }
            Some(EventKind::MmapDenied) => {
                let m = raw::<MmapDeniedEvent>(bytes)?;
                Ok(Event::MmapDenied(MmapDenied {
                    ts_ns: m.hdr.ts_ns,
                    pid: m.hdr.tgid,
                    comm: comm_string(&m.hdr.comm),
                    dev: DevId::from_kernel(m.dev),
                    ino: m.ino,
                }))
            }
            Some(EventKind::FenceSignal) => {
                let f = raw::<FenceSignalEvent>(bytes)?;
                Ok(Event::FenceSignal(FenceSignal {
                    ts_ns: f.hdr.ts_ns,
                    pid: f.hdr.tgid,
                    tid: f.hdr.tid,
                    comm: comm_string(&f.hdr.comm),
                    signal: crate::policy::signal::Signal(f.signal as i32).name(),
                    dev: DevId::from_kernel(f.dev),
                    ino: f.ino,
                    error: errno_of(f.ret),
                }))
            }
            Some(EventKind::UnbindGuard) => {
                let g = raw::<UnbindGuardEvent>(bytes)?;
                Ok(Event::UnbindGuard(UnbindGuarded {
                    ts_ns: g.hdr.ts_ns,
                    pid: g.hdr.tgid,
                    tid: g.hdr.tid,
                    comm: comm_string(&g.hdr.comm),
                    written: comm_string(&g.name),
                    driver: comm_string(&g.drv_name),
                    bus: comm_string(&g.bus_name),
                    syscall: g.syscall,
                    verdict: match g.verdict {
                        GUARD_AGENT_PASSED => GuardVerdict::AgentPassed,
                        GUARD_REFUSED_UNREAD => GuardVerdict::RefusedUnreadable,
                        _ => GuardVerdict::Refused,
                    },
                    errno: errno_of(g.ret),
                }))
            }
            None => Err(DecodeError::UnknownKind(hdr.kind)),
        }
    }

    fn fault(&self, raw: &FaultEvent) -> Fault {
        let page_size = 1u64 << raw.page_shift.clamp(12, 30);
        let mapped = raw.result & VM_FAULT_ERROR_BITS == 0;
        let zero_page = raw.entry_flags & DAX_ENTRY_ZERO_PAGE != 0;
        let page_address = raw.address & !(page_size - 1);
        let (mut pfn, mut pfn_source) = if raw.flags & FAULT_PFN_VALID != 0 && mapped {
            (Some(raw.pfn), Some(PfnSource::Kernel))
        } else {
            (None, None)
        };
        if pfn.is_none()
            && mapped
            && !zero_page
            && let Some(p) = self.lookup.pfn_of(raw.hdr.tgid, page_address)
        {
            pfn = Some(p);
            pfn_source = Some(PfnSource::Pagemap);
        }
        if zero_page {
            // The shared zero page is RAM, not the device: never report it as a pmem pfn.
            pfn = None;
            pfn_source = None;
        }
        let devdax = raw.flags & FAULT_DEVDAX != 0;
        let device = pfn
            .and_then(|p| self.topology.namespace_of_pfn(p))
            .map(|n| n.device_name().to_string());
        Fault {
            ts_ns: raw.hdr.ts_ns,
            tgid: raw.hdr.tgid,
            tid: raw.hdr.tid,
            comm: comm_string(&raw.hdr.comm),
            dev: DevId::from_kernel(raw.dev),
            ino: raw.ino,
            offset: (raw.pgoff << 12) & !(page_size - 1),
            address: raw.address,
            page_address,
            pfn,
            pfn_source,
            page_size,
            write: raw.fault_flags & FAULT_FLAG_WRITE != 0,
            user: raw.fault_flags & FAULT_FLAG_USER != 0,
            mapped,
            zero_page,
            result: vm_fault_name(raw.result),
            result_raw: raw.result,
            vma_start: raw.vm_start,
            vma_end: raw.vm_end,
            shared: raw.vm_flags & VM_SHARED != 0,
            device,
            devdax,
            mm: raw.mm,
            pages: u64::from(raw.pages.max(1)),
            last_ts_ns: raw.last_ns.max(raw.hdr.ts_ns),
            range: (raw.seq != 0).then_some((raw.cpu, raw.seq)),
        }
    }
}

fn raw<T: RawEvent>(bytes: &[u8]) -> Result<T, DecodeError> {
    T::from_bytes(bytes).ok_or(DecodeError::Truncated {
        kind: T::KIND as u32,
        claimed: core::mem::size_of::<T>() as u32,
        got: bytes.len(),
    })
}

fn zap(z: &ZapEvent) -> Zap {
    Zap {
        ts_ns: z.hdr.ts_ns,
        tgid: z.hdr.tgid,
        tid: z.hdr.tid,
        comm: comm_string(&z.hdr.comm),
        start: z.start,
        end: z.end,
        vma_start: z.vm_start,
        vma_end: z.vm_end,
        // Saturating: a corrupt record must not overflow (found by the decode fuzz target).
        offset: (z.vm_pgoff << 12).saturating_add(z.start.saturating_sub(z.vm_start)),
        dev: DevId::from_kernel(z.dev),
        ino: z.ino,
        devdax: z.flags & ZAP_DEVDAX != 0,
        own_mm: z.flags & ZAP_OWN_MM != 0,
        exiting: z.flags & ZAP_EXITING != 0,
        cow: z.flags & ZAP_COW != 0,
        owner_tgid: (z.owner_tgid != 0).then_some(z.owner_tgid),
        mm: z.mm,
    }
}

pub fn comm_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&c| c == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// The errno of a kernel helper's result (0, or a negative errno), as the records carry it.
/// A corrupted record may hold i32::MIN, which has no negation: a number to print, never a
/// panic of the agent.
fn errno_of(ret: i32) -> Option<i32> {
    (ret != 0).then(|| ret.wrapping_neg())
}

#[cfg(test)]
mod tests {
    use dax_probe_common::{EventHeader, FAULT_PMD};

    use super::*;

    fn raw_fault() -> FaultEvent {
        FaultEvent {
            hdr: EventHeader {
                kind: 1,
                size: 128,
                ts_ns: 5,
                tgid: 100,
                tid: 101,
                comm: *b"dax-workload\0\0\0\0",
            },
            ino: 12,
            pgoff: 515,
            address: 0x7f00_0020_3123,
            pfn: 0x100a00,
            vm_start: 0x7f00_0000_0000,
            vm_end: 0x7f00_0080_0000,
            vm_flags: 0xfb,
            mm: 0xffff_8880_0000_1000,
            dev: (259 << 20),
            result: 0x100,
            fault_flags: 0x1,
            entry_flags: 0,
            flags: FAULT_PFN_VALID,
            page_shift: 12,
            pages: 1,
            cpu: 0,
            seq: 0,
            last_ns: 5,
            check: 0,
        }
    }

    #[test]
    fn decodes_a_range_as_one_line_for_all_its_pages() {
        let topo = Topology::default();
        let d = Decoder {
            topology: &topo,
            lookup: NoLookup,
        };
        let raw = FaultEvent {
            address: 0x7f00_0020_3000,
            pgoff: 515,
            pages: 300,
            cpu: 1,
            seq: 9,
            last_ns: 99,
            ..raw_fault()
        };
        let Event::Fault(f) = d.decode(raw.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(
            (f.pages, f.span(), f.range),
            (300, 300 * 4096, Some((1, 9)))
        );
        assert_eq!((f.ts_ns, f.last_ts_ns), (5, 99));
        assert_eq!(
            f.pfn_at(0x7f00_0020_3000 + 299 * 4096),
            Some(0x100a00 + 299)
        );
        assert_eq!(f.pfn_at(0x7f00_0020_3000 + 300 * 4096), None);
        // A record without a page count (never written by the kernel) is one fault.
        let Event::Fault(f) = d.decode(FaultEvent { pages: 0, ..raw }.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(f.pages, 1);
    }

    struct Fixed(u64);
    impl PfnLookup for Fixed {
        fn pfn_of(&self, _: u32, _: u64) -> Option<u64> {
            Some(self.0)
        }
    }

    /// Found by the fuzz smoke test: a fence record whose result is i32::MIN made the
    /// decoder's negation overflow (a panic in the agent on one corrupted ring record).
    #[test]
    fn a_fence_record_with_any_result_decodes() {
        let topo = Topology::default();
        let d = Decoder {
            topology: &topo,
            lookup: NoLookup,
        };
        for ret in [i32::MIN, -3, 0] {
            let raw = FenceSignalEvent {
                hdr: EventHeader {
                    kind: EventKind::FenceSignal as u32,
                    size: core::mem::size_of::<FenceSignalEvent>() as u32,
                    ts_ns: 5,
                    tgid: 100,
                    tid: 100,
                    comm: *b"dax-workload\0\0\0\0",
                },
                dev: 259 << 20,
                signal: 15,
                ino: 12,
                ret,
                _pad: 0,
            };
            let Event::FenceSignal(f) = d.decode(raw.as_bytes()).unwrap() else {
                panic!()
            };
            assert_eq!(f.error, (ret != 0).then(|| ret.wrapping_neg()));
        }
    }

    #[test]
    fn decodes_a_pte_fault() {
        let topo = Topology::default();
        let d = Decoder {
            topology: &topo,
            lookup: NoLookup,
        };
        let Event::Fault(f) = d.decode(raw_fault().as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(f.tgid, 100);
        assert_eq!(f.comm, "dax-workload");
        assert_eq!(
            f.dev,
            DevId {
                major: 259,
                minor: 0
            }
        );
        assert_eq!(f.offset, 515 * 4096);
        assert_eq!(f.page_address, 0x7f00_0020_3000);
        assert_eq!(f.pfn, Some(0x100a00));
        assert_eq!(f.pfn_source, Some(PfnSource::Kernel));
        assert!(f.write && f.mapped && f.shared && !f.zero_page);
        assert_eq!(f.page_size, 4096);
        assert_eq!(f.result, "NOPAGE");
    }

    #[test]
    fn decodes_the_unbind_guards_reports() {
        use dax_probe_common::{GUARD_REFUSED, guard_key_of};
        let topo = Topology::default();
        let d = Decoder {
            topology: &topo,
            lookup: NoLookup,
        };
        let mut drv = [0u8; 16];
        drv[..7].copy_from_slice(b"nd_pmem");
        let raw = UnbindGuardEvent {
            hdr: EventHeader {
                kind: EventKind::UnbindGuard as u32,
                size: core::mem::size_of::<UnbindGuardEvent>() as u32,
                ts_ns: 5,
                tgid: 77,
                tid: 78,
                comm: *b"sh\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            },
            name: guard_key_of("pfn0.0").unwrap().name,
            drv_name: drv,
            bus_name: *b"nd\0\0\0\0\0\0",
            syscall: 1,
            verdict: GUARD_REFUSED,
            ret: -16,
            _pad: 0,
        };
        let Event::UnbindGuard(g) = d.decode(raw.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!((g.pid, g.tid, g.comm.as_str()), (77, 78, "sh"));
        assert_eq!(
            (g.written.as_str(), g.driver.as_str(), g.bus.as_str()),
            ("pfn0.0", "nd_pmem", "nd")
        );
        assert_eq!((g.verdict, g.errno), (GuardVerdict::Refused, Some(16)));
        let passed = UnbindGuardEvent {
            verdict: GUARD_AGENT_PASSED,
            ret: 0,
            ..raw
        };
        let Event::UnbindGuard(g) = d.decode(passed.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!((g.verdict, g.errno), (GuardVerdict::AgentPassed, None));
        let unread = UnbindGuardEvent {
            verdict: GUARD_REFUSED_UNREAD,
            name: [0; 32],
            ..raw
        };
        let Event::UnbindGuard(g) = d.decode(unread.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(
            (g.verdict, g.written.as_str()),
            (GuardVerdict::RefusedUnreadable, "")
        );
        // Cut short: refused, not misread.
        assert!(d.decode(&raw.as_bytes()[..100]).is_err());
        // Found by the fuzz smoke test: any result a record holds decodes (i32::MIN had no
        // negation).
        let odd = UnbindGuardEvent {
            ret: i32::MIN,
            ..raw
        };
        let Event::UnbindGuard(g) = d.decode(odd.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(g.errno, Some(i32::MIN));
    }

    #[test]
    fn aligns_pmd_faults_to_two_megabytes() {
        let topo = Topology::default();
        let d = Decoder {
            topology: &topo,
            lookup: NoLookup,
        };
        let mut raw = raw_fault();
        raw.page_shift = 21;
        raw.flags |= FAULT_PMD;
        let Event::Fault(f) = d.decode(raw.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(f.page_size, 2 << 20);
        assert_eq!(f.page_address, 0x7f00_0020_0000);
        assert_eq!(f.offset, 512 * 4096);
    }

    #[test]
    fn falls_back_to_lookup_only_for_mapped_faults_without_kernel_pfn() {
        let topo = Topology::default();
        let d = Decoder {
            topology: &topo,
            lookup: Fixed(0x4242),
        };
        let mut raw = raw_fault();
        raw.flags = 0;
        let Event::Fault(f) = d.decode(raw.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(
            (f.pfn, f.pfn_source),
            (Some(0x4242), Some(PfnSource::Pagemap))
        );

        raw.result = 0x800; // FALLBACK: nothing mapped
        let Event::Fault(f) = d.decode(raw.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(f.pfn, None);
        assert!(!f.mapped);
    }

    #[test]
    fn never_reports_the_zero_page_as_a_device_pfn() {
        let topo = Topology::default();
        let d = Decoder {
            topology: &topo,
            lookup: Fixed(1),
        };
        let mut raw = raw_fault();
        raw.entry_flags = DAX_ENTRY_ZERO_PAGE;
        let Event::Fault(f) = d.decode(raw.as_bytes()).unwrap() else {
            panic!()
        };
        assert!(f.zero_page);
        assert_eq!(f.pfn, None);
    }

    #[test]
    fn rejects_short_unknown_and_truncated_records() {
        let topo = Topology::default();
        let d = Decoder {
            topology: &topo,
            lookup: NoLookup,
        };
        assert_eq!(d.decode(&[0; 10]).unwrap_err(), DecodeError::Short(10));
        let mut raw = raw_fault();
        raw.hdr.kind = 77;
        assert_eq!(
            d.decode(raw.as_bytes()).unwrap_err(),
            DecodeError::UnknownKind(77)
        );
        let raw = raw_fault();
        assert!(matches!(
            d.decode(&raw.as_bytes()[..60]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn decodes_the_fences_signal_with_its_device_and_failure() {
        let topo = Topology::default();
        let d = Decoder {
            topology: &topo,
            lookup: NoLookup,
        };
        let mut raw = FenceSignalEvent {
            hdr: EventHeader {
                kind: EventKind::FenceSignal as u32,
                size: 64,
                ts_ns: 9,
                tgid: 300,
                tid: 301,
                comm: *b"victim\0\0\0\0\0\0\0\0\0\0",
            },
            dev: (259 << 20) | 1,
            signal: libc::SIGTERM as u32,
            ino: 12,
            ret: 0,
            _pad: 0,
        };
        let Event::FenceSignal(f) = d.decode(raw.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!((f.pid, f.tid, f.comm.as_str()), (300, 301, "victim"));
        assert_eq!(f.signal, "SIGTERM");
        assert_eq!(
            f.dev,
            DevId {
                major: 259,
                minor: 1
            }
        );
        assert_eq!((f.ino, f.error), (12, None));
        raw.ret = -libc::EPERM;
        let Event::FenceSignal(f) = d.decode(raw.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(f.error, Some(libc::EPERM));
    }

    #[test]
    fn a_zap_with_an_impossible_offset_does_not_overflow() {
        let z = dax_probe_common::ZapEvent {
            vm_pgoff: u64::MAX >> 12,
            start: u64::MAX,
            vm_start: 0,
            ..Default::default()
        };
        assert_eq!(zap(&z).offset, u64::MAX);
    }
}
