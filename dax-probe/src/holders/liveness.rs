//! Which holders are alive, known without reading /proc. Every answer about now and every
//! departure first hides the holders that exited (`Applier::forget_gone`); asking /proc
//! costs an open, a read and a close of each holder's stat, which under a departure's
//! clock is most of the time before the first verdict. An enforcing agent holds a pidfd
//! of each holder it pinned (`policy::pins`), and one `poll` of those tells which exited.

/// Knows, for some processes, whether they have exited.
pub trait Liveness {
    /// For each (pid, start time): `Some(true)` exited (a zombie included), `Some(false)`
    /// alive, `None` not known here (the caller asks /proc).
    fn exited(&self, procs: &[(u32, u64)]) -> Vec<Option<bool>>;
}
