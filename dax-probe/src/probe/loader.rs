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
    COUNTERS_MAP, Counter, EVENTS_MAP, FENCED_MAP, KernelLayout, LAYOUT_GLOBAL, WATCHED_MAP,
};
use serde::Serialize;

use super::plan::{Attach, AttachKind, Candidate, Concern, Plan};

/// The eBPF object, built by build.rs through aya-build.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dax-probe"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot parse the kernel BTF for loading: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("cannot load the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error(
        "no way to observe {concern} on this kernel: {tried}. \
         Run `dax-probe doctor` for what this kernel offers"
    )]
    MissingHook {
        concern: &'static str,
        tried: String,
    },
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

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or(LoadError::MissingMap("EVENTS"))?;
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
        Ok(Fenced {
            map: BpfHashMap::try_from(map)?,
            active: Array::try_from(active)?,
            count: 0,
        })
    }

    /// Takes the per-CPU counters (once).
    pub fn take_counters(&mut self) -> Result<Counters, LoadError> {
        let map = self
            .ebpf
            .take_map(COUNTERS_MAP)
            .ok_or(LoadError::MissingMap("COUNTERS"))?;
        Ok(Counters(PerCpuArray::try_from(map)?))
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
}

/// Fenced devices, kernel side: the fault program signals tasks faulting on them and the
/// LSM program (when loaded) refuses new mappings.
pub struct Fenced {
    map: BpfHashMap<MapData, u32, u32>,
    active: Array<MapData, u32>,
    count: usize,
}

impl Fenced {
    /// Fences `dev` (kernel encoding); `fault_signal` 0 means no signal on faults.
    pub fn add(&mut self, dev: u32, fault_signal: i32) -> Result<(), aya::maps::MapError> {
        self.map.insert(dev, fault_signal as u32, 0)?;
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
    }
}

/// Sums of the kernel programs' per-CPU counters.
pub struct Counters(PerCpuArray<MapData, u64>);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

/// Lifts RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps against it, and a 4 MiB ring
/// buffer does not fit the default 64 KiB.
fn raise_memlock() {
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

/// `ring_bytes`: size of the event ring buffer (a power of two, at least a page). On-demand
/// concerns (the mmap fence) are loaded only with `on_demand`.
pub fn load(
    plan: &Plan,
    layout: &KernelLayout,
    btf_path: &Path,
    ring_bytes: u32,
    on_demand: bool,
) -> Result<Probe, LoadError> {
    raise_memlock();
    let btf = Btf::parse_file(btf_path, Endianness::default())?;
    // Wake the reader early only when an eighth of the ring is waiting; otherwise its poll
    // timer collects events in batches (see reader.rs).
    let layout = &KernelLayout {
        wakeup_bytes: (ring_bytes / 8).max(1),
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
#[derive(Clone, Debug, Serialize)]
pub struct Upgrade {
    pub concern: Concern,
    pub was: Option<&'static str>,
    pub chosen: &'static str,
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
                            was: choice.chosen,
                            chosen: cand.label,
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
