//! `cargo xtask bench holders` (host part): the holder map under synthetic load.
//!
//! Prints, never asserts: bytes per range (counted by a wrapping allocator, so it is what the
//! process really holds), events ingested per second on one core, and the time of a
//! "who maps pfn X" lookup.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use dax_probe::{
    holders::map::{F_SHARED, FileKey, HolderMap, Run},
    topology::DevId,
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// A cheap deterministic generator (no dependency needed for a benchmark input).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

const PROCS: u32 = 1000;
const PER_PROC: u64 = 1000;

/// One synthetic fault: process `p`'s `i`-th page. Pages are spread over a 1 TiB device and
/// never contiguous with the previous one, so each event makes its own range.
fn event(p: u32, i: u64, rng: &mut Lcg) -> (u32, Run) {
    let pfn = (rng.next() % (1 << 28)) & !1; // even pfns only: never adjacent
    (
        p,
        Run {
            vpage: 0x7_f000_0000_u64 + (p as u64) * 0x10_0000 + i * 2,
            pfn,
            pgoff: i * 2,
            npages: 1,
            flags: F_SHARED,
        },
    )
}

fn main() {
    let file = |p: u32| FileKey {
        dev: DevId {
            major: 259,
            minor: 0,
        },
        ino: 100 + (p % 50) as u64,
    };
    let mut rng = Lcg(42);
    let events: Vec<(u32, Run)> = (0..PROCS)
        .flat_map(|p| (0..PER_PROC).map(move |i| (p, i)))
        .map(|(p, i)| event(p, i, &mut rng))
        .collect();
    let n = events.len();

    let base = LIVE.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut map = HolderMap::new();
    let ids: Vec<_> = (0..PROCS)
        .map(|p| map.holder(1000 + p, 1, "bench"))
        .collect();
    for (p, r) in &events {
        map.add(ids[*p as usize], file(*p), *r);
    }
    let ingest = t.elapsed();
    let bytes = LIVE.load(Ordering::Relaxed) - base;
    let ranges = map.extent_count();

    // Lookups of mapped pfns, in random order.
    let mut rng = Lcg(7);
    let probes: Vec<u64> = (0..1_000_000)
        .map(|_| events[(rng.next() as usize) % n].1.pfn)
        .collect();
    let t = Instant::now();
    let mut found = 0usize;
    for pfn in &probes {
        found += black_box(map.who_maps_iter(*pfn)).count();
    }
    let lookup = t.elapsed();

    // Sequential faults (the common case: a process touching a mapping in order).
    let mut seq = HolderMap::new();
    let h = seq.holder(1, 1, "seq");
    let t = Instant::now();
    for i in 0..1_000_000u64 {
        seq.add(
            h,
            file(0),
            Run {
                vpage: 0x7_f000_0000 + i,
                pfn: 0x10_0000 + i,
                pgoff: i,
                npages: 1,
                flags: F_SHARED,
            },
        );
    }
    let seq_ingest = t.elapsed();

    println!("holder map, synthetic: {n} fault events from {PROCS} processes, none adjacent");
    println!("  ranges stored:        {ranges}");
    println!(
        "  memory:               {:.1} MiB allocated = {:.1} bytes per range (target <= 64)",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / ranges as f64
    );
    println!(
        "  ingest:               {:.2} M events/s on one core (target >= 1)",
        n as f64 / ingest.as_secs_f64() / 1e6
    );
    println!(
        "  who maps pfn X:       {:.0} ns per lookup over {} random mapped pfns (target <= 1000); {} holders found",
        lookup.as_nanos() as f64 / probes.len() as f64,
        probes.len(),
        found
    );
    println!(
        "  sequential faults:    {:.2} M events/s, 1,000,000 pages stored as {} ranges",
        1e6 / seq_ingest.as_secs_f64() / 1e6,
        seq.extent_count()
    );
}
