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
    vm_bench_with(name, kernel, "", verbose)
}

fn vm_bench_with(name: &str, kernel: &str, extra: &str, verbose: bool) -> Result<Value> {
    let payload = harness::payload(verbose)?;
    let guest = harness::guest(kernel, &format!("bench-{name}"), &payload, false)?;
    let k = &guest.kernel;
    eprintln!("bench: booting {} for {name}", k.release);
    let append = format!("daxprobe.mode=bench daxprobe.bench={name} {extra}");
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

/// Median and 95% bootstrap interval of the median of `v` (2,000 resamples, fixed seed so a
/// rerun on the same figures prints the same interval).
fn median_ci(v: &[f64]) -> (f64, f64, f64) {
    let mut m = v.to_vec();
    let mid = median(&mut m);
    if v.len() < 2 {
        return (mid, mid, mid);
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut meds: Vec<f64> = (0..2000)
        .map(|_| {
            let mut s: Vec<f64> = (0..v.len())
                .map(|_| v[(next() % v.len() as u64) as usize])
                .collect();
            median(&mut s)
        })
        .collect();
    meds.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (mid, meds[50], meds[1949])
}

/// Sum of `run_count` and `run_time_ns` per program over rounds.
fn program_totals(rows: &[&Value], key: &str) -> Vec<(String, u64, u64)> {
    let mut t: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for r in rows {
        for p in r[key].as_array().into_iter().flatten() {
            let e = t
                .entry(p["name"].as_str().unwrap_or("?").to_string())
                .or_default();
            e.0 += p["run_count"].as_u64().unwrap_or(0);
            e.1 += p["run_time_ns"].as_u64().unwrap_or(0);
        }
    }
    t.into_iter().map(|(n, (c, ns))| (n, c, ns)).collect()
}

pub fn fault_overhead(kernel: &str, pairs: u32, modes: &str, verbose: bool) -> Result<()> {
    let r = vm_bench_with(
        "fault-overhead",
        kernel,
        &format!("daxprobe.pairs={pairs} daxprobe.modes={modes}"),
        verbose,
    )?;
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        bail!("benchmark returned no rounds");
    }
    let bytes = r["bytes_per_round"].as_f64().unwrap_or(64.0 * 1048576.0);
    println!(
        "touch {} MiB of a fresh mapping per round; {} pairs per mode, conditions in rotating \
         order within each pair; medians with 95% bootstrap intervals",
        bytes / 1048576.0,
        r["pairs"]
    );
    println!(
        "  none: no program; floor: an empty program on the DAX fault tracepoints; agent: \
         dax-probe monitor, free to run on either vCPU; pinned: agent on vCPU 1, toucher on 0"
    );
    let mut seen_modes: Vec<String> = Vec::new();
    for row in &rows {
        let m = row["mode"].as_str().unwrap_or("?").to_string();
        if !seen_modes.contains(&m) {
            seen_modes.push(m);
        }
    }
    for mode in &seen_modes {
        let mine: Vec<&Value> = rows.iter().filter(|x| x["mode"] == mode.as_str()).collect();
        let col = |k: &str| -> Vec<f64> { mine.iter().filter_map(|x| x[k].as_f64()).collect() };
        // Per-pair ratios: each pair shares the emulator's state of the moment.
        let ratio = |a: &str, b: &str| -> Vec<f64> {
            mine.iter()
                .filter_map(|x| Some(x[a].as_f64()? / x[b].as_f64()?))
                .collect()
        };
        println!("\n  mode {mode}:");
        for (k, label) in [
            ("none_ns", "none  "),
            ("floor_ns", "floor "),
            ("agent_ns", "agent "),
            ("pinned_ns", "pinned"),
        ] {
            let v = col(k);
            if v.is_empty() {
                continue;
            }
            let (m, lo, hi) = median_ci(&v);
            println!(
                "    {label} {:>8.1} ms  [{:.1}, {:.1}]",
                m / 1e6,
                lo / 1e6,
                hi / 1e6
            );
        }
        for (a, b, label) in [
            ("floor_ns", "none_ns", "floor/none "),
            ("agent_ns", "none_ns", "agent/none "),
            ("agent_ns", "floor_ns", "agent/floor"),
            ("pinned_ns", "none_ns", "pinned/none"),
        ] {
            let v = ratio(a, b);
            if v.is_empty() {
                continue;
            }
            let (m, lo, hi) = median_ci(&v);
            println!("    {label} {m:.3}  [{lo:.3}, {hi:.3}]");
        }
        let mut recs = col("agent_records");
        let mut faults = col("agent_faults");
        let mut lines = col("agent_lines");
        let mut line_faults = col("agent_line_faults");
        let mut pmd = col("agent_line_pmd_faults");
        let cpu: f64 = col("agent_cpu_ns").iter().sum();
        // Per fault the agent reported (its lines' pages), not per fault the kernel's
        // counter saw: that one also counts faults of other processes meanwhile.
        let reported: f64 = col("agent_line_faults").iter().sum();
        let fsum: f64 = if reported > 0.0 {
            reported
        } else {
            faults.iter().sum()
        };
        if !recs.is_empty() {
            println!(
                "    ring records per round {:.0} (target for seq <= 64; per-fault: {:.0}), \
                 fault lines {:.0} reporting {:.0} faults ({:.0} of them 2 MiB), the kernel's \
                 counter {:.0}; dropped {}",
                median(&mut recs),
                bytes / 4096.0,
                median(&mut lines),
                median(&mut line_faults),
                median(&mut pmd),
                median(&mut faults),
                col("agent_dropped").iter().sum::<f64>()
            );
            if fsum > 0.0 {
                println!(
                    "    agent CPU {:.0} ns per reported fault (all threads, schedstat; \
                     includes its poll and the 400 ms catch-up)",
                    cpu / fsum
                );
            }
        }
        for (key, who) in [("agent_programs", "agent"), ("floor_programs", "floor")] {
            let t = program_totals(&mine, key);
            let runs: u64 = t.iter().map(|p| p.1).sum();
            for (name, c, ns) in &t {
                println!(
                    "    {who} program {name:<28} {c:>9} runs {:>8.0} ns/run",
                    *ns as f64 / (*c).max(1) as f64
                );
            }
            if fsum > 0.0 && key == "agent_programs" {
                println!(
                    "    agent programs run per fault: {:.2}",
                    runs as f64 / fsum
                );
            }
        }
    }
    println!(
        "\n  TCG note: emulation multiplies every instruction, kernel and user alike, so ratios \
         hold better than absolute times; the agent's userspace competes with the toucher for \
         the two emulated CPUs (the pinned figure isolates that)."
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
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(!rows.is_empty(), "the holders bench sent no rows: {r}");
    for row in &rows {
        let ms = |k: &str| -> Vec<f64> {
            row[k]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        let (m, s, f, b) = (
            ms("monitor_ms"),
            ms("scan_ms"),
            ms("fuser_ms"),
            ms("agent_start_ms"),
        );
        let ci = |v: &[f64]| {
            let (mid, lo, hi) = median_ci(v);
            format!("{mid:8.1} [{lo:.1}-{hi:.1}]")
        };
        println!(
            "who maps /dev/pmem0, {} processes mapping a DAX file ({} rounds, the four \
             interleaved; ms per command, median [95% CI]; agent caught up: {})",
            row["processes"],
            m.len(),
            row["caught_up"]
        );
        println!("  dax-probe holders (monitor): {}", ci(&m));
        println!("  dax-probe holders --scan:    {}", ci(&s));
        println!("  fuser -m (psmisc):           {}", ci(&f));
        println!(
            "  dax-probe --version:         {} (process start alone)",
            ci(&b)
        );
        // Per-round ratios: each round ran the four back to back.
        let ratios: Vec<f64> = f.iter().zip(&m).map(|(f, m)| f / m.max(0.01)).collect();
        let (rm, rlo, rhi) = median_ci(&ratios);
        let (mm, mf, mb) = (
            median(&mut m.clone()),
            median(&mut f.clone()),
            median(&mut b.clone()),
        );
        println!(
            "  fuser / monitor per round: {rm:.1}x [{rlo:.1}-{rhi:.1}] (target >= 20x); \
             a scan is {:.1}x the monitor",
            median(&mut s.clone()) / mm.max(0.01)
        );
        println!(
            "  without process start ({mb:.1} ms): monitor {:.1} ms vs fuser {:.1} ms -> {:.1}x",
            mm - mb,
            mf - mb,
            (mf - mb) / (mm - mb).max(0.1)
        );
        println!(
            "  the agent itself answered in {} us (last answer); {} holders from the monitor, \
             {} pids from fuser",
            row["agent_answer_us"], row["holders_reported"], row["fuser_pids"]
        );
    }
    println!(
        "  TCG note: process start is emulated too (the --version line): it caps the \
         end-to-end ratio; the line without it is the query itself."
    );
    Ok(())
}

pub fn reaction(kernel: &str, verbose: bool) -> Result<()> {
    // The same pipeline natively first: its figure is no TCG artefact.
    eprintln!("bench: the departure pipeline on the host (real processes and pidfds)");
    crate::cmd::run_visible(
        std::process::Command::new("cargo")
            .current_dir(paths::workspace())
            .args(["bench", "-q", "-p", "dax-probe", "--bench", "reaction"]),
    )?;
    let r = vm_bench("reaction", kernel, verbose)?;
    println!(
        "monitor --enforce (policy: SIGKILL) on an ext4 DAX file; clock: kernel unbind hook -> \
         agent's kill(2) through the pidfd (CLOCK_BOOTTIME, same clock as the hook)"
    );
    println!(
        "  steps after the hook: read (the agent read the ring), listed (holders listed from the \
         map), fenced, verdict (first holder proven), first and last signal; floor: as many \
         holders killed by a bare pidfd_open + pidfd_send_signal loop in the same boot"
    );
    println!(
        "  {:>7} {:>5} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>10} {:>10} {:>9}",
        "holders",
        "round",
        "listed",
        "signalled",
        "read ms",
        "listed ms",
        "fenced ms",
        "verdict ms",
        "first ms",
        "last ms",
        "unbind ms",
        "floor ms"
    );
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    for row in &rows {
        println!(
            "  {:>7} {:>5} {:>7} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>11.2} {:>11.2} {:>10.2} {:>10.1} {:>9.2}",
            row["holders"].as_u64().unwrap_or(0),
            row["round"].as_u64().unwrap_or(0),
            row["listed"].as_u64().unwrap_or(0),
            row["signalled"].as_u64().unwrap_or(0),
            row["received_ms"].as_f64().unwrap_or(f64::NAN),
            row["listed_ms"].as_f64().unwrap_or(f64::NAN),
            row["fenced_ms"].as_f64().unwrap_or(f64::NAN),
            row["first_verdict_ms"].as_f64().unwrap_or(f64::NAN),
            row["first_ms"].as_f64().unwrap_or(f64::NAN),
            row["last_ms"].as_f64().unwrap_or(f64::NAN),
            row["unbind_ms"].as_f64().unwrap_or(f64::NAN),
            row["floor_ms"].as_f64().unwrap_or(f64::NAN)
        );
        if let Some(s) = row["skipped"].as_object().filter(|s| !s.is_empty()) {
            println!("          not signalled: {}", Value::Object(s.clone()));
        }
    }
    for n in [1u64, 10, 100, 1000] {
        let of_n: Vec<&Value> = rows
            .iter()
            .filter(|x| x["holders"].as_u64() == Some(n))
            .collect();
        let mut last: Vec<f64> = of_n.iter().filter_map(|x| x["last_ms"].as_f64()).collect();
        let mut floor: Vec<f64> = of_n
            .iter()
            .filter_map(|x| x["floor_ms"].as_f64())
            .filter(|f| f.is_finite())
            .collect();
        // Every holder signalled before the unbind returned (the VM target).
        let in_time = of_n
            .iter()
            .filter(|x| {
                x["signalled"].as_u64() == Some(n)
                    && x["last_ms"].as_f64() < x["unbind_ms"].as_f64()
            })
            .count();
        let mut per: Vec<f64> = rows
            .iter()
            .filter(|x| x["holders"].as_u64() == Some(n))
            .filter_map(|x| {
                let (f, l) = (x["first_ms"].as_f64()?, x["last_ms"].as_f64()?);
                (n > 1).then(|| (l - f) / (n - 1) as f64)
            })
            .collect();
        println!(
            "  {n:>4} holders: last signalled {:.2} ms after the hook (median of rounds; target \
             <= 30 ms for 100 in the VM) beside a floor of {:.2} ms for their kills alone; all \
             signalled sooner after the hook than the unbind took in {in_time} of {} rounds{}",
            median(&mut last),
            median(&mut floor),
            of_n.len(),
            if per.is_empty() {
                String::new()
            } else {
                format!("; {:.3} ms per extra holder", median(&mut per))
            }
        );
    }
    println!(
        "  TCG note: every syscall, fdatasync and kill is emulated (the floor column is what TCG \
         makes of the kills alone); the host-native run above is the pipeline without TCG."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_brackets_the_median_and_narrows_with_agreement() {
        let spread: Vec<f64> = (0..30).map(|i| 1.0 + (i % 7) as f64 * 0.05).collect();
        let (m, lo, hi) = median_ci(&spread);
        assert!(lo <= m && m <= hi && lo < hi, "{lo} {m} {hi}");
        let tight = vec![1.02; 30];
        assert_eq!(median_ci(&tight), (1.02, 1.02, 1.02));
        // Deterministic: the same figures print the same interval.
        assert_eq!(median_ci(&spread), (m, lo, hi));
        assert_eq!(median_ci(&[3.0]), (3.0, 3.0, 3.0));
    }
}
