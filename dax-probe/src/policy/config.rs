//! The policy file (TOML): what to do with the holders of a departing device.
//!
//! ```toml
//! [default]                 # every device
//! action = "report"         # or "signal"
//! signal = "TERM"           # first signal
//! grace = "10s"             # time to leave before escalating
//! escalate = "KILL"         # optional second signal
//! exclude = ["sshd", "pid:1234"]
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
}

impl Default for Rule {
    fn default() -> Self {
        Self {
            action: Action::Report,
            signal: Signal(libc::SIGTERM),
            grace: Duration::from_secs(10),
            escalate: Some(Signal(libc::SIGKILL)),
            exclude: Vec::new(),
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
    if let Some(s) = &r.signal {
        out.signal = s
            .get_ref()
            .parse()
            .map_err(|e: super::signal::BadSignal| err(s, "signal", e.to_string()))?;
    }
    if let Some(g) = &r.grace {
        out.grace = parse_duration(g.get_ref()).ok_or_else(|| {
            err(
                g,
                "grace",
                format!(
                    "bad duration {:?}: use e.g. \"10s\", \"500ms\", \"2m\"",
                    g.get_ref()
                ),
            )
        })?;
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
    if out.action == Action::Signal && out.grace.is_zero() && out.escalate.is_none() {
        let at = r.grace.as_ref().or(r.action.as_ref());
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
    fn zero_grace_without_escalation_is_refused() {
        let e = parse(
            "[default]\naction = \"signal\"\ngrace = \"0s\"\nescalate = \"none\"\n",
            "p.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "default.grace"));
    }
}
