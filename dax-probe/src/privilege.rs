//! Can this process load and attach eBPF programs?

use std::fs;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability mask of this process, from /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
}

/// True when we may trace: root, CAP_SYS_ADMIN, or CAP_BPF together with CAP_PERFMON.
pub fn can_trace() -> bool {
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    caps_allow_tracing(effective_caps().unwrap_or(0))
}

/// True when /proc/PID/pagemap shows pfns (CAP_SYS_ADMIN; zeros otherwise).
pub fn can_read_pagemap() -> bool {
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    effective_caps().unwrap_or(0) & (1u64 << CAP_SYS_ADMIN) != 0
}

pub fn caps_allow_tracing(caps: u64) -> bool {
    let has = |c: u32| caps & (1u64 << c) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets() {
        assert!(!caps_allow_tracing(0));
        assert!(caps_allow_tracing(1 << CAP_SYS_ADMIN));
        assert!(!caps_allow_tracing(1 << CAP_BPF));
        assert!(caps_allow_tracing((1 << CAP_BPF) | (1 << CAP_PERFMON)));
    }
}
