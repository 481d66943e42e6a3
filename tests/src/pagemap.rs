//! Ground truth: the kernel's page tables as `/proc/PID/pagemap` shows them (root only).
//!
//! Deliberately a separate implementation from the agent's: the scenarios compare the agent
//! against this, so they must not share code.

use std::{fs::File, os::unix::fs::FileExt};

use anyhow::{Context, Result};

const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

/// pfn (or None when not present) of every 4 KiB page in `[addr, addr + len)` of `pid`.
pub fn pfns(pid: u32, addr: u64, len: u64) -> Result<Vec<Option<u64>>> {
    let f = File::open(format!("/proc/{pid}/pagemap"))
        .with_context(|| format!("open /proc/{pid}/pagemap"))?;
    let pages = len.div_ceil(4096) as usize;
    let mut buf = vec![0u8; pages * 8];
    f.read_exact_at(&mut buf, (addr / 4096) * 8)
        .with_context(|| format!("read /proc/{pid}/pagemap at {addr:#x}"))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| {
            let e = u64::from_le_bytes(c.try_into().unwrap());
            (e & PRESENT != 0 && e & PFN_MASK != 0).then_some(e & PFN_MASK)
        })
        .collect())
}
