//! Where lines come from: the live agent on its own thread, a paced replay, a drain child.
//! Everything reaches the UI thread as [`FeedMsg`]s on one bounded channel.
//!
//! The live agent never waits for the UI: its sink serializes each output as `monitor
//! --json` would and `try_send`s it. A full channel (a slow terminal, a stalled ssh) drops
//! the line, counts it as UI lag (kernel drops are counted by the kernel and reported
//! separately) and asks the agent for a fresh holder snapshot, so the picture heals.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
};

use serde_json::json;

use super::record::LogKind;
use crate::{
    agent::{self, Agent, Output},
    probe::KernelSource,
};

/// Lines buffered between the agent and the UI: a few seconds of a busy machine.
pub const CHANNEL_CAP: usize = 16384;

#[derive(Debug)]
pub enum FeedMsg {
    /// One `monitor --json` line.
    Line(String),
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
        let attached = json!({
            "type": "attached",
            "kernel": agent.session.facts.release,
            "holders": agent.applier.map.holder_count(),
        });
        let _ = tx.try_send(FeedMsg::Line(attached.to_string()));
        let _ = ready.send(Ok(agent.stop.clone()));
        let request = agent.snapshot_request.clone();
        let mut lost = 0u64;
        let mut sink = |o: Output| -> anyhow::Result<()> {
            let line = serde_json::to_string(&o)?;
            match tx.try_send(FeedMsg::Line(line)) {
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
        if let Ok(summary) = serde_json::to_string(&agent.summary()) {
            let _ = tx.try_send(FeedMsg::Line(summary));
        }
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
