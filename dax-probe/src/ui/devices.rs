//! `dax-probe devices`: the pmem topology.

use std::io::Write;

use crate::topology::{Namespace, Role, Topology, describe_dm};

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
        for l in kernel_users(topo, ns) {
            writeln!(out, "{:<10} {l}", "")?;
        }
    }
    Ok(())
}

/// The kernel's own users of `ns`, one line each: the dm devices built on it (with their
/// tables), the file systems using it through dm or as XFS realtime device. A file system
/// mounted on the device itself is already the MOUNT column. Printed by `devices` and
/// beside the processes by `holders DEVICE`.
pub fn kernel_users(topo: &Topology, ns: &Namespace) -> Vec<String> {
    let mut v = Vec::new();
    for d in topo.dm_above(ns) {
        let mut line = format!("held by {}", describe_dm(topo, d));
        let non_dax = topo.non_dax_members(d);
        if !non_dax.is_empty() {
            line.push_str(&format!(
                " [not DAX: member {} is not fsdax pmem]",
                non_dax.join(", ")
            ));
        }
        v.push(line);
    }
    for u in topo.fs_users(ns) {
        let m = u.mount;
        let what = match (u.role, u.via) {
            (Role::Data, None) => continue,
            (Role::Data, Some(d)) => format!("through {} ({})", d.node, d.name),
            (Role::Realtime, None) => "as its XFS realtime device".to_string(),
            (Role::Realtime, Some(d)) => {
                format!("as its XFS realtime device through {} ({})", d.node, d.name)
            }
        };
        let dax = format!("{:?}", m.dax).to_lowercase();
        v.push(format!(
            "used by {} ({}, dax={dax}) {what}",
            m.mount_point, m.fstype
        ));
    }
    v
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::stack::tests::{dm, namespaces};

    #[test]
    fn kernel_users_name_the_stack_its_mount_and_the_realtime_role() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        namespaces(root);
        dm(root, 0, "lin", &["pmem0", "pmem2"]);
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::write(
            root.join("proc/self/mountinfo"),
            "30 1 253:0 / /mnt/lin rw - ext4 /dev/mapper/lin rw,dax\n\
             31 1 259:1 / /mnt/rt rw - xfs /dev/pmem1 rw,dax=always,rtdev=/dev/mapper/lin\n",
        )
        .unwrap();
        let topo = Topology::read(root);
        let pmem0 = topo.namespace_of_block_name("pmem0").unwrap();
        let lines = kernel_users(&topo, pmem0);
        // No control device below the fixture root: the table is unknown, the members are
        // still named, and the raw member is called out.
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].starts_with("held by dm-0 (lin, 253:0): members pmem0 pmem2 (table unknown: cannot open /dev/mapper/control"));
        assert!(lines[0].ends_with("[not DAX: member pmem2 is not fsdax pmem]"));
        assert_eq!(
            lines[1],
            "used by /mnt/lin (ext4, dax=always) through dm-0 (lin)"
        );
        assert_eq!(
            lines[2],
            "used by /mnt/rt (xfs, dax=always) as its XFS realtime device through dm-0 (lin)"
        );
        // pmem1's own mount is the MOUNT column, not a kernel-user line.
        let pmem1 = topo.namespace_of_block_name("pmem1").unwrap();
        assert!(kernel_users(&topo, pmem1).is_empty());
    }
}
