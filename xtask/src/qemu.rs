//! Booting a Debian kernel in QEMU with emulated nvdimms, and collecting what the guest
//! reports.
//!
//! The guest's console (ttyS0) streams to a log (and to the terminal when asked); its results
//! arrive on a second serial port (ttyS1) backed by a file. A watchdog stops the VM on a
//! kernel panic, on a timeout, or once the guest said it is done.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{kernels::Kernel, paths};

pub const NVDIMM_SIZE_MB: u64 = 512;
const RESULT_MARK: &str = "@@DAXPROBE ";

pub struct VmConfig<'a> {
    pub kernel: &'a Kernel,
    pub initrd: PathBuf,
    /// Extra kernel command line (daxprobe.* parameters).
    pub append: String,
    pub nvdimms: usize,
    pub timeout: Duration,
    /// Show the guest console on our terminal as it happens.
    pub echo: bool,
    /// Give the guest our terminal (interactive shell).
    pub interactive: bool,
    /// Working directory for images, results and logs.
    pub dir: PathBuf,
    /// (host port, guest port): a virtio NIC on QEMU's user network whose guest TCP port
    /// is forwarded to the host's loopback (for a host-side Prometheus to scrape the
    /// guest). None: the guest has no network device at all.
    pub hostfwd: Option<(u16, u16)>,
    /// Stop a guest that reported nothing for this long (a scenario hung in the kernel):
    /// the rest of the run then goes on in a fresh boot instead of waiting for `timeout`.
    pub stall: Option<Duration>,
}

pub struct VmRun {
    pub records: Vec<Value>,
    pub console_log: PathBuf,
    pub timed_out: bool,
    /// Stopped because it reported nothing for the stall limit: after which record.
    pub hung: Option<String>,
    /// The first kernel panic / oops / BUG line, if any.
    pub kernel_trouble: Option<String>,
    pub accel: &'static str,
    pub seconds: f64,
    /// Why an earlier boot of the same run died before the guest was ready (it was retried).
    pub retried: Option<String>,
}

impl VmRun {
    pub fn of_event<'a>(&'a self, e: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.records.iter().filter(move |r| r["event"] == e)
    }
    pub fn done(&self) -> bool {
        self.of_event("done").next().is_some()
    }

    /// One phrase for why a guest stopped without `done`.
    pub fn trouble_summary(&self) -> String {
        if let Some(h) = &self.hung {
            format!("hung: {h}")
        } else if self.timed_out {
            "timed out".to_string()
        } else if let Some(t) = &self.kernel_trouble {
            format!("kernel trouble: {t}")
        } else if let Some(f) = self.of_event("fatal").next() {
            format!("guest: {}", f["error"].as_str().unwrap_or("fatal"))
        } else if self.records.is_empty() {
            "never reported (did the kernel boot? see the console log)".to_string()
        } else {
            "stopped before reporting done".to_string()
        }
    }
}

/// The CPU model for TCG. Not `max`: QEMU 7.2's `max` turns on its then-new AVX/AVX2
/// emulation and every other feature TCG knows, and guests died under it here (a 7.2 guest
/// in `enqueue_task_fair` at boot, a 6.12 guest double-faulting in `kmem_cache_alloc`),
/// as other eBPF projects saw in CI. A plain x86-64-v2 model has what Debian's kernels and
/// the BPF JIT use. `DAX_PROBE_QEMU_CPU` overrides it (to measure, or to try `max`).
pub fn tcg_cpu() -> String {
    std::env::var("DAX_PROBE_QEMU_CPU")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| TCG_CPU.to_string())
}

/// The guest keeps the TSC and no clocksource watchdog. Under TCG the watchdog, starved
/// by host load, can call the TSC unstable mid-run; the kernel then turns the
/// `__sched_clock_stable` static key off, patching `sched_clock_cpu` while the other vCPU
/// runs it, and TCG can execute the half-patched site: a CI guest died so (6.12, "int3"
/// at `sched_clock_cpu+0x9`, "Fatal exception in interrupt"). QEMU derives every vCPU's
/// TSC from one host clock, so calling it reliable is true here.
pub const GUEST_CLOCK: &str = "tsc=reliable";

pub const TCG_CPU: &str = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt";

/// Whether KVM is worth trying: /dev/kvm usable and not known to hang on this host.
fn kvm_verdict_file() -> PathBuf {
    paths::cache().join("kvm-verdict")
}

fn host_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn kvm_candidate() -> bool {
    if std::env::var_os("DAX_PROBE_NO_KVM").is_some() {
        return false;
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    match fs::read_to_string(kvm_verdict_file()) {
        Ok(v) => !v.starts_with(&format!("broken {}", host_release())),
        Err(_) => true,
    }
}

fn remember_kvm_broken() {
    let _ = fs::create_dir_all(paths::cache());
    let _ = fs::write(kvm_verdict_file(), format!("broken {}\n", host_release()));
}

pub fn run(cfg: &VmConfig) -> Result<VmRun> {
    fs::create_dir_all(&cfg.dir)?;
    if kvm_candidate() {
        // KVM only if it really boots: nested KVM can hang without a word.
        match boot(cfg, true, Some(Duration::from_secs(25)))? {
            Some(r) => return Ok(r),
            None => {
                eprintln!("vm: KVM did not boot the guest; using TCG emulation from now on");
                remember_kvm_broken();
            }
        }
    }
    Ok(boot(cfg, false, None)?.expect("no boot deadline without KVM"))
}

fn make_images(cfg: &VmConfig) -> Result<Vec<PathBuf>> {
    (0..cfg.nvdimms)
        .map(|i| {
            let p = cfg.dir.join(format!("nvdimm{i}.img"));
            // Fresh, sparse backing file for every boot: no state leaks between runs.
            let f = fs::File::create(&p)?;
            f.set_len(NVDIMM_SIZE_MB << 20)?;
            Ok(p)
        })
        .collect()
}

/// Boots once. With `boot_deadline`, returns None if the guest did not report booting in time.
fn boot(cfg: &VmConfig, kvm: bool, boot_deadline: Option<Duration>) -> Result<Option<VmRun>> {
    let images = make_images(cfg)?;
    let results = cfg.dir.join("results.jsonl");
    let console_log = cfg.dir.join("console.log");
    let _ = fs::remove_file(&results);
    let mem_max = 2048 + cfg.nvdimms as u64 * NVDIMM_SIZE_MB + 1024;
    let mut c = Command::new("qemu-system-x86_64");
    if kvm {
        c.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        c.args(["-accel", "tcg,thread=multi", "-cpu"])
            .arg(tcg_cpu());
    }
    c.args(["-smp", "2", "-machine", "q35,nvdimm=on"])
        .arg("-m")
        .arg(format!(
            "2G,slots={},maxmem={mem_max}M",
            cfg.nvdimms.max(1) + 1
        ));
    for (i, img) in images.iter().enumerate() {
        c.arg("-object").arg(format!(
            "memory-backend-file,id=mem{i},share=on,mem-path={},size={NVDIMM_SIZE_MB}M,align=2M",
            img.display()
        ));
        c.arg("-device")
            .arg(format!("nvdimm,id=nv{i},memdev=mem{i},label-size=128K"));
    }
    c.arg("-kernel")
        .arg(&cfg.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 {GUEST_CLOCK} daxprobe.nvdimms={} {}",
            cfg.nvdimms, cfg.append
        ))
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-serial")
        .arg(format!("file:{}", results.display()));
    c.args(net_args(cfg.hostfwd));
    if cfg.interactive {
        c.stdin(Stdio::inherit()).stdout(Stdio::inherit());
    } else {
        c.stdin(Stdio::null()).stdout(Stdio::piped());
    }
    c.stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = c
        .spawn()
        .context("start qemu-system-x86_64 (run cargo xtask setup)")?;

    let trouble: Arc<Mutex<Option<String>>> = Arc::default();
    let console = if cfg.interactive {
        None
    } else {
        Some(watch_console(
            &mut child,
            &console_log,
            cfg.echo,
            trouble.clone(),
        )?)
    };
    let stderr_log = cfg.dir.join("qemu.stderr");
    let stderr = child.stderr.take();
    let stderr_thread = stderr.map(|mut s| {
        let p = stderr_log.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut buf);
            let _ = fs::write(p, buf);
        })
    });

    let mut timed_out = false;
    let mut hung = None;
    let mut progress = Progress::new(started);
    let mut done_at: Option<Instant> = None;
    loop {
        let records = read_records(&results);
        if let Some(limit) = cfg.stall
            && let Some(idle) = progress.idle_beyond(records.len(), Instant::now(), limit)
        {
            hung = Some(format!(
                "no report for {:.0} s after {}",
                idle.as_secs_f64(),
                records.last().map_or("the start".to_string(), last_said)
            ));
            kill(&mut child);
            break;
        }
        let booted = records.iter().any(|r| r["event"] == "boot");
        if child.try_wait()?.is_some() {
            if boot_deadline.is_some() && !booted {
                // QEMU gave up on KVM (it may abort on an MSR it cannot set): try TCG.
                return Ok(None);
            }
            break;
        }
        if let Some(d) = boot_deadline
            && !booted
            && started.elapsed() > d
        {
            kill(&mut child);
            return Ok(None);
        }
        if records.iter().any(|r| r["event"] == "done") && done_at.is_none() {
            done_at = Some(Instant::now());
        }
        // The guest powers off right after "done"; give it a moment, then stop it.
        if done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
            kill(&mut child);
            break;
        }
        if trouble
            .lock()
            .unwrap()
            .as_deref()
            .is_some_and(|t| t.contains("Kernel panic"))
        {
            std::thread::sleep(Duration::from_secs(2));
            kill(&mut child);
            break;
        }
        if started.elapsed() > cfg.timeout {
            timed_out = true;
            kill(&mut child);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.wait();
    if let Some(t) = console {
        let _ = t.join();
    }
    if let Some(t) = stderr_thread {
        let _ = t.join();
    }
    let records = read_records(&results);
    if records.is_empty() {
        let err = fs::read_to_string(&stderr_log).unwrap_or_default();
        if !err.trim().is_empty() {
            eprintln!("vm: qemu said: {}", err.trim());
        }
    }
    let kernel_trouble = trouble.lock().unwrap().clone();
    Ok(Some(VmRun {
        records,
        console_log,
        timed_out,
        hung,
        kernel_trouble,
        accel: if kvm { "kvm" } else { "tcg" },
        seconds: started.elapsed().as_secs_f64(),
        retried: None,
    }))
}

/// When the guest last reported something: the stall watchdog's clock.
struct Progress {
    seen: usize,
    since: Instant,
}

impl Progress {
    fn new(start: Instant) -> Self {
        Self {
            seen: 0,
            since: start,
        }
    }

    /// Given the records so far, how long the guest has said nothing when that exceeds
    /// `limit` (a new record restarts the clock).
    fn idle_beyond(&mut self, records: usize, now: Instant, limit: Duration) -> Option<Duration> {
        if records != self.seen {
            self.seen = records;
            self.since = now;
            return None;
        }
        let idle = now.saturating_duration_since(self.since);
        (idle > limit).then_some(idle)
    }
}

/// A record in a few words, for where a guest hung: a scenario's result names it.
fn last_said(r: &Value) -> String {
    let event = r["event"].as_str().unwrap_or("?");
    match (
        r["result"]["scenario"].as_str(),
        r["result"]["target"].as_str(),
    ) {
        (Some(s), Some(t)) => format!("the result of {s}/{t}"),
        _ => format!("its {event} record"),
    }
}

/// The network part of the command line. Without a forward, `-nic none`: QEMU would
/// otherwise add its default NIC. With one, the forward listens on the host's loopback only.
fn net_args(hostfwd: Option<(u16, u16)>) -> Vec<String> {
    match hostfwd {
        None => vec!["-nic".into(), "none".into()],
        Some((host, guest)) => vec![
            "-netdev".into(),
            format!("user,id=n0,hostfwd=tcp:127.0.0.1:{host}-:{guest}"),
            "-device".into(),
            "virtio-net-pci,netdev=n0".into(),
        ],
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
}

fn watch_console(
    child: &mut Child,
    log: &Path,
    echo: bool,
    trouble: Arc<Mutex<Option<String>>>,
) -> Result<std::thread::JoinHandle<()>> {
    let out = child.stdout.take().context("qemu stdout")?;
    let mut logf = fs::File::create(log)?;
    Ok(std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match r.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw);
            let _ = logf.write_all(line.as_bytes());
            if echo {
                print!("{line}");
                let _ = std::io::stdout().flush();
            }
            let l = line.trim_end();
            if is_trouble(l) {
                let mut t = trouble.lock().unwrap();
                // Keep the first report, but let a later panic override a warning.
                if t.is_none()
                    || (l.contains("Kernel panic")
                        && !t.as_deref().unwrap_or("").contains("Kernel panic"))
                {
                    *t = Some(l.to_string());
                }
            }
        }
    }))
}

/// What the kernel prints when it is in trouble (the start of an oops report).
const TROUBLE: [&str; 5] = [
    "Kernel panic",
    "BUG:",
    "Oops:",
    "general protection fault",
    "WARNING: CPU",
];

fn is_trouble(line: &str) -> bool {
    TROUBLE.iter().any(|k| line.contains(k))
}

/// The console lines a failure report should show: the first oops report whole (from its
/// first trouble line, up to `max` lines: the header, the registers and the call trace
/// name the culprit; a panic's last lines alone do not) and the last lines of the log;
/// without trouble, the last `max` lines.
pub fn trouble_excerpt(console: &str, max: usize) -> Vec<String> {
    let lines: Vec<&str> = console.lines().collect();
    let tail_from = lines.len().saturating_sub(max);
    let mut out: Vec<String> = Vec::new();
    if let Some(first) = lines.iter().position(|l| is_trouble(l)) {
        let end = (first + max).min(lines.len());
        out.extend(lines[first..end].iter().map(|l| l.to_string()));
        let last = lines.len().saturating_sub(5).max(end);
        if last > end {
            out.push(format!("[… {} console lines …]", last - end));
        }
        out.extend(lines[last..].iter().map(|l| l.to_string()));
    } else {
        out.extend(lines[tail_from..].iter().map(|l| l.to_string()));
    }
    out
}

/// Result records so far (the guest writes them line by line; a torn last line is skipped).
pub fn read_records(path: &Path) -> Vec<Value> {
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.find(RESULT_MARK).map(|i| &l[i + RESULT_MARK.len()..]))
        .filter_map(|j| serde_json::from_str(j.trim()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that keeps reporting is never called hung; one silent past the limit is,
    /// counted from its last record (not from the boot), and the record is named.
    #[test]
    fn a_guest_silent_past_the_limit_is_hung_from_its_last_record() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let limit = s(300);
        let mut p = Progress::new(t0);
        assert_eq!(p.idle_beyond(0, t0 + s(200), limit), None);
        assert_eq!(
            p.idle_beyond(1, t0 + s(290), limit),
            None,
            "a record restarts it"
        );
        assert_eq!(
            p.idle_beyond(1, t0 + s(500), limit),
            None,
            "200 s since the record"
        );
        assert_eq!(p.idle_beyond(1, t0 + s(591), limit), Some(s(301)));
        assert_eq!(p.idle_beyond(2, t0 + s(592), limit), None);
        let r = serde_json::json!({"event": "result", "result": {"scenario": "dm-linear", "target": "ext4"}});
        assert_eq!(last_said(&r), "the result of dm-linear/ext4");
        assert_eq!(
            last_said(&serde_json::json!({"event": "ready"})),
            "its ready record"
        );
    }

    /// The oops header and call trace are kept, not only the panic that followed them.
    #[test]
    fn an_excerpt_starts_at_the_first_oops() {
        let mut log: Vec<String> = (0..100).map(|i| format!("boot line {i}")).collect();
        log.push("BUG: unable to handle page fault for address: 0".into());
        log.push("RIP: 0010:some_function+0x9/0x1d0".into());
        log.push("Call Trace:".into());
        log.extend((0..50).map(|i| format!("after {i}")));
        log.push("Kernel panic - not syncing: Fatal exception in interrupt".into());
        let x = trouble_excerpt(&log.join("\n"), 20);
        assert!(x[0].starts_with("BUG: unable"), "{x:?}");
        assert_eq!(x[2], "Call Trace:");
        assert!(x.last().unwrap().starts_with("Kernel panic"), "{x:?}");
        assert!(x.iter().any(|l| l.contains("console lines")));
        let quiet = trouble_excerpt("a\nb\nc", 2);
        assert_eq!(quiet, ["b", "c"]);
    }

    #[test]
    fn network_only_with_a_forward_and_on_loopback() {
        assert_eq!(net_args(None), ["-nic", "none"]);
        let a = net_args(Some((40001, 9464)));
        assert_eq!(a[1], "user,id=n0,hostfwd=tcp:127.0.0.1:40001-:9464");
        assert_eq!(a[3], "virtio-net-pci,netdev=n0");
    }
}
