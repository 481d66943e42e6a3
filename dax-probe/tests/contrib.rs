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

const DAEMONSET: &str = include_str!("../../contrib/kubernetes/daemonset.yaml");

/// The value of `Key=` in the unit, continuation lines joined.
fn unit_value(key: &str) -> String {
    let prefix = format!("{key}=");
    let mut lines = UNIT.lines().skip_while(|l| !l.starts_with(&prefix));
    let mut v = String::new();
    for l in &mut lines {
        let l = l.strip_prefix(&prefix).unwrap_or(l);
        v.push_str(l.trim_end_matches('\\').trim());
        v.push(' ');
        if !l.ends_with('\\') {
            break;
        }
    }
    v.trim().to_string()
}

#[test]
fn daemonset_runs_the_unit_s_agent_with_exactly_its_privileges() {
    use serde_yaml_ng::Value;
    let d: Value = serde_yaml_ng::from_str(DAEMONSET).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d["kind"].as_str(), Some("DaemonSet"));
    let pod = &d["spec"]["template"]["spec"];
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        d["spec"]["selector"]["matchLabels"], *labels,
        "the selector picks the template's pods"
    );
    // Only pmem nodes, by the documented label.
    assert_eq!(
        pod["nodeSelector"]["dax-probe.io/pmem"].as_str(),
        Some("true")
    );
    assert!(DAEMONSET.contains("kubectl label node NODE dax-probe.io/pmem=true"));
    // Every process of the node, as the unit sees them.
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // Capabilities: the unit's bounding set, no more, no less; no privilege escalation.
    let sc = &c["securityContext"];
    let mut added: Vec<String> = sc["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities added")
        .iter()
        .map(|v| format!("CAP_{}", v.as_str().unwrap()))
        .collect();
    added.sort();
    let mut unit_caps: Vec<String> = unit_value("CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    unit_caps.sort();
    assert_eq!(added, unit_caps);
    assert_eq!(
        sc["capabilities"]["drop"].as_sequence().map(|s| s.len()),
        Some(1)
    );
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(unit_value("NoNewPrivileges"), "yes");
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(unit_value("ProtectSystem"), "strict");
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));

    // The same command line as the unit (the metrics port added).
    let mut argv: Vec<String> = c["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(c["args"].as_sequence().unwrap())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let exec: Vec<String> = unit_value("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let metrics = argv.split_off(exec.len());
    assert_eq!(argv, exec, "the unit's ExecStart");
    assert_eq!(metrics, ["--metrics", "0.0.0.0:9464"]);
    let ports = c["ports"].as_sequence().expect("ports");
    assert!(
        ports.iter().any(|p| p["name"].as_str() == Some("metrics")
            && p["containerPort"].as_u64() == Some(9464)
            && p["protocol"].as_str() == Some("TCP")),
        "{ports:?}"
    );

    // The mounts: what the agent reads and writes, from the host, each from a volume.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let host_path = |name: &str| -> Option<String> {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .and_then(|v| v["hostPath"]["path"].as_str().map(str::to_string))
    };
    let mounts: Vec<(String, Option<String>)> = c["volumeMounts"]
        .as_sequence()
        .expect("volume mounts")
        .iter()
        .map(|m| {
            let name = m["name"].as_str().unwrap();
            assert!(
                volumes.iter().any(|v| v["name"].as_str() == Some(name)),
                "no volume {name}"
            );
            (
                m["mountPath"].as_str().unwrap().to_string(),
                host_path(name),
            )
        })
        .collect();
    // The unit's own directories: socket (RuntimeDirectory), audit log (LogsDirectory),
    // policy (ConfigurationDirectory), and the agent's state.
    let dirs = [
        format!("/run/{}", unit_value("RuntimeDirectory")),
        format!("/var/log/{}", unit_value("LogsDirectory")),
        "/var/lib/dax-probe".to_string(),
    ];
    for path in ["/sys", "/sys/fs/bpf", "/dev"]
        .into_iter()
        .map(str::to_string)
        .chain(dirs)
    {
        assert!(
            mounts
                .iter()
                .any(|(m, h)| *m == path && h.as_deref() == Some(path.as_str())),
            "{path} is not the host's: {mounts:?}"
        );
    }
    let conf = format!("/etc/{}", unit_value("ConfigurationDirectory"));
    assert!(mounts.iter().any(|(m, _)| *m == conf), "{conf}");
    assert!(
        argv.iter().any(|a| a.starts_with(&conf)),
        "the policy is read from {conf}"
    );
    assert!(
        argv.iter().any(|a| a.starts_with("/var/log/dax-probe/")),
        "the audit log is written to the mounted log directory"
    );
}
