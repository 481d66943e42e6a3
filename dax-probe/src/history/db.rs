//! The incident database: a versioned schema (`PRAGMA user_version`) with forward
//! migrations, the agent's writes (one transaction per incident) and the read-only queries
//! of `dax-probe history`.
//!
//! What can be wrong with a database is said in [`HistoryError`], each with what to do and
//! an exit code of its own; the agent logs it once and carries on without history.

use std::{
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};

use super::{Incident, IncidentKind};
use crate::{
    exit::{Code, Failure},
    schema::{DevId, FileRef, HolderRow},
};

/// Schema steps: entry `i` takes a database from version `i` to `i + 1`. Only ever
/// appended to: a released step is never edited, or databases that ran it would differ.
pub const MIGRATIONS: &[&str] = &[V1];

/// The schema version this build writes and reads.
pub const VERSION: u32 = MIGRATIONS.len() as u32;

const V1: &str = "
CREATE TABLE incident (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    device TEXT,
    pfn INTEGER,
    result TEXT,
    action TEXT,
    pid INTEGER,
    signal TEXT,
    signalled TEXT NOT NULL DEFAULT '[]',
    not_signalled TEXT NOT NULL DEFAULT '[]',
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX incident_time ON incident (time);
CREATE INDEX incident_pfn ON incident (pfn) WHERE pfn IS NOT NULL;
CREATE TABLE incident_file (
    incident INTEGER NOT NULL REFERENCES incident (id),
    dev_major INTEGER NOT NULL,
    dev_minor INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    path TEXT,
    offset INTEGER NOT NULL
);
CREATE INDEX incident_file_incident ON incident_file (incident);
-- One row per (process, file) as the agent printed it; `row` is the whole HolderRow (JSON)
-- so fields added to it later come back too, the columns are for plain SQL.
CREATE TABLE incident_holder (
    incident INTEGER NOT NULL REFERENCES incident (id),
    pid INTEGER NOT NULL,
    comm TEXT NOT NULL,
    file TEXT,
    pages INTEGER NOT NULL,
    row TEXT NOT NULL
);
CREATE INDEX incident_holder_incident ON incident_holder (incident);
";

/// What is wrong with a history database, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(
        "no incident history at {0}: the agent (`dax-probe monitor`) records one there (pass \
         --history-db PATH or set DAX_PROBE_HISTORY_DB for another)"
    )]
    Missing(PathBuf),
    #[error(
        "{0} is not a readable incident history ({1}): the file is damaged or not an SQLite \
         database. Move it aside (the agent starts a new history at its next start) and keep \
         it for inspection"
    )]
    Corrupt(PathBuf, String),
    #[error(
        "{0} is locked by another process ({1}): the agent's writes never block a reader, so \
         something else holds it exclusively (an sqlite3 shell in a transaction?); end that \
         and retry"
    )]
    Locked(PathBuf, String),
    #[error(
        "{path} has schema version {found}, newer than this dax-probe's {known}: it was \
         written by a newer dax-probe; read it with that version (this one leaves it \
         untouched)"
    )]
    Newer {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("{0}: {1}")]
    Other(PathBuf, String),
}

impl HistoryError {
    pub fn code(&self) -> Code {
        match self {
            HistoryError::Missing(_) => Code::NoInput,
            HistoryError::Corrupt(..) => Code::DataErr,
            HistoryError::Locked(..) => Code::TempFail,
            HistoryError::Newer { .. } => Code::Protocol,
            HistoryError::Other(..) => Code::Software,
        }
    }

    fn of(path: &Path, e: rusqlite::Error) -> Self {
        let p = path.to_path_buf();
        match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                HistoryError::Corrupt(p, e.to_string())
            }
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                HistoryError::Locked(p, e.to_string())
            }
            _ => HistoryError::Other(p, e.to_string()),
        }
    }
}

impl From<HistoryError> for Failure {
    fn from(e: HistoryError) -> Self {
        Failure::new(e.code(), e.to_string())
    }
}

/// Runs the steps a database lacks, each in its own transaction with its version bump, and
/// returns the version it is at. A database from a newer build is refused untouched.
pub fn migrate(conn: &mut Connection, path: &Path, steps: &[&str]) -> Result<u32, HistoryError> {
    let err = |e| HistoryError::of(path, e);
    let found = user_version(conn).map_err(err)?;
    let known = steps.len() as u32;
    if found > known {
        return Err(HistoryError::Newer {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    for (i, step) in steps.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(step).map_err(err)?;
        tx.pragma_update(None, "user_version", i as u32 + 1)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(known)
}

fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// The agent's connection: creates the database (0600, in a 0700 directory it creates),
/// WAL, migrated to [`VERSION`].
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, HistoryError> {
        Self::open_with(path, MIGRATIONS)
    }

    fn open_with(path: &Path, steps: &[&str]) -> Result<Self, HistoryError> {
        let other = |e: std::io::Error| HistoryError::Other(path.to_path_buf(), e.to_string());
        if let Some(dir) = path.parent() {
            crate::fsutil::create_private_dir(dir).map_err(other)?;
        }
        // Created here, 0600 and never through a symlink, because SQLite would create it
        // with the umask's mode (its -wal and -shm files take this file's mode).
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(other)?;
        let m = f.metadata().map_err(other)?;
        // SAFETY: no arguments.
        let euid = unsafe { libc::geteuid() };
        if !m.file_type().is_file() || m.uid() != euid {
            return Err(HistoryError::Other(
                path.to_path_buf(),
                format!(
                    "not a regular file of uid {euid} (owned by uid {}): not trusted, move it \
                     aside",
                    m.uid()
                ),
            ));
        }
        drop(f);
        let err = |e| HistoryError::of(path, e);
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(err)?;
        // Short: the writer thread waits, never the event loop; a database someone holds
        // exclusively is reported, not waited for.
        conn.busy_timeout(Duration::from_secs(2)).map_err(err)?;
        migrate(&mut conn, path, steps)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!(
                "incident history {}: journal mode {mode}, not WAL",
                path.display()
            );
        }
        // Incidents are rare and meant to outlive a crash of the machine: every commit
        // reaches the disk.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> HistoryError {
        HistoryError::of(&self.path, e)
    }

    /// Stores one incident with its files and holders in one transaction; returns its id.
    pub fn insert(&mut self, i: &Incident) -> Result<i64, HistoryError> {
        let path = self.path.clone();
        let err = |e| HistoryError::of(&path, e);
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT INTO incident (time, kind, device, pfn, result, action, pid, signal, \
             signalled, not_signalled, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                i.time,
                i.kind.as_str(),
                i.device,
                i.pfn.map(|p| p as i64),
                i.result,
                i.action,
                i.pid,
                i.signal,
                json(&i.signalled),
                json(&i.not_signalled),
                i.detail,
            ],
        )
        .map_err(err)?;
        let id = tx.last_insert_rowid();
        for f in &i.files {
            tx.execute(
                "INSERT INTO incident_file (incident, dev_major, dev_minor, ino, path, offset) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    f.dev.major,
                    f.dev.minor,
                    f.ino as i64,
                    f.path,
                    f.offset as i64
                ],
            )
            .map_err(err)?;
        }
        insert_holders(&tx, id, &i.holders).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(id)
    }

    /// Completes the latest memory failure of `pfn` still without a verdict with the
    /// kernel's; without one (the agent started mid-failure) the verdict is stored alone.
    pub fn complete_failure(&mut self, v: &Incident) -> Result<i64, HistoryError> {
        let pfn = v.pfn.map(|p| p as i64);
        let open: Option<i64> = self
            .conn
            .query_row(
                "SELECT id FROM incident WHERE kind = ?1 AND pfn = ?2 AND result IS NULL \
                 ORDER BY id DESC LIMIT 1",
                params![IncidentKind::MemoryFailure.as_str(), pfn],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(id) = open else {
            return self.insert(v);
        };
        self.conn
            .execute(
                "UPDATE incident SET result = ?1, signalled = ?2, not_signalled = ?3, \
                 detail = detail || ?4 WHERE id = ?5",
                params![
                    v.result.as_deref().unwrap_or("unknown"),
                    json(&v.signalled),
                    json(&v.not_signalled),
                    format!("; {}", v.detail),
                    id
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(id)
    }

    /// Deletes incidents older than `keep`; returns how many.
    pub fn prune(&mut self, keep: Duration) -> Result<usize, HistoryError> {
        let cutoff = super::now() - keep.as_secs_f64();
        let path = self.path.clone();
        let err = |e| HistoryError::of(&path, e);
        let tx = self.conn.transaction().map_err(err)?;
        for child in ["incident_file", "incident_holder"] {
            tx.execute(
                &format!(
                    "DELETE FROM {child} WHERE incident IN (SELECT id FROM incident WHERE time < ?1)"
                ),
                params![cutoff],
            )
            .map_err(err)?;
        }
        let n = tx
            .execute("DELETE FROM incident WHERE time < ?1", params![cutoff])
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(n)
    }
}

/// Stores `incidents` right away (for one-shot commands such as `audit`, not the agent's
/// loop).
pub fn record_now(path: &Path, incidents: &[Incident]) -> Result<(), HistoryError> {
    let mut s = Store::open(path)?;
    for i in incidents {
        s.insert(i)?;
    }
    Ok(())
}

fn json(v: &[u32]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn insert_holders(tx: &rusqlite::Transaction, id: i64, rows: &[HolderRow]) -> rusqlite::Result<()> {
    for h in rows {
        tx.execute(
            "INSERT INTO incident_holder (incident, pid, comm, file, pages, row) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                id,
                h.pid,
                h.comm,
                h.file,
                h.pages as i64,
                serde_json::to_string(h).unwrap_or_default()
            ],
        )?;
    }
    Ok(())
}

/// `dax-probe history`'s connection: read-only, so it never changes what the agent wrote
/// (nor migrates it).
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
    pub fn open(path: &Path, busy: Duration) -> Result<Self, HistoryError> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(HistoryError::Missing(path.to_path_buf()));
            }
            Err(e) => return Err(HistoryError::Other(path.to_path_buf(), e.to_string())),
            Ok(_) => {}
        }
        let err = |e| HistoryError::of(path, e);
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(err)?;
        conn.busy_timeout(busy).map_err(err)?;
        // The first read is where a damaged, foreign or locked file shows.
        let found = user_version(&conn).map_err(err)?;
        if found > VERSION {
            return Err(HistoryError::Newer {
                path: path.to_path_buf(),
                found,
                known: VERSION,
            });
        }
        if found == 0 {
            return Err(HistoryError::Corrupt(
                path.to_path_buf(),
                "an SQLite database without dax-probe's schema".into(),
            ));
        }
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> HistoryError {
        HistoryError::of(&self.path, e)
    }

    /// Incidents at or after `since` (epoch seconds) of `device`, newest first, with their
    /// files and holders.
    pub fn list(
        &self,
        since: Option<f64>,
        device: Option<&str>,
    ) -> Result<Vec<Incident>, HistoryError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, time, kind, device, pfn, result, action, pid, signal, signalled, \
                 not_signalled, detail FROM incident WHERE time >= ?1 AND (?2 IS NULL OR device = ?2) \
                 ORDER BY time DESC, id DESC",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![since.unwrap_or(f64::MIN), device], |r| {
                let kind: String = r.get(2)?;
                let ids = |s: String| serde_json::from_str::<Vec<u32>>(&s).unwrap_or_default();
                Ok(Incident {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    kind: IncidentKind::parse(&kind).ok_or_else(|| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Text,
                            format!("unknown incident kind {kind:?}").into(),
                        )
                    })?,
                    device: r.get(3)?,
                    pfn: r.get::<_, Option<i64>>(4)?.map(|p| p as u64),
                    result: r.get(5)?,
                    action: r.get(6)?,
                    pid: r.get(7)?,
                    signal: r.get(8)?,
                    signalled: ids(r.get(9)?),
                    not_signalled: ids(r.get(10)?),
                    detail: r.get(11)?,
                    files: Vec::new(),
                    holders: Vec::new(),
                })
            })
            .map_err(|e| self.err(e))?;
        let mut out = rows
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        for i in &mut out {
            i.files = self.files(i.id)?;
            i.holders = self.holders(i.id)?;
        }
        Ok(out)
    }

    fn files(&self, id: i64) -> Result<Vec<FileRef>, HistoryError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT dev_major, dev_minor, ino, path, offset FROM incident_file \
                 WHERE incident = ?1 ORDER BY rowid",
            )
            .map_err(|e| self.err(e))?;
        st.query_map([id], |r| {
            Ok(FileRef {
                dev: DevId {
                    major: r.get(0)?,
                    minor: r.get(1)?,
                },
                ino: r.get::<_, i64>(2)? as u64,
                path: r.get(3)?,
                offset: r.get::<_, i64>(4)? as u64,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| self.err(e))
    }

    fn holders(&self, id: i64) -> Result<Vec<HolderRow>, HistoryError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT row FROM incident_holder WHERE incident = ?1 ORDER BY rowid")
            .map_err(|e| self.err(e))?;
        let rows: Vec<String> = st
            .query_map([id], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|s| {
                serde_json::from_str(s).map_err(|e| {
                    HistoryError::Corrupt(self.path.clone(), format!("a holder row: {e}"))
                })
            })
            .collect()
    }

    /// `PRAGMA integrity_check`: `["ok"]` when the database is sound, else its findings.
    pub fn integrity_check(&self) -> Result<Vec<String>, HistoryError> {
        let mut st = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(|e| self.err(e))?;
        st.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holders::query::RowExtent;

    const DEV: DevId = DevId {
        major: 259,
        minor: 1,
    };

    fn row(pid: u32) -> HolderRow {
        HolderRow {
            pid,
            start_time: 1200,
            comm: "postgres".into(),
            dev: DEV,
            ino: 12,
            file: Some("/mnt/xfs/db".into()),
            pages: 2,
            offsets: vec![(0, 8192)],
            probe_at: Vec::new(),
            extents: Some(vec![RowExtent {
                vaddr: 0x7f00_0000_0000,
                pfn: 0x10_9000,
                offset: 0,
                pages: 2,
            }]),
            cgroup: None,
            container: None,
            pod_uid: None,
        }
    }

    fn failure(pfn: u64) -> Incident {
        let mut i = Incident::new(
            IncidentKind::MemoryFailure,
            Some("pmem1".into()),
            "raised by inject (201)".into(),
        );
        i.pfn = Some(pfn);
        i.files = vec![FileRef {
            dev: DEV,
            ino: 12,
            path: Some("/mnt/xfs/db".into()),
            offset: 0x5000,
        }];
        i.holders = vec![row(150), row(151)];
        i
    }

    fn reader(p: &Path) -> Reader {
        Reader::open(p, Duration::from_millis(100)).unwrap()
    }

    #[test]
    fn incidents_come_back_newest_first_with_files_holders_and_verdict() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state/incidents.db");
        let mut s = Store::open(&p).unwrap();
        let mut dep = Incident::new(IncidentKind::Departure, Some("pmem2".into()), "x".into());
        dep.time -= 10.0;
        dep.holders = vec![row(7)];
        s.insert(&dep).unwrap();
        let f = failure(0x10_8410);
        let id = s.insert(&f).unwrap();
        let mut verdict = Incident::new(IncidentKind::MemoryFailure, None, "Recovered".into());
        verdict.pfn = f.pfn;
        verdict.result = Some("Recovered".into());
        verdict.signalled = vec![150];
        verdict.not_signalled = vec![151];
        assert_eq!(s.complete_failure(&verdict).unwrap(), id);
        let got = reader(&p).list(None, None).unwrap();
        assert_eq!(got.len(), 2);
        let mf = &got[0];
        assert_eq!(mf.kind, IncidentKind::MemoryFailure);
        assert_eq!(mf.files, f.files);
        assert_eq!(mf.holders, f.holders);
        assert_eq!(mf.result.as_deref(), Some("Recovered"));
        assert_eq!(
            (mf.signalled.clone(), mf.not_signalled.clone()),
            (vec![150], vec![151])
        );
        assert_eq!(got[1].holders, vec![row(7)]);
        // Filters: a device, a time.
        let r = reader(&p);
        assert_eq!(r.list(None, Some("pmem2")).unwrap().len(), 1);
        assert_eq!(r.list(Some(dep.time + 5.0), None).unwrap()[0].id, id);
        assert_eq!(r.integrity_check().unwrap(), ["ok"]);
        // A verdict without its start (the agent started mid-failure) is kept alone.
        let mut lone = verdict.clone();
        lone.pfn = Some(0x1);
        s.complete_failure(&lone).unwrap();
        assert_eq!(reader(&p).list(None, None).unwrap().len(), 3);
        // Private: the state directory 0700, the database 0600, WAL.
        use std::os::unix::fs::PermissionsExt;
        let mode = |q: &Path| std::fs::metadata(q).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        let jm: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(jm, "wal");
    }

    #[test]
    fn prune_drops_old_incidents_with_their_rows() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("incidents.db");
        let mut s = Store::open(&p).unwrap();
        let mut old = failure(5);
        old.time -= 100.0 * 86_400.0;
        s.insert(&old).unwrap();
        s.insert(&failure(6)).unwrap();
        assert_eq!(s.prune(Duration::from_secs(90 * 86_400)).unwrap(), 1);
        let left = reader(&p).list(None, None).unwrap();
        assert_eq!(left.iter().map(|i| i.pfn).collect::<Vec<_>>(), [Some(6)]);
        let orphans: i64 = s
            .conn
            .query_row(
                "SELECT count(*) FROM incident_holder WHERE incident NOT IN (SELECT id FROM incident)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(orphans, 0);
    }

    #[test]
    fn migrations_run_from_empty_and_stop_at_a_newer_version() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("m.db");
        // A v0 database: an empty file (what SQLite makes of a new path).
        std::fs::write(&p, b"").unwrap();
        let mut c = Connection::open(&p).unwrap();
        assert_eq!(migrate(&mut c, &p, MIGRATIONS).unwrap(), 1);
        assert_eq!(user_version(&c).unwrap(), 1);
        // Running again changes nothing.
        assert_eq!(migrate(&mut c, &p, MIGRATIONS).unwrap(), 1);
        // A later build's step runs once, on top of v1, and keeps the data.
        c.execute(
            "INSERT INTO incident (time, kind) VALUES (1.0, 'departure')",
            [],
        )
        .unwrap();
        let v2 = "ALTER TABLE incident ADD COLUMN cgroup TEXT;";
        assert_eq!(migrate(&mut c, &p, &[V1, v2]).unwrap(), 2);
        let n: i64 = c
            .query_row("SELECT count(cgroup IS NULL) FROM incident", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!((user_version(&c).unwrap(), n), (2, 1));
        // A failing step leaves the version where it was (its transaction rolls back).
        let mut c2 = Connection::open(t.path().join("m2.db")).unwrap();
        let e = migrate(&mut c2, &p, &[V1, "CREATE TABLE incident (x);"]).unwrap_err();
        assert!(matches!(e, HistoryError::Other(..)), "{e}");
        assert_eq!(user_version(&c2).unwrap(), 1);
        // This build meets the v2 database: refused, untouched.
        let e = migrate(&mut c, &p, MIGRATIONS).unwrap_err();
        assert!(
            matches!(
                e,
                HistoryError::Newer {
                    found: 2,
                    known: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(user_version(&c).unwrap(), 2);
    }

    #[test]
    fn a_file_of_garbage_is_reported_corrupt() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("incidents.db");
        std::fs::write(&p, vec![0x5a; 8192]).unwrap();
        let e = Reader::open(&p, Duration::from_millis(100)).err().unwrap();
        assert!(matches!(e, HistoryError::Corrupt(..)), "{e}");
        assert_eq!(e.code(), Code::DataErr);
        assert!(e.to_string().contains("Move it aside"), "{e}");
        let e = Store::open(&p).err().unwrap();
        assert!(matches!(e, HistoryError::Corrupt(..)), "{e}");
        // Left as it was, for inspection.
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x5a; 8192]);
    }

    #[test]
    fn a_newer_schema_is_refused_by_reader_and_writer() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("incidents.db");
        let c = Connection::open(&p).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = Reader::open(&p, Duration::from_millis(100)).err().unwrap();
        assert!(matches!(e, HistoryError::Newer { found: 99, .. }), "{e}");
        assert_eq!(e.code(), Code::Protocol);
        assert!(e.to_string().contains("newer dax-probe"), "{e}");
        let e = Store::open(&p).err().unwrap();
        assert!(matches!(e, HistoryError::Newer { found: 99, .. }), "{e}");
    }

    #[test]
    fn an_exclusive_lock_is_reported_as_locked() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("incidents.db");
        Store::open(&p).unwrap().insert(&failure(9)).unwrap();
        let holder = Connection::open(&p).unwrap();
        holder
            .execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE;")
            .unwrap();
        // The lock is taken by the first access in exclusive mode.
        holder
            .execute(
                "INSERT INTO incident (time, kind) VALUES (1.0, 'departure')",
                [],
            )
            .unwrap();
        let e = Reader::open(&p, Duration::from_millis(100)).err().unwrap();
        assert!(matches!(e, HistoryError::Locked(..)), "{e}");
        assert_eq!(e.code(), Code::TempFail);
        assert!(e.to_string().contains("locked"), "{e}");
        let e = Store::open(&p).err().unwrap();
        assert!(matches!(e, HistoryError::Locked(..)), "{e}");
        drop(holder);
        assert_eq!(reader(&p).list(None, None).unwrap().len(), 1);
    }

    #[test]
    fn no_database_and_a_foreign_one_are_told_apart() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("none.db");
        let e = Reader::open(&p, Duration::from_millis(100)).err().unwrap();
        assert!(matches!(e, HistoryError::Missing(_)), "{e}");
        assert_eq!(e.code(), Code::NoInput);
        assert!(!p.exists(), "a reader creates nothing");
        let q = t.path().join("foreign.db");
        Connection::open(&q)
            .unwrap()
            .execute_batch("CREATE TABLE t (x);")
            .unwrap();
        let e = Reader::open(&q, Duration::from_millis(100)).err().unwrap();
        assert!(matches!(e, HistoryError::Corrupt(..)), "{e}");
    }

    #[test]
    fn a_symlinked_database_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = t.path().join("incidents.db");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(Store::open(&link).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
