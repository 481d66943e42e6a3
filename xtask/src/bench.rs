//! `cargo xtask bench …`: measurements printed side by side from one run, never asserted.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    harness::{self, Boot},
    paths,
};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn vm_bench(name: &str, kernel: &str, verbose: bool) -> Result<Value> {
    let payload = harness::payload(verbose)?;
    let guest = harness::guest(kernel, &format!("bench-{name}"), &payload, false)?;
    let k = &guest.kernel;
    eprintln!("bench: booting {} for {name}", k.release);
    let append = format!("daxprobe.mode=bench daxprobe.bench={name}");
    let vm = guest.boot(&Boot {
        append: &append,
        timeout: Duration::from_secs(30 * 60),
        echo: verbose,
        ..Boot::default()
    })?;
    if let Some(f) = vm.of_event("fatal").next() {
        bail!("benchmark failed in the guest: {}", f["error"]);
    }
    let rec = vm
        .of_event("bench")
        .find(|r| r["name"] == name)
        .cloned()
        .with_context(|| {
            format!(
                "guest reported no {name} result (see {})",
                vm.console_log.display()
            )
        })?;
    println!(
        "kernel {} ({}), {} emulation",
        k.release,
        k.packages.join(", "),
        vm.accel
    );
    Ok(rec)
}

pub fn fault_overhead(kernel: &str, verbose: bool) -> Result<()> {
    let r = vm_bench("fault-overhead", kernel, verbose)?;
    let ns = |k: &str| -> Vec<f64> {
        r[k].as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (mut without, mut with, mut kernel_only) =
        (ns("without_ns"), ns("with_ns"), ns("kernel_only_ns"));
    let pages = r["pages_per_round"].as_f64().unwrap_or(16384.0);
    if without.is_empty() || with.is_empty() {
        bail!("benchmark returned no rounds");
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.1}", x / 1e6))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("touch 64 MiB of a fresh DAX mapping, 4 KiB faults ({pages} faults per round)");
    println!("  without agent (ms): {}", fmt(&without));
    println!("  with agent    (ms): {}", fmt(&with));
    println!("  reader stopped(ms): {}", fmt(&kernel_only));
    let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let (bw, bo, bk) = (min(&with), min(&without), min(&kernel_only));
    let (mw, mo, mk) = (
        median(&mut with),
        median(&mut without),
        median(&mut kernel_only),
    );
    println!(
        "  median: {:.1} ms without, {:.1} ms with -> {:.0} vs {:.0} faults/s",
        mo / 1e6,
        mw / 1e6,
        pages / (mo / 1e9),
        pages / (mw / 1e9)
    );
    println!(
        "  ratio with/without: {:.3} (agent cost {:+.1}% of fault time); agent saw {} fault events, dropped {}",
        mw / mo,
        (mw / mo - 1.0) * 100.0,
        r["agent_events"],
        r["agent_dropped"]
    );
    println!(
        "  best rounds: {:.1} ms without, {:.1} ms with, {:.1} ms reader stopped -> ratio {:.3} \
         (emulation noise only ever adds time, so the best rounds are the steadiest estimate)",
        bo / 1e6,
        bw / 1e6,
        bk / 1e6,
        bw / bo
    );
    println!(
        "  ratio kernel programs only/without: {:.3} ({:+.1}%): the rest is the agent's userspace \
         competing for the VM's two emulated CPUs",
        mk / mo,
        (mk / mo - 1.0) * 100.0
    );
    Ok(())
}

pub fn holders(kernel: &str, verbose: bool) -> Result<()> {
    eprintln!("bench: holder map on the host (synthetic)");
    crate::cmd::run_visible(
        std::process::Command::new("cargo")
            .current_dir(paths::workspace())
            .args(["bench", "-q", "-p", "dax-probe", "--bench", "holders"]),
    )?;
    let r = vm_bench("holders", kernel, verbose)?;
    let ms = |k: &str| -> Vec<f64> {
        r[k].as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (mut m, mut s, mut f, mut b) = (
        ms("monitor_ms"),
        ms("scan_ms"),
        ms("fuser_ms"),
        ms("agent_start_ms"),
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "who maps /dev/pmem0, {} processes mapping a DAX file (ms per command)",
        r["processes"]
    );
    println!("  dax-probe holders (monitor): {}", fmt(&m));
    println!("  dax-probe holders --scan:    {}", fmt(&s));
    println!("  fuser -m (psmisc):           {}", fmt(&f));
    println!(
        "  dax-probe --version:         {} (process start alone)",
        fmt(&b)
    );
    let mb = median(&mut b);
    let (mm, ms_, mf) = (median(&mut m), median(&mut s), median(&mut f));
    println!(
        "  medians: monitor {mm:.1} ms, own scan {ms_:.1} ms, fuser {mf:.1} ms -> monitor is {:.1}x faster than fuser (target >= 10x), {:.1}x faster than a scan",
        mf / mm,
        ms_ / mm
    );
    println!(
        "  without process start ({mb:.1} ms): monitor {:.1} ms vs fuser {:.1} ms -> {:.1}x",
        mm - mb,
        mf - mb,
        (mf - mb) / (mm - mb).max(0.1)
    );
    println!(
        "  the agent itself answered in {} us (last run)",
        r["agent_answer_us"]
    );
    println!(
        "  answers: {} holders from the monitor, {} pids from fuser",
        r["holders_reported"], r["fuser_pids"]
    );
    Ok(())
}

pub fn reaction(kernel: &str, verbose: bool) -> Result<()> {
    let r = vm_bench("reaction", kernel, verbose)?;
    println!(
        "monitor --enforce (policy: SIGKILL) on an ext4 DAX file; clock: kernel unbind hook -> \
         agent's kill(2) through the pidfd (CLOCK_BOOTTIME, same clock as the hook)"
    );
    println!(
        "  {:>7} {:>5} {:>7} {:>9} {:>14} {:>13} {:>10}",
        "holders", "round", "listed", "signalled", "first (ms)", "last (ms)", "unbind ms"
    );
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    for row in &rows {
        println!(
            "  {:>7} {:>5} {:>7} {:>9} {:>14.2} {:>13.2} {:>10.1}",
            row["holders"].as_u64().unwrap_or(0),
            row["round"].as_u64().unwrap_or(0),
            row["listed"].as_u64().unwrap_or(0),
            row["signalled"].as_u64().unwrap_or(0),
            row["first_ms"].as_f64().unwrap_or(f64::NAN),
            row["last_ms"].as_f64().unwrap_or(f64::NAN),
            row["unbind_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    for n in [1u64, 10, 100] {
        let mut last: Vec<f64> = rows
            .iter()
            .filter(|x| x["holders"].as_u64() == Some(n))
            .filter_map(|x| x["last_ms"].as_f64())
            .collect();
        let mut per: Vec<f64> = rows
            .iter()
            .filter(|x| x["holders"].as_u64() == Some(n))
            .filter_map(|x| {
                let (f, l) = (x["first_ms"].as_f64()?, x["last_ms"].as_f64()?);
                (n > 1).then(|| (l - f) / (n - 1) as f64)
            })
            .collect();
        println!(
            "  {n:>3} holders: last signalled {:.2} ms after the hook (median of rounds; target \
             <= 10 ms for 100){}",
            median(&mut last),
            if per.is_empty() {
                String::new()
            } else {
                format!("; {:.3} ms per extra holder", median(&mut per))
            }
        );
    }
    Ok(())
}
