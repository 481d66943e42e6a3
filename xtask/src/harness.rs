//! The one path from source to a booted guest, shared by vm-test, demo, shell and every
//! bench: build the binaries once → fetch a kernel → write its initramfs → boot.
//!
//! A guest that dies before it said `ready` (boot, module load, nvdimm discovery: nothing of
//! ours ran yet) is booted once more and the retry is reported; a guest that dies after
//! `ready` is always a failure of the run that was going on.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;

use crate::{
    initramfs,
    kernels::{self, Kernel},
    paths,
    qemu::{self, VmConfig, VmRun},
    setup,
};

/// Emulated nvdimms per guest: every scenario that destroys a namespace gets a fresh one.
pub const NVDIMMS: usize = 28;

/// The guest programs, built once per xtask run.
pub struct Payload(Vec<u8>);

/// Checks the prerequisites and builds the release binaries and their initramfs part.
pub fn payload(verbose: bool) -> Result<Payload> {
    setup::ensure(verbose)?;
    let bin = initramfs::build_binaries(&paths::workspace())?;
    Ok(Payload(initramfs::payload(&bin)?))
}

/// A kernel with its initramfs, ready to boot as often as needed.
pub struct Guest {
    pub kernel: Kernel,
    pub initrd: PathBuf,
    /// `target/vm/<name>`: images, results and logs of this guest's boots.
    pub dir: PathBuf,
}

/// How one boot should run.
pub struct Boot<'a> {
    /// `daxprobe.*` kernel parameters (mode, scenario, bench).
    pub append: &'a str,
    pub timeout: Duration,
    pub echo: bool,
    pub interactive: bool,
    /// Where this boot's files go (defaults to the guest's directory).
    pub dir: Option<&'a Path>,
    /// Boot again once when the guest died before `ready`.
    pub retry_early_death: bool,
    /// (host port, guest port) to forward to the host's loopback (see `VmConfig`).
    pub hostfwd: Option<(u16, u16)>,
    /// See `VmConfig::stall`.
    pub stall: Option<Duration>,
}

impl Default for Boot<'_> {
    fn default() -> Self {
        Self {
            append: "",
            timeout: Duration::from_secs(25 * 60),
            echo: false,
            interactive: false,
            dir: None,
            retry_early_death: true,
            hostfwd: None,
            stall: None,
        }
    }
}

/// What a finished boot was.
#[derive(Debug, PartialEq, Eq)]
pub enum Fate {
    /// The guest said `done`.
    Finished,
    /// It stopped (panic, timeout, hang) before it said `ready`: nothing of ours had run.
    DiedEarly(String),
    /// It stopped after `ready`, while our programs ran.
    DiedDuring(String),
}

pub fn fate(vm: &VmRun) -> Fate {
    if vm.done() {
        return Fate::Finished;
    }
    let why = vm.trouble_summary();
    if vm.of_event("ready").next().is_none() {
        Fate::DiedEarly(why)
    } else {
        Fate::DiedDuring(why)
    }
}

/// Fetches `label`'s kernel and writes the initramfs for it under `target/vm/<name>`.
pub fn guest(label: &str, name: &str, payload: &Payload, refresh: bool) -> Result<Guest> {
    let kernel = kernels::fetch(label, refresh)?;
    let dir = paths::run_dir(name);
    fs::create_dir_all(&dir)?;
    let initrd = dir.join("initrd.cpio");
    initramfs::write(&initrd, &[&payload.0, &initramfs::modules(&kernel)?])?;
    Ok(Guest {
        kernel,
        initrd,
        dir,
    })
}

impl Guest {
    /// Boots once (twice when the first died before `ready` and `b.retry_early_death`).
    pub fn boot(&self, b: &Boot) -> Result<VmRun> {
        let dir = b.dir.unwrap_or(&self.dir);
        let cfg = VmConfig {
            kernel: &self.kernel,
            initrd: self.initrd.clone(),
            append: b.append.to_string(),
            nvdimms: NVDIMMS,
            timeout: b.timeout,
            echo: b.echo,
            interactive: b.interactive,
            dir: dir.to_path_buf(),
            hostfwd: b.hostfwd,
            stall: b.stall,
        };
        let vm = qemu::run(&cfg)?;
        if b.interactive || !b.retry_early_death {
            return Ok(vm);
        }
        match fate(&vm) {
            Fate::DiedEarly(why) => {
                let first = dir.join("first-boot");
                let _ = fs::remove_dir_all(&first);
                fs::create_dir_all(&first)?;
                let _ = fs::rename(&vm.console_log, first.join("console.log"));
                eprintln!(
                    "vm: {} died before the guest was ready ({why}); booting it again once \
                     (first console log: {})",
                    self.kernel.release,
                    first.join("console.log").display()
                );
                let mut again = qemu::run(&cfg)?;
                again.retried = Some(why);
                Ok(again)
            }
            _ => Ok(vm),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(events: &[&str], timed_out: bool, trouble: Option<&str>) -> VmRun {
        VmRun {
            records: events.iter().map(|e| json!({ "event": e })).collect(),
            console_log: PathBuf::from("console.log"),
            timed_out,
            hung: None,
            kernel_trouble: trouble.map(str::to_string),
            accel: "tcg",
            seconds: 1.0,
            retried: None,
        }
    }

    /// A guest that died before `ready` (boot, module load) is retried; one that died after
    /// it, while our programs ran, is a failure; `done` is the only success.
    #[test]
    fn a_death_before_ready_is_early_and_after_it_is_during() {
        assert_eq!(
            fate(&run(&["boot", "ready", "done"], false, None)),
            Fate::Finished
        );
        let panic = "Kernel panic - not syncing: Fatal exception in interrupt";
        assert_eq!(
            fate(&run(&["boot"], false, Some(panic))),
            Fate::DiedEarly(format!("kernel trouble: {panic}"))
        );
        assert_eq!(
            fate(&run(&[], false, None)),
            Fate::DiedEarly("never reported (did the kernel boot? see the console log)".into())
        );
        assert_eq!(
            fate(&run(&["boot", "ready"], true, Some(panic))),
            Fate::DiedDuring("timed out".into())
        );
        assert_eq!(
            fate(&run(&["boot", "ready", "scenario"], false, Some(panic))),
            Fate::DiedDuring(format!("kernel trouble: {panic}"))
        );
    }
}
