//! The files in contrib/ are what operators copy: they must be valid for this version.

use std::time::Duration;

use dax_probe::policy::{Action, config::Exclusion, config::parse, signal::Signal};

const POLICY: &str = include_str!("../../contrib/policy.toml");
const UNIT: &str = include_str!("../../contrib/dax-probe.service");

#[test]
fn example_policy_parses_as_documented() {
    let p = parse(POLICY, "contrib/policy.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.default.action, Action::Report);
    assert_eq!(p.default.signal, Signal(libc::SIGTERM));
    assert_eq!(p.default.grace, Duration::from_secs(10));
    assert_eq!(p.default.escalate, Some(Signal(libc::SIGKILL)));
    assert_eq!(
        p.default.exclude,
        vec![
            Exclusion::Comm("sshd".into()),
            Exclusion::Comm("systemd-journal".into())
        ]
    );
    let pmem1 = p.rule_for(&["namespace1.0", "pmem1"]);
    assert_eq!(pmem1.action, Action::Signal);
    assert_eq!(pmem1.signal, Signal(libc::SIGBUS));
    assert_eq!(pmem1.grace, Duration::from_secs(2));
    assert_eq!(pmem1.exclude, p.default.exclude, "inherited from [default]");
    let dax = p.rule_for(&["dax0.0"]);
    assert_eq!(dax.escalate, None);
    assert_eq!(dax.exclude, vec![Exclusion::Pid(1234)]);
    assert_eq!(p.rule_for(&["pmem7"]).action, Action::Report);
}

#[test]
fn service_runs_the_enforcing_monitor_with_the_capabilities_it_needs() {
    let exec: String = UNIT
        .lines()
        .skip_while(|l| !l.starts_with("ExecStart="))
        .take_while(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    for arg in [
        "monitor",
        "--enforce",
        "--policy /etc/dax-probe/policy.toml",
    ] {
        assert!(exec.contains(arg), "ExecStart lacks {arg}: {exec}");
    }
    let caps = UNIT
        .lines()
        .find(|l| l.starts_with("CapabilityBoundingSet="))
        .expect("a capability bounding set");
    for cap in [
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_ADMIN",
        "CAP_KILL",
        "CAP_SYS_PTRACE",
    ] {
        assert!(
            caps.split_whitespace().any(|c| c.ends_with(cap)),
            "{caps} lacks {cap}"
        );
    }
    let filter = UNIT
        .lines()
        .find(|l| l.starts_with("SystemCallFilter="))
        .expect("a syscall filter");
    for call in ["bpf", "perf_event_open", "pidfd_send_signal"] {
        assert!(
            filter.split_whitespace().any(|c| c == call),
            "{filter} lacks {call}"
        );
    }
}
