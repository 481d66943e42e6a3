//! Incident history: departures, memory failures, enforcement decisions and stale mappings,
//! kept in SQLite so "which files and processes did last week's memory failure hit" has an
//! answer after the agent, or the machine, restarted.
//!
//! - [`db`]: the database (schema versions and their migrations, writes, read-only queries,
//!   the integrity check) and what goes wrong with one (corrupt, locked, newer);
//! - [`recorder`]: the agent's side. The event loop hands it the lines it prints; a writer
//!   thread of its own stores them, one transaction per incident, so a slow disk never
//!   stalls the loop (a full queue drops incidents, counted and logged).
//!
//! `dax-probe history` reads the database read-only (WAL: it works while the agent writes).

pub mod db;
pub mod recorder;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema::{FileRef, HolderRow};

/// Where the agent keeps the history (its state directory, root only).
pub const DEFAULT_DB: &str = "/var/lib/dax-probe/incidents.db";
/// Overrides [`DEFAULT_DB`] when no `--history-db` is given (tests, containers).
pub const DB_ENV: &str = "DAX_PROBE_HISTORY_DB";
/// Incidents older than this are pruned when the agent starts.
pub const DEFAULT_KEEP: &str = "90d";

/// The database path: the flag, else `$DAX_PROBE_HISTORY_DB`, else [`DEFAULT_DB`].
pub fn db_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(DB_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DB))
}

/// How the agent keeps its history.
#[derive(Clone, Debug)]
pub struct Settings {
    pub path: PathBuf,
    /// Incidents older than this are pruned at start.
    pub keep: Duration,
}

/// What an incident is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncidentKind {
    /// A device was unbound (`device_departing`).
    Departure,
    /// A poisoned pfn (`memory_failure`, completed by `memory_failure_result`).
    MemoryFailure,
    /// One enforcement decision or signal (`enforcement`).
    Enforcement,
    /// Holders still mapped a device after it was gone (`device_gone.still_mapped`).
    StaleMappings,
}

impl IncidentKind {
    pub const ALL: [IncidentKind; 4] = [
        IncidentKind::Departure,
        IncidentKind::MemoryFailure,
        IncidentKind::Enforcement,
        IncidentKind::StaleMappings,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IncidentKind::Departure => "departure",
            IncidentKind::MemoryFailure => "memory_failure",
            IncidentKind::Enforcement => "enforcement",
            IncidentKind::StaleMappings => "stale_mappings",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One stored incident, as `history --json` prints it (a `type: "incident"` line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Incident {
    /// Row id: later incidents have larger ids.
    pub id: i64,
    /// Wall-clock time the agent saw it, seconds since the epoch.
    pub time: f64,
    pub kind: IncidentKind,
    pub device: Option<String>,
    /// memory_failure: the poisoned pfn.
    pub pfn: Option<u64>,
    /// memory_failure: the kernel's verdict (`Recovered`, `Failed`, …), none until the
    /// kernel reported it; enforcement: the decision's reason.
    pub result: Option<String>,
    /// enforcement: `signal`, `escalate`, `skip`, `report-only`.
    pub action: Option<String>,
    /// enforcement: the process acted on.
    pub pid: Option<u32>,
    pub signal: Option<String>,
    /// memory_failure: every file (and offset) the page backed.
    pub files: Vec<FileRef>,
    /// The holders at the time: of the departing device, of the poisoned page, or the
    /// stale ones.
    pub holders: Vec<HolderRow>,
    /// memory_failure: processes the kernel sent SIGBUS.
    pub signalled: Vec<u32>,
    /// memory_failure: holders the kernel left alone.
    pub not_signalled: Vec<u32>,
    /// One sentence for people.
    pub detail: String,
}

impl Incident {
    /// An incident of `kind` seen now, every optional part empty.
    pub fn new(kind: IncidentKind, device: Option<String>, detail: String) -> Self {
        Self {
            id: 0,
            time: now(),
            kind,
            device,
            pfn: None,
            result: None,
            action: None,
            pid: None,
            signal: None,
            files: Vec::new(),
            holders: Vec::new(),
            signalled: Vec::new(),
            not_signalled: Vec::new(),
            detail,
        }
    }
}

/// What `audit` found, as incidents: one per former device, its stale mappings as holders.
/// `audit` reads page tables, not the map, so the rows know no device or inode (0:0, 0),
/// nor a start time; `offsets` holds the virtual range instead of file offsets.
pub fn stale_incidents(stale: &[crate::schema::Stale]) -> Vec<Incident> {
    let mut out: Vec<Incident> = Vec::new();
    for s in stale {
        let pos = match out
            .iter()
            .position(|i| i.device.as_deref() == Some(s.former_device.as_str()))
        {
            Some(p) => p,
            None => {
                out.push(Incident::new(
                    IncidentKind::StaleMappings,
                    Some(s.former_device.clone()),
                    format!(
                        "`dax-probe audit` found page tables still pointing into departed {}",
                        s.former_device
                    ),
                ));
                out.len() - 1
            }
        };
        out[pos].holders.push(HolderRow {
            pid: s.pid,
            start_time: 0,
            comm: s.comm.clone(),
            dev: crate::schema::DevId { major: 0, minor: 0 },
            ino: 0,
            file: Some(s.file.clone()),
            pages: s.pages,
            offsets: vec![(s.vaddr_start, s.vaddr_end)],
            extents: None,
            probe_at: Vec::new(),
            cgroup: None,
            container: None,
            pod_uid: None,
        });
    }
    out
}

/// Wall-clock seconds since the epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// An age such as `7d`, `12h`, `30m`, `90s` or `2w` (a bare number is days): `--since`
/// and `--history-keep` count in days, not the seconds of a signal's grace.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "d" => 86_400,
        "w" => 7 * 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => 0,
    };
    match num.parse::<u64>() {
        // Ten years is longer than any pmem module lives.
        Ok(n) if mult > 0 && n.saturating_mul(mult) <= 3650 * 86_400 => {
            Ok(Duration::from_secs(n * mult))
        }
        Ok(_) if mult > 0 => Err(format!("age {s:?} is too long: at most 3650d")),
        _ => Err(format!(
            "bad age {s:?}: use a number of days, weeks, hours, minutes or seconds, e.g. \
             \"7d\", \"2w\", \"12h\""
        )),
    }
}

/// `YYYY-MM-DD HH:MM:SSZ` of epoch seconds (UTC; no time-zone database needed).
pub fn utc(time: f64) -> String {
    let secs = time.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_count_in_days_and_bad_ones_are_refused() {
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("90"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_age("5s"), Ok(Duration::from_secs(5)));
        for bad in ["", "d", "7x", "-1d", "1.5d", "7 days"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
        assert!(parse_age("99999d").unwrap_err().contains("too long"));
    }

    #[test]
    fn utc_dates_are_civil() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_796_170_496.5), "2026-12-02 00:14:56Z");
    }

    #[test]
    fn the_flag_wins_over_the_environment() {
        assert_eq!(db_path(Some(Path::new("/x.db"))), PathBuf::from("/x.db"));
    }

    #[test]
    fn audit_findings_become_one_incident_per_device() {
        let stale = |pid, dev: &str| crate::schema::Stale {
            pid,
            comm: "reader".into(),
            vaddr_start: 0x1000,
            vaddr_end: 0x3000,
            pages: 2,
            first_pfn: 0x12_8000,
            former_device: dev.into(),
            file: "/mnt/a".into(),
            verified: true,
        };
        let got = stale_incidents(&[stale(1, "pmem1"), stale(2, "pmem2"), stale(3, "pmem1")]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].device.as_deref(), Some("pmem1"));
        assert_eq!(
            got[0].holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
            [1, 3]
        );
        assert_eq!(got[1].holders[0].pages, 2);
        assert!(got.iter().all(|i| i.kind == IncidentKind::StaleMappings));
        assert!(stale_incidents(&[]).is_empty());
    }

    #[test]
    fn kinds_parse_back() {
        for k in IncidentKind::ALL {
            assert_eq!(IncidentKind::parse(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
        }
        assert_eq!(IncidentKind::parse("x"), None);
    }
}
