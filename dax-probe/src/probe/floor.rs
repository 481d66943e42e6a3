//! The floor of the fault-overhead benchmark: the same object, nothing attached but an empty
//! program on each DAX fault tracepoint. Its cost per fault (the tracepoint's dispatch and
//! one program run) is what no agent that hooks the fault path can go below, so the
//! benchmark prints the agent's cost beside it.

use std::path::Path;

use aya::{Btf, EbpfLoader, Endianness, programs::BtfTracePoint};

use super::{loader::LoadError, stats::ProgramStat};

/// The empty programs and the tracepoints they attach to.
const FLOOR: [(&str, &str); 2] = [
    ("floor_pte_fault_done", "dax_pte_fault_done"),
    ("floor_pmd_fault_done", "dax_pmd_fault_done"),
];

pub struct Floor {
    ebpf: aya::Ebpf,
}

impl Floor {
    /// Loads the object and attaches only the empty programs.
    pub fn attach(btf_path: &Path) -> Result<Self, LoadError> {
        let object = super::loader::object_bytes();
        super::object::check_abi(object, dax_probe_common::ABI_VERSION)?;
        super::loader::raise_memlock();
        let btf = Btf::parse_file(btf_path, Endianness::default())?;
        let mut ebpf = EbpfLoader::new().btf(Some(&btf)).load(object)?;
        for (name, tp) in FLOOR {
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or(LoadError::MissingProgram(name))?
                .try_into()
                .map_err(aya::EbpfError::from)?;
            prog.load(tp, &btf).map_err(aya::EbpfError::from)?;
            prog.attach().map_err(aya::EbpfError::from)?;
        }
        Ok(Self { ebpf })
    }

    /// Runs and time of the floor programs so far (time needs `kernel.bpf_stats_enabled`).
    pub fn stats(&self) -> Vec<ProgramStat> {
        super::stats::of(&self.ebpf)
    }
}

/// `dax-probe bench-floor`: attaches the floor, says `attached`, and when stdin closes prints
/// the floor programs' runs as one JSON line and detaches.
pub fn run(src: &super::KernelSource) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let facts = super::collect_facts(src)?;
    let floor = Floor::attach(&facts.btf_path)
        .map_err(|e| crate::exit::Failure::new(crate::exit::Code::Unavailable, e.to_string()))?;
    let mut out = std::io::stdout();
    writeln!(out, "attached")?;
    out.flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    writeln!(out, "{}", serde_json::to_string(&floor.stats())?)?;
    Ok(())
}
