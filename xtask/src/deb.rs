//! The Debian package: what `cargo xtask dist` put in target/dist, laid out by the Debian
//! policy (binary in /usr/sbin, unit in /usr/lib/systemd/system, man pages gzipped,
//! completions where each shell's loader looks, the example policy as a conffile), with the
//! shared-library dependencies `dpkg-shlibdeps` reads off the binary. Built with
//! `dpkg-deb --root-owner-group`; [`check`] runs lintian on it and installs it into a
//! scratch root to run the installed binary.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd;

pub const PACKAGE: &str = "dax-probe";
const VERSION: &str = env!("CARGO_PKG_VERSION");
const ARCH: &str = "amd64";
/// Where the package puts the binary (the contrib unit names /usr/local/sbin for a hand
/// install; the packaged unit is rewritten to this).
const SBIN: &str = "/usr/sbin/dax-probe";

/// Files of the package: (source under target/dist, destination, mode, gzip it).
fn layout(dist: &Path) -> Result<Vec<(PathBuf, String, u32, bool)>> {
    let mut v = vec![
        (
            dist.join("dax-probe"),
            SBIN.trim_start_matches('/').to_string(),
            0o755,
            false,
        ),
        (
            dist.join("completions/dax-probe"),
            "usr/share/bash-completion/completions/dax-probe".into(),
            0o644,
            false,
        ),
        (
            dist.join("completions/_dax-probe"),
            "usr/share/zsh/vendor-completions/_dax-probe".into(),
            0o644,
            false,
        ),
        (
            dist.join("completions/dax-probe.fish"),
            "usr/share/fish/vendor_completions.d/dax-probe.fish".into(),
            0o644,
            false,
        ),
        (
            dist.join("contrib/policy.toml"),
            "etc/dax-probe/policy.toml".into(),
            0o644,
            false,
        ),
        (
            dist.join("contrib/policy.toml"),
            "usr/share/doc/dax-probe/examples/policy.toml".into(),
            0o644,
            false,
        ),
        (
            dist.join("contrib/prometheus/alerts.yml"),
            "usr/share/doc/dax-probe/examples/prometheus/alerts.yml".into(),
            0o644,
            false,
        ),
        (
            dist.join("contrib/kubernetes/daemonset.yaml"),
            "usr/share/doc/dax-probe/examples/kubernetes/daemonset.yaml".into(),
            0o644,
            false,
        ),
    ];
    for e in fs::read_dir(dist.join("man")).context("target/dist/man")? {
        let p = e?.path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        // `dax-probe man --dir` writes dax-probe.1 and one page per subcommand.
        if name.ends_with(".1") {
            v.push((p, format!("usr/share/man/man1/{name}.gz"), 0o644, true));
        }
    }
    Ok(v)
}

/// The systemd unit as packaged: the contrib unit with the packaged binary's path.
fn unit(contrib_unit: &str) -> String {
    contrib_unit
        .replace("/usr/local/sbin/dax-probe", SBIN)
        .lines()
        // The hand-install comment block does not apply to the package.
        .filter(|l| !l.starts_with("# Install:") && !l.starts_with("#           "))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    // -n: no name or time stamp (reproducible, and lintian wants it); -9: best.
    let mut c = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run gzip")?;
    c.stdin.take().unwrap().write_all(data)?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}

fn put(root: &Path, dest: &str, data: &[u8], mode: u32) -> Result<()> {
    let p = root.join(dest);
    fs::create_dir_all(p.parent().unwrap())?;
    fs::write(&p, data)?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    Ok(())
}

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: dax-probe

Files: *
Copyright: the dax-probe authors
License: MIT or Apache-2.0
 On Debian systems the Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0.
 .
 Permission is hereby granted, free of charge, to any person obtaining a copy of this
 software and associated documentation files (the \"Software\"), to deal in the Software
 without restriction, including without limitation the rights to use, copy, modify, merge,
 publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
 to whom the Software is furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in all copies or
 substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
 INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
 PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
 FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
 OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
 DEALINGS IN THE SOFTWARE.
";

/// `Depends:` for the binary, from dpkg-shlibdeps (it wants a debian/control to read).
fn depends(bin: &Path) -> Result<String> {
    let tmp = bin.parent().unwrap().join("shlibdeps");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(tmp.join("debian"))?;
    fs::write(
        tmp.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let out = cmd::run(
        Command::new("dpkg-shlibdeps")
            .current_dir(&tmp)
            .args(["-O", "-e"])
            .arg(bin),
    )
    .context("dpkg-shlibdeps (package dpkg-dev)")?;
    let _ = fs::remove_dir_all(&tmp);
    let deps = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .unwrap_or("libc6")
        .trim()
        .to_string();
    Ok(deps)
}

/// Builds target/dist/dax-probe_VERSION_amd64.deb from the files `dist` already holds.
pub fn build(dist: &Path) -> Result<PathBuf> {
    let ws = crate::paths::workspace();
    // Staged beside target/dist, not in it: dist lists what ships.
    let root = dist.with_file_name("deb-root");
    let _ = fs::remove_dir_all(&root);
    for (src, dest, mode, gz) in layout(dist)? {
        let data = fs::read(&src).with_context(|| format!("read {}", src.display()))?;
        let data = if gz { gzip(&data)? } else { data };
        put(&root, &dest, &data, mode)?;
    }
    let contrib_unit = fs::read_to_string(ws.join("contrib/dax-probe.service"))?;
    put(
        &root,
        "usr/lib/systemd/system/dax-probe.service",
        unit(&contrib_unit).as_bytes(),
        0o644,
    )?;
    put(
        &root,
        "usr/share/doc/dax-probe/copyright",
        COPYRIGHT.as_bytes(),
        0o644,
    )?;
    let changelog = format!(
        "{PACKAGE} ({VERSION}) unstable; urgency=medium\n\n  * Built by cargo xtask dist.\n\n \
         -- dax-probe maintainers <dax-probe@example.com>  Tue, 01 Dec 2026 00:00:00 +0000\n"
    );
    put(
        &root,
        "usr/share/doc/dax-probe/changelog.gz",
        &gzip(changelog.as_bytes())?,
        0o644,
    )?;
    let installed_kib: u64 = walk_sizes(&root)?.div_ceil(1024);
    let control = format!(
        "Package: {PACKAGE}\nVersion: {VERSION}\nArchitecture: {ARCH}\nMaintainer: dax-probe \
         maintainers <dax-probe@example.com>\nInstalled-Size: {installed_kib}\nDepends: {}\n\
         Section: admin\nPriority: optional\nDescription: watch and police DAX mappings of \
         persistent memory\n An eBPF-assisted agent that keeps a live map of which processes \
         map which\n pages of fsdax and device-dax persistent memory, reports and signals the\n \
         holders of a departing or failing pmem device, drains a device before it\n is \
         removed, and audits for stale mappings afterwards.\n",
        depends(&dist.join("dax-probe"))?
    );
    put(&root, "DEBIAN/control", control.as_bytes(), 0o644)?;
    put(
        &root,
        "DEBIAN/conffiles",
        b"/etc/dax-probe/policy.toml\n",
        0o644,
    )?;
    // Directories 0755 (dpkg-deb keeps what it finds; a umask of 077 would leak into them).
    set_dir_modes(&root)?;
    let deb = dist.join(format!("{PACKAGE}_{VERSION}_{ARCH}.deb"));
    cmd::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&root)
            .arg(&deb),
    )?;
    Ok(deb)
}

fn walk_sizes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_dir() {
            if e.file_name() != "DEBIAN" {
                n += walk_sizes(&e.path())?;
            }
        } else {
            n += m.len();
        }
    }
    Ok(n)
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.metadata()?.is_dir() {
            set_dir_modes(&e.path())?;
        }
    }
    Ok(())
}

/// What `cargo xtask test` asks of the package: lintian reports no error, and dpkg installs
/// it into a scratch root where the installed binary answers `--version`.
pub fn check(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--tag-display-limit", "0", "--fail-on", "error"])
        .arg(deb)
        .output()
        .context("run lintian (package lintian; cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
    let warnings = text.lines().filter(|l| l.starts_with("W:")).count();
    if !out.status.success() || !errors.is_empty() {
        bail!(
            "lintian rejects {}: {}\n{}",
            deb.display(),
            errors.join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("deb: lintian: no errors ({warnings} warnings)");
    let inst = deb.parent().unwrap().with_file_name("deb-installed");
    let _ = fs::remove_dir_all(&inst);
    let admin = inst.join("var/lib/dpkg");
    fs::create_dir_all(admin.join("info"))?;
    fs::create_dir_all(admin.join("updates"))?;
    fs::write(admin.join("status"), "")?;
    cmd::run(
        Command::new("dpkg")
            .arg(format!("--instdir={}", inst.display()))
            .arg(format!("--admindir={}", admin.display()))
            .args([
                "--force-depends",
                "--force-not-root",
                "--force-script-chrootless",
            ])
            .args(["--no-triggers", "-i"])
            .arg(deb),
    )
    .context("dpkg -i into a scratch root")?;
    let bin = inst.join(SBIN.trim_start_matches('/'));
    let v = cmd::run(Command::new(&bin).arg("--version"))
        .with_context(|| format!("run the installed {}", bin.display()))?;
    if !v.contains(VERSION) {
        bail!("the installed binary says {v:?}, not version {VERSION}");
    }
    for f in [
        "usr/lib/systemd/system/dax-probe.service",
        "etc/dax-probe/policy.toml",
        "usr/share/man/man1/dax-probe.1.gz",
        "usr/share/doc/dax-probe/examples/prometheus/alerts.yml",
        "usr/share/doc/dax-probe/examples/kubernetes/daemonset.yaml",
    ] {
        if !inst.join(f).is_file() {
            bail!("the package did not install /{f}");
        }
    }
    eprintln!("deb: installed into {}: {}", inst.display(), v.trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_unit_runs_the_packaged_binary() {
        let u = unit(include_str!("../../contrib/dax-probe.service"));
        assert!(u.contains("ExecStart=/usr/sbin/dax-probe monitor"), "{u}");
        assert!(!u.contains("/usr/local/sbin"), "{u}");
        assert!(u.contains("[Install]"));
    }
}
