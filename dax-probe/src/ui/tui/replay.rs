//! `tui --replay FILE [--speed N]`: a recorded `monitor --json` session played back on any
//! machine, without root or pmem, through the same model as the live dashboard.
//!
//! Lines with a `ts_ns` are paced by it (`--speed` times faster); state lines without one
//! (topology, holders, file, reconcile) go out at once, in order. An idle stretch longer
//! than [`MAX_GAP`] of wall time is shortened to it. Pausing the dashboard stops the clock.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::SyncSender,
    },
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::{
    feed::FeedMsg,
    model::Model,
    record::{DeviceNews, Record, parse_line, record},
};
use crate::holders::query::HolderRow;

/// The longest wall-clock wait between two recorded events.
pub const MAX_GAP: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(50);

#[derive(Deserialize)]
struct Ts {
    ts_ns: Option<u64>,
}

fn ts_of(line: &str) -> Option<u64> {
    serde_json::from_str::<Ts>(line).ok().and_then(|t| t.ts_ns)
}

/// Plays `path` into `tx` on a thread of its own.
pub fn spawn(
    path: PathBuf,
    speed: f64,
    paused: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    tx: SyncSender<FeedMsg>,
) -> std::io::Result<()> {
    let file = std::fs::File::open(&path)?;
    std::thread::Builder::new()
        .name("dax-probe-replay".into())
        .spawn(move || {
            let mut clock: Option<(u64, Instant)> = None; // (recorded ns, wall time it maps to)
            let mut last_ts = 0u64;
            for line in BufReader::new(file).lines() {
                let line = match line {
                    Ok(l) => l,
                    Err(e) => {
                        // Not UTF-8 or unreadable: the model counts it as malformed.
                        let _ = tx.send(FeedMsg::Text(format!("<unreadable line: {e}>")));
                        continue;
                    }
                };
                if let Some(ts) = ts_of(&line) {
                    match clock {
                        None => clock = Some((ts, Instant::now())),
                        Some((t0, w0)) if ts > last_ts => {
                            let due = w0 + replay_gap(ts - t0, speed);
                            let mut wait_start = Instant::now();
                            loop {
                                if quit.load(Ordering::Relaxed) {
                                    return;
                                }
                                let now = Instant::now();
                                if paused.load(Ordering::Relaxed) {
                                    std::thread::sleep(TICK);
                                    wait_start = Instant::now();
                                    continue;
                                }
                                if now >= due || now - wait_start >= MAX_GAP {
                                    break;
                                }
                                std::thread::sleep(TICK.min(due - now));
                                let cursor = t0.saturating_add(
                                    ((Instant::now().saturating_duration_since(w0)).as_secs_f64()
                                        * speed
                                        * 1e9) as u64,
                                );
                                let _ = tx.send(FeedMsg::Clock(cursor.min(ts)));
                            }
                            // Re-anchor: pauses and shortened gaps shift the mapping.
                            clock = Some((ts, Instant::now()));
                        }
                        _ => {}
                    }
                    last_ts = last_ts.max(ts);
                }
                if tx.send(FeedMsg::Text(line)).is_err() {
                    return;
                }
                if let Some(ts) = ts_of_last(last_ts) {
                    let _ = tx.send(FeedMsg::Clock(ts));
                }
            }
            let _ = tx.send(FeedMsg::Ended(None));
        })?;
    Ok(())
}

/// Wall time between two recorded timestamps `ns` apart at `speed`, never above
/// [`MAX_GAP`]: a recording's timestamps are whatever its author wrote, and a gap of 2^64 ns
/// at speed 1e-300 is not a `Duration` (nor is `Instant` + it).
fn replay_gap(ns: u64, speed: f64) -> Duration {
    Duration::try_from_secs_f64(ns as f64 / 1e9 / speed)
        .unwrap_or(MAX_GAP)
        .min(MAX_GAP)
}

fn ts_of_last(ts: u64) -> Option<u64> {
    (ts > 0).then_some(ts)
}

/// Reads a whole recording into `model` at once (for `--print-frame` and tests). Returns
/// the checks of [`Checker`].
pub fn load(model: &mut Model, path: &Path) -> std::io::Result<Checker> {
    let text = std::fs::read(path)?;
    let text = String::from_utf8_lossy(&text);
    Ok(load_str(model, &text))
}

pub fn load_str(model: &mut Model, text: &str) -> Checker {
    let mut check = Checker::default();
    for line in text.lines() {
        check.before(model, line);
        let _ = model.ingest(line);
    }
    check
}

/// Compares the replayed holder map with what the live agent reported at the same moment:
/// every `device_departing` report lists the holders the live map had; the replay must have
/// the same ones (pid, file, pages) for that device right then.
#[derive(Debug, Default)]
pub struct Checker {
    pub agreed: usize,
    pub disagreed: Vec<String>,
}

fn key(rows: &[HolderRow]) -> Vec<(u32, Option<String>, u64)> {
    let mut k: Vec<_> = rows
        .iter()
        .map(|r| (r.pid, r.file.clone(), r.pages))
        .collect();
    k.sort();
    k
}

impl Checker {
    fn before(&mut self, model: &mut Model, line: &str) {
        let Ok(Record::Note(n)) = parse_line(line).map(record) else {
            return;
        };
        let Some(DeviceNews::Departing { device, holders }) = n.news else {
            return;
        };
        let snap = model.snapshot();
        let Some(i) = snap.devices.iter().position(|d| d.name == device) else {
            self.disagreed.push(format!(
                "{device}: departing, but the replay never saw the device"
            ));
            return;
        };
        let replayed: Vec<(u32, Option<String>, u64)> = {
            let mut k: Vec<_> = snap.holders[i]
                .iter()
                .map(|h| (h.pid, h.file.clone(), h.pages))
                .collect();
            k.sort();
            k
        };
        let live = key(&holders);
        if replayed == live {
            self.agreed += 1;
        } else {
            self.disagreed.push(format!(
                "{device}: the live agent reported holders {live:?}, the replay has {replayed:?}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_timestamps_give_bounded_gaps() {
        assert_eq!(replay_gap(1_000_000_000, 1.0), Duration::from_secs(1));
        assert_eq!(replay_gap(u64::MAX, 1e-300), MAX_GAP);
        assert_eq!(replay_gap(u64::MAX, 1.0), MAX_GAP);
        assert_eq!(replay_gap(0, 10.0), Duration::ZERO);
    }
}
