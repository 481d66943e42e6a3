//! The ring-buffer reader: a dedicated thread that drains the kernel's events as fast as they
//! come and hands raw records to the rest of the agent through a channel.
//!
//! It runs on its own OS thread, not on the async runtime, so that nothing downstream (a slow
//! terminal, a JSON encoder, the TUI) can stall it and make the kernel drop events.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc::UnboundedSender;

/// Longest time an event waits in the ring before the reader looks.
pub const POLL_MS: i32 = 50;

pub struct Reader {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    /// Wakes the thread for a drain on demand (see [`Reader::sync`]).
    wake: RawFd,
    /// How many on-demand drains the thread completed.
    drained: Arc<(Mutex<u64>, Condvar)>,
}

impl Reader {
    /// Starts draining `ring` into `tx`, one `Vec<u8>` per record.
    pub fn spawn(mut ring: RingBuf<MapData>, tx: UnboundedSender<Vec<u8>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        // SAFETY: plain syscall; the fd is owned by Reader and closed on drop.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        let drained: Arc<(Mutex<u64>, Condvar)> = Arc::default();
        let drained2 = drained.clone();
        let handle = std::thread::Builder::new()
            .name("ringbuf-reader".into())
            .spawn(move || {
                let fd: RawFd = ring.as_raw_fd();
                loop {
                    while let Some(item) = ring.next() {
                        if tx.send(item.to_vec()).is_err() {
                            return;
                        }
                    }
                    if stop2.load(Ordering::Acquire) {
                        // One last pass: events submitted before the stop was asked for.
                        while let Some(item) = ring.next() {
                            let _ = tx.send(item.to_vec());
                        }
                        return;
                    }
                    let mut pfds = [
                        libc::pollfd {
                            fd,
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
                    // and a filling ring still wakes us at once.
                    // SAFETY: two valid pollfds.
                    unsafe { libc::poll(pfds.as_mut_ptr(), 2, POLL_MS) };
                    if pfds[1].revents & libc::POLLIN != 0 {
                        let mut v = 0u64;
                        // SAFETY: reading the 8-byte eventfd counter.
                        unsafe { libc::read(wake, (&mut v as *mut u64).cast(), 8) };
                        while let Some(item) = ring.next() {
                            if tx.send(item.to_vec()).is_err() {
                                return;
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
            handle: Some(handle),
            wake,
            drained,
        }
    }

    /// Returns once everything the kernel submitted before this call is in the channel.
    /// Answers about "right now" (the control socket) call this first.
    pub fn sync(&self) {
        let (lock, cv) = &*self.drained;
        let guard = lock.lock().unwrap();
        let before = *guard;
        let one = 1u64;
        // SAFETY: writing the 8-byte eventfd counter.
        unsafe { libc::write(self.wake, (&one as *const u64).cast(), 8) };
        let _ = cv.wait_timeout_while(guard, Duration::from_secs(2), |n| *n == before);
    }

    /// Asks the thread to drain what is left and stop; waits for it.
    pub fn stop(self) {
        // Drop stops and joins.
    }
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
