//! The ring-buffer reader: a dedicated thread that drains the kernel's events as fast as they
//! come and hands raw records to the rest of the agent through a channel.
//!
//! Two rings: faults and page-table events on one, device events (departures, memory
//! failures) on a ring of their own, so a fault storm can neither drop nor stall them. In the
//! channel the two are merged by kernel timestamp (a device record waits at most
//! [`BACKLOG_BEFORE_DEVICE`] fault records): the holder map a departure is judged against
//! includes every fault that came before it and none of the unmaps that came after.
//!
//! It runs on its own OS thread, not on the async runtime, so that nothing downstream (a slow
//! terminal, a JSON encoder, the TUI) can stall it and make the kernel drop events.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use dax_probe_common::EventKind;
use tokio::sync::mpsc::{Sender, error::TrySendError};

/// Longest time an event waits in the ring before the reader looks.
pub const POLL_MS: i32 = 50;

/// At most this many fault records go into the channel ahead of a device record that is
/// already waiting: the backlog it came after, not a storm that keeps refilling the ring.
pub const BACKLOG_BEFORE_DEVICE: usize = 1 << 16;

/// Records the channel to the agent's loop holds: the loop may fall behind (a saturated
/// machine, a slow output) without the agent's memory growing with the backlog.
pub const CHANNEL_RECORDS: usize = 1 << 16;
/// Room kept for device records: page-table records are dropped (and counted) before the
/// channel is this full, so a departure always finds a place.
pub const DEVICE_RESERVE: usize = 1024;

/// Page-table records (faults, zaps, forks, mremaps): the ones that may be dropped when the
/// agent is behind, because a reconcile restores what they said. Device records may not.
fn droppable(r: &[u8]) -> bool {
    let kind = r
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .and_then(EventKind::from_u32);
    matches!(
        kind,
        Some(EventKind::Fault | EventKind::Zap | EventKind::Fork | EventKind::Mremap)
    )
}

/// Hands one record to the loop; false when the loop is gone. The ring is never left
/// unread for a full channel: a page-table record that finds less than [`DEVICE_RESERVE`]
/// room is dropped and counted in `lost` (the agent then reconciles, as for the kernel's
/// own drops); a device record waits for room (the reserve makes that rare).
fn forward(tx: &Sender<Vec<u8>>, r: Vec<u8>, lost: &AtomicU64) -> bool {
    if droppable(&r) {
        if tx.capacity() <= DEVICE_RESERVE {
            lost.fetch_add(1, Ordering::Relaxed);
            return !tx.is_closed();
        }
        return match tx.try_send(r) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                lost.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Closed(_)) => false,
        };
    }
    match tx.try_send(r) {
        Ok(()) => true,
        Err(TrySendError::Full(r)) => tx.blocking_send(r).is_ok(),
        Err(TrySendError::Closed(_)) => false,
    }
}

/// Where records come from (a ring buffer; a list in tests).
trait Source {
    fn next_record(&mut self) -> Option<Vec<u8>>;
}

struct Ring<'a>(&'a mut RingBuf<MapData>);

impl Source for Ring<'_> {
    fn next_record(&mut self) -> Option<Vec<u8>> {
        self.0.next().map(|r| r.to_vec())
    }
}

/// The record's kernel timestamp (`EventHeader::ts_ns`, bpf_ktime_get_boot_ns: one
/// clock for every CPU and both rings); 0 for a record too short to have one.
fn stamp(r: &[u8]) -> u64 {
    r.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .unwrap_or(0)
}

/// One drain of both rings, merged by kernel timestamp. The device records waiting now are
/// taken first; up to [`BACKLOG_BEFORE_DEVICE`] fault records are then sent, each preceded
/// by the waiting device records stamped before it, and the device records left go out
/// after the batch. So a device event lands where it happened: after the faults that came
/// before it (the holder map a departure is judged against has them) and before the
/// page-table changes it caused (a memory failure's own unmaps must not empty the map it
/// is reported from). `None` when the receiver is gone; `Some(true)` when faults are left
/// (a storm): call again before polling, so a device record that arrives meanwhile waits
/// one batch at most.
fn pass(
    faults: &mut impl Source,
    devices: &mut impl Source,
    send: &mut impl FnMut(Vec<u8>) -> bool,
) -> Option<bool> {
    let mut waiting: std::collections::VecDeque<Vec<u8>> =
        std::iter::from_fn(|| devices.next_record()).collect();
    let mut more = true;
    for _ in 0..BACKLOG_BEFORE_DEVICE {
        let Some(r) = faults.next_record() else {
            more = false;
            break;
        };
        let t = stamp(&r);
        while waiting.front().is_some_and(|d| stamp(d) <= t) {
            if !send(waiting.pop_front()?) {
                return None;
            }
        }
        if !send(r) {
            return None;
        }
    }
    for d in waiting {
        if !send(d) {
            return None;
        }
    }
    Some(more)
}

pub struct Reader {
    stop: Arc<AtomicBool>,
    /// Why the thread ended on its own (the agent is blind from then on).
    failed: Arc<Mutex<Option<String>>>,
    handle: Option<JoinHandle<()>>,
    /// Wakes the thread for a drain on demand (see [`Reader::sync`]).
    wake: RawFd,
    /// How many on-demand drains the thread completed.
    drained: Arc<(Mutex<u64>, Condvar)>,
}

impl Reader {
    /// Starts draining `ring` (faults) and `device` (device events) into `tx`, one
    /// `Vec<u8>` per record.
    pub fn spawn(
        mut ring: RingBuf<MapData>,
        mut device: RingBuf<MapData>,
        tx: Sender<Vec<u8>>,
        lost: Arc<AtomicU64>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        // SAFETY: plain syscall; the fd is owned by Reader and closed on drop.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        let drained: Arc<(Mutex<u64>, Condvar)> = Arc::default();
        let drained2 = drained.clone();
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let failed2 = failed.clone();
        let handle = std::thread::Builder::new()
            .name("ringbuf-reader".into())
            .spawn(move || {
                let fd: RawFd = ring.as_raw_fd();
                let dev_fd: RawFd = device.as_raw_fd();
                let mut faults = Ring(&mut ring);
                let mut devices = Ring(&mut device);
                let mut send = |r: Vec<u8>| forward(&tx, r, &lost);
                loop {
                    match pass(&mut faults, &mut devices, &mut send) {
                        None => return,
                        Some(true) => continue,
                        Some(false) => {}
                    }
                    if stop2.load(Ordering::Acquire) {
                        // Last passes: events submitted before the stop was asked for.
                        while pass(&mut faults, &mut devices, &mut send) == Some(true) {}
                        return;
                    }
                    let mut pfds = [
                        libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: dev_fd,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: wake,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // The kernel programs submit most events without a wakeup (a wakeup per
                    // fault costs more than the fault); this timeout bounds their latency,
                    // and a filling ring or any device event still wakes us at once.
                    if let Err(e) = wait(&mut pfds) {
                        // Dropping `tx` ends the agent's loop, which reports this.
                        *failed2.lock().unwrap() = Some(e);
                        return;
                    }
                    if pfds[2].revents & libc::POLLIN != 0 {
                        let mut v = 0u64;
                        // SAFETY: reading the 8-byte eventfd counter.
                        unsafe { libc::read(wake, (&mut v as *mut u64).cast(), 8) };
                        // Everything submitted before the sync request.
                        loop {
                            match pass(&mut faults, &mut devices, &mut send) {
                                None => return,
                                Some(true) => continue,
                                Some(false) => break,
                            }
                        }
                        let (lock, cv) = &*drained2;
                        *lock.lock().unwrap() += 1;
                        cv.notify_all();
                    }
                }
            })
            .expect("spawn reader thread");
        Self {
            stop,
            failed,
            handle: Some(handle),
            wake,
            drained,
        }
    }

    /// Returns once everything the kernel submitted before this call is in the channel:
    /// true; false when that took longer than `wait` (the caller's answer may be behind).
    /// Answers about "right now" (the control socket) call this first.
    pub fn sync(&self, wait: Duration) -> bool {
        let (lock, cv) = &*self.drained;
        let guard = lock.lock().unwrap();
        let before = *guard;
        let one = 1u64;
        // SAFETY: writing the 8-byte eventfd counter.
        unsafe { libc::write(self.wake, (&one as *const u64).cast(), 8) };
        // A poisoned lock: the thread died mid-drain, nothing is known to be handed over.
        cv.wait_timeout_while(guard, wait, |n| *n == before)
            .is_ok_and(|(_guard, r)| !r.timed_out())
    }

    /// Why the thread stopped by itself, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }

    /// Asks the thread to drain what is left and stop; waits for it.
    pub fn stop(self) {
        // Drop stops and joins.
    }
}

/// Waits for the ring (`pfds[0]`) or the wake eventfd (`pfds[1]`). An error means the
/// reader can no longer see the ring: a failed poll other than an interruption, or a ring
/// fd the kernel reports invalid or in error.
fn wait(pfds: &mut [libc::pollfd; 3]) -> Result<(), String> {
    // SAFETY: three valid pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 3, POLL_MS) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(());
        }
        return Err(format!("polling the event ring failed: {e}"));
    }
    for (p, what) in pfds
        .iter()
        .zip(["event ring", "device event ring", "wake eventfd"])
    {
        if p.revents & (libc::POLLNVAL | libc::POLLERR) != 0 {
            return Err(format!(
                "the {what} (fd {}) is {}",
                p.fd,
                if p.revents & libc::POLLNVAL != 0 {
                    "no longer open"
                } else {
                    "in error"
                }
            ));
        }
    }
    Ok(())
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        // SAFETY: our eventfd, closed once, after the thread that polls it has ended.
        unsafe { libc::close(self.wake) };
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    struct List(VecDeque<Vec<u8>>);
    impl Source for List {
        fn next_record(&mut self) -> Option<Vec<u8>> {
            self.0.pop_front()
        }
    }
    /// A record tagged `tag` and stamped `ts` (the header's place for it, as the kernel
    /// programs write it).
    fn rec(tag: u8, ts: u64) -> Vec<u8> {
        let mut r = vec![tag; 16];
        r[8..16].copy_from_slice(&ts.to_ne_bytes());
        r
    }
    fn list(recs: &[(u8, u64)]) -> List {
        List(recs.iter().map(|&(t, ts)| rec(t, ts)).collect())
    }
    fn run(f: &mut List, d: &mut List, out: &mut Vec<u8>) -> Option<bool> {
        pass(f, d, &mut |r| {
            out.push(r[0]);
            true
        })
    }

    /// A record of `kind` as the kernel programs write it (header only).
    fn of_kind(kind: EventKind) -> Vec<u8> {
        let mut r = vec![0; 16];
        r[0..4].copy_from_slice(&(kind as u32).to_ne_bytes());
        r
    }

    #[test]
    fn a_full_channel_drops_and_counts_page_table_records_never_device_records() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(DEVICE_RESERVE + 2);
        let lost = AtomicU64::new(0);
        for _ in 0..10 {
            assert!(forward(&tx, of_kind(EventKind::Fault), &lost));
        }
        // Two fit above the reserve; the rest are counted, not queued, not waited for.
        assert_eq!(lost.load(Ordering::Relaxed), 8);
        // Device records still find room (the reserve), without waiting.
        for kind in [EventKind::Device, EventKind::MemoryFailure] {
            assert!(forward(&tx, of_kind(kind), &lost));
        }
        assert!(forward(&tx, of_kind(EventKind::Zap), &lost));
        assert_eq!(lost.load(Ordering::Relaxed), 9);
        let mut got = Vec::new();
        while let Ok(r) = rx.try_recv() {
            got.push(u32::from_ne_bytes(r[0..4].try_into().unwrap()));
        }
        assert_eq!(got, [1, 1, 5, 6]);
        // The loop gone: the reader stops.
        drop(rx);
        assert!(!forward(&tx, of_kind(EventKind::Fault), &lost));
        assert!(!forward(&tx, of_kind(EventKind::Device), &lost));
    }

    #[test]
    fn a_device_record_follows_the_faults_that_were_waiting() {
        let mut f = list(&[(1, 10), (2, 11), (3, 12)]);
        let (mut d, mut out) = (list(&[(100, 20)]), Vec::new());
        assert_eq!(run(&mut f, &mut d, &mut out), Some(false));
        assert_eq!(out, vec![1, 2, 3, 100]);
    }

    /// The hwpoison/xfs failure on 5.10: the kernel's memory_failure unmapped the page
    /// (zap records on the fault ring) after its start record (device ring); sent behind
    /// those zaps, the start was judged against a map they had already emptied.
    #[test]
    fn a_device_record_goes_before_the_unmaps_that_came_after_it() {
        let mut f = list(&[(1, 10), (2, 11), (50, 30), (51, 31)]);
        let (mut d, mut out) = (list(&[(100, 20), (101, 40)]), Vec::new());
        assert_eq!(run(&mut f, &mut d, &mut out), Some(false));
        assert_eq!(out, vec![1, 2, 100, 50, 51, 101]);
    }

    #[test]
    fn a_storm_cannot_hold_a_device_record_back_beyond_one_batch() {
        let n = 3 * BACKLOG_BEFORE_DEVICE as u64;
        let mut f = List((0..n).map(|i| rec(1, i)).collect());
        let (mut d, mut out) = (list(&[(9, n)]), Vec::new());
        assert_eq!(run(&mut f, &mut d, &mut out), Some(true), "storm left over");
        assert_eq!(out.len(), BACKLOG_BEFORE_DEVICE + 1);
        assert_eq!(
            out.iter().position(|&t| t == 9),
            Some(BACKLOG_BEFORE_DEVICE)
        );
        // One stamped amid the storm goes out where it belongs.
        let (mut d, mut out) = (list(&[(7, n / 2)]), Vec::new());
        run(&mut f, &mut d, &mut out);
        let at = out.iter().position(|&t| t == 7).unwrap();
        assert_eq!(at, (n / 2) as usize - BACKLOG_BEFORE_DEVICE);
    }

    #[test]
    fn a_gone_receiver_stops_the_pass() {
        let (mut f, mut d) = (list(&[(1, 1), (2, 2)]), list(&[]));
        let mut n = 0;
        let r = pass(&mut f, &mut d, &mut |_| {
            n += 1;
            false
        });
        assert_eq!((r, n), (None, 1));
    }

    fn pfds(ring: RawFd, wake: RawFd) -> [libc::pollfd; 3] {
        [ring, wake, wake].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
    }

    fn eventfd() -> RawFd {
        // SAFETY: plain syscall.
        unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }
    }

    #[test]
    fn a_quiet_ring_is_not_an_error() {
        let (a, b) = (eventfd(), eventfd());
        assert_eq!(wait(&mut pfds(a, b)), Ok(()));
        // SAFETY: our fds.
        unsafe { (libc::close(a), libc::close(b)) };
    }

    #[test]
    fn a_ring_fd_that_went_away_stops_the_reader_with_the_reason() {
        let wake = eventfd();
        // Far above any fd this process has open: poll reports it invalid (closing a real
        // one would race with tests that open files meanwhile).
        let gone: RawFd = 1 << 30;
        let err = wait(&mut pfds(gone, wake)).unwrap_err();
        assert!(
            err.contains("event ring") && err.contains("no longer open"),
            "{err}"
        );
        // SAFETY: our fd.
        unsafe { libc::close(wake) };
    }
}
