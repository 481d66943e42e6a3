//! Kernel side of the agent: what the kernel offers, which hooks to use, loading them, and
//! reading their events.

pub mod btf;
pub mod decode;
pub mod facts;
pub mod floor;
pub mod layout;
pub mod loader;
pub mod object;
pub mod plan;
pub mod reader;
pub mod stats;

use std::path::{Path, PathBuf};

use tokio::sync::mpsc::{Receiver, channel};

use crate::exit::{Code, Failure};

pub use loader::{Counters, Probe};

/// Names of the loaded modules, sorted.
fn loaded_modules(root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(root.join("proc/modules")).unwrap_or_default();
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// Where to read the kernel from, and how the operator wants it probed.
#[derive(Clone, Debug)]
pub struct KernelSource {
    /// Root of /proc and /sys (normally `/`).
    pub root: PathBuf,
    /// BTF file to use instead of /sys/kernel/btf/vmlinux.
    pub btf: Option<PathBuf>,
    /// Attach kinds the operator ruled out (`--skip-hooks`).
    pub skip: Vec<plan::AttachKind>,
}

/// A running probe: programs attached, reader thread draining the ring buffer.
pub struct Session {
    pub facts: facts::LiveFacts,
    pub plan: plan::Plan,
    pub probe: Probe,
    pub counters: Counters,
    pub records: Receiver<Vec<u8>>,
    /// The kernel's set of DAX-holding processes (forks and mremaps of these are reported).
    pub watched: loader::Watched,
    pub fenced: loader::Fenced,
    /// The unbind guard's maps (policy `guard`); used only when its program is attached.
    pub guarded: loader::Guarded,
    /// Every CPU's fault range still growing in the kernel.
    pub pending: loader::Pending,
    reader: Option<reader::Reader>,
    /// Loaded modules when last looked at.
    modules: Vec<String>,
}

impl Session {
    /// Collects facts, plans, loads and attaches, and starts the reader. Fails with an exit
    /// code the operator can act on; on failure nothing stays attached.
    /// `fence`: also load the on-demand concerns: the mmap fence (drain, `monitor
    /// --enforce`) and the unbind guard (a policy with `guard`; it stays idle while the
    /// agent lists nothing).
    pub fn start(src: &KernelSource, ring: Ring, fence: bool) -> anyhow::Result<Self> {
        // Before the facts: a module loading meanwhile is then noticed at the first check.
        let modules = loaded_modules(&src.root);
        let facts = collect_facts(src)?;
        let plan = plan::plan(&facts, &src.skip);
        let extra = layout::Extra {
            dax_major: crate::topology::dax_char_major(&src.root),
        };
        let layout = layout::compute(&facts.btf, &facts, extra)
            .map_err(|e| Failure::new(Code::Unavailable, e.to_string()))?;
        let mut probe =
            loader::load(&plan, &layout, &facts.btf_path, ring, fence).map_err(|e| {
                let code = match e {
                    loader::LoadError::MissingHook { .. }
                    | loader::LoadError::Object(object::ObjectError::Placeholder) => {
                        Code::Unavailable
                    }
                    _ => Code::Software,
                };
                Failure::new(code, e.to_string())
            })?;
        let ring = probe.take_events()?;
        let device_ring = probe.take_device_events()?;
        let counters = probe.take_counters()?;
        let watched = probe.take_watched()?;
        let fenced = probe.take_fenced()?;
        let guarded = probe.take_guarded()?;
        let pending = probe.take_pending()?;
        let (tx, records) = channel(reader::CHANNEL_RECORDS);
        let reader = reader::Reader::spawn(ring, device_ring, tx, counters.1.clone());
        Ok(Self {
            facts,
            plan,
            probe,
            counters,
            records,
            watched,
            fenced,
            guarded,
            pending,
            reader: Some(reader),
            modules,
        })
    }

    /// Re-plans after the kernel's module list changed and attaches what became possible
    /// (e.g. `device_dax` loaded after the agent: its fault probes replace the periodic
    /// scan). Cheap when nothing changed: one read of /proc/modules.
    pub fn adopt_new_modules(&mut self, src: &KernelSource) -> Vec<loader::Upgrade> {
        let names = loaded_modules(&src.root);
        if self.modules == names {
            return Vec::new();
        }
        self.modules = names;
        let Ok(facts) = collect_facts(src) else {
            return Vec::new();
        };
        let plan = plan::plan(&facts, &src.skip);
        let ups = self.probe.upgrade(&plan, &facts.btf_path);
        if !ups.is_empty() {
            self.plan = plan;
            self.facts = facts;
        }
        ups
    }

    /// Unwatches processes that exited (see [`loader::Watched::sweep`]); returns how many.
    pub fn sweep_watched(&mut self, root: &Path) -> usize {
        self.watched
            .sweep(|tgid| root.join(format!("proc/{tgid}")).exists())
    }

    /// Events lost on their way to the map: in the kernel's ring, or in the agent's queue.
    pub fn lost_events(&self) -> u64 {
        use dax_probe_common::Counter;
        self.counters.get(Counter::RingFull) + self.counters.get(Counter::ChannelFull)
    }

    /// Makes sure every event the kernel submitted so far is in `records`; false when the
    /// reader could not within `wait` (without a reader there is nothing to wait for).
    pub fn sync(&self, wait: std::time::Duration) -> bool {
        self.reader.as_ref().is_none_or(|r| r.sync(wait))
    }

    /// Why the reader thread stopped by itself, if it did (the agent is blind then).
    pub fn reader_failure(&self) -> Option<String> {
        self.reader.as_ref().and_then(reader::Reader::failure)
    }

    /// Stops the reader after it drained what the kernel already submitted.
    pub fn stop_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            r.stop();
        }
    }

    /// Is the mmap fence attached (BPF LSM)?
    pub fn fence_attached(&self) -> bool {
        self.probe
            .choice(plan::Concern::Fence)
            .is_some_and(|c| c.chosen.is_some())
    }

    /// Is the unbind guard attached (BPF LSM `file_permission`)?
    pub fn guard_attached(&self) -> bool {
        self.probe
            .choice(plan::Concern::UnbindGuard)
            .is_some_and(|c| c.chosen.is_some())
    }

    /// Why the unbind guard is not attached: the plan's verdicts and the load failures.
    pub fn guard_unavailable(&self) -> String {
        let mut why: Vec<String> = self
            .plan
            .verdicts(plan::Concern::UnbindGuard)
            .iter()
            .filter_map(|v| v.missing.clone())
            .collect();
        if let Some(c) = self.probe.choice(plan::Concern::UnbindGuard) {
            why.extend(c.failed.iter().map(|(l, e)| format!("{l}: {e}")));
        }
        if why.is_empty() {
            "no candidate".into()
        } else {
            why.join("; ")
        }
    }

    /// True when pfns must be looked up in userspace (no insert hook attached).
    pub fn pfn_from_userspace(&self) -> bool {
        self.probe
            .choice(plan::Concern::FaultPfn)
            .is_none_or(|c| c.userspace || c.chosen.is_none())
    }
}

pub fn collect_facts(src: &KernelSource) -> anyhow::Result<facts::LiveFacts> {
    facts::LiveFacts::collect(&src.root, src.btf.as_deref()).map_err(|e| {
        let code = match e {
            facts::FactsError::NoBtf { .. } => Code::Unavailable,
            facts::FactsError::BadBtf(_) => Code::Unavailable,
        };
        Failure::new(code, e.to_string()).into()
    })
}

/// Checks a ring buffer size given in KiB: the kernel wants a power of two of at least a page.
/// How the kernel hands faults to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    /// Size of the event ring buffer in bytes (a power of two).
    pub bytes: u32,
    /// One record per fault instead of coalesced ranges (`--per-fault`, for debugging and
    /// for tests of the ring itself).
    pub per_fault: bool,
}

impl Ring {
    pub const DEFAULT: Ring = Ring {
        bytes: dax_probe_common::EVENTS_RING_BYTES,
        per_fault: false,
    };
}

pub fn ring_bytes(kib: u32) -> Result<u32, Failure> {
    if kib < 4 || !kib.is_power_of_two() || kib > (1 << 20) {
        return Err(Failure::new(
            Code::Usage,
            format!(
                "--ring-size-kib {kib}: the ring buffer must be a power of two between 4 and \
                 1048576 KiB (default {})",
                dax_probe_common::EVENTS_RING_BYTES / 1024
            ),
        ));
    }
    Ok(kib * 1024)
}

/// The running kernel (below `root`).
pub fn live(root: &Path, btf: Option<&Path>, skip: &[plan::AttachKind]) -> KernelSource {
    KernelSource {
        root: root.to_path_buf(),
        btf: btf.map(Path::to_path_buf),
        skip: skip.to_vec(),
    }
}
