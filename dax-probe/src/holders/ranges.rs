//! Coalesced fault ranges, reported once per page.
//!
//! The kernel coalesces successive faults of a mapping into one range per CPU
//! (`dax-probe-ebpf/src/fault.rs`) and emits it when the next fault does not continue it.
//! A range that stops growing would sit in its CPU's slot until that CPU faults again, so the
//! agent also reads the slots (on its poll, before an answer, at a departure). A range thus
//! reaches the agent several times: from the slot while it grows, then once as a record.
//! The [`Ledger`] keeps, per CPU, how much of each range was reported and hands on only the
//! pages not reported yet, so every fault shows in exactly one output line and is applied
//! once.
//!
//! A range read from its slot is applied ahead of the ring: a zap still queued behind, if it
//! is older than the range's pages, must not remove them. [`Ledger::ahead_of`] names those
//! ranges for the applier, which re-reads the overlap from the page tables.

use std::collections::{HashMap, VecDeque};

use crate::event::Fault;

/// Where a range was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Its record in the ring: everything the kernel emitted before it was applied before.
    Ring,
    /// Its CPU's pending slot, read ahead of the ring.
    Slot,
}

/// A range read from its slot whose record has not arrived yet.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ahead {
    seq: u64,
    /// Pages reported so far.
    pages: u64,
    mm: u64,
    tgid: u32,
    /// First 4 KiB virtual page and 4 KiB pages per range page.
    vpage: u64,
    step: u64,
    first_ns: u64,
}

/// Ranges read ahead per CPU that are remembered. A CPU has one pending range at a time; the
/// ones before it are in the ring already, so a handful covers any reader lag short of a
/// stopped agent (beyond it a range may be reported twice, never lost).
const AHEAD_PER_CPU: usize = 8;

#[derive(Debug, Default)]
pub struct Ledger {
    ahead: HashMap<u32, VecDeque<Ahead>>,
    /// Highest sequence number whose record arrived, per CPU.
    recorded: HashMap<u32, u64>,
}

impl Ledger {
    /// The part of `f` not reported before, or None when there is nothing new.
    pub fn fresh(&mut self, f: Fault, src: Source) -> Option<Fault> {
        let Some((cpu, seq)) = f.range else {
            return Some(f);
        };
        let recorded = self.recorded.get(&cpu).copied().unwrap_or(0);
        let list = self.ahead.entry(cpu).or_default();
        let known = list.iter().position(|a| a.seq == seq);
        match src {
            Source::Ring => {
                self.recorded.insert(cpu, recorded.max(seq));
                let seen = known
                    .and_then(|i| list.remove(i))
                    .map(|a| a.pages)
                    .unwrap_or(0);
                // Older ranges of this CPU are all recorded by now (the kernel emits them
                // in order).
                list.retain(|a| a.seq > seq);
                (f.pages > seen).then(|| f.tail(seen))
            }
            Source::Slot => {
                if seq <= recorded {
                    return None; // its record came first: already reported
                }
                match known {
                    Some(i) => {
                        let a = &mut list[i];
                        if f.pages <= a.pages {
                            return None;
                        }
                        let seen = a.pages;
                        a.pages = f.pages;
                        Some(f.tail(seen))
                    }
                    None => {
                        if list.len() >= AHEAD_PER_CPU {
                            list.pop_front();
                        }
                        list.push_back(Ahead {
                            seq,
                            pages: f.pages,
                            mm: f.mm,
                            tgid: f.tgid,
                            vpage: f.page_address >> 12,
                            step: f.page_size / 4096,
                            first_ns: f.ts_ns,
                        });
                        Some(f)
                    }
                }
            }
        }
    }

    /// The 4 KiB virtual page ranges of `tgid` or `mm`, within `[vs, ve)`, that ranges read
    /// ahead of the ring added after `ts_ns`: a zap stamped `ts_ns` and applied only now must
    /// not be taken to have removed them.
    pub fn ahead_of(
        &self,
        ts_ns: u64,
        mm: u64,
        tgid: Option<u32>,
        vs: u64,
        ve: u64,
    ) -> Vec<(u64, u64)> {
        self.ahead
            .values()
            .flatten()
            .filter(|a| a.first_ns > ts_ns && ((mm != 0 && a.mm == mm) || Some(a.tgid) == tgid))
            .filter_map(|a| {
                let (s, e) = (a.vpage, a.vpage + a.pages * a.step);
                let (s, e) = (s.max(vs), e.min(ve));
                (s < e).then_some((s, e))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::DevId;

    fn range(cpu: u32, seq: u64, pages: u64) -> Fault {
        Fault {
            ts_ns: 1_000,
            tgid: 7,
            tid: 7,
            comm: "w".into(),
            dev: DevId {
                major: 259,
                minor: 0,
            },
            ino: 12,
            offset: 0,
            address: 0x10_0000,
            page_address: 0x10_0000,
            pfn: Some(0x1000),
            pfn_source: None,
            page_size: 4096,
            write: false,
            user: true,
            mapped: true,
            zero_page: false,
            result: "NOPAGE".into(),
            result_raw: 0x100,
            vma_start: 0x10_0000,
            vma_end: 0x20_0000,
            shared: true,
            device: None,
            devdax: false,
            mm: 0xffff_1000,
            pages,
            last_ts_ns: 2_000,
            range: Some((cpu, seq)),
        }
    }

    #[test]
    fn a_range_read_while_growing_is_reported_page_by_page_once() {
        let mut l = Ledger::default();
        let first = l.fresh(range(0, 1, 10), Source::Slot).unwrap();
        assert_eq!(
            (first.page_address, first.pages, first.pfn),
            (0x10_0000, 10, Some(0x1000))
        );
        // Read again unchanged: nothing new.
        assert_eq!(l.fresh(range(0, 1, 10), Source::Slot), None);
        // Grown: only the new pages, with their own address, offset and pfn.
        let more = l.fresh(range(0, 1, 25), Source::Slot).unwrap();
        assert_eq!(
            (more.page_address, more.offset, more.pfn, more.pages),
            (0x10_0000 + 10 * 4096, 10 * 4096, Some(0x100a), 15)
        );
        // Its record: the last pages only, then never again.
        let rest = l.fresh(range(0, 1, 30), Source::Ring).unwrap();
        assert_eq!((rest.page_address, rest.pages), (0x10_0000 + 25 * 4096, 5));
        assert_eq!(l.fresh(range(0, 1, 30), Source::Slot), None);
        // Pages reported in all: 10 + 15 + 5 = 30, each once.
    }

    #[test]
    fn a_record_never_read_from_its_slot_is_reported_whole() {
        let mut l = Ledger::default();
        assert_eq!(l.fresh(range(1, 4, 30), Source::Ring).unwrap().pages, 30);
        // A stale slot copy of an older range of that CPU: its record came first.
        assert_eq!(l.fresh(range(1, 3, 2), Source::Slot), None);
        // Other CPUs keep their own numbering.
        assert_eq!(l.fresh(range(0, 4, 3), Source::Slot).unwrap().pages, 3);
        // Single faults pass untouched.
        let mut single = range(0, 0, 1);
        single.range = None;
        assert_eq!(l.fresh(single.clone(), Source::Ring), Some(single));
    }

    #[test]
    fn only_ranges_read_ahead_and_newer_than_a_zap_are_named_to_it() {
        let mut l = Ledger::default();
        l.fresh(range(0, 1, 16), Source::Slot);
        let (vs, ve) = (0x100, 0x100 + 16);
        // An older zap overlapping: the overlap is named.
        assert_eq!(
            l.ahead_of(500, 0xffff_1000, None, vs + 4, ve + 9),
            vec![(vs + 4, ve)]
        );
        assert_eq!(l.ahead_of(500, 0, Some(7), vs, vs + 1), vec![(vs, vs + 1)]);
        // A newer zap, another address space, a range elsewhere: none.
        assert!(l.ahead_of(1_500, 0xffff_1000, None, vs, ve).is_empty());
        assert!(l.ahead_of(500, 0xffff_2000, Some(8), vs, ve).is_empty());
        assert!(l.ahead_of(500, 0xffff_1000, None, ve, ve + 10).is_empty());
        // Its record arrived: the range is in order with the ring again.
        l.fresh(range(0, 1, 16), Source::Ring);
        assert!(l.ahead_of(500, 0xffff_1000, None, vs, ve).is_empty());
    }
}
