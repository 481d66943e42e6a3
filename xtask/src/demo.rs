//! `cargo xtask demo`: the main job. On a host with persistent memory it runs the agent's live
//! monitor right here (through sudo when needed); on a host without, it boots the demo VM and
//! shows the monitor watching a workload on emulated pmem.

use std::{fs, path::Path, process::Command, time::Duration};

use anyhow::Result;

use crate::{
    cmd::{is_root, run_visible},
    harness::{self, Boot},
    paths, setup,
};

/// Does this machine have a pmem namespace or a device-dax device?
fn host_has_pmem() -> bool {
    let sized_namespace = fs::read_dir("/sys/bus/nd/devices")
        .map(|d| {
            d.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("namespace")
                    && fs::read_to_string(e.path().join("size"))
                        .map(|s| s.trim() != "0")
                        .unwrap_or(false)
            })
        })
        .unwrap_or(false);
    sized_namespace
        || Path::new("/sys/bus/dax/devices")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some())
}

pub fn run(kernel: &str, force_vm: bool, verbose: bool) -> Result<()> {
    setup::ensure(verbose)?;
    let ws = paths::workspace();
    if host_has_pmem() && !force_vm {
        eprintln!(
            "demo: this machine has persistent memory: running the monitor here (Ctrl-C stops)"
        );
        run_visible(Command::new("cargo").current_dir(&ws).args([
            "build",
            "--release",
            "-p",
            "dax-probe",
        ]))?;
        let bin = ws.join("target/release/dax-probe");
        let mut c = if is_root() {
            Command::new(&bin)
        } else {
            let mut c = Command::new("sudo");
            c.arg(&bin);
            c
        };
        return run_visible(c.arg("monitor").arg("--wait"));
    }
    eprintln!(
        "demo: no persistent memory here: booting Debian {kernel} in QEMU with emulated nvdimms"
    );
    let payload = harness::payload(verbose)?;
    let guest = harness::guest(kernel, "demo", &payload, false)?;
    let vm = guest.boot(&Boot {
        append: "daxprobe.mode=demo",
        timeout: Duration::from_secs(15 * 60),
        echo: true,
        ..Boot::default()
    })?;
    if let Some(f) = vm.of_event("fatal").next() {
        anyhow::bail!("demo VM failed: {}", f["error"]);
    }
    if !vm.done() {
        anyhow::bail!("demo VM did not finish (see {})", vm.console_log.display());
    }
    Ok(())
}

/// `cargo xtask vm --shell`: a root shell in the VM for poking around by hand.
pub fn shell(kernel: &str, verbose: bool) -> Result<()> {
    let payload = harness::payload(verbose)?;
    let guest = harness::guest(kernel, "shell", &payload, false)?;
    guest.boot(&Boot {
        append: "daxprobe.mode=shell",
        timeout: Duration::from_secs(24 * 3600),
        echo: true,
        interactive: true,
        ..Boot::default()
    })?;
    Ok(())
}
