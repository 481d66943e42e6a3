//! Device-dax personalities: the drivers of the dax bus that give a device-dax device its
//! use, and what dax-probe can observe of each. The memory's provider (`dax_pmem` on nvdimm
//! namespaces, `dax_hmem`, `dax_cxl`) is not a personality; the driver bound on the dax bus
//! is: `device_dax` (a mappable /dev/daxX.Y), `kmem` (System RAM). Newer upstream kernels
//! add more (e.g. an `fsdev_dax` for file systems over device-dax); none of the Debian
//! kernels tested here ships one, and a driver this version does not know is named as such.

use std::{collections::BTreeSet, path::Path};

use serde::Serialize;

use super::{Mode, Topology};

/// One personality this machine offers (a dax-bus driver registered, or a module present).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Personality {
    /// The dax-bus driver (`device_dax`, `kmem`, ...).
    pub driver: String,
    /// What devices bound to it are used as.
    pub mode: String,
    /// Registered on the dax bus now (else only its module is on disk).
    pub loaded: bool,
    /// Device-dax devices bound to it now.
    pub devices: Vec<String>,
    pub observable: Vec<&'static str>,
    pub not_observable: Vec<&'static str>,
}

/// Providers of device-dax memory: drivers of other buses, not personalities.
const PROVIDERS: &[&str] = &[
    "dax_pmem",
    "dax_pmem_core",
    "dax_pmem_compat",
    "dax_hmem",
    "dax_cxl",
];

fn describe(driver: &str) -> (String, Vec<&'static str>, Vec<&'static str>) {
    match driver {
        "device_dax" => (
            "devdax".into(),
            vec![
                "holders of /dev/daxX.Y and their pages (faults, fork, exit, start-up scan)",
                "departures (the namespace's unbind) and stale mappings (`audit`)",
                "fencing of new mappings and signalling of holders (`--enforce`, `drain`)",
                "a switch to another personality (`device_reconfiguring`, not a departure)",
            ],
            vec![],
        ),
        "kmem" => (
            "system-ram".into(),
            vec![
                "which device is System RAM now (`devices`), and a switch to or from it \
                 (`device_reconfiguring`, not a departure)",
                "memory failures in its range (the memory_failure hook)",
            ],
            vec![
                "holders: its pages are ordinary memory of a NUMA node, given out by the \
                 page allocator; no process maps it as DAX",
                "faults and stale mappings: there are no DAX mappings to fault or outlive it",
                "fencing and drain: nothing maps it; offline its memory blocks to take it back",
            ],
        ),
        _ => (
            format!("{driver} (not known to this version)"),
            vec!["departures of the namespace under it (nd bus)"],
            vec!["anything its driver does with the memory: no hook of this version follows it"],
        ),
    }
}

/// The personalities below `root`: dax-bus drivers registered now
/// (`/sys/bus/dax/drivers`), and dax driver modules of the running kernel not loaded
/// (`/lib/modules/RELEASE/kernel/drivers/dax`).
pub fn personalities(root: &Path, release: &str, topo: &Topology) -> Vec<Personality> {
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let loaded = names(&root.join("sys/bus/dax/drivers"));
    let mut modules = BTreeSet::new();
    let mut stack = vec![
        root.join("lib/modules")
            .join(release)
            .join("kernel/drivers/dax"),
    ];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = e.file_name().to_str().and_then(|n| n.split(".ko").next()) {
                modules.insert(n.replace('-', "_"));
            }
        }
    }
    let mut out = Vec::new();
    for driver in loaded.iter().chain(modules.difference(&loaded)) {
        if PROVIDERS.contains(&driver.as_str()) {
            continue;
        }
        let (mode, observable, not_observable) = describe(driver);
        let devices = bound_to(root, driver, topo);
        out.push(Personality {
            driver: driver.clone(),
            mode,
            loaded: loaded.contains(driver),
            devices,
            observable,
            not_observable,
        });
    }
    out
}

/// Device-dax devices bound to `driver` on the dax bus.
fn bound_to(root: &Path, driver: &str, topo: &Topology) -> Vec<String> {
    topo.namespaces
        .iter()
        .filter(|n| matches!(n.mode, Mode::Devdax | Mode::SystemRam))
        .filter_map(|n| n.chardev.as_ref().map(|(c, _)| c.clone()))
        .filter(|c| {
            super::sysfs::driver_name(&root.join("sys/bus/dax/devices").join(c)).as_deref()
                == Some(driver)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personalities_are_the_dax_bus_drivers_and_modules_not_the_providers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let drivers = root.join("sys/bus/dax/drivers");
        std::fs::create_dir_all(drivers.join("device_dax")).unwrap();
        std::fs::create_dir_all(drivers.join("kmem")).unwrap();
        let mods = root.join("lib/modules/6.12.0/kernel/drivers/dax");
        std::fs::create_dir_all(mods.join("hmem")).unwrap();
        for m in [
            "device_dax.ko.xz",
            "kmem.ko.xz",
            "dax_pmem.ko.xz",
            "dax_cxl.ko.xz",
            "hmem/dax_hmem.ko.xz",
            "fsdev_dax.ko.xz",
        ] {
            std::fs::write(mods.join(m), "").unwrap();
        }
        // dax0.0 is bound to kmem.
        let dev = root.join("sys/bus/dax/devices/dax0.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::os::unix::fs::symlink(drivers.join("kmem"), dev.join("driver")).unwrap();
        let mut t = crate::os::fake::topology(&[]);
        t.namespaces[0].mode = Mode::SystemRam;
        t.namespaces[0].chardev = Some((
            "dax0.0".into(),
            super::super::DevId {
                major: 252,
                minor: 0,
            },
        ));
        let p = personalities(root, "6.12.0", &t);
        let names: Vec<(&str, bool)> = p.iter().map(|p| (p.driver.as_str(), p.loaded)).collect();
        assert_eq!(
            names,
            [("device_dax", true), ("kmem", true), ("fsdev_dax", false)]
        );
        let kmem = &p[1];
        assert_eq!(kmem.mode, "system-ram");
        assert_eq!(kmem.devices, ["dax0.0"]);
        assert!(kmem.not_observable.iter().any(|s| s.starts_with("holders")));
        assert!(p[0].devices.is_empty());
        assert!(p[2].mode.contains("not known to this version"));
        // No dax bus, no modules: nothing.
        let empty = tempfile::tempdir().unwrap();
        assert!(personalities(empty.path(), "6.12.0", &t).is_empty());
    }
}
