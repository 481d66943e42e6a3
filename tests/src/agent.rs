//! Running the real agent binary (`/bin/dax-probe`) inside the guest and reading what it
//! printed.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::sys;

pub const AGENT: &str = "/bin/dax-probe";

/// A `dax-probe monitor --json` running in the background.
pub struct Monitor {
    child: Option<Child>,
    pub out: PathBuf,
    pub err: PathBuf,
}

impl Monitor {
    /// Starts the monitor and waits until it reports its programs attached (TCG is slow to
    /// verify and attach: allow a minute).
    pub fn start(tag: &str, extra: &[&str]) -> Result<Self> {
        Self::start_on(tag, extra, None)
    }

    /// Like [`Monitor::start`], optionally pinned to one CPU.
    pub fn start_on(tag: &str, extra: &[&str], cpu: Option<usize>) -> Result<Self> {
        let out = PathBuf::from(format!("/tmp/agent-{tag}.jsonl"));
        let err = PathBuf::from(format!("/tmp/agent-{tag}.err"));
        let mut cmd = Command::new(AGENT);
        if let Some(cpu) = cpu {
            sys::pin_to_cpu(&mut cmd, cpu);
        }
        let child = cmd
            .args(["monitor", "--json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out)?)
            .stderr(fs::File::create(&err)?)
            .spawn()
            .context("spawn dax-probe monitor")?;
        let mut m = Monitor {
            child: Some(child),
            out,
            err,
        };
        let attached = sys::wait_for(Duration::from_secs(90), || {
            fs::read_to_string(&m.out)
                .map(|s| s.contains("\"type\":\"attached\""))
                .unwrap_or(false)
                || m.exited()
        });
        if !attached || m.exited() {
            let err = fs::read_to_string(&m.err).unwrap_or_default();
            bail!("agent did not attach: {}", err.trim());
        }
        Ok(m)
    }

    /// Waits until the agent has printed at least `n` mapped fault events of process `tgid`
    /// (events reach the agent within its poll interval; the pagemap fallback also needs the
    /// process alive while the agent decodes).
    pub fn wait_for_faults(&self, tgid: u32, n: usize, timeout: Duration) -> bool {
        let needle = format!("\"tgid\":{tgid},");
        sys::wait_for(timeout, || {
            fs::read_to_string(&self.out)
                .map(|t| {
                    t.lines()
                        .filter(|l| {
                            l.contains("\"type\":\"fault\"")
                                && l.contains(&needle)
                                && l.contains("\"mapped\":true")
                        })
                        .count()
                        >= n
                })
                .unwrap_or(false)
        })
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Ctrl-C the agent, wait for it, and return every JSON line it printed.
    pub fn stop(mut self) -> Result<Output> {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let mut status = None;
        sys::wait_for(Duration::from_secs(30), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        let status = match status {
            Some(s) => s,
            None => {
                let _ = child.kill();
                bail!("agent ignored SIGINT for 30 s");
            }
        };
        self.read(status.code())
    }

    /// Every JSON line the agent printed so far, leaving it be: for an agent the kernel
    /// holds in an uninterruptible wait (a wedged unbind), which neither SIGINT nor SIGKILL
    /// can end. Its summary line is missing then.
    pub fn peek(mut self) -> Result<Output> {
        std::mem::forget(self.child.take());
        self.read(None)
    }

    fn read(&self, exit_code: Option<i32>) -> Result<Output> {
        let text = fs::read_to_string(&self.out)?;
        let lines: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("agent printed non-JSON: {l}"))
            })
            .collect::<Result<_>>()?;
        Ok(Output {
            lines,
            stderr: fs::read_to_string(&self.err).unwrap_or_default(),
            exit_code,
        })
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Output {
    pub lines: Vec<Value>,
    pub stderr: String,
    pub exit_code: Option<i32>,
}

impl Output {
    pub fn of_type<'a>(&'a self, t: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.lines.iter().filter(move |l| l["type"] == t)
    }
    pub fn summary(&self) -> Option<&Value> {
        self.of_type("summary").last()
    }
}

/// Runs the agent once with arguments and returns (exit code, stdout, stderr).
pub fn run_once(args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(AGENT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("spawn dax-probe")?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
