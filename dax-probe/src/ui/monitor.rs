//! `dax-probe monitor`: the live event stream, as text or JSON lines.

use std::{
    io::{BufWriter, Write},
    time::{Duration, Instant},
};

use dax_probe_common::Counter;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    event::{Event, Fault},
    exit::{Code, Failure},
    privilege,
    probe::{
        KernelSource, Session,
        decode::{Decoder, PfnLookup},
        plan::Concern,
    },
    proc::pagemap::PagemapLookup,
    topology::Topology,
};

pub struct Options {
    pub json: bool,
    /// Keep running even when no DAX device exists yet.
    pub wait: bool,
    /// Stop after this long (for scripts and benchmarks); otherwise until Ctrl-C/SIGTERM.
    pub duration: Option<Duration>,
    /// Event ring buffer size in bytes.
    pub ring_bytes: u32,
}

/// First line of `--json` output: what is attached.
#[derive(Serialize)]
struct Attached<'a> {
    r#type: &'static str,
    kernel: &'a str,
    hooks: Vec<HookLine>,
}

#[derive(Serialize)]
struct HookLine {
    concern: Concern,
    chosen: Option<&'static str>,
    userspace: bool,
}

/// Last line: what happened overall.
#[derive(Serialize, Default)]
struct Summary {
    r#type: &'static str,
    events: u64,
    faults: u64,
    /// Lost in the kernel: ring buffer full.
    dropped: u64,
    /// Records the agent could not decode.
    undecodable: u64,
    /// Kernel reads that failed (fields zeroed).
    kernel_read_errors: u64,
    /// Faults the kernel programs saw.
    faults_seen_by_kernel: u64,
    duration_s: f64,
}

pub async fn run(src: &KernelSource, opts: Options) -> anyhow::Result<()> {
    if !privilege::can_trace() {
        return Err(Failure::new(
            Code::NoPermission,
            "monitor needs root (or CAP_BPF with CAP_PERFMON) to load eBPF programs: \
             run it with sudo",
        )
        .into());
    }
    let mut topology = Topology::read(&src.root);
    if !topology.has_dax() {
        let msg = "no DAX device present: no fsdax/devdax pmem namespace and no file system \
                   mounted with -o dax";
        if !opts.wait {
            return Err(Failure::new(
                Code::NoInput,
                format!("{msg}; pass --wait to monitor anyway (devices added later are seen)"),
            )
            .into());
        }
        eprintln!("dax-probe: warning: {msg}; waiting for one");
    }

    let mut session = Session::start(src, opts.ring_bytes)?;
    let userspace_pfn = session.pfn_from_userspace();
    announce(&session, opts.json, userspace_pfn);

    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut summary = Summary {
        r#type: "summary",
        ..Default::default()
    };
    let started = Instant::now();
    let mut last_topology = Instant::now();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let sleep_until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_until);

    loop {
        tokio::select! {
            rec = session.records.recv() => {
                let Some(rec) = rec else { break };
                handle(&rec, &mut topology, &mut last_topology, &src.root, userspace_pfn,
                       opts.json, &mut out, &mut summary)?;
                // Batch: write whatever else is already queued, then flush once.
                while let Ok(rec) = session.records.try_recv() {
                    handle(&rec, &mut topology, &mut last_topology, &src.root, userspace_pfn,
                           opts.json, &mut out, &mut summary)?;
                }
                out.flush()?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut sleep_until => break,
        }
    }

    // Drain what the kernel submitted before we stopped, so counts are complete.
    session.stop_reader();
    while let Ok(rec) = session.records.try_recv() {
        handle(
            &rec,
            &mut topology,
            &mut last_topology,
            &src.root,
            userspace_pfn,
            opts.json,
            &mut out,
            &mut summary,
        )?;
    }
    summary.dropped = session.counters.get(Counter::RingFull);
    summary.kernel_read_errors = session.counters.get(Counter::ReadFailed);
    summary.faults_seen_by_kernel = session.counters.get(Counter::FaultsSeen);
    summary.duration_s = started.elapsed().as_secs_f64();
    if opts.json {
        serde_json::to_writer(&mut out, &summary)?;
        writeln!(out)?;
    }
    out.flush()?;
    drop(out);
    if !opts.json {
        eprintln!(
            "dax-probe: {} events ({} faults) in {:.1} s; {} dropped (ring buffer full), \
             {} undecodable, {} kernel read errors",
            summary.events,
            summary.faults,
            summary.duration_s,
            summary.dropped,
            summary.undecodable,
            summary.kernel_read_errors
        );
    }
    if summary.dropped > 0 {
        eprintln!(
            "dax-probe: warning: {} events were lost because the ring buffer was full: the \
             reader fell behind a fault storm; raise --ring-size-kib or write to a file",
            summary.dropped
        );
    }
    Ok(())
}

fn announce(session: &Session, json: bool, userspace_pfn: bool) {
    if json {
        let line = Attached {
            r#type: "attached",
            kernel: &session.facts.release,
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
        "dax-probe: watching DAX faults on {} ({}); Ctrl-C to stop",
        session.facts.release,
        hooks.join(", ")
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

#[allow(clippy::too_many_arguments)]
fn handle(
    rec: &[u8],
    topology: &mut Topology,
    last_topology: &mut Instant,
    root: &std::path::Path,
    userspace_pfn: bool,
    json: bool,
    out: &mut impl Write,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    // pagemap fills in pfns the kernel hook could not tell: every pfn on kernels without an
    // insert hook, the odd preempted fault otherwise.
    let _ = userspace_pfn;
    let decoded = decode_with(rec, topology, PagemapLookup);
    let event = match decoded {
        Ok(e) => e,
        Err(e) => {
            summary.undecodable += 1;
            log::warn!("{e}");
            return Ok(());
        }
    };
    summary.events += 1;
    let Event::Fault(f) = &event;
    summary.faults += 1;
    // A pfn outside every known device: the topology may have changed (namespace
    // reconfigured, device hot-added). Re-read it, at most once a second.
    if f.pfn.is_some() && f.device.is_none() && last_topology.elapsed() > Duration::from_secs(1) {
        *topology = Topology::read(root);
        *last_topology = Instant::now();
    }
    if json {
        serde_json::to_writer(&mut *out, &event)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", format_fault(f))?;
    }
    Ok(())
}

fn decode_with<L: PfnLookup>(
    rec: &[u8],
    topology: &Topology,
    lookup: L,
) -> Result<Event, crate::probe::decode::DecodeError> {
    Decoder { topology, lookup }.decode(rec)
}

/// One text line per fault, dmesg-style timestamp first so it lines up with kernel logs.
pub fn format_fault(f: &Fault) -> String {
    let size = if f.page_size >= 2 << 20 { "2M" } else { "4K" };
    let pfn = match f.pfn {
        Some(p) => format!("{p:#x}"),
        None if f.zero_page => "zero-page".into(),
        None => "-".into(),
    };
    format!(
        "[{:>5}.{:06}] fault {:<5} {}/{} {:<15} dev={} ino={} off={:#x} addr={:#x} pfn={} {}{} {}",
        f.ts_ns / 1_000_000_000,
        (f.ts_ns % 1_000_000_000) / 1000,
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
