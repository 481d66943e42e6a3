//! Comparing the agent's fault events with pagemap ground truth. Pure functions, unit-tested
//! on the host so a comparison bug cannot hide a VM failure.

use crate::agent::Fault;

/// A range a workload touched, with what the kernel says backs each 4 KiB page.
pub struct Expect {
    pub label: String,
    pub pid: u32,
    pub dev: (u32, u32),
    pub ino: u64,
    pub addr: u64,
    /// Ground truth per 4 KiB page (pagemap).
    pub truth: Vec<Option<u64>>,
    /// Page size the faults must have mapped with.
    pub page_size: u64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Pages touched (and present in pagemap).
    pub pages: u64,
    /// Pages whose agent pfn equals pagemap's.
    pub matched: u64,
    /// Pages with no agent event at all.
    pub missing: u64,
    /// Pages where the agent names another pfn (or no pfn).
    pub wrong_pfn: u64,
    /// Pages mapped with another page size than expected.
    pub wrong_size: u64,
    /// Pages pagemap shows as not present (the workload did not really touch them).
    pub not_present: u64,
    /// Distinct agent events that covered this range.
    pub events: u64,
    pub examples: Vec<String>,
}

impl Tally {
    pub fn perfect(&self) -> bool {
        self.pages > 0
            && self.matched == self.pages
            && self.missing + self.wrong_pfn + self.wrong_size + self.not_present == 0
    }
}

/// Checks every page of `x` against the agent's fault events.
pub fn tally(events: &[Fault], x: &Expect) -> Tally {
    // Mapped fault events of this process, file and device, in arrival order.
    let mine: Vec<&Fault> = events
        .iter()
        .filter(|e| {
            e.tgid == x.pid && e.ino == x.ino && (e.dev.major, e.dev.minor) == x.dev && e.mapped
        })
        .collect();
    let mut t = Tally::default();
    let mut used = std::collections::HashSet::new();
    for (i, truth) in x.truth.iter().enumerate() {
        let va = x.addr + i as u64 * 4096;
        let Some(truth) = truth else {
            t.not_present += 1;
            if t.examples.len() < 5 {
                t.examples
                    .push(format!("{}: page {va:#x} not present in pagemap", x.label));
            }
            continue;
        };
        t.pages += 1;
        // The latest event covering this page decides (a write after a read remaps).
        let hit = mine
            .iter()
            .enumerate()
            .rev()
            .find(|(_, e)| va >= e.page_address && va < e.page_address + e.span());
        let Some((idx, e)) = hit else {
            t.missing += 1;
            if t.examples.len() < 5 {
                t.examples
                    .push(format!("{}: no agent event for page {va:#x}", x.label));
            }
            continue;
        };
        used.insert(idx);
        let size = e.page_size;
        if size != x.page_size {
            t.wrong_size += 1;
            if t.examples.len() < 5 {
                t.examples.push(format!(
                    "{}: page {va:#x} mapped with {size} bytes, expected {}",
                    x.label, x.page_size
                ));
            }
        }
        let agent_pfn = e.pfn_at(va);
        if agent_pfn == Some(*truth) {
            t.matched += 1;
        } else {
            t.wrong_pfn += 1;
            if t.examples.len() < 5 {
                t.examples.push(format!(
                    "{}: page {va:#x}: agent pfn {agent_pfn:?}, pagemap {truth:#x}",
                    x.label
                ));
            }
        }
    }
    t.events = used.len() as u64;
    t
}

#[cfg(test)]
mod tests {
    use dax_probe::topology::DevId;

    use super::*;

    fn ev(pid: u32, start: u64, size: u64, pfn: u64) -> Fault {
        Fault {
            ts_ns: 0,
            tgid: pid,
            tid: pid,
            comm: "w".into(),
            dev: DevId {
                major: 259,
                minor: 0,
            },
            ino: 12,
            offset: 0,
            address: start,
            page_address: start,
            pfn: Some(pfn),
            pfn_source: None,
            page_size: size,
            write: false,
            user: true,
            mapped: true,
            zero_page: false,
            result: "NOPAGE".into(),
            result_raw: 0x100,
            vma_start: 0,
            vma_end: 0,
            shared: true,
            device: None,
            devdax: false,
            mm: 0,
            pages: 1,
            last_ts_ns: 0,
            range: None,
        }
    }

    fn expect(truth: Vec<Option<u64>>, page_size: u64) -> Expect {
        Expect {
            label: "t".into(),
            pid: 7,
            dev: (259, 0),
            ino: 12,
            addr: 0x200000,
            truth,
            page_size,
        }
    }

    #[test]
    fn pte_events_match_page_by_page() {
        let events = vec![ev(7, 0x200000, 4096, 100), ev(7, 0x201000, 4096, 101)];
        let t = tally(&events, &expect(vec![Some(100), Some(101)], 4096));
        assert!(t.perfect(), "{t:?}");
        assert_eq!(t.events, 2);
    }

    #[test]
    fn a_range_covers_its_pages_and_no_more() {
        let mut r = ev(7, 0x200000, 4096, 100);
        r.pages = 3;
        // The range says pfns 100, 101, 102: the third page is backed by 555 in truth, and
        // the fourth is past its end.
        let t = tally(
            &[r],
            &expect(vec![Some(100), Some(101), Some(555), Some(103)], 4096),
        );
        assert_eq!(
            (t.pages, t.matched, t.wrong_pfn, t.missing, t.events),
            (4, 2, 1, 1, 1)
        );
    }

    #[test]
    fn one_pmd_event_covers_512_pages() {
        let events = vec![ev(7, 0x200000, 2 << 20, 0x1000)];
        let truth = (0..512).map(|i| Some(0x1000 + i)).collect();
        let t = tally(&events, &expect(truth, 2 << 20));
        assert!(t.perfect(), "{t:?}");
        assert_eq!((t.pages, t.events), (512, 1));
    }

    #[test]
    fn detects_missing_wrong_and_foreign_events() {
        let events = vec![
            ev(7, 0x200000, 4096, 999), // wrong pfn
            ev(8, 0x201000, 4096, 101), // other process: must not count
        ];
        let t = tally(&events, &expect(vec![Some(100), Some(101), None], 4096));
        assert!(!t.perfect());
        assert_eq!(
            (t.pages, t.matched, t.wrong_pfn, t.missing, t.not_present),
            (2, 0, 1, 1, 1)
        );
    }

    #[test]
    fn wrong_page_size_fails_even_with_right_pfns() {
        let events = vec![ev(7, 0x200000, 4096, 100)];
        let t = tally(&events, &expect(vec![Some(100)], 2 << 20));
        assert_eq!((t.matched, t.wrong_size), (1, 1));
        assert!(!t.perfect());
    }

    #[test]
    fn nothing_touched_is_not_a_pass() {
        let t = tally(&[], &expect(vec![], 4096));
        assert!(!t.perfect());
    }
}
