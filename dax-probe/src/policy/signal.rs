//! Signal names and pidfd delivery.

use std::{fmt, str::FromStr};

/// A signal the operator named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal(pub i32);

const NAMES: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("TERM", libc::SIGTERM),
    ("STOP", libc::SIGSTOP),
    ("CONT", libc::SIGCONT),
];

impl Signal {
    pub fn name(self) -> String {
        NAMES
            .iter()
            .find(|(_, n)| *n == self.0)
            .map(|(s, _)| format!("SIG{s}"))
            .unwrap_or_else(|| format!("signal {}", self.0))
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown signal {0:?}: use one of TERM, KILL, BUS, INT, HUP, QUIT, USR1, USR2, STOP (with or without SIG, or a number)"
)]
pub struct BadSignal(pub String);

impl FromStr for Signal {
    type Err = BadSignal;
    fn from_str(s: &str) -> Result<Self, BadSignal> {
        let t = s.trim();
        if let Ok(n) = t.parse::<i32>() {
            return if (1..=64).contains(&n) {
                Ok(Signal(n))
            } else {
                Err(BadSignal(s.to_string()))
            };
        }
        let up = t.to_ascii_uppercase();
        let bare = up.strip_prefix("SIG").unwrap_or(&up);
        NAMES
            .iter()
            .find(|(n, _)| *n == bare)
            .map(|(_, v)| Signal(*v))
            .ok_or_else(|| BadSignal(s.to_string()))
    }
}

/// A process pinned by a pidfd: signals reach exactly the process opened, never a later
/// process that reused its pid.
pub struct PidFd {
    fd: i32,
    pub pid: u32,
}

impl PidFd {
    pub fn open(pid: u32) -> std::io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd: fd as i32, pid })
    }

    pub fn send(&self, sig: Signal) -> std::io::Result<()> {
        // SAFETY: plain syscall on our pidfd, no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd,
                sig.0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl std::os::fd::AsRawFd for PidFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd
    }
}

/// Which of the processes behind `pidfds` have exited, from one `poll` of them all: a
/// pidfd reads ready once its process has exited (a zombie included) and its last thread
/// with it. `None` for a descriptor poll could not judge (not a pidfd), or for all of them
/// when poll itself failed: the caller then asks /proc.
pub fn exited(pidfds: &[std::os::fd::RawFd]) -> Vec<Option<bool>> {
    let mut fds: Vec<libc::pollfd> = pidfds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid array of `fds.len()` pollfds; timeout 0 never blocks.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    if rc < 0 {
        return vec![None; pidfds.len()];
    }
    fds.iter()
        .map(|p| {
            if p.revents & libc::POLLNVAL != 0 {
                None
            } else {
                // 6.9+ adds POLLHUP once the process is reaped.
                Some(p.revents & (libc::POLLIN | libc::POLLHUP) != 0)
            }
        })
        .collect()
}

impl Drop for PidFd {
    fn drop(&mut self) {
        // SAFETY: our fd.
        unsafe { libc::close(self.fd) };
    }
}

/// Parses `10s`, `500ms`, `2m`, `0`.
/// The longest duration a policy or the command line may give: `Instant::now() + d` is then
/// always representable (a grace of "1e19s" used to pass here and panic mid-departure).
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// `10s`, `500ms`, `2m` or plain seconds, from 0 to [`MAX_DURATION`]; the error says why.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("bad duration {s:?}: use e.g. \"10s\", \"500ms\", \"2m\"");
    let secs = duration_secs(s).ok_or_else(bad)?;
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "duration {s:?} is too long: at most {}s (one day)",
            MAX_DURATION.as_secs()
        ));
    }
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn duration_secs(s: &str) -> Option<f64> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    (v >= 0.0 && v.is_finite()).then_some(v * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_in_every_spelling() {
        assert_eq!("TERM".parse(), Ok(Signal(libc::SIGTERM)));
        assert_eq!("sigkill".parse(), Ok(Signal(libc::SIGKILL)));
        assert_eq!("SIGBUS".parse(), Ok(Signal(libc::SIGBUS)));
        assert_eq!("15".parse(), Ok(Signal(15)));
        assert!("SIGFOO".parse::<Signal>().is_err());
        assert!("0".parse::<Signal>().is_err());
        assert_eq!(Signal(libc::SIGTERM).name(), "SIGTERM");
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").unwrap_err().contains("bad duration"));
        // Passed validation and overflowed `Instant::now() + grace` mid-departure.
        for huge in ["1e19s", "1e300", "86401s", "1441m"] {
            let e = parse_duration(huge).unwrap_err();
            assert!(e.contains("too long"), "{huge}: {e}");
        }
        assert_eq!(parse_duration("1440m"), Ok(MAX_DURATION));
        assert!(
            std::time::Instant::now()
                .checked_add(MAX_DURATION)
                .is_some()
        );
    }
}
