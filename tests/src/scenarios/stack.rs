//! Stacks over pmem: device-mapper (linear, striped) over two fsdax members with ext4
//! `-o dax` on top, and an XFS whose realtime device is a second pmem. A member leaves:
//! the departure lists exactly the processes with pages on it (pagemap is the judge), and
//! what the kernel did is recorded as a fact. `drain` of a member refuses without
//! `--unbind`, naming the stack, and with it tears the stack down top-down.
//!
//! The dm devices are made with the agent's own ioctl client
//! (`dax_probe::topology::dm::create`): the guest has no dmsetup.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use dax_probe::topology::dm::{self, DmTarget};
use serde_json::{Value, json};

use super::{Checked, Env, departure::Verdict};
use crate::{
    agent::{Monitor, run_once},
    pagemap,
    pmem::{self, Fsdax},
    puppet::{Huge, Puppet},
    report, sys,
    truth::{DaxSpace, kernel_pages},
};

const MIB: u64 = 1 << 20;
/// The part of each member a dm table uses: small, so a file spans both quickly.
const MEMBER_SECTORS: u64 = 48 * MIB / 512;
/// Stripe chunk: 2 MiB (4096 sectors).
const CHUNK_SECTORS: u64 = 4096;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Linear,
    Striped,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Linear => "linear",
            Kind::Striped => "striped",
        }
    }
}

fn two_members(env: &Env) -> Result<(Fsdax, Fsdax)> {
    let mut regions = Vec::new();
    for _ in 0..2 {
        regions.push(
            env.pool
                .borrow_mut()
                .pop()
                .context("no spare nvdimm left for a stack (raise the VM's nvdimm count)")?,
        );
    }
    Ok((
        pmem::make_fsdax(&regions[0])?,
        pmem::make_fsdax(&regions[1])?,
    ))
}

fn devno(block: &str) -> Result<String> {
    sys::read(format!("/sys/block/{block}/dev"))
}

fn table(kind: Kind, a: &Fsdax, b: &Fsdax) -> Result<Vec<DmTarget>> {
    let (da, db) = (devno(&a.block)?, devno(&b.block)?);
    Ok(match kind {
        Kind::Linear => vec![
            DmTarget {
                start: 0,
                length: MEMBER_SECTORS,
                target_type: "linear".into(),
                params: format!("{da} 0"),
            },
            DmTarget {
                start: MEMBER_SECTORS,
                length: MEMBER_SECTORS,
                target_type: "linear".into(),
                params: format!("{db} 0"),
            },
        ],
        Kind::Striped => vec![DmTarget {
            start: 0,
            length: 2 * MEMBER_SECTORS,
            target_type: "striped".into(),
            params: format!("2 {CHUNK_SECTORS} {da} 0 {db} 0"),
        }],
    })
}

/// A dm device made of `targets`: its node (`dm-N`), once /dev/dm-N exists.
fn create_dm(name: &str, targets: &[DmTarget]) -> Result<String> {
    dm::create(Path::new("/"), name, targets).with_context(|| format!("create dm {name}"))?;
    let mut node = None;
    sys::wait_for(Duration::from_secs(10), || {
        node = std::fs::read_dir("/sys/block").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| {
                    n.starts_with("dm-")
                        && sys::read(format!("/sys/block/{n}/dm/name")).ok().as_deref()
                            == Some(name)
                })
        });
        node.as_ref()
            .is_some_and(|n| Path::new(&format!("/dev/{n}")).exists())
    });
    node.with_context(|| format!("dm {name} created but no /dev/dm-N appeared"))
}

/// ext4 on `/dev/NODE` mounted `-o dax` at `mnt`; Err(the kernel's refusal) when DAX is not
/// possible on it.
fn ext4_dax(node: &str, mnt: &str) -> Result<()> {
    let dev = format!("/dev/{node}");
    sys::run(
        "/sbin/mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "stride=512,stripe_width=512",
            &dev,
        ],
    )?;
    sys::mount(&dev, mnt, "ext4", "dax")
}

/// Pages of `p`'s `[addr, addr+len)` per member: (on a, on b, elsewhere or absent).
fn split(p: &Puppet, addr: u64, len: u64, a: &Fsdax, b: &Fsdax) -> Result<(u64, u64, u64)> {
    let mut n = (0, 0, 0);
    for pfn in pagemap::pfns(p.pid, addr, len)? {
        match pfn {
            Some(f) if a.contains_pfn(f) => n.0 += 1,
            Some(f) if b.contains_pfn(f) => n.1 += 1,
            _ => n.2 += 1,
        }
    }
    Ok(n)
}

fn holder(path: &str, len: u64) -> Result<(Puppet, u64)> {
    let mut p = Puppet::spawn()?;
    let addr = p.map(path, 0, len, true, Huge::Pte)?;
    p.touch(addr, len, false, 4096)?;
    p.catch_sigbus()?;
    Ok((p, addr))
}

fn dmesg_since(before: usize) -> Vec<String> {
    let all = sys::dmesg_tail(400);
    let skip = all.len().min(before);
    all.into_iter()
        .skip(skip)
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("ext4") || l.contains("xfs") || l.contains("dax") || l.contains("dm-")
        })
        .collect()
}

/// What happened to a holder with pages on the departed member, in a few words for the
/// support matrix: the SIGBUS it got at the unbind, and whether a read of those pages
/// still succeeds afterwards (a stale read).
fn kernel_did(p: &mut Puppet, addr: u64, len: u64) -> String {
    let (before, code) = p.sigbus().unwrap_or_default();
    let read = p.touch(addr, len, false, 4096);
    let (after, _) = p.sigbus().unwrap_or_default();
    let signal = match (before, code) {
        (0, _) => "no signal".to_string(),
        (_, 4) => "SIGBUS BUS_MCEERR_AR".to_string(),
        (_, 5) => "SIGBUS BUS_MCEERR_AO".to_string(),
        (_, c) => format!("SIGBUS si_code {c}"),
    };
    let reads = match read {
        Ok(_) if after == before => "stale reads succeed",
        Ok(_) => "reads get SIGBUS",
        Err(_) => "holder died reading",
    };
    format!("{signal}, {reads}")
}

/// A file system shutdown or I/O error the kernel logged, as a fact: "none" or the first.
fn fs_reaction(lines: &[String]) -> String {
    lines
        .iter()
        .find(|l| {
            let l = l.to_lowercase();
            l.contains("shut") || l.contains("error") || l.contains("sigbus")
        })
        .map(|l| format!("dmesg: {}", l.replace('|', "/")))
        .unwrap_or_else(|| "no fs error logged".into())
}

/// dm over two members, ext4 -o dax; one holder on both members, one (linear) only on
/// the first; the second member is unbound under them.
pub fn dm_unbind(env: &Env, kind: Kind) -> Result<Checked> {
    let mut v = Verdict::new();
    let (a, b) = two_members(env)?;
    let name = format!("stack-{}", kind.name());
    let node = create_dm(&name, &table(kind, &a, &b)?)?;
    let mnt = format!("/mnt/dm-{}", kind.name());
    let fact_key = format!("dm_{}_ext4_dax_mount", kind.name());
    if let Err(e) = ext4_dax(&node, &mnt) {
        report::fact(&fact_key, json!(format!("refused: {e:#}")));
        v.check(
            "ext4 -o dax mounts on dm over fsdax pmem (kernel refused it: recorded)",
            false,
            format!("{e:#}"),
        );
        return Ok(v.done(format!("dm-{} with DAX is unsupported here", kind.name())));
    }
    report::fact(&fact_key, json!("mounts with -o dax"));
    // Linear: a small file first (on the first member), then one larger than the first
    // member's share, which must spill onto the second. Striped: one file over many chunks.
    let mut files = Vec::new();
    if kind == Kind::Linear {
        files.push((format!("{mnt}/first"), 4 * MIB));
        files.push((format!("{mnt}/both"), 56 * MIB));
    } else {
        files.push((format!("{mnt}/stripes"), 16 * MIB));
    }
    for (f, len) in &files {
        pmem::write_file(Path::new(f), *len as usize)?;
    }
    v.check(
        "the files on dm are DAX files",
        files
            .iter()
            .all(|(f, _)| sys::is_dax_file(Path::new(f)).unwrap_or(false)),
        "statx says not DAX",
    );
    let mut hs = Vec::new();
    for (f, len) in &files {
        let (p, addr) = holder(f, *len)?;
        let s = split(&p, addr, *len, &a, &b)?;
        hs.push((p, addr, *len, s));
    }
    let truth: BTreeMap<u32, (u64, u64, u64)> = hs.iter().map(|h| (h.0.pid, h.3)).collect();
    v.count("pages_per_holder_on_a_b_other", json!(truth));
    match kind {
        Kind::Linear => {
            let (first, both) = (&hs[0], &hs[1]);
            v.check(
                "setup: one holder only on the first member, one on both (pagemap)",
                first.3.0 > 0 && first.3.1 == 0 && both.3.0 > 0 && both.3.1 > 0,
                format!("{truth:?}"),
            );
        }
        Kind::Striped => {
            let s = hs[0].3;
            v.check(
                "setup: the striped holder's pages alternate between the members",
                s.0 > 0 && s.1 > 0 && s.2 == 0,
                format!("{truth:?}"),
            );
        }
    }
    // The topology the agent reads: dm device, members, table.
    let (_, out, _) = run_once(&["devices", "--json"])?;
    let topo: Value = serde_json::from_str(&out).unwrap_or_default();
    let dmv = topo["dm"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["name"] == name.as_str()))
        .cloned()
        .unwrap_or_default();
    let members: Vec<&str> = dmv["members"]
        .as_array()
        .map(|m| m.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    v.check(
        "devices lists the dm device with both members and its table",
        members.contains(&a.block.as_str())
            && members.contains(&b.block.as_str())
            && dmv["table"]
                .as_array()
                .is_some_and(|t| t.iter().all(|x| x["target_type"] == kind.name())),
        format!("{dmv}"),
    );
    // Linear runs the monitor enforcing (TERM to the departing member's holders): only
    // the holder with pages on it may be signalled. Striped reports only, so what the
    // kernel itself does to a holder is seen.
    let enforce = kind == Kind::Linear;
    let (policy, audit) =
        super::departure::signal_policy(&format!("dm-{}", kind.name()), &b.block, "TERM", "30s")?;
    let args: Vec<&str> = if enforce {
        vec!["--enforce", "--policy", &policy, "--audit-log", &audit]
    } else {
        Vec::new()
    };
    let m = Monitor::start(&format!("dm-{}", kind.name()), &args)?;
    let dmesg_before = sys::dmesg_tail(400).len();
    let u = pmem::Unbind::start(&b);
    let fate = match u.wait(Duration::from_secs(20)) {
        Some(Ok(())) => "returned",
        Some(Err(_)) => "failed",
        None => {
            pmem::mark_bus_wedged();
            "blocked"
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    // What the kernel did to the holders with pages on the departed member.
    let mut did = BTreeMap::new();
    let mut deaths = BTreeMap::new();
    for (p, addr, len, s) in hs.iter_mut() {
        if enforce {
            let mut st = None;
            sys::wait_for(Duration::from_secs(if s.1 > 0 { 5 } else { 1 }), || {
                st = p.status();
                st.is_some()
            });
            use std::os::unix::process::ExitStatusExt;
            deaths.insert(p.pid, st.and_then(|x| x.signal()));
        } else if s.1 > 0 {
            did.insert(p.pid, kernel_did(p, *addr, *len));
        }
    }
    if enforce {
        // On 7.x a holder signalled after the member's memmap was freed dies in the
        // kernel's own teardown of its stale mapping (an oops, never reaped): the kernel's
        // log says so and the audit log below must show our signal to it; a fact is kept.
        let records: Vec<Value> = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let term_sent_to = |pid: u32| {
            records
                .iter()
                .any(|r| r["action"] == "signal" && r["pid"] == pid && r["signal"] == "SIGTERM")
        };
        for (pid, d) in deaths.iter_mut() {
            if d.is_none()
                && term_sent_to(*pid)
                && super::departure::died_in_kernel(
                    &format!("dm_{}_ext4_enforce_killed_holder_exit", kind.name()),
                    *pid,
                    false,
                )
                .is_some()
            {
                *d = Some(libc::SIGTERM);
            }
        }
        let want: BTreeMap<u32, Option<i32>> = truth
            .iter()
            .map(|(pid, s)| (*pid, (s.1 > 0).then_some(libc::SIGTERM)))
            .collect();
        v.check(
            "--enforce signals exactly the holders with pages on the departed member",
            deaths == want,
            format!("died of {deaths:?}, expected {want:?}"),
        );
        let signalled: Vec<u32> = records
            .iter()
            .filter(|r| r["action"] == "signal")
            .filter_map(|r| r["pid"].as_u64().map(|p| p as u32))
            .collect();
        let want_pids: Vec<u32> = want
            .iter()
            .filter(|(_, s)| s.is_some())
            .map(|(p, _)| *p)
            .collect();
        v.check(
            "the audit log records a signal to exactly those",
            signalled == want_pids,
            format!("{signalled:?}"),
        );
        v.count("died_of", json!(deaths));
    }
    let out = if fate == "blocked" {
        m.peek()?
    } else {
        m.stop()?
    };
    let dep = out.departing(&b.block);
    let listed: BTreeMap<u32, u64> = dep
        .map(|d| d.holders.iter().map(|h| (h.pid, h.pages)).collect())
        .unwrap_or_default();
    let expected: BTreeMap<u32, u64> = truth
        .iter()
        .filter(|(_, s)| s.1 > 0)
        .map(|(pid, s)| (*pid, s.1))
        .collect();
    v.check(
        "the departure of the second member lists exactly the holders with pages on it, \
         with exactly those pages (pagemap)",
        dep.is_some() && listed == expected,
        format!("listed {listed:?}, pagemap {expected:?}"),
    );
    let shut = dmesg_since(dmesg_before);
    let mut words: Vec<String> = did.values().cloned().collect();
    words.sort();
    words.dedup();
    if !enforce {
        report::fact(
            &format!("dm_{}_ext4_unbind_member", kind.name()),
            json!(format!(
                "unbind {fate}; holders on it: {}; {}",
                words.join(" / "),
                fs_reaction(&shut)
            )),
        );
    }
    v.count("kernel_did", json!(did));
    v.count("dmesg", json!(shut));
    // Holders of a departed device stay (tearing their mappings down may oops on 7.x).
    for h in hs {
        std::mem::forget(h.0);
    }
    Ok(v.done(format!(
        "dm-{}: departure listed {listed:?} (pagemap {expected:?}); unbind {fate}",
        kind.name()
    )))
}

/// `FS_IOC_FSSETXATTR` with `FS_XFLAG_REALTIME` on an empty file: its data goes to the
/// realtime device.
fn make_realtime(path: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    const FS_IOC_FSGETXATTR: u64 = 0x801c_581f;
    const FS_IOC_FSSETXATTR: u64 = 0x401c_5820;
    const FS_XFLAG_REALTIME: u32 = 1;
    let f = std::fs::File::create(path)?;
    let mut attr = [0u32; 7];
    // SAFETY: a struct fsxattr (28 bytes) for the kernel to fill and read.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR as _, attr.as_mut_ptr()) } != 0 {
        bail!(
            "FS_IOC_FSGETXATTR {path}: {}",
            std::io::Error::last_os_error()
        );
    }
    attr[0] |= FS_XFLAG_REALTIME;
    // SAFETY: as above.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSSETXATTR as _, attr.as_ptr()) } != 0 {
        bail!(
            "FS_IOC_FSSETXATTR {path}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// write_file without truncating (keeps the realtime flag of an empty file).
fn fill(path: &str, len: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let chunk: Vec<u8> = (0..(2 << 20)).map(|i: usize| (i % 251) as u8 + 1).collect();
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.sync_all()?;
    Ok(())
}

/// XFS on member a with member b as realtime device; a realtime file and a data file,
/// one holder each; b is unbound: only the realtime file's holder is listed.
pub fn xfs_realtime(env: &Env) -> Result<Checked> {
    let mut v = Verdict::new();
    let (a, b) = two_members(env)?;
    let mnt = "/mnt/xfs-rt";
    sys::run(
        "/sbin/mkfs.xfs",
        &[
            "-q",
            "-f",
            "-m",
            "reflink=0",
            "-d",
            "su=2m,sw=1,agcount=2",
            "-l",
            "size=64m",
            "-r",
            &format!("rtdev={}", b.dev_path()),
            &a.dev_path(),
        ],
    )?;
    if let Err(e) = sys::mount(
        &a.dev_path(),
        mnt,
        "xfs",
        &format!("dax,rtdev={}", b.dev_path()),
    ) {
        report::fact("xfs_realtime_dax_mount", json!(format!("refused: {e:#}")));
        v.check(
            "xfs with a pmem realtime device mounts -o dax",
            false,
            format!("{e:#}"),
        );
        return Ok(v.done("xfs realtime with DAX is unsupported here".into()));
    }
    let rt = format!("{mnt}/realtime");
    let data = format!("{mnt}/data");
    make_realtime(&rt)?;
    fill(&rt, 4 * MIB)?;
    pmem::write_file(Path::new(&data), 4 * MIB as usize)?;
    let rt_dax = sys::is_dax_file(Path::new(&rt)).unwrap_or(false);
    let data_dax = sys::is_dax_file(Path::new(&data)).unwrap_or(false);
    report::fact(
        "xfs_realtime_dax_mount",
        json!(format!(
            "mounts with -o dax; realtime file {}, data file {}",
            if rt_dax { "DAX" } else { "not DAX" },
            if data_dax { "DAX" } else { "not DAX" }
        )),
    );
    let (mut pr, ar) = holder(&rt, 4 * MIB)?;
    let (pd, ad) = holder(&data, 4 * MIB)?;
    let sr = split(&pr, ar, 4 * MIB, &a, &b)?;
    let sd = split(&pd, ad, 4 * MIB, &a, &b)?;
    v.count("realtime_holder_pages_a_b_other", json!(sr));
    v.count("data_holder_pages_a_b_other", json!(sd));
    v.check(
        "setup: the data file's pages are on the data device only (pagemap)",
        sd.0 == 1024 && sd.1 == 0,
        format!("{sd:?}"),
    );
    if rt_dax {
        v.check(
            "setup: the realtime file's pages are on the realtime device only (pagemap)",
            sr.1 == 1024 && sr.0 == 0,
            format!("{sr:?}"),
        );
    }
    // The realtime role in the topology.
    let (_, out, _) = run_once(&["devices"])?;
    v.check(
        "devices names the realtime role",
        out.contains(&format!(
            "used by {mnt} (xfs, dax=always) as its XFS realtime device"
        )),
        out.clone(),
    );
    let m = Monitor::start("xfs-rt", &[])?;
    let dmesg_before = sys::dmesg_tail(400).len();
    let u = pmem::Unbind::start(&b);
    let fate = match u.wait(Duration::from_secs(20)) {
        Some(Ok(())) => "returned",
        Some(Err(_)) => "failed",
        None => {
            pmem::mark_bus_wedged();
            "blocked"
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    let did = if rt_dax {
        kernel_did(&mut pr, ar, 4 * MIB)
    } else {
        "realtime file not DAX".to_string()
    };
    let out = if fate == "blocked" {
        m.peek()?
    } else {
        m.stop()?
    };
    let dep = out.departing(&b.block);
    let listed: BTreeMap<u32, u64> = dep
        .map(|d| d.holders.iter().map(|h| (h.pid, h.pages)).collect())
        .unwrap_or_default();
    let expected: BTreeMap<u32, u64> = [(pr.pid, sr.1), (pd.pid, sd.1)]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    v.check(
        "the realtime device's departure lists exactly the holders with pages on it \
         (pagemap), never the data file's",
        dep.is_some() && listed == expected && !listed.contains_key(&pd.pid),
        format!("listed {listed:?}, pagemap {expected:?}"),
    );
    let shut = dmesg_since(dmesg_before);
    report::fact(
        "xfs_realtime_unbind",
        json!(format!(
            "unbind {fate}; realtime holder: {did}; {}",
            fs_reaction(&shut)
        )),
    );
    v.count("dmesg", json!(shut));
    std::mem::forget(pr);
    std::mem::forget(pd);
    Ok(v.done(format!(
        "xfs realtime: departure listed {listed:?} (pagemap {expected:?}); realtime file DAX: \
         {rt_dax}; unbind {fate}"
    )))
}

/// `drain` of a member of a mounted dm-linear stack: refused without --unbind with the stack
/// named; with it, the holder signalled, unmounted, the dm device removed, the member
/// unbound, nothing left mapped on either member.
pub fn drain_stack(env: &Env) -> Result<Checked> {
    let mut v = Verdict::new();
    let (a, b) = two_members(env)?;
    let name = "stack-drain";
    let node = create_dm(name, &table(Kind::Linear, &a, &b)?)?;
    let mnt = "/mnt/dm-drain";
    if let Err(e) = ext4_dax(&node, mnt) {
        v.check("ext4 -o dax mounts on dm-linear", false, format!("{e:#}"));
        return Ok(v.done("dm-linear with DAX is unsupported here".into()));
    }
    let file = format!("{mnt}/both");
    pmem::write_file(Path::new(&file), 56 * MIB as usize)?;
    let (mut p, addr) = holder(&file, 56 * MIB)?;
    let s = split(&p, addr, 56 * MIB, &a, &b)?;
    v.check(
        "setup: the holder has pages on both members",
        s.0 > 0 && s.1 > 0,
        format!("{s:?}"),
    );
    // holders of the member names the stack beside the process.
    let (_, out, _) = run_once(&["holders", &b.block, "--scan"])?;
    v.check(
        "holders MEMBER lists the dm device beside the process",
        out.contains(&format!("kernel: held by {node} ({name}"))
            && out.contains(&p.pid.to_string()),
        out.clone(),
    );
    let audit = "/tmp/audit-drain-stack.jsonl";
    let _ = std::fs::remove_file(audit);
    let (code, out, err) = run_once(&["drain", &b.block, "--grace", "2s", "--audit-log", audit])?;
    v.check(
        "drain without --unbind is refused (exit 73) naming the dm device and its mount",
        code == Some(73) && err.contains(&format!("{node} ({name}")) && err.contains(mnt),
        format!("exit {code:?}: {out}{err}"),
    );
    v.check(
        "nothing was signalled: the holder lives",
        p.status().is_none(),
        "the holder died",
    );
    v.check(
        "nothing was recorded",
        std::fs::read_to_string(audit)
            .unwrap_or_default()
            .is_empty(),
        "audit log written",
    );
    let (code, out, err) = run_once(&[
        "drain",
        &b.block,
        "--grace",
        "2s",
        "--then",
        "KILL",
        "--unbind",
        "--audit-log",
        audit,
    ])?;
    v.check(
        "drain --unbind exits 0",
        code == Some(0),
        format!("exit {code:?}: {out}{err}"),
    );
    let mut st = None;
    sys::wait_for(Duration::from_secs(3), || {
        st = p.status();
        st.is_some()
    });
    use std::os::unix::process::ExitStatusExt;
    v.check(
        "the holder was signalled (TERM)",
        st.and_then(|s| s.signal()) == Some(libc::SIGTERM),
        format!("{st:?}"),
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    v.check(
        "the file system on the dm device was unmounted",
        !mountinfo.contains(&format!(" {mnt} ")),
        "still mounted",
    );
    v.check(
        "the dm device was removed",
        !Path::new(&format!("/sys/block/{node}")).exists(),
        format!("/sys/block/{node} still there"),
    );
    v.check("the member is unbound", !pmem::is_bound(&b), "still bound");
    v.check(
        "the other member is still bound and free",
        pmem::is_bound(&a)
            && std::fs::read_dir(format!("/sys/block/{}/holders", a.block))
                .map(|d| d.count() == 0)
                .unwrap_or(false),
        "bound with holders, or unbound",
    );
    let left = kernel_pages(&DaxSpace {
        pfn_ranges: vec![
            (a.data_start >> 12, a.data_end >> 12),
            (b.data_start >> 12, b.data_end >> 12),
        ],
        path_prefixes: vec![format!("{mnt}/")],
    })?;
    v.check(
        "nothing maps either member (pagemap)",
        left.is_empty(),
        format!("{} pages", left.len()),
    );
    let log = std::fs::read_to_string(audit).unwrap_or_default();
    let actions: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| r["action"].as_str().map(str::to_string))
        .collect();
    let at = |x: &str| actions.iter().position(|a| a == x).unwrap_or(usize::MAX);
    v.check(
        "the audit log has verify, unmount, dm_remove, unbind in that order",
        at("verify") < at("unmount")
            && at("unmount") < at("dm_remove")
            && at("dm_remove") < at("unbind")
            && at("unbind") != usize::MAX,
        format!("{actions:?}"),
    );
    v.count("audit_actions", json!(actions));
    Ok(v.done(format!(
        "refused without --unbind; with it: holder {:?}, {node} removed, {} unbound",
        st.and_then(|s| s.signal()),
        b.block
    )))
}
