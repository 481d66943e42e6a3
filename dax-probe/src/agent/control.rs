//! The control server: `holders` and `stats` questions on the agent's socket, answered from
//! the state after a reader sync, so an answer includes every event the kernel emitted
//! before the question; and subscriptions (a dashboard attached to this agent). The
//! protocol's types and the socket's preparation are `crate::control`.
//!
//! A subscriber never stalls the agent: the loop `try_send`s each line (serialized once for
//! all subscribers) into the subscriber's bounded queue ([`control::SUBSCRIBER_QUEUE`]
//! lines), and its connection task writes them out with a per-line timeout. A subscriber
//! whose queue is full is cut off at once: the loop drops its queue, and its task writes
//! what was queued, then one `Response` line with `ok: false` and the reason, and closes.
//! Cutting off (rather than skipping lines) keeps the stream exact: a subscriber never
//! applies an event to a map that missed the ones before it. The client subscribes again
//! and starts from a fresh snapshot. At most [`control::MAX_SUBSCRIBERS`] at once.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use dax_probe_common::Counter;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
    sync::{
        mpsc::{self, error::TrySendError},
        oneshot,
    },
};

use super::{
    Agent,
    event_loop::{Flow, Sink},
};
use crate::{
    control::{self, Request, Response},
    exit::{Code, Failure},
    holders::query::{resolve, rows, select},
    schema::{HoldersReason, Line},
};

/// Largest request accepted, in bytes (a target is a path or a pfn range: far below this).
pub const MAX_REQUEST: u64 = 64 * 1024;

/// How long a connection may take to ask, and to take its answer.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_request: u64,
    pub read: Duration,
    pub write: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request: MAX_REQUEST,
            read: Duration::from_secs(5),
            write: Duration::from_secs(5),
        }
    }
}

/// A request read off a connection, waiting for the event loop's answer.
pub struct Question {
    pub req: Request,
    pub reply: oneshot::Sender<Response>,
    /// For a subscription: where its lines go.
    pub feed: Option<Feed>,
}

/// A subscriber's stream as the loop holds it.
pub struct Feed {
    /// Lines as JSON (no newline), shared by every subscriber.
    pub lines: mpsc::Sender<Arc<str>>,
    /// Why the agent cut the subscriber off; sent before `lines` is dropped.
    pub cut: Option<oneshot::Sender<String>>,
}

/// The subscribers the loop feeds.
#[derive(Default)]
pub struct Subscribers {
    feeds: Vec<Feed>,
    /// Subscribers cut off for falling behind, since the start.
    pub cut: u64,
}

impl Subscribers {
    pub fn len(&self) -> usize {
        self.feeds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.feeds.is_empty()
    }

    /// Takes a new subscriber: its snapshot goes into its queue first, so every line sent
    /// after this applies on top of it. Refused (with the reason) over the cap.
    pub fn add(&mut self, feed: Feed, snapshot: Vec<Line>) -> Result<(), String> {
        // Subscribers that went away free their place first.
        self.feeds.retain(|f| !f.lines.is_closed());
        if self.feeds.len() >= control::MAX_SUBSCRIBERS {
            return Err(format!(
                "the agent already serves {} subscribers (its limit): close a dashboard \
                 attached to it and try again",
                control::MAX_SUBSCRIBERS
            ));
        }
        let mut f = Some(feed);
        for l in snapshot {
            self.push(&mut f, l.to_json().into());
        }
        if let Some(f) = f {
            self.feeds.push(f);
        }
        Ok(())
    }

    /// Queues `line` for every subscriber, never waiting: a full queue cuts that one off.
    pub fn send(&mut self, line: &Line) {
        if self.feeds.is_empty() {
            return;
        }
        let text: Arc<str> = line.to_json().into();
        let mut feeds = std::mem::take(&mut self.feeds);
        for f in feeds.drain(..) {
            let mut f = Some(f);
            self.push(&mut f, text.clone());
            if let Some(f) = f {
                self.feeds.push(f);
            }
        }
    }

    /// Queues one line; `feed` becomes None when the subscriber is gone or was cut off.
    fn push(&mut self, feed: &mut Option<Feed>, text: Arc<str>) {
        let Some(f) = feed else { return };
        match f.lines.try_send(text) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.cut += 1;
                if let Some(cut) = f.cut.take() {
                    let _ = cut.send(format!(
                        "the subscriber fell {} lines behind the agent and was cut off (the \
                         agent never waits for a client): subscribe again for a fresh snapshot",
                        control::SUBSCRIBER_QUEUE
                    ));
                }
                log::warn!("a subscriber fell behind and was cut off");
                *feed = None;
            }
            Err(TrySendError::Closed(_)) => *feed = None,
        }
    }
}

/// Questions queued for the loop (each connection has at most one in flight).
pub const QUESTIONS: usize = 64;

/// Serves one connection on a task of its own: reads one request (capped, with a
/// timeout), has the event loop answer it, writes the answer (with a timeout). A client
/// that is slow, stopped or never reads holds only this task, never the loop.
pub async fn connection(stream: UnixStream, questions: mpsc::Sender<Question>, limits: Limits) {
    let (rd, mut wr) = stream.into_split();
    let mut line = Vec::new();
    let mut rd = BufReader::new(rd.take(limits.max_request + 1));
    let read = tokio::time::timeout(limits.read, rd.read_until(b'\n', &mut line)).await;
    let resp = match read {
        Ok(Ok(0)) => return,
        Ok(Ok(n)) if n as u64 > limits.max_request => Response::error(
            None,
            format!("request too large: over {} bytes", limits.max_request),
        ),
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(Request::Subscribe) => return subscription(wr, questions, limits).await,
            Ok(req) => {
                let (reply, answer) = oneshot::channel();
                let q = Question {
                    req,
                    reply,
                    feed: None,
                };
                if questions.send(q).await.is_err() {
                    return;
                }
                match answer.await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
            Err(e) => Response::error(None, format!("bad request: {e}")),
        },
        // Too slow to ask, or gone.
        _ => return,
    };
    let Ok(mut text) = serde_json::to_string(&resp) else {
        return;
    };
    text.push('\n');
    let _ = tokio::time::timeout(limits.write, wr.write_all(text.as_bytes())).await;
}

/// Writes `text` and a newline, giving up after the write timeout.
async fn write_line(wr: &mut OwnedWriteHalf, text: &str, limits: Limits) -> bool {
    let mut buf = Vec::with_capacity(text.len() + 1);
    buf.extend_from_slice(text.as_bytes());
    buf.push(b'\n');
    matches!(
        tokio::time::timeout(limits.write, wr.write_all(&buf)).await,
        Ok(Ok(()))
    )
}

/// A subscription: the loop's answer, then its lines until the client goes, stalls (a
/// write over the timeout ends it here; a full queue, in the loop) or the agent stops.
async fn subscription(mut wr: OwnedWriteHalf, questions: mpsc::Sender<Question>, limits: Limits) {
    let (lines, mut rx) = mpsc::channel(control::SUBSCRIBER_QUEUE);
    let (cut, mut why) = oneshot::channel();
    let (reply, answer) = oneshot::channel();
    let q = Question {
        req: Request::Subscribe,
        reply,
        feed: Some(Feed {
            lines,
            cut: Some(cut),
        }),
    };
    if questions.send(q).await.is_err() {
        return;
    }
    let Ok(ack) = answer.await else { return };
    let Ok(text) = serde_json::to_string(&ack) else {
        return;
    };
    if !write_line(&mut wr, &text, limits).await || !ack.ok {
        return;
    }
    while let Some(line) = rx.recv().await {
        if !write_line(&mut wr, &line, limits).await {
            return;
        }
    }
    // The loop dropped the queue: it cut this subscriber off, or the agent is stopping.
    let reason = why
        .try_recv()
        .unwrap_or_else(|_| "the agent stopped".to_string());
    if let Ok(text) = serde_json::to_string(&Response::error(None, reason)) {
        write_line(&mut wr, &text, limits).await;
    }
}

impl Agent {
    /// Answers a question from a connection task: at once, from the state, after a reader
    /// sync. Sending the answer never waits for the client.
    pub(super) fn answer_question(&mut self, q: Question, out: &mut Sink<'_>) {
        let t = Instant::now();
        // "Right now" includes everything the kernel already reported.
        let caught_up = self.session.sync(control::SYNC_WAIT);
        if let Err(e) = self.drain(out).and_then(|_| self.collect_pending(out)) {
            log::warn!("output failed: {e}");
        }
        // Events lost since the last repair leave the map behind: repair before answering.
        if let Err(e) = self.repair_after_drops(out) {
            log::warn!("output failed: {e}");
        }
        let dropped = self.session.counters.get(Counter::RingFull);
        if let Some(feed) = q.feed {
            let attached = self.attached_line();
            let subs = self.subscribers.clone();
            let mut subs = subs.lock().unwrap_or_else(|p| p.into_inner());
            let mut r = subscribe(&mut self.flow, &mut subs, feed, attached, dropped);
            r.elapsed_us = t.elapsed().as_micros() as u64;
            let _ = q.reply.send(r);
            return;
        }
        let mut r = answer(&mut self.flow, q.req, dropped);
        r.behind = behind(caught_up, t.elapsed());
        r.elapsed_us = t.elapsed().as_micros() as u64;
        let _ = q.reply.send(r);
    }
}

/// Why an answer may be behind the kernel, if it may: the reader did not hand over within
/// the wait what the kernel had emitted before the question (a saturated machine).
pub fn behind(caught_up: bool, waited: Duration) -> Option<String> {
    (!caught_up).then(|| {
        format!(
            "the agent could not take in the kernel's events within {} ms (waited {} ms): \
             its map may be behind",
            control::SYNC_WAIT.as_millis(),
            waited.as_millis()
        )
    })
}

/// The answer to `req` from the flow's state (`dropped`: the kernel's lost-event count).
pub fn answer(flow: &mut Flow, req: Request, dropped: u64) -> Response {
    match req {
        Request::Holders { target, pages } => {
            // A changed topology is queued as a line, like any the flow finds.
            flow.refresh_topology();
            let state = &mut flow.state;
            let target = match resolve(&target, &state.topology, &state.root) {
                Ok(t) => t,
                Err(e) => return Response::error(Some(Code::NoInput as i32), e.to_string()),
            };
            // Exited processes out first: a dead pid is never an answer.
            state.forget_gone();
            let sel = select(&state.applier.map, &target);
            let mut r = rows(&state.applier.map, &sel, pages);
            state.applier.only_live(&mut r);
            state.applier.name_files(&mut r, &state.topology);
            Response {
                ok: true,
                error: None,
                rows: r,
                stats: Some(state.stats(dropped)),
                elapsed_us: 0,
                target: Some(target),
                code: None,
                behind: None,
            }
        }
        Request::Stats => Response {
            stats: Some(flow.state.stats(dropped)),
            ..Response::error(None, String::new())
        }
        .ok(),
        // A subscription comes with its feed (see `subscribe`).
        Request::Subscribe => Response::error(None, "a subscription needs a stream".into()),
        Request::Unbind { device, path } => match flow.unbind_for_client(&device, &path) {
            Ok(()) => Response::error(None, String::new()).ok(),
            Err(e) => Response::error(Some(e.code as i32), e.message),
        },
    }
}

/// Takes a subscriber: its snapshot is `attached`, the topology and the whole holder map,
/// as they are now; the loop's lines from here on apply on top of it.
pub fn subscribe(
    flow: &mut Flow,
    subs: &mut Subscribers,
    feed: Feed,
    attached: Line,
    dropped: u64,
) -> Response {
    // Lines still queued in the flow go out later to every subscriber, this one too: they
    // are state lines (a topology) that apply again harmlessly.
    let snapshot = vec![
        attached,
        flow.state.topology_line(),
        flow.state.holders_line(HoldersReason::Requested, None),
    ];
    match subs.add(feed, snapshot) {
        Ok(()) => Response {
            stats: Some(flow.state.stats(dropped)),
            ..Response::error(None, String::new())
        }
        .ok(),
        Err(e) => Response::error(Some(Code::Unavailable as i32), e),
    }
}

/// Listens on `path` in a private directory, readable by root only (see
/// `control::bind_private`: the socket is created 0600, no chmod that could follow a link).
pub(super) fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let fail = |e: std::io::Error| Failure::new(Code::Software, e.to_string());
    let l = control::bind_private(path).map_err(fail)?;
    l.set_nonblocking(true).map_err(fail)?;
    Ok(UnixListener::from_std(l).map_err(fail)?)
}

pub(super) async fn accept(l: &Option<(UnixListener, PathBuf)>) -> std::io::Result<UnixStream> {
    match l {
        Some((l, _)) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::holders::query::HolderRow;

    #[test]
    fn an_answer_from_a_map_behind_the_kernel_sends_the_client_scanning() {
        // The reader handed everything over in time: the rows are the answer.
        assert_eq!(behind(true, Duration::from_millis(3)), None);
        // It did not (a saturated machine): the answer says so, and the client that gets
        // it scans instead of printing (perhaps) "nobody maps it".
        let why = behind(false, Duration::from_secs(2)).expect("behind");
        assert!(why.contains("2000 ms"), "{why}");
        let resp = Response {
            behind: Some(why),
            ..Response::error(None, String::new())
        }
        .ok();
        let wire: Response = serde_json::from_str(&serde_json::to_string(&resp).unwrap()).unwrap();
        assert!(!control::answer_is_current(&wire));
        let fresh: Response = serde_json::from_str(r#"{"ok":true,"rows":[]}"#).unwrap();
        assert!(control::answer_is_current(&fresh));
    }

    fn quick() -> Limits {
        Limits {
            max_request: 100,
            read: Duration::from_millis(500),
            write: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn a_request_over_the_cap_is_refused_without_reaching_the_loop() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(QUESTIONS);
        let task = tokio::spawn(connection(server, tx, quick()));
        // No newline within the cap: the agent must not keep reading.
        client.write_all(&[b'x'; 4096]).await.unwrap();
        // One line: the agent closes with the rest of the request unread, which resets the
        // connection after the answer.
        let mut answer = String::new();
        tokio::io::BufReader::new(&mut client)
            .read_line(&mut answer)
            .await
            .unwrap();
        let r: Response = serde_json::from_str(answer.trim()).unwrap();
        assert!(!r.ok);
        assert!(
            r.error
                .as_deref()
                .unwrap_or("")
                .contains("request too large"),
            "{r:?}"
        );
        task.await.unwrap();
        assert!(rx.try_recv().is_err(), "the loop was asked nothing");
    }

    #[tokio::test]
    async fn a_client_that_never_reads_holds_only_its_own_task() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(QUESTIONS);
        let task = tokio::spawn(connection(server, tx, quick()));
        client.write_all(b"{\"op\":\"stats\"}\n").await.unwrap();
        let q = rx.recv().await.expect("the question reaches the loop");
        assert!(matches!(q.req, Request::Stats));
        // An answer far larger than the socket buffer, to a client that never reads.
        let row = HolderRow {
            pid: 1,
            start_time: 0,
            comm: "x".repeat(15),
            dev: crate::topology::DevId {
                major: 259,
                minor: 0,
            },
            ino: 12,
            file: Some("/mnt/x/".repeat(20)),
            pages: 1,
            offsets: vec![(0, 4096)],
            extents: None,
            probe_at: Vec::new(),
            cgroup: None,
            container: None,
            pod_uid: None,
        };
        let big = Response {
            // About 1 MB of JSON: several times any socket buffer, and quick to encode in a
            // debug build on a loaded machine (50,000 rows took seconds there).
            rows: vec![row; 5_000],
            ..Response::error(None, String::new())
        }
        .ok();
        let t = Instant::now();
        assert!(q.reply.send(big).is_ok());
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "the loop's send waited"
        );
        // The connection gives up after its write timeout instead of hanging.
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the connection task ended after its write timeout")
            .unwrap();
        drop(client);
    }

    #[tokio::test]
    async fn a_question_is_answered() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(QUESTIONS);
        tokio::spawn(connection(server, tx, quick()));
        client.write_all(b"{\"op\":\"stats\"}\n").await.unwrap();
        let q = rx.recv().await.unwrap();
        q.reply
            .send(Response::error(None, String::new()).ok())
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        let r: Response = serde_json::from_str(answer.trim()).unwrap();
        assert!(r.ok, "{r:?}");
    }

    /// A flow on the fake machine: pids 150 and 151 map pmem0, after the start-up scan.
    pub(crate) fn fake_flow(dir: &Path) -> Flow {
        use crate::{
            holders::Applier,
            incident::Incidents,
            os::{
                Fence,
                fake::{self, FakeOs, FakeProc},
            },
            policy::Policy,
            topology::DevId,
        };
        struct NoKernel;
        impl Fence for NoKernel {
            fn fence(&mut self, _: DevId, _: &crate::os::FenceArm) -> anyhow::Result<()> {
                Ok(())
            }
            fn unfence(&mut self, _: DevId) {}
            fn refuses_mappings(&self) -> bool {
                false
            }
        }
        impl super::super::event_loop::KernelMaps for NoKernel {
            fn watch(&mut self, _: u32) {}
            fn unwatch(&mut self, _: u32) {}
        }
        let os = FakeOs::new(
            &[
                (150, FakeProc::holder("db", 1000)),
                (151, FakeProc::holder("db", 1001)),
            ],
            &["/mnt/pmem0"],
        );
        let state = super::super::state::State::new(
            fake::topology(&["/mnt/pmem0"]),
            Applier::new(os.procfs_box()),
            Incidents::new(None),
            dir.to_path_buf(),
        );
        let mut f = Flow::new(state, Box::new(os), None, Policy::default());
        f.start_scan(&mut NoKernel);
        f
    }

    pub(crate) fn attached() -> Line {
        Line::Attached(crate::schema::Attached {
            kernel: "6.12.0".into(),
            hooks: Vec::new(),
            holders: 2,
            holder_pages: 8,
        })
    }

    pub(crate) fn reconcile_line(n: u64) -> Line {
        Line::Reconcile(crate::schema::Reconcile {
            missing: n,
            extra: 0,
            holders: 2,
            reason: "periodic".into(),
        })
    }

    async fn read_lines(client: UnixStream) -> Vec<String> {
        let mut lines = Vec::new();
        let mut rd = tokio::io::BufReader::new(client).lines();
        while let Ok(Some(l)) = rd.next_line().await {
            lines.push(l);
        }
        lines
    }

    #[tokio::test]
    async fn a_subscriber_gets_the_snapshot_then_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let mut flow = fake_flow(dir.path());
        let mut subs = Subscribers::default();
        let (mut client, server) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(QUESTIONS);
        let task = tokio::spawn(connection(server, tx, quick()));
        client.write_all(b"{\"op\":\"subscribe\"}\n").await.unwrap();
        let q = rx.recv().await.unwrap();
        assert!(matches!(q.req, Request::Subscribe));
        let feed = q.feed.expect("a subscription comes with its feed");
        let r = subscribe(&mut flow, &mut subs, feed, attached(), 3);
        assert!(r.ok, "{r:?}");
        assert_eq!(
            r.stats.as_ref().map(|s| (s.holders, s.dropped)),
            Some((2, 3))
        );
        q.reply.send(r).unwrap();
        assert_eq!(subs.len(), 1);
        subs.send(&reconcile_line(7));
        // The agent stops: the subscriber's queue goes with it.
        drop(subs);
        let lines = read_lines(client).await;
        task.await.unwrap();
        assert_eq!(lines.len(), 6, "{lines:#?}");
        let ack: Response = serde_json::from_str(&lines[0]).unwrap();
        assert!(ack.ok);
        let parsed: Vec<Line> = lines[1..5]
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(matches!(&parsed[0], Line::Attached(a) if a.kernel == "6.12.0"));
        assert!(matches!(&parsed[1], Line::Topology(t) if t.namespaces.len() == 1));
        let Line::Holders(h) = &parsed[2] else {
            panic!("the whole map third: {parsed:?}")
        };
        assert_eq!(h.pids, None, "the whole map");
        let mut pids: Vec<u32> = h.rows.iter().map(|r| r.pid).collect();
        pids.sort_unstable();
        assert_eq!(pids, [150, 151]);
        assert!(matches!(&parsed[3], Line::Reconcile(r) if r.missing == 7));
        let end: Response = serde_json::from_str(&lines[5]).unwrap();
        assert!(!end.ok);
        assert_eq!(end.error.as_deref(), Some("the agent stopped"));
    }

    #[tokio::test]
    async fn a_stalled_subscriber_is_cut_off_with_its_reason_and_never_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut flow = fake_flow(dir.path());
        let mut subs = Subscribers::default();
        let (mut client, server) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(QUESTIONS);
        let task = tokio::spawn(connection(server, tx, quick()));
        client.write_all(b"{\"op\":\"subscribe\"}\n").await.unwrap();
        let q = rx.recv().await.unwrap();
        let r = subscribe(&mut flow, &mut subs, q.feed.unwrap(), attached(), 0);
        q.reply.send(r).unwrap();
        // The client reads nothing; the loop sends far more than the queue holds. The
        // connection task cannot run meanwhile (one thread): the queue fills exactly.
        let t = Instant::now();
        for i in 0..(2 * control::SUBSCRIBER_QUEUE as u64) {
            subs.send(&reconcile_line(i));
        }
        assert!(t.elapsed() < Duration::from_secs(2), "the loop waited");
        assert!(subs.is_empty(), "cut off");
        assert_eq!(subs.cut, 1);
        let lines = read_lines(client).await;
        task.await.unwrap();
        // The answer, the queue's worth of lines in order, then the reason.
        assert_eq!(lines.len(), 1 + control::SUBSCRIBER_QUEUE + 1);
        let first: Line = serde_json::from_str(&lines[1]).unwrap();
        assert!(matches!(first, Line::Attached(_)));
        let last_queued: Line = serde_json::from_str(&lines[lines.len() - 2]).unwrap();
        let queued_events = (control::SUBSCRIBER_QUEUE - 3) as u64;
        assert!(
            matches!(&last_queued, Line::Reconcile(r) if r.missing == queued_events - 1),
            "{last_queued:?}"
        );
        let end: Response = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert!(!end.ok);
        assert!(end.error.unwrap().contains("cut off"));
    }

    #[test]
    fn subscribers_are_capped_and_the_ones_gone_free_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut flow = fake_flow(dir.path());
        let mut subs = Subscribers::default();
        let feed = || {
            let (lines, rx) = mpsc::channel(control::SUBSCRIBER_QUEUE);
            (Feed { lines, cut: None }, rx)
        };
        let mut kept = Vec::new();
        for _ in 0..control::MAX_SUBSCRIBERS {
            let (f, rx) = feed();
            assert!(subscribe(&mut flow, &mut subs, f, attached(), 0).ok);
            kept.push(rx);
        }
        let (f, _rx) = feed();
        let r = subscribe(&mut flow, &mut subs, f, attached(), 0);
        assert!(!r.ok);
        assert_eq!(r.code, Some(Code::Unavailable as i32));
        assert!(r.error.unwrap().contains("limit"));
        assert_eq!(subs.len(), control::MAX_SUBSCRIBERS);
        // One client goes away: its place is free for the next.
        drop(kept.pop());
        let (f, _rx2) = feed();
        assert!(subscribe(&mut flow, &mut subs, f, attached(), 0).ok);
        // A line reaches every subscriber, after its snapshot.
        subs.send(&reconcile_line(1));
        for rx in &mut kept {
            let got: Vec<Arc<str>> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            assert_eq!(got.len(), 4);
            assert!(got[3].contains("\"reconcile\""), "{got:?}");
        }
    }
}
