//! Where Debian's archive is: read off the host's own apt configuration (one-line `.list`
//! and deb822 `.sources` files), never written into the code. `DAX_PROBE_DEBIAN_MIRROR`
//! (and `DAX_PROBE_DEBIAN_SECURITY_MIRROR`) override it; the choice is printed once.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Result, bail};

/// Environment variables that override what the host's apt sources say.
pub const ENV_ARCHIVE: &str = "DAX_PROBE_DEBIAN_MIRROR";
pub const ENV_SECURITY: &str = "DAX_PROBE_DEBIAN_SECURITY_MIRROR";

/// Debian's release codenames (and `sid`): an apt entry for one of these with the `main`
/// component is Debian's archive, whatever host serves it.
const CODENAMES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "stable",
    "testing",
    "unstable",
    "oldstable",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirrors {
    /// The archive's base URI (`…/debian`).
    pub archive: String,
    /// The security archive's base URI, where the host names one.
    pub security: Option<String>,
    /// Where they came from, for the operator.
    pub origin: String,
}

/// One `deb` entry of an apt source file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    uri: String,
    suites: Vec<String>,
    components: Vec<String>,
}

/// The mirrors to use, resolved once per run.
pub fn mirrors() -> Result<&'static Mirrors> {
    static M: OnceLock<std::result::Result<Mirrors, String>> = OnceLock::new();
    let m = M.get_or_init(|| {
        let r = resolve(
            std::env::var(ENV_ARCHIVE).ok(),
            std::env::var(ENV_SECURITY).ok(),
            Path::new("/etc/apt"),
        )
        .map_err(|e| format!("{e:#}"));
        if let Ok(m) = &r {
            eprintln!(
                "kernels: Debian archive {} (security: {}), from {}",
                m.archive,
                m.security.as_deref().unwrap_or("none"),
                m.origin
            );
        }
        r
    });
    m.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// `archive`/`security`: the environment's overrides; `etc_apt`: `/etc/apt` or a test tree.
pub fn resolve(
    archive: Option<String>,
    security: Option<String>,
    etc_apt: &Path,
) -> Result<Mirrors> {
    let archive = archive.filter(|s| !s.trim().is_empty());
    let security = security.filter(|s| !s.trim().is_empty());
    if let Some(a) = archive {
        return Ok(Mirrors {
            archive: trim_uri(&a),
            security: security.map(|s| trim_uri(&s)),
            origin: format!("${ENV_ARCHIVE}"),
        });
    }
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(dir) = fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut more: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            // apt reads only these two endings; `.disabled`, `.save`, … are not sources.
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    let mut found_archive: Option<(String, PathBuf)> = None;
    let mut found_security: Option<String> = None;
    for f in &files {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        let entries = if f.extension().is_some_and(|e| e == "sources") {
            parse_deb822(&text)
        } else {
            parse_one_line(&text)
        };
        for e in entries {
            if !e.components.iter().any(|c| c == "main") || !is_network_uri(&e.uri) {
                continue;
            }
            let debian = |s: &str| CODENAMES.contains(&s.split('-').next().unwrap_or(s));
            if e.suites
                .iter()
                .any(|s| s.ends_with("-security") && debian(s))
            {
                found_security.get_or_insert(trim_uri(&e.uri));
            } else if e.suites.iter().any(|s| debian(s)) && found_archive.is_none() {
                found_archive = Some((trim_uri(&e.uri), f.clone()));
            }
        }
    }
    let Some((archive, file)) = found_archive else {
        bail!(
            "no Debian archive in the host's apt sources ({} and {}/*.list|*.sources): the \
             VM kernels come from Debian's archive; set {ENV_ARCHIVE} to its URI (and \
             {ENV_SECURITY} for the security archive)",
            etc_apt.join("sources.list").display(),
            etc_apt.join("sources.list.d").display()
        );
    };
    Ok(Mirrors {
        archive,
        security: security.map(|s| trim_uri(&s)).or(found_security),
        origin: file.display().to_string(),
    })
}

fn trim_uri(u: &str) -> String {
    u.trim().trim_end_matches('/').to_string()
}

fn is_network_uri(u: &str) -> bool {
    ["http://", "https://", "file:", "mirror+"]
        .iter()
        .any(|p| u.starts_with(p))
}

/// `deb [opt=val …] URI SUITE COMPONENT…` lines; `deb-src` and comments are skipped.
fn parse_one_line(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(Entry {
            uri: uri.to_string(),
            suites: vec![suite.to_string()],
            components: words.map(str::to_string).collect(),
        });
    }
    out
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Components:`, `Enabled:`), separated by
/// blank lines; every URI of a stanza is an entry.
fn parse_deb822(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut types = Vec::new();
        let mut uris = Vec::new();
        let mut suites = Vec::new();
        let mut components = Vec::new();
        let mut enabled = true;
        let mut last: Option<&mut Vec<String>> = None;
        for raw in stanza.lines() {
            if raw.trim_start().starts_with('#') || raw.trim().is_empty() {
                continue;
            }
            // A continuation line (starts with white space) adds to the previous field.
            if raw.starts_with(' ') || raw.starts_with('\t') {
                if let Some(v) = last.as_mut() {
                    v.extend(raw.split_whitespace().map(str::to_string));
                }
                continue;
            }
            let Some((key, value)) = raw.split_once(':') else {
                continue;
            };
            let words = || value.split_whitespace().map(str::to_string);
            last = match key.trim().to_ascii_lowercase().as_str() {
                "types" => {
                    types.extend(words());
                    Some(&mut types)
                }
                "uris" => {
                    uris.extend(words());
                    Some(&mut uris)
                }
                "suites" => {
                    suites.extend(words());
                    Some(&mut suites)
                }
                "components" => {
                    components.extend(words());
                    Some(&mut components)
                }
                "enabled" => {
                    enabled = !value.trim().eq_ignore_ascii_case("no");
                    None
                }
                _ => None,
            };
        }
        if !enabled || !types.iter().any(|t| t == "deb") {
            continue;
        }
        for u in &uris {
            out.push(Entry {
                uri: u.clone(),
                suites: suites.clone(),
                components: components.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("sources.list.d")).unwrap();
        for (name, text) in files {
            fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    #[test]
    fn deb822_archive_and_security() {
        let d = tree(&[(
            "sources.list.d/debian.sources",
            "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
             Components: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security/\n\
             Suites: bookworm-security\nComponents: main\n",
        )]);
        let m = resolve(None, None, d.path()).unwrap();
        assert_eq!(m.archive, "http://mirror.example/debian");
        assert_eq!(
            m.security.as_deref(),
            Some("http://mirror.example/debian-security")
        );
        assert!(m.origin.ends_with("debian.sources"), "{}", m.origin);
    }

    #[test]
    fn one_line_format_with_options_and_deb_src() {
        let d = tree(&[(
            "sources.list",
            "# deb http://old.example/debian buster main\n\
             deb-src http://src.example/debian bookworm main\n\
             deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian/ bookworm main contrib\n\
             deb http://one.example/debian-security bookworm-security main\n",
        )]);
        let m = resolve(None, None, d.path()).unwrap();
        assert_eq!(m.archive, "http://one.example/debian");
        assert_eq!(
            m.security.as_deref(),
            Some("http://one.example/debian-security")
        );
    }

    #[test]
    fn third_party_disabled_and_non_sources_files_are_ignored() {
        let d = tree(&[
            (
                "sources.list.d/nodesource.sources",
                "Types: deb\nURIs: https://vendor.example/node_20.x\nSuites: nodistro\nComponents: main\n",
            ),
            (
                "sources.list.d/cloud.list.disabled-by-farm",
                "deb https://cloud.example/apt cloud-sdk-bookworm main\n",
            ),
            (
                "sources.list.d/off.sources",
                "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n",
            ),
            (
                "sources.list.d/z.list",
                "deb http://z.example/debian trixie main\n",
            ),
        ]);
        let m = resolve(None, None, d.path()).unwrap();
        assert_eq!(m.archive, "http://z.example/debian");
        assert_eq!(m.security, None);
    }

    #[test]
    fn environment_overrides_the_host() {
        let d = tree(&[(
            "sources.list",
            "deb http://host.example/debian bookworm main\n",
        )]);
        let m = resolve(Some("http://env.example/debian/".into()), None, d.path()).unwrap();
        assert_eq!(m.archive, "http://env.example/debian");
        assert_eq!(m.origin, format!("${ENV_ARCHIVE}"));
    }

    #[test]
    fn no_debian_archive_names_the_variable() {
        let d = tree(&[]);
        let e = resolve(None, None, d.path()).unwrap_err().to_string();
        assert!(e.contains(ENV_ARCHIVE), "{e}");
    }
}
