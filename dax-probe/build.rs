//! Builds the eBPF programs (dax-probe-ebpf) with aya-build and leaves the object in OUT_DIR,
//! where src/probe/loader.rs embeds it. Needs nightly rust-src and bpf-linker: `cargo xtask
//! setup` installs both.
//!
//! `DAX_PROBE_EBPF=placeholder` embeds an empty object instead, so `cargo clippy` and the
//! unit tests run on a bare stable toolchain (the idea of aya's integration-test skip
//! variable). Such a binary refuses to load programs and says why; the real build stays the
//! default and is what `cargo xtask test` and releases use.

use anyhow::{Context as _, anyhow};

/// The environment variable that selects the placeholder object.
const SWITCH: &str = "DAX_PROBE_EBPF";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={SWITCH}");
    println!("cargo::rustc-check-cfg=cfg(ebpf_placeholder)");
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    match std::env::var(SWITCH).as_deref() {
        Ok("placeholder") => {
            // Empty: `probe::loader::object()` recognises it and refuses to load it.
            std::fs::write(out_dir.join("dax-probe"), b"").context("write placeholder")?;
            println!("cargo:rustc-cfg=ebpf_placeholder");
            println!(
                "cargo:warning=DAX_PROBE_EBPF=placeholder: no eBPF programs are embedded; \
                 this binary cannot load kernel programs"
            );
            return Ok(());
        }
        Ok("") | Err(std::env::VarError::NotPresent) => {}
        Ok(other) => {
            return Err(anyhow!(
                "{SWITCH}={other:?} is not understood: unset it for the real eBPF build, or \
                 set it to \"placeholder\" to build without the eBPF toolchain"
            ));
        }
        Err(e) => return Err(anyhow!("{SWITCH}: {e}")),
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "dax-probe-ebpf")
        .ok_or_else(|| anyhow!("dax-probe-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (it installs bpf-linker@0.10.0 \
             and nightly rust-src), or build with {SWITCH}=placeholder for host-only work \
             (clippy, unit tests)"
        ));
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
