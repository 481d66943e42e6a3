//! Running the real agent binary (`/bin/dax-probe`) inside the guest and reading what it
//! printed.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
pub use dax_probe::schema::{ActionReport, Attached, Fault, HolderRow, Line, Reconcile, Summary};

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
        sys::wait_for(timeout, || {
            fs::read_to_string(&self.out)
                .map(|t| {
                    t.lines()
                        // A cheap filter first: this polls a growing file.
                        .filter(|l| l.contains("\"type\":\"fault\""))
                        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
                        .filter_map(|l| match l {
                            Line::Fault(f) if f.tgid == tgid && f.mapped => Some(f.pages as usize),
                            _ => None,
                        })
                        .sum::<usize>()
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
    ///
    /// On 7.x a holder signalled during an unbind can die in the kernel's teardown of its
    /// stale mapping; when that oops leaves the task inside an RCU read-side section, no
    /// grace period ends again and the agent's exit (its BPF links' release waits for one)
    /// never finishes. An agent still running 30 s after SIGINT is taken as the kernel's
    /// doing only when the kernel's log has both an oops of another process and an RCU
    /// stall: its lines so far are returned then (no summary, `exit_code` None), a fact
    /// is kept and the boot is marked wedged, so later scenarios run in a fresh one.
    /// Otherwise it is the agent's failure, reported with its kernel stack.
    pub fn stop(mut self) -> Result<Output> {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let mut status = None;
        sys::wait_for(Duration::from_secs(30), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if let Some(s) = status {
            return self.read(s.code());
        }
        let me = child.id();
        let stacks = sys::kernel_stacks(&[me]);
        let oops = sys::oopses()
            .into_iter()
            .find(|o| o.pid != me)
            .map(|o| (o.pid, o.comm));
        // The kernel reports a stall ~21 s after it began: give it that long past an oops.
        let stalled = sys::rcu_stalled()
            || (oops.is_some() && sys::wait_for(Duration::from_secs(30), sys::rcu_stalled));
        sys::end_child(&mut child, Duration::from_secs(5));
        match oops {
            Some((pid, comm)) if stalled => {
                crate::report::fact(
                    "agent_exit_waits_on_rcu_stalled_by_an_oops",
                    serde_json::json!(format!(
                        "{comm} ({pid}) oopsed in the kernel and RCU stalled: the agent's exit \
                         cannot finish; its kernel stack: {stacks}"
                    )),
                );
                crate::pmem::mark_bus_wedged();
                self.read(None)
            }
            _ => bail!(
                "agent ignored SIGINT for 30 s (kernel stack: {stacks}; another process's \
                 oops: {oops:?}; RCU stall: {stalled})"
            ),
        }
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
        let lines: Vec<Line> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(parse_line)
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
            sys::end_child(&mut c, Duration::from_secs(5));
        }
    }
}

/// One line the agent printed, in the schema's type: a line that is not JSON, lacks a
/// field of its type, or has a type the schema does not know fails the scenario.
pub fn parse_line(l: &str) -> Result<Line> {
    let line: Line = serde_json::from_str(l)
        .with_context(|| format!("agent printed a line outside its schema: {l}"))?;
    if line == Line::Unknown {
        bail!("agent printed a line of a type its schema does not know: {l}");
    }
    Ok(line)
}

/// The `type` of a line, as printed.
pub fn type_of(l: &Line) -> String {
    serde_json::to_value(l)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_string))
        .unwrap_or_default()
}

pub struct Output {
    pub lines: Vec<Line>,
    pub stderr: String,
    pub exit_code: Option<i32>,
}

/// A `device_departing` report, borrowed from its line.
#[derive(Debug, Clone, Copy)]
pub struct Departing<'a> {
    pub ts_ns: u64,
    pub device: &'a str,
    pub holders: &'a [HolderRow],
}

/// A `device_gone` report, borrowed from its line.
#[derive(Debug, Clone, Copy)]
pub struct Gone<'a> {
    pub device: &'a str,
    pub still_mapped: &'a [HolderRow],
    pub took_ms: f64,
}

impl Output {
    /// Lines of one `type` (for messages that show what the agent printed).
    pub fn of_type<'a>(&'a self, t: &'a str) -> impl Iterator<Item = &'a Line> + 'a {
        self.lines.iter().filter(move |l| type_of(l) == t)
    }
    pub fn summary(&self) -> Option<&Summary> {
        self.lines.iter().rev().find_map(|l| match l {
            Line::Summary(s) => Some(s),
            _ => None,
        })
    }
    pub fn attached(&self) -> Option<&Attached> {
        self.lines.iter().find_map(|l| match l {
            Line::Attached(a) => Some(a),
            _ => None,
        })
    }
    pub fn faults(&self) -> impl Iterator<Item = &Fault> {
        self.lines.iter().filter_map(|l| match l {
            Line::Fault(f) => Some(f),
            _ => None,
        })
    }
    pub fn enforcement(&self) -> impl Iterator<Item = &ActionReport> {
        self.lines.iter().filter_map(|l| match l {
            Line::Enforcement(a) => Some(a),
            _ => None,
        })
    }
    pub fn reconciles(&self) -> impl Iterator<Item = &Reconcile> {
        self.lines.iter().filter_map(|l| match l {
            Line::Reconcile(r) => Some(r),
            _ => None,
        })
    }
    pub fn departures(&self) -> impl Iterator<Item = Departing<'_>> {
        self.lines.iter().filter_map(|l| match l {
            Line::DeviceDeparting {
                ts_ns,
                device,
                holders,
                ..
            } => Some(Departing {
                ts_ns: *ts_ns,
                device,
                holders,
            }),
            _ => None,
        })
    }
    /// The `device_departing` report of `device`.
    pub fn departing(&self, device: &str) -> Option<Departing<'_>> {
        self.departures().find(|d| d.device == device)
    }
    /// The `device_gone` report of `device`.
    pub fn gone(&self, device: &str) -> Option<Gone<'_>> {
        self.lines.iter().find_map(|l| match l {
            Line::DeviceGone {
                device: d,
                still_mapped,
                took_ms,
                ..
            } if d == device => Some(Gone {
                device: d,
                still_mapped,
                took_ms: *took_ms,
            }),
            _ => None,
        })
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
