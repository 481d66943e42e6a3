//! The rebind leak (issue 12): a device is unbound under a process that maps a file on it,
//! bound again, and handed to a new tenant's file system. The pfns are the new binding's;
//! the old mapping is not. What the kernel lets the old holder read (a fact), what `audit`
//! and `monitor` say about it, and that `--enforce` keeps the holder from ever reading it.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Result;
use serde_json::json;

use super::{
    Checked, DaxFs, Env, Target,
    departure::{Verdict, kernel_facts, leave_behind, scratch_file, signal_policy},
};
use crate::{
    agent::{Line, Monitor, parse_line, run_once},
    pagemap, pmem,
    puppet::{Huge, Puppet, WORKLOAD},
    report, sys,
};

const MIB: u64 = 1 << 20;
const LEN: u64 = 4 * MIB;
/// What begins every 4 KiB page of the new tenant's data.
const MARKER: &str = "TENANT-B";

/// What the rebind did to the device.
struct Rebound {
    /// The block device's number before the unbind and after the bind.
    old_devt: Option<String>,
    new_devt: Option<String>,
    /// Where the new tenant's xfs is mounted.
    tenant_mnt: String,
}

/// Unbinds `fs`'s device under its holders, binds it again and mounts a new tenant's xfs on
/// it, filled with `fill` bytes of [`MARKER`] pages (all its free space when None).
/// `try_ext4`: first try a new ext4 there and record what the kernel said.
fn rebind_to_tenant(
    fs: &mut DaxFs,
    tag: &str,
    fill: Option<u64>,
    try_ext4: bool,
) -> Result<Rebound> {
    let old_devt = pmem::block_devt(&fs.dev);
    pmem::unbind_fsdax(&fs.dev)?;
    pmem::rebind_fsdax(&mut fs.dev)?;
    let new_devt = pmem::block_devt(&fs.dev);
    let tenant_mnt = format!("/mnt/{tag}-tenant");
    if try_ext4 {
        // Seen on 6.12: the departed ext4 keeps /sys/fs/ext4/pmemN, so a new ext4 on the
        // rebound device fails to mount (EEXIST). A fact; the tenant uses xfs.
        let ext4_mnt = format!("/mnt/{tag}-ext4");
        let fate = match pmem::mount_ext4(&fs.dev, &ext4_mnt) {
            Ok(()) => {
                pmem::detach(&ext4_mnt);
                "mounts".to_string()
            }
            Err(e) => format!("fails: {}", last_words(&format!("{e:#}"))),
        };
        report::fact("rebind_new_ext4_mount", json!(fate));
    }
    pmem::mount_xfs(&fs.dev, &tenant_mnt, false)?;
    let len = match fill {
        Some(n) => n,
        None => pmem::free_bytes(&tenant_mnt)?.saturating_sub(8 * MIB) & !(MIB - 1),
    };
    pmem::fill_tenant(
        Path::new(&format!("{tenant_mnt}/data")),
        len as usize,
        MARKER,
    )?;
    Ok(Rebound {
        old_devt,
        new_devt,
        tenant_mnt,
    })
}

/// The end of an error chain (the kernel's word), e.g. "File exists (os error 17)".
fn last_words(e: &str) -> String {
    e.rsplit(": ").next().unwrap_or(e).trim().to_string()
}

/// Pages of `pid`'s mapping at `a` that audit reports stale, and audit's exit code.
fn audit_pages(pid: u32) -> Result<(Option<i32>, u64, String)> {
    let (code, out, err) = run_once(&["audit", "--json"])?;
    let pages = match parse_line(out.trim()) {
        Ok(Line::Audit(a)) => a
            .stale
            .iter()
            .filter(|s| s.pid == pid)
            .map(|s| s.pages)
            .sum(),
        _ => 0,
    };
    Ok((code, pages, format!("{out} {err}")))
}

/// The holder's present pages (pagemap) where reading them is safe (devmap kernels); else
/// the whole mapping, which is what audit reports there.
fn present(pid: u32, a: u64, devmap: bool) -> Result<u64> {
    Ok(if devmap {
        pagemap::pfns(pid, a, LEN)?
            .iter()
            .filter(|x| x.is_some())
            .count() as u64
    } else {
        LEN >> 12
    })
}

pub fn run(env: &Env, t: Target) -> Result<Checked> {
    let mut v = Verdict::new();
    let devmap = kernel_facts()["dax_devmap"] == true;
    without_agent(env, t, devmap, &mut v)?;
    reporting(env, t, devmap, &mut v)?;
    enforcing(env, t, &mut v)?;
    Ok(v.done(
        "rebind leak: the kernel's behaviour recorded; audit and monitor name the old \
         binding's holder; --enforce kills it before the new tenant's data exists"
            .into(),
    ))
}

/// No agent: does the old holder read the new tenant's bytes? And `audit` afterwards.
fn without_agent(env: &Env, t: Target, devmap: bool, v: &mut Verdict) -> Result<()> {
    let mut fs = env.fresh(t, "rebind-a")?;
    let file = scratch_file(&fs, "old", LEN)?;
    let mut p = Puppet::spawn()?;
    let a = p.map(&file, 0, LEN, true, Huge::Pte)?;
    p.touch(a, LEN, false, 4096)?;
    let (pages, _, own) = p.content(a, LEN, MARKER)?;
    v.check(
        "the holder reads its own file before the unbind",
        own == pages && pages == LEN >> 12,
        format!("{own} of {pages} pages hold the file's pattern"),
    );
    let r = rebind_to_tenant(&mut fs, "rebind-a", None, true)?;
    report::fact(
        "rebind_block_devt",
        json!(match (&r.old_devt, &r.new_devt) {
            (Some(o), Some(n)) if o == n => format!("reused ({o})"),
            (Some(o), Some(n)) => format!("new ({o} → {n}): the departed superblock holds the old"),
            _ => "unknown".into(),
        }),
    );
    // The kernel fact: what the old mapping shows now.
    let fate = match p.content(a, LEN, MARKER) {
        Ok((pages, tenant, own)) => {
            v.count("old_holder_reads_tenant_pages", json!(tenant));
            v.count("old_holder_reads_own_pages", json!(own));
            format!("{tenant} of {pages} pages are the new tenant's ({own} still its own)")
        }
        Err(e) => format!(
            "the read failed: {} ({e})",
            p.status()
                .and_then(|s| s.signal())
                .map_or("holder alive".to_string(), |s| format!(
                    "killed by signal {s}"
                ))
        ),
    };
    report::fact("rebind_ext4_old_holder_reads_new_tenant", json!(fate));
    report::note(&format!(
        "rebind without agent: {fate}; tenant on {}",
        r.tenant_mnt
    ));
    if p.status().is_none() {
        let kernel = present(p.pid, a, devmap)?;
        let (code, mine, out) = audit_pages(p.pid)?;
        v.check(
            "without an agent, audit after the rebind exits 1 and names the holder's stale pages \
             (pagemap agrees)",
            code == Some(1) && mine == kernel && mine > 0,
            format!("exit {code:?}, audit {mine} pages, pagemap {kernel}: {out}"),
        );
        v.count("audit_stale_pages_without_agent", json!(mine));
    }
    leave_behind(p);
    Ok(())
}

/// A reporting monitor sees the device come back under the old mapping; audit names it.
fn reporting(env: &Env, t: Target, devmap: bool, v: &mut Verdict) -> Result<()> {
    let mut fs = env.fresh(t, "rebind-b")?;
    let file = scratch_file(&fs, "old", LEN)?;
    let m = Monitor::start(&format!("rebind-{t}"), &[])?;
    let mut p = Puppet::spawn()?;
    let a = p.map(&file, 0, LEN, true, Huge::Pte)?;
    p.touch(a, LEN, false, 4096)?;
    let r = rebind_to_tenant(&mut fs, "rebind-b", Some(64 * MIB), false)?;
    let out_path = m.out.clone();
    let seen = sys::wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&out_path).is_ok_and(|s| s.contains("\"type\":\"device_rebound\""))
    });
    let kernel = present(p.pid, a, devmap)?;
    let (code, mine, audit_out) = audit_pages(p.pid)?;
    let out = m.stop()?;
    let rebound: Vec<&Line> = out.of_type("device_rebound").collect();
    let names_holder = rebound.iter().any(|l| {
        matches!(l, Line::DeviceRebound { device, old_binding, old_binding_pages, .. }
            if *device == fs.dev.block
                && old_binding.iter().any(|h| h.pid == p.pid)
                && *old_binding_pages >= kernel)
    });
    v.check(
        "the monitor reports the device bound again while the holder maps its old binding",
        seen && names_holder,
        format!("seen {seen}; device_rebound lines: {rebound:?}"),
    );
    v.check(
        "with the monitor reporting, audit after the rebind exits 1 and names the holder's \
         stale pages (pagemap agrees)",
        code == Some(1) && mine == kernel && mine > 0,
        format!("exit {code:?}, audit {mine} pages, pagemap {kernel}: {audit_out}"),
    );
    v.count("audit_stale_pages_reporting", json!(mine));
    v.count(
        "block_devt_reporting",
        json!(format!("{:?} → {:?}", r.old_devt, r.new_devt)),
    );
    leave_behind(p);
    Ok(())
}

/// `--enforce`: the holder dies at the departure, before the new tenant's data exists.
fn enforcing(env: &Env, t: Target, v: &mut Verdict) -> Result<()> {
    let mut fs = env.fresh(t, "rebind-c")?;
    let file = scratch_file(&fs, "old", LEN)?;
    let (policy, audit) = signal_policy("rebind", &fs.dev.block, "KILL", "1s")?;
    let m = Monitor::start(
        &format!("rebind-enforce-{t}"),
        &["--enforce", "--policy", &policy, "--audit-log", &audit],
    )?;
    let status = "/tmp/rebind-reader.status";
    let mut reader = Command::new(WORKLOAD)
        .args(["reader", &file, &LEN.to_string(), status])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(reader.stdout.take().unwrap()).read_line(&mut line)?;
    std::thread::sleep(Duration::from_millis(300));
    pmem::unbind_fsdax(&fs.dev)?;
    let unbind_done = sys::boottime_ns();
    let mut st = None;
    sys::wait_for(Duration::from_secs(10), || {
        st = reader.try_wait().ok().flatten();
        st.is_some()
    });
    pmem::rebind_fsdax(&mut fs.dev)?;
    let tenant_mnt = "/mnt/rebind-c-tenant";
    pmem::mount_xfs(&fs.dev, tenant_mnt, false)?;
    pmem::fill_tenant(
        Path::new(&format!("{tenant_mnt}/data")),
        (64 * MIB) as usize,
        MARKER,
    )?;
    let tenant_written = sys::boottime_ns();
    std::thread::sleep(Duration::from_secs(3));
    let out = m.stop()?;
    let raw = std::fs::read(status)?;
    let last_read = u64::from_le_bytes(raw[0..8].try_into()?);
    v.check(
        "with --enforce the holder was killed (SIGKILL) before the device came back",
        st.and_then(|s| s.signal()) == Some(libc::SIGKILL),
        format!("reader exit {st:?}"),
    );
    v.check(
        "with --enforce the holder never read after the unbind, so never the new tenant's data",
        last_read > 0 && last_read < unbind_done && last_read < tenant_written,
        format!(
            "last read {:.3} ms after the unbind completed",
            (last_read as f64 - unbind_done as f64) / 1e6
        ),
    );
    let rebound: Vec<&Line> = out.of_type("device_rebound").collect();
    v.check(
        "no device_rebound report when nobody maps the old binding",
        rebound.is_empty(),
        format!("{rebound:?}"),
    );
    // Killed already (or a check above failed): see `leave_behind`.
    std::mem::forget(reader);
    Ok(())
}
