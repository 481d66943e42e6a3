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
    pub socket: &'a Path,
    pub root: &'a Path,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
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
        let target = resp.target.clone().unwrap_or(Target::All);
        print(&resp.rows, &target, "monitor", Some(resp.elapsed_us), o)?;
        return found(&resp.rows);
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
    let rows = scan(&target, &topo, o)?;
    print(&rows, &target, "scan", None, o)?;
    found(&rows)
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
    let mut out = std::io::stdout().lock();
    if o.json {
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({"target": target, "source": source, "agent_us": agent_us,
                                "holders": rows}),
        )?;
        writeln!(out)?;
        return Ok(());
    }
    if rows.is_empty() {
        writeln!(out, "no process maps {} ({source})", o.target)?;
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
    Ok(())
}
