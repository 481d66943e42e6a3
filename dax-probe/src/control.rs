//! The monitor's control socket: `dax-probe holders` (and tests) ask the running agent
//! instead of scanning every process. One JSON request per connection, one JSON answer.
//!
//! The socket is root-only (0600 in a 0700 directory): answers name processes and
//! physical addresses.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::holders::{
    Stats,
    query::{HolderRow, Target},
};

pub const DEFAULT_SOCKET: &str = "/run/dax-probe/agent.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Holders of a target as the operator typed it (the agent resolves it against its own
    /// topology); `pages` adds every extent.
    Holders {
        target: String,
        pages: bool,
    },
    Stats,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub rows: Vec<HolderRow>,
    #[serde(default)]
    pub stats: Option<AgentStats>,
    /// Time the agent spent answering (sync with the kernel included), microseconds.
    #[serde(default)]
    pub elapsed_us: u64,
    /// The resolved target.
    #[serde(default)]
    pub target: Option<Target>,
    /// For a refusal: the exit code the CLI should use.
    #[serde(default)]
    pub code: Option<i32>,
}

impl Response {
    pub fn ok(mut self) -> Self {
        self.ok = true;
        self.error = None;
        self
    }

    pub fn error(code: Option<i32>, msg: String) -> Self {
        Self {
            ok: false,
            error: Some(msg),
            rows: Vec::new(),
            stats: None,
            elapsed_us: 0,
            target: None,
            code,
        }
    }
}

/// What the agent reports about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStats {
    pub holders: usize,
    pub extents: usize,
    pub map_bytes: usize,
    pub events: u64,
    pub dropped: u64,
    #[serde(flatten)]
    pub map: MapStats,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct MapStats {
    pub drift_missing: u64,
    pub drift_extra: u64,
    pub reconciles: u64,
    pub unattributed_zaps: u64,
    pub resyncs: u64,
}

impl From<Stats> for MapStats {
    fn from(s: Stats) -> Self {
        Self {
            drift_missing: s.drift_missing,
            drift_extra: s.drift_extra,
            reconciles: s.reconciles,
            unattributed_zaps: s.unattributed_zaps,
            resyncs: s.resyncs,
        }
    }
}

/// Creates the socket's directory (0700) and removes a stale socket file.
pub fn prepare(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if path.exists() {
        // A live agent answers; a dead one left its socket behind.
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "another dax-probe monitor is running (it answers on {}); stop it or pass \
                     --socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Asks the running agent; `Ok(None)` when no agent listens there.
pub fn ask(path: &Path, req: &Request) -> anyhow::Result<Option<Response>> {
    let Ok(mut s) = UnixStream::connect(path) else {
        return Ok(None);
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    serde_json::to_writer(&mut s, req)?;
    s.write_all(b"\n")?;
    s.flush()?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok(Some(serde_json::from_str(&line)?))
}

pub fn socket_path(arg: Option<&Path>) -> PathBuf {
    arg.map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}
