//! `cargo xtask setup`: check and install everything the build, the VM and the tests need.
//!
//! Every other xtask command calls [`ensure`] first, so a fresh machine needs no manual step.
//! On Debian/Ubuntu it installs what is missing (apt-get, as root or through sudo); elsewhere
//! it names exactly what is missing and stops.

use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use crate::cmd::{self, have, is_root, run, run_visible};

/// The bpf-linker release that works with this toolchain's LLVM (see DESIGN.md §8).
const BPF_LINKER: &str = "0.10.0";

/// Host programs the VM harness needs, with the Debian package that provides each.
const DEBIAN_TOOLS: &[(&str, &str, &str)] = &[
    // (check, package, why)
    ("qemu-system-x86_64", "qemu-system-x86", "boots the test VM"),
    (
        "busybox-static",
        "busybox-static",
        "shell and tools inside the VM",
    ),
    ("mkfs.ext4", "e2fsprogs", "makes ext4 on the emulated pmem"),
    ("mkfs.xfs", "xfsprogs", "makes xfs on the emulated pmem"),
    ("xz", "xz-utils", "decompresses .ko.xz kernel modules"),
    ("dpkg-deb", "dpkg", "unpacks Debian kernel packages"),
    ("apt-get", "apt", "downloads Debian kernel packages"),
    (
        "fuser",
        "psmisc",
        "the holders benchmark compares with fuser -m",
    ),
    (
        "tmux",
        "tmux",
        "the tui scenario runs the dashboard in a terminal",
    ),
    ("lintian", "lintian", "checks the Debian package"),
    (
        "promtool",
        "prometheus",
        "checks metrics and alert rules; scrapes the VM in the metrics scenario",
    ),
    (
        "dpkg-shlibdeps",
        "dpkg-dev",
        "computes the Debian package's library dependencies",
    ),
];

#[derive(Default)]
pub struct Report {
    lines: Vec<String>,
}

impl Report {
    fn ok(&mut self, what: &str, how: &str) {
        self.lines.push(format!("  ok  {what:<28} {how}"));
    }
}

/// Puts `~/.cargo/bin` on PATH for this process and its children (cargo installs
/// bpf-linker there; a fresh shell may not have it on PATH yet).
fn cargo_bin_on_path() {
    let Some(home) = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
    else {
        return;
    };
    let bin = home.join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let mut parts = vec![bin];
    parts.extend(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(parts) {
        // SAFETY: called from the main thread before xtask starts any other thread.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

/// Makes sure every prerequisite exists, installing what can be installed.
pub fn ensure(verbose: bool) -> Result<()> {
    cargo_bin_on_path();
    let mut r = Report::default();
    ensure_nightly(&mut r)?;
    ensure_bpf_linker(&mut r)?;
    ensure_cargo_fuzz(&mut r)?;
    ensure_host_tools(&mut r)?;
    if verbose {
        eprintln!("setup:");
        for l in &r.lines {
            eprintln!("{l}");
        }
    }
    Ok(())
}

fn ensure_nightly(r: &mut Report) -> Result<()> {
    if !have("rustup") {
        bail!(
            "rustup is not installed: the eBPF programs build with the nightly toolchain's \
             rust-src. Install rustup (https://rustup.rs), then rerun"
        );
    }
    let toolchains = run(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain with rust-src (for the eBPF build)");
        run_visible(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        r.ok("nightly toolchain", "installed");
    } else {
        r.ok("nightly toolchain", "present");
    }
    let comps = run(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        run_visible(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        r.ok("nightly rust-src", "installed");
    } else {
        r.ok("nightly rust-src", "present");
    }
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    let p = cmd::which("bpf-linker").or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
        let p = home.join("bin/bpf-linker");
        p.is_file().then_some(p)
    })?;
    let out = Command::new(p).arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn ensure_bpf_linker(r: &mut Report) -> Result<()> {
    match bpf_linker_version() {
        Some(v) if v.contains(BPF_LINKER) => r.ok("bpf-linker", &v),
        other => {
            if let Some(v) = other {
                eprintln!(
                    "setup: found {v}; installing bpf-linker {BPF_LINKER} (newer releases need \
                     a system LLVM this machine does not have)"
                );
            } else {
                eprintln!("setup: installing bpf-linker {BPF_LINKER} (takes a few minutes)");
            }
            run_visible(Command::new("cargo").args([
                "install",
                &format!("bpf-linker@{BPF_LINKER}"),
                "--locked",
                "--force",
            ]))?;
            r.ok("bpf-linker", &format!("{BPF_LINKER} installed"));
        }
    }
    Ok(())
}

/// cargo-fuzz drives the fuzz targets (`cargo xtask fuzz`).
fn ensure_cargo_fuzz(r: &mut Report) -> Result<()> {
    if have("cargo-fuzz") {
        r.ok("cargo-fuzz", "present");
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz (for cargo xtask fuzz)");
    run_visible(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    r.ok("cargo-fuzz", "installed");
    Ok(())
}

fn tool_present(check: &str) -> bool {
    if check == "busybox-static" {
        // The guest's /init is ours, but its shell and tools come from a statically linked
        // busybox: check the package where we can, else that /bin/busybox has no interpreter.
        return dpkg_installed("busybox-static")
            || (Path::new("/bin/busybox").is_file()
                && run(Command::new("ldd").arg("/bin/busybox")).is_err());
    }
    have(check)
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn ensure_host_tools(r: &mut Report) -> Result<()> {
    let missing: Vec<&(&str, &str, &str)> = DEBIAN_TOOLS
        .iter()
        .filter(|(check, _, _)| !tool_present(check))
        .collect();
    for (check, pkg, _) in DEBIAN_TOOLS {
        if !missing.iter().any(|(c, _, _)| c == check) {
            r.ok(pkg, "present");
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let pkgs: Vec<&str> = missing.iter().map(|(_, p, _)| *p).collect();
    if !have("apt-get") || !Path::new("/etc/debian_version").exists() {
        let lines: Vec<String> = missing
            .iter()
            .map(|(c, p, why)| format!("  {c} ({why}; Debian package {p})"))
            .collect();
        bail!(
            "this is not a Debian-like host, so setup cannot install these; install them \
             with your package manager and rerun:\n{}",
            lines.join("\n")
        );
    }
    let mut apt = if is_root() {
        Command::new("apt-get")
    } else if have("sudo") {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    } else {
        bail!(
            "missing {}; run as root: apt-get install -y {}",
            pkgs.join(", "),
            pkgs.join(" ")
        );
    };
    eprintln!("setup: installing {} (apt-get)", pkgs.join(" "));
    let mut update = if is_root() {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    };
    run(update
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(apt
        .args(["install", "-y", "--no-install-recommends"])
        .args(&pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    for (c, p, _) in &missing {
        if !tool_present(c) {
            bail!("installed {p} but {c} is still missing");
        }
        r.ok(p, "installed");
    }
    Ok(())
}
