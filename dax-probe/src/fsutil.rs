//! Files and directories the root agent creates or trusts.
//!
//! Paths like `--socket /tmp/x.sock` or `--audit-log` may lie in directories other users can
//! write: whatever already sits there may be theirs (a symlink to /etc/shadow, a directory
//! they chmod'ed, a state file they wrote). So: directories we create are 0700 and a
//! directory that exists is never chmod'ed; files are opened without following symlinks and
//! created 0600; only sockets are ever removed; state files are replaced atomically and
//! trusted only when root owns them.

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt},
    path::Path,
};

/// Creates `dir` and its missing parents 0700. Existing directories are left as they are:
/// the parent of `--socket /tmp/x.sock` is /tmp, whose mode is not ours to change.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Removes a stale socket at `path`; anything else there (a file, a symlink, a directory)
/// is refused, never deleted: `lstat`, so a symlink is judged as itself.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket: refusing to remove it (pass another --socket)",
                path.display()
            ),
        )),
    }
}

/// Opens an append-only log: created 0600 (its directory 0700 when we create it), never
/// through a symlink.
pub fn open_append_private(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| nofollow_error(path, e))
}

/// Replaces `path` with `bytes` so that a crash leaves the old content or the new, never a
/// mix: a 0600 temporary file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    create_private_dir(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // A leftover of ours from a crash; O_EXCL below refuses anything planted meanwhile.
    let _ = remove_if_regular(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = remove_if_regular(&tmp);
    }
    result
}

fn remove_if_regular(p: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(p)?.file_type().is_file() {
        std::fs::remove_file(p)?;
    }
    Ok(())
}

/// Why a state file was not trusted.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    #[error("{0} is owned by uid {1}, not root: ignored (remove it)")]
    Owner(String, u32),
    #[error("{0} is not a regular file: ignored (remove it)")]
    NotFile(String),
    #[error("{0}: {1}")]
    Io(String, io::Error),
}

/// Reads a state file only root can have written: not through a symlink, a regular file
/// owned by root. `Ok(None)` when there is none.
pub fn read_root_owned(path: &Path) -> Result<Option<Vec<u8>>, Untrusted> {
    read_owned_by(path, 0)
}

fn read_owned_by(path: &Path, uid: u32) -> Result<Option<Vec<u8>>, Untrusted> {
    let name = || path.display().to_string();
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Untrusted::Io(name(), nofollow_error(path, e))),
    };
    let m = f.metadata().map_err(|e| Untrusted::Io(name(), e))?;
    if !m.file_type().is_file() {
        return Err(Untrusted::NotFile(name()));
    }
    if m.uid() != uid {
        return Err(Untrusted::Owner(name(), m.uid()));
    }
    let mut b = Vec::new();
    f.read_to_end(&mut b)
        .map_err(|e| Untrusted::Io(name(), e))?;
    Ok(Some(b))
}

/// ELOOP from O_NOFOLLOW, said plainly.
fn nofollow_error(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            e.kind(),
            format!("{} is a symlink: refusing to follow it", path.display()),
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn an_existing_directory_keeps_its_mode_and_new_ones_are_private() {
        let t = tempfile::tempdir().unwrap();
        let shared = t.path().join("tmp");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        create_private_dir(&shared).unwrap();
        assert_eq!(mode(&shared), 0o1777);
        let new = shared.join("a/b");
        create_private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        assert_eq!(mode(&shared.join("a")), 0o700);
    }

    #[test]
    fn only_sockets_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("x.sock");
        std::fs::write(&file, "precious").unwrap();
        assert!(remove_stale_socket(&file).is_err());
        assert!(file.exists());
        let link = t.path().join("l.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(remove_stale_socket(&link).is_err());
        assert!(link.exists());
        let sock = t.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        remove_stale_socket(&sock).unwrap();
        assert!(!sock.exists());
        remove_stale_socket(&sock).unwrap();
    }

    #[test]
    fn the_log_is_private_and_never_opened_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("new/audit.log");
        open_append_private(&log).unwrap();
        assert_eq!(mode(&log), 0o600);
        assert_eq!(mode(log.parent().unwrap()), 0o700);
        let victim = t.path().join("victim");
        std::fs::write(&victim, "").unwrap();
        let link = t.path().join("evil.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = open_append_private(&link).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
    }

    #[test]
    fn atomic_writes_replace_whole_and_leave_no_temporary() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state/departed.json");
        write_atomic(&p, b"[1]").unwrap();
        write_atomic(&p, b"[1,2]").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"[1,2]");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        // A symlink planted at the path is replaced, not written through.
        let victim = t.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let q = t.path().join("state/other.json");
        std::os::unix::fs::symlink(&victim, &q).unwrap();
        write_atomic(&q, b"[]").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn state_files_of_another_owner_or_through_symlinks_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let me = std::fs::metadata(t.path()).unwrap().uid();
        let p = t.path().join("departed.json");
        assert!(read_owned_by(&p, me).unwrap().is_none());
        std::fs::write(&p, "[]").unwrap();
        assert_eq!(read_owned_by(&p, me).unwrap().unwrap(), b"[]");
        let e = read_owned_by(&p, me + 1).unwrap_err();
        assert!(matches!(e, Untrusted::Owner(_, u) if u == me), "{e}");
        let link = t.path().join("link.json");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(read_owned_by(&link, me).is_err());
        assert!(read_owned_by(t.path(), me).is_err());
    }
}
