//! `dax-probe badblocks [DEVICE]`: every known bad range of every pmem/dax device, where it
//! is in physical memory, the files (and offsets) or the free space / metadata it lies
//! under, and the processes that map it now.
//!
//! Holders come from the running monitor's live map over its control socket when one
//! answers (as `holders` does), else from one scan of every process's page tables (root).
//! Exit: 0 answered; 65 a list could not be read or parsed (named on stderr; every other
//! list is still answered); 66 no such device; 77 not root and no monitor to ask, when a
//! range has pfns whose holders are wanted.

use std::{io::Write, path::Path};

use crate::{
    badblocks::{self, MediaError, locate::LiveSpace},
    control::{self, Request},
    exit::{Code, Failure},
    holders::{
        Applier,
        query::{HolderRow, rows},
        scan::LiveProc,
    },
    privilege,
    schema::Line,
    topology::Topology,
};

pub struct Options<'a> {
    pub device: Option<&'a str>,
    pub json: bool,
    pub socket: &'a Path,
    pub root: &'a Path,
}

/// Where holders come from: the monitor, one scan, or nowhere (and why).
enum HolderSource {
    Monitor,
    Scan(Box<Applier>),
    None(String),
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    let topo = Topology::read(o.root);
    let only = o.device.map(|d| d.strip_prefix("/dev/").unwrap_or(d));
    if let Some(d) = only
        && !badblocks::knows_device(o.root, &topo, d)
    {
        return Err(Failure::new(
            Code::NoInput,
            format!(
                "no pmem/dax device, namespace or region named {d:?} (see `dax-probe devices`)"
            ),
        )
        .into());
    }
    let (placed, unreadable) = badblocks::read(o.root, &topo, only);
    let mut source = if placed.iter().all(|p| p.pfns().is_none()) {
        HolderSource::None("no range with a known physical address".into())
    } else if control::ask(o.socket, &Request::Stats)?.is_some() {
        HolderSource::Monitor
    } else if privilege::can_read_pagemap() {
        let mut a = Applier::new(Box::new(LiveProc::new(o.root)));
        a.reconcile(&topo);
        HolderSource::Scan(Box::new(a))
    } else {
        return Err(Failure::new(
            Code::NoPermission,
            "naming the processes that map bad media reads their page tables \
             (/proc/PID/pagemap) and the devices' physical ranges: run with sudo, or start \
             `sudo dax-probe monitor` and ask it",
        )
        .into());
    };
    let mut reports: Vec<MediaError> = Vec::new();
    for p in &placed {
        let mut holders = |a: u64, b: u64| holders_of(&mut source, &topo, o.socket, a, b);
        reports.push(badblocks::describe(p, &topo, &LiveSpace, &mut holders));
    }
    print(&reports, o)?;
    for u in &unreadable {
        eprintln!("dax-probe: {u}; the other badblocks lists are answered above");
    }
    if let Some(u) = unreadable.first() {
        return Err(Failure::new(
            Code::DataErr,
            format!(
                "{} badblocks list(s) could not be read: {u}{}",
                unreadable.len(),
                if unreadable.len() > 1 { ", …" } else { "" }
            ),
        )
        .into());
    }
    Ok(())
}

fn holders_of(
    source: &mut HolderSource,
    topo: &Topology,
    socket: &Path,
    a: u64,
    b: u64,
) -> Result<Vec<HolderRow>, String> {
    match source {
        HolderSource::None(why) => Err(why.clone()),
        HolderSource::Scan(app) => {
            let sel = app.map.in_pfn_range(a, b);
            let mut r = rows(&app.map, &sel, false);
            app.name_files(&mut r, topo);
            Ok(r)
        }
        HolderSource::Monitor => {
            let req = Request::Holders {
                target: format!("{a:#x}-{b:#x}"),
                pages: false,
            };
            match control::ask(socket, &req) {
                Ok(Some(resp)) if resp.ok && control::answer_is_current(&resp) => Ok(resp.rows),
                Ok(Some(resp)) if resp.ok => Err(resp.behind.unwrap_or_default()),
                Ok(Some(resp)) => Err(resp.error.unwrap_or_default()),
                Ok(None) => Err("the monitor stopped answering".into()),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

fn print(reports: &[MediaError], o: &Options) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if o.json {
        for m in reports {
            writeln!(out, "{}", Line::MediaError(m.clone()).to_json())?;
        }
        return Ok(());
    }
    if reports.is_empty() {
        writeln!(
            out,
            "no known bad media{}",
            o.device.map(|d| format!(" on {d}")).unwrap_or_default()
        )?;
        return Ok(());
    }
    for m in reports {
        writeln!(out, "{} ({})", m.name(), m.list)?;
        if let (Some(p), Some((a, b))) = (m.phys, m.pfns) {
            writeln!(
                out,
                "  physical {:#x}-{:#x}, pfn {a:#x}-{b:#x}{}",
                p.start,
                p.end,
                m.namespace
                    .as_deref()
                    .map(|n| format!(", {n}"))
                    .unwrap_or_default()
            )?;
        }
        for f in &m.files {
            writeln!(
                out,
                "  file {} offset {:#x}-{:#x}{}",
                f.path,
                f.offset,
                f.end,
                if f.shared { " (shared extent)" } else { "" }
            )?;
        }
        for s in &m.space {
            let kind = match s.kind {
                badblocks::locate::SpaceKind::Free => "free space",
                badblocks::locate::SpaceKind::Metadata => "file system metadata",
                badblocks::locate::SpaceKind::Unknown => "in no file",
            };
            writeln!(
                out,
                "  {kind}: device bytes {:#x}-{:#x} ({})",
                s.dev_offset, s.dev_end, s.what
            )?;
        }
        if m.holders.is_empty() {
            writeln!(out, "  mapped by nobody")?;
        }
        for h in &m.holders {
            writeln!(
                out,
                "  mapped by {} {} ({}, {} page(s))",
                h.pid,
                h.comm,
                h.file.as_deref().unwrap_or("?"),
                h.pages
            )?;
        }
        for n in &m.notes {
            writeln!(out, "  note: {n}")?;
        }
    }
    Ok(())
}
