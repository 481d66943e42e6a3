//! Known-bad media (issue 14, part 2): a bad range written into a pmem block device's
//! badblocks list under a page two processes map (on xfs: two reflinked files sharing it),
//! and one in free space. The monitor's `media_error` and `dax-probe badblocks` must name
//! the file(s), the offsets and both holders, with the pfn pagemap gives; the free range
//! names no file. The kernel itself then proves the sector ↔ pfn translation: a holder that
//! drops its page table entry and reads the page again gets SIGBUS (pmem refuses DAX access
//! to listed sectors), and the agent links that SIGBUS to the earlier media error. The
//! policy `on_media_error = "signal"` signals both holders (they ignore the signal),
//! audited.
//!
//! The list is written as root writes it (`echo "SECTOR COUNT" > /sys/block/pmemN/
//! badblocks`: `disk_badblocks_store` → `badblocks_store`); no ranges can be removed again,
//! so the scenario takes a device of its own.

use std::{os::unix::process::CommandExt, time::Duration};

use anyhow::{Context, Result};
use dax_probe::badblocks::{MediaError, locate::SpaceKind};
use serde_json::json;

use super::{
    Checked, Env, Target,
    departure::{Verdict, death_signal, scratch_file},
};
use crate::{
    agent::{AGENT, Line, Monitor, parse_line, run_once},
    pagemap,
    puppet::{Huge, Puppet},
    sys,
};

const MIB: u64 = 1 << 20;
/// The page of the file that goes bad.
const PAGE: u64 = 5;

fn pids(m: &MediaError) -> Vec<u32> {
    let mut p: Vec<u32> = m.holders.iter().map(|h| h.pid).collect();
    p.sort();
    p.dedup();
    p
}

fn media_errors(text: &str) -> Vec<MediaError> {
    text.lines()
        .filter_map(|l| parse_line(l).ok())
        .filter_map(|l| match l {
            Line::MediaError(m) => Some(m),
            _ => None,
        })
        .collect()
}

pub fn run(env: &Env, t: Target) -> Result<Checked> {
    let fs = env.fresh(t, "badblocks")?;
    let file = scratch_file(&fs, "bb-a", 4 * MIB)?;
    let reflink = t == Target::Xfs && fs.reflink;
    let clone = file.replace("bb-a", "bb-b");
    if reflink {
        use std::os::fd::AsRawFd;
        let src = std::fs::File::open(&file)?;
        let dst = std::fs::File::create(&clone)?;
        const FICLONE: libc::c_ulong = 0x4004_9409;
        // SAFETY: valid fds.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
        anyhow::ensure!(rc == 0, "FICLONE: {}", std::io::Error::last_os_error());
    }
    let mut v = Verdict::new();
    let tag = format!("badblocks-{t}");
    let policy = format!("/tmp/policy-{tag}.toml");
    // The holders ignore USR2: the policy's signal is proven by the audit log and the
    // enforcement lines, and the holders stay for the SIGBUS part.
    std::fs::write(
        &policy,
        format!(
            "[device.{}]\non_media_error = \"signal\"\nsignal = \"USR2\"\ngrace = \"10m\"\nescalate = \"none\"\n",
            fs.dev.block
        ),
    )?;
    let audit = format!("/tmp/audit-{tag}.jsonl");
    let _ = std::fs::remove_file(&audit);
    let mut holders = Vec::new();
    for i in 0..2 {
        let mut p = Puppet::spawn()?;
        p.ignore(libc::SIGUSR2)?;
        let path = if reflink && i == 1 { &clone } else { &file };
        let a = p.map(path, 0, 4 * MIB, true, Huge::Pte)?;
        p.touch(a, 4 * MIB, false, 4096)?;
        holders.push((p, a));
    }
    // Ground truth: the pfn each holder maps at the page.
    let truth: Vec<Option<u64>> = holders
        .iter()
        .map(|(p, a)| {
            pagemap::pfns(p.pid, a + PAGE * 4096, 4096)
                .ok()
                .and_then(|x| x[0])
        })
        .collect();
    let pfn = truth[0].context("page not present in holder 0")?;
    v.count("pagemap_pfns", json!(format!("{truth:x?}")));
    v.check(
        "both holders map the page at one pfn (pagemap)",
        truth.iter().all(|p| *p == Some(pfn)),
        format!("{truth:x?}"),
    );
    anyhow::ensure!(
        fs.dev.contains_pfn(pfn),
        "pfn {pfn:#x} not on {}",
        fs.dev.block
    );
    let sector = ((pfn << 12) - fs.dev.data_start) / 512;
    let list = format!("/sys/block/{}/badblocks", fs.dev.block);
    // A range in free space: 7/8 into the device, the middle of the last ext4 block group
    // / xfs AG (headers sit at their starts; the files and ext4's flex_bg tables in the
    // first; xfs puts its log in the middle AG: 5/8 in is the log, seen in the VM).
    let dev_sectors = sys::read_u64(format!("/sys/block/{}/size", fs.dev.block))?;
    let free_sector = (dev_sectors * 7 / 8 + 128) & !7;
    let m = Monitor::start(
        &tag,
        &["--enforce", "--policy", &policy, "--audit-log", &audit],
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let before = sys::read(&list).unwrap_or_default();
    sys::write(&list, &format!("{sector} 8\n")).context("writing the badblocks list")?;
    sys::write(&list, &format!("{free_sector} 8\n"))?;
    // And the device's first page: the superblock (ext4) / AG 0 headers (xfs). Nothing
    // writes it again in this boot (the file system is never unmounted).
    sys::write(&list, "0 8\n")?;
    let listed = sys::read(&list).unwrap_or_default();
    v.count("list_before", json!(before.trim()));
    v.count("list_after", json!(listed.trim()));
    v.check(
        "the kernel lists both ranges",
        listed.contains(&format!("{sector} 8")) && listed.contains(&format!("{free_sector} 8")),
        listed.clone(),
    );
    // The monitor polls every 2 s.
    std::thread::sleep(Duration::from_secs(5));
    // `badblocks` while the monitor runs: holders from its live map.
    let (rc, out, err) = run_once(&["badblocks", &fs.dev.block, "--json"])?;
    let cli_live = media_errors(&out);
    v.check(
        "badblocks exits 0",
        rc == Some(0),
        format!("rc {rc:?}; {err}"),
    );
    let want_pids: Vec<u32> = {
        let mut p: Vec<u32> = holders.iter().map(|(p, _)| p.pid).collect();
        p.sort();
        p
    };
    let want_files: Vec<&str> = if reflink {
        vec![&file, &clone]
    } else {
        vec![&file]
    };
    let names_the_page = |m: &MediaError| {
        m.pfns == Some((pfn, pfn + 1))
            && want_files.iter().all(|w| {
                m.files
                    .iter()
                    .any(|f| f.path == *w && f.offset == PAGE * 4096 && f.end == (PAGE + 1) * 4096)
            })
            && m.files.len() == want_files.len()
            && pids(m) == want_pids
    };
    let in_file = |ms: &[MediaError]| ms.iter().find(|m| m.sector == sector).cloned();
    let in_free = |ms: &[MediaError]| ms.iter().find(|m| m.sector == free_sector).cloned();
    let c = in_file(&cli_live);
    v.check(
        "badblocks (monitor answering) names the pfn, the file(s) at the page's offset and both holders",
        c.as_ref().is_some_and(names_the_page),
        format!("{c:?}"),
    );
    let f = in_free(&cli_live);
    // Some xfs versions' GETFSMAP return no record for free space at all (6.1): the tool
    // then says the map skips it, never "free" or a file, and the fact records the kernel's.
    let all_of =
        |m: &MediaError, k: SpaceKind| !m.space.is_empty() && m.space.iter().all(|s| s.kind == k);
    let skipped = |m: &MediaError| {
        t == Target::Xfs
            && all_of(m, SpaceKind::Unknown)
            && m.space.iter().all(|s| s.what.contains("skips it"))
    };
    if let Some(m) = &f {
        crate::report::fact(
            &format!("badblocks_{t}_free_space_in_fsmap"),
            json!(all_of(m, SpaceKind::Free)),
        );
    }
    v.check(
        "badblocks: the range in free space names no file and no holder, and says free space \
         (or, where the file system's GETFSMAP lists no free space, that its map skips it)",
        f.as_ref().is_some_and(|m| {
            m.files.is_empty() && m.holders.is_empty() && (all_of(m, SpaceKind::Free) || skipped(m))
        }),
        format!("{f:?}"),
    );
    if let Some(f) = &f {
        v.count("free_space", json!(f.space));
    }
    let meta = cli_live.iter().find(|m| m.sector == 0);
    if let Some(m) = meta {
        crate::report::fact(
            &format!("badblocks_{t}_metadata_in_fsmap"),
            json!(all_of(m, SpaceKind::Metadata)),
        );
    }
    v.check(
        "badblocks: the device's first page is file system metadata, in no file (or, where \
         the file system's GETFSMAP lists nothing there, that its map skips it)",
        meta.is_some_and(|m| m.files.is_empty() && (all_of(m, SpaceKind::Metadata) || skipped(m))),
        format!("{meta:?}"),
    );
    if let Some(m) = meta {
        v.count("metadata", json!(m.space));
    }
    // The later read: holder 0 drops its entry for the page and reads it again.
    let (mut p0, a0) = holders.remove(0);
    p0.dontneed(a0 + PAGE * 4096, 4096)?;
    let read = p0.touch(a0 + PAGE * 4096, 4096, false, 4096);
    let sig = death_signal(&mut p0, Duration::from_secs(3));
    v.check(
        "the holder's read of the bad page gets the kernel's SIGBUS",
        read.is_err() && sig == Some(libc::SIGBUS),
        format!("read {read:?}, death signal {sig:?}"),
    );
    // Its neighbour page is still readable by the other holder after the same drop.
    let (p1, a1) = &mut holders[0];
    p1.dontneed(*a1 + (PAGE + 1) * 4096, 4096)?;
    let next = p1.touch(*a1 + (PAGE + 1) * 4096, 4096, false, 4096);
    v.check(
        "the next page, not listed, reads fine",
        next.is_ok(),
        format!("{next:?}"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = m.stop()?;
    let events: Vec<MediaError> = out
        .lines
        .iter()
        .filter_map(|l| match l {
            Line::MediaError(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    let e = in_file(&events);
    v.check(
        "the monitor's media_error names the pfn, the file(s) at the page's offset and both holders",
        e.as_ref().is_some_and(names_the_page),
        format!("{events:?}"),
    );
    v.check(
        "each range is reported once",
        events.iter().filter(|m| m.sector == sector).count() == 1,
        format!("{events:?}"),
    );
    let ef = in_free(&events);
    v.check(
        "the monitor's media_error for free space names no file",
        ef.as_ref()
            .is_some_and(|m| m.files.is_empty() && m.holders.is_empty()),
        format!("{ef:?}"),
    );
    let sigbus = out.lines.iter().find_map(|l| match l {
        Line::KernelSigbus {
            sigbus,
            media_error,
            ..
        } if sigbus.pid == p0.pid => Some((sigbus.clone(), media_error.clone())),
        _ => None,
    });
    let name = format!("{} sectors {sector}+8", fs.dev.block);
    // How this kernel refused the read, from its own fault result, as a fact: a memory error
    // (VM_FAULT_HWPOISON, then force_sig_mceerr, which the agent hooks) or a plain
    // VM_FAULT_SIGBUS (BUS_ADRERR, which the agent reads off the fault record). Either way
    // the agent reports the SIGBUS and links it.
    const VM_FAULT_SIGBUS: u32 = 0x0002;
    const VM_FAULT_HWPOISON_ANY: u32 = 0x0010 | 0x0020;
    let bad_page = (a0 + PAGE * 4096) & !0xfff;
    let refused: Vec<u32> = out
        .lines
        .iter()
        .filter_map(|l| match l {
            Line::Fault(f) if f.tgid == p0.pid && f.page_address == bad_page => Some(f.result_raw),
            _ => None,
        })
        .filter(|r| r & (VM_FAULT_SIGBUS | VM_FAULT_HWPOISON_ANY) != 0)
        .collect();
    crate::report::fact(
        "badblocks_read_fault",
        json!(if refused.is_empty() {
            "no fault record"
        } else if refused.iter().all(|r| r & VM_FAULT_HWPOISON_ANY == 0) {
            "VM_FAULT_SIGBUS (BUS_ADRERR)"
        } else {
            "VM_FAULT_HWPOISON (BUS_MCEERR_AR)"
        }),
    );
    v.check(
        "the agent reports the holder's SIGBUS and links it to the earlier media error",
        sigbus
            .as_ref()
            .is_some_and(|(_, m)| m.as_deref() == Some(name.as_str())),
        format!(
            "{sigbus:?}; sigbus lines {:?}; refused fault results {refused:x?}",
            out.of_type("kernel_sigbus").collect::<Vec<_>>()
        ),
    );
    let acts: Vec<_> = out
        .enforcement()
        .filter(|a| a.device == fs.dev.block)
        .collect();
    let signalled = |pid: u32| {
        acts.iter()
            .any(|a| a.pid == pid && a.action == "signal" && a.signal.as_deref() == Some("SIGUSR2"))
    };
    v.check(
        "on_media_error = \"signal\" signals both holders",
        want_pids.iter().all(|p| signalled(*p)),
        format!("{acts:?}"),
    );
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    v.check(
        "the signals are in the audit log",
        want_pids.iter().all(|p| {
            log.lines()
                .any(|l| l.contains("\"signal\"") && l.contains(&format!("\"pid\":{p}")))
        }) && log.contains("media error"),
        log.clone(),
    );
    // Without a monitor: holders from a scan of the page tables (holder 0 is gone now).
    let (rc, out2, err2) = run_once(&["badblocks", &fs.dev.block, "--json"])?;
    let scanned = media_errors(&out2);
    let s = in_file(&scanned);
    v.check(
        "badblocks (scan) names the remaining holder only",
        rc == Some(0)
            && s.as_ref()
                .is_some_and(|m| pids(m) == vec![holders[0].0.pid]),
        format!("rc {rc:?} {s:?} {err2}"),
    );
    // Not root: the physical ranges (resource files) and page tables are root-only; the
    // list is still answered, with why holders are missing.
    let out = std::process::Command::new(AGENT)
        .args(["badblocks", &fs.dev.block, "--json"])
        .uid(65534)
        .gid(65534)
        .output()?;
    let nobody = media_errors(&String::from_utf8_lossy(&out.stdout));
    let n = in_file(&nobody);
    v.check(
        "badblocks as nobody: the range is listed, no holders claimed, the reason given",
        out.status.code() == Some(0)
            && n.as_ref().is_some_and(|m| {
                m.holders.is_empty()
                    && m.pfns.is_none()
                    && m.notes.iter().any(|x| x.contains("root-only"))
            }),
        format!(
            "exit {:?}: {n:?} {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ),
    );
    // Bad input: an unknown device is refused with its own exit code.
    let (rc, _, err) = run_once(&["badblocks", "pmem99"])?;
    v.check(
        "an unknown device exits 66 with a message naming it",
        rc == Some(66) && err.contains("pmem99"),
        format!("rc {rc:?}: {err}"),
    );
    v.count("media_errors", json!(events));
    v.count("sigbus", json!(format!("{sigbus:?}")));
    Ok(v.done(format!(
        "pfn {pfn:#x} = {} sector {sector}: {} file(s), holders {:?}; free range names {} file(s); SIGBUS linked: {}",
        fs.dev.block,
        e.as_ref().map(|m| m.files.len()).unwrap_or(0),
        e.as_ref().map(pids).unwrap_or_default(),
        ef.as_ref().map(|m| m.files.len()).unwrap_or(0),
        sigbus.as_ref().and_then(|(_, m)| m.clone()).unwrap_or_else(|| "no".into())
    )))
}
