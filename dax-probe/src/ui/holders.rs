//! `dax-probe holders TARGET`: who maps a device, a file, a mount or a pfn right now.
//!
//! Asks the running monitor over its control socket when there is one (an exact, instant
//! answer from the live map); otherwise, or with `--scan`, reads every process's page tables
//! itself. Both print the same rows.

use std::{io::Write, path::Path};

use crate::{
    control::{self, Request},
    exit::{Code, Failure},
    holders::{
        Applier,
        query::{self, HolderRow, Target, rows, select},
        scan::LiveProc,
    },
    privilege,
    topology::Topology,
    ui::devices::human,
};

pub struct Options<'a> {
    pub target: &'a str,
    pub json: bool,
    pub pages: bool,
    pub scan: bool,
    /// `--cgroup PATTERN`: only rows of processes whose cgroup matches.
    pub cgroup: Option<&'a str>,
    pub socket: &'a Path,
    pub root: &'a Path,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    if o.cgroup.is_some_and(|p| p.is_empty()) {
        return Err(Failure::new(
            Code::Usage,
            "--cgroup needs a pattern: part of a cgroup path, a container id or a pod UID, \
             or a glob on the path (`/kubepods.slice/*`)",
        )
        .into());
    }
    // The running monitor resolves the target itself and answers from its live map: the
    // client does no procfs or sysfs work at all.
    if !o.scan
        && let Some(resp) = control::ask(
            o.socket,
            &Request::Holders {
                target: o.target.to_string(),
                pages: o.pages,
            },
        )?
    {
        if !resp.ok {
            let code = match resp.code {
                Some(66) => Code::NoInput,
                _ => Code::Software,
            };
            return Err(Failure::new(code, resp.error.unwrap_or_default()).into());
        }
        if control::answer_is_current(&resp) {
            let target = resp.target.clone().unwrap_or(Target::All);
            let rows = in_cgroup(resp.rows, o.cgroup);
            print(&rows, &target, "monitor", Some(resp.elapsed_us), o)?;
            return found(&rows);
        }
        // Behind the kernel: its rows could miss a holder; read the page tables instead.
        eprintln!(
            "dax-probe: {}; scanning page tables instead",
            resp.behind.unwrap_or_default()
        );
    }
    // No monitor to ask: we read page tables ourselves, which needs root (and so does
    // reading the devices' physical ranges).
    if !privilege::can_read_pagemap() {
        return Err(Failure::new(
            Code::NoPermission,
            "reading other processes' page tables (/proc/PID/pagemap) needs root: run with \
             sudo, or start `sudo dax-probe monitor` and ask it",
        )
        .into());
    }
    let topo = Topology::read(o.root);
    let target = query::resolve(o.target, &topo, o.root)
        .map_err(|e| Failure::new(Code::NoInput, e.to_string()))?;
    let rows = in_cgroup(scan(&target, &topo, o)?, o.cgroup);
    print(&rows, &target, "scan", None, o)?;
    found(&rows)
}

/// The rows `--cgroup` selects. Filtered here, on whichever side answered, so the monitor
/// and the scan select alike (and a monitor of an older version, which knows no cgroups,
/// yields no rows rather than every row).
fn in_cgroup(rows: Vec<HolderRow>, pattern: Option<&str>) -> Vec<HolderRow> {
    match pattern {
        None => rows,
        Some(p) => rows.into_iter().filter(|r| r.in_cgroup(p)).collect(),
    }
}

/// Exit 1 when nobody maps the target (like grep: scripts can test it).
fn found(rows: &[HolderRow]) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Err(Failure::new(Code::Findings, String::new()).into());
    }
    Ok(())
}

fn scan(target: &Target, topo: &Topology, o: &Options) -> anyhow::Result<Vec<HolderRow>> {
    let mut a = Applier::new(Box::new(LiveProc::new(o.root)));
    a.reconcile(topo);
    let sel = select(&a.map, target);
    let mut r = rows(&a.map, &sel, o.pages);
    a.name_files(&mut r, topo);
    Ok(r)
}

fn print(
    rows: &[HolderRow],
    target: &Target,
    source: &str,
    agent_us: Option<u64>,
    o: &Options,
) -> anyhow::Result<()> {
    // Buffered: stdout is line-buffered, and a thousand rows were a thousand writes.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let kernel = kernel_users_of(target, o.root);
    if o.json {
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({"target": target, "source": source, "agent_us": agent_us,
                                "holders": rows, "kernel_users": kernel}),
        )?;
        writeln!(out)?;
        out.flush()?;
        return Ok(());
    }
    for l in &kernel {
        writeln!(out, "kernel: {l}")?;
    }
    if rows.is_empty() {
        match o.cgroup {
            Some(p) => writeln!(
                out,
                "no process in a cgroup matching {p:?} maps {} ({source})",
                o.target
            )?,
            None => writeln!(out, "no process maps {} ({source})", o.target)?,
        }
        out.flush()?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>7} {:<15} {:<32} {:>8} {:>9}  OFFSETS",
        "PID", "COMM", "FILE", "PAGES", "SIZE"
    )?;
    for r in rows {
        let file = r
            .file
            .clone()
            .unwrap_or_else(|| format!("dev {} ino {}", r.dev, r.ino));
        let offs: Vec<String> = r
            .offsets
            .iter()
            .map(|(s, e)| format!("{s:#x}-{e:#x}"))
            .collect();
        writeln!(
            out,
            "{:>7} {:<15} {:<32} {:>8} {:>9}  {}",
            r.pid,
            r.comm,
            file,
            r.pages,
            human(r.pages * 4096),
            offs.join(",")
        )?;
        if let Some(w) = workload_line(r) {
            writeln!(out, "{:>7}   {w}", "")?;
        }
        if let Some(ex) = &r.extents {
            for e in ex {
                writeln!(
                    out,
                    "{:>7}   vaddr {:#x} pfn {:#x} offset {:#x} pages {}",
                    "", e.vaddr, e.pfn, e.offset, e.pages
                )?;
            }
        }
    }
    writeln!(out, "({} rows, from the {source})", rows.len())?;
    out.flush()?;
    Ok(())
}

/// The kernel's own users of a device target (dm devices, file systems through dm, XFS
/// realtime roles), read from sysfs and mountinfo here on whichever side answered: they are
/// listed beside the processes, never counted as holders.
fn kernel_users_of(target: &Target, root: &Path) -> Vec<String> {
    let Target::Device { name, .. } = target else {
        return Vec::new();
    };
    let topo = Topology::read(root);
    topo.namespaces
        .iter()
        .find(|n| n.device_name() == name)
        .map(|ns| crate::ui::devices::kernel_users(&topo, ns))
        .unwrap_or_default()
}

/// ` in pod UID` or ` in container RUNTIME:SHORTID`, or nothing: for one-line reports.
pub fn in_workload(
    pod_uid: Option<&str>,
    container: Option<&crate::proc::cgroup::Container>,
) -> String {
    match (pod_uid, container) {
        (Some(uid), _) => format!(" in pod {uid}"),
        (None, Some(c)) => format!(" in container {}:{}", c.runtime.as_str(), &c.id[..12]),
        (None, None) => String::new(),
    }
}

/// `pod UID container RUNTIME:ID cgroup PATH`, what of it is known; None without a cgroup.
pub fn workload_line(r: &HolderRow) -> Option<String> {
    let path = r.cgroup.as_deref()?;
    let mut w = Vec::new();
    if let Some(uid) = &r.pod_uid {
        w.push(format!("pod {uid}"));
    }
    if let Some(c) = &r.container {
        // The short id, as `docker ps` and `crictl ps` print it.
        w.push(format!("container {}:{}", c.runtime.as_str(), &c.id[..12]));
    }
    w.push(format!("cgroup {}", crate::proc::cgroup::display(path)));
    Some(w.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::cgroup::parse_path;

    fn row(pid: u32, cgroup: Option<&str>) -> HolderRow {
        let mut r = HolderRow {
            pid,
            start_time: 1,
            comm: "db".into(),
            dev: crate::topology::DevId {
                major: 259,
                minor: 0,
            },
            ino: 12,
            file: None,
            pages: 1,
            offsets: vec![(0, 4096)],
            extents: None,
            probe_at: Vec::new(),
            cgroup: None,
            container: None,
            pod_uid: None,
        };
        if let Some(p) = cgroup {
            r.set_cgroup(&parse_path(p));
        }
        r
    }

    #[test]
    fn cgroup_filter_and_line() {
        let id = "ab".repeat(32);
        let pod = row(
            1,
            Some(&format!(
                "/kubepods.slice/kubepods-pod1b2c3d4e_5f60_4a7b_8c9d_0e1f2a3b4c5d.slice/crio-{id}.scope"
            )),
        );
        let plain = row(2, Some("/user.slice/x\x1b.scope"));
        let unknown = row(3, None);
        let pids = |r: Vec<HolderRow>| r.iter().map(|r| r.pid).collect::<Vec<_>>();
        let all = vec![pod.clone(), plain.clone(), unknown.clone()];
        assert_eq!(pids(in_cgroup(all.clone(), None)), [1, 2, 3]);
        let uid = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d";
        assert_eq!(pids(in_cgroup(all.clone(), Some(uid))), [1]);
        assert_eq!(pids(in_cgroup(all.clone(), Some(&id[..12]))), [1]);
        assert_eq!(pids(in_cgroup(all.clone(), Some("/user.slice/*"))), [2]);
        assert!(in_cgroup(all, Some("nothing")).is_empty());
        assert_eq!(
            workload_line(&pod).unwrap(),
            format!(
                "pod 1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d container crio:{} cgroup {}",
                &id[..12],
                pod.cgroup.as_deref().unwrap()
            )
        );
        // A name with an escape sequence reaches the terminal escaped.
        assert_eq!(
            workload_line(&plain).unwrap(),
            "cgroup /user.slice/x\\u{1b}.scope"
        );
        assert_eq!(workload_line(&unknown), None);
        assert_eq!(
            in_workload(pod.pod_uid.as_deref(), pod.container.as_ref()),
            " in pod 1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d"
        );
        let docker = row(4, Some(&format!("/docker/{id}")));
        assert_eq!(
            in_workload(None, docker.container.as_ref()),
            format!(" in container docker:{}", &id[..12])
        );
        assert_eq!(in_workload(None, None), "");
    }
}
