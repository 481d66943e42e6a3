//! `cargo xtask vm-test`: boot each requested Debian kernel with emulated nvdimms, run the
//! scenarios in the guest, and report `N passed, N failed`.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    harness::{self, Boot, Fate},
    kernels, paths,
    qemu::VmRun,
};

/// Kernels `--kernel all` means: every line the scenarios are proven on.
pub const ALL: &[&str] = &["5.10", "6.1", "6.12", "7"];

pub struct Options {
    pub kernels: Vec<String>,
    pub scenario: Option<String>,
    pub verbose: bool,
    pub refresh: bool,
    /// `--boot-only --repeat N`: boot each kernel N times (no scenario) and count deaths.
    pub boot_only: Option<u32>,
}

/// Expands `all` and validates labels.
pub fn kernel_list(arg: &str) -> Result<Vec<String>> {
    if arg == "all" {
        return Ok(ALL.iter().map(|s| s.to_string()).collect());
    }
    arg.split(',')
        .map(|k| kernels::line(k.trim()).map(|l| l.label.to_string()))
        .collect()
}

/// One line of the final table.
struct Row {
    kernel: String,
    name: String,
    passed: bool,
    summary: String,
    details: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    let payload = harness::payload(opts.verbose)?;
    if let Some(n) = opts.boot_only {
        return boot_only(opts, &payload, n);
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut report = Vec::new();
    let mut retried_boots: Vec<String> = Vec::new();
    for label in &opts.kernels {
        let guest = harness::guest(label, &format!("vm-test-{label}"), &payload, opts.refresh)?;
        let kernel = &guest.kernel;
        let dir = guest.dir.clone();
        eprintln!(
            "vm-test: booting {} ({})",
            kernel.release,
            kernel.packages.join(", ")
        );
        let mut boot = |scenario: &str, dir: &std::path::Path| -> Result<VmRun> {
            let mut append = format!(
                "daxprobe.mode=test daxprobe.scenario={scenario} daxprobe.verbose={}",
                u8::from(opts.verbose)
            );
            // Lives until this boot is over (killed on drop, also on error).
            let prom = if wants_prometheus(scenario) {
                Prometheus::start(dir)?
            } else {
                None
            };
            let hostfwd = match (&prom, wants_prometheus(scenario)) {
                (Some(p), _) => {
                    append += &format!(" daxprobe.promport={}", p.port);
                    Some((p.fwd, GUEST_METRICS_PORT))
                }
                // The guest's scenario fails with the reason (not a silent pass).
                (None, true) => {
                    append += " daxprobe.prometheus=missing";
                    None
                }
                (None, false) => None,
            };
            let vm = guest.boot(&Boot {
                append: &append,
                timeout: Duration::from_secs(25 * 60),
                // The longest scenario reports within ~1 min under TCG; a guest silent for
                // 5 is stuck in the kernel (CI once waited 25 min on one).
                stall: Some(Duration::from_secs(5 * 60)),
                echo: opts.verbose,
                dir: Some(dir),
                hostfwd,
                ..Boot::default()
            })?;
            drop(prom);
            if let Some(why) = &vm.retried {
                retried_boots.push(format!("{label} ({scenario}): {why}"));
            }
            Ok(vm)
        };
        let vm = boot(opts.scenario.as_deref().unwrap_or("all"), &dir)?;
        if let Some(d) = vm.of_event("doctor").next() {
            let text = d["text"].as_str().unwrap_or("");
            fs::write(dir.join("doctor.txt"), text)?;
            if opts.verbose {
                eprintln!("{text}");
            }
        }
        let before = rows.len();
        collect(label, &vm, &mut rows);
        missing(label, &vm, &planned(&vm), &mut rows);
        for r in &rows[before..] {
            print_row(r);
        }
        eprintln!(
            "vm-test: {} done in {:.0} s ({}); console log {}",
            kernel.release,
            vm.seconds,
            vm.accel,
            vm.console_log.display()
        );
        let mut facts: Vec<Value> = vm.of_event("fact").cloned().collect();
        let mut results: Vec<Value> = vm.of_event("result").map(|r| r["result"].clone()).collect();
        let mut seconds = vm.seconds;
        // Scenarios that may leave the kernel wedged run apart from the others, in boots
        // of their own: one for all of them, and another for those a wedged bus kept from
        // running (the guest says so), until each has run.
        let mut pending: Vec<String> = vm
            .of_event("isolated")
            .flat_map(|e| e["scenarios"].as_array().cloned().unwrap_or_default())
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        let mut n = 0;
        while !pending.is_empty() {
            n += 1;
            let sub = dir.join(format!("isolated-{n}"));
            fs::create_dir_all(&sub)?;
            eprintln!(
                "vm-test: booting {} again for {}",
                kernel.release,
                pending.join(", ")
            );
            let vm = boot(&pending.join(","), &sub)?;
            let before = rows.len();
            collect(label, &vm, &mut rows);
            let done = finished(&vm);
            for d in vm.of_event("deferred") {
                eprintln!(
                    "vm-test: the guest deferred {} to another boot: {} after {}",
                    d["scenarios"],
                    d["why"].as_str().unwrap_or("?"),
                    d["after"].as_str().unwrap_or("?")
                );
            }
            if done.is_empty() {
                // The first one ran first and left nothing: it failed on its own.
                missing(label, &vm, &pending[..1], &mut rows);
                pending.remove(0);
            }
            pending.retain(|t| !done.contains(t));
            for r in &rows[before..] {
                print_row(r);
            }
            eprintln!(
                "vm-test: isolated boot {n} done in {:.0} s; console log {}",
                vm.seconds,
                vm.console_log.display()
            );
            facts.extend(vm.of_event("fact").cloned());
            results.extend(vm.of_event("result").map(|r| r["result"].clone()));
            seconds += vm.seconds;
        }
        report.push(json!({
            "kernel": label,
            "release": kernel.release,
            "packages": kernel.packages,
            "accel": vm.accel,
            "seconds": seconds,
            "facts": facts,
            "doctor": vm.of_event("doctor").next().map(|d| d["report"].clone()),
            "results": results,
        }));
    }
    let path = paths::workspace().join("target/vm/vm-test-report.json");
    fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    // A run of every scenario on every kernel line regenerates the README's support matrix.
    if opts.scenario.is_none() && opts.kernels.len() == ALL.len() {
        let readme = paths::workspace().join("README.md");
        let changed = crate::matrix::update_readme(&readme, &crate::matrix::render(&report))?;
        eprintln!(
            "vm-test: README support matrix {}",
            if changed {
                "regenerated from this run and changed: review and commit it (git diff README.md)"
            } else {
                "regenerated: this run proved exactly what it says"
            }
        );
    }

    if !retried_boots.is_empty() {
        println!();
        println!(
            "retried boots ({}: the guest died before it was ready, nothing of ours had run):",
            retried_boots.len()
        );
        for r in &retried_boots {
            println!("  {r}");
        }
    }
    let passed = rows.iter().filter(|r| r.passed).count();
    let failed = rows.len() - passed;
    println!();
    println!("{:<6} {:<24} result", "kernel", "scenario");
    for r in &rows {
        println!(
            "{:<6} {:<24} {}",
            r.kernel,
            r.name,
            if r.passed { "pass" } else { "FAIL" }
        );
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 || rows.is_empty() {
        bail!("vm-test failed ({failed} of {} failed)", rows.len());
    }
    Ok(())
}

/// The `NAME/TARGET` tokens the guest planned to run in this boot.
fn planned(vm: &VmRun) -> Vec<String> {
    vm.of_event("plan")
        .flat_map(|e| e["scenarios"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// The tokens this boot reported a result for.
fn finished(vm: &VmRun) -> Vec<String> {
    vm.of_event("result")
        .map(|r| {
            format!(
                "{}/{}",
                r["result"]["scenario"].as_str().unwrap_or("?"),
                r["result"]["target"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// A failed row for each of `tokens` this boot has no result for: the guest ended (died,
/// hung, timed out) before or while running it, which is a failure, never a skip.
fn missing(label: &str, vm: &VmRun, tokens: &[String], rows: &mut Vec<Row>) {
    let done = finished(vm);
    for t in tokens.iter().filter(|t| !done.contains(t)) {
        rows.push(Row {
            kernel: label.to_string(),
            name: t.clone(),
            passed: false,
            summary: format!(
                "no result: the guest ended before or during it ({})",
                vm.console_log.display()
            ),
            details: Vec::new(),
        });
    }
}

/// The port the metrics scenario's agent serves on inside the guest.
const GUEST_METRICS_PORT: u16 = 9464;

/// Whether a boot of these `daxprobe.scenario=` tokens runs the metrics scenario, which
/// needs the host's Prometheus. `all` does not: metrics/ext4 is isolated (it kills a holder
/// during an unbind), so the guest names it and the host boots it on its own.
fn wants_prometheus(scenario: &str) -> bool {
    scenario
        .split(',')
        .map(str::trim)
        .any(|t| t == "metrics" || t.starts_with("metrics/"))
}

/// A Prometheus server (Debian's package) on the host's loopback, scraping the guest's
/// agent through QEMU's forward every second. Killed when dropped.
struct Prometheus {
    child: Child,
    /// Its web/API port (the guest queries it at 10.0.2.2:port).
    port: u16,
    /// The host end of QEMU's forward to the guest's metrics port (its scrape target).
    fwd: u16,
}

impl Prometheus {
    /// None when `prometheus` is not installed.
    fn start(dir: &Path) -> Result<Option<Self>> {
        if Command::new("prometheus")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("vm-test: prometheus not installed: run cargo xtask setup");
            return Ok(None);
        }
        let (port, fwd) = {
            // Held together so the two differ; released right before their users bind.
            let a = TcpListener::bind("127.0.0.1:0")?;
            let b = TcpListener::bind("127.0.0.1:0")?;
            (a.local_addr()?.port(), b.local_addr()?.port())
        };
        let pdir = dir.join("prometheus");
        let _ = fs::remove_dir_all(&pdir);
        fs::create_dir_all(&pdir)?;
        let yml = pdir.join("prometheus.yml");
        fs::write(&yml, scrape_config(fwd))?;
        let log = fs::File::create(pdir.join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", yml.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                pdir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start prometheus")?;
        let mut p = Self { child, port, fwd };
        let t = Instant::now();
        while !p.ready() {
            if let Some(st) = p.child.try_wait()? {
                bail!(
                    "prometheus exited ({st}) before it was ready: see {}",
                    pdir.join("prometheus.log").display()
                );
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("prometheus not ready on 127.0.0.1:{port} after 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "vm-test: prometheus on 127.0.0.1:{port} scrapes the guest through 127.0.0.1:{fwd} \
             (forwarded to its port {GUEST_METRICS_PORT})"
        );
        Ok(Some(p))
    }

    fn ready(&self) -> bool {
        let ask = || -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /-/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
            let mut a = String::new();
            s.read_to_string(&mut a)?;
            Ok(a)
        };
        ask().is_ok_and(|a| a.starts_with("HTTP/1.1 200"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Scrape the forwarded port every second (the agent refreshes its gauges as often).
fn scrape_config(fwd: u16) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
         - job_name: dax-probe-guest\n    static_configs:\n      \
         - targets: ['127.0.0.1:{fwd}']\n"
    )
}

fn collect(label: &str, vm: &VmRun, rows: &mut Vec<Row>) {
    for r in vm.of_event("result") {
        let o = &r["result"];
        rows.push(Row {
            kernel: label.to_string(),
            name: format!(
                "{}/{}",
                o["scenario"].as_str().unwrap_or("?"),
                o["target"].as_str().unwrap_or("?")
            ),
            passed: o["passed"] == true,
            summary: o["summary"].as_str().unwrap_or("").to_string(),
            details: o["details"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    for f in vm.of_event("fatal") {
        rows.push(Row {
            kernel: label.to_string(),
            name: "guest".into(),
            passed: false,
            summary: f["error"].as_str().unwrap_or("fatal").to_string(),
            details: f["dmesg"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    if !vm.done() && vm.of_event("fatal").next().is_none() {
        let why = vm.trouble_summary();
        let tail = crate::qemu::trouble_excerpt(
            &fs::read_to_string(&vm.console_log).unwrap_or_default(),
            40,
        );
        rows.push(Row {
            kernel: label.to_string(),
            name: "guest".into(),
            passed: false,
            summary: format!("guest {why}"),
            details: tail,
        });
    } else if let Some(t) = &vm.kernel_trouble {
        eprintln!("vm-test: note: kernel {label} logged: {t}");
    }
}

fn print_row(r: &Row) {
    println!(
        "{} {} {}: {}",
        if r.passed { "pass" } else { "FAIL" },
        r.kernel,
        r.name,
        r.summary
    );
    if !r.passed {
        for d in &r.details {
            println!("       {d}");
        }
    }
}

/// `--boot-only --repeat N`: how often does each kernel die before the guest is ready, with
/// no retry (the figure the CPU model is chosen by).
fn boot_only(opts: &Options, payload: &harness::Payload, n: u32) -> Result<()> {
    println!(
        "boot-only: {n} boots per kernel, -cpu {}",
        crate::qemu::tcg_cpu()
    );
    let mut early_total = 0;
    for label in &opts.kernels {
        let guest = harness::guest(label, &format!("boot-{label}"), payload, opts.refresh)?;
        let (mut ok, mut early, mut during) = (0, Vec::new(), Vec::new());
        let mut secs = Vec::new();
        for i in 0..n {
            let dir = guest.dir.join(format!("boot{i}"));
            let vm = guest.boot(&Boot {
                append: "daxprobe.mode=boot",
                timeout: Duration::from_secs(5 * 60),
                echo: opts.verbose,
                dir: Some(&dir),
                retry_early_death: false,
                ..Boot::default()
            })?;
            secs.push(vm.seconds);
            match harness::fate(&vm) {
                Fate::Finished => ok += 1,
                Fate::DiedEarly(why) => early.push(format!("boot {i}: {why}")),
                Fate::DiedDuring(why) => during.push(format!("boot {i}: {why}")),
            }
        }
        secs.sort_by(f64::total_cmp);
        println!(
            "{label:<5} {} : {ok}/{n} ready and done, {} died before ready, {} after; median \
             boot {:.1} s",
            guest.kernel.release,
            early.len(),
            during.len(),
            secs.get(secs.len() / 2).copied().unwrap_or(f64::NAN)
        );
        for e in early.iter().chain(&during) {
            println!("      {e}");
        }
        early_total += early.len() + during.len();
    }
    if early_total > 0 {
        bail!("{early_total} boot(s) died");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_only_for_boots_running_metrics() {
        assert!(wants_prometheus("metrics"));
        assert!(wants_prometheus("fault-trace,metrics/ext4"));
        assert!(!wants_prometheus("all"));
        assert!(!wants_prometheus("metrics-foo,fault-trace"));
    }

    #[test]
    fn scrape_config_targets_the_forward_every_second() {
        let c = scrape_config(40123);
        assert!(c.contains("scrape_interval: 1s"));
        assert!(c.contains("scrape_timeout: 1s"));
        assert!(c.contains("- targets: ['127.0.0.1:40123']"));
    }
}
