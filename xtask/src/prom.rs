//! Host checks of the Prometheus side (`cargo xtask test`): the alert rules parse and fire
//! as their tests say (`promtool check rules`, `promtool test rules`), a scrape of a
//! registry the unit tests fill passes `promtool check metrics`, and a real Prometheus
//! server scrapes the agent's metrics server and stores what it served.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cmd, paths};

/// The unit tests that hand their scrape to promtool when DAX_PROBE_PROMTOOL names it, and
/// the one a real Prometheus server scrapes when DAX_PROBE_PROMETHEUS names it.
const SCRAPE_TESTS: &[&str] = &[
    "agent::event_loop::tests::metrics_count_what_the_flow_saw",
    "agent::event_loop::tests::signals_are_counted_by_origin",
    "metrics::prometheus_scrapes::prometheus_scrapes_and_stores_the_samples",
];

pub fn check() -> Result<()> {
    let promtool = cmd::which("promtool")
        .context("promtool not found (package prometheus; cargo xtask setup installs it)")?;
    let prometheus = cmd::which("prometheus")
        .context("prometheus not found (package prometheus; cargo xtask setup installs it)")?;
    let dir = paths::workspace().join("contrib/prometheus");
    let rules = cmd::run(
        Command::new(&promtool)
            .args(["check", "rules", "alerts.yml"])
            .current_dir(&dir),
    )?;
    let tests = cmd::run(
        Command::new(&promtool)
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(&dir),
    )?;
    eprintln!(
        "prom: alert rules: {}; rule tests: {}",
        rules.lines().last().unwrap_or("").trim(),
        tests.lines().last().unwrap_or("").trim()
    );
    let out = cmd::run(
        Command::new("cargo")
            .current_dir(paths::workspace())
            .env("DAX_PROBE_PROMTOOL", &promtool)
            .env("DAX_PROBE_PROMETHEUS", &prometheus)
            .args(["test", "-p", "dax-probe", "--lib", "--"])
            .args(SCRAPE_TESTS)
            .arg("--exact"),
    )?;
    // A renamed test would leave nothing checked and still pass: count them.
    let want = format!("test result: ok. {} passed", SCRAPE_TESTS.len());
    if !out.contains(&want) {
        bail!("promtool check metrics: expected {want:?} from the scrape tests:\n{out}");
    }
    eprintln!(
        "prom: promtool check metrics accepts the scrapes; a Prometheus server scraped \
         OpenMetrics and stored the samples"
    );
    Ok(())
}
