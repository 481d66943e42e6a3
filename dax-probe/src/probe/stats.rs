//! What each loaded program cost: the kernel's own run count and run time
//! (`kernel.bpf_stats_enabled=1`; with it off both stay 0 and nothing is reported).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One attached program's totals since it was loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProgramStat {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Is the kernel counting program runs (`sysctl kernel.bpf_stats_enabled`)?
pub fn enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// The loaded programs of `ebpf` that ran, by name.
pub fn of(ebpf: &aya::Ebpf) -> Vec<ProgramStat> {
    if !enabled() {
        return Vec::new();
    }
    let mut v: Vec<ProgramStat> = ebpf
        .programs()
        .filter_map(|(name, p)| {
            let info = p.info().ok()?;
            Some(ProgramStat {
                name: name.to_string(),
                run_count: info.run_count(),
                run_time_ns: info.run_time().as_nanos() as u64,
            })
        })
        .filter(|s| s.run_count > 0)
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}
