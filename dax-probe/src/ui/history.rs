//! `dax-probe history`: the incidents the monitor recorded, newest first, read-only.

use std::{io::Write, path::PathBuf, time::Duration};

use crate::{
    exit::{Code, Failure},
    history::{Incident, IncidentKind, db::Reader, now, utc},
    schema::Line,
};

pub struct Options<'a> {
    pub path: PathBuf,
    pub since: Option<Duration>,
    pub device: Option<&'a str>,
    pub json: bool,
    /// Only `PRAGMA integrity_check`.
    pub check: bool,
}

/// How long a reader waits for a lock before saying the database is locked (the agent's
/// own writes are short transactions that a WAL reader does not wait for anyway).
const BUSY: Duration = Duration::from_secs(2);

pub fn run(o: &Options) -> anyhow::Result<()> {
    let r = Reader::open(&o.path, BUSY).map_err(Failure::from)?;
    let mut out = std::io::stdout().lock();
    if o.check {
        let found = r.integrity_check().map_err(Failure::from)?;
        for l in &found {
            writeln!(out, "{l}")?;
        }
        if found != ["ok"] {
            return Err(Failure::new(
                Code::DataErr,
                format!(
                    "{} fails SQLite's integrity check: copy what is readable (`history \
                     --json`), then move it aside; the agent starts a new one",
                    o.path.display()
                ),
            )
            .into());
        }
        return Ok(());
    }
    let device = o.device.map(|d| d.strip_prefix("/dev/").unwrap_or(d));
    let since = o.since.map(|d| now() - d.as_secs_f64());
    let incidents = r.list(since, device).map_err(Failure::from)?;
    for i in incidents {
        if o.json {
            writeln!(out, "{}", Line::Incident(i).to_json())?;
        } else {
            writeln!(out, "{}", text(&i))?;
        }
    }
    Ok(())
}

/// An incident as lines for people: what, when, where, then its files and holders.
pub fn text(i: &Incident) -> String {
    let mut s = format!(
        "{}  {}  {}",
        utc(i.time),
        i.kind.as_str(),
        i.device.as_deref().unwrap_or("-")
    );
    if let Some(p) = i.pfn {
        s += &format!("  pfn {p:#x}");
    }
    match i.kind {
        IncidentKind::MemoryFailure => {
            s += &format!(
                "  kernel: {}",
                i.result.as_deref().unwrap_or("no verdict recorded")
            )
        }
        IncidentKind::Enforcement => {
            s += &format!(
                "  {} pid {}{}: {}",
                i.action.as_deref().unwrap_or("?"),
                i.pid.map_or_else(|| "?".into(), |p| p.to_string()),
                i.signal
                    .as_deref()
                    .map(|x| format!(" SIG{x}"))
                    .unwrap_or_default(),
                i.result.as_deref().unwrap_or("")
            )
        }
        _ => {}
    }
    s += &format!("\n    {}", i.detail);
    for f in &i.files {
        s += &format!(
            "\n    file {} offset {:#x}",
            f.path
                .clone()
                .unwrap_or_else(|| format!("{}:{}", f.dev, f.ino)),
            f.offset
        );
    }
    for h in &i.holders {
        s += &format!(
            "\n    holder pid {} ({}) {} pages of {}",
            h.pid,
            h.comm,
            h.pages,
            h.file.as_deref().unwrap_or("?")
        );
    }
    if !i.signalled.is_empty() || !i.not_signalled.is_empty() {
        s += &format!(
            "\n    SIGBUS from the kernel: {:?}; left mapped: {:?}",
            i.signalled, i.not_signalled
        );
    }
    s
}
