//! `cargo xtask`: developer tasks. See README.md for the two commands that matter.

mod bench;
mod cmd;
mod deb;
mod demo;
mod dist;
mod fuzz;
mod harness;
mod initramfs;
mod kernels;
mod matrix;
mod mirror;
mod paths;
mod prom;
mod qemu;
mod setup;
mod vmtest;

use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "dax-probe developer tasks")]
struct Cli {
    /// Show what the tasks do (setup report, guest console).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check and install the prerequisites (nightly rust-src, bpf-linker, QEMU, mkfs tools).
    Setup,
    /// The main job: live monitor on a pmem host, else the demo VM.
    Demo {
        /// Debian kernel line for the demo VM.
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// Boot the demo VM even on a host with pmem.
        #[arg(long)]
        vm: bool,
    },
    /// Every test: unit tests, then the VM scenarios on all delivered kernels.
    Test,
    /// Run the scenarios in QEMU on Debian kernels.
    VmTest {
        /// 5.10, 6.1, 6.12, 7, a comma list, or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Run only this scenario (comma list).
        #[arg(long)]
        scenario: Option<String>,
        /// Ask Debian's archive for newer kernels even if the cached lists are fresh.
        #[arg(long)]
        refresh: bool,
        /// Only boot each kernel (modules, nvdimms) and count guests that die, no retry.
        #[arg(long, conflicts_with = "scenario")]
        boot_only: bool,
        /// With --boot-only: boots per kernel.
        #[arg(long, default_value_t = 5, requires = "boot_only")]
        repeat: u32,
    },
    /// A root shell in the test VM.
    Vm {
        #[arg(long, default_value = "6.12")]
        kernel: String,
    },
    /// Release binary, man pages, completions, contrib files and a lintian-checked .deb in
    /// target/dist.
    Dist,
    /// Regenerate the README's support matrix from the last vm-test of every kernel line.
    Matrix,
    /// Every cargo-fuzz target (fuzz/) for a bounded time; fails on a crash.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Benchmarks (printed ratios, never asserted).
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Fault cost: no program, the floor (an empty program) and the agent, in paired
    /// rounds in one VM boot, with the kernel's per-program run times.
    FaultOverhead {
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// Pairs of rounds per mode (each pair runs every condition once).
        #[arg(long, default_value_t = 30)]
        pairs: u32,
        /// Modes (comma list of seq, rand, pmd, mt, anon).
        #[arg(long, default_value = "seq,rand,pmd,mt,anon")]
        modes: String,
    },
    /// Holder map memory/speed (host) and `holders` vs `fuser` with 500 and 1,000 processes (VM).
    Holders {
        #[arg(long, default_value = "6.12")]
        kernel: String,
    },
    /// Dashboard frame cost at 80x24, 120x40 and 200x60 (host).
    Tui,
    /// `monitor --enforce`: the departure pipeline natively on the host beside a bare
    /// pidfd-kill floor, then in the VM unbind hook to last holder signalled, 1/10/100/1000
    /// holders.
    Reaction {
        #[arg(long, default_value = "6.12")]
        kernel: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let v = cli.verbose;
    match cli.command {
        Cmd::Setup => setup::ensure(true),
        Cmd::Demo { kernel, vm } => demo::run(&kernel, vm, v),
        Cmd::Test => {
            setup::ensure(v)?;
            eprintln!("test: unit tests");
            cmd::run_visible(
                Command::new("cargo")
                    .current_dir(paths::workspace())
                    .arg("test"), // default members: the eBPF crate only builds for BPF
            )?;
            eprintln!("test: Prometheus alert rules and scrape (promtool)");
            prom::check()?;
            eprintln!("test: the Debian package (lintian, install into a scratch root)");
            deb::check(&dist::run()?)?;
            eprintln!("test: VM scenarios on {}", vmtest::ALL.join(", "));
            vmtest::run(&vmtest::Options {
                kernels: vmtest::kernel_list("all")?,
                scenario: None,
                verbose: v,
                refresh: false,
                boot_only: None,
            })
        }
        Cmd::VmTest {
            kernel,
            scenario,
            refresh,
            boot_only,
            repeat,
        } => vmtest::run(&vmtest::Options {
            kernels: vmtest::kernel_list(&kernel)?,
            scenario,
            verbose: v,
            refresh,
            boot_only: boot_only.then_some(repeat),
        }),
        Cmd::Vm { kernel } => demo::shell(&kernel, v),
        Cmd::Dist => dist::run().and_then(|deb| deb::check(&deb)),
        Cmd::Matrix => {
            let report = matrix::from_run_dirs(vmtest::ALL)?;
            let readme = paths::workspace().join("README.md");
            let changed = matrix::update_readme(&readme, &matrix::render(&report))?;
            eprintln!(
                "matrix: README support matrix {}",
                if changed {
                    "changed: review it (git diff README.md)"
                } else {
                    "unchanged"
                }
            );
            Ok(())
        }
        Cmd::Fuzz { seconds, target } => {
            setup::ensure(v)?;
            fuzz::run(&fuzz::Options { seconds, target }).map(|_| ())
        }
        Cmd::Bench { which } => match which {
            BenchCmd::FaultOverhead {
                kernel,
                pairs,
                modes,
            } => bench::fault_overhead(&kernel, pairs, &modes, v),
            BenchCmd::Holders { kernel } => bench::holders(&kernel, v),
            BenchCmd::Reaction { kernel } => bench::reaction(&kernel, v),
            BenchCmd::Tui => crate::cmd::run_visible(
                std::process::Command::new("cargo")
                    .current_dir(paths::workspace())
                    .args(["bench", "-q", "-p", "dax-probe", "--bench", "tui"]),
            ),
        },
    }
}
