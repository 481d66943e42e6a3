//! `dax-probe devices`: the pmem topology.

use std::io::Write;

use crate::topology::Topology;

pub fn run(topo: &Topology, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, topo)?;
        writeln!(out)?;
        return Ok(());
    }
    if topo.namespaces.is_empty() {
        writeln!(
            out,
            "no pmem namespaces (no nvdimm/CXL persistent memory on this machine)"
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<10} {:<13} {:<8} {:<7} {:>9} {:<27} MOUNT",
        "DEVICE", "NAMESPACE", "REGION", "MODE", "SIZE", "PHYS"
    )?;
    for ns in &topo.namespaces {
        let mount = ns
            .block
            .as_ref()
            .and_then(|(_, dev)| topo.mount_of_dev(*dev))
            .map(|m| format!("{} ({}, dax={:?})", m.mount_point, m.fstype, m.dax).to_lowercase())
            .unwrap_or_else(|| "-".into());
        let phys = if ns.range_known {
            format!("{:#x}-{:#x}", ns.data_range.start, ns.data_range.end)
        } else {
            "(root only)".to_string()
        };
        writeln!(
            out,
            "{:<10} {:<13} {:<8} {:<7} {:>9} {:<27} {}{}",
            ns.device_name(),
            ns.name,
            ns.region,
            ns.mode.to_string(),
            if ns.range_known {
                human(ns.data_range.len())
            } else {
                "-".into()
            },
            phys,
            mount,
            if ns.enabled { "" } else { " [disabled]" }
        )?;
    }
    Ok(())
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
