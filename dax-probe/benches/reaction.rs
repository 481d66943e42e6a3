//! `cargo xtask bench reaction` (host part): the departure pipeline on this machine, with
//! no emulator in the way.
//!
//! Real forked processes each map one page of a file on the host's disk; the agent's own
//! enforcer (`Enforcer::act`, the live OS: real pidfds, /proc reads, the audit log on the
//! same disk, fdatasync and all) proves and signals every one (SIGKILL), as for a departing
//! device. The host has no pmem, so each holder is proven by its maps (the proof 7.x
//! departures use); the page-table proof needs DAX pfns and is measured in the VM bench.
//!
//! Each holder is proven as the agent does it: pinned when it became a holder (pidfd, stat
//! and maps opened then, outside the timed departure), then re-checked through the pin at
//! the address the holder map says it holds (one stat read, one `PROCMAP_QUERY` on 6.11+).
//! Beside it, in the same run and interleaved round by round: the same pipeline unpinned
//! (pidfd, stat and maps opened at the departure), the same without the addresses (the
//! whole /proc/PID/maps read per holder, as before the targeted proof), and the floor: the
//! same number of fresh processes killed by a bare loop of `pidfd_open` +
//! `pidfd_send_signal` (no proof, no audit). Prints, never asserts. Target (issue 11): 100
//! holders <= 2 ms from the departure to the last signal.

use std::{
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
    time::Instant,
};

use dax_probe::{
    holders::{
        query::HolderRow,
        scan::{Classifier, parse_stat},
    },
    os::LiveOs,
    policy::{
        audit::AuditLog,
        config::{Action, Rule},
        enforce::{Enforcer, boottime_ns},
        guard::{Proof, Scope, Stamps},
        signal::Signal,
    },
    topology::{DevId, Topology},
};

const ROUNDS: usize = 7;
const SIZES: [usize; 4] = [1, 10, 100, 1000];

/// `n` children that each map the first page of `file`, touch it, and wait to be killed:
/// (pid, the address of the page).
fn spawn_holders(file: &Path, n: usize) -> Vec<(u32, u64)> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open the bench file");
    let mut pids = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ready = [0i32; 2];
        // SAFETY: plain syscalls; the child only calls async-signal-safe functions.
        unsafe {
            assert_eq!(libc::pipe(ready.as_mut_ptr()), 0);
            match libc::fork() {
                0 => {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        f.as_raw_fd(),
                        0,
                    );
                    if p == libc::MAP_FAILED {
                        libc::_exit(1);
                    }
                    std::ptr::write_volatile(p as *mut u8, 1);
                    let at = (p as u64).to_ne_bytes();
                    libc::write(ready[1], at.as_ptr().cast(), 8);
                    loop {
                        libc::pause();
                    }
                }
                -1 => panic!("fork: {}", std::io::Error::last_os_error()),
                pid => {
                    let mut b = [0u8; 8];
                    libc::close(ready[1]);
                    assert_eq!(libc::read(ready[0], b.as_mut_ptr().cast(), 8), 8);
                    libc::close(ready[0]);
                    pids.push((pid as u32, u64::from_ne_bytes(b)));
                }
            }
        }
    }
    pids
}

fn reap(pids: &[(u32, u64)]) {
    for &(p, _) in pids {
        // SAFETY: our own children.
        unsafe {
            libc::kill(p as i32, libc::SIGKILL);
            libc::waitpid(p as i32, std::ptr::null_mut(), 0);
        }
    }
}

fn start_time(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    parse_stat(&stat).map_or(0, |(start, _)| start)
}

/// The rows the holder map would give the enforcer; `targeted`: with the page's address.
fn rows(file: &Path, pids: &[(u32, u64)], targeted: bool) -> Vec<HolderRow> {
    let md = fs::metadata(file).unwrap();
    let dev = DevId {
        major: libc::major(md.dev()),
        minor: libc::minor(md.dev()),
    };
    pids.iter()
        .map(|&(pid, at)| HolderRow {
            pid,
            start_time: start_time(pid),
            comm: "reaction-bench".into(),
            dev,
            ino: md.ino(),
            file: None,
            pages: 1,
            offsets: vec![(0, 4096)],
            extents: None,
            probe_at: if targeted { vec![at] } else { Vec::new() },
            cgroup: None,
            container: None,
            pod_uid: None,
        })
        .collect()
}

/// How the pipeline finds each holder.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Pinned beforehand, proven at its address through the pin (the agent).
    Pinned,
    /// Opened at the departure, proven at its address.
    Targeted,
    /// Opened at the departure, proven by its whole maps.
    WholeMaps,
}

/// The agent's pipeline: milliseconds from the "departure" to the last signal, and how many
/// holders it signalled.
fn pipeline(file: &Path, audit: &Path, pids: &[(u32, u64)], mode: Mode) -> (f64, usize) {
    let holders = rows(file, pids, mode != Mode::WholeMaps);
    let os = LiveOs::new(Path::new("/"));
    let topo = Topology::default();
    let class = Classifier { topology: &topo };
    let mut enf = Enforcer::new(AuditLog::open(audit).expect("audit log")).with_devmap(false);
    if mode == Mode::Pinned {
        // As the agent does when each became a holder, long before the departure.
        for h in &holders {
            enf.pins.pin(&os, h.pid, h.start_time);
        }
        assert_eq!(enf.pins.len(), holders.len(), "every holder pinned");
    }
    let rule = Rule {
        action: Action::Signal,
        signal: Signal(libc::SIGKILL),
        escalate: None,
        ..Rule::default()
    };
    let t0 = boottime_ns();
    let scope = Scope {
        device: "bench0",
        pfn_ranges: &[],
        proof: Proof::Mappings,
        stamps: Stamps {
            received_ns: t0,
            ..Stamps::default()
        },
    };
    let acts = enf.act(scope, &holders, &rule, t0, &os, &class, "bench departure");
    let last = acts
        .iter()
        .filter(|a| a.action == "signal")
        .filter_map(|a| a.since_departure_us)
        .max()
        .unwrap_or(0);
    let n = acts.iter().filter(|a| a.action == "signal").count();
    (last as f64 / 1e3, n)
}

/// The floor: kill them through pidfds, nothing else.
fn floor(pids: &[(u32, u64)]) -> f64 {
    let t = Instant::now();
    for &(p, _) in pids {
        // SAFETY: plain syscalls on our own children.
        unsafe {
            let fd = libc::syscall(libc::SYS_pidfd_open, p as i32, 0) as i32;
            if fd >= 0 {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
                libc::close(fd);
            }
        }
    }
    t.elapsed().as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn main() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-reaction");
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mapped");
    fs::write(&file, vec![0u8; 4096]).unwrap();
    let audit = dir.join("audit.jsonl");
    // Children may be many, each pinned: the agent raises its limit the same way.
    dax_probe::policy::pins::raise_open_file_limit();
    println!(
        "departure pipeline on the host ({} on {}): real processes, pidfds, /proc, audit log \
         fdatasynced on the same disk; {ROUNDS} rounds, the four interleaved",
        file.display(),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "  {:>7} {:>22} {:>10} {:>12} {:>10} {:>8} {:>16} {:>9}",
        "holders",
        "pipeline (ms)",
        "unpinned",
        "whole maps",
        "floor",
        "ratio",
        "per holder (us)",
        "signalled"
    );
    for n in SIZES {
        let (mut p, mut u, mut m, mut f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut signalled = 0;
        for round in 0..ROUNDS {
            // Rotate which runs first.
            for k in 0..4 {
                let pids = spawn_holders(&file, n);
                match (round + k) % 4 {
                    0 => {
                        let (ms, got) = pipeline(&file, &audit, &pids, Mode::Pinned);
                        p.push(ms);
                        signalled = signalled.max(got);
                    }
                    1 => u.push(pipeline(&file, &audit, &pids, Mode::Targeted).0),
                    2 => m.push(pipeline(&file, &audit, &pids, Mode::WholeMaps).0),
                    _ => f.push(floor(&pids)),
                }
                reap(&pids);
            }
        }
        let (mp, mu, mm, mf) = (
            median(&mut p),
            median(&mut u),
            median(&mut m),
            median(&mut f),
        );
        println!(
            "  {n:>7} {:>8.3} [{:.3}-{:.3}] {:>10.3} {:>12.3} {:>10.3} {:>8.1} {:>16.1} {:>9}",
            mp,
            p[0],
            p[p.len() - 1],
            mu,
            mm,
            mf,
            mp / mf.max(1e-6),
            mp * 1e3 / n as f64,
            signalled
        );
    }
    println!(
        "  pipeline: median [min-max] over rounds, each holder pinned beforehand and proven \
         through its pin at its address (PROCMAP_QUERY); unpinned: pidfd, stat and maps \
         opened at the departure (median); whole maps: unpinned and without addresses \
         (median); floor: pidfd_open + pidfd_send_signal only (median). Target: 100 \
         holders <= 2 ms."
    );
    let _ = fs::remove_file(&audit);
}
