//! Loads the embedded eBPF object and attaches, per concern, the first candidate that works.
//!
//! Attachment is all-or-nothing from the caller's point of view: everything lives in the
//! returned [`Probe`]; if any required concern cannot be served, the error is returned and
//! dropping the half-built `Ebpf` detaches and unloads whatever did attach. No pins, no
//! leftovers in the kernel.

use std::path::Path;

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FEntry, FExit, KProbe, Lsm, Program, RawTracePoint},
};
use dax_probe_common::{
    COUNTERS_MAP, Counter, DEVICE_EVENTS_MAP, EVENTS_MAP, FENCE_EXCLUDE_COMM_MAP,
    FENCE_EXCLUDE_PID_MAP, FENCED_MAP, FaultEvent, FenceCommKey, FencePidKey, GUARD_CONF_MAP,
    GUARD_SLOT_ACTIVE, GUARD_SLOT_AGENT, GUARDED_MAP, GuardKey, KernelLayout, LAYOUT_GLOBAL,
    PENDING_MAP, TASK_COMM_LEN, WATCHED_MAP, guard_key_of,
};
use serde::Serialize;

use super::plan::{Attach, AttachKind, Candidate, Concern, Plan};

/// The eBPF object, built by build.rs through aya-build.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dax-probe"));

/// The embedded object's bytes (empty in a placeholder build).
pub fn object_bytes() -> &'static [u8] {
    OBJECT
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot parse the kernel BTF for loading: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error(
        "no way to observe {concern} on this kernel: {tried}. \
         Run `dax-probe doctor` for what this kernel offers"
    )]
    MissingHook {
        concern: &'static str,
        tried: String,
    },
    #[error("{0}")]
    Object(#[from] super::object::ObjectError),
    #[error("eBPF program {0} missing from the object (stale build?)")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} missing from the object (stale build?)")]
    MissingMap(&'static str),
    #[error("eBPF map error: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// What was chosen for one concern.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    pub concern: Concern,
    /// Label of the candidate in use, `None` when nothing could serve the concern.
    pub chosen: Option<&'static str>,
    pub userspace: bool,
    /// Candidates tried before the chosen one and why they failed at load/attach time.
    pub failed: Vec<(&'static str, String)>,
}

pub struct Probe {
    ebpf: Ebpf,
    pub choices: Vec<Choice>,
}

impl Probe {
    pub fn choice(&self, c: Concern) -> Option<&Choice> {
        self.choices.iter().find(|x| x.concern == c)
    }

    /// Runs and run time of each attached program (with `kernel.bpf_stats_enabled`).
    pub fn program_stats(&self) -> Vec<super::stats::ProgramStat> {
        super::stats::of(&self.ebpf)
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or(LoadError::MissingMap("EVENTS"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Takes the device event ring buffer (once).
    pub fn take_device_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(DEVICE_EVENTS_MAP)
            .ok_or(LoadError::MissingMap("DEVICE_EVENTS"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Takes the WATCHED set (once).
    pub fn take_watched(&mut self) -> Result<Watched, LoadError> {
        let map = self
            .ebpf
            .take_map(WATCHED_MAP)
            .ok_or(LoadError::MissingMap("WATCHED"))?;
        Ok(Watched(BpfHashMap::try_from(map)?))
    }

    /// Takes the fence maps (once).
    pub fn take_fenced(&mut self) -> Result<Fenced, LoadError> {
        let map = self
            .ebpf
            .take_map(FENCED_MAP)
            .ok_or(LoadError::MissingMap("FENCED"))?;
        let active = self
            .ebpf
            .take_map("FENCE_ACTIVE")
            .ok_or(LoadError::MissingMap("FENCE_ACTIVE"))?;
        let comms = self
            .ebpf
            .take_map(FENCE_EXCLUDE_COMM_MAP)
            .ok_or(LoadError::MissingMap("FENCE_EXCLUDE_COMM"))?;
        let pids = self
            .ebpf
            .take_map(FENCE_EXCLUDE_PID_MAP)
            .ok_or(LoadError::MissingMap("FENCE_EXCLUDE_PID"))?;
        Ok(Fenced {
            map: BpfHashMap::try_from(map)?,
            active: Array::try_from(active)?,
            comms: BpfHashMap::try_from(comms)?,
            pids: BpfHashMap::try_from(pids)?,
            excluded: std::collections::HashMap::new(),
            count: 0,
        })
    }

    /// Takes the unbind guard's maps (once).
    pub fn take_guarded(&mut self) -> Result<Guarded, LoadError> {
        let map = self
            .ebpf
            .take_map(GUARDED_MAP)
            .ok_or(LoadError::MissingMap("GUARDED"))?;
        let conf = self
            .ebpf
            .take_map(GUARD_CONF_MAP)
            .ok_or(LoadError::MissingMap("GUARD_CONF"))?;
        Ok(Guarded {
            map: BpfHashMap::try_from(map)?,
            conf: Array::try_from(conf)?,
            listed: std::collections::BTreeSet::new(),
        })
    }

    /// Takes the per-CPU counters (once).
    /// Takes every CPU's pending fault range (once).
    pub fn take_pending(&mut self) -> Result<Pending, LoadError> {
        let map = self
            .ebpf
            .take_map(PENDING_MAP)
            .ok_or(LoadError::MissingMap("PENDING"))?;
        Ok(Pending(PerCpuArray::try_from(map)?))
    }

    pub fn take_counters(&mut self) -> Result<Counters, LoadError> {
        let map = self
            .ebpf
            .take_map(COUNTERS_MAP)
            .ok_or(LoadError::MissingMap("COUNTERS"))?;
        Ok(Counters(PerCpuArray::try_from(map)?, Default::default()))
    }
}

/// Each CPU's fault range still being extended (see `dax-probe-ebpf/src/fault.rs`).
pub struct Pending(PerCpuArray<MapData, FaultEvent>);

impl Pending {
    /// The ranges pending now, one per CPU at most, each consistent: a slot copied while
    /// its CPU refilled it fails its check and is left for the next read (or for its
    /// record). One syscall for all CPUs.
    pub fn read(&self) -> Vec<FaultEvent> {
        match self.0.get(&0, 0) {
            Ok(values) => values
                .iter()
                .filter(|r| r.pages != 0 && r.seq != 0)
                .filter(|r| dax_probe_common::range_check(r) == r.check)
                .copied()
                .collect(),
            Err(e) => {
                log::debug!("cannot read the pending fault ranges: {e}");
                Vec::new()
            }
        }
    }
}

/// The kernel-side set of processes holding DAX pages.
pub struct Watched(BpfHashMap<MapData, u32, u32>);

impl Watched {
    pub fn add(&mut self, tgid: u32) {
        if let Err(e) = self.0.insert(tgid, 1, 0) {
            log::warn!("cannot watch process {tgid}: {e}");
        }
    }
    pub fn remove(&mut self, tgid: u32) {
        let _ = self.0.remove(&tgid);
    }

    /// Drops every watched process for which `alive` is false; returns how many. The fault
    /// program adds holders itself and nothing in the kernel removes a process that exits
    /// after it unmapped: without this the 65,536-entry map fills and new holders' forks
    /// and mremaps go unreported.
    pub fn sweep(&mut self, alive: impl Fn(u32) -> bool) -> usize {
        let keys: Vec<u32> = self.0.keys().filter_map(Result::ok).collect();
        let dead = dead_of(&keys, alive);
        for t in &dead {
            let _ = self.0.remove(t);
        }
        dead.len()
    }
}

/// The tgids of `keys` that are no longer alive.
fn dead_of(keys: &[u32], alive: impl Fn(u32) -> bool) -> Vec<u32> {
    keys.iter().copied().filter(|t| !alive(*t)).collect()
}

#[cfg(test)]
mod watched_tests {
    #[test]
    fn sweep_keeps_the_living_and_drops_the_dead() {
        let living = [10, 30];
        assert_eq!(
            super::dead_of(&[10, 20, 30, 40], |t| living.contains(&t)),
            vec![20, 40]
        );
    }
}

/// Fenced devices, kernel side: the fault program signals tasks faulting on them (except
/// the excluded ones) and the LSM program (when loaded) refuses new mappings.
pub struct Fenced {
    map: BpfHashMap<MapData, u32, u32>,
    active: Array<MapData, u32>,
    comms: BpfHashMap<MapData, FenceCommKey, u32>,
    pids: BpfHashMap<MapData, FencePidKey, u32>,
    /// The exclusion keys written for each fenced device, to remove with its fence.
    excluded: std::collections::HashMap<u32, (Vec<FenceCommKey>, Vec<FencePidKey>)>,
    count: usize,
}

/// `comm` as the kernel compares it: the first 15 bytes, NUL padded.
pub fn kernel_comm(comm: &str) -> [u8; TASK_COMM_LEN] {
    let mut out = [0u8; TASK_COMM_LEN];
    let b = comm.as_bytes();
    let n = b.len().min(TASK_COMM_LEN - 1);
    out[..n].copy_from_slice(&b[..n]);
    out
}

impl Fenced {
    /// Fences `dev` (kernel encoding); `fault_signal` 0 means no signal on faults. The
    /// exclusions are written first: the fault program must never see the device fenced
    /// without them. When one cannot be written the device is not fenced at all.
    pub fn add(
        &mut self,
        dev: u32,
        fault_signal: i32,
        comms: &[String],
        pids: &[u32],
    ) -> Result<(), aya::maps::MapError> {
        self.remove(dev);
        let comm_keys: Vec<FenceCommKey> = comms
            .iter()
            .map(|c| FenceCommKey {
                dev,
                comm: kernel_comm(c),
            })
            .collect();
        let pid_keys: Vec<FencePidKey> =
            pids.iter().map(|&tgid| FencePidKey { dev, tgid }).collect();
        self.excluded
            .insert(dev, (comm_keys.clone(), pid_keys.clone()));
        let written = comm_keys
            .iter()
            .try_for_each(|k| self.comms.insert(k, 1, 0))
            .and_then(|()| pid_keys.iter().try_for_each(|k| self.pids.insert(k, 1, 0)));
        if let Err(e) = written {
            self.drop_exclusions(dev);
            return Err(e);
        }
        if let Err(e) = self.map.insert(dev, fault_signal as u32, 0) {
            self.drop_exclusions(dev);
            return Err(e);
        }
        self.count += 1;
        self.active.set(0, 1, 0)
    }

    pub fn remove(&mut self, dev: u32) {
        if self.map.remove(&dev).is_ok() {
            self.count = self.count.saturating_sub(1);
        }
        if self.count == 0 {
            let _ = self.active.set(0, 0, 0);
        }
        // After the fence itself: a fault in between finds the device unfenced.
        self.drop_exclusions(dev);
    }

    fn drop_exclusions(&mut self, dev: u32) {
        if let Some((comms, pids)) = self.excluded.remove(&dev) {
            for k in &comms {
                let _ = self.comms.remove(k);
            }
            for k in &pids {
                let _ = self.pids.remove(k);
            }
        }
    }
}

#[cfg(test)]
mod fence_tests {
    #[test]
    fn comms_are_cut_to_what_the_kernel_keeps() {
        assert_eq!(&super::kernel_comm("sshd")[..5], b"sshd\0");
        let long = super::kernel_comm("a-very-long-command-name");
        assert_eq!(&long[..15], b"a-very-long-com");
        assert_eq!(long[15], 0);
    }
}

/// The unbind guard's kernel side: the device names it refuses unbinds of, and who the
/// agent is (its own writes pass).
pub struct Guarded {
    map: BpfHashMap<MapData, GuardKey, u32>,
    conf: Array<MapData, u32>,
    listed: std::collections::BTreeSet<String>,
}

impl Guarded {
    /// Lets `tgid`'s writes through (reported, so the agent audits them).
    pub fn set_agent(&mut self, tgid: u32) -> Result<(), aya::maps::MapError> {
        self.conf.set(GUARD_SLOT_AGENT, tgid, 0)
    }

    /// Makes the kernel's list `names`: new names first, then the switch, then the names
    /// that left (a write in between is refused for a name on either list, never let
    /// through for one on both). A name the guard cannot hold is logged and skipped.
    pub fn set(&mut self, names: &std::collections::BTreeSet<String>) {
        for n in names.difference(&self.listed.clone()) {
            let Some(k) = guard_key_of(n) else {
                log::warn!("unbind guard: cannot guard the device name {n:?}");
                continue;
            };
            match self.map.insert(k, 1, 0) {
                Ok(()) => {
                    self.listed.insert(n.clone());
                }
                Err(e) => log::error!("unbind guard: cannot guard {n}: {e}"),
            }
        }
        let active = u32::from(!names.is_empty());
        if let Err(e) = self.conf.set(GUARD_SLOT_ACTIVE, active, 0) {
            log::error!(
                "unbind guard: cannot switch it {}: {e}",
                if active == 1 { "on" } else { "off" }
            );
        }
        for n in self.listed.clone().difference(names) {
            if let Some(k) = guard_key_of(n) {
                let _ = self.map.remove(&k);
            }
            self.listed.remove(n);
        }
    }
}

/// Sums of the kernel programs' per-CPU counters, and the agent's own
/// ([`Counter::ChannelFull`]).
pub struct Counters(
    PerCpuArray<MapData, u64>,
    pub(crate) std::sync::Arc<std::sync::atomic::AtomicU64>,
);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        if c == Counter::ChannelFull {
            return self.1.load(std::sync::atomic::Ordering::Relaxed);
        }
        self.0
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

/// Lifts RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps against it, and a 4 MiB ring
/// buffer does not fit the default 64 KiB.
pub(super) fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "could not lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `ring`: the event ring buffer's size (a power of two, at least a page) and whether faults
/// are coalesced into ranges. On-demand concerns (the mmap fence) are loaded only with
/// `on_demand`.
pub fn load(
    plan: &Plan,
    layout: &KernelLayout,
    btf_path: &Path,
    ring: super::Ring,
    on_demand: bool,
) -> Result<Probe, LoadError> {
    let ring_bytes = ring.bytes;
    super::object::check_abi(OBJECT, dax_probe_common::ABI_VERSION)?;
    raise_memlock();
    let btf = Btf::parse_file(btf_path, Endianness::default())?;
    // Wake the reader early only when an eighth of the ring is waiting; otherwise its poll
    // timer collects events in batches (see reader.rs).
    let layout = &KernelLayout {
        wakeup_bytes: (ring_bytes / 8).max(1),
        coalesce: u32::from(!ring.per_fault),
        ..*layout
    };
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global(LAYOUT_GLOBAL, layout, true)
        .map_max_entries(EVENTS_MAP, ring_bytes)
        .load(OBJECT)?;

    let mut choices = Vec::new();
    for (concern, _) in &plan.concerns {
        if concern.on_demand() && !on_demand {
            continue;
        }
        let mut choice = Choice {
            concern: *concern,
            chosen: None,
            userspace: false,
            failed: Vec::new(),
        };
        for cand in plan.usable(*concern) {
            match try_candidate(&mut ebpf, cand, &btf) {
                Ok(()) => {
                    choice.chosen = Some(cand.label);
                    choice.userspace = cand.userspace.is_some();
                    break;
                }
                Err(e) => {
                    log::info!(
                        "{}: {} failed: {e}; trying the next way",
                        concern.name(),
                        cand.label
                    );
                    choice.failed.push((cand.label, e));
                }
            }
        }
        if choice.chosen.is_none() && concern.required() {
            let mut tried: Vec<String> = plan
                .verdicts(*concern)
                .iter()
                .filter_map(|v| {
                    v.missing
                        .as_ref()
                        .map(|m| format!("{}: {m}", v.candidate.label))
                })
                .collect();
            tried.extend(choice.failed.iter().map(|(l, e)| format!("{l}: {e}")));
            return Err(LoadError::MissingHook {
                concern: concern.name(),
                tried: tried.join("; "),
            });
        }
        choices.push(choice);
    }
    Ok(Probe { ebpf, choices })
}

/// A concern that moved to a better way after the kernel changed (a module loaded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Upgrade {
    pub concern: Concern,
    pub was: Option<std::borrow::Cow<'static, str>>,
    pub chosen: std::borrow::Cow<'static, str>,
}

impl Probe {
    /// Tries, for every concern served only from userspace (or not at all), the kernel ways
    /// `plan` now finds usable: symbols of a module loaded after the agent started. A
    /// concern already served by a kernel program keeps it (its programs are in use).
    pub fn upgrade(&mut self, plan: &Plan, btf_path: &Path) -> Vec<Upgrade> {
        let Ok(btf) = Btf::parse_file(btf_path, Endianness::default()) else {
            return Vec::new();
        };
        let mut ups = Vec::new();
        for choice in &mut self.choices {
            if choice.chosen.is_some() && !choice.userspace {
                continue;
            }
            for cand in plan.usable(choice.concern) {
                if cand.userspace.is_some() || Some(cand.label) == choice.chosen {
                    break;
                }
                match try_candidate(&mut self.ebpf, cand, &btf) {
                    Ok(()) => {
                        ups.push(Upgrade {
                            concern: choice.concern,
                            was: choice.chosen.map(Into::into),
                            chosen: cand.label.into(),
                        });
                        choice.chosen = Some(cand.label);
                        choice.userspace = false;
                        break;
                    }
                    Err(e) => {
                        log::info!("{}: {} still fails: {e}", choice.concern.name(), cand.label)
                    }
                }
            }
        }
        ups
    }
}

/// Loads and attaches every program of a candidate. On failure, unloads what this candidate
/// loaded so the next candidate starts clean.
fn try_candidate(ebpf: &mut Ebpf, cand: &Candidate, btf: &Btf) -> Result<(), String> {
    let mut done: Vec<&'static str> = Vec::new();
    for a in cand.attaches {
        if let Err(e) = load_and_attach(ebpf, a, btf) {
            for p in done.iter().chain(std::iter::once(&a.program)) {
                unload(ebpf, p);
            }
            return Err(e);
        }
        done.push(a.program);
    }
    Ok(())
}

fn load_and_attach(ebpf: &mut Ebpf, a: &Attach, btf: &Btf) -> Result<(), String> {
    let prog = ebpf
        .program_mut(a.program)
        .ok_or_else(|| format!("program {} missing from the object", a.program))?;
    let err = |stage: &str, e: &dyn std::fmt::Display| {
        format!("{stage} {} {}: {e}", a.kind.label(), a.target)
    };
    let attach_err = |e: aya::programs::ProgramError| err("attach", &with_sources(&e));
    match a.kind {
        AttachKind::TpBtf => {
            let p: &mut BtfTracePoint = prog.try_into().map_err(|e| err("type", &e))?;
            p.load(a.target, btf)
                .map_err(|e| err("load", &verifier(e)))?;
            p.attach().map_err(attach_err)?;
        }
        AttachKind::RawTp => {
            let p: &mut RawTracePoint = prog.try_into().map_err(|e| err("type", &e))?;
            p.load().map_err(|e| err("load", &verifier(e)))?;
            p.attach(a.target).map_err(attach_err)?;
        }
        AttachKind::FEntry => {
            let p: &mut FEntry = prog.try_into().map_err(|e| err("type", &e))?;
            p.load(a.target, btf)
                .map_err(|e| err("load", &verifier(e)))?;
            p.attach().map_err(attach_err)?;
        }
        AttachKind::FExit => {
            let p: &mut FExit = prog.try_into().map_err(|e| err("type", &e))?;
            p.load(a.target, btf)
                .map_err(|e| err("load", &verifier(e)))?;
            p.attach().map_err(attach_err)?;
        }
        AttachKind::Lsm => {
            let p: &mut Lsm = prog.try_into().map_err(|e| err("type", &e))?;
            p.load(a.target, btf)
                .map_err(|e| err("load", &verifier(e)))?;
            p.attach().map_err(attach_err)?;
        }
        AttachKind::KProbe | AttachKind::KRetProbe => {
            // The section name (kprobe/kretprobe) decides the direction.
            let p: &mut KProbe = prog.try_into().map_err(|e| err("type", &e))?;
            p.load().map_err(|e| err("load", &verifier(e)))?;
            p.attach(a.target, 0).map_err(attach_err)?;
        }
    }
    Ok(())
}

/// An error with its causes, `a: b: c` (aya's messages often name only the outer step).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

/// Keeps the verifier log out of the one-line message but available with RUST_LOG=debug.
fn verifier(e: aya::programs::ProgramError) -> String {
    if let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &e
    {
        log::debug!("verifier log:\n{verifier_log}");
        return format!("rejected by the kernel ({io_error})");
    }
    e.to_string()
}

fn unload(ebpf: &mut Ebpf, name: &str) {
    let Some(prog) = ebpf.program_mut(name) else {
        return;
    };
    let r = match prog {
        Program::BtfTracePoint(p) => p.unload(),
        Program::RawTracePoint(p) => p.unload(),
        Program::FEntry(p) => p.unload(),
        Program::FExit(p) => p.unload(),
        Program::Lsm(p) => p.unload(),
        Program::KProbe(p) => p.unload(),
        _ => Ok(()),
    };
    if let Err(e) = r {
        log::debug!("unloading {name}: {e}");
    }
}
