//! The audit log: one JSON object per line for every decision and every signal, written and
//! flushed to disk before the action it describes, so the log is complete even if the agent
//! dies the next instant. One kind of record may be written ahead of its flush
//! ([`AuditLog::write_ahead`]): the record of a kernel-side step (the fence) whose effects
//! die with the machine as the unflushed record would; the next flush, at the latest the
//! one before the agent's first signal, makes it durable.

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
    ahead: Ahead,
}

/// Records written ahead of their flush ([`AuditLog::write_ahead`]) and not yet known durable.
#[derive(Default)]
struct Ahead {
    pending: bool,
    /// A write or flush failed while they were pending: a later fdatasync that succeeds
    /// does not prove them on disk (the kernel reports a writeback error once).
    lost: bool,
}

impl Ahead {
    /// After a durable write (or its failure): a flush covers the whole file.
    fn flushed(&mut self, r: &std::io::Result<()>) {
        match r {
            Ok(()) if !self.lost => self.pending = false,
            Ok(()) => {}
            Err(_) => self.lost |= self.pending,
        }
    }

    /// Are the records written ahead durable now? `Ok` when none is pending.
    fn settle(&mut self, sync: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        let was = std::mem::take(self);
        if !was.pending {
            return Ok(());
        }
        if was.lost {
            return Err(std::io::Error::other(
                "a write or flush of the log failed after it: it may not be on disk",
            ));
        }
        sync()
    }
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
            ahead: Ahead::default(),
        })
    }

    /// Writes one record and makes it durable (write + fdatasync). On an error nothing of
    /// it stays in the log (a partial write is cut off again), so a full disk leaves no torn
    /// line for a reader to trip on.
    pub fn write(&mut self, r: &Record) -> std::io::Result<()> {
        let line = serde_json::to_string(r).map_err(std::io::Error::other)?;
        let w = append_line(&mut self.file, &mut self.torn, &line, true);
        self.ahead.flushed(&w);
        w
    }

    /// Writes one record into the file (readers see it; it outlives the agent) without
    /// waiting for the disk: the next durable write flushes it with its own, and
    /// [`AuditLog::settle`] says whether it is on disk. On an error nothing of it stays.
    pub fn write_ahead(&mut self, r: &Record) -> std::io::Result<()> {
        let line = serde_json::to_string(r).map_err(std::io::Error::other)?;
        append_line(&mut self.file, &mut self.torn, &line, false)?;
        self.ahead.pending = true;
        Ok(())
    }

    /// Makes the records written ahead durable if no flush did yet; an error when one
    /// that covered them failed.
    pub fn settle(&mut self) -> std::io::Result<()> {
        let file = &mut self.file;
        self.ahead.settle(|| file.sync_data())
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
        let w = append_line(&mut self.file, &mut self.torn, &lines.join("\n"), true);
        self.ahead.flushed(&w);
        w
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

/// Appends `line`; `durable`: and waits for the disk (fdatasync).
fn append_line(
    f: &mut impl LogFile,
    torn: &mut bool,
    line: &str,
    durable: bool,
) -> std::io::Result<()> {
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
        .and_then(|()| if durable { f.sync() } else { Ok(()) });
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
        append_line(&mut f, &mut torn, r#"{"a":1}"#, true).unwrap();
        let e = append_line(
            &mut f,
            &mut torn,
            r#"{"action":"unbind","detail":"long"}"#,
            true,
        );
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(lines(&f), vec![r#"{"a":1}"#]);
        assert!(!torn);
        // Room again: the next record is whole, on its own line.
        f.room = 100;
        append_line(&mut f, &mut torn, r#"{"b":2}"#, true).unwrap();
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
        assert!(append_line(&mut f, &mut torn, r#"{"action":"signal"}"#, true).is_err());
        assert!(torn);
        f.room = 100;
        append_line(&mut f, &mut torn, r#"{"b":2}"#, true).unwrap();
        let l = lines(&f);
        assert_eq!(l.last().map(String::as_str), Some(r#"{"b":2}"#), "{l:?}");
        assert!(serde_json::from_str::<serde_json::Value>(&l[1]).is_ok());
    }

    /// A record written ahead is durable once a flush covered it: a later durable write's,
    /// else `settle`'s own. A write or flush that failed in between leaves it unproven, even
    /// when a later fdatasync succeeds (the kernel reports a writeback error only once).
    #[test]
    fn a_record_written_ahead_is_settled_by_the_next_flush_and_never_after_a_failure() {
        let (ok, eio) = (Ok(()), Err(std::io::Error::from_raw_os_error(libc::EIO)));
        let syncs = std::cell::Cell::new(0);
        let sync = || {
            syncs.set(syncs.get() + 1);
            Ok(())
        };
        // Nothing written ahead: nothing to flush.
        assert!(Ahead::default().settle(sync).is_ok());
        // Written ahead, no flush since: settle flushes it.
        let mut a = Ahead {
            pending: true,
            ..Ahead::default()
        };
        assert!(a.settle(sync).is_ok());
        // Written ahead, then a durable write: covered, no second flush.
        let mut b = Ahead {
            pending: true,
            ..Ahead::default()
        };
        b.flushed(&ok);
        assert!(b.settle(sync).is_ok());
        assert_eq!(syncs.get(), 1);
        // Written ahead, then a failed durable write, then a good one: not proven.
        let mut c = Ahead {
            pending: true,
            ..Ahead::default()
        };
        c.flushed(&eio);
        c.flushed(&ok);
        assert!(c.settle(sync).is_err());
        assert_eq!(syncs.get(), 1, "no flush can prove it now");
        // Settled is settled: the next one starts afresh.
        assert!(c.settle(sync).is_ok());
        // A failure with nothing written ahead taints nothing.
        let mut d = Ahead::default();
        d.flushed(&eio);
        assert!(!d.lost);
    }

    /// On a real file: the record written ahead is in the log at once (a reader, or the
    /// agent's successor, sees it), and the next durable write keeps it before its own.
    #[test]
    fn a_record_written_ahead_is_in_the_file_before_its_flush() {
        let dir = std::env::temp_dir().join(format!("dax-probe-ahead-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut log = AuditLog::open(&path).unwrap();
        log.write_ahead(&Record::device("fence", "pmem0", "ahead".into()))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(r#""action":"fence""#), "{text}");
        log.write(&Record::device("decide", "pmem0", "flushed".into()))
            .unwrap();
        log.settle().unwrap();
        let actions: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["action"].to_string())
            .collect();
        assert_eq!(actions, [r#""fence""#, r#""decide""#]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
