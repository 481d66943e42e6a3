//! The unbind guard (issue 14 part 1): a monitor runs with `guard = "refuse-unbind"` for
//! every device but one. A holder maps a file on device A; a root shell's `echo pfnA >
//! /sys/bus/nd/drivers/nd_pmem/unbind` fails with EBUSY, and so do the same write through
//! `devices/pfnA/driver/unbind` (what `ndctl disable-namespace` writes), a writev(2) of it
//! and the region's unbind (`ndctl disable-region`); A stays bound and the holder's pages
//! stay mapped (its pagemap shows the same pfns). Device B, guarded but without holders,
//! unbinds. Device C, whose rule switches the guard off, has a holder and its name goes
//! through the guard (the kernel itself answers the write).
//! `drain A --unbind` then goes through. The refusals are in the monitor's JSON
//! (`unbind_refused`) and its audit log with the writer's pid and command line.
//!
//! Where the kernel runs no BPF LSM (5.10: `bpf` is not in CONFIG_LSM), `doctor` must say
//! the guard is unavailable and the monitor must warn; nothing is refused there.
//!
//! Isolated (its own boot, after the other ext4 ones): it unbinds devices.

use std::{
    io::Write,
    os::unix::io::AsRawFd,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{
    Checked, Env, Target,
    departure::{Verdict, scratch_file},
};
use dax_probe::event::GuardVerdict;

use crate::{
    agent::{Line, Monitor, run_once},
    pagemap, pmem,
    puppet::{Huge, Puppet},
    sys,
};

const MIB: u64 = 1 << 20;
const ND_PMEM_UNBIND: &str = "/sys/bus/nd/drivers/nd_pmem/unbind";
const ND_REGION_UNBIND: &str = "/sys/bus/nd/drivers/nd_region/unbind";

/// Writes `value` to `path` with one write(2); the errno it failed with, 0 on success.
fn write_errno(path: &str, value: &str) -> i32 {
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    match r {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// Writes `value` to `path` with one writev(2), in `pieces` (1 or 2) iovecs; the errno, 0
/// on success.
fn writev_errno(path: &str, value: &str, pieces: usize) -> i32 {
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) else {
        return -1;
    };
    let (a, b) = value.split_at(if pieces == 1 {
        value.len()
    } else {
        value.len() / 2
    });
    let iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut _,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: b.len(),
        },
    ];
    // SAFETY: valid fd and iovecs over live strings.
    let n = unsafe { libc::writev(f.as_raw_fd(), iov.as_ptr(), pieces as i32) };
    if n < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    }
}

fn bpf_lsm_active() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|s| s.split(',').any(|l| l.trim() == "bpf"))
        .unwrap_or(false)
}

fn audit_records(path: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn run(env: &Env, t: Target) -> Result<Checked> {
    let mut v = Verdict::new();
    let lsm = bpf_lsm_active();
    v.count("bpf_lsm_active", json!(lsm));

    // What doctor says, against the kernel's own LSM list.
    let (_, doc, _) = run_once(&["doctor"])?;
    let doc_line = doc
        .lines()
        .find(|l| l.starts_with("unbind guard"))
        .unwrap_or("")
        .to_string();
    v.check(
        "doctor's unbind guard line matches the kernel's LSM list",
        if lsm {
            doc_line.contains("available (lsm file_permission")
        } else {
            doc_line.contains("UNAVAILABLE") && doc_line.contains("lsm=...,bpf")
        },
        format!("bpf LSM active {lsm}; doctor: {doc_line:?}"),
    );

    let a = env.fresh(t, "guard-a")?;
    let b = env.fresh(t, "guard-b")?;
    let c = env.fresh(t, "guard-off")?;
    let file_a = scratch_file(&a, "held", 4 * MIB)?;
    let file_c = scratch_file(&c, "held", 4 * MIB)?;
    let policy = "/tmp/policy-guard.toml";
    std::fs::write(
        policy,
        format!(
            "[default]\nguard = \"refuse-unbind\"\n\n[device.{}]\nguard = \"off\"\n",
            c.dev.block
        ),
    )?;
    let audit = "/tmp/audit-guard.jsonl";
    let _ = std::fs::remove_file(audit);
    let m = Monitor::start(
        &format!("guard-{t}"),
        &["--policy", policy, "--audit-log", audit],
    )?;
    let stderr = std::fs::read_to_string(&m.err).unwrap_or_default();

    let mut holder = Puppet::spawn()?;
    let addr = holder.map(&file_a, 0, 4 * MIB, true, Huge::Pte)?;
    holder.touch(addr, 4 * MIB, false, 4096)?;
    let mut held_c = Puppet::spawn()?;
    let addr_c = held_c.map(&file_c, 0, 4 * MIB, true, Huge::Pte)?;
    held_c.touch(addr_c, 4 * MIB, false, 4096)?;
    v.check(
        "the monitor saw the holders' faults",
        m.wait_for_faults(holder.pid, 1024, Duration::from_secs(60))
            && m.wait_for_faults(held_c.pid, 1024, Duration::from_secs(60)),
        "fewer than 1024 fault lines per holder",
    );
    let before = pagemap::pfns(holder.pid, addr, 4 * MIB)?;

    if !lsm {
        v.check(
            "without the BPF LSM the monitor warns that unbinds are not refused",
            stderr.contains("unbind guard is unavailable") && stderr.contains("NOT refused"),
            format!("stderr: {stderr}"),
        );
        let out = m.stop()?;
        v.check(
            "and it refused nothing",
            out.of_type("unbind_refused").count() == 0,
            format!("{:?}", out.of_type("unbind_refused").collect::<Vec<_>>()),
        );
        drop(holder);
        drop(held_c);
        return Ok(v.done(format!(
            "no BPF LSM on this kernel: doctor says {doc_line:?}; the monitor warned"
        )));
    }
    v.check(
        "with the BPF LSM the monitor does not warn about the guard",
        !stderr.contains("unbind guard is unavailable"),
        format!("stderr: {stderr}"),
    );

    // A root shell's echo. Like an operator's interactive shell it lives on after the write,
    // here until the agent has reported the refusal: the agent reads the writer's command
    // line from /proc when it handles the record, and under TCG load that can take longer
    // than any fixed sleep (a 2 s sleep once lost that race on 6.12; a writer gone by then
    // is reported as "command line unknown (it has exited)").
    let release = std::path::PathBuf::from("/tmp/guard-shell-release");
    let _ = std::fs::remove_file(&release);
    let sh = Command::new("/bin/sh")
        .args([
            "-c",
            &format!(
                "echo {} > {ND_PMEM_UNBIND}; echo rc=$?; i=0; \
                 while [ ! -e {} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
                a.dev.pfn_dev,
                release.display()
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn sh")?;
    let sh_pid = sh.id();
    let reported = sys::wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(&m.out).is_ok_and(|t| {
            t.lines().any(|l| {
                l.contains("\"type\":\"unbind_refused\"")
                    && l.contains(&format!("\"pid\":{sh_pid},"))
            })
        })
    });
    std::fs::write(&release, b"")?;
    let sh_out = sh.wait_with_output()?;
    let _ = std::fs::remove_file(&release);
    v.check(
        "the monitor reported the shell's refusal while the shell lived",
        reported,
        format!("no unbind_refused line of pid {sh_pid} within 30 s"),
    );
    let sh_stdout = String::from_utf8_lossy(&sh_out.stdout).into_owned();
    let sh_stderr = String::from_utf8_lossy(&sh_out.stderr).into_owned();
    v.check(
        "the shell's echo of A into nd_pmem/unbind failed with EBUSY",
        sh_stdout.contains("rc=1") && (sh_stderr.contains("busy") || sh_stderr.contains("Busy")),
        format!("stdout {sh_stdout:?} stderr {sh_stderr:?}"),
    );
    let direct = write_errno(ND_PMEM_UNBIND, &format!("{}\n", a.dev.pfn_dev));
    let via_link = write_errno(
        &format!("/sys/bus/nd/devices/{}/driver/unbind", a.dev.pfn_dev),
        &a.dev.pfn_dev,
    );
    let vectored = writev_errno(ND_PMEM_UNBIND, &a.dev.pfn_dev, 1);
    // Two pieces the kernel joins into A's name: the guard cannot read it whole, and
    // refuses it blind while a guarded device has holders.
    let split = writev_errno(ND_PMEM_UNBIND, &a.dev.pfn_dev, 2);
    let region = write_errno(ND_REGION_UNBIND, &a.dev.region);
    v.count(
        "errnos",
        json!({"write": direct, "driver_link": via_link, "writev": vectored,
               "writev_split": split, "region": region}),
    );
    v.check(
        "write(2), the devices/…/driver/unbind path, writev(2) in one and in two pieces and \
         the region's unbind of A all failed with EBUSY",
        [direct, via_link, vectored, split, region]
            .iter()
            .all(|&e| e == libc::EBUSY),
        format!(
            "errnos write {direct}, link {via_link}, writev {vectored}, split {split}, region \
             {region}"
        ),
    );
    let after = pagemap::pfns(holder.pid, addr, 4 * MIB)?;
    let present = after.iter().filter(|p| p.is_some()).count();
    v.check(
        "A stays bound and the holder's 1024 pages are mapped at the same pfns, all on A",
        pmem::is_bound(&a.dev)
            && present == 1024
            && after == before
            && after.iter().flatten().all(|&p| a.dev.contains_pfn(p)),
        format!(
            "bound {}, {present} present, same as before {}",
            pmem::is_bound(&a.dev),
            after == before
        ),
    );
    let read_ok = holder.touch(addr, 4 * MIB, false, 4096).is_ok();
    v.check(
        "the holder still reads its mapping",
        read_ok,
        "touch failed",
    );

    // B: guarded, no holders. C: guard off, a holder.
    let b_errno = write_errno(ND_PMEM_UNBIND, &b.dev.pfn_dev);
    v.check(
        "B (guarded, no holders) unbinds",
        b_errno == 0 && !pmem::is_bound(&b.dev),
        format!("errno {b_errno}, bound {}", pmem::is_bound(&b.dev)),
    );
    // C, guard off, with a holder: its name written to a driver C is not bound to. The
    // kernel answers ENODEV when the guard lets the write through, EBUSY if the guard had
    // refused it; A's name, guarded, gets EBUSY there. (C is not really unbound under its
    // holder: on 7.2 the holder's later exit oopses in __zap_vma_range, the kernel's own
    // bug, which unbind-report shows without dax-probe.)
    let c_errno = write_errno(ND_REGION_UNBIND, &c.dev.pfn_dev);
    let a_errno = write_errno(ND_REGION_UNBIND, &a.dev.pfn_dev);
    v.check(
        "C (guard off, a holder): the guard lets its name through (the kernel's ENODEV), \
         while A's gets EBUSY at the same file",
        c_errno == libc::ENODEV && a_errno == libc::EBUSY && pmem::is_bound(&c.dev),
        format!("C errno {c_errno}, A errno {a_errno}"),
    );

    // drain A: signals the holder, unmounts, unbinds through the guard.
    let drain_audit = "/tmp/audit-guard-drain.jsonl";
    let _ = std::fs::remove_file(drain_audit);
    let (code, dout, derr) = run_once(&[
        "drain",
        &a.dev.block,
        "--signal",
        "TERM",
        "--grace",
        "2s",
        "--then",
        "KILL",
        "--unbind",
        "--audit-log",
        drain_audit,
        "--json",
    ])?;
    v.check(
        "drain A --unbind exits 0 and A is unbound",
        code == Some(0) && !pmem::is_bound(&a.dev),
        format!("exit {code:?}: {dout}\n{derr}"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = m.stop()?;

    let refused: Vec<_> = out
        .lines
        .iter()
        .filter_map(|l| match l {
            Line::UnbindRefused {
                refused,
                device,
                cmdline,
                holders,
            } => Some((
                refused.clone(),
                device.clone(),
                cmdline.clone(),
                holders.clone(),
            )),
            _ => None,
        })
        .collect();
    v.count("unbind_refused_lines", json!(refused.len()));
    let shell_line = refused.iter().find(|r| r.0.pid == sh_pid);
    v.check(
        "the shell's refusal is an unbind_refused line: its pid, comm sh, A's name, EBUSY, its \
         command line and the holder",
        shell_line.is_some_and(|(g, d, cmd, h)| {
            g.comm == "sh"
                && g.written == a.dev.pfn_dev
                && g.errno == Some(libc::EBUSY)
                && g.driver == "nd_pmem"
                && d.as_deref() == Some(a.dev.block.as_str())
                && cmd.as_deref().is_some_and(|c| c.contains(ND_PMEM_UNBIND))
                && h.iter().any(|r| r.pid == holder.pid)
        }),
        format!("{refused:?}"),
    );
    let me = std::process::id();
    v.check(
        "seven refusals in all (shell, write, driver link, writev, split writev, region, A's \
         name at nd_region), all of A (the split one unread), none of B or C",
        refused.len() == 7
            && refused.iter().filter(|r| r.0.pid == me).count() == 6
            && refused.iter().all(|r| {
                if r.0.verdict == GuardVerdict::RefusedUnreadable {
                    r.0.written.is_empty() && r.1.is_none() && r.0.syscall == 20
                } else {
                    r.1.as_deref() == Some(a.dev.block.as_str())
                }
            })
            && refused
                .iter()
                .filter(|r| r.0.verdict == GuardVerdict::RefusedUnreadable)
                .count()
                == 1,
        format!("{refused:?}"),
    );
    let recs = audit_records(audit);
    let sh_rec = recs
        .iter()
        .find(|r| r["action"] == "unbind_refused" && r["pid"] == sh_pid);
    v.check(
        "the audit log has the shell's refusal with its pid, comm and command line",
        sh_rec.is_some_and(|r| {
            r["comm"] == "sh"
                && r["device"] == a.dev.block.as_str()
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("EBUSY") && d.contains(ND_PMEM_UNBIND))
        }),
        format!("{recs:?}"),
    );
    v.check(
        "the audit log has one unbind_refused per refusal and none for B or C",
        recs.iter()
            .filter(|r| r["action"] == "unbind_refused")
            .count()
            == 7
            && !recs.iter().any(|r| {
                r["device"] == b.dev.block.as_str() || r["device"] == c.dev.block.as_str()
            }),
        format!("{recs:?}"),
    );
    let by_agent = recs.iter().position(|r| {
        r["action"] == "unbind"
            && r["device"] == a.dev.block.as_str()
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("for a client (drain)"))
    });
    let result = by_agent.and_then(|i| {
        recs[i..]
            .iter()
            .find(|r| r["action"] == "result" && r["device"] == a.dev.block.as_str())
    });
    v.check(
        "the drain's unbind was the agent's own write (the monitor audited it and its result)",
        result.is_some_and(|r| r["detail"].as_str().is_some_and(|d| d.contains("unbound"))),
        format!("{recs:?}"),
    );
    drop(holder);
    drop(held_c);
    Ok(v.done(format!(
        "A's unbind refused {} times (EBUSY), pages intact; B unbound, C (guard off) let \
         through; drain A --unbind passed through the agent",
        refused.len()
    )))
}
