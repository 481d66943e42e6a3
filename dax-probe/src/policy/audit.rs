//! The audit log: one JSON object per line for every decision and every signal, written and
//! flushed to disk before the action it describes, so the log is complete even if the agent
//! dies the next instant.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use serde::Serialize;

pub const DEFAULT_AUDIT_LOG: &str = "/var/log/dax-probe/audit.jsonl";

pub struct AuditLog {
    file: File,
    pub path: PathBuf,
    /// A write failed and could not be undone: the file may end in a partial line, so the
    /// next record starts on a new line.
    torn: bool,
}

/// One audit record.
#[derive(Clone, Debug, Serialize)]
pub struct Record<'a> {
    /// Wall-clock time, seconds since the epoch.
    pub time: f64,
    /// What the record is about: `drain`, `fence`, `decide`, `signal`, `skip`, `escalate`,
    /// `verify`, `unmount`, `unbind`, `done` (each written before the step it names runs), and
    /// `result`: what a `signal`, `escalate`, `unmount` or `unbind` did, written after it.
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
    /// The process's cgroup, container and pod (records about one process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a crate::proc::cgroup::Container>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<&'a str>,
    pub detail: String,
}

impl<'a> Record<'a> {
    /// A record about a device, no process (callers set the process fields they have).
    pub fn device(action: &'a str, device: &'a str, detail: String) -> Self {
        Record {
            time: now(),
            action,
            device,
            pid: None,
            start_time: None,
            comm: None,
            signal: None,
            cgroup: None,
            container: None,
            pod_uid: None,
            detail,
        }
    }
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = crate::fsutil::open_append_private(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            torn: false,
        })
    }

    /// Writes one record and makes it durable (write + fdatasync). On an error nothing of
    /// it stays in the log (a partial write is cut off again), so a full disk leaves no torn
    /// line for a reader to trip on.
    pub fn write(&mut self, r: &Record) -> std::io::Result<()> {
        let line = serde_json::to_string(r).map_err(std::io::Error::other)?;
        append_line(&mut self.file, &mut self.torn, &line)
    }

    /// Writes several records with one write and one fdatasync (a decision about many
    /// processes costs one disk flush, not one per process); on an error none stays.
    pub fn write_all(&mut self, rs: &[Record]) -> std::io::Result<()> {
        if rs.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::with_capacity(rs.len());
        for r in rs {
            lines.push(serde_json::to_string(r).map_err(std::io::Error::other)?);
        }
        append_line(&mut self.file, &mut self.torn, &lines.join("\n"))
    }
}

/// What [`append_line`] needs of the log file (a fake one in tests fills up).
trait LogFile: Write {
    fn len(&self) -> std::io::Result<u64>;
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
}

impl LogFile for File {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
}

fn append_line(f: &mut impl LogFile, torn: &mut bool, line: &str) -> std::io::Result<()> {
    let mut buf = String::with_capacity(line.len() + 2);
    if *torn {
        buf.push('\n');
    }
    buf.push_str(line);
    buf.push('\n');
    let before = f.len()?;
    let written = f
        .write_all(buf.as_bytes())
        .and_then(|()| f.flush())
        .and_then(|()| f.sync());
    if let Err(e) = written {
        // Undo the partial line; when even that fails, the next record starts afresh.
        *torn = f.truncate(before).and_then(|()| f.sync()).is_err();
        return Err(e);
    }
    *torn = false;
    Ok(())
}
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log file on a disk with `room` bytes left.
    struct Full {
        data: Vec<u8>,
        room: usize,
        can_truncate: bool,
    }

    impl Write for Full {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = b.len().min(self.room);
            self.data.extend_from_slice(&b[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl LogFile for Full {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.data.len() as u64)
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            if !self.can_truncate {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            self.room += self.data.len() - len as usize;
            self.data.truncate(len as usize);
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(f: &Full) -> Vec<String> {
        String::from_utf8(f.data.clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_full_disk_leaves_no_torn_line() {
        let mut f = Full {
            data: Vec::new(),
            room: 30,
            can_truncate: true,
        };
        let mut torn = false;
        append_line(&mut f, &mut torn, r#"{"a":1}"#).unwrap();
        let e = append_line(&mut f, &mut torn, r#"{"action":"unbind","detail":"long"}"#);
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(lines(&f), vec![r#"{"a":1}"#]);
        assert!(!torn);
        // Room again: the next record is whole, on its own line.
        f.room = 100;
        append_line(&mut f, &mut torn, r#"{"b":2}"#).unwrap();
        assert_eq!(lines(&f), vec![r#"{"a":1}"#, r#"{"b":2}"#]);
    }

    #[test]
    fn a_tear_that_cannot_be_undone_does_not_swallow_the_next_record() {
        let mut f = Full {
            data: Vec::new(),
            room: 12,
            can_truncate: false,
        };
        let mut torn = false;
        assert!(append_line(&mut f, &mut torn, r#"{"action":"signal"}"#).is_err());
        assert!(torn);
        f.room = 100;
        append_line(&mut f, &mut torn, r#"{"b":2}"#).unwrap();
        let l = lines(&f);
        assert_eq!(l.last().map(String::as_str), Some(r#"{"b":2}"#), "{l:?}");
        assert!(serde_json::from_str::<serde_json::Value>(&l[1]).is_ok());
    }
}
