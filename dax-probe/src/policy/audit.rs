//! The audit log: one JSON object per line for every decision and every signal, written and
//! flushed to disk before the action it describes, so the log is complete even if the agent
//! dies the next instant.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use serde::Serialize;

pub const DEFAULT_AUDIT_LOG: &str = "/var/log/dax-probe/audit.jsonl";

pub struct AuditLog {
    file: File,
    pub path: PathBuf,
}

/// One audit record.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// Wall-clock time, seconds since the epoch.
    pub time: f64,
    /// What the record is about: `drain`, `departure`, `fence`, `decide`, `signal`, `skip`,
    /// `escalate`, `verify`, `unmount`, `unbind`, `done`.
    pub action: &'a str,
    pub device: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    pub detail: String,
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Writes and syncs one record.
    pub fn write(&mut self, r: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_string(r).map_err(std::io::Error::other)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()?;
        self.file.sync_data()
    }
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
