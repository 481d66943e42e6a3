//! metrics: `monitor --metrics` on a real kernel. The agent's per-device gauges must equal
//! the kernel's page tables (pagemap) while a process maps a file and after it unmaps it; a
//! second agent asking for the same port (or given a malformed address) warns, naming the
//! address, and watches anyway, without metrics.
//!
//! A real Prometheus server on the host (started by `cargo xtask vm-test`) scrapes the agent
//! through a port QEMU forwards to the host's loopback; through its HTTP API (10.0.2.2, the
//! host as QEMU's user network shows it) the holder count and mapped bytes must equal
//! pagemap, and after an unbind the departure and the policy's SIGKILL must be counted once.
//! The holder is killed during that unbind, which is why metrics/ext4 is isolated.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Checked, DaxFs, Env, Target};
use crate::{
    agent::{Monitor, run_once},
    pmem,
    puppet::{Huge, Puppet},
    sys,
    truth::kernel_pages,
};

/// Every interface: the scrape comes in through the NIC (QEMU's forward), the local checks
/// through loopback.
const ADDR: &str = "0.0.0.0:9464";
const LOCAL: &str = "127.0.0.1:9464";
/// The host as QEMU's user network shows it (its loopback).
const HOST: [u8; 4] = [10, 0, 2, 2];
/// The guest's address on QEMU's user network.
const GUEST: [u8; 4] = [10, 0, 2, 15];
const MIB: u64 = 1 << 20;

/// A zeroed ifreq naming `name` (NUL-terminated: the name is shorter than IFNAMSIZ).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

/// An AF_INET sockaddr for an ifreq's address fields.
fn inet(a: [u8; 4]) -> libc::sockaddr {
    // SAFETY: sockaddr_in and sockaddr are plain data of the same size.
    unsafe {
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(a);
        std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin)
    }
}

/// Brings `name` up, with `addr`/24 when given. The guest's init brings no interface up.
fn iface_up(name: &str, addr: Option<[u8; 4]>) -> Result<()> {
    // SAFETY: a socket used only for the interface ioctls, closed below; each ifreq is
    // zeroed with a NUL-terminated name and the union member the ioctl reads set.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut rc = 0;
        if let Some(a) = addr {
            let mut ifr = ifreq(name);
            ifr.ifr_ifru.ifru_addr = inet(a);
            rc |= libc::ioctl(fd, libc::SIOCSIFADDR, &ifr);
            let mut ifr = ifreq(name);
            ifr.ifr_ifru.ifru_netmask = inet([255, 255, 255, 0]);
            rc |= libc::ioctl(fd, libc::SIOCSIFNETMASK, &ifr);
        }
        let mut ifr = ifreq(name);
        rc |= libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        rc |= libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        anyhow::ensure!(rc == 0, "bring {name} up: {err}");
    }
    Ok(())
}

/// The host's Prometheus port from the kernel command line (vm-test sets it when it started
/// one for this boot); a clear error otherwise.
fn prom_port() -> Result<u16> {
    prom_port_in(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

fn prom_port_in(cmdline: &str) -> Result<u16> {
    if cmdline.contains("daxprobe.prometheus=missing") {
        anyhow::bail!("prometheus not installed: run cargo xtask setup");
    }
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("daxprobe.promport="))
        .and_then(|p| p.parse().ok())
        .context(
            "no daxprobe.promport on the kernel command line: the host started no Prometheus \
             for this boot (cargo xtask vm-test does for the metrics scenario)",
        )
}

/// Percent-encodes a PromQL expression for a query string.
fn urlencode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The sum of an instant query's samples at the host's Prometheus (None: no series yet).
/// HTTP/1.0, so the answer is never chunked and ends with the connection.
fn prom_query(port: u16, q: &str) -> Result<Option<f64>> {
    let addr = std::net::SocketAddr::from((HOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET /api/v1/query?query={} HTTP/1.0\r\nHost: prometheus\r\n\r\n",
        urlencode(q)
    )?;
    let mut a = String::new();
    s.read_to_string(&mut a)?;
    let body = a
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .with_context(|| format!("no HTTP body in {a:?}"))?;
    let v: Value = serde_json::from_str(body).with_context(|| format!("answer {body:?}"))?;
    anyhow::ensure!(v["status"] == "success", "query {q}: {body}");
    let rs = v["data"]["result"].as_array().cloned().unwrap_or_default();
    if rs.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rs.iter()
            .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .sum(),
    ))
}

/// Polls `q` until it equals `want` (Prometheus scrapes every second); the last answer.
fn prom_until(port: u16, q: &str, within: Duration, want: impl Fn(f64) -> bool) -> String {
    let mut last = String::from("never asked");
    sys::wait_for(within, || match prom_query(port, q) {
        Ok(Some(v)) => {
            last = v.to_string();
            want(v)
        }
        Ok(None) => {
            last = "no series".into();
            false
        }
        Err(e) => {
            last = format!("{e:#}");
            false
        }
    });
    last
}

/// One scrape, as Prometheus asks for it (OpenMetrics).
fn scrape() -> Result<String> {
    let mut s = TcpStream::connect(LOCAL).with_context(|| format!("connect {LOCAL}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: guest\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n",
    )?;
    let mut a = String::new();
    s.read_to_string(&mut a)?;
    anyhow::ensure!(a.starts_with("HTTP/1.1 200"), "scrape answered {a:?}");
    Ok(a)
}

/// The value of the sample `series` (name and labels exactly as encoded), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// (holder processes, mapped bytes) of `fs`'s device per the kernel's page tables.
fn truth(env: &Env, fs: &DaxFs) -> Result<Gauges> {
    // `fs` is a fresh device: the environment's space covers only the shared ones.
    let mut space = env.space();
    space
        .pfn_ranges
        .push((fs.dev.data_start >> 12, fs.dev.data_end >> 12));
    space.path_prefixes.push(format!("{}/", fs.mnt));
    let pages: Vec<_> = kernel_pages(&space)?
        .into_iter()
        .filter(|&(_, _, pfn)| fs.dev.contains_pfn(pfn))
        .collect();
    let pids: BTreeSet<u32> = pages.iter().map(|p| p.0).collect();
    Ok((pids.len() as f64, (pages.len() as u64 * 4096) as f64))
}

/// (holder processes, mapped bytes) of one device.
type Gauges = (f64, f64);

/// Scrapes until the gauges of `fs`'s device equal the page tables (the agent refreshes
/// them once a second); returns the last (agent, truth) pair and the scrape.
fn settle(env: &Env, fs: &DaxFs) -> Result<(bool, Gauges, Gauges, String)> {
    let dev = &fs.dev.block;
    let mut last = ((0.0, 0.0), (0.0, 0.0), String::new());
    let same = sys::wait_for(Duration::from_secs(10), || {
        let (text, t) = match (scrape(), truth(env, fs)) {
            (Ok(text), Ok(t)) => (text, t),
            (a, b) => {
                last.2 = format!("scrape: {:?}; pagemap: {:?}", a.err(), b.err());
                return false;
            }
        };
        let got = (
            sample(
                &text,
                &format!("dax_probe_holder_processes{{device=\"{dev}\"}}"),
            )
            .unwrap_or(-1.0),
            sample(
                &text,
                &format!("dax_probe_mapped_bytes{{device=\"{dev}\"}}"),
            )
            .unwrap_or(-1.0),
        );
        last = (got, t, text);
        got == t
    });
    Ok((same, last.0, last.1, last.2))
}

pub fn run(env: &Env) -> Result<Checked> {
    let port = prom_port()?;
    let fs = &env.fresh(Target::Ext4, "metrics")?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    let mut check = |what: &str, holds: bool, got: String| {
        if holds {
            ok.push(what.to_string());
        } else {
            bad.push(format!("{what}: {got}"));
        }
    };
    iface_up("lo", None)?;
    // virtio_net probes the NIC asynchronously after its module loaded.
    let mut nic = Err(anyhow::anyhow!("not tried"));
    sys::wait_for(Duration::from_secs(10), || {
        nic = iface_up("eth0", Some(GUEST));
        nic.is_ok()
    });
    nic?;
    let file = format!("{}/metrics", fs.mnt);
    pmem::write_file(Path::new(&file), 2 * MIB as usize)?;
    let dev = fs.dev.block.clone();
    let policy = "/tmp/policy-metrics.toml";
    std::fs::write(
        policy,
        format!("[device.{dev}]\naction = \"signal\"\nsignal = \"KILL\"\ngrace = \"1s\"\n"),
    )?;
    let m = Monitor::start(
        "metrics",
        &["--metrics", ADDR, "--enforce", "--policy", policy],
    )?;

    // The port is taken, or the address is malformed: a second agent says so, naming the
    // address, and watches anyway (its programs attached, its summary at the end).
    for addr in [ADDR, "127.0.0.1:port"] {
        let (code, out, err) = run_once(&[
            "monitor",
            "--json",
            "--no-socket",
            "--duration",
            "2",
            "--metrics",
            addr,
        ])?;
        check(
            &format!(
                "a second agent with --metrics {addr}: warns naming it, runs without metrics, \
                 exit 0"
            ),
            code == Some(0)
                && err.contains(addr)
                && err.contains("running without metrics")
                && out.contains("\"type\":\"attached\"")
                && out.contains("\"type\":\"summary\""),
            format!("exit {code:?}: {}", err.trim()),
        );
    }

    let mut p = Puppet::spawn()?;
    let a = p.map(&file, 0, MIB, true, Huge::Pte)?;
    p.touch(a, MIB, false, 4096)?;
    // A second mapping stays through the unbind below.
    let b = p.map(&file, MIB, MIB, true, Huge::Pte)?;
    p.touch(b, MIB, false, 4096)?;
    let (same, got, want, text) = settle(env, fs)?;
    check(
        "holder_processes and mapped_bytes equal pagemap while mapped",
        same && want.0 >= 1.0 && want.1 >= MIB as f64,
        format!("agent {got:?}, pagemap {want:?}"),
    );
    let faults = sample(
        &text,
        &format!("dax_probe_faults_total{{device=\"{dev}\",page_size=\"4096\"}}"),
    );
    check(
        "faults_total counts the 4 KiB faults on the device",
        faults.is_some_and(|f| f >= 1.0),
        format!("{faults:?}"),
    );
    // The workspace shares one version: the agent's is this crate's.
    let build = format!(
        "dax_probe_build_info{{version=\"{}\",abi=\"",
        env!("CARGO_PKG_VERSION")
    );
    check(
        "build_info names version and ABI",
        text.lines()
            .any(|l| l.starts_with(&build) && l.ends_with("\"} 1")),
        build,
    );
    check(
        "hook_info names the fsdax fault hook",
        text.lines()
            .any(|l| l.starts_with("dax_probe_hook_info{concern=\"fsdax fault\",hook=")),
        "no hook_info for fsdax fault".into(),
    );
    check(
        "no pid or path label",
        !text.contains(&format!("\"{}\"", p.pid)) && !text.contains(&fs.mnt),
        "a pid or the mount point appears".into(),
    );
    check(
        "the scrape ends with # EOF",
        text.ends_with("# EOF\n"),
        text.lines().last().unwrap_or("").into(),
    );

    p.unmap(a, MIB)?;
    let (same_after, got_after, want_after, _) = settle(env, fs)?;
    check(
        "the gauges follow the unmap",
        same_after && want_after.1 < want.1,
        format!("agent {got_after:?}, pagemap {want_after:?}"),
    );

    // The host's Prometheus, through its HTTP API: what it scraped through the forward.
    let t0 = std::time::Instant::now();
    let q_holders = format!("dax_probe_holder_processes{{device=\"{dev}\"}}");
    let q_bytes = format!("dax_probe_mapped_bytes{{device=\"{dev}\"}}");
    let wait = Duration::from_secs(8);
    let prom_holders = prom_until(port, &q_holders, wait, |v| v == 1.0);
    let prom_bytes = prom_until(port, &q_bytes, wait, |v| v == want_after.1);
    let holders_seen = t0.elapsed().as_secs_f64();
    check(
        "Prometheus on the host shows 1 holder of the device",
        prom_holders == "1",
        format!("{q_holders} = {prom_holders}"),
    );
    check(
        "Prometheus on the host shows the mapped bytes pagemap shows",
        prom_bytes == want_after.1.to_string(),
        format!("{q_bytes} = {prom_bytes}, pagemap {}", want_after.1),
    );

    // The unbind: the policy kills the holder (after 1 s of grace) so that it finishes.
    pmem::unbind_fsdax(&fs.dev)?;
    let mut st = None;
    sys::wait_for(Duration::from_secs(5), || {
        st = p.status();
        st.is_some()
    });
    let t1 = std::time::Instant::now();
    let q_dep = format!("dax_probe_departures_total{{device=\"{dev}\"}}");
    let q_sig = format!(
        "dax_probe_signals_sent_total{{device=\"{dev}\",signal=\"SIGKILL\",origin=\"policy\"}}"
    );
    let prom_dep = prom_until(port, &q_dep, wait, |v| v == 1.0);
    let prom_sig = prom_until(port, &q_sig, wait, |v| v == 1.0);
    let counters_seen = t1.elapsed().as_secs_f64();
    check(
        "Prometheus on the host counts the departure once",
        prom_dep == "1",
        format!("{q_dep} = {prom_dep}"),
    );
    check(
        "Prometheus on the host counts the policy's SIGKILL once",
        prom_sig == "1",
        format!("{q_sig} = {prom_sig}"),
    );
    let out = m.stop()?;
    // On 7.x a holder killed after the unbind freed the memmap dies in the kernel's own
    // teardown of its stale mapping (an oops, never reaped): then the kernel's log must
    // say so of this very process, and the agent's line must show its SIGKILL to it.
    let sig = st.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
    let oops =
        super::departure::died_in_kernel("metrics_enforce_killed_holder_exit", p.pid, st.is_some());
    let killed_by_agent = out
        .enforcement()
        .any(|a| a.pid == p.pid && a.signal.as_deref() == Some("SIGKILL"));
    check(
        "the holder died of the policy's SIGKILL (or, the kernel's log says, of it in the \
         kernel's own teardown)",
        sig == Some(libc::SIGKILL) || (oops.is_some() && killed_by_agent),
        format!("holder exit {st:?}; kernel oops in it: {oops:?}"),
    );
    let summary = out.summary().cloned().unwrap_or_default();
    let counts: Value = json!({
        "holders_mapped": got.0,
        "bytes_mapped": got.1,
        "faults_4k": faults,
        "holders_after_unmap": got_after.0,
        "events": summary.events,
        "prometheus_holders": prom_holders,
        "prometheus_bytes": prom_bytes,
        "prometheus_departures": prom_dep,
        "prometheus_policy_sigkills": prom_sig,
        "prometheus_gauges_s": holders_seen,
        "prometheus_counters_s": counters_seen,
    });
    Ok(Checked {
        passed: bad.is_empty(),
        summary: format!(
            "{} checks; mapped: {} holder(s), {} bytes as pagemap says; after unmap {} bytes; \
             host Prometheus: {prom_holders} holder, {prom_bytes} bytes ({holders_seen:.1} s), \
             after the unbind {prom_dep} departure, {prom_sig} policy SIGKILL ({counters_seen:.1} s)",
            ok.len() + bad.len(),
            got.0,
            got.1,
            got_after.1
        ),
        counts,
        details: bad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_hosts_prometheus_the_scenario_fails_saying_why() {
        assert_eq!(
            prom_port_in("quiet daxprobe.promport=40291 x").unwrap(),
            40291
        );
        let e = prom_port_in("quiet daxprobe.prometheus=missing").unwrap_err();
        assert_eq!(
            e.to_string(),
            "prometheus not installed: run cargo xtask setup"
        );
        assert!(
            prom_port_in("quiet")
                .unwrap_err()
                .to_string()
                .contains("started no Prometheus")
        );
    }

    #[test]
    fn promql_is_percent_encoded() {
        assert_eq!(
            urlencode("a_b{device=\"pmem1\"}"),
            "a_b%7Bdevice%3D%22pmem1%22%7D"
        );
    }
}
