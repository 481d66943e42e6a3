//! `dax-probe monitor`: the live event stream, as text or JSON lines.

use std::{
    io::{BufWriter, Write},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::Duration,
};

use crate::{
    agent::{self, Agent},
    event::Fault,
    probe::KernelSource,
    schema::Line,
};

pub struct Options {
    pub json: bool,
    /// Stop after this long (for scripts and benchmarks); otherwise until Ctrl-C/SIGTERM.
    pub duration: Option<Duration>,
    pub agent: agent::Options,
}

pub async fn run(src: &KernelSource, opts: Options) -> anyhow::Result<()> {
    let mut agent = Agent::start(src, &opts.agent)?;
    announce(&agent, opts.json);

    let out = StdoutQueue::new(std::io::stdout(), STDOUT_QUEUE);
    let json = opts.json;
    let enforce = opts.agent.enforce;
    let mut sink = |o: Line| -> anyhow::Result<()> {
        if json {
            out.push(o.to_json());
        } else if !o.is_state() {
            out.push(format_output(&o));
        }
        // Enforcement outlives a broken stdout; a plain monitor (`| head`) ends with it.
        match out.failure() {
            Some(e) if !enforce => anyhow::bail!("cannot write to stdout: {e}"),
            _ => Ok(()),
        }
    };
    let ran = agent.run(opts.duration, &mut sink).await;
    let summary = agent.summary();
    if json && ran.is_ok() {
        out.push(Line::Summary(summary.clone()).to_json());
    }
    let (lost, failure) = out.finish(Duration::from_secs(5));
    if lost > 0 {
        eprintln!(
            "dax-probe: warning: {lost} output line(s) were not printed: stdout did not keep              up{}",
            failure
                .as_deref()
                .map(|e| format!(" (it failed: {e})"))
                .unwrap_or_default()
        );
    }
    ran?;
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

/// Lines waiting for stdout: about a minute of a busy machine.
const STDOUT_QUEUE: usize = 65536;

/// Lines on their way to stdout. The agent hands them over without waiting and a thread
/// writes them, so a stdout nobody drains (`monitor --enforce | sleep 1e6`) or one that
/// fails (EPIPE, ENOSPC) never holds the event loop. A line that does not fit in the queue
/// is counted as lost; after a write error the rest are discarded and counted.
pub struct StdoutQueue {
    tx: Option<SyncSender<String>>,
    lost: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<String>>>,
    done: Receiver<()>,
}

impl StdoutQueue {
    pub fn new<W: Write + Send + 'static>(w: W, cap: usize) -> Self {
        let (tx, rx) = sync_channel::<String>(cap);
        let (done_tx, done) = std::sync::mpsc::channel();
        let lost = Arc::new(AtomicU64::new(0));
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let (lost2, failed2) = (lost.clone(), failed.clone());
        std::thread::Builder::new()
            .name("dax-probe-stdout".into())
            .spawn(move || {
                let mut w = BufWriter::new(w);
                let mut broken = false;
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    if broken {
                        lost2.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        continue;
                    }
                    let res = batch
                        .iter()
                        .try_for_each(|l| writeln!(w, "{l}"))
                        // Whoever reads us (a pipe, a file, a terminal) sees each event
                        // promptly: flushed whenever the queue is empty.
                        .and_then(|()| w.flush());
                    if let Err(e) = res {
                        broken = true;
                        lost2.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        *failed2.lock().unwrap() = Some(e.to_string());
                    }
                }
                let _ = done_tx.send(());
            })
            .expect("spawn the stdout writer");
        Self {
            tx: Some(tx),
            lost,
            failed,
            done,
        }
    }

    /// Queues one line (without its newline); never waits.
    pub fn push(&self, line: String) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if self.lost.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!("stdout does not keep up: output lines are being dropped");
                }
            }
        }
    }

    /// Why writing failed, once it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }

    /// Lets the writer empty the queue for at most `wait` (a stdout nobody reads must not
    /// keep the agent from exiting); returns the lines lost and the write error, if any.
    pub fn finish(mut self, wait: Duration) -> (u64, Option<String>) {
        drop(self.tx.take());
        let _ = self.done.recv_timeout(wait);
        (self.lost.load(Ordering::Relaxed), self.failure())
    }
}

fn announce(agent: &Agent, json: bool) {
    let session = &agent.session;
    let userspace_pfn = session.pfn_from_userspace();
    if json {
        let line = agent.attached_line();
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
        agent.state().applier.map.holder_count()
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
pub fn format_output(o: &Line) -> String {
    match o {
        Line::Fault(f) => format_fault(f),
        Line::Zap(z) => format!(
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
        Line::Fork(f) => format!(
            "{} fork  {} {:<15} child {}",
            stamp(f.ts_ns),
            f.parent_tgid,
            f.comm,
            f.child_tgid
        ),
        Line::Mremap(m) => format!(
            "{} mremap {} {:<15} {:#x}+{:#x} -> {:#x}+{:#x}",
            stamp(m.ts_ns),
            m.tgid,
            m.comm,
            m.old_addr,
            m.old_len,
            m.new_addr,
            m.new_len
        ),
        Line::Enforcement(a) => {
            format!(
                "enforce {} {} {} ({}{}) on {}: {}{}",
                a.action,
                a.signal.as_deref().unwrap_or("-"),
                a.pid,
                a.comm,
                super::holders::in_workload(a.pod_uid.as_deref(), a.container.as_ref()),
                a.device,
                a.reason,
                a.since_departure_us
                    .map(|us| {
                        let ms = |u: Option<u64>| u.map(|u| format!("{:.1}", u as f64 / 1000.0));
                        match (ms(a.received_us), ms(a.verdict_us)) {
                            (Some(r), Some(v)) => format!(
                                " [{:.1} ms after the departure: read at {r}, {}proven at {v}]",
                                us as f64 / 1000.0,
                                match (ms(a.listed_us), ms(a.fenced_us)) {
                                    (Some(l), Some(f)) => format!("listed at {l}, fenced at {f}, "),
                                    (Some(l), None) => format!("listed at {l}, "),
                                    _ => String::new(),
                                }
                            ),
                            _ => format!(" [{:.1} ms after the departure]", us as f64 / 1000.0),
                        }
                    })
                    .unwrap_or_default()
            )
        }
        Line::Device(d) => format!(
            "{} device {:?} {} driver {} bus {} by {} {}",
            stamp(d.ts_ns),
            d.phase,
            if d.device.is_empty() { "-" } else { &d.device },
            if d.driver.is_empty() { "-" } else { &d.driver },
            if d.bus.is_empty() { "-" } else { &d.bus },
            d.tgid,
            d.comm
        ),
        Line::HooksChanged(h) => format!(
            "hooks: {}: now {} (was {}): a module loaded after the agent started",
            h.concern.name(),
            h.chosen,
            h.was.as_deref().unwrap_or("unavailable")
        ),
        Line::Topology(t) => format!(
            "topology: {} namespace(s), {} mount(s)",
            t.namespaces.len(),
            t.mounts.len()
        ),
        Line::Holders(h) => format!("holders ({}): {} row(s)", h.reason.as_str(), h.rows.len()),
        Line::File(f) => format!("file {}:{} = {}", f.dev, f.ino, f.path),
        Line::Dropped(d) => format!("{} events lost so far (ring buffer full)", d.dropped),
        Line::Reconcile(r) => format!(
            "reconcile ({}): {} holders; corrected {} missing and {} extra pages",
            r.reason, r.holders, r.missing, r.extra
        ),
        // Lines the agent loop does not produce (the monitor prints `attached` and
        // `summary` itself; drain and audit print theirs).
        other => format_report(other).unwrap_or_else(|| other.to_json()),
    }
}

fn holders_line(rows: &[crate::holders::query::HolderRow]) -> String {
    if rows.is_empty() {
        return "no holders".into();
    }
    rows.iter()
        .map(|r| {
            format!(
                "{} {} ({} pages of {}){}",
                r.pid,
                r.comm,
                r.pages,
                r.file.as_deref().unwrap_or("?"),
                super::holders::in_workload(r.pod_uid.as_deref(), r.container.as_ref())
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn format_report(r: &Line) -> Option<String> {
    Some(match r {
        Line::DeviceDeparting {
            ts_ns,
            device,
            namespaces,
            by_pid,
            by_comm,
            driver,
            holders,
            holder_pages,
            synthesised,
            ..
        } => format!(
            "{} DEVICE DEPARTING {device} ({}) {}: {} holder(s), {holder_pages} pages: {}",
            stamp(*ts_ns),
            namespaces.join(","),
            if *synthesised {
                "gone from sysfs without a departure event (seen by the agent's topology \
                 re-read, after the fact)"
                    .to_string()
            } else {
                format!("unbound from {driver} by {by_pid} {by_comm}")
            },
            holders.len(),
            holders_line(holders)
        ),
        Line::DeviceGone {
            ts_ns,
            device,
            still_mapped,
            took_ms,
            synthesised,
        } => format!(
            "{} DEVICE GONE {device} after {took_ms:.1} ms{}{}",
            stamp(*ts_ns),
            if *synthesised {
                " (seen in sysfs: no kernel hook reported the end)"
            } else {
                ""
            },
            if still_mapped.is_empty() {
                String::new()
            } else {
                format!(
                    "; STALE MAPPINGS left by the kernel: {}",
                    holders_line(still_mapped)
                )
            }
        ),
        Line::DeviceRebound {
            ts_ns,
            device,
            namespace,
            old_binding,
            old_binding_pages,
            ..
        } => format!(
            "{} DEVICE REBOUND {device} ({namespace}) while {} holder(s) map its old binding,              {old_binding_pages} pages (they read whatever the new binding stores there;              `dax-probe audit` names the pages): {}",
            stamp(*ts_ns),
            old_binding.len(),
            holders_line(old_binding)
        ),
        Line::DeviceReconfiguring {
            ts_ns,
            device,
            mode,
            driver,
            by_pid,
            by_comm,
            holders,
            holder_pages,
            ..
        } => format!(
            "{} DEVICE RECONFIGURING {device} ({mode}): {driver} unbound by {by_pid} {by_comm},              the namespace stays (a change of personality, not a departure){}",
            stamp(*ts_ns),
            if holders.is_empty() {
                String::new()
            } else {
                format!(
                    "; the kernel zapped {} holder(s)' {holder_pages} pages, their next access                      faults: {}",
                    holders.len(),
                    holders_line(holders)
                )
            }
        ),
        Line::DaxShutOff { ts_ns, device } => format!(
            "{} DAX access shut off for {}",
            stamp(*ts_ns),
            device.as_deref().unwrap_or("a device")
        ),
        Line::FsNotified { ts_ns, meaning, .. } => format!("{} {meaning}", stamp(*ts_ns)),
        Line::MemoryFailure {
            ts_ns,
            pfn,
            device,
            files,
            holders,
            media_error,
            ..
        } => format!(
            "{} MEMORY FAILURE pfn {pfn:#x} on {}{}: backs {}; held by {}",
            stamp(*ts_ns),
            device.as_deref().unwrap_or("no known device"),
            known_bad(media_error),
            files
                .iter()
                .map(|f| format!("{}@{:#x}", f.path.as_deref().unwrap_or("?"), f.offset))
                .collect::<Vec<_>>()
                .join(", "),
            holders_line(holders)
        ),
        Line::MemoryFailureResult {
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
        Line::KernelSigbus {
            sigbus,
            cause,
            media_error,
        } => format!(
            "{} kernel SIGBUS {} to {} {} at {:#x}: {cause}{}",
            stamp(sigbus.ts_ns),
            sigbus.code,
            sigbus.pid,
            sigbus.comm,
            sigbus.addr,
            known_bad(media_error)
        ),
        Line::MediaError(m) => format!("{} {}", stamp(m.ts_ns), m.summary()),
        Line::MmapDenied { denied, device } => format!(
            "{} mmap DENIED {} {} on fenced {}",
            stamp(denied.ts_ns),
            denied.pid,
            denied.comm,
            device.as_deref().unwrap_or("device")
        ),
        Line::UnbindRefused {
            refused,
            device,
            cmdline,
            holders,
        } => format!(
            "{} unbind REFUSED (EBUSY): {} {} ({}) wrote {:?} to {}/drivers/{}/unbind; {} has \
             {} holder(s)",
            stamp(refused.ts_ns),
            refused.pid,
            refused.comm,
            cmdline.as_deref().unwrap_or("command line unknown"),
            refused.written,
            refused.bus,
            refused.driver,
            device.as_deref().unwrap_or("a guarded device"),
            holders.len()
        ),
        Line::FenceSignal { sent, device } => format!(
            "{} FENCE {} {} to {} {} faulting on fenced {}{}",
            stamp(sent.ts_ns),
            if sent.error.is_some() {
                "could not send"
            } else {
                "sent"
            },
            sent.signal,
            sent.pid,
            sent.comm,
            device.as_deref().unwrap_or("device"),
            sent.error
                .map(|e| format!(" ({})", std::io::Error::from_raw_os_error(e)))
                .unwrap_or_default()
        ),
        _ => return None,
    })
}

/// ` (on known-bad media pmem0 sectors 16+8)`, or nothing.
fn known_bad(m: &Option<String>) -> String {
    m.as_deref()
        .map(|m| format!(" (on known-bad media {m})"))
        .unwrap_or_default()
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
    let pages = if f.pages > 1 {
        format!(" x{}", f.pages)
    } else {
        String::new()
    };
    format!(
        "{} fault {:<5} {}/{} {:<15} dev={} ino={} off={:#x} addr={:#x} pfn={} {}{pages}{} {}",
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
mod queue_tests {
    use std::time::Instant;

    use super::*;

    /// A stdout nobody reads: every write waits forever.
    struct Stuck;
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            loop {
                std::thread::park();
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A stdout whose reader went away.
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_stdout_nobody_reads_never_holds_the_agent() {
        let q = StdoutQueue::new(Stuck, 8);
        let t = Instant::now();
        for i in 0..1000 {
            q.push(format!("line {i}"));
        }
        assert!(t.elapsed() < Duration::from_secs(1), "pushing waited");
        let t = Instant::now();
        let (lost, failure) = q.finish(Duration::from_millis(100));
        assert!(t.elapsed() < Duration::from_secs(2), "finishing waited");
        // The writer holds one batch and the queue 8 lines: what did not fit is counted.
        assert!(lost > 0 && lost < 1000, "{lost}");
        assert_eq!(failure, None);
    }

    #[test]
    fn a_broken_stdout_is_reported_and_the_rest_counted() {
        let q = StdoutQueue::new(Broken, 64);
        for i in 0..10 {
            q.push(format!("line {i}"));
        }
        let (lost, failure) = q.finish(Duration::from_secs(5));
        assert_eq!(lost, 10);
        assert!(failure.is_some_and(|e| e.contains("roken pipe")));
    }
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
            user: true,
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
            pages: 1,
            last_ts_ns: 0,
            range: None,
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
