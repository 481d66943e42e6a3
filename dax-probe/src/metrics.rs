//! Prometheus metrics (`monitor --metrics ADDR:PORT`): what the agent counts and knows, in
//! the OpenMetrics text format, through the official `prometheus-client` crate.
//!
//! One recording interface: [`Metrics`], owned by the agent's `Flow`. The flow hands it
//! every line it produces ([`Metrics::observe`]), the faults on fenced devices, and, once a
//! second, the per-device totals of the holder map and the kernel's counters
//! ([`Metrics::refresh`], [`Metrics::kernel_counters`]). The metric families are atomics
//! shared with the HTTP server ([`serve`]), so a scrape encodes them without ever taking a
//! lock of the event loop, and a slow or hostile scraper only ever holds its own task.
//!
//! Naming follows Prometheus conventions: a `dax_probe_` prefix, base units (bytes), a
//! `_total` suffix on counters (added by the encoder), and no pid or path labels (their
//! cardinality is unbounded: the holders themselves are on the control socket).

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use dax_probe_common::Counter as KernelCounter;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    exit::{Code, Failure},
    holders::HolderMap,
    schema::{Hook, Line},
    topology::Topology,
};

/// The port `--metrics` uses when given only a host (Prometheus's default-port allocation
/// list has no entry for dax-probe; 9464 is the one its exporters commonly share).
pub const DEFAULT_PORT: u16 = 9464;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    device: String,
    /// In bytes (4096, 2097152), the base unit.
    page_size: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    device: String,
    /// "true" when a process mapped the failed page.
    mapped: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabels {
    device: String,
    signal: String,
    /// `policy` (the agent, through a pidfd), `kernel_fence` (the fault program, on a fault
    /// on a fenced device), `kernel` (the kernel's own SIGBUS: memory failure, unbind).
    origin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    concern: String,
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    abi: String,
}

/// Device label of an event whose device the agent could not tell (a pfn outside every
/// known range, a SIGBUS at an address the map does not hold).
const UNKNOWN: &str = "unknown";

/// The kernel's loss counters, by the `kind` label they get.
const LOSSES: &[(KernelCounter, &str)] = &[
    (KernelCounter::RingFull, "ring_full"),
    (KernelCounter::DeviceRingFull, "device_ring_full"),
    (KernelCounter::WatchedFull, "watched_full"),
    (KernelCounter::ReadFailed, "read_failed"),
];

/// The agent's metrics; cheap to clone (every family is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    mapped_bytes: Family<DeviceLabels, Gauge>,
    holders: Family<DeviceLabels, Gauge>,
    faults: Family<FaultLabels, Counter>,
    departures: Family<DeviceLabels, Counter>,
    departure_holders: Family<DeviceLabels, Counter>,
    stale: Family<DeviceLabels, Counter>,
    memory_failures: Family<FailureLabels, Counter>,
    signals: Family<SignalLabels, Counter>,
    lost: Family<KindLabels, Counter>,
    drift: Family<KindLabels, Counter>,
    mmap_denied: Family<DeviceLabels, Counter>,
    unbind_refused: Family<DeviceLabels, Counter>,
    hooks: Family<HookLabels, Gauge>,
    pinned: Gauge,
    unpinned: Counter,
    state: Arc<std::sync::Mutex<Seen>>,
}

/// What the recorder remembers between calls: the last values of cumulative counts kept
/// elsewhere (so only their increase is added), the fenced devices, the chosen hooks.
#[derive(Default)]
struct Seen {
    kernel: HashMap<&'static str, u64>,
    drift_missing: u64,
    drift_extra: u64,
    unpinned: u64,
    /// Fenced device → the signal its faults get from the kernel (0: none).
    hooks: HashMap<String, String>,
    devices: HashSet<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("dax_probe");
        let mapped_bytes = Family::<DeviceLabels, Gauge>::default();
        r.register(
            "mapped_bytes",
            "Bytes of the device that processes map now, per the live holder map",
            mapped_bytes.clone(),
        );
        let holders = Family::<DeviceLabels, Gauge>::default();
        r.register(
            "holder_processes",
            "Processes that map pages of the device now",
            holders.clone(),
        );
        let faults = Family::<FaultLabels, Counter>::default();
        r.register(
            "faults",
            "DAX page faults seen, by the page size they mapped",
            faults.clone(),
        );
        let departures = Family::<DeviceLabels, Counter>::default();
        r.register(
            "departures",
            "Unbinds (removals) of the device that began",
            departures.clone(),
        );
        let departure_holders = Family::<DeviceLabels, Counter>::default();
        r.register(
            "departure_holders",
            "Processes that mapped the device when its removal began",
            departure_holders.clone(),
        );
        let stale = Family::<DeviceLabels, Counter>::default();
        r.register(
            "stale_mappings_found",
            "Processes still mapping the device when its removal finished (stale mappings)",
            stale.clone(),
        );
        let memory_failures = Family::<FailureLabels, Counter>::default();
        r.register(
            "memory_failures",
            "Memory failures (hwpoison) the kernel reported on the device",
            memory_failures.clone(),
        );
        let signals = Family::<SignalLabels, Counter>::default();
        r.register(
            "signals_sent",
            "Signals sent to holders of the device, by whom",
            signals.clone(),
        );
        let lost = Family::<KindLabels, Counter>::default();
        r.register(
            "events_lost",
            "Kernel events lost (full ring buffer or watched map, failed kernel reads)",
            lost.clone(),
        );
        let drift = Family::<KindLabels, Counter>::default();
        r.register(
            "reconcile_drift_pages",
            "Pages a reconcile with the page tables found the events had missed (missing) \
             or invented (extra)",
            drift.clone(),
        );
        let mmap_denied = Family::<DeviceLabels, Counter>::default();
        r.register(
            "mmap_denied",
            "New mappings of a departing device the fence refused",
            mmap_denied.clone(),
        );
        let unbind_refused = Family::<DeviceLabels, Counter>::default();
        r.register(
            "unbind_refused",
            "Unbinds of a guarded device with holders the unbind guard refused",
            unbind_refused.clone(),
        );
        let pinned = Gauge::default();
        r.register(
            "pinned_processes",
            "Holder processes the agent holds open (pidfd and stat; page tables or maps too \
             when enforcing, for a departure)",
            pinned.clone(),
        );
        let unpinned = Counter::default();
        r.register(
            "unpinned_holders",
            "Holder processes left unpinned because the pin limit (the open-file limit) was \
             reached: a departure proves them the slower way",
            unpinned.clone(),
        );
        let hooks = Family::<HookLabels, Gauge>::default();
        // A gauge at 1 (see build_info); a module load can change the chosen way while the
        // agent runs, and the stale label set is then removed.
        r.register(
            "hook_info",
            "The way chosen for each concern (1): kernel program, userspace or none",
            hooks.clone(),
        );
        // Gauges at 1, as Prometheus's own `prometheus_build_info`: the OpenMetrics `info`
        // type is not understood by the classic text parser (promtool check metrics).
        let build = Family::<BuildLabels, Gauge>::default();
        r.register(
            "build_info",
            "The agent's version and the eBPF ABI it speaks (1)",
            build.clone(),
        );
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                abi: dax_probe_common::ABI_VERSION.to_string(),
            })
            .set(1);
        Self {
            registry: Arc::new(r),
            mapped_bytes,
            holders,
            faults,
            departures,
            departure_holders,
            stale,
            memory_failures,
            signals,
            lost,
            drift,
            mmap_denied,
            unbind_refused,
            hooks,
            pinned,
            unpinned,
            state: Default::default(),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // Only the event loop's thread records; a poisoned lock still holds valid numbers.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what one output line of the agent tells.
    pub fn observe(&self, line: &Line) {
        match line {
            Line::Fault(f) => {
                let device = f.device.as_deref().unwrap_or(UNKNOWN);
                self.faults
                    .get_or_create(&FaultLabels {
                        device: device.into(),
                        page_size: f.page_size.to_string(),
                    })
                    .inc_by(f.pages);
            }
            // The fault program signalled a task faulting on a fenced device (it reports
            // each one: exclusions and its rate limit mean a fault alone says nothing).
            Line::FenceSignal { sent, device } if sent.error.is_none() => {
                self.signal(
                    device.as_deref().unwrap_or(UNKNOWN),
                    &sent.signal,
                    "kernel_fence",
                );
            }
            Line::DeviceDeparting {
                device, holders, ..
            } => {
                let d = dev(device);
                self.departures.get_or_create(&d).inc();
                self.departure_holders
                    .get_or_create(&d)
                    .inc_by(distinct_pids(holders.iter().map(|h| h.pid)));
            }
            Line::DeviceGone {
                device,
                still_mapped,
                ..
            } => {
                // Created even at zero: the alert compares against a series that exists.
                self.stale
                    .get_or_create(&dev(device))
                    .inc_by(distinct_pids(still_mapped.iter().map(|h| h.pid)));
            }
            Line::MemoryFailure {
                device, holders, ..
            } => {
                self.memory_failures
                    .get_or_create(&FailureLabels {
                        device: device.as_deref().unwrap_or(UNKNOWN).into(),
                        mapped: (!holders.is_empty()).to_string(),
                    })
                    .inc();
            }
            Line::Enforcement(a) => {
                // Only an action whose signal was delivered (see `Enforcer::signal_all`).
                if matches!(&*a.action, "signal" | "escalate")
                    && let Some(sig) = &a.signal
                {
                    self.signal(&a.device, sig, "policy");
                }
            }
            Line::MmapDenied { device, .. } => {
                self.mmap_denied
                    .get_or_create(&dev(device.as_deref().unwrap_or(UNKNOWN)))
                    .inc();
            }
            Line::UnbindRefused { device, .. } => {
                self.unbind_refused
                    .get_or_create(&dev(device.as_deref().unwrap_or(UNKNOWN)))
                    .inc();
            }
            Line::HooksChanged(u) => {
                self.set_hook(u.concern.name(), &u.chosen);
            }
            _ => {}
        }
    }

    /// The kernel's own SIGBUS to a holder, on `device` (the caller looks it up in the map).
    pub fn kernel_sigbus(&self, device: Option<&str>) {
        self.signal(device.unwrap_or(UNKNOWN), "SIGBUS", "kernel");
    }

    fn signal(&self, device: &str, signal: &str, origin: &str) {
        self.signals
            .get_or_create(&SignalLabels {
                device: device.into(),
                signal: signal.into(),
                origin: origin.into(),
            })
            .inc();
    }

    /// The hooks chosen at attach time.
    pub fn hooks(&self, hooks: &[Hook]) {
        for h in hooks {
            let way = match (&h.chosen, h.userspace) {
                (Some(c), _) => c.to_string(),
                (None, true) => "userspace".into(),
                (None, false) => "none".into(),
            };
            self.set_hook(h.concern.name(), &way);
        }
    }

    fn set_hook(&self, concern: &str, hook: &str) {
        let mut seen = self.seen();
        if let Some(old) = seen.hooks.insert(concern.into(), hook.into()) {
            self.hooks.remove(&HookLabels {
                concern: concern.into(),
                hook: old,
            });
        }
        self.hooks
            .get_or_create(&HookLabels {
                concern: concern.into(),
                hook: hook.into(),
            })
            .set(1);
    }

    /// Per-device totals of the holder map and the reconciler's drift (cumulative counts:
    /// only their increase is added). Walks the map once per device: call it about once a
    /// second, not per event.
    pub fn refresh(
        &self,
        map: &HolderMap,
        topology: &Topology,
        drift_missing: u64,
        drift_extra: u64,
    ) {
        let mut seen = self.seen();
        let mut now = HashSet::new();
        for ns in &topology.namespaces {
            if !ns.range_known || ns.data_range.end_pfn() <= ns.data_range.first_pfn() {
                continue;
            }
            let views = map.in_pfn_range(ns.data_range.first_pfn(), ns.data_range.end_pfn());
            let pages: u64 = views.iter().map(|v| v.pages).sum();
            let holders: HashSet<_> = views.iter().map(|v| v.holder).collect();
            let name = ns.device_name().to_string();
            let d = dev(&name);
            self.mapped_bytes
                .get_or_create(&d)
                .set((pages << 12) as i64);
            self.holders.get_or_create(&d).set(holders.len() as i64);
            now.insert(name);
        }
        // A device that is gone has no holders; its series go with it.
        for gone in seen.devices.difference(&now) {
            self.mapped_bytes.remove(&dev(gone));
            self.holders.remove(&dev(gone));
        }
        seen.devices = now;
        add_increase(
            &self.drift,
            "missing",
            &mut seen.drift_missing,
            drift_missing,
        );
        add_increase(&self.drift, "extra", &mut seen.drift_extra, drift_extra);
    }

    /// The enforcer's pins: how many are open, and how many holders the cap has left
    /// unpinned so far (cumulative: only its increase is added).
    pub fn pins(&self, pinned: usize, unpinned: u64) {
        self.pinned.set(pinned as i64);
        let mut seen = self.seen();
        if unpinned > seen.unpinned {
            self.unpinned.inc_by(unpinned - seen.unpinned);
        }
        seen.unpinned = unpinned;
    }

    /// The kernel's loss counters (cumulative since attach).
    pub fn kernel_counters(&self, get: impl Fn(KernelCounter) -> u64) {
        let mut seen = self.seen();
        for &(counter, kind) in LOSSES {
            let last = seen.kernel.entry(kind).or_insert(0);
            add_increase(&self.lost, kind, last, get(counter));
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }

    /// The same in Prometheus's classic text format (0.0.4), for a scraper that does not
    /// ask for OpenMetrics (curl, promtool): a counter's HELP and TYPE name its `_total`
    /// sample, and there is no `# EOF`.
    pub fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }
}

/// OpenMetrics text → classic text. Only what this registry produces needs translating:
/// counter family names (OpenMetrics names the family, classic the `_total` series) and the
/// end marker; gauges are the same in both.
fn to_classic(open: &str) -> String {
    let counters: HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len());
    for l in open.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = l.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(l));
        out.push('\n');
    }
    out
}

fn dev(name: &str) -> DeviceLabels {
    DeviceLabels {
        device: name.into(),
    }
}

fn distinct_pids(pids: impl Iterator<Item = u32>) -> u64 {
    pids.collect::<HashSet<_>>().len() as u64
}

/// Adds to `family{kind}` what a cumulative count gained since `last` (a count that went
/// back, such as stats reset after the start-up scan, restarts from its new value).
fn add_increase(family: &Family<KindLabels, Counter>, kind: &str, last: &mut u64, now: u64) {
    let c = family.get_or_create(&KindLabels { kind: kind.into() });
    if now > *last {
        c.inc_by(now - *last);
    }
    *last = now;
}

/// Parses `--metrics`: `PORT`, `:PORT`, `HOST:PORT` or `[V6]:PORT`, `localhost` is
/// 127.0.0.1; a missing host means loopback, so only an address given explicitly exposes
/// the metrics beyond this machine.
pub fn parse_addr(s: &str) -> Result<SocketAddr, Failure> {
    let bad = |why: &str| {
        Failure::new(
            Code::MetricsAddress,
            format!(
                "--metrics {s:?}: {why}; give PORT, :PORT or ADDR:PORT, e.g. 9464 (loopback) \
                 or 0.0.0.0:9464 (every interface)"
            ),
        )
    };
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let port = |p: &str| -> Result<u16, Failure> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad("not a port number from 1 to 65535")),
            Ok(p) => Ok(p),
        }
    };
    let s = s.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(SocketAddr::new(loopback, port(s)?));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(bad("not a port number from 1 to 65535"));
        }
        return Ok(a);
    }
    let Some((host, p)) = s.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    let ip = match host {
        "" | "localhost" => loopback,
        h => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad("not an IP address (host names are not resolved)"))?,
    };
    Ok(SocketAddr::new(ip, port(p)?))
}

/// What the agent says when it cannot serve metrics: it runs on without them, since a
/// scrape endpoint is never worth leaving the machine's DAX mappings unwatched.
pub fn warn_unserved(e: &Failure) {
    eprintln!(
        "dax-probe: warning: {}; running without metrics (watching and enforcing as asked)",
        e.message
    );
}

/// Binds the metrics port, before the agent loads anything into the kernel (an address in
/// use or not this machine's is named before anything else happens).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Failure> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        Failure::new(
            Code::MetricsAddress,
            format!(
                "cannot serve metrics on {addr}: {e}; {}",
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    "another program listens there: pick another port with --metrics"
                } else {
                    "give an address of this machine with --metrics (or leave it out)"
                }
            ),
        )
    })?;
    l.set_nonblocking(true)
        .map_err(|e| Failure::new(Code::MetricsAddress, format!("metrics socket {addr}: {e}")))?;
    Ok(l)
}

/// Limits a scraper lives within.
#[derive(Clone, Copy)]
pub struct Limits {
    /// The whole exchange: request read, answer written.
    pub timeout: Duration,
    /// The request head (a GET has no body).
    pub max_request: usize,
    /// Connections served at once; more are closed unanswered.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_request: 8192,
            max_connections: 8,
        }
    }
}

/// Serves `GET /metrics` on `listener` until the runtime ends: each connection in its own
/// task with a deadline, so a scraper that stalls holds only itself.
pub fn serve(
    listener: std::net::TcpListener,
    metrics: Metrics,
    limits: Limits,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // EMFILE and the like: try again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // dropped: closed unanswered
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(limits.timeout, answer(stream, &m, limits)).await;
                drop(slot);
            });
        }
    });
    Ok(())
}

async fn answer(mut s: tokio::net::TcpStream, m: &Metrics, limits: Limits) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > limits.max_request {
            return reply(
                &mut s,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    // Content negotiation as Prometheus's own exporters do it: OpenMetrics when the
    // scraper accepts it (Prometheus does), else the classic text format.
    let openmetrics = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    match (method, path) {
        ("GET", "/metrics") if openmetrics => {
            reply(&mut s, "200 OK", CONTENT_TYPE, &m.encode()).await
        }
        ("GET", "/metrics") => {
            reply(&mut s, "200 OK", CLASSIC_CONTENT_TYPE, &m.encode_classic()).await
        }
        ("GET", _) => reply(&mut s, "404 Not Found", "text/plain", "see /metrics\n").await,
        _ => reply(&mut s, "405 Method Not Allowed", "text/plain", "GET only\n").await,
    }
}

/// The OpenMetrics text format's media type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format's.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn reply(
    s: &mut tokio::net::TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: \
         close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_loopback_and_bad_ones_name_themselves() {
        let lo = |p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p);
        assert_eq!(parse_addr("9464").unwrap(), lo(9464));
        assert_eq!(parse_addr(":9100").unwrap(), lo(9100));
        assert_eq!(parse_addr("localhost:9100").unwrap(), lo(9100));
        assert_eq!(
            parse_addr("0.0.0.0:9464").unwrap(),
            "0.0.0.0:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr("[::1]:9464").unwrap(),
            "[::1]:9464".parse().unwrap()
        );
        for bad in [
            "",
            "0",
            "70000",
            "host.example:9464",
            "1.2.3.4",
            "1.2.3.4:x",
            ":0",
        ] {
            let e = parse_addr(bad).unwrap_err();
            assert_eq!(e.code, Code::MetricsAddress, "{bad}");
            assert!(e.message.contains(&format!("{bad:?}")), "{}", e.message);
        }
    }

    #[test]
    fn an_address_in_use_fails_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind(addr).unwrap_err();
        assert_eq!(e.code, Code::MetricsAddress);
        assert!(e.message.contains(&addr.to_string()), "{}", e.message);
        assert!(e.message.contains("another port"), "{}", e.message);
    }

    #[test]
    fn hooks_changed_replaces_the_old_label_set() {
        let m = Metrics::new();
        m.hooks(&[Hook {
            concern: crate::probe::plan::Concern::DevdaxFault,
            chosen: None,
            userspace: true,
        }]);
        let text = m.encode();
        assert!(
            text.contains("dax_probe_hook_info{concern=\"devdax fault\",hook=\"userspace\"} 1"),
            "{text}"
        );
        m.observe(&Line::HooksChanged(crate::probe::loader::Upgrade {
            concern: crate::probe::plan::Concern::DevdaxFault,
            was: None,
            chosen: "kprobe/dev_dax_huge_fault".into(),
        }));
        let text = m.encode();
        assert!(!text.contains("hook=\"userspace\""), "{text}");
        assert!(
            text.contains("{concern=\"devdax fault\",hook=\"kprobe/dev_dax_huge_fault\"} 1"),
            "{text}"
        );
        let build = format!(
            "dax_probe_build_info{{version=\"0.1.0\",abi=\"{}\"}} 1",
            dax_probe_common::ABI_VERSION
        );
        assert!(text.contains(&build), "{text}");
    }

    /// Pins open now, and the holders the cap left unpinned, counted once each.
    #[test]
    fn pins_are_a_gauge_and_the_unpinned_a_counter() {
        let m = Metrics::new();
        m.pins(3, 2);
        m.pins(1, 5);
        m.pins(1, 5);
        let text = m.encode();
        assert!(text.contains("dax_probe_pinned_processes 1\n"), "{text}");
        assert!(
            text.contains("dax_probe_unpinned_holders_total 5\n"),
            "{text}"
        );
    }

    #[test]
    fn kernel_counters_add_only_their_increase() {
        let m = Metrics::new();
        let at = |n: u64| move |c: KernelCounter| if c == KernelCounter::RingFull { n } else { 0 };
        m.kernel_counters(at(3));
        m.kernel_counters(at(5));
        let text = m.encode();
        assert!(
            text.contains("dax_probe_events_lost_total{kind=\"ring_full\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("dax_probe_events_lost_total{kind=\"watched_full\"} 0"),
            "{text}"
        );
    }

    /// A scraper that connects and sends nothing, or too much, holds only its own
    /// connection: a real scrape is still answered, at once.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_or_oversized_scraper_does_not_block_a_scrape() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let m = Metrics::new();
        m.observe(&Line::DeviceGone {
            ts_ns: 1,
            device: "pmem1".into(),
            still_mapped: vec![],
            took_ms: 0.0,
            synthesised: false,
        });
        serve(l, m, Limits::default()).unwrap();
        let _stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut big = tokio::net::TcpStream::connect(addr).await.unwrap();
        big.write_all(&vec![b'A'; 20_000]).await.unwrap();
        let mut answer = String::new();
        big.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5";
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{accept}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut a = String::new();
            s.read_to_string(&mut a).await.unwrap();
            a
        };
        let a = tokio::time::timeout(Duration::from_secs(2), get("/metrics"))
            .await
            .expect("answered while another scraper stalls");
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.contains(CONTENT_TYPE), "{a}");
        assert!(
            a.contains("dax_probe_stale_mappings_found_total{device=\"pmem1\"} 0"),
            "{a}"
        );
        assert!(a.ends_with("# EOF\n"), "{a}");
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        // Without OpenMetrics in Accept (curl): the classic format.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut a = String::new();
        s.read_to_string(&mut a).await.unwrap();
        assert!(a.contains(CLASSIC_CONTENT_TYPE), "{a}");
        assert!(
            a.contains("# TYPE dax_probe_stale_mappings_found_total counter\n"),
            "{a}"
        );
        assert!(!a.contains("# EOF"), "{a}");
    }
}

/// A real Prometheus server scrapes [`serve`] when `cargo xtask test` names one
/// (DAX_PROBE_PROMETHEUS): it negotiates OpenMetrics, parses every family and stores the
/// samples this test then reads back through its HTTP API.
#[cfg(test)]
mod prometheus_scrapes {
    use std::{io::Read, io::Write, process::Command};

    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// GET `path` from 127.0.0.1:`port`, body only.
    fn get(port: u16, path: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut a = String::new();
        s.read_to_string(&mut a).ok()?;
        a.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }

    /// The value of the one sample `query` returns.
    fn query(port: u16, query: &str) -> Option<String> {
        let q: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = get(port, &format!("/api/v1/query?query={q}"))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .map(str::to_string)
    }

    #[test]
    fn prometheus_scrapes_and_stores_the_samples() {
        let Some(prometheus) = std::env::var_os("DAX_PROBE_PROMETHEUS") else {
            return;
        };
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let target = l.local_addr().unwrap();
        let m = Metrics::new();
        m.observe(&Line::DeviceGone {
            ts_ns: 1,
            device: "pmem1".into(),
            still_mapped: vec![],
            took_ms: 0.0,
            synthesised: false,
        });
        m.kernel_counters(|c| if c == KernelCounter::RingFull { 7 } else { 0 });
        // The agent's runtime is a current-thread one; here it has a thread of its own,
        // left running to the end of the test process.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                serve(l, m, Limits::default()).unwrap();
                std::future::pending::<()>().await
            })
        });
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: dax-probe\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let web = free_port();
        let mut child = Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("start prometheus");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut got = (None, None, None);
        while std::time::Instant::now() < deadline {
            got = (
                query(web, "up{job=\"dax-probe\"}"),
                query(web, "dax_probe_events_lost_total{kind=\"ring_full\"}"),
                query(web, "dax_probe_build_info"),
            );
            if got.1.is_some() && got.2.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        // Prometheus asked for OpenMetrics: the counter family was parsed as one (metadata
        // is what the scrape's TYPE lines told it).
        let mut meta = String::new();
        sys_wait(Duration::from_secs(10), || {
            meta = get(web, "/api/v1/targets/metadata?metric=dax_probe_events_lost")
                .unwrap_or_default();
            meta.contains("\"type\":\"counter\"")
        });
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        assert_eq!(
            got,
            (Some("1".into()), Some("7".into()), Some("1".into())),
            "Prometheus's view of the scrape; its log:\n{log}"
        );
        assert!(meta.contains("\"type\":\"counter\""), "metadata: {meta}");
    }

    fn sys_wait(within: Duration, mut cond: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + within;
        while !cond() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}
