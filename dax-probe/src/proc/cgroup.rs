//! Which container and pod a process runs in, from `/proc/PID/cgroup`.
//!
//! The text crosses a trust boundary: a process may create and name cgroups below its own
//! (a delegated subtree, a container with its own cgroup namespace), so every name in it is
//! attacker-chosen below that point. Hence:
//! - the parser never opens or resolves the path (a `..` in it is only text: the kernel
//!   writes `/../x` for a cgroup outside the reader's cgroup namespace);
//! - lines longer than the kernel ever writes (`PATH_MAX`) are ignored, and a text with two
//!   unified (or two systemd) lines is not the kernel's and yields nothing;
//! - the container and the pod are taken from the *outermost* component that fits a known
//!   layout: a process can only add components below its own cgroup, never above, so a
//!   name it made up inside a real container cannot displace the runtime's.
//!
//! A path that fits no layout is still reported, as the plain path.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kernel formats a cgroup path into a `PATH_MAX` buffer: a longer line is not its.
pub const MAX_LINE: usize = 4096;
/// Bytes of `/proc/PID/cgroup` read at most (one line per v1 hierarchy plus the unified).
pub const MAX_TEXT: usize = 64 * 1024;

/// The container runtime a cgroup name identifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// `docker-<id>.scope` (systemd driver) or `/docker/<id>` (cgroupfs driver).
    Docker,
    /// `cri-containerd-<id>.scope`.
    Containerd,
    /// `crio-<id>.scope` or `crio-<id>`.
    Crio,
    /// `libpod-<id>.scope` or `libpod-<id>`.
    Podman,
    /// A bare `<id>` below a kubelet (cgroupfs driver) pod cgroup: some CRI runtime, the
    /// path does not say which.
    Cri,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::Crio => "crio",
            Runtime::Podman => "podman",
            Runtime::Cri => "cri",
        }
    }
}

/// A container named by a cgroup path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Container {
    pub runtime: Runtime,
    /// The full container id (64 lowercase hex digits).
    pub id: String,
}

/// A process's cgroup and what its layout says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// As the kernel names it, relative to the reader's cgroup namespace root. Bytes that
    /// are not UTF-8 are replaced (U+FFFD): the path is for reading, never for opening.
    pub path: String,
    pub container: Option<Container>,
    /// The Kubernetes pod UID, with dashes (the systemd driver writes underscores).
    pub pod_uid: Option<String>,
}

/// The process's cgroup from the text of `/proc/PID/cgroup`: the unified (v2, `0::`)
/// line; on a host without one, the `name=systemd` v1 hierarchy's.
pub fn parse(text: &[u8]) -> Option<Cgroup> {
    cgroup_path(text).map(|p| parse_path(&p))
}

/// The cgroup path from `/proc/PID/cgroup` (`hierarchy-id:controllers:path` per line).
pub fn cgroup_path(text: &[u8]) -> Option<String> {
    let text = &text[..text.len().min(MAX_TEXT)];
    let mut unified: Vec<&[u8]> = Vec::new();
    let mut systemd: Vec<&[u8]> = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        if line.len() > MAX_LINE {
            continue;
        }
        let mut f = line.splitn(3, |&b| b == b':');
        let (Some(id), Some(ctl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if !path.starts_with(b"/") {
            continue;
        }
        if id == b"0" && ctl.is_empty() {
            unified.push(path);
        } else if ctl.split(|&b| b == b',').any(|c| c == b"name=systemd") {
            systemd.push(path);
        }
    }
    // Two lines of one hierarchy: not the kernel's text (a name with a newline in it, on a
    // kernel that allowed one), so nothing in it is believed.
    if unified.len() > 1 || systemd.len() > 1 {
        return None;
    }
    let path = unified.first().or(systemd.first())?;
    Some(String::from_utf8_lossy(path).into_owned())
}

/// What a cgroup path's layout says: container (systemd scopes of docker, containerd,
/// CRI-O and podman; cgroupfs `/docker/<id>` and kubelet `pod<uid>/<id>`) and Kubernetes
/// pod UID (kubelet's systemd and cgroupfs drivers). Anything else: the plain path.
pub fn parse_path(path: &str) -> Cgroup {
    let parts: Vec<&str> = path.split('/').collect();
    let mut container = None;
    let mut pod_uid = None;
    for (i, c) in parts.iter().enumerate() {
        let parent = i.checked_sub(1).map(|p| parts[p]);
        if pod_uid.is_none() {
            pod_uid = pod_of(c, parent);
        }
        if container.is_none() {
            container = container_of(c, parent);
        }
    }
    Cgroup {
        path: path.to_string(),
        container,
        pod_uid,
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A pod UID is a UUID, or for a static pod the hash of its manifest (32 hex digits).
fn is_uid(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

fn container_of(c: &str, parent: Option<&str>) -> Option<Container> {
    const PREFIXES: [(&str, Runtime); 4] = [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
        ("libpod-", Runtime::Podman),
    ];
    let make = |runtime, id: &str| {
        is_id(id).then(|| Container {
            runtime,
            id: id.to_string(),
        })
    };
    for (prefix, runtime) in PREFIXES {
        if let Some(rest) = c.strip_prefix(prefix) {
            let id = rest.strip_suffix(".scope");
            return match (id, runtime) {
                (Some(id), _) => make(runtime, id),
                // cgroupfs drivers of CRI-O and podman name the cgroup without a unit
                // suffix; docker's cgroupfs driver uses `/docker/<id>` (below).
                (None, Runtime::Crio | Runtime::Podman) => make(runtime, rest),
                (None, _) => None,
            };
        }
    }
    match parent {
        Some("docker") => make(Runtime::Docker, c),
        Some(p) if p.starts_with("pod") && pod_of(p, None).is_some() => make(Runtime::Cri, c),
        _ => None,
    }
}

/// `kubepods[-QOS]-pod<uid_with_underscores>.slice` (systemd driver), or `pod<uid>` below
/// `kubepods`, `besteffort` or `burstable` (cgroupfs driver). `parent` None: only the name
/// is checked (the caller knows the parent).
fn pod_of(c: &str, parent: Option<&str>) -> Option<String> {
    if let Some(unit) = c.strip_suffix(".slice")
        && let Some(rest) = unit.strip_prefix("kubepods-")
    {
        let raw = rest
            .strip_prefix("besteffort-")
            .or_else(|| rest.strip_prefix("burstable-"))
            .unwrap_or(rest)
            .strip_prefix("pod")?;
        // A dash in a slice name separates parents: kubelet writes the UID's as `_`.
        if raw.contains('-') {
            return None;
        }
        let uid = raw.replace('_', "-");
        return is_uid(&uid).then_some(uid);
    }
    let uid = c.strip_prefix("pod")?;
    let under_kubepods = match parent {
        None => true,
        Some(p) => matches!(p, "kubepods" | "besteffort" | "burstable"),
    };
    (under_kubepods && is_uid(uid)).then(|| uid.to_string())
}

/// Does `pattern` select a process in `cgroup` (path, container id, pod UID)? A pattern
/// with a glob character (`*`, `?`) must match the whole path (`*` spans `/`); any other
/// is a substring of the path, of the container id or of the pod UID (so a short docker id
/// or a pod UID as kubectl prints it, with dashes, both select).
pub fn matches(
    pattern: &str,
    path: &str,
    container_id: Option<&str>,
    pod_uid: Option<&str>,
) -> bool {
    if pattern.contains(['*', '?']) {
        return glob(pattern.as_bytes(), path.as_bytes());
    }
    path.contains(pattern)
        || container_id.is_some_and(|c| c.contains(pattern))
        || pod_uid.is_some_and(|u| u.contains(pattern))
}

/// `*` (any run, `/` included) and `?` (one byte); at most len(p)·len(s) steps (no
/// exponential backtracking on a pattern of many stars).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// The path for a terminal: control characters escaped (a cgroup name may hold any byte
/// but `/` and, on current kernels, newline — an escape sequence included).
pub fn display(path: &str) -> String {
    path.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d";

    fn container(p: &str) -> Option<(Runtime, String)> {
        parse_path(p).container.map(|c| (c.runtime, c.id))
    }

    #[test]
    fn unified_line_wins_on_hybrid_hosts() {
        let text = format!(
            "12:pids:/system.slice/x.service\n1:name=systemd:/v1/path\n0::/system.slice/docker-{ID}.scope\n"
        );
        let c = parse(text.as_bytes()).unwrap();
        assert_eq!(c.path, format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(c.container.unwrap().runtime, Runtime::Docker);
    }

    #[test]
    fn systemd_line_on_v1_hosts_and_nothing_without_either() {
        let text = "4:cpu,cpuacct:/docker/x\n1:name=systemd:/user.slice/session-2.scope\n";
        assert_eq!(
            cgroup_path(text.as_bytes()).as_deref(),
            Some("/user.slice/session-2.scope")
        );
        assert_eq!(cgroup_path(b"4:cpu,cpuacct:/docker/x\n"), None);
        assert_eq!(cgroup_path(b""), None);
        assert_eq!(cgroup_path(b"garbage\n0:\n::\n"), None);
        // The root cgroup is a path like any other.
        assert_eq!(cgroup_path(b"0::/\n").as_deref(), Some("/"));
    }

    #[test]
    fn systemd_scopes_of_each_runtime() {
        for (unit, rt) in [
            ("docker", Runtime::Docker),
            ("cri-containerd", Runtime::Containerd),
            ("crio", Runtime::Crio),
            ("libpod", Runtime::Podman),
        ] {
            let p = format!("/system.slice/{unit}-{ID}.scope");
            assert_eq!(container(&p), Some((rt, ID.to_string())), "{p}");
        }
        // conmon's scope is the monitor, not the container.
        assert_eq!(
            container(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            None
        );
        assert_eq!(
            container(&format!("/system.slice/docker-{}.scope", &ID[1..])),
            None
        );
        assert_eq!(
            container(&format!("/system.slice/docker-{}.scope", ID.to_uppercase())),
            None
        );
        assert_eq!(container("/system.slice/docker.service"), None);
    }

    #[test]
    fn cgroupfs_layouts() {
        assert_eq!(
            container(&format!("/docker/{ID}")),
            Some((Runtime::Docker, ID.into()))
        );
        let c = parse_path(&format!("/kubepods/besteffort/pod{UID}/{ID}"));
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container.unwrap().runtime, Runtime::Cri);
        // Guaranteed pods sit directly below kubepods.
        let c = parse_path(&format!("/kubepods/pod{UID}/crio-{ID}"));
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container.unwrap().runtime, Runtime::Crio);
        assert_eq!(
            container(&format!("/libpod_parent/libpod-{ID}")),
            Some((Runtime::Podman, ID.into()))
        );
        // A hex name below anything else is no container.
        assert_eq!(container(&format!("/user/{ID}")), None);
        assert_eq!(parse_path(&format!("/user/pod{UID}")).pod_uid, None);
    }

    #[test]
    fn kubelet_systemd_driver_pod_uid_back_with_dashes() {
        let under = UID.replace('-', "_");
        for qos in [
            "kubepods-besteffort.slice/kubepods-besteffort",
            "kubepods-burstable.slice/kubepods-burstable",
            "",
        ] {
            let pod = if qos.is_empty() {
                format!("kubepods-pod{under}.slice")
            } else {
                format!("{qos}-pod{under}.slice")
            };
            let p = format!("/kubepods.slice/{pod}/cri-containerd-{ID}.scope");
            let c = parse_path(&p);
            assert_eq!(c.pod_uid.as_deref(), Some(UID), "{p}");
            assert_eq!(
                c.container,
                Some(Container {
                    runtime: Runtime::Containerd,
                    id: ID.into()
                })
            );
            assert_eq!(c.path, p);
        }
        // A static pod's UID is a hash, no dashes.
        let c = parse_path("/kubepods.slice/kubepods-pod5f3c8b3e9d0a4b1c2d3e4f5a6b7c8d9e.slice");
        assert_eq!(
            c.pod_uid.as_deref(),
            Some("5f3c8b3e9d0a4b1c2d3e4f5a6b7c8d9e")
        );
        assert_eq!(c.container, None);
        // The QoS slices themselves name no pod.
        assert_eq!(
            parse_path("/kubepods.slice/kubepods-besteffort.slice").pod_uid,
            None
        );
    }

    #[test]
    fn paths_of_no_layout_are_the_plain_path() {
        for p in [
            "/",
            "/user.slice/user-1000.slice/session-3.scope",
            "/dax/plain",
            "/../../x",
        ] {
            assert_eq!(
                parse_path(p),
                Cgroup {
                    path: p.into(),
                    container: None,
                    pod_uid: None
                }
            );
        }
    }

    #[test]
    fn the_outermost_layout_wins_over_names_made_inside() {
        // Inside a real container, the process made a cgroup named like another container
        // in another pod: the runtime's names above it stand.
        let other = "f".repeat(64);
        let p = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope/\
             kubepods-poddeadbeef_0000.slice/docker-{other}.scope",
            UID.replace('-', "_")
        );
        let c = parse_path(&p);
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container.unwrap().id, ID);
    }

    #[test]
    fn hostile_text() {
        // Very long: lines beyond PATH_MAX are not the kernel's; the text is read bounded.
        let long = format!("0::/{}\n", "a".repeat(MAX_LINE));
        assert_eq!(cgroup_path(long.as_bytes()), None);
        let huge = format!("0::/ok\n{}", "x".repeat(10 * MAX_TEXT));
        assert_eq!(cgroup_path(huge.as_bytes()).as_deref(), Some("/ok"));
        let deep = format!("/{}", "a/".repeat(2000));
        assert_eq!(parse_path(&deep).container, None);
        // A second unified line (a name with a newline, on a kernel that let one through):
        // nothing in the text is believed.
        let forged = format!("0::/user.slice/x\n0::/kubepods/pod{UID}/{ID}\n");
        assert_eq!(cgroup_path(forged.as_bytes()), None);
        // Not UTF-8: replaced, never refused; the layout around it still reads.
        let mut raw = b"0::/system.slice/\xff\xfe/docker-".to_vec();
        raw.extend_from_slice(ID.as_bytes());
        raw.extend_from_slice(b".scope\n");
        let c = parse(&raw).unwrap();
        assert!(c.path.contains('\u{fffd}'));
        assert_eq!(c.container.unwrap().id, ID);
        // `..` is only text: no component is resolved.
        let c = parse_path(&format!("/../docker/{ID}/../.."));
        assert_eq!(c.path, format!("/../docker/{ID}/../.."));
        assert_eq!(c.container.unwrap().runtime, Runtime::Docker);
        // Colons in the path stay in the path.
        assert_eq!(cgroup_path(b"0::/a:b:c\n").as_deref(), Some("/a:b:c"));
        // Control characters reach a terminal escaped.
        assert_eq!(display("/a\nb\x1b[2J"), "/a\\nb\\u{1b}[2J");
        // Near-misses of each layout.
        for p in [
            format!("/docker-{ID}.scope.scope"),
            format!("/kubepods.slice/kubepods-pod{}.slice", "g".repeat(36)),
            format!("/kubepods.slice/kubepods-pod{}.slice", "a".repeat(65)),
            format!("/kubepods.slice/kubepods-pod{UID}.slice"),
            "/kubepods.slice/kubepods-pod.slice".to_string(),
            format!("/kubepods/pod/{ID}"),
        ] {
            let c = parse_path(&p);
            assert_eq!(
                (c.container.is_some(), c.pod_uid.is_some()),
                (false, false),
                "{p}"
            );
        }
    }

    proptest::proptest! {
        /// What the fuzz target checks, on every `cargo test`: any text parses without a
        /// panic, and what is extracted is a piece of the path, never made up.
        #[test]
        fn extracted_names_come_from_the_path(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::string::string_regex("[a-z0-9_.:-]{0,12}").unwrap(),
                    proptest::string::string_regex(
                        "(docker-|cri-containerd-|crio-|libpod-|kubepods-pod|pod)[0-9a-f_-]{30,66}(\\.scope|\\.slice)?"
                    ).unwrap(),
                    proptest::strategy::Just("kubepods".to_string()),
                    proptest::strategy::Just("..".to_string()),
                ],
                0..8,
            ),
            junk in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let path = format!("/{}", parts.join("/"));
            let mut text = format!("1:name=systemd:/x\n0::{path}\n").into_bytes();
            text.extend_from_slice(&junk);
            if let Some(c) = parse(&text) {
                if let Some(k) = &c.container {
                    proptest::prop_assert!(c.path.contains(&k.id));
                }
                if let Some(u) = &c.pod_uid {
                    proptest::prop_assert!(c.path.contains(u.as_str()) || c.path.contains(&u.replace('-', "_")));
                }
                let _ = matches(&c.path, &c.path, None, c.pod_uid.as_deref());
            }
            let _ = parse(&junk);
        }
    }

    #[test]
    fn patterns() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let m = |pat: &str| matches(pat, &path, Some(ID), Some(UID));
        assert!(m(UID), "pod UID as kubectl prints it");
        assert!(m(&ID[..12]), "short container id");
        assert!(m("besteffort"));
        assert!(m("/kubepods.slice/*"));
        assert!(m(
            "*cri-containerd-????????????????????????????????????????????????????????????????.scope"
        ));
        assert!(!m("/kubepods.slice/?"), "a glob must match the whole path");
        assert!(!m("burstable"));
        assert!(!m("*docker-*"));
        assert!(!matches(UID, "/user.slice", None, None));
        // Polynomial, not exponential, on hostile patterns.
        let s = "a".repeat(5000);
        assert!(!glob(
            format!("{}b", "*a".repeat(50)).as_bytes(),
            s.as_bytes()
        ));
        assert!(glob(b"*", b""));
        assert!(!glob(b"?", b""));
    }
}
