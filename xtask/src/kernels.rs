//! Debian kernels for the VM: resolve the newest build of a line from Debian's archive,
//! download it with apt-get through a private sources list (never installed on the host),
//! unpack it, and cache it by exact version. When the archive is unreachable, or a version
//! has left it, the newest cached build of the line is used.

use std::{
    cmp::Ordering,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{cmd::run, paths};

/// A kernel line we test on.
#[derive(Clone, Copy, Debug)]
pub struct Line {
    /// What `--kernel` takes.
    pub label: &'static str,
    pub suite: &'static str,
    /// Security suite, where the newest builds of a stable line usually are.
    pub security: Option<&'static str>,
    /// Package name = prefix + version part + suffix; the version part is digits and dots.
    pub prefix: &'static str,
    pub suffix: &'static str,
    /// sid splits the kernel: extra packages named `<pkg>-<ver>` to fetch with the image.
    pub split: bool,
}

pub const LINES: &[Line] = &[
    Line {
        label: "5.10",
        suite: "bullseye",
        security: Some("bullseye-security"),
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64-unsigned",
        split: false,
    },
    Line {
        label: "6.1",
        suite: "bookworm",
        security: Some("bookworm-security"),
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
        split: false,
    },
    Line {
        label: "6.12",
        suite: "trixie",
        security: Some("trixie-security"),
        prefix: "linux-image-6.12.",
        suffix: "+deb13-amd64-unsigned",
        split: false,
    },
    Line {
        label: "7",
        suite: "sid",
        security: None,
        prefix: "linux-binary-unsigned-7.",
        suffix: "+deb14-amd64",
        split: true,
    },
];

pub fn line(label: &str) -> Result<&'static Line> {
    LINES.iter().find(|l| l.label == label).with_context(|| {
        format!(
            "unknown kernel {label:?}: choose one of {} or all",
            LINES.iter().map(|l| l.label).collect::<Vec<_>>().join(", ")
        )
    })
}

/// An unpacked kernel ready to boot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kernel {
    pub label: String,
    /// Package(s) it came from, with versions.
    pub packages: Vec<String>,
    /// `uname -r` of the kernel.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `.../lib/modules/<release>`
    pub modules: PathBuf,
}

const MANIFEST: &str = "kernel.json";
/// How long a downloaded package list stays fresh before we ask the archive again.
const LISTS_TTL: Duration = Duration::from_secs(6 * 3600);

fn apt_dir(suite: &str) -> PathBuf {
    paths::cache().join("apt").join(suite)
}

/// apt-get/apt-cache with a private configuration for one suite.
fn apt(line: &Line, tool: &str) -> Command {
    let dir = apt_dir(line.suite);
    let mut c = Command::new(tool);
    c.arg("-o")
        .arg(format!(
            "Dir::Etc::SourceList={}",
            dir.join("sources.list").display()
        ))
        .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
        .arg("-o")
        .arg(format!("Dir::State::Lists={}", dir.join("lists").display()))
        .arg("-o")
        .arg(format!("Dir::Cache={}", dir.join("cache").display()))
        .args(["-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]);
    c
}

fn refresh_lists(line: &Line, force: bool) -> Result<()> {
    let dir = apt_dir(line.suite);
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let m = crate::mirror::mirrors()?;
    let mut sources = format!("deb {} {} main\n", m.archive, line.suite);
    match (line.security, &m.security) {
        (Some(sec), Some(uri)) => sources.push_str(&format!("deb {uri} {sec} main\n")),
        // The newest builds of a stable line are often only in the security archive; the
        // main archive still has the point release's build.
        (Some(sec), None) => eprintln!(
            "kernels: the host's apt sources name no security archive: {sec} is skipped \
             (set {} to use one)",
            crate::mirror::ENV_SECURITY
        ),
        (None, _) => {}
    }
    fs::write(dir.join("sources.list"), sources)?;
    let stamp = dir.join("updated");
    let fresh = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < LISTS_TTL);
    if fresh && !force {
        return Ok(());
    }
    run(apt(line, "apt-get").arg("update"))
        .with_context(|| format!("apt-get update for {}", line.suite))?;
    fs::write(stamp, "")?;
    Ok(())
}

/// Compares dotted/dashed numeric versions ("56" vs "9", "13" vs "118").
fn cmp_versions(a: &str, b: &str) -> Ordering {
    let parts = |s: &str| -> Vec<u64> {
        s.split(['.', '-', '+'])
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    parts(a).cmp(&parts(b))
}

/// The newest image package of a line in the archive's package names.
pub fn newest(line: &Line, names: &[&str]) -> Option<String> {
    names
        .iter()
        .filter_map(|n| {
            let mid = n.strip_prefix(line.prefix)?.strip_suffix(line.suffix)?;
            (!mid.is_empty() && mid.chars().all(|c| c.is_ascii_digit() || c == '.'))
                .then_some((mid.to_string(), n.to_string()))
        })
        .max_by(|a, b| cmp_versions(&a.0, &b.0))
        .map(|(_, n)| n)
}

fn kernels_dir(line: &Line) -> PathBuf {
    paths::cache().join("kernels").join(line.label)
}

fn cached(line: &Line) -> Vec<Kernel> {
    let Ok(entries) = fs::read_dir(kernels_dir(line)) else {
        return Vec::new();
    };
    let mut v: Vec<Kernel> = entries
        .flatten()
        .filter_map(|e| fs::read(e.path().join(MANIFEST)).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .filter(|k: &Kernel| k.vmlinuz.is_file())
        .collect();
    v.sort_by(|a, b| cmp_versions(&a.release, &b.release));
    v
}

/// Returns the newest kernel of `label`, downloading and unpacking it if needed.
pub fn fetch(label: &str, refresh: bool) -> Result<Kernel> {
    let line = line(label)?;
    let resolved = refresh_lists(line, refresh).and_then(|()| {
        let names = run(apt(line, "apt-cache").arg("pkgnames").arg(
            line.prefix
                .trim_end_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '-'),
        ))?;
        let names: Vec<&str> = names.lines().collect();
        newest(line, &names).with_context(|| {
            format!(
                "no {}*{} package in {}",
                line.prefix, line.suffix, line.suite
            )
        })
    });
    let image = match resolved {
        Ok(name) => name,
        Err(e) => {
            // Offline or the archive dropped the line: keep working from the cache.
            if let Some(k) = cached(line).pop() {
                eprintln!(
                    "kernels: cannot ask Debian's archive ({e:#}); using cached {}",
                    k.release
                );
                return Ok(k);
            }
            return Err(e.context(format!(
                "cannot resolve the {label} kernel and none is cached in {}",
                kernels_dir(line).display()
            )));
        }
    };
    let mut pkgs = vec![image.clone()];
    if line.split {
        // linux-binary-unsigned-<ver>-amd64 → linux-modules-<ver>-amd64, linux-base-<ver>-amd64
        let ver = image.trim_start_matches("linux-binary-unsigned-");
        pkgs.push(format!("linux-modules-{ver}"));
        pkgs.push(format!("linux-base-{ver}"));
    }
    let dest = kernels_dir(line).join(&image);
    if let Ok(b) = fs::read(dest.join(MANIFEST))
        && let Ok(k) = serde_json::from_slice::<Kernel>(&b)
        && k.vmlinuz.is_file()
    {
        return Ok(k);
    }
    eprintln!(
        "kernels: downloading {} from {}",
        pkgs.join(", "),
        line.suite
    );
    let dl = dest.join("debs");
    let _ = fs::remove_dir_all(&dest);
    fs::create_dir_all(&dl)?;
    run(apt(line, "apt-get")
        .arg("download")
        .args(&pkgs)
        .current_dir(&dl))
    .with_context(|| format!("apt-get download {}", pkgs.join(" ")))?;
    let root = dest.join("root");
    let mut debs = Vec::new();
    for e in fs::read_dir(&dl)?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&p).arg(&root))
                .with_context(|| format!("unpack {}", p.display()))?;
            debs.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    let k = locate(label, &root, debs)?;
    // Unpacked: the .debs are no longer needed.
    let _ = fs::remove_dir_all(&dl);
    fs::write(dest.join(MANIFEST), serde_json::to_vec_pretty(&k)?)?;
    Ok(k)
}

/// Finds vmlinuz and the modules directory in an unpacked tree (layouts differ by suite:
/// /boot/vmlinuz-<rel> + /lib/modules, or /usr/lib/modules/<rel>/vmlinuz[.unsigned]).
fn locate(label: &str, root: &Path, packages: Vec<String>) -> Result<Kernel> {
    for mods in ["lib/modules", "usr/lib/modules"] {
        let Ok(entries) = fs::read_dir(root.join(mods)) else {
            continue;
        };
        for e in entries.flatten() {
            let release = e.file_name().to_string_lossy().into_owned();
            let modules = e.path();
            let candidates = [
                root.join("boot").join(format!("vmlinuz-{release}")),
                modules.join("vmlinuz"),
                // sid's linux-binary-unsigned-* ships it under this name.
                modules.join("vmlinuz.unsigned"),
            ];
            if let Some(vmlinuz) = candidates.into_iter().find(|p| p.is_file()) {
                return Ok(Kernel {
                    label: label.to_string(),
                    packages,
                    release,
                    vmlinuz,
                    modules,
                });
            }
        }
    }
    bail!(
        "no vmlinuz found in the unpacked packages under {}",
        root.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_build_of_each_line() {
        let names = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "linux-image-6.1.0-56-rt-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-unsigned",
        ];
        assert_eq!(
            newest(line("6.1").unwrap(), &names).as_deref(),
            Some("linux-image-6.1.0-56-amd64-unsigned")
        );
        let names = [
            "linux-image-6.12.9+deb13-amd64-unsigned",
            "linux-image-6.12.118+deb13-amd64-unsigned",
            "linux-image-6.12.118+deb13-cloud-amd64-unsigned",
        ];
        assert_eq!(
            newest(line("6.12").unwrap(), &names).as_deref(),
            Some("linux-image-6.12.118+deb13-amd64-unsigned")
        );
        let names = [
            "linux-binary-unsigned-7.2.13+deb14-amd64",
            "linux-binary-unsigned-7.2.13+deb14-cloud-amd64",
            "linux-binary-unsigned-7.10.1+deb14-amd64",
        ];
        assert_eq!(
            newest(line("7").unwrap(), &names).as_deref(),
            Some("linux-binary-unsigned-7.10.1+deb14-amd64")
        );
        assert_eq!(newest(line("5.10").unwrap(), &names), None);
    }

    #[test]
    fn unknown_lines_name_the_choices() {
        let e = line("4.19").unwrap_err().to_string();
        assert!(e.contains("5.10, 6.1, 6.12, 7"), "{e}");
    }
}
