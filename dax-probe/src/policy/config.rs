//! The policy file (TOML): what to do with the holders of a departing device.
//!
//! ```toml
//! [default]                 # every device
//! action = "report"         # or "signal"
//! signal = "TERM"           # first signal
//! grace = "10s"             # time to leave before escalating
//! escalate = "KILL"         # optional second signal
//! exclude = ["sshd", "pid:1234"]
//! guard = "off"             # or "refuse-unbind": while the device has holders, a sysfs
//!                           # unbind of it fails with EBUSY (BPF LSM; see unbind_guard.rs)
//!
//! [device.pmem1]            # by device name (pmem1, dax0.0, namespace1.0, pfn1.0)
//! action = "signal"
//! signal = "BUS"
//! grace = "0s"
//! escalate = "KILL"
//! ```
//!
//! Errors name the line and the field.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::signal::{Signal, parse_duration};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Report holders only (the default).
    Report,
    /// Signal holders.
    Signal,
}

/// The unbind guard for a device (`guard = ...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Guard {
    /// Unbinds go through as the kernel does them (the default).
    #[default]
    Off,
    /// While the device has holders, a write to an nd/dax driver's `unbind` file naming it
    /// fails with EBUSY (the agent's own, from `drain --unbind`, passes).
    RefuseUnbind,
}

/// Who must never be signalled by policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exclusion {
    Comm(String),
    Pid(u32),
}

impl Exclusion {
    pub fn matches(&self, pid: u32, comm: &str) -> bool {
        match self {
            Exclusion::Comm(c) => c == comm,
            Exclusion::Pid(p) => *p == pid,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub signal: Signal,
    pub grace: Duration,
    pub escalate: Option<Signal>,
    pub exclude: Vec<Exclusion>,
    /// What a newly known bad media range does to the processes that map it
    /// (`on_media_error`): report them (the default), or signal them as `signal`, `grace`
    /// and `escalate` say, through the same pipeline as a departure.
    pub on_media_error: Action,
    pub guard: Guard,
}

impl Default for Rule {
    fn default() -> Self {
        Self {
            action: Action::Report,
            signal: Signal(libc::SIGTERM),
            grace: Duration::from_secs(10),
            escalate: Some(Signal(libc::SIGKILL)),
            exclude: Vec::new(),
            on_media_error: Action::Report,
            guard: Guard::Off,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub default: Rule,
    /// By device name.
    pub devices: BTreeMap<String, Rule>,
}

impl Policy {
    /// The rule for a device known by any of `names`.
    pub fn rule_for(&self, names: &[&str]) -> &Rule {
        names
            .iter()
            .find_map(|n| self.devices.get(*n))
            .unwrap_or(&self.default)
    }

    /// Does any rule ask for the unbind guard?
    pub fn wants_guard(&self) -> bool {
        self.default.guard != Guard::Off || self.devices.values().any(|r| r.guard != Guard::Off)
    }

    /// `[device.X]` sections naming no device of `topo` (by any of its names): the rule
    /// would never apply. Warned about, not refused: a device may be created later.
    pub fn unknown_devices(&self, topo: &crate::topology::Topology) -> Vec<&str> {
        self.devices
            .keys()
            .map(String::as_str)
            .filter(|name| {
                !topo.namespaces.iter().any(|n| {
                    n.name == *name
                        || n.device_name() == *name
                        || n.holder.as_deref() == Some(name)
                        || n.region == *name
                        || n.chardev.as_ref().is_some_and(|(c, _)| c == name)
                })
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {field}: {message}")]
pub struct PolicyError {
    pub file: String,
    /// 1-based; 0 when the problem has no single line.
    pub line: usize,
    pub field: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: Option<RawRule>,
    #[serde(default)]
    device: BTreeMap<String, RawRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: Option<Spanned<String>>,
    signal: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    escalate: Option<Spanned<String>>,
    exclude: Option<Vec<Spanned<String>>>,
    on_media_error: Option<Spanned<String>>,
    guard: Option<Spanned<String>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        file: path.display().to_string(),
        line: 0,
        field: "-".into(),
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, &path.display().to_string())
}

pub fn parse(text: &str, file: &str) -> Result<Policy, PolicyError> {
    let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError {
        file: file.into(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(0),
        field: "syntax".into(),
        message: e.message().to_string(),
    })?;
    let default = rule(
        &raw.default.unwrap_or_default(),
        &Rule::default(),
        "default",
        text,
        file,
    )?;
    let mut devices = BTreeMap::new();
    for (name, r) in &raw.device {
        devices.insert(
            name.clone(),
            rule(r, &default, &format!("device.{name}"), text, file)?,
        );
    }
    Ok(Policy { default, devices })
}

fn rule(
    r: &RawRule,
    base: &Rule,
    section: &str,
    text: &str,
    file: &str,
) -> Result<Rule, PolicyError> {
    let err = |s: &Spanned<String>, field: &str, message: String| PolicyError {
        file: file.into(),
        line: line_of(text, s.span().start),
        field: format!("{section}.{field}"),
        message,
    };
    let mut out = base.clone();
    if let Some(a) = &r.action {
        out.action = match a.get_ref().as_str() {
            "report" => Action::Report,
            "signal" => Action::Signal,
            other => {
                return Err(err(
                    a,
                    "action",
                    format!("unknown action {other:?}: use \"report\" or \"signal\""),
                ));
            }
        };
    }
    if let Some(a) = &r.on_media_error {
        out.on_media_error = match a.get_ref().as_str() {
            "report" => Action::Report,
            "signal" => Action::Signal,
            other => {
                return Err(err(
                    a,
                    "on_media_error",
                    format!("unknown action {other:?}: use \"report\" or \"signal\""),
                ));
            }
        };
    }
    if let Some(s) = &r.signal {
        out.signal = s
            .get_ref()
            .parse()
            .map_err(|e: super::signal::BadSignal| err(s, "signal", e.to_string()))?;
    }
    if let Some(g) = &r.grace {
        out.grace = parse_duration(g.get_ref()).map_err(|e| err(g, "grace", e))?;
    }
    if let Some(e) = &r.escalate {
        out.escalate = match e.get_ref().as_str() {
            "" | "none" => None,
            s => Some(
                s.parse()
                    .map_err(|x: super::signal::BadSignal| err(e, "escalate", x.to_string()))?,
            ),
        };
    }
    if let Some(list) = &r.exclude {
        out.exclude = list
            .iter()
            .map(|x| match x.get_ref().strip_prefix("pid:") {
                Some(p) => p
                    .parse()
                    .map(Exclusion::Pid)
                    .map_err(|_| err(x, "exclude", format!("bad pid in {:?}", x.get_ref()))),
                None => Ok(Exclusion::Comm(x.get_ref().clone())),
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(g) = &r.guard {
        out.guard = match g.get_ref().as_str() {
            "off" => Guard::Off,
            "refuse-unbind" => Guard::RefuseUnbind,
            other => {
                return Err(err(
                    g,
                    "guard",
                    format!("unknown guard {other:?}: use \"refuse-unbind\" or \"off\""),
                ));
            }
        };
    }
    if (out.action == Action::Signal || out.on_media_error == Action::Signal)
        && out.grace.is_zero()
        && out.escalate.is_none()
    {
        let at = r
            .grace
            .as_ref()
            .or(r.action.as_ref())
            .or(r.on_media_error.as_ref());
        return Err(PolicyError {
            file: file.into(),
            line: at.map(|s| line_of(text, s.span().start)).unwrap_or(0),
            field: format!("{section}.grace"),
            message: "grace 0 with no escalation: nothing would wait for holders to leave; \
                      set a grace period or an escalate signal"
                .into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_media_error_defaults_to_report_and_is_checked() {
        let p = parse("[default]\n", "p.toml").unwrap();
        assert_eq!(p.default.on_media_error, Action::Report);
        let p = parse(
            "[default]\non_media_error = \"signal\"\nsignal = \"BUS\"\n[device.pmem1]\naction = \"signal\"\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.default.on_media_error, Action::Signal);
        assert_eq!(p.rule_for(&["pmem1"]).on_media_error, Action::Signal);
        let e = parse("[default]\non_media_error = \"kill\"\n", "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "default.on_media_error"));
        assert!(e.message.contains("\"report\" or \"signal\""), "{e}");
        let e = parse(
            "[default]\non_media_error = \"signal\"\ngrace = \"0s\"\nescalate = \"none\"\n",
            "p.toml",
        )
        .unwrap_err();
        assert_eq!(e.field, "default.grace");
    }

    #[test]
    fn defaults_and_per_device_rules() {
        let p = parse(
            r#"
[default]
action = "report"
exclude = ["sshd", "pid:42"]

[device.pmem1]
action = "signal"
signal = "BUS"
grace = "0s"
escalate = "KILL"
"#,
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.default.action, Action::Report);
        let r = p.rule_for(&["namespace1.0", "pmem1"]);
        assert_eq!(r.action, Action::Signal);
        assert_eq!(r.signal, Signal(libc::SIGBUS));
        assert!(r.grace.is_zero());
        // Inherited from [default].
        assert_eq!(
            r.exclude,
            vec![Exclusion::Comm("sshd".into()), Exclusion::Pid(42)]
        );
        assert_eq!(p.rule_for(&["pmem0"]).action, Action::Report);
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = parse(
            "[default]\naction = \"signal\"\nsignal = \"SIGFOO\"\n",
            "p.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "default.signal"));
        assert!(
            e.to_string()
                .starts_with("p.toml:3: default.signal: unknown signal")
        );

        let e = parse("[device.pmem0]\ngrace = \"soon\"\n", "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "device.pmem0.grace"));

        let e = parse("[default]\naction = \"nuke\"\n", "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "default.action"));

        let e = parse("[default]\nactoin = \"signal\"\n", "p.toml").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("unknown field"), "{e}");

        let e = parse("[default\n", "p.toml").unwrap_err();
        assert_eq!(e.field, "syntax");
    }

    #[test]
    fn a_grace_too_long_for_a_clock_is_refused_at_load() {
        let e = parse("[default]\ngrace = \"1e19s\"\n", "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "default.grace"));
        assert!(e.message.contains("too long"), "{}", e.message);
    }

    #[test]
    fn the_guard_is_off_by_default_and_set_per_device_or_default() {
        let p = parse("[default]\naction = \"report\"\n", "p.toml").unwrap();
        assert_eq!(p.default.guard, Guard::Off);
        assert!(!p.wants_guard());

        let p = parse(
            "[device.pmem0]\nguard = \"refuse-unbind\"\n[device.pmem1]\naction = \"report\"\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.rule_for(&["pmem0"]).guard, Guard::RefuseUnbind);
        assert_eq!(p.rule_for(&["pmem1"]).guard, Guard::Off);
        assert_eq!(p.rule_for(&["pmem2"]).guard, Guard::Off);
        assert!(p.wants_guard());

        // From [default], inherited, and switched off again for one device.
        let p = parse(
            "[default]\nguard = \"refuse-unbind\"\n[device.pmem1]\nguard = \"off\"\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.rule_for(&["pmem0"]).guard, Guard::RefuseUnbind);
        assert_eq!(p.rule_for(&["pmem1"]).guard, Guard::Off);
    }

    #[test]
    fn a_bad_guard_names_its_line_and_field() {
        let e = parse(
            "[default]\naction = \"report\"\n\n[device.pmem0]\nguard = \"refuse\"\n",
            "p.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (5, "device.pmem0.guard"));
        assert!(e.message.contains("refuse-unbind"), "{e}");
        let e = parse("[default]\nguard = true\n", "p.toml").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn sections_naming_no_device_are_listed() {
        let topo = crate::os::fake::topology(&["/mnt/pmem0"]);
        let p = parse(
            "[device.pmem0]\nguard = \"refuse-unbind\"\n[device.pmem7]\nguard = \"refuse-unbind\"\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.unknown_devices(&topo), vec!["pmem7"]);
    }

    #[test]
    fn zero_grace_without_escalation_is_refused() {
        let e = parse(
            "[default]\naction = \"signal\"\ngrace = \"0s\"\nescalate = \"none\"\n",
            "p.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "default.grace"));
    }
}
