//! One line of `monitor --json` output, parsed back: what the TUI consumes, live or replayed.
//!
//! Live, the agent's outputs are serialized exactly as `monitor --json` prints them and
//! parsed here; a replay reads the same lines from a file. One parser, one model: a replay
//! shows what the live dashboard showed.
//!
//! Unknown `type`s are not errors (newer agents may add lines); lines that are not JSON
//! objects with a `type`, or whose known type lacks its fields, are malformed.

use serde::Deserialize;
use serde_json::Value;

use crate::{
    event::{Event, Fault, Fork, Mremap, Zap},
    holders::{FileKey, query::HolderRow},
    topology::{DevId, Topology},
};

/// What an operator reads in the event log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    Departure,
    Failure,
    Signal,
    Drop,
    Denied,
    Drain,
    Info,
}

impl LogKind {
    pub fn label(self) -> &'static str {
        match self {
            LogKind::Departure => "DEPART",
            LogKind::Failure => "FAIL",
            LogKind::Signal => "SIGNAL",
            LogKind::Drop => "DROP",
            LogKind::Denied => "DENY",
            LogKind::Drain => "DRAIN",
            LogKind::Info => "info",
        }
    }
}

/// A device-level happening the model acts on (besides logging it).
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceNews {
    Departing {
        device: String,
        holders: Vec<HolderRow>,
    },
    Gone {
        device: String,
        still_mapped: usize,
    },
    /// New mappings are refused (an enforcement or a drain fenced it).
    Fenced {
        device: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub ts_ns: Option<u64>,
    pub kind: LogKind,
    pub text: String,
    pub news: Option<DeviceNews>,
}

#[derive(Clone, Debug)]
pub enum Record {
    Attached {
        kernel: String,
    },
    Topology(Topology),
    /// The whole map (`pids` None) or the complete state of some processes.
    Holders {
        pids: Option<Vec<u32>>,
        rows: Vec<HolderRow>,
    },
    File {
        key: FileKey,
        path: String,
    },
    /// fault, zap, fork, mremap: applied to the holder map.
    Event(Event),
    /// Reports, enforcement, reconciles, drain steps: logged.
    Note(Note),
    /// Kernel drops so far (`dropped` lines and the final `summary`).
    Dropped(u64),
    /// A JSON object of a type this version does not know.
    Unknown(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("no \"type\" field")]
    NoType,
    #[error("bad {0} line: {1}")]
    Fields(String, String),
}

#[derive(Deserialize)]
struct FaultLine {
    ts_ns: u64,
    tgid: u32,
    tid: u32,
    comm: String,
    dev: DevId,
    ino: u64,
    offset: u64,
    address: u64,
    page_address: u64,
    pfn: Option<u64>,
    page_size: u64,
    write: bool,
    mapped: bool,
    zero_page: bool,
    result: String,
    #[serde(default)]
    vma_start: u64,
    #[serde(default)]
    vma_end: u64,
    #[serde(default)]
    shared: bool,
    device: Option<String>,
    #[serde(default)]
    devdax: bool,
}

#[derive(Deserialize)]
struct ZapLine {
    ts_ns: u64,
    tgid: u32,
    tid: u32,
    comm: String,
    start: u64,
    end: u64,
    #[serde(default)]
    vma_start: u64,
    #[serde(default)]
    vma_end: u64,
    offset: u64,
    dev: DevId,
    ino: u64,
    #[serde(default)]
    devdax: bool,
    own_mm: bool,
    exiting: bool,
    #[serde(default)]
    cow: bool,
    owner_tgid: Option<u32>,
}

#[derive(Deserialize)]
struct ForkLine {
    ts_ns: u64,
    parent_tgid: u32,
    comm: String,
    child_tgid: u32,
}

#[derive(Deserialize)]
struct MremapLine {
    ts_ns: u64,
    tgid: u32,
    comm: String,
    old_addr: u64,
    old_len: u64,
    new_len: u64,
    #[serde(default)]
    flags: u64,
    new_addr: u64,
}

#[derive(Deserialize)]
struct HoldersLine {
    pids: Option<Vec<u32>>,
    rows: Vec<HolderRow>,
}

#[derive(Deserialize)]
struct FileLine {
    dev: DevId,
    ino: u64,
    path: String,
}

#[derive(Deserialize)]
struct Departing {
    ts_ns: u64,
    device: String,
    #[serde(default)]
    by_pid: u32,
    #[serde(default)]
    by_comm: String,
    #[serde(default)]
    driver: String,
    holders: Vec<HolderRow>,
    #[serde(default)]
    holder_pages: u64,
}

#[derive(Deserialize)]
struct Gone {
    ts_ns: u64,
    device: String,
    still_mapped: Vec<HolderRow>,
    #[serde(default)]
    took_ms: f64,
}

#[derive(Deserialize)]
struct Action {
    device: String,
    pid: u32,
    comm: String,
    action: String,
    signal: Option<String>,
    reason: String,
}

fn from<T: for<'de> Deserialize<'de>>(v: Value, ty: &str) -> Result<T, ParseError> {
    serde_json::from_value(v).map_err(|e| ParseError::Fields(ty.to_string(), e.to_string()))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("?")
}

fn u(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

fn pids(v: &Value, k: &str) -> String {
    let p: Vec<String> = v
        .get(k)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|x| x.to_string()).collect())
        .unwrap_or_default();
    if p.is_empty() {
        "none".into()
    } else {
        p.join(",")
    }
}

fn who(rows: &[HolderRow]) -> String {
    if rows.is_empty() {
        return "no holders".into();
    }
    let mut pids: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}", r.pid, r.comm))
        .collect();
    pids.dedup();
    let pages: u64 = rows.iter().map(|r| r.pages).sum();
    format!("{pages} pages held by {}", pids.join(", "))
}

fn note(ts_ns: Option<u64>, kind: LogKind, text: String) -> Record {
    Record::Note(Note {
        ts_ns,
        kind,
        text,
        news: None,
    })
}

/// Parses one line of `monitor --json` (or `drain --json`) output.
pub fn parse_line(line: &str) -> Result<Record, ParseError> {
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|e| ParseError::NotJson(e.to_string()))?;
    let ty = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or(ParseError::NoType)?
        .to_string();
    let ts = u(&v, "ts_ns");
    Ok(match ty.as_str() {
        "attached" => Record::Attached {
            kernel: s(&v, "kernel").to_string(),
        },
        "topology" => Record::Topology(from(v, &ty)?),
        "holders" => {
            let h: HoldersLine = from(v, &ty)?;
            Record::Holders {
                pids: h.pids,
                rows: h.rows,
            }
        }
        "file" => {
            let f: FileLine = from(v, &ty)?;
            Record::File {
                key: FileKey {
                    dev: f.dev,
                    ino: f.ino,
                },
                path: f.path,
            }
        }
        "fault" => {
            let f: FaultLine = from(v, &ty)?;
            Record::Event(Event::Fault(Fault {
                ts_ns: f.ts_ns,
                tgid: f.tgid,
                tid: f.tid,
                comm: f.comm,
                dev: f.dev,
                ino: f.ino,
                offset: f.offset,
                address: f.address,
                page_address: f.page_address,
                pfn: f.pfn,
                pfn_source: None,
                page_size: f.page_size,
                write: f.write,
                mapped: f.mapped,
                zero_page: f.zero_page,
                result: f.result,
                result_raw: 0,
                vma_start: f.vma_start,
                vma_end: f.vma_end,
                shared: f.shared,
                device: f.device,
                devdax: f.devdax,
                mm: 0,
            }))
        }
        "zap" => {
            let z: ZapLine = from(v, &ty)?;
            Record::Event(Event::Zap(Zap {
                ts_ns: z.ts_ns,
                tgid: z.tgid,
                tid: z.tid,
                comm: z.comm,
                start: z.start,
                end: z.end,
                vma_start: z.vma_start,
                vma_end: z.vma_end,
                offset: z.offset,
                dev: z.dev,
                ino: z.ino,
                devdax: z.devdax,
                own_mm: z.own_mm,
                exiting: z.exiting,
                cow: z.cow,
                owner_tgid: z.owner_tgid,
                mm: 0,
            }))
        }
        "fork" => {
            let f: ForkLine = from(v, &ty)?;
            Record::Event(Event::Fork(Fork {
                ts_ns: f.ts_ns,
                parent_tgid: f.parent_tgid,
                comm: f.comm,
                child_tgid: f.child_tgid,
                child_mm: 0,
            }))
        }
        "mremap" => {
            let m: MremapLine = from(v, &ty)?;
            Record::Event(Event::Mremap(Mremap {
                ts_ns: m.ts_ns,
                tgid: m.tgid,
                comm: m.comm,
                old_addr: m.old_addr,
                old_len: m.old_len,
                new_len: m.new_len,
                flags: m.flags,
                new_addr: m.new_addr,
            }))
        }
        "device_departing" => {
            let d: Departing = from(v, &ty)?;
            Record::Note(Note {
                ts_ns: Some(d.ts_ns),
                kind: LogKind::Departure,
                text: format!(
                    "{} DEPARTING: unbound from {} by {} {}; {} holder row(s), {} pages{}",
                    d.device,
                    if d.driver.is_empty() { "?" } else { &d.driver },
                    d.by_pid,
                    d.by_comm,
                    d.holders.len(),
                    d.holder_pages,
                    if d.holders.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", who(&d.holders))
                    }
                ),
                news: Some(DeviceNews::Departing {
                    device: d.device,
                    holders: d.holders,
                }),
            })
        }
        "device_gone" => {
            let g: Gone = from(v, &ty)?;
            Record::Note(Note {
                ts_ns: Some(g.ts_ns),
                kind: LogKind::Departure,
                text: format!(
                    "{} GONE after {:.1} ms{}",
                    g.device,
                    g.took_ms,
                    if g.still_mapped.is_empty() {
                        String::new()
                    } else {
                        format!("; STALE mappings left: {}", who(&g.still_mapped))
                    }
                ),
                news: Some(DeviceNews::Gone {
                    device: g.device,
                    still_mapped: g.still_mapped.len(),
                }),
            })
        }
        "dax_shut_off" => note(
            ts,
            LogKind::Info,
            format!(
                "DAX access shut off for {}",
                v.get("device")
                    .and_then(Value::as_str)
                    .unwrap_or("a device")
            ),
        ),
        "fs_notified" => note(ts, LogKind::Info, s(&v, "meaning").to_string()),
        "memory_failure" => note(
            ts,
            LogKind::Failure,
            format!(
                "MEMORY FAILURE pfn {:#x} on {}: {}",
                u(&v, "pfn").unwrap_or(0),
                v.get("device")
                    .and_then(Value::as_str)
                    .unwrap_or("no known device"),
                v.get("holders")
                    .cloned()
                    .and_then(|h| serde_json::from_value::<Vec<HolderRow>>(h).ok())
                    .map(|h| who(&h))
                    .unwrap_or_else(|| "no holders".into())
            ),
        ),
        "memory_failure_result" => note(
            ts,
            LogKind::Failure,
            format!(
                "memory failure pfn {:#x}: {}; SIGBUS to {}; NOT signalled: {}",
                u(&v, "pfn").unwrap_or(0),
                v.get("result").and_then(Value::as_str).unwrap_or("?"),
                pids(&v, "signalled"),
                pids(&v, "not_signalled")
            ),
        ),
        "kernel_sigbus" => note(
            ts,
            LogKind::Signal,
            format!(
                "kernel SIGBUS {} to {} {}: {}",
                s(&v, "code"),
                u(&v, "pid").unwrap_or(0),
                s(&v, "comm"),
                s(&v, "cause")
            ),
        ),
        "mmap_denied" => note(
            ts,
            LogKind::Denied,
            format!(
                "mmap DENIED {} {} on fenced {}",
                u(&v, "pid").unwrap_or(0),
                s(&v, "comm"),
                v.get("device").and_then(Value::as_str).unwrap_or("device")
            ),
        ),
        "enforcement" => {
            // The monitor flattens the action; `drain --json` nests it under "action".
            let inner = match v.get("action") {
                Some(a @ Value::Object(_)) => a.clone(),
                _ => v,
            };
            let a: Action = from(inner, &ty)?;
            let fenced = a.action == "signal" || a.action == "escalate";
            Record::Note(Note {
                ts_ns: None,
                kind: LogKind::Signal,
                text: format!(
                    "{} {} to {} {} on {}: {}",
                    a.action,
                    a.signal.as_deref().unwrap_or("-"),
                    a.pid,
                    a.comm,
                    a.device,
                    a.reason
                ),
                news: fenced.then_some(DeviceNews::Fenced { device: a.device }),
            })
        }
        "reconcile" => {
            let reason = s(&v, "reason").to_string();
            let (m, e) = (u(&v, "missing").unwrap_or(0), u(&v, "extra").unwrap_or(0));
            let kind = if reason == "events lost" {
                LogKind::Drop
            } else {
                LogKind::Info
            };
            note(
                None,
                kind,
                format!("reconcile ({reason}): corrected {m} missing and {e} extra pages"),
            )
        }
        "drain" => note(
            None,
            LogKind::Drain,
            format!("{}: {}", s(&v, "step"), s(&v, "message")),
        ),
        "dropped" | "summary" => Record::Dropped(u(&v, "dropped").unwrap_or(0)),
        _ => Record::Unknown(ty),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_fault_line_as_the_monitor_prints_it() {
        let line = r#"{"type":"fault","ts_ns":12649205000,"tgid":165,"tid":165,"comm":"dax-workload","dev":{"major":259,"minor":1},"ino":12,"offset":0,"address":4096,"page_address":4096,"pfn":1085440,"pfn_source":"kernel","page_size":4096,"write":true,"mapped":true,"zero_page":false,"result":"NOPAGE","result_raw":256,"vma_start":0,"vma_end":8192,"shared":true,"device":"pmem0","devdax":false}"#;
        match parse_line(line).unwrap() {
            Record::Event(Event::Fault(f)) => {
                assert_eq!(f.tgid, 165);
                assert_eq!(f.pfn, Some(0x109000));
                assert_eq!(f.device.as_deref(), Some("pmem0"));
                assert!(f.write && f.mapped && f.shared);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_and_unknown_lines_are_told_apart() {
        assert!(matches!(
            parse_line("{not json"),
            Err(ParseError::NotJson(_))
        ));
        assert!(matches!(parse_line("[1,2]"), Err(ParseError::NoType)));
        assert!(matches!(
            parse_line(r#"{"ts_ns":1}"#),
            Err(ParseError::NoType)
        ));
        assert!(matches!(
            parse_line(r#"{"type":"fault","tgid":1}"#),
            Err(ParseError::Fields(t, _)) if t == "fault"
        ));
        assert!(matches!(
            parse_line(r#"{"type":"from_the_future","x":1}"#),
            Ok(Record::Unknown(t)) if t == "from_the_future"
        ));
    }

    #[test]
    fn enforcement_is_read_flat_and_nested() {
        let flat = r#"{"type":"enforcement","device":"pmem1","pid":7,"comm":"db","action":"signal","signal":"TERM","reason":"device departing","since_departure_us":12}"#;
        let nested = r#"{"type":"enforcement","action":{"device":"pmem1","pid":7,"comm":"db","action":"signal","signal":"TERM","reason":"drain","since_departure_us":null}}"#;
        for l in [flat, nested] {
            match parse_line(l).unwrap() {
                Record::Note(n) => {
                    assert_eq!(n.kind, LogKind::Signal);
                    assert!(
                        n.text.starts_with("signal TERM to 7 db on pmem1"),
                        "{}",
                        n.text
                    );
                    assert_eq!(
                        n.news,
                        Some(DeviceNews::Fenced {
                            device: "pmem1".into()
                        })
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
