//! Ground truth for the holder map: every (process, virtual page, pfn) the kernel's page
//! tables map into a DAX device, read from /proc/*/maps and /proc/*/pagemap by this crate's
//! own code, and the same set as the agent reports it (`dax-probe holders all --pages`).

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{agent::run_once, pagemap};

/// (pid, virtual page number, pfn)
pub type Page = (u32, u64, u64);

/// Where DAX memory lives in this VM: pfn ranges `[start, end)` of the devices and the path
/// prefixes of what maps them.
#[derive(Clone, Debug, Default)]
pub struct DaxSpace {
    pub pfn_ranges: Vec<(u64, u64)>,
    pub path_prefixes: Vec<String>,
}

impl DaxSpace {
    fn on_device(&self, pfn: u64) -> bool {
        self.pfn_ranges.iter().any(|&(s, e)| pfn >= s && pfn < e)
    }
    fn is_dax_path(&self, path: &str) -> bool {
        self.path_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    }
}

/// Every DAX page every process maps, per the kernel.
pub fn kernel_pages(space: &DaxSpace) -> Result<BTreeSet<Page>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue; // gone meanwhile
        };
        for line in maps.lines() {
            let f: Vec<&str> = line.splitn(6, ' ').collect();
            let path = f.get(5).map(|p| p.trim()).unwrap_or("");
            if !space.is_dax_path(path) {
                continue;
            }
            let Some((s, e)) = f[0].split_once('-') else {
                continue;
            };
            let (s, e) = (u64::from_str_radix(s, 16)?, u64::from_str_radix(e, 16)?);
            let Ok(pfns) = pagemap::pfns(pid, s, e - s) else {
                continue;
            };
            for (i, p) in pfns.iter().enumerate() {
                if let Some(pfn) = p
                    && space.on_device(*pfn)
                {
                    out.insert((pid, (s >> 12) + i as u64, *pfn));
                }
            }
        }
    }
    Ok(out)
}

/// The agent's answer to `holders all --json --pages` (from the running monitor, or from
/// its own scan with `scan`), expanded to pages.
pub fn agent_pages(scan: bool) -> Result<(BTreeSet<Page>, String)> {
    let mut args = vec!["holders", "all", "--json", "--pages"];
    if scan {
        args.push("--scan");
    }
    let (code, out, err) = run_once(&args)?;
    if !matches!(code, Some(0) | Some(1)) {
        bail!("holders exited {code:?}: {}", err.trim());
    }
    let v: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("holders printed non-JSON: {out}"))?;
    let source = v["source"].as_str().unwrap_or("?").to_string();
    let mut set = BTreeSet::new();
    for row in v["holders"].as_array().into_iter().flatten() {
        let pid = row["pid"].as_u64().unwrap_or(0) as u32;
        for ex in row["extents"].as_array().into_iter().flatten() {
            let vaddr = ex["vaddr"].as_u64().unwrap_or(0);
            let pfn = ex["pfn"].as_u64().unwrap_or(0);
            for i in 0..ex["pages"].as_u64().unwrap_or(0) {
                set.insert((pid, (vaddr >> 12) + i, pfn + i));
            }
        }
    }
    Ok((set, source))
}

/// One comparison step of a scenario.
#[derive(Debug)]
pub struct Step {
    pub label: String,
    pub kernel: usize,
    pub monitor: usize,
    pub monitor_missing: usize,
    pub monitor_extra: usize,
    pub scan: usize,
    pub scan_missing: usize,
    pub scan_extra: usize,
    pub source: String,
    pub example: Option<String>,
}

impl Step {
    pub fn exact(&self) -> bool {
        self.monitor_missing + self.monitor_extra + self.scan_missing + self.scan_extra == 0
            && self.source == "monitor"
    }
    pub fn json(&self) -> Value {
        json!({"step": self.label, "kernel_pages": self.kernel,
               "monitor": {"pages": self.monitor, "missing": self.monitor_missing, "extra": self.monitor_extra},
               "scan": {"pages": self.scan, "missing": self.scan_missing, "extra": self.scan_extra}})
    }
    pub fn line(&self) -> String {
        format!(
            "{}: kernel {} pages; monitor {} (missing {}, extra {}); scan {} (missing {}, extra {})",
            self.label,
            self.kernel,
            self.monitor,
            self.monitor_missing,
            self.monitor_extra,
            self.scan,
            self.scan_missing,
            self.scan_extra
        )
    }
}

/// Compares kernel, monitor and one-shot scan now.
pub fn step(label: &str, space: &DaxSpace) -> Result<Step> {
    let (monitor, source) = agent_pages(false)?;
    let kernel = kernel_pages(space)?;
    let (scan, _) = agent_pages(true)?;
    let diff = |a: &BTreeSet<Page>, b: &BTreeSet<Page>| a.difference(b).count();
    let example = kernel
        .difference(&monitor)
        .next()
        .map(|p| {
            format!(
                "kernel maps pid {} page {:#x} -> pfn {:#x}, monitor does not",
                p.0,
                p.1 << 12,
                p.2
            )
        })
        .or_else(|| {
            monitor.difference(&kernel).next().map(|p| {
                format!(
                    "monitor claims pid {} page {:#x} -> pfn {:#x}, kernel does not",
                    p.0,
                    p.1 << 12,
                    p.2
                )
            })
        });
    Ok(Step {
        label: label.to_string(),
        kernel: kernel.len(),
        monitor: monitor.len(),
        monitor_missing: diff(&kernel, &monitor),
        monitor_extra: diff(&monitor, &kernel),
        scan: scan.len(),
        scan_missing: diff(&kernel, &scan),
        scan_extra: diff(&scan, &kernel),
        source,
        example,
    })
}
