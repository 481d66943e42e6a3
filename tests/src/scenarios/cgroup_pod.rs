//! `cgroup-pod`: a holder in a cgroup laid out like a Kubernetes pod's container (kubelet's
//! systemd driver, containerd) and one in a cgroup that fits no layout. Their `holders`
//! rows — from the monitor's control socket and from the one-shot scan — must name the pod
//! UID and container id (the other: the plain path), and `holders --cgroup POD_UID` must
//! list exactly the pod's pages as the kernel's page tables have them.

use std::{collections::BTreeSet, path::Path, time::Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Checked, Env, Target};
use crate::{
    agent::{Monitor, run_once},
    pmem,
    puppet::{Huge, Puppet},
    sys,
    truth::{Page, kernel_pages},
};

const CGROOT: &str = "/sys/fs/cgroup";
const MIB: u64 = 1 << 20;
const PLAIN: &str = "/dax-probe-plain/app";

/// cgroup2 on /sys/fs/cgroup, mounted here when the guest has none (the VM init mounts
/// only proc, sys, dev, tmp). Returns whether we mounted it.
fn cgroup2() -> Result<bool> {
    if Path::new(CGROOT).join("cgroup.procs").exists() {
        return Ok(false);
    }
    sys::mount("cgroup2", CGROOT, "cgroup2", "")
        .context("this kernel offers no cgroup2 (every supported kernel should)")?;
    Ok(true)
}

/// `holders all --json --pages [--scan] [--cgroup P]`: (exit code, source, rows).
fn holders(scan: bool, cgroup: Option<&str>) -> Result<(Option<i32>, String, Vec<Value>)> {
    let mut args = vec!["holders", "all", "--json", "--pages"];
    if scan {
        args.push("--scan");
    }
    if let Some(p) = cgroup {
        args.extend(["--cgroup", p]);
    }
    let (code, out, err) = run_once(&args)?;
    if !matches!(code, Some(0) | Some(1)) {
        bail!("holders {args:?} exited {code:?}: {}", err.trim());
    }
    let v: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("holders printed non-JSON: {out}"))?;
    Ok((
        code,
        v["source"].as_str().unwrap_or("?").to_string(),
        v["holders"].as_array().cloned().unwrap_or_default(),
    ))
}

fn pages_of(rows: &[Value]) -> BTreeSet<Page> {
    let mut set = BTreeSet::new();
    for row in rows {
        let pid = row["pid"].as_u64().unwrap_or(0) as u32;
        for ex in row["extents"].as_array().into_iter().flatten() {
            let vaddr = ex["vaddr"].as_u64().unwrap_or(0);
            let pfn = ex["pfn"].as_u64().unwrap_or(0);
            for i in 0..ex["pages"].as_u64().unwrap_or(0) {
                set.insert((pid, (vaddr >> 12) + i, pfn + i));
            }
        }
    }
    set
}

pub fn run(env: &Env, t: Target) -> Result<Checked> {
    let t0 = Instant::now();
    let fs = env.fs(t).with_context(|| format!("{t} not prepared"))?;
    let mounted = cgroup2()?;
    let uid = sys::uuid();
    let id: String = format!("{}{}", sys::uuid(), sys::uuid()).replace('-', "");
    let pod_dir = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    );
    let scope = format!("{pod_dir}/cri-containerd-{id}.scope");
    for d in [&scope, &PLAIN.to_string()] {
        std::fs::create_dir_all(format!("{CGROOT}{d}"))
            .with_context(|| format!("mkdir {CGROOT}{d}"))?;
    }
    let dir = format!("{}/cgroup", fs.mnt);
    std::fs::create_dir_all(&dir)?;
    let file = format!("{dir}/pod-data");
    pmem::write_file(Path::new(&file), (4 * MIB) as usize)?;

    let m = Monitor::start(&format!("cgroup-pod-{t}"), &[])?;
    // Each puppet enters its cgroup before it maps: the agent reads a process's cgroup
    // once, when it first reports it.
    let mut pod = Puppet::spawn()?;
    sys::write(
        format!("{CGROOT}{scope}/cgroup.procs"),
        &pod.pid.to_string(),
    )?;
    let mut plain = Puppet::spawn()?;
    sys::write(
        format!("{CGROOT}{PLAIN}/cgroup.procs"),
        &plain.pid.to_string(),
    )?;
    for p in [&mut pod, &mut plain] {
        let a = p.map(&file, 0, 2 * MIB, true, Huge::Pte)?;
        p.touch(a, 2 * MIB, false, 4096)?;
    }

    let mut notes = Vec::new();
    let mut require = |what: String, holds: bool| {
        if !holds {
            notes.push(format!("not true: {what}"));
        }
    };
    let truth = kernel_pages(&env.space())?;
    let pod_truth: BTreeSet<Page> = truth.iter().filter(|p| p.0 == pod.pid).copied().collect();
    require(
        format!(
            "the kernel maps pages of both puppets ({} pages)",
            truth.len()
        ),
        !pod_truth.is_empty() && truth.iter().any(|p| p.0 == plain.pid),
    );
    let mut counts = json!({"pod_pages": pod_truth.len(), "mounted_cgroup2": mounted});
    for scan in [false, true] {
        let want_source = if scan { "scan" } else { "monitor" };
        let (_, source, rows) = holders(scan, None)?;
        require(
            format!("answered by the {want_source}, not {source}"),
            source == want_source,
        );
        let row_of = |pid: u32| rows.iter().find(|r| r["pid"] == pid);
        match row_of(pod.pid) {
            Some(r) => {
                require(
                    format!("{want_source}: pod row names pod {uid}: {r}"),
                    r["pod_uid"] == uid.as_str(),
                );
                require(
                    format!("{want_source}: pod row names container {id} of containerd: {r}"),
                    r["container"]["id"] == id.as_str()
                        && r["container"]["runtime"] == "containerd",
                );
                require(
                    format!("{want_source}: pod row's cgroup is {scope}: {r}"),
                    r["cgroup"] == scope.as_str(),
                );
            }
            None => require(format!("{want_source}: a row for the pod puppet"), false),
        }
        match row_of(plain.pid) {
            Some(r) => require(
                format!("{want_source}: plain row shows {PLAIN} and no container or pod: {r}"),
                r["cgroup"] == PLAIN && r.get("container").is_none() && r.get("pod_uid").is_none(),
            ),
            None => require(format!("{want_source}: a row for the plain puppet"), false),
        }
        // The filter, by the pod UID as kubectl prints it: exactly the pod's pages.
        let (code, source, rows) = holders(scan, Some(&uid))?;
        let got = pages_of(&rows);
        require(
            format!(
                "{want_source} ({source}): --cgroup {uid} lists exactly the pod's {} pages \
                 (got {}, exit {code:?})",
                pod_truth.len(),
                got.len()
            ),
            got == pod_truth && code == Some(0),
        );
        // By the short container id too; a pattern nobody matches finds nothing (exit 1).
        let (_, _, rows) = holders(scan, Some(&id[..12]))?;
        require(
            format!(
                "{want_source}: --cgroup {} selects the pod's pages",
                &id[..12]
            ),
            pages_of(&rows) == pod_truth,
        );
        let (code, _, rows) = holders(scan, Some("no-such-pod-or-path"))?;
        require(
            format!("{want_source}: an unmatched pattern lists nothing and exits 1"),
            rows.is_empty() && code == Some(1),
        );
    }

    pod.exit()?;
    plain.exit()?;
    let out = m.stop()?;
    require(
        format!("agent exit {:?}: {}", out.exit_code, out.stderr.trim()),
        out.exit_code == Some(0),
    );
    // Leave the machine as found: the cgroups (now empty), and cgroup2 if we mounted it.
    for d in [
        scope.as_str(),
        pod_dir.as_str(),
        "/kubepods.slice/kubepods-besteffort.slice",
        "/kubepods.slice",
        PLAIN,
        "/dax-probe-plain",
    ] {
        let _ = std::fs::remove_dir(format!("{CGROOT}{d}"));
    }
    if mounted {
        let _ = sys::umount(CGROOT);
    }
    let _ = std::fs::remove_file(&file);
    let seconds = t0.elapsed().as_secs_f64();
    counts["seconds"] = json!(seconds);
    Ok(Checked {
        passed: notes.is_empty(),
        summary: format!(
            "pod {uid} container {}: {} pages; rows named them from the monitor and the scan: {}",
            &id[..12],
            pod_truth.len(),
            if notes.is_empty() { "yes" } else { "no" }
        ),
        counts,
        details: notes,
    })
}
