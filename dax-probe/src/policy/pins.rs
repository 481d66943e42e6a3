//! Holders pinned ahead of a departure. When a process becomes a holder the enforcing agent
//! opens its pidfd, then its stat and its pagemap (or maps, where page tables cannot be
//! read at a departure), and checks its start time through them; a departure then
//! re-checks each holder with one read of each and signals it through that pidfd, instead
//! of opening three files per holder while the kernel carries the unbind on.
//!
//! A pin names its process for as long as it is open (see [`Pinned`]): a pid reused since
//! is another process, which the pin's reads do not see. Pins cost three descriptors
//! each; their number is capped by the open-file limit, and a holder without one is
//! re-checked the old way (everything opened at the departure), never skipped.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    rc::Rc,
};

use super::guard::Proof;
use crate::{
    holders::liveness::Liveness,
    os::{Os, Pinned},
};

/// Descriptors one pin holds: pidfd and stat, and pagemap or maps for a proof.
fn fds_per_pin(proof: Option<Proof>) -> u64 {
    2 + proof.is_some() as u64
}
/// Descriptors left to everything else: BPF maps, links and rings, sockets, the audit
/// log, the history database, and a signal batch's pidfds for unpinned holders.
const RESERVED_FDS: u64 = 1024;
/// At most this many pins whatever the limit: the map of pins stays small.
const MAX_PINS: usize = 65_536;

/// pid → (start time, pin).
type ByPid = HashMap<u32, (u64, Rc<dyn Pinned>)>;

pub struct Pins {
    /// Shared with the [`Pins::liveness`] handed to the holder map.
    by_pid: Rc<RefCell<ByPid>>,
    cap: usize,
    /// What a pin opens besides its pidfd and stat: the proof departures will use; none
    /// for a monitor that does not enforce, whose pins only tell who exited.
    pub proof: Option<Proof>,
    /// Holders left unpinned because the cap was reached.
    pub over_cap: u64,
    /// Those holders (pid, start time), so each is counted once and not tried again on
    /// its every fault (a resync of every pin tries them: [`Pins::retain`] may have made
    /// room); gone with the pins ([`Pins::retain`]).
    refused: HashSet<(u32, u64)>,
}

impl Pins {
    pub fn new(cap: usize) -> Self {
        Self {
            by_pid: Rc::default(),
            cap: cap.min(MAX_PINS),
            proof: Some(Proof::PageTables),
            over_cap: 0,
            refused: HashSet::new(),
        }
    }

    /// As many pins for `proof` as the current open-file limit leaves room for beside
    /// [`RESERVED_FDS`].
    pub fn within_open_file_limit(proof: Option<Proof>) -> Self {
        let n = nofile_limit().saturating_sub(RESERVED_FDS) / fds_per_pin(proof);
        Self {
            proof,
            ..Self::new(n as usize)
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn len(&self) -> usize {
        self.by_pid.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.borrow().is_empty()
    }

    /// Tells, for every pinned process, whether it exited: one `poll` of their pidfds in
    /// place of a stat read each (see [`crate::holders::liveness`]).
    pub fn liveness(&self) -> Rc<dyn Liveness> {
        Rc::new(PinLiveness(self.by_pid.clone()))
    }

    /// Pins `pid`, seen as a holder started at `start_time`, unless it is pinned already.
    /// The start time is checked through the pin after every open, so the pin is of the
    /// process the holder map means and not of one that took its pid in between. False:
    /// not pinned (gone, another process, unknown start, no room left).
    pub fn pin(&mut self, os: &dyn Os, pid: u32, start_time: u64) -> bool {
        if start_time == 0 {
            return false;
        }
        let mut by_pid = self.by_pid.borrow_mut();
        if let Some((s, _)) = by_pid.get(&pid) {
            if *s == start_time {
                return true;
            }
            // The pid names another process now: the old pin is of a process gone.
            by_pid.remove(&pid);
        }
        if by_pid.len() >= self.cap {
            if self.refused.insert((pid, start_time)) {
                self.over_cap += 1;
            }
            return false;
        }
        let Ok(p) = os.pin(pid, self.proof) else {
            return false;
        };
        if p.identity().map(|(s, _, _)| s) != Some(start_time) {
            return false;
        }
        by_pid.insert(pid, (start_time, Rc::from(p)));
        self.refused.remove(&(pid, start_time));
        true
    }

    /// Was `pid` started at `start_time` left unpinned for want of room?
    pub fn refused(&self, pid: u32, start_time: u64) -> bool {
        self.refused.contains(&(pid, start_time))
    }

    /// The pin of `pid` started at `start_time`, if it has one.
    pub fn get(&self, pid: u32, start_time: u64) -> Option<Rc<dyn Pinned>> {
        self.by_pid
            .borrow()
            .get(&pid)
            .filter(|(s, _)| *s == start_time)
            .map(|(_, p)| p.clone())
    }

    /// Closes the pins of processes `keep` says are holders no more.
    pub fn retain(&mut self, mut keep: impl FnMut(u32, u64) -> bool) {
        self.by_pid
            .borrow_mut()
            .retain(|&pid, (s, _)| keep(pid, *s));
        self.refused.retain(|&(pid, s)| keep(pid, s));
    }
}

struct PinLiveness(Rc<RefCell<ByPid>>);

impl Liveness for PinLiveness {
    fn exited(&self, procs: &[(u32, u64)]) -> Vec<Option<bool>> {
        let by_pid = self.0.borrow();
        let pins: Vec<Option<&Rc<dyn Pinned>>> = procs
            .iter()
            .map(|(pid, start)| by_pid.get(pid).filter(|(s, _)| s == start).map(|(_, p)| p))
            .collect();
        let fds: Vec<_> = pins
            .iter()
            .flatten()
            .filter_map(|p| p.pidfd_raw())
            .collect();
        let mut polled = if fds.is_empty() {
            Vec::new()
        } else {
            crate::policy::signal::exited(&fds)
        }
        .into_iter();
        pins.iter()
            .map(|p| match p {
                None => None,
                Some(p) if p.pidfd_raw().is_some() => polled.next().flatten(),
                Some(p) => p.exited(),
            })
            .collect()
    }
}

/// The soft open-file limit.
fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// Raises the soft open-file limit to the hard one (what an unprivileged process may do
/// too): pins need two or three descriptors per holder. Returns the soft limit now.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer, then the same struct back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    nofile_limit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::fake::{Call, FakeOs, FakeProc};

    fn os() -> FakeOs {
        FakeOs::new(
            &[
                (100, FakeProc::holder("app", 7)),
                (
                    101,
                    FakeProc {
                        recycled_on_open: Some(99),
                        ..FakeProc::holder("app", 8)
                    },
                ),
            ],
            &["/mnt/pmem0"],
        )
    }

    /// A pin is opened once per process and kept only when the process behind it is the
    /// holder the map means.
    #[test]
    fn a_pin_is_of_the_holder_the_map_means_and_opened_once() {
        let os = os();
        let mut pins = Pins::new(10);
        assert!(pins.pin(&os, 100, 7));
        assert!(pins.pin(&os, 100, 7));
        let opens = os.log().iter().filter(|c| **c == Call::Pin(100)).count();
        assert_eq!(opens, 1, "pinned twice: {:?}", os.log());
        assert!(pins.get(100, 7).is_some());
        assert!(
            pins.get(100, 8).is_none(),
            "a pin answers for its start time only"
        );
        // The pid was reused between the map's event and the open: not that holder.
        assert!(!pins.pin(&os, 101, 8));
        assert!(pins.get(101, 8).is_none() && pins.get(101, 99).is_none());
        // Unknown start time, a process gone.
        assert!(!pins.pin(&os, 100, 0));
        assert!(!pins.pin(&os, 555, 3));
        assert_eq!(pins.len(), 1);
        pins.retain(|_, _| false);
        assert!(pins.is_empty());
    }

    /// Past the cap nothing more is opened, and the holders left out are counted.
    #[test]
    fn pins_stop_at_their_cap() {
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("a", 7)),
                (200, FakeProc::holder("b", 7)),
            ],
            &["/mnt/pmem0"],
        );
        let mut pins = Pins::new(1);
        assert!(pins.pin(&os, 100, 7));
        assert!(!pins.pin(&os, 200, 7));
        // A holder faults many times: it is one holder left unpinned, not one per fault.
        assert!(!pins.pin(&os, 200, 7));
        assert!(pins.refused(200, 7));
        assert_eq!(pins.over_cap, 1);
        assert!(!os.log().contains(&Call::Pin(200)));
        // Room made: it is pinned when tried again, and no longer counted as left out.
        pins.retain(|pid, _| pid != 100);
        assert!(pins.pin(&os, 200, 7) && !pins.refused(200, 7));
        assert_eq!(pins.over_cap, 1);
    }

    /// A pin whose process exited and whose pid went to another process reads nothing:
    /// the new process is not the pinned one.
    #[test]
    fn a_pin_does_not_see_the_next_owner_of_its_pid() {
        let os = os();
        let mut pins = Pins::new(10);
        assert!(pins.pin(&os, 100, 7));
        os.state
            .borrow_mut()
            .procs
            .insert(100, FakeProc::holder("other", 9));
        let pin = pins.get(100, 7).unwrap();
        assert_eq!(pin.identity(), None);
        assert!(pin.pagemap().is_none());
        assert!(
            pin.send(crate::policy::signal::Signal(libc::SIGKILL))
                .is_err()
        );
        assert!(
            !os.log().iter().any(|c| matches!(c, Call::Signal { .. })),
            "{:?}",
            os.log()
        );
        // Pinning the new process replaces the stale pin.
        assert!(pins.pin(&os, 100, 9));
        assert!(pins.get(100, 7).is_none() && pins.get(100, 9).is_some());
    }

    /// The liveness answers for pinned processes only, each of its own start time: an
    /// unpinned one, and the old owner of a reused pid, are left to /proc.
    #[test]
    fn pins_tell_who_exited_and_nothing_of_others() {
        let os = FakeOs::new(
            &[
                (100, FakeProc::holder("a", 7)),
                (200, FakeProc::holder("b", 7)),
                (300, FakeProc::holder("c", 7)),
            ],
            &["/mnt/pmem0"],
        );
        let mut pins = Pins::new(10);
        let live = pins.liveness();
        assert!(pins.pin(&os, 100, 7) && pins.pin(&os, 200, 7));
        os.state.borrow_mut().procs.remove(&200);
        let asked = [(100, 7), (200, 7), (300, 7), (100, 6)];
        assert_eq!(live.exited(&asked), [Some(false), Some(true), None, None]);
        // The handle follows the pins it was taken from.
        pins.retain(|pid, _| pid != 100);
        assert_eq!(live.exited(&[(100, 7)]), [None]);
    }
}
