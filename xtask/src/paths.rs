//! Where things live: the workspace, the cache of kernels and images.

use std::path::PathBuf;

/// The workspace root (parent of xtask/).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cache for downloaded kernels, apt lists and VM artefacts. `DAX_PROBE_CACHE` overrides;
/// otherwise `$XDG_CACHE_HOME/dax-probe` or `~/.cache/dax-probe`.
pub fn cache() -> PathBuf {
    if let Some(p) = std::env::var_os("DAX_PROBE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("dax-probe");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".cache/dax-probe")
}

/// Scratch space for one xtask run's VM files (nvdimm images, initrd, logs).
pub fn run_dir(name: &str) -> PathBuf {
    workspace().join("target/vm").join(name)
}
