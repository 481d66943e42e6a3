//! Replay: a recorded `monitor --json` session rebuilds the holders the live agent had,
//! through the agent's own applier, both loaded at once and played by the paced thread.

use std::{
    sync::{Arc, atomic::AtomicBool, mpsc::sync_channel},
    time::{Duration, Instant},
};

use dax_probe::ui::tui::{
    feed::FeedMsg,
    model::{DevState, Model, Snapshot},
    replay,
};

const FIXTURE: &str = include_str!("fixtures/monitor-6.12.jsonl");

/// (device, state, [(pid, comm, file, pages, page size)])
type Holders = Vec<(String, DevState, Vec<(u32, String, String, u64, u64)>)>;

fn holders(s: &Snapshot) -> Holders {
    s.devices
        .iter()
        .zip(&s.holders)
        .map(|(d, hs)| {
            let mut v: Vec<_> = hs
                .iter()
                .map(|h| {
                    (
                        h.pid,
                        h.comm.clone(),
                        h.file.clone().unwrap_or_default(),
                        h.pages,
                        h.page_size,
                    )
                })
                .collect();
            v.sort();
            (d.name.clone(), d.state, v)
        })
        .collect()
}

#[test]
fn replay_rebuilds_the_live_holders() {
    let mut m = Model::new();
    let check = replay::load_str(&mut m, FIXTURE);
    // The live agent's departure report (its map at that moment) matches the replay's.
    assert_eq!(check.agreed, 1);
    assert!(check.disagreed.is_empty(), "{:?}", check.disagreed);
    let s = m.snapshot();
    let t = |x: &str| x.to_string();
    assert_eq!(
        holders(&s),
        vec![
            (
                t("pmem0"),
                DevState::Online,
                vec![
                    // From the start-up snapshot: mapped before the agent.
                    (150, t("postgres"), t("/mnt/ext4/db.dat"), 512, 2 << 20),
                    // Four faults, a fork (the child exited) and one more fault.
                    (165, t("dax-workload"), t("/mnt/ext4/log.bin"), 5, 4096),
                ]
            ),
            (
                t("pmem1"),
                DevState::Online,
                // Zapped and re-found at the mremap target.
                vec![(170, t("cache"), t("/mnt/xfs/cache.bin"), 512, 2 << 20)]
            ),
            (
                t("pmem2"),
                DevState::Gone,
                // The stale mapping the kernel left after the unbind.
                vec![(
                    180,
                    t("reader"),
                    t("/mnt/unbind-report-ext4/unbind-report"),
                    2,
                    4096
                )]
            ),
        ]
    );
    assert_eq!(s.stats.malformed, 1);
    assert_eq!(s.stats.kernel_dropped, 37);
    assert_eq!(s.stats.ui_lag, 0);
    let log: Vec<&str> = s.log.iter().map(|e| e.text.as_str()).collect();
    assert!(
        log.iter().any(|l| l.starts_with("pmem2 DEPARTING")),
        "{log:?}"
    );
    assert!(log.iter().any(|l| l.starts_with("pmem2 GONE")), "{log:?}");
    assert!(
        log.iter().any(|l| l.contains("skipped malformed line 11")),
        "{log:?}"
    );
}

#[test]
fn the_fork_child_held_pages_until_it_exited() {
    // Stop right after the fork: the child holds copies of the parent's PTEs it never
    // faulted, which only the recorded resync state can tell.
    let upto: String = FIXTURE
        .lines()
        .take_while(|l| !l.contains("\"type\":\"zap\""))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut m = Model::new();
    replay::load_str(&mut m, &upto);
    let h = holders(&m.snapshot());
    let pmem0: Vec<(u32, u64)> = h[0].2.iter().map(|x| (x.0, x.3)).collect();
    assert_eq!(pmem0, vec![(150, 512), (165, 4), (166, 4)]);
}

#[test]
fn paced_replay_ends_in_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rec.jsonl");
    std::fs::write(&path, FIXTURE).unwrap();
    let (tx, rx) = sync_channel(64);
    let paused = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    // 4.5 recorded seconds at 20x: about a quarter of a second.
    let t = Instant::now();
    replay::spawn(path, 20.0, paused, quit, tx).unwrap();
    let mut m = Model::new();
    let mut clocks = 0;
    loop {
        match rx
            .recv_timeout(Duration::from_secs(10))
            .expect("replay stalled")
        {
            FeedMsg::Text(l) => {
                let _ = m.ingest(&l);
            }
            FeedMsg::Clock(ns) => {
                clocks += 1;
                m.set_clock(ns);
            }
            FeedMsg::Ended(e) => {
                assert!(e.is_none());
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(3),
        "paced at 20x, 4.5 s of recording took {took:?}"
    );
    assert!(clocks > 0);
    let mut all = Model::new();
    replay::load_str(&mut all, FIXTURE);
    assert_eq!(holders(&m.snapshot()), holders(&all.snapshot()));
    assert_eq!(m.stats, all.stats);
}
