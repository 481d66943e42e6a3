//! What the running kernel offers: BTF functions and tracepoint typedefs, kallsyms, module
//! BTF, the active LSM list. Collected once at start-up; the planner decides from these facts
//! only, never from a version number.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use super::btf::{Btf, BtfError, Param};

/// The questions the planner asks. A trait so plans can be unit-tested against fake kernels.
pub trait KernelFacts {
    /// A BTF FUNC of this name exists in vmlinux (fentry/fexit possible).
    fn vmlinux_btf_func(&self, name: &str) -> bool;
    /// `btf_trace_<tp>` exists in vmlinux BTF (tp_btf possible).
    fn btf_tracepoint(&self, tp: &str) -> bool;
    /// A raw tracepoint of this name exists (kallsyms `__tracepoint_<tp>`).
    fn raw_tracepoint(&self, tp: &str) -> bool;
    /// A function symbol of this exact name is in kallsyms (kprobe possible).
    fn kallsyms_func(&self, name: &str) -> bool;
    /// Parameters of a vmlinux function per BTF.
    fn func_params(&self, name: &str) -> Option<Vec<Param>>;
    /// Is `bpf` in the active LSM list? None when it cannot be read (no securityfs).
    fn bpf_lsm_active(&self) -> Option<bool>;
}

/// Facts read from a live kernel (or from a root directory that mimics one, for tests).
pub struct LiveFacts {
    pub btf: Btf,
    pub btf_path: PathBuf,
    kallsyms: HashSet<String>,
    pub kallsyms_readable: bool,
    pub lsm: Option<String>,
    pub tracefs: Option<PathBuf>,
    pub release: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error(
        "this kernel exposes no BTF ({path} is missing): dax-probe needs CONFIG_DEBUG_INFO_BTF=y \
         (every Debian kernel since 5.10 has it); boot such a kernel or pass --btf FILE"
    )]
    NoBtf { path: String },
    #[error("cannot parse the kernel's BTF: {0}")]
    BadBtf(#[from] BtfError),
}

impl LiveFacts {
    /// Are DAX pages `pfn_t`/devmap special entries here (up to 6.12)? Without them (7.x)
    /// every walk of page tables that still point into a device whose memmap an unbind
    /// freed (pagemap reads, munmap, exit) dereferences the freed memmap and oopses.
    pub fn dax_devmap(&self) -> bool {
        self.btf.has_typedef("pfn_t")
    }

    /// Reads facts below `root` (normally `/`), with the BTF from `btf_override` if given.
    pub fn collect(root: &Path, btf_override: Option<&Path>) -> Result<Self, FactsError> {
        let btf_path = btf_override
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.join("sys/kernel/btf/vmlinux"));
        if !btf_path.exists() {
            return Err(FactsError::NoBtf {
                path: btf_path.display().to_string(),
            });
        }
        let btf = Btf::from_file(&btf_path)?;
        let (kallsyms, kallsyms_readable) = read_kallsyms(&root.join("proc/kallsyms"));
        let lsm = fs::read_to_string(root.join("sys/kernel/security/lsm"))
            .ok()
            .map(|s| s.trim().to_string());
        let tracefs = ["sys/kernel/tracing", "sys/kernel/debug/tracing"]
            .iter()
            .map(|p| root.join(p))
            .find(|p| p.join("events").is_dir());
        let release = fs::read_to_string(root.join("proc/sys/kernel/osrelease"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Ok(Self {
            btf,
            btf_path,
            kallsyms,
            kallsyms_readable,
            lsm,
            tracefs,
            release,
        })
    }
}

/// Function and data symbol names from kallsyms. With kptr_restrict the addresses read as
/// zero but the names are still there, which is all we need.
fn read_kallsyms(path: &Path) -> (HashSet<String>, bool) {
    let Ok(text) = fs::read_to_string(path) else {
        return (HashSet::new(), false);
    };
    let mut names = HashSet::with_capacity(200_000);
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (_addr, ty, name) = match (it.next(), it.next(), it.next()) {
            (Some(a), Some(t), Some(n)) => (a, t, n),
            _ => continue,
        };
        // t/T: text (kprobe targets); d/D/b/B: data, for __tracepoint_* symbols.
        if matches!(ty, "t" | "T" | "d" | "D" | "b" | "B") {
            names.insert(name.to_string());
        }
    }
    (names, true)
}

impl KernelFacts for LiveFacts {
    fn vmlinux_btf_func(&self, name: &str) -> bool {
        self.btf.has_func(name)
    }
    fn btf_tracepoint(&self, tp: &str) -> bool {
        self.btf.has_typedef(&format!("btf_trace_{tp}"))
    }
    fn raw_tracepoint(&self, tp: &str) -> bool {
        // kallsyms is authoritative when readable; otherwise the BTF typedef is a fine proxy
        // (every tracepoint in vmlinux gets one when BTF is on).
        self.kallsyms.contains(&format!("__tracepoint_{tp}")) || self.btf_tracepoint(tp)
    }
    fn kallsyms_func(&self, name: &str) -> bool {
        self.kallsyms.contains(name)
    }
    fn func_params(&self, name: &str) -> Option<Vec<Param>> {
        self.btf.func_params(name)
    }
    fn bpf_lsm_active(&self) -> Option<bool> {
        self.lsm
            .as_deref()
            .map(|l| l.split(',').any(|m| m.trim() == "bpf"))
    }
}
