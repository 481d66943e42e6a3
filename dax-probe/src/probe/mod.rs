//! Kernel side of the agent: what the kernel offers, which hooks to use, loading them, and
//! reading their events.

pub mod btf;
pub mod decode;
pub mod facts;
pub mod layout;
pub mod loader;
pub mod plan;
pub mod reader;

use std::path::{Path, PathBuf};

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

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
    pub records: UnboundedReceiver<Vec<u8>>,
    /// The kernel's set of DAX-holding processes (forks and mremaps of these are reported).
    pub watched: loader::Watched,
    pub fenced: loader::Fenced,
    reader: Option<reader::Reader>,
    /// Loaded modules when last looked at.
    modules: Vec<String>,
}

impl Session {
    /// Collects facts, plans, loads and attaches, and starts the reader. Fails with an exit
    /// code the operator can act on; on failure nothing stays attached.
    /// `fence`: also load the on-demand mmap fence (drain, `monitor --enforce`).
    pub fn start(src: &KernelSource, ring_bytes: u32, fence: bool) -> anyhow::Result<Self> {
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
            loader::load(&plan, &layout, &facts.btf_path, ring_bytes, fence).map_err(|e| {
                let code = match e {
                    loader::LoadError::MissingHook { .. } => Code::Unavailable,
                    _ => Code::Software,
                };
                Failure::new(code, e.to_string())
            })?;
        let ring = probe.take_events()?;
        let counters = probe.take_counters()?;
        let watched = probe.take_watched()?;
        let fenced = probe.take_fenced()?;
        let (tx, records) = unbounded_channel();
        let reader = reader::Reader::spawn(ring, tx);
        Ok(Self {
            facts,
            plan,
            probe,
            counters,
            records,
            watched,
            fenced,
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

    /// Makes sure every event the kernel submitted so far is in `records`.
    pub fn sync(&self) {
        if let Some(r) = &self.reader {
            r.sync();
        }
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
