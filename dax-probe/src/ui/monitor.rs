//! `dax-probe monitor`: the live event stream, as text or JSON lines.

use std::{
    io::{BufWriter, Write},
    time::Duration,
};

use serde::Serialize;

use crate::{
    agent::{self, Agent, Output},
    event::{Event, Fault},
    incident::Report,
    probe::{KernelSource, plan::Concern},
};

pub struct Options {
    pub json: bool,
    /// Stop after this long (for scripts and benchmarks); otherwise until Ctrl-C/SIGTERM.
    pub duration: Option<Duration>,
    pub agent: agent::Options,
}

/// First line of `--json` output: what is attached.
#[derive(Serialize)]
struct Attached<'a> {
    r#type: &'static str,
    kernel: &'a str,
    hooks: Vec<HookLine>,
    holders: usize,
    holder_pages: u64,
}

#[derive(Serialize)]
struct HookLine {
    concern: Concern,
    chosen: Option<&'static str>,
    userspace: bool,
}

pub async fn run(src: &KernelSource, opts: Options) -> anyhow::Result<()> {
    let mut agent = Agent::start(src, &opts.agent)?;
    announce(&agent, opts.json);

    let mut out = BufWriter::new(std::io::stdout().lock());
    let json = opts.json;
    let mut sink = |o: Output| -> anyhow::Result<()> {
        if json {
            serde_json::to_writer(&mut out, &o)?;
            writeln!(out)?;
        } else if o.is_state() {
            return Ok(());
        } else {
            writeln!(out, "{}", format_output(&o))?;
        }
        // Whoever reads us (a pipe, a file, a terminal) sees each event promptly.
        out.flush()?;
        Ok(())
    };
    agent.run(opts.duration, &mut sink).await?;
    let summary = agent.summary();
    if json {
        serde_json::to_writer(&mut out, &summary)?;
        writeln!(out)?;
    }
    out.flush()?;
    drop(out);
    if !json {
        eprintln!(
            "dax-probe: {} events ({} faults) in {:.1} s; {} dropped (ring buffer full), \
             {} undecodable, {} kernel read errors; {} holders of {} pages; drift corrected \
             {}+/{}- pages",
            summary.events,
            summary.faults,
            summary.duration_s,
            summary.dropped,
            summary.undecodable,
            summary.kernel_read_errors,
            summary.holders,
            summary.holder_pages,
            summary.drift_missing,
            summary.drift_extra,
        );
    }
    if summary.dropped > 0 {
        eprintln!(
            "dax-probe: warning: {} events were lost because the ring buffer was full: the \
             reader fell behind a fault storm; raise --ring-size-kib or write to a file \
             (the holder map was repaired from procfs)",
            summary.dropped
        );
    }
    Ok(())
}

fn announce(agent: &Agent, json: bool) {
    let session = &agent.session;
    let userspace_pfn = session.pfn_from_userspace();
    if json {
        let line = Attached {
            r#type: "attached",
            kernel: &session.facts.release,
            holders: agent.applier.map.holder_count(),
            holder_pages: agent
                .applier
                .map
                .holders()
                .map(|(h, _)| agent.applier.map.pages_of(h))
                .sum(),
            hooks: session
                .probe
                .choices
                .iter()
                .map(|c| HookLine {
                    concern: c.concern,
                    chosen: c.chosen,
                    userspace: c.userspace,
                })
                .collect(),
        };
        // The attached line goes out before any event, so a reader knows we are live.
        let mut stdout = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut stdout, &line);
        let _ = writeln!(stdout);
        let _ = stdout.flush();
    }
    let hooks: Vec<String> = session
        .probe
        .choices
        .iter()
        .map(|c| {
            format!(
                "{}: {}",
                c.concern.name(),
                c.chosen.unwrap_or("unavailable")
            )
        })
        .collect();
    eprintln!(
        "dax-probe: watching DAX mappings on {} ({}); {} holders found; Ctrl-C to stop",
        session.facts.release,
        hooks.join(", "),
        agent.applier.map.holder_count()
    );
    for c in &session.probe.choices {
        for (label, why) in &c.failed {
            eprintln!(
                "dax-probe: note: {}: {label} did not work here ({why}); using {}",
                c.concern.name(),
                c.chosen.unwrap_or("nothing")
            );
        }
    }
    if userspace_pfn {
        eprintln!(
            "dax-probe: warning: no kernel hook reports pfns here; reading them from \
             /proc/PID/pagemap as events arrive (short-lived mappings may show no pfn)"
        );
    }
}

/// One text line per output.
pub fn format_output(o: &Output) -> String {
    match o {
        Output::Event(Event::Fault(f)) => format_fault(f),
        Output::Event(Event::Zap(z)) => format!(
            "{} {} {}/{} {:<15} dev={} ino={} addr={:#x}-{:#x} ({} pages){}",
            stamp(z.ts_ns),
            if z.cow { "cow  " } else { "unmap" },
            z.tgid,
            z.tid,
            z.comm,
            z.dev,
            z.ino,
            z.start,
            z.end,
            (z.end - z.start) / 4096,
            if z.exiting {
                " [exit/exec]"
            } else if !z.own_mm {
                " [another process's mapping]"
            } else {
                ""
            }
        ),
        Output::Event(Event::Fork(f)) => format!(
            "{} fork  {} {:<15} child {}",
            stamp(f.ts_ns),
            f.parent_tgid,
            f.comm,
            f.child_tgid
        ),
        Output::Event(Event::Mremap(m)) => format!(
            "{} mremap {} {:<15} {:#x}+{:#x} -> {:#x}+{:#x}",
            stamp(m.ts_ns),
            m.tgid,
            m.comm,
            m.old_addr,
            m.old_len,
            m.new_addr,
            m.new_len
        ),
        Output::Report(r) => format_report(r),
        Output::Action(a) => {
            let a = &a.action;
            format!(
                "enforce {} {} {} ({}) on {}: {}{}",
                a.action,
                a.signal.as_deref().unwrap_or("-"),
                a.pid,
                a.comm,
                a.device,
                a.reason,
                a.since_departure_us
                    .map(|us| format!(" [{:.1} ms after the departure]", us as f64 / 1000.0))
                    .unwrap_or_default()
            )
        }
        Output::Event(Event::Device(d)) => format!(
            "{} device {:?} {} driver {} bus {} by {} {}",
            stamp(d.ts_ns),
            d.phase,
            if d.device.is_empty() { "-" } else { &d.device },
            if d.driver.is_empty() { "-" } else { &d.driver },
            if d.bus.is_empty() { "-" } else { &d.bus },
            d.tgid,
            d.comm
        ),
        Output::Event(e) => format!("{e:?}"),
        Output::Hooks(h) => format!(
            "hooks: {}: now {} (was {}): a module loaded after the agent started",
            h.upgrade.concern.name(),
            h.upgrade.chosen,
            h.upgrade.was.unwrap_or("unavailable")
        ),
        Output::Topology(t) => format!(
            "topology: {} namespace(s), {} mount(s)",
            t.topology.namespaces.len(),
            t.topology.mounts.len()
        ),
        Output::Holders(h) => format!("holders ({}): {} row(s)", h.reason, h.rows.len()),
        Output::File(f) => format!("file {}:{} = {}", f.dev, f.ino, f.path),
        Output::Dropped(d) => format!("{} events lost so far (ring buffer full)", d.dropped),
        Output::Reconcile(r) => format!(
            "reconcile ({}): {} holders; corrected {} missing and {} extra pages",
            r.reconcile.reason, r.reconcile.holders, r.reconcile.missing, r.reconcile.extra
        ),
    }
}

fn holders_line(rows: &[crate::holders::query::HolderRow]) -> String {
    if rows.is_empty() {
        return "no holders".into();
    }
    rows.iter()
        .map(|r| {
            format!(
                "{} {} ({} pages of {})",
                r.pid,
                r.comm,
                r.pages,
                r.file.as_deref().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn format_report(r: &Report) -> String {
    match r {
        Report::DeviceDeparting {
            ts_ns,
            device,
            namespaces,
            by_pid,
            by_comm,
            driver,
            holders,
            holder_pages,
            ..
        } => format!(
            "{} DEVICE DEPARTING {device} ({}) unbound from {driver} by {by_pid} {by_comm}: \
             {} holder(s), {holder_pages} pages: {}",
            stamp(*ts_ns),
            namespaces.join(","),
            holders.len(),
            holders_line(holders)
        ),
        Report::DeviceGone {
            ts_ns,
            device,
            still_mapped,
            took_ms,
        } => format!(
            "{} DEVICE GONE {device} after {took_ms:.1} ms{}",
            stamp(*ts_ns),
            if still_mapped.is_empty() {
                String::new()
            } else {
                format!(
                    "; STALE MAPPINGS left by the kernel: {}",
                    holders_line(still_mapped)
                )
            }
        ),
        Report::DaxShutOff { ts_ns, device } => format!(
            "{} DAX access shut off for {}",
            stamp(*ts_ns),
            device.as_deref().unwrap_or("a device")
        ),
        Report::FsNotified { ts_ns, meaning, .. } => format!("{} {meaning}", stamp(*ts_ns)),
        Report::MemoryFailure {
            ts_ns,
            pfn,
            device,
            files,
            holders,
            ..
        } => format!(
            "{} MEMORY FAILURE pfn {pfn:#x} on {}: backs {}; held by {}",
            stamp(*ts_ns),
            device.as_deref().unwrap_or("no known device"),
            files
                .iter()
                .map(|f| format!("{}@{:#x}", f.path.as_deref().unwrap_or("?"), f.offset))
                .collect::<Vec<_>>()
                .join(", "),
            holders_line(holders)
        ),
        Report::MemoryFailureResult {
            ts_ns,
            pfn,
            result,
            signalled,
            not_signalled,
            ..
        } => format!(
            "{} memory failure pfn {pfn:#x}: kernel result {}; SIGBUS to {:?}; NOT signalled \
             (still map it): {:?}",
            stamp(*ts_ns),
            result.as_deref().unwrap_or("?"),
            signalled,
            not_signalled
        ),
        Report::KernelSigbus { sigbus, cause } => format!(
            "{} kernel SIGBUS {} to {} {} at {:#x}: {cause}",
            stamp(sigbus.ts_ns),
            sigbus.code,
            sigbus.pid,
            sigbus.comm,
            sigbus.addr
        ),
        Report::MmapDenied { denied, device } => format!(
            "{} mmap DENIED {} {} on fenced {}",
            stamp(denied.ts_ns),
            denied.pid,
            denied.comm,
            device.as_deref().unwrap_or("device")
        ),
    }
}

fn stamp(ts_ns: u64) -> String {
    format!(
        "[{:>5}.{:06}]",
        ts_ns / 1_000_000_000,
        (ts_ns % 1_000_000_000) / 1000
    )
}

/// One text line per fault, dmesg-style timestamp first so it lines up with kernel logs.
pub fn format_fault(f: &Fault) -> String {
    let size = match f.page_size {
        s if s >= 1 << 30 => "1G",
        s if s >= 2 << 20 => "2M",
        _ => "4K",
    };
    let pfn = match f.pfn {
        Some(p) => format!("{p:#x}"),
        None if f.zero_page => "zero-page".into(),
        None => "-".into(),
    };
    format!(
        "{} fault {:<5} {}/{} {:<15} dev={} ino={} off={:#x} addr={:#x} pfn={} {}{} {}",
        stamp(f.ts_ns),
        if f.write { "write" } else { "read" },
        f.tgid,
        f.tid,
        f.comm,
        f.dev,
        f.ino,
        f.offset,
        f.page_address,
        pfn,
        size,
        f.device
            .as_deref()
            .map(|d| format!(" {d}"))
            .unwrap_or_default(),
        f.result,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::DevId;

    #[test]
    fn text_line_has_the_essentials() {
        let f = Fault {
            ts_ns: 12_345_678_901,
            tgid: 10,
            tid: 11,
            comm: "app".into(),
            dev: DevId {
                major: 259,
                minor: 0,
            },
            ino: 12,
            offset: 0x200000,
            address: 0x7f0000201234,
            page_address: 0x7f0000200000,
            pfn: Some(0x100a00),
            pfn_source: None,
            page_size: 2 << 20,
            write: true,
            mapped: true,
            zero_page: false,
            result: "NOPAGE".into(),
            result_raw: 0x100,
            vma_start: 0,
            vma_end: 0,
            shared: true,
            device: Some("pmem0".into()),
            devdax: false,
            mm: 0,
        };
        let line = format_fault(&f);
        assert!(
            line.starts_with("[   12.345678] fault write 10/11 app"),
            "{line}"
        );
        assert!(
            line.contains(
                "dev=259:0 ino=12 off=0x200000 addr=0x7f0000200000 pfn=0x100a00 2M pmem0 NOPAGE"
            ),
            "{line}"
        );
    }
}
