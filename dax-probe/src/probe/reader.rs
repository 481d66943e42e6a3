//! The ring-buffer reader: a dedicated thread that drains the kernel's events as fast as they
//! come and hands raw records to the rest of the agent through a channel.
//!
//! It runs on its own OS thread, not on the async runtime, so that nothing downstream (a slow
//! terminal, a JSON encoder, the TUI) can stall it and make the kernel drop events.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc::UnboundedSender;

/// Longest time an event waits in the ring before the reader looks.
pub const POLL_MS: i32 = 50;

pub struct Reader {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Reader {
    /// Starts draining `ring` into `tx`, one `Vec<u8>` per record.
    pub fn spawn(mut ring: RingBuf<MapData>, tx: UnboundedSender<Vec<u8>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
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
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // The kernel programs submit most events without a wakeup (a wakeup per
                    // fault costs more than the fault); this timeout bounds their latency,
                    // and a filling ring still wakes us at once.
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
                }
            })
            .expect("spawn reader thread");
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Asks the thread to drain what is left and stop; waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
