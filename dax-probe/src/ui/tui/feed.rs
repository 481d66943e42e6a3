//! Where lines come from: a running monitor the dashboard attached to ([`Attach`]), the
//! live agent on its own thread, a paced replay, a drain child. Everything reaches the UI
//! thread as [`FeedMsg`]s on one bounded channel.
//!
//! Attached, the dashboard reads the monitor's subscription (see `agent::control`): a
//! snapshot, then every line. The reader thread blocks on the bounded channel when the UI
//! is slow, so the socket fills and the agent, which never waits, cuts the subscription
//! off; the reader then subscribes again and the fresh snapshot heals the picture. When no
//! agent answers any more, the dashboard is told it is gone.
//!
//! The live agent never waits for the UI: its sink `try_send`s each typed output as it is
//! (no JSON in between). A full channel (a slow terminal, a stalled ssh) drops
//! the line, counts it as UI lag (kernel drops are counted by the kernel and reported
//! separately) and asks the agent for a fresh holder snapshot, so the picture heals.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::record::LogKind;
use crate::{
    agent::{self, Agent},
    control::{Request, Response},
    exit::{Code, Failure},
    probe::KernelSource,
    schema::{Attached, Line},
};

/// Lines buffered between the agent and the UI: a few seconds of a busy machine.
pub const CHANNEL_CAP: usize = 16384;

#[derive(Debug)]
pub enum FeedMsg {
    /// One output of the live agent.
    Line(Box<Line>),
    /// One recorded `monitor --json` line (replay), parsed by the model.
    Text(String),
    /// The dashboard clock (replay cursor), ns since boot.
    Clock(u64),
    /// Lines the UI could not take (the channel was full).
    Lagged(u64),
    /// A notice for the event log.
    Note(LogKind, String),
    /// A line from a `drain --json` the dashboard started.
    Drain(String),
    /// The source is done (the agent stopped, the recording ended), with an error if any.
    Ended(Option<String>),
    /// The monitor the dashboard was attached to went away (why): what is shown is no
    /// longer live.
    AgentGone(String),
}

/// How long a monitor may take to answer a subscription (it syncs with the kernel first).
const ANSWER: Duration = Duration::from_secs(30);

/// A subscription to a running monitor's lines, read on a thread of its own.
pub struct Attach {
    pub socket: PathBuf,
    /// The current connection (shut down to stop the reader).
    conn: Arc<std::sync::Mutex<Option<UnixStream>>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Attach {
    /// Subscribes to the monitor listening on `socket`: `Ok(None)` when none answers there;
    /// an error when one answers and refuses (not root, too many subscribers).
    pub fn start(socket: &Path, tx: SyncSender<FeedMsg>) -> anyhow::Result<Option<Self>> {
        let Some((stream, reader)) = subscribe(socket)? else {
            return Ok(None);
        };
        let conn = Arc::new(std::sync::Mutex::new(Some(stream)));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (conn, stopping, socket) = (conn.clone(), stopping.clone(), socket.to_path_buf());
            std::thread::Builder::new()
                .name("dax-probe-attach".into())
                .spawn(move || attach_thread(socket, reader, conn, stopping, tx))?
        };
        Ok(Some(Self {
            socket: socket.to_path_buf(),
            conn,
            stopping,
            thread: Some(thread),
        }))
    }

    /// Ends the subscription and waits for the reader.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(s) = &*self.conn.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connects and subscribes; the stream's lines follow on the reader.
fn subscribe(socket: &Path) -> anyhow::Result<Option<(UnixStream, BufReader<UnixStream>)>> {
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Failure::new(
                Code::NoPermission,
                format!(
                    "a dax-probe monitor listens on {} but its socket is root's: run the \
                     dashboard as root",
                    socket.display()
                ),
            )
            .into());
        }
        // No socket, or a stale one: no agent runs there.
        Err(_) => return Ok(None),
    };
    s.set_read_timeout(Some(ANSWER))?;
    serde_json::to_writer(&mut s, &Request::Subscribe)?;
    s.write_all(b"\n")?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let r: Response = serde_json::from_str(&first).map_err(|e| {
        anyhow::anyhow!(
            "the monitor on {} answered the subscription with something else ({e}): is it \
             an older dax-probe?",
            socket.display()
        )
    })?;
    if !r.ok {
        let code = match r.code {
            Some(c) if c == Code::NoPermission as i32 => Code::NoPermission,
            _ => Code::Unavailable,
        };
        return Err(Failure::new(
            code,
            format!(
                "the monitor on {} refused the subscription: {}",
                socket.display(),
                r.error.unwrap_or_default()
            ),
        )
        .into());
    }
    // From here the agent sends when it has something: no timeout.
    s.set_read_timeout(None)?;
    Ok(Some((s, reader)))
}

/// Reads the subscription's lines into `tx`; when it ends, subscribes once more (a cut-off
/// subscriber starts again from a fresh snapshot; a restarted monitor is found again) or
/// reports the agent gone.
fn attach_thread(
    socket: PathBuf,
    mut reader: BufReader<UnixStream>,
    conn: Arc<std::sync::Mutex<Option<UnixStream>>>,
    stopping: Arc<AtomicBool>,
    tx: SyncSender<FeedMsg>,
) {
    loop {
        let mut why = "the connection closed without a reason".to_string();
        for line in (&mut reader).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Line>(&line) {
                Ok(l) => {
                    if tx.send(FeedMsg::Line(Box::new(l))).is_err() {
                        return; // the dashboard is gone
                    }
                }
                // The last line: why the stream ends.
                Err(_) => match serde_json::from_str::<Response>(&line) {
                    Ok(r) => why = r.error.unwrap_or_default(),
                    Err(e) => {
                        let _ = tx.send(FeedMsg::Note(
                            LogKind::Info,
                            format!("the monitor sent a line that is not one of ours: {e}"),
                        ));
                    }
                },
            }
        }
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        match subscribe(&socket) {
            Ok(Some((s, r))) => {
                let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
                *c = Some(s);
                // Checked under the lock `stop` takes to shut the connection down.
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                drop(c);
                reader = r;
                let _ = tx.send(FeedMsg::Note(
                    LogKind::Info,
                    format!("subscribed again to the monitor ({why}): fresh snapshot"),
                ));
            }
            Ok(None) => {
                let _ = tx.send(FeedMsg::AgentGone(format!(
                    "the monitor on {} went away ({why})",
                    socket.display()
                )));
                return;
            }
            // A monitor that is shutting down may still take the connection, then close it
            // unanswered: gone as well.
            Err(e) => {
                let _ = tx.send(FeedMsg::AgentGone(format!(
                    "the monitor on {} went away ({why}; subscribing again: {e:#})",
                    socket.display()
                )));
                return;
            }
        }
    }
}

pub struct Live {
    pub rx: Receiver<FeedMsg>,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<JoinHandle<()>>,
    pub tx: SyncSender<FeedMsg>,
}

impl Live {
    /// Starts the agent on its own thread. Returns once it is attached, or with its start-up
    /// error (no permission, no device, …) before the terminal is touched.
    pub fn start(src: KernelSource, opts: agent::Options) -> anyhow::Result<Self> {
        let (tx, rx) = sync_channel(CHANNEL_CAP);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let feed_tx = tx.clone();
        let thread = std::thread::Builder::new()
            .name("dax-probe-agent".into())
            .spawn(move || agent_thread(src, opts, feed_tx, ready_tx))?;
        match ready_rx.recv() {
            Ok(Ok(stop)) => Ok(Self {
                rx,
                stop,
                thread: Some(thread),
                tx,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                anyhow::bail!("the agent thread ended before attaching")
            }
        }
    }

    /// Stops the agent and waits for it (it drains what the kernel already sent).
    pub fn stop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stop();
    }
}

type Ready = std::sync::mpsc::Sender<anyhow::Result<Arc<tokio::sync::Notify>>>;

fn agent_thread(src: KernelSource, opts: agent::Options, tx: SyncSender<FeedMsg>, ready: Ready) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    rt.block_on(async move {
        let mut agent = match Agent::start(&src, &opts) {
            Ok(a) => a,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let attached = Line::Attached(Attached {
            kernel: agent.session.facts.release.clone(),
            hooks: Vec::new(),
            holders: agent.state().applier.map.holder_count(),
            holder_pages: 0,
        });
        let _ = tx.try_send(FeedMsg::Line(Box::new(attached)));
        let _ = ready.send(Ok(agent.stop.clone()));
        let request = agent.snapshot_request.clone();
        let mut lost = 0u64;
        let mut sink = |o: Line| -> anyhow::Result<()> {
            match tx.try_send(FeedMsg::Line(Box::new(o))) {
                Ok(()) => {
                    if lost > 0 && tx.try_send(FeedMsg::Lagged(lost)).is_ok() {
                        lost = 0;
                    }
                    Ok(())
                }
                Err(TrySendError::Full(_)) => {
                    lost += 1;
                    request.store(true, std::sync::atomic::Ordering::Relaxed);
                    Ok(())
                }
                Err(TrySendError::Disconnected(_)) => anyhow::bail!("the dashboard is gone"),
            }
        };
        let res = agent.run(None, &mut sink).await;
        if lost > 0 {
            let _ = tx.try_send(FeedMsg::Lagged(lost));
        }
        let _ = tx.try_send(FeedMsg::Line(Box::new(Line::Summary(agent.summary()))));
        let _ = tx.send(FeedMsg::Ended(res.err().map(|e| format!("{e:#}"))));
    });
}

/// Runs `dax-probe drain DEVICE --json` as a child; its lines and its end go to `tx`.
pub fn spawn_drain(
    device: &str,
    unbind: bool,
    policy: Option<&std::path::Path>,
    tx: SyncSender<FeedMsg>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["drain", device, "--json"]);
    if unbind {
        cmd.arg("--unbind");
    }
    if let Some(p) = policy {
        cmd.arg("--policy").arg(p);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take();
    let err = child.stderr.take();
    let device = device.to_string();
    std::thread::Builder::new()
        .name("dax-probe-drain".into())
        .spawn(move || {
            if let Some(out) = out {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(FeedMsg::Drain(line));
                }
            }
            let mut msg = String::new();
            if let Some(err) = err {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    msg.push_str(line.trim_start_matches("dax-probe: error: "));
                    msg.push(' ');
                }
            }
            let status = child.wait();
            let text = match status {
                Ok(s) if s.success() => format!("drain of {device} finished"),
                Ok(s) => format!(
                    "drain of {device} failed (exit {}): {}",
                    s.code().unwrap_or(-1),
                    msg.trim()
                ),
                Err(e) => format!("drain of {device}: {e}"),
            };
            let _ = tx.send(FeedMsg::Note(LogKind::Drain, text));
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        agent::control::{
            Limits, QUESTIONS, Subscribers, connection, subscribe as serve,
            tests::{attached, fake_flow, reconcile_line},
        },
        control::SUBSCRIBER_QUEUE,
    };

    #[test]
    fn no_monitor_means_an_agent_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = sync_channel(4);
        assert!(
            Attach::start(&dir.path().join("agent.sock"), tx)
                .unwrap()
                .is_none()
        );
        // A socket left by a monitor that died: nobody answers either.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let (tx, _rx) = sync_channel(4);
        assert!(Attach::start(&stale, tx).unwrap().is_none());
    }

    /// A monitor on `path` with the agent's flow on the fake machine: it cuts its first
    /// subscriber off (far more lines than a queue holds, at once), serves the second one
    /// snapshot and one line, and stops.
    fn monitor(path: PathBuf) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let dir = tempfile::tempdir().unwrap();
                let mut flow = fake_flow(dir.path());
                let l = tokio::net::UnixListener::bind(&path).unwrap();
                let (qtx, mut qrx) = tokio::sync::mpsc::channel(QUESTIONS);
                let mut subs = Subscribers::default();
                let mut served = 0;
                loop {
                    tokio::select! {
                        c = l.accept() => {
                            let (s, _) = c.unwrap();
                            tokio::spawn(connection(s, qtx.clone(), Limits::default()));
                        }
                        Some(q) = qrx.recv() => {
                            let r = serve(&mut flow, &mut subs, q.feed.unwrap(), attached(), 0);
                            q.reply.send(r).unwrap();
                            served += 1;
                            if served == 1 {
                                for i in 0..2 * SUBSCRIBER_QUEUE as u64 {
                                    subs.send(&reconcile_line(i));
                                }
                                assert_eq!(subs.cut, 1);
                            } else {
                                subs.send(&reconcile_line(999_999));
                                break;
                            }
                        }
                    }
                }
                // The agent stops: queues closed, socket gone; the connection tasks write
                // what was queued.
                drop(subs);
                drop(l);
                std::fs::remove_file(&path).unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            });
        })
    }

    #[test]
    fn attached_the_dashboard_heals_a_cut_and_says_when_the_agent_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let server = monitor(sock.clone());
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the monitor never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (tx, rx) = sync_channel(CHANNEL_CAP);
        let mut a = Attach::start(&sock, tx)
            .unwrap()
            .expect("the monitor answers");
        let mut msgs = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(FeedMsg::AgentGone(why)) => {
                    msgs.push(FeedMsg::AgentGone(why));
                    break;
                }
                Ok(m) => msgs.push(m),
                Err(e) => panic!("no end: {e} after {} messages", msgs.len()),
            }
        }
        a.stop();
        server.join().unwrap();
        let again = msgs
            .iter()
            .position(|m| matches!(m, FeedMsg::Note(_, t) if t.contains("subscribed again")))
            .expect("the cut-off subscriber subscribed again");
        let before = &msgs[..again];
        // The first stream: snapshot (3 lines) and the queue's worth of lines, in order.
        assert_eq!(
            before.len(),
            SUBSCRIBER_QUEUE,
            "lines of the first subscription"
        );
        assert!(matches!(&before[0], FeedMsg::Line(l) if matches!(**l, Line::Attached(_))));
        let after = &msgs[again + 1..];
        let lines: Vec<&Line> = after
            .iter()
            .filter_map(|m| match m {
                FeedMsg::Line(l) => Some(&**l),
                _ => None,
            })
            .collect();
        assert_eq!(lines.len(), 4, "a fresh snapshot and one line: {lines:?}");
        let Line::Holders(h) = lines[2] else {
            panic!("{lines:?}")
        };
        let mut pids: Vec<u32> = h.rows.iter().map(|r| r.pid).collect();
        pids.sort_unstable();
        assert_eq!(pids, [150, 151]);
        assert!(matches!(lines[3], Line::Reconcile(r) if r.missing == 999_999));
        let Some(FeedMsg::AgentGone(why)) = msgs.last() else {
            unreachable!()
        };
        assert!(
            why.contains("went away") && why.contains("the agent stopped"),
            "{why}"
        );
    }
}
