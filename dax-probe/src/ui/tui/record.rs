//! One line of `monitor --json` output, parsed back: what the TUI consumes, live or replayed.
//!
//! Live, the agent's outputs arrive as typed [`Line`]s; a replay parses the same lines
//! from a file into the same type. One schema, one model: a replay shows what the live
//! dashboard showed.
//!
//! Unknown `type`s are not errors (newer agents may add lines); lines that are not JSON
//! objects with a `type`, or whose known type lacks its fields, are malformed.

use serde_json::Value;

use crate::{
    event::Event,
    holders::{FileKey, query::HolderRow},
    schema::Line,
    topology::Topology,
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
    /// Bound again while `old_binding` processes still map its old binding.
    Rebound {
        device: String,
        old_binding: usize,
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
    Unknown,
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

fn pids(p: &[u32]) -> String {
    if p.is_empty() {
        return "none".into();
    }
    p.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
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

/// Parses one line of `monitor --json` (or `drain --json`) output into the schema's type.
pub fn parse_line(line: &str) -> Result<Line, ParseError> {
    let line = line.trim();
    serde_json::from_str::<Line>(line).map_err(|e| {
        // Only a line that failed is looked at again, to say how it is malformed.
        match serde_json::from_str::<Value>(line) {
            Err(j) => ParseError::NotJson(j.to_string()),
            Ok(v) => match v.get("type").and_then(Value::as_str) {
                None => ParseError::NoType,
                Some(t) => ParseError::Fields(t.to_string(), e.to_string()),
            },
        }
    })
}

/// What the dashboard makes of a line.
pub fn record(line: Line) -> Record {
    match line {
        Line::Attached(a) => Record::Attached { kernel: a.kernel },
        Line::Topology(t) => Record::Topology(t),
        Line::Holders(h) => Record::Holders {
            pids: h.pids,
            rows: h.rows,
        },
        Line::File(f) => Record::File {
            key: FileKey {
                dev: f.dev,
                ino: f.ino,
            },
            path: f.path,
        },
        Line::Fault(f) => Record::Event(Event::Fault(f)),
        Line::Zap(z) => Record::Event(Event::Zap(z)),
        Line::Fork(f) => Record::Event(Event::Fork(f)),
        Line::Mremap(m) => Record::Event(Event::Mremap(m)),
        Line::Device(d) => Record::Event(Event::Device(d)),
        Line::DeviceDeparting {
            ts_ns,
            device,
            by_pid,
            by_comm,
            driver,
            holders,
            holder_pages,
            ..
        } => Record::Note(Note {
            ts_ns: Some(ts_ns),
            kind: LogKind::Departure,
            text: format!(
                "{} DEPARTING: unbound from {} by {} {}; {} holder row(s), {} pages{}",
                device,
                if driver.is_empty() { "?" } else { &driver },
                by_pid,
                by_comm,
                holders.len(),
                holder_pages,
                if holders.is_empty() {
                    String::new()
                } else {
                    format!(": {}", who(&holders))
                }
            ),
            news: Some(DeviceNews::Departing { device, holders }),
        }),
        Line::DeviceGone {
            ts_ns,
            device,
            still_mapped,
            took_ms,
            ..
        } => Record::Note(Note {
            ts_ns: Some(ts_ns),
            kind: LogKind::Departure,
            text: format!(
                "{} GONE after {:.1} ms{}",
                device,
                took_ms,
                if still_mapped.is_empty() {
                    String::new()
                } else {
                    format!("; STALE mappings left: {}", who(&still_mapped))
                }
            ),
            news: Some(DeviceNews::Gone {
                device,
                still_mapped: still_mapped.len(),
            }),
        }),
        Line::DeviceRebound {
            ts_ns,
            device,
            old_binding,
            old_binding_pages,
            ..
        } => Record::Note(Note {
            ts_ns: Some(ts_ns),
            kind: LogKind::Departure,
            text: format!(
                "{device} BOUND AGAIN while {} process(es) map its old binding ({} pages:                  they can read the new tenant's data; `dax-probe audit`): {}",
                old_binding.len(),
                old_binding_pages,
                who(&old_binding)
            ),
            news: Some(DeviceNews::Rebound {
                device,
                old_binding: old_binding.len(),
            }),
        }),
        Line::DeviceReconfiguring {
            ts_ns,
            device,
            mode,
            driver,
            holders,
            ..
        } => note(
            Some(ts_ns),
            LogKind::Info,
            format!(
                "{device} ({mode}) RECONFIGURING: {driver} unbound, namespace stays{}",
                if holders.is_empty() {
                    String::new()
                } else {
                    format!("; mappings zapped by the kernel: {}", who(&holders))
                }
            ),
        ),
        Line::DaxShutOff { ts_ns, device } => note(
            Some(ts_ns),
            LogKind::Info,
            format!(
                "DAX access shut off for {}",
                device.as_deref().unwrap_or("a device")
            ),
        ),
        Line::FsNotified { ts_ns, meaning, .. } => note(Some(ts_ns), LogKind::Info, meaning),
        Line::MemoryFailure {
            ts_ns,
            pfn,
            device,
            holders,
            ..
        } => note(
            Some(ts_ns),
            LogKind::Failure,
            format!(
                "MEMORY FAILURE pfn {pfn:#x} on {}: {}",
                device.as_deref().unwrap_or("no known device"),
                who(&holders)
            ),
        ),
        Line::MemoryFailureResult {
            ts_ns,
            pfn,
            result,
            signalled,
            not_signalled,
            ..
        } => note(
            Some(ts_ns),
            LogKind::Failure,
            format!(
                "memory failure pfn {pfn:#x}: {}; SIGBUS to {}; NOT signalled: {}",
                result.as_deref().unwrap_or("?"),
                pids(&signalled),
                pids(&not_signalled)
            ),
        ),
        Line::KernelSigbus {
            sigbus,
            cause,
            media_error,
        } => note(
            Some(sigbus.ts_ns),
            LogKind::Signal,
            format!(
                "kernel SIGBUS {} to {} {}: {cause}{}",
                sigbus.code,
                sigbus.pid,
                sigbus.comm,
                media_error
                    .map(|m| format!(" (on known-bad media {m})"))
                    .unwrap_or_default()
            ),
        ),
        Line::MediaError(m) => note(Some(m.ts_ns), LogKind::Failure, m.summary()),
        Line::MmapDenied { denied, device } => note(
            Some(denied.ts_ns),
            LogKind::Denied,
            format!(
                "mmap DENIED {} {} on fenced {}",
                denied.pid,
                denied.comm,
                device.as_deref().unwrap_or("device")
            ),
        ),
        Line::UnbindRefused {
            refused, device, ..
        } => note(
            Some(refused.ts_ns),
            LogKind::Denied,
            format!(
                "unbind REFUSED {} {} of {}",
                refused.pid,
                refused.comm,
                device.as_deref().unwrap_or(&refused.written)
            ),
        ),
        Line::FenceSignal { sent, device } => note(
            Some(sent.ts_ns),
            LogKind::Signal,
            format!(
                "fence {} to {} {} on {}",
                sent.signal,
                sent.pid,
                sent.comm,
                device.as_deref().unwrap_or("device")
            ),
        ),
        Line::Enforcement(a) => {
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
        Line::Reconcile(r) => {
            let kind = if r.reason == "events lost" {
                LogKind::Drop
            } else {
                LogKind::Info
            };
            note(
                None,
                kind,
                format!(
                    "reconcile ({}): corrected {} missing and {} extra pages",
                    r.reason, r.missing, r.extra
                ),
            )
        }
        Line::HooksChanged(u) => note(
            None,
            LogKind::Info,
            format!(
                "hooks: {}: now {} (was {})",
                u.concern.name(),
                u.chosen,
                u.was.as_deref().unwrap_or("unavailable")
            ),
        ),
        Line::Drain(d) => note(None, LogKind::Drain, format!("{}: {}", d.step, d.message)),
        Line::Audit(a) => note(
            None,
            LogKind::Info,
            format!(
                "audit: {} stale mapping(s) into {} departed range(s)",
                a.stale.len(),
                a.departed_ranges.len()
            ),
        ),
        Line::Dropped(d) => Record::Dropped(d.dropped),
        Line::Summary(s) => Record::Dropped(s.dropped),
        // `history` prints these, never an agent.
        Line::Incident(_) | Line::Unknown => Record::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_fault_line_as_the_monitor_prints_it() {
        let line = r#"{"type":"fault","ts_ns":12649205000,"tgid":165,"tid":165,"comm":"dax-workload","dev":{"major":259,"minor":1},"ino":12,"offset":0,"address":4096,"page_address":4096,"pfn":1085440,"pfn_source":"kernel","page_size":4096,"write":true,"mapped":true,"zero_page":false,"result":"NOPAGE","result_raw":256,"vma_start":0,"vma_end":8192,"shared":true,"device":"pmem0","devdax":false}"#;
        match record(parse_line(line).unwrap()) {
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
    fn a_media_error_is_a_failure_in_the_event_pane() {
        let line = r#"{"type":"media_error","ts_ns":5,"device":"pmem1","list":"/sys/block/pmem1/badblocks","scope":"block","sector":40,"sectors":8,"namespace":"namespace1.0","phys":{"start":4303380480,"end":4303384576},"pfns":[1050630,1050631],"dev_bytes":[20480,24576],"mount":"/mnt/xfs","files":[{"path":"/mnt/xfs/a","ino":12,"offset":20480,"end":24576,"shared":true},{"path":"/mnt/xfs/b","ino":13,"offset":20480,"end":24576,"shared":true}],"space":[],"holders":[]}"#;
        match record(parse_line(line).unwrap()) {
            Record::Note(n) => {
                assert_eq!(n.kind, LogKind::Failure);
                assert_eq!(n.ts_ns, Some(5));
                for want in [
                    "MEDIA ERROR pmem1 sectors 40+8",
                    "/mnt/xfs/a@0x5000-0x6000",
                    "/mnt/xfs/b@0x5000-0x6000",
                    "mapped by nobody",
                ] {
                    assert!(n.text.contains(want), "{want} in {}", n.text);
                }
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
            parse_line(r#"{"type":"from_the_future","x":1}"#).map(record),
            Ok(Record::Unknown)
        ));
    }

    #[test]
    fn enforcement_has_one_shape() {
        let flat = r#"{"type":"enforcement","device":"pmem1","pid":7,"comm":"db","action":"signal","signal":"TERM","reason":"device departing","since_departure_us":12}"#;
        let nested = r#"{"type":"enforcement","action":{"device":"pmem1","pid":7,"comm":"db","action":"signal","signal":"TERM","reason":"drain","since_departure_us":null}}"#;
        // `drain --json` used to nest the action; it prints the monitor's flat shape now,
        // and the nested one is malformed.
        assert!(matches!(
            parse_line(nested),
            Err(ParseError::Fields(t, _)) if t == "enforcement"
        ));
        {
            match record(parse_line(flat).unwrap()) {
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
