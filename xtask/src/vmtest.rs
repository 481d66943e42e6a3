//! `cargo xtask vm-test`: boot each requested Debian kernel with emulated nvdimms, run the
//! scenarios in the guest, and report `N passed, N failed`.

use std::{fs, time::Duration};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::{
    initramfs, kernels, paths,
    qemu::{self, VmConfig, VmRun},
    setup,
};

/// Kernels `--kernel all` means: every line the scenarios are proven on.
pub const ALL: &[&str] = &["5.10", "6.1", "6.12", "7"];

pub struct Options {
    pub kernels: Vec<String>,
    pub scenario: Option<String>,
    pub verbose: bool,
    pub refresh: bool,
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
    setup::ensure(opts.verbose)?;
    let ws = paths::workspace();
    let bin = initramfs::build_binaries(&ws)?;
    let payload = initramfs::payload(&bin)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut report = Vec::new();
    for label in &opts.kernels {
        let kernel = kernels::fetch(label, opts.refresh)?;
        let dir = paths::run_dir(&format!("vm-test-{label}"));
        fs::create_dir_all(&dir)?;
        let initrd = dir.join("initrd.cpio");
        initramfs::write(&initrd, &[&payload, &initramfs::modules(&kernel)?])?;
        eprintln!(
            "vm-test: booting {} ({})",
            kernel.release,
            kernel.packages.join(", ")
        );
        let boot = |scenario: &str, dir: &std::path::Path| {
            qemu::run(&VmConfig {
                kernel: &kernel,
                initrd: initrd.clone(),
                append: format!(
                    "daxprobe.mode=test daxprobe.scenario={scenario} daxprobe.verbose={}",
                    u8::from(opts.verbose)
                ),
                nvdimms: 13,
                timeout: Duration::from_secs(25 * 60),
                echo: opts.verbose,
                interactive: false,
                dir: dir.to_path_buf(),
            })
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
        // Scenarios that may leave the kernel wedged get a boot each (the guest names them).
        let isolated: Vec<String> = vm
            .of_event("isolated")
            .flat_map(|e| e["scenarios"].as_array().cloned().unwrap_or_default())
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        for token in isolated {
            let sub = dir.join(token.replace('/', "-"));
            fs::create_dir_all(&sub)?;
            eprintln!(
                "vm-test: booting {} again for {token} alone",
                kernel.release
            );
            let vm = boot(&token, &sub)?;
            let before = rows.len();
            collect(label, &vm, &mut rows);
            for r in &rows[before..] {
                print_row(r);
            }
            eprintln!(
                "vm-test: {token} done in {:.0} s; console log {}",
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
        let why = if vm.timed_out {
            "timed out".to_string()
        } else if let Some(t) = &vm.kernel_trouble {
            format!("kernel trouble: {t}")
        } else if vm.records.is_empty() {
            "never reported (did the kernel boot? see the console log)".to_string()
        } else {
            "stopped before reporting done".to_string()
        };
        let tail = fs::read_to_string(&vm.console_log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(15)
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
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
