//! What the dashboard knows, built only from `monitor --json` lines (live or replayed): the
//! topology, the holder map (kept by the agent's own [`Applier`]), device states, fault
//! rates and the event log. [`Model::snapshot`] turns it into plain rows for the view.

use std::{
    cell::RefCell,
    collections::{HashMap, VecDeque},
    rc::Rc,
};

use super::{
    record::{DeviceNews, LogKind, ParseError, Record, parse_line, record},
    recorded::{Recorded, RecordedProc},
};
use crate::{
    event::Event,
    holders::{
        Applier, FileKey,
        apply::check_event,
        query::{RowExtent, check_row, rows},
    },
    schema::Line,
    topology::{DevId, Mode, Namespace, Topology},
};

const LOG_CAP: usize = 1000;
/// Rate buckets are 100 ms; 64 s are kept for the sparkline.
const SLOT_NS: u64 = 100_000_000;
const KEEP_SLOTS: u64 = 640;
/// Malformed lines are logged one by one up to this many (all are counted).
const MALFORMED_LOGGED: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevState {
    Online,
    /// No driver bound (a namespace without its pmem/dax device).
    Offline,
    /// New mappings refused (enforcement or a drain).
    Fenced,
    Departing,
    Gone,
    /// Bound again while processes still map its old binding (the rebind leak).
    Rebound,
}

impl DevState {
    pub fn label(self) -> &'static str {
        match self {
            DevState::Online => "online",
            DevState::Offline => "offline",
            DevState::Fenced => "fenced",
            DevState::Departing => "departing",
            DevState::Gone => "gone",
            DevState::Rebound => "REBOUND, old mappings",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogEntry {
    pub ts_ns: Option<u64>,
    pub kind: LogKind,
    pub text: String,
}

/// Counters shown in the header and printed at exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedStats {
    pub lines: u64,
    pub malformed: u64,
    pub unknown: u64,
    pub events: u64,
    /// Lost in the kernel (ring buffer full), as the agent reported.
    pub kernel_dropped: u64,
    /// Lines the dashboard itself could not take in time (its channel was full).
    pub ui_lag: u64,
}

#[derive(Default)]
struct Rate {
    /// (100 ms slot, faults), oldest first.
    slots: VecDeque<(u64, u64)>,
}

impl Rate {
    fn add(&mut self, ts_ns: u64, faults: u64) {
        let slot = ts_ns / SLOT_NS;
        match self.slots.back_mut() {
            Some((s, n)) if *s == slot => *n += faults,
            // Out of order (several CPUs): count it in the newest slot.
            Some((s, n)) if *s > slot => *n += faults,
            _ => self.slots.push_back((slot, faults)),
        }
        while self
            .slots
            .front()
            .is_some_and(|(s, _)| *s + KEEP_SLOTS < slot)
        {
            self.slots.pop_front();
        }
    }

    /// Faults in the second up to `now`.
    fn per_sec(&self, now_ns: u64) -> f64 {
        let now = now_ns / SLOT_NS;
        self.slots
            .iter()
            .filter(|(s, _)| *s <= now && *s + 10 > now)
            .map(|(_, n)| *n)
            .sum::<u64>() as f64
    }

    /// Faults per second for the `n` seconds up to `now`, oldest first.
    fn history(&self, now_ns: u64, n: usize) -> Vec<u64> {
        let now_s = now_ns / 1_000_000_000;
        let mut out = vec![0u64; n];
        for (s, c) in &self.slots {
            let sec = s * SLOT_NS / 1_000_000_000;
            if sec <= now_s && now_s - sec < n as u64 {
                out[n - 1 - (now_s - sec) as usize] += c;
            }
        }
        out
    }
}

struct DevTrack {
    name: String,
    ns: Namespace,
    mount: Option<String>,
    state: DevState,
}

/// One device as the devices pane shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceView {
    pub name: String,
    pub namespace: String,
    pub mode: Mode,
    /// Bytes user mappings can reach (None: the range is root-only to read).
    pub size: Option<u64>,
    pub mount: Option<String>,
    pub state: DevState,
    /// Processes mapping it.
    pub holders: usize,
    pub pages: u64,
    pub faults_per_sec: f64,
    /// Faults per second, oldest first (the sparkline).
    pub history: Vec<u64>,
}

/// One (process, file) holding a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderView {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub file: Option<String>,
    pub dev: DevId,
    pub ino: u64,
    pub pages: u64,
    /// Largest page size it mapped the file with (4096 or 2 MiB).
    pub page_size: u64,
    pub last_fault_ns: Option<u64>,
    pub offsets: Vec<(u64, u64)>,
    pub extents: Vec<RowExtent>,
    /// Pod, container and cgroup, as `holders` prints them (None: cgroup unknown).
    pub workload: Option<String>,
}

/// Everything the view draws, detached from the model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub devices: Vec<DeviceView>,
    /// Holders of `devices[i]`.
    pub holders: Vec<Vec<HolderView>>,
    /// Oldest first.
    pub log: Vec<LogEntry>,
    pub stats: FeedStats,
    pub now_ns: u64,
    pub kernel: Option<String>,
}

/// Sort key that puts pmem2 before pmem10: text runs, and numbers by value.
fn natural(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut n = c.to_digit(10).unwrap_or(0) as u64;
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(d as u64);
                chars.next();
            }
            out.push((std::mem::take(&mut text), n));
        } else {
            text.push(c);
        }
    }
    out.push((text, 0));
    out
}

/// Seconds of sparkline kept in a snapshot.
pub const HISTORY_SECS: usize = 60;

pub struct Model {
    applier: Applier,
    recorded: Rc<RefCell<Recorded>>,
    topology: Topology,
    devices: Vec<DevTrack>,
    rates: HashMap<String, Rate>,
    last_fault: HashMap<(u32, FileKey), u64>,
    page_size: HashMap<(u32, FileKey), u64>,
    log: VecDeque<LogEntry>,
    pub stats: FeedStats,
    kernel: Option<String>,
    now_ns: u64,
    /// Changed since the last snapshot.
    dirty: bool,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    pub fn new() -> Self {
        let recorded = Rc::new(RefCell::new(Recorded::default()));
        Self {
            applier: Applier::new(Box::new(RecordedProc(recorded.clone()))),
            recorded,
            topology: Topology::default(),
            devices: Vec::new(),
            rates: HashMap::new(),
            last_fault: HashMap::new(),
            page_size: HashMap::new(),
            log: VecDeque::new(),
            stats: FeedStats::default(),
            kernel: None,
            now_ns: 0,
            dirty: true,
        }
    }

    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// The dashboard's clock (CLOCK_BOOTTIME live, the replay cursor in a replay). Without
    /// one, the newest event time is used.
    pub fn set_clock(&mut self, now_ns: u64) {
        if now_ns > self.now_ns {
            self.now_ns = now_ns;
            self.dirty = true;
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Takes one line of `monitor --json`; a malformed one is counted and skipped.
    pub fn ingest(&mut self, line: &str) -> Result<(), ParseError> {
        if line.trim().is_empty() {
            return Ok(());
        }
        self.stats.lines += 1;
        match parse_line(line).and_then(|l| {
            let r = record(l);
            check_record(&r).map(|()| r)
        }) {
            Ok(r) => {
                self.apply(r);
                Ok(())
            }
            Err(e) => {
                self.stats.malformed += 1;
                if self.stats.malformed <= MALFORMED_LOGGED {
                    self.push_log(
                        None,
                        LogKind::Info,
                        format!("skipped malformed line {}: {e}", self.stats.lines),
                    );
                }
                self.dirty = true;
                Err(e)
            }
        }
    }

    /// Takes one line from the live agent (already typed: nothing to parse).
    pub fn ingest_line(&mut self, line: Line) {
        self.stats.lines += 1;
        self.apply(record(line));
    }

    /// The consumer fell behind and lost `n` lines (live only).
    pub fn lagged(&mut self, n: u64) {
        self.stats.ui_lag += n;
        self.push_log(
            None,
            LogKind::Drop,
            format!(
                "dashboard fell behind: {n} line(s) not shown (kernel events were not lost; \
                 the holder map is resent)"
            ),
        );
    }

    /// A line for the event log from outside the recording (drain progress, notices).
    pub fn note(&mut self, kind: LogKind, text: String) {
        self.push_log(None, kind, text);
    }

    fn push_log(&mut self, ts_ns: Option<u64>, kind: LogKind, text: String) {
        if self.log.len() == LOG_CAP {
            self.log.pop_front();
        }
        self.log.push_back(LogEntry { ts_ns, kind, text });
        self.dirty = true;
    }

    pub fn apply(&mut self, r: Record) {
        self.dirty = true;
        match r {
            Record::Attached { kernel } => self.kernel = Some(kernel),
            Record::Topology(t) => self.set_topology(t),
            Record::Holders { pids, rows } => {
                for r in &rows {
                    if let Some(f) = &r.file {
                        self.applier.set_path(
                            FileKey {
                                dev: r.dev,
                                ino: r.ino,
                            },
                            f.clone(),
                        );
                    }
                }
                match pids {
                    // The next event's re-read will find this state.
                    Some(p) => self.recorded.borrow_mut().set(Some(&p), &rows),
                    None => {
                        self.recorded.borrow_mut().replace_all(&rows);
                        self.applier.reconcile(&self.topology);
                    }
                }
            }
            Record::File { key, path } => self.applier.set_path(key, path),
            Record::Event(ev) => self.event(ev),
            Record::Note(n) => {
                if let Some(news) = &n.news {
                    self.device_news(news);
                }
                if let Some(ts) = n.ts_ns {
                    self.set_clock(ts);
                }
                self.push_log(n.ts_ns, n.kind, n.text);
            }
            Record::Dropped(d) => {
                if d > self.stats.kernel_dropped {
                    let new = d - self.stats.kernel_dropped;
                    self.stats.kernel_dropped = d;
                    self.push_log(
                        None,
                        LogKind::Drop,
                        format!(
                            "{new} event(s) lost in the kernel (ring buffer full); the agent \
                             repairs the map from procfs"
                        ),
                    );
                }
            }
            Record::Unknown => self.stats.unknown += 1,
        }
        self.applier.take_watch_changes();
    }

    fn event(&mut self, ev: Event) {
        self.stats.events += 1;
        if let Event::Fault(f) = &ev {
            self.set_clock(f.ts_ns);
            let device = f.device.clone().or_else(|| {
                f.pfn
                    .and_then(|p| self.topology.namespace_of_pfn(p))
                    .map(|n| n.device_name().to_string())
            });
            if let Some(d) = device {
                // A range counts in the slot of its last fault, with all its faults.
                self.rates
                    .entry(d)
                    .or_default()
                    .add(f.last_ts_ns.max(f.ts_ns), f.pages);
            }
            if f.mapped {
                let key = (
                    f.tgid,
                    FileKey {
                        dev: f.dev,
                        ino: f.ino,
                    },
                );
                self.last_fault.insert(key, f.ts_ns);
                let ps = self.page_size.entry(key).or_insert(0);
                *ps = (*ps).max(f.page_size);
            }
        }
        self.applier.apply(&ev, &self.topology);
    }

    fn set_topology(&mut self, t: Topology) {
        // Devices are tracked by namespace: an unbound pmem2 is still "pmem2" to the
        // operator, though sysfs no longer names a block device for it.
        for ns in &t.namespaces {
            let has_device = ns.block.is_some() || ns.chardev.is_some();
            let mount = ns
                .block
                .as_ref()
                .and_then(|(_, d)| t.mount_of_dev(*d))
                .map(|m| m.mount_point.clone());
            let live = if ns.enabled && has_device {
                DevState::Online
            } else {
                DevState::Offline
            };
            match self.devices.iter_mut().find(|d| d.ns.name == ns.name) {
                Some(d) => {
                    if has_device {
                        d.name = ns.device_name().to_string();
                        d.mount = mount;
                    }
                    let keep_range =
                        (!ns.range_known && d.ns.range_known).then_some(d.ns.data_range);
                    d.ns = ns.clone();
                    if let Some(r) = keep_range {
                        d.ns.data_range = r;
                        d.ns.range_known = true;
                    }
                    d.state = match (d.state, live) {
                        // Only the kernel's departure report moves a departing device on.
                        (DevState::Departing, _) => DevState::Departing,
                        (DevState::Gone | DevState::Fenced, DevState::Offline) => d.state,
                        (DevState::Fenced, DevState::Online) => DevState::Fenced,
                        // Only the agent knows the old mappings went: it stays flagged.
                        (DevState::Rebound, DevState::Online) => DevState::Rebound,
                        (_, l) => l,
                    };
                }
                None => self.devices.push(DevTrack {
                    name: ns.device_name().to_string(),
                    ns: ns.clone(),
                    mount,
                    state: live,
                }),
            }
        }
        // A namespace that left the topology is gone, whether or not its departure was seen.
        for d in &mut self.devices {
            if !t.namespaces.iter().any(|n| n.name == d.ns.name) {
                d.state = DevState::Gone;
            }
        }
        self.devices.sort_by_key(|d| natural(&d.name));
        self.recorded.borrow_mut().topology = t.clone();
        self.topology = t;
    }

    fn device_news(&mut self, news: &DeviceNews) {
        let (device, state) = match news {
            DeviceNews::Departing { device, .. } => (device, DevState::Departing),
            DeviceNews::Gone { device, .. } => (device, DevState::Gone),
            DeviceNews::Fenced { device } => (device, DevState::Fenced),
            DeviceNews::Rebound { device, .. } => (device, DevState::Rebound),
        };
        if let Some(d) = self.devices.iter_mut().find(|d| &d.name == device) {
            // A fence does not undo a departure.
            if !(state == DevState::Fenced
                && matches!(d.state, DevState::Departing | DevState::Gone))
            {
                d.state = state;
            }
        }
    }

    /// A device the dashboard started draining: fenced until the drain says otherwise.
    pub fn mark_fenced(&mut self, device: &str) {
        self.device_news(&DeviceNews::Fenced {
            device: device.to_string(),
        });
        self.dirty = true;
    }

    /// Plain rows for the view.
    pub fn snapshot(&mut self) -> Snapshot {
        self.dirty = false;
        // Per-process details only for processes that still hold pages: a dashboard left
        // open for weeks sees every short-lived process that ever faulted.
        let map = &self.applier.map;
        self.last_fault
            .retain(|(pid, _), _| map.holder_of(*pid).is_some());
        self.page_size
            .retain(|(pid, _), _| map.holder_of(*pid).is_some());
        let now = self.now_ns;
        let mut devices = Vec::new();
        let mut holders = Vec::new();
        for d in &self.devices {
            let mut hv = Vec::new();
            if d.ns.range_known {
                let sel = self
                    .applier
                    .map
                    .in_pfn_range(d.ns.data_range.first_pfn(), d.ns.data_range.end_pfn());
                let mut r = rows(&self.applier.map, &sel, true);
                self.applier.name_files(&mut r, &self.topology);
                for row in r {
                    let key = (
                        row.pid,
                        FileKey {
                            dev: row.dev,
                            ino: row.ino,
                        },
                    );
                    let workload = crate::ui::holders::workload_line(&row);
                    let extents = row.extents.unwrap_or_default();
                    let huge = extents
                        .iter()
                        .any(|e| e.pages >= 512 && e.pfn % 512 == 0 && (e.vaddr >> 12) % 512 == 0);
                    let page_size = self.page_size.get(&key).copied().unwrap_or(if huge {
                        2 << 20
                    } else {
                        4096
                    });
                    hv.push(HolderView {
                        pid: row.pid,
                        start_time: row.start_time,
                        comm: row.comm,
                        file: row.file,
                        dev: row.dev,
                        ino: row.ino,
                        pages: row.pages,
                        page_size,
                        last_fault_ns: self.last_fault.get(&key).copied(),
                        offsets: row.offsets,
                        extents,
                        workload,
                    });
                }
            }
            let mut pids: Vec<u32> = hv.iter().map(|h| h.pid).collect();
            pids.dedup();
            let rate = self.rates.get(&d.name);
            devices.push(DeviceView {
                name: d.name.clone(),
                namespace: d.ns.name.clone(),
                mode: d.ns.mode,
                size: d.ns.range_known.then(|| d.ns.data_range.len()),
                mount: d.mount.clone(),
                state: d.state,
                holders: pids.len(),
                pages: hv.iter().map(|h| h.pages).sum(),
                faults_per_sec: rate.map(|r| r.per_sec(now)).unwrap_or(0.0),
                history: rate
                    .map(|r| r.history(now, HISTORY_SECS))
                    .unwrap_or_else(|| vec![0; HISTORY_SECS]),
            });
            holders.push(hv);
        }
        Snapshot {
            devices,
            holders,
            log: self.log.iter().cloned().collect(),
            stats: self.stats,
            now_ns: now,
            kernel: self.kernel.clone(),
        }
    }
}

/// Refuses, at parse time, what no agent writes and the applier could not hold: pages of
/// odd sizes, extents beyond a chunk, pfns and addresses that wrap. A crafted recording then
/// costs a "skipped malformed line", never an allocation by its numbers or a panic later.
fn check_record(r: &Record) -> Result<(), ParseError> {
    let fields = |kind: &str, m: String| ParseError::Fields(kind.into(), m);
    match r {
        Record::Event(ev) => check_event(ev).map_err(|m| fields("event", m)),
        Record::Holders { rows, .. } => rows
            .iter()
            .try_for_each(check_row)
            .map_err(|m| fields("holders", m)),
        Record::Topology(t) => check_topology(t).map_err(|m| fields("topology", m)),
        _ => Ok(()),
    }
}

/// Why a recorded topology describes no machine, if it does not: a range that ends before
/// it starts, or data outside its namespace (found by the fuzz smoke test: the snapshot
/// computed sizes from such a range and underflowed).
fn check_topology(t: &Topology) -> Result<(), String> {
    for n in &t.namespaces {
        let (ns, data) = (&n.namespace_range, &n.data_range);
        if ns.start > ns.end || data.start > data.end {
            return Err(format!("{}: a range ends before it starts", n.name));
        }
        if n.range_known && (data.start < ns.start || data.end > ns.end) {
            return Err(format!("{}: data outside the namespace", n.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_the_last_second_and_keeps_per_second_history() {
        let mut r = Rate::default();
        let s = 1_000_000_000u64;
        for i in 0..30 {
            r.add(10 * s + i * 10_000_000, 1); // 30 faults in 10.00..10.30 s
        }
        for i in 0..5 {
            r.add(12 * s + i, 1); // 5 faults at 12.0 s
        }
        assert_eq!(r.per_sec(12 * s + 500_000_000), 5.0);
        assert_eq!(r.per_sec(10 * s + 900_000_000), 30.0);
        assert_eq!(r.per_sec(20 * s), 0.0);
        assert_eq!(r.history(12 * s, 4), vec![0, 30, 0, 5]);
        // Old slots are dropped.
        r.add(200 * s, 1);
        assert_eq!(r.slots.len(), 1);
    }

    #[test]
    fn per_process_details_go_with_the_process() {
        let mut m = Model::new();
        let key = FileKey {
            dev: crate::topology::DevId {
                major: 259,
                minor: 0,
            },
            ino: 12,
        };
        for pid in 0..1000 {
            m.last_fault.insert((pid, key), 1);
            m.page_size.insert((pid, key), 4096);
        }
        // None of them holds a page (they exited, or unmapped).
        m.snapshot();
        assert!(m.last_fault.is_empty() && m.page_size.is_empty());
    }

    #[test]
    fn devices_sort_naturally() {
        let mut v = vec!["pmem10", "dax2.0", "pmem3", "pmem1", "namespace12.0"];
        v.sort_by_key(|s| natural(s));
        assert_eq!(v, ["dax2.0", "namespace12.0", "pmem1", "pmem3", "pmem10"]);
    }

    #[test]
    fn malformed_lines_are_counted_and_logged_a_few_times() {
        let mut m = Model::new();
        for _ in 0..5 {
            assert!(m.ingest("{oops").is_err());
        }
        assert!(m.ingest("").is_ok());
        assert!(m.ingest(r#"{"type":"something_new"}"#).is_ok());
        assert_eq!(m.stats.malformed, 5);
        assert_eq!(m.stats.unknown, 1);
        assert_eq!(m.stats.lines, 6);
        assert_eq!(m.snapshot().log.len(), MALFORMED_LOGGED as usize);
    }

    #[test]
    fn crafted_page_sizes_and_extents_are_malformed_lines() {
        let mut m = Model::new();
        let fault = r#"{"type":"fault","ts_ns":1,"tgid":165,"tid":165,"comm":"w","dev":{"major":259,"minor":1},"ino":12,"offset":0,"address":4096,"page_address":4096,"pfn":1085440,"pfn_source":"kernel","page_size":1099511627776,"write":true,"mapped":true,"zero_page":false,"result":"NOPAGE","result_raw":256,"vma_start":0,"vma_end":8192,"shared":true,"device":"pmem0","devdax":false}"#;
        let e = m.ingest(fault).unwrap_err();
        assert!(e.to_string().contains("page_size"), "{e}");
        let holders = r#"{"type":"holders","reason":"start","rows":[{"pid":150,"start_time":1200,"comm":"p","dev":{"major":259,"minor":0},"ino":12,"file":"/mnt/ext4/db.dat","pages":17179869184,"offsets":[[0,2097152]],"extents":[{"vaddr":139888158572544,"pfn":1082368,"offset":0,"pages":17179869184}]}]}"#;
        let e = m.ingest(holders).unwrap_err();
        assert!(e.to_string().contains("extent"), "{e}");
        assert_eq!(m.stats.malformed, 2);
        // The genuine line of a recording is still taken.
        let ok = holders.replace("17179869184", "512");
        m.ingest(&ok).unwrap();
    }

    /// Found by the fuzz smoke test (fuzz/corpus/replay/inverted-data-range): a topology
    /// whose data range ends before it starts panicked the snapshot.
    #[test]
    fn a_topology_with_an_inverted_range_is_a_malformed_line() {
        let mut m = Model::new();
        let topo = r#"{"type":"topology","namespaces":[{"name":"namespace0.0","region":"region0","mode":"fsdax","holder":"pfn0.0","namespace_range":{"start":4429185024,"end":4966055936},"data_range":{"start":4431282176,"end":6055936},"block":["pmem0",{"major":259,"minor":0}],"chardev":null,"align":2097152,"enabled":true,"range_known":true}],"mounts":[]}"#;
        let e = m.ingest(topo).unwrap_err();
        assert!(e.to_string().contains("before it starts"), "{e}");
        let _ = m.snapshot();
        m.ingest(&topo.replace("6055936}", "4966055936}")).unwrap();
        let _ = m.snapshot();
    }
}
