//! `cargo xtask fuzz`: every cargo-fuzz target (fuzz/) for a bounded time; a crash fails.
//! (`cargo xtask test` runs the same bodies on the corpora and their mutations without
//! libFuzzer: dax-probe/tests/fuzz_smoke.rs.)
//!
//! Seeds live in the repo (fuzz/corpus/TARGET) and are only read; what libFuzzer finds goes
//! to target/fuzz/corpus/TARGET, so a run never changes the tree. Crash inputs are kept in
//! fuzz/artifacts/TARGET (cargo-fuzz's place) and named in the error.

use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::paths;

/// The targets: fuzz/Cargo.toml's binaries (dax-probe's fuzz_smoke test checks they are
/// dax_probe::fuzzing::TARGETS, which `cargo test` runs on the corpora).
fn targets() -> Result<Vec<String>> {
    let p = paths::workspace().join("fuzz/Cargo.toml");
    let toml = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
    Ok(bins(&toml))
}

fn bins(toml: &str) -> Vec<String> {
    toml.split("[[bin]]")
        .skip(1)
        .filter_map(|b| b.lines().find_map(|l| l.strip_prefix("name = ")))
        .map(|n| n.trim_matches('"').to_string())
        .collect()
}

pub struct Options {
    pub seconds: u64,
    pub target: Option<String>,
}

/// One target's run.
pub struct Outcome {
    pub target: String,
    pub runs: u64,
    pub seconds: f64,
}

pub fn run(opts: &Options) -> Result<Vec<Outcome>> {
    let all = targets()?;
    let targets: Vec<&str> = match &opts.target {
        Some(t) if all.contains(t) => vec![t.as_str()],
        Some(t) => bail!("unknown fuzz target {t:?}: one of {}", all.join(", ")),
        None => all.iter().map(String::as_str).collect(),
    };
    build()?;
    let mut out = Vec::new();
    for t in targets {
        let o = run_target(t, opts.seconds)?;
        eprintln!(
            "fuzz: {:<12} {:>10} executions in {:.0}s, no crash",
            o.target, o.runs, o.seconds
        );
        out.push(o);
    }
    Ok(out)
}

fn cargo_fuzz() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(paths::workspace().join("fuzz"))
        .args(["+nightly", "fuzz"])
        // The fuzzed crate needs no kernel programs: an empty object is embedded.
        .env("DAX_PROBE_EBPF", "placeholder");
    c
}

fn build() -> Result<()> {
    eprintln!("fuzz: building the targets (nightly, sanitizers)");
    crate::cmd::run_visible(cargo_fuzz().arg("build"))
}

fn run_target(t: &str, seconds: u64) -> Result<Outcome> {
    let ws = paths::workspace();
    let found = ws.join("target/fuzz/corpus").join(t);
    std::fs::create_dir_all(&found)?;
    let seeds = ws.join("fuzz/corpus").join(t);
    let start = Instant::now();
    let out = cargo_fuzz()
        .arg("run")
        .arg(t)
        .arg(&found)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run cargo fuzz run {t}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {t} failed ({}); the crashing input is in fuzz/artifacts/{t}:\n{}",
            out.status,
            tail.join("\n")
        );
    }
    Ok(Outcome {
        target: t.to_string(),
        runs: runs_of(&log).unwrap_or(0),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// libFuzzer's `Done 123 runs in 10 second(s)` or `stat::number_of_executed_units: 123`.
fn runs_of(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        if let Some(n) = l.strip_prefix("stat::number_of_executed_units:") {
            return n.trim().parse().ok();
        }
        l.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targets_are_the_cargo_fuzz_binaries() {
        let t = targets().unwrap();
        assert!(t.contains(&"decode".to_string()) && t.len() >= 5, "{t:?}");
        assert_eq!(
            bins("[[bin]]\nname = \"a\"\npath = \"x\"\n[[bin]]\nname = \"b\""),
            ["a", "b"]
        );
    }

    #[test]
    fn reads_libfuzzer_counts() {
        assert_eq!(
            runs_of("#1 INITED\nDone 4242 runs in 12 second(s)\n"),
            Some(4242)
        );
        assert_eq!(
            runs_of("Done 1 runs in 1 second(s)\nstat::number_of_executed_units: 99\n"),
            Some(99)
        );
        assert_eq!(runs_of("nothing"), None);
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        let ws = paths::workspace();
        for t in targets().unwrap() {
            assert!(
                ws.join(format!("fuzz/fuzz_targets/{t}.rs")).is_file(),
                "{t}"
            );
            let seeds = std::fs::read_dir(ws.join("fuzz/corpus").join(&t))
                .unwrap()
                .count();
            assert!(seeds > 0, "{t} has no seeds");
        }
    }
}
