//! The monitor's control socket: `dax-probe holders` (and tests) ask the running agent
//! instead of scanning every process. One JSON request per connection, one JSON answer.
//!
//! The socket is root-only (0600 in a 0700 directory): answers name processes and
//! physical addresses.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{io::AsRawFd, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    fsutil,
    holders::{
        Stats,
        query::{HolderRow, Target},
    },
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
    /// A stream: the answer (ok, or why not), then the agent's typed lines (`schema::Line`,
    /// JSON lines) starting with a snapshot (`attached`, `topology`, a whole-map `holders`).
    /// A subscriber that falls [`SUBSCRIBER_QUEUE`] lines behind is disconnected, its last
    /// line a `Response` with `ok: false` and the reason (see `agent::control`); it
    /// subscribes again for a fresh snapshot.
    Subscribe,
    /// Unbind `device` by writing it to `path` (a `driver/unbind` file of the nd or dax
    /// bus), as `drain --unbind` does once it verified nobody maps the device: the agent
    /// writes it itself, so its unbind guard lets it through. Refused while the agent's map
    /// still has holders of the device. Audited by the agent.
    Unbind {
        device: String,
        path: PathBuf,
    },
}

/// Subscribers an agent serves at once (dashboards; each costs a queue and a task).
pub const MAX_SUBSCRIBERS: usize = 8;
/// Lines queued for one subscriber before it counts as stalled and is cut off.
pub const SUBSCRIBER_QUEUE: usize = 8192;

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
    /// Set when the agent could not take in every event the kernel emitted before the
    /// question within [`SYNC_WAIT`]: the rows may miss holders (or list some that left),
    /// so the client scans page tables instead. "Nobody maps it" is never said from a map
    /// that is behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind: Option<String>,
}

/// Longest time the agent waits for its reader to hand over what the kernel emitted
/// before a question.
pub const SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Can the client print the agent's rows as the answer? Not when the agent was behind the
/// kernel: the client scans then.
pub fn answer_is_current(resp: &Response) -> bool {
    resp.behind.is_none()
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
            behind: None,
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

/// Creates the socket's directory (0700, when it does not exist), removes a stale socket
/// (never anything else) and listens, the socket created 0600 from the start.
pub fn bind_private(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        fsutil::create_private_dir(dir)?;
    }
    if std::fs::symlink_metadata(path).is_ok() && UnixStream::connect(path).is_ok() {
        // A live agent answers; a dead one left its socket behind.
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "another dax-probe monitor is running (it answers on {}); stop it or pass \
                 --socket",
                path.display()
            ),
        ));
    }
    fsutil::remove_stale_socket(path)?;
    // The mode comes from the umask at bind time; a chmod after bind would follow a symlink
    // swapped in meanwhile. Nothing else creates files while the agent starts.
    // SAFETY: umask only swaps the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let l = std::os::unix::net::UnixListener::bind(path);
    unsafe { libc::umask(old) };
    l.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    })
}

/// Is the process at the other end of `s` root? The socket is 0600, but its directory may
/// be a shared one; the kernel's SO_PEERCRED is the only answer a client cannot forge.
pub fn peer_is_root(s: &impl AsRawFd) -> std::io::Result<bool> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid out-parameters of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid == 0)
}

/// The one line a non-root client gets.
pub fn not_root_line() -> String {
    let r = Response::error(
        Some(crate::exit::Code::NoPermission as i32),
        "the dax-probe agent answers root only (answers name processes and physical \
         addresses): run as root"
            .into(),
    );
    let mut line = serde_json::to_string(&r).unwrap_or_default();
    line.push('\n');
    line
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn binding_in_a_shared_directory_leaves_it_alone() {
        let t = tempfile::tempdir().unwrap();
        let shared = t.path().join("tmp");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let sock = shared.join("x.sock");
        let l = bind_private(&sock).unwrap();
        assert_eq!(std::fs::metadata(&shared).unwrap().mode() & 0o7777, 0o1777);
        assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);
        // Live: refused. Stale: replaced.
        assert_eq!(
            bind_private(&sock).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        drop(l);
        bind_private(&sock).unwrap();
        // Not a socket: kept, refused.
        let file = shared.join("precious");
        std::fs::write(&file, "x").unwrap();
        assert!(bind_private(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn peer_credentials_come_from_the_kernel() {
        let (a, _b) = UnixStream::pair().unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(peer_is_root(&a).unwrap(), root);
        let line = not_root_line();
        let r: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(r.code, Some(crate::exit::Code::NoPermission as i32));
    }
}
