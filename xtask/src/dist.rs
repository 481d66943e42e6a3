//! `cargo xtask dist`: the release binary with what a package needs beside it, generated
//! from the binary's own clap definition so they never drift: target/dist/{dax-probe,
//! dax-probe.1, man/ (one page per subcommand), completions/, contrib/}, and a Debian
//! package of all of it (target/dist/dax-probe_VERSION_amd64.deb, see [`deb`]).

use std::{fs, process::Command};

use anyhow::{Context, Result, bail};

use crate::{cmd, paths};

/// (shell, file name the shell's completion loader looks for)
const SHELLS: &[(&str, &str)] = &[
    ("bash", "dax-probe"),
    ("zsh", "_dax-probe"),
    ("fish", "dax-probe.fish"),
];

/// Builds target/dist; returns the .deb's path.
pub fn run() -> Result<std::path::PathBuf> {
    let ws = paths::workspace();
    cmd::run_visible(Command::new("cargo").current_dir(&ws).args([
        "build",
        "--release",
        "-p",
        "dax-probe",
    ]))?;
    let bin = ws.join("target/release/dax-probe");
    let dist = ws.join("target/dist");
    let _ = fs::remove_dir_all(&dist);
    fs::create_dir_all(dist.join("completions"))?;
    fs::create_dir_all(dist.join("contrib"))?;
    let gen_out = |args: &[&str]| -> Result<Vec<u8>> {
        let out = Command::new(&bin)
            .args(args)
            .output()
            .with_context(|| format!("run {}", bin.display()))?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!(
                "dax-probe {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    };
    fs::copy(&bin, dist.join("dax-probe"))?;
    fs::write(dist.join("dax-probe.1"), gen_out(&["man"])?)?;
    // One page per subcommand as well (dax-probe-tui.1, …), as git and cargo ship them.
    let man = dist.join("man");
    cmd::run(Command::new(&bin).arg("man").arg("--dir").arg(&man))?;
    for (shell, name) in SHELLS {
        fs::write(
            dist.join("completions").join(name),
            gen_out(&["completions", shell])?,
        )?;
    }
    for f in [
        "policy.toml",
        "dax-probe.service",
        "prometheus/alerts.yml",
        "kubernetes/daemonset.yaml",
    ] {
        let to = dist.join("contrib").join(f);
        fs::create_dir_all(to.parent().unwrap())?;
        fs::copy(ws.join("contrib").join(f), to)?;
    }
    let package = crate::deb::build(&dist)?;
    println!("dist: {}", dist.display());
    for e in walk(&dist)? {
        println!("  {e}");
    }
    println!("dist: Debian package {}", package.display());
    Ok(package)
}

fn walk(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(format!(
                "{} ({} bytes)",
                p.strip_prefix(paths::workspace().join("target/dist"))
                    .unwrap_or(&p)
                    .display(),
                e.metadata()?.len()
            ));
        }
    }
    out.sort();
    Ok(out)
}
