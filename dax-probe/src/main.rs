//! Command line: parse, dispatch, map errors to exit codes. Nothing else lives here.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use dax_probe::{control, exit, probe, topology::Topology, ui};

#[derive(Parser)]
#[command(
    name = "dax-probe",
    version,
    about = "Watch and police DAX mappings of persistent memory"
)]
struct Cli {
    /// Read /proc and /sys below this directory (for testing and offline analysis).
    #[arg(long, global = true, default_value = "/", hide = true)]
    root: PathBuf,
    /// Use this BTF file instead of /sys/kernel/btf/vmlinux.
    #[arg(long, global = true, value_name = "FILE")]
    btf: Option<PathBuf>,
    /// Never use these attach types (comma list: tp_btf, raw_tp, fentry, kprobe); the next
    /// way to observe each concern is used instead.
    #[arg(long, global = true, value_delimiter = ',', value_name = "KINDS")]
    skip_hooks: Vec<probe::plan::AttachKind>,
    /// More logging (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream DAX events live (needs root).
    Monitor {
        /// One JSON object per line, stable field names.
        #[arg(long)]
        json: bool,
        /// Keep running when no DAX device exists yet.
        #[arg(long)]
        wait: bool,
        /// Stop after this many seconds instead of at Ctrl-C.
        #[arg(long, value_name = "SECONDS")]
        duration: Option<f64>,
        /// Size of the kernel→agent event ring buffer (power of two).
        #[arg(long, value_name = "KIB", default_value_t = dax_probe_common::EVENTS_RING_BYTES / 1024)]
        ring_size_kib: u32,
        /// Answer `dax-probe holders` on this socket.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Do not open the control socket.
        #[arg(long)]
        no_socket: bool,
        /// Compare the holder map with every process's page tables this often.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        reconcile_secs: u64,
    },
    /// Who maps a DAX device, file, mount point or pfn right now (asks the running monitor,
    /// else scans every process; needs root).
    Holders {
        /// pmem0, /dev/pmem0, namespace0.0, pfn0.0, /dev/dax0.0, a file, a mount point, a pfn
        /// (0x1234), a pfn range (0x1000-0x2000 or 0x1000+512), or `all`.
        target: String,
        #[arg(long)]
        json: bool,
        /// List every extent (virtual address, pfn, offset, pages).
        #[arg(long)]
        pages: bool,
        /// Scan procfs even when a monitor is running.
        #[arg(long)]
        scan: bool,
        /// The monitor's control socket.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show what this kernel offers and which hooks the agent uses.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// List pmem namespaces, their modes, physical ranges and DAX mounts.
    Devices {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A finding (e.g. no holders) carries no message: the output already said it.
            let msg = format!("{e:#}");
            if !msg.is_empty() {
                eprintln!("dax-probe: error: {msg}");
            }
            ExitCode::from(exit::code_of(&e) as u8)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let src = probe::live(&cli.root, cli.btf.as_deref(), &cli.skip_hooks);
    match cli.command {
        Command::Monitor {
            json,
            wait,
            duration,
            ring_size_kib,
            socket,
            no_socket,
            reconcile_secs,
        } => {
            let ring_bytes = probe::ring_bytes(ring_size_kib)?;
            let duration = match duration {
                Some(s) if !(s > 0.0 && s.is_finite()) => {
                    return Err(exit::Failure::new(
                        exit::Code::Usage,
                        format!("--duration must be a positive number of seconds, not {s}"),
                    )
                    .into());
                }
                d => d.map(Duration::from_secs_f64),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(ui::monitor::run(
                &src,
                ui::monitor::Options {
                    json,
                    duration,
                    agent: dax_probe::agent::Options {
                        ring_bytes,
                        wait,
                        socket: (!no_socket).then_some(socket),
                        reconcile: Duration::from_secs(reconcile_secs.max(1)),
                    },
                },
            ))
        }
        Command::Doctor { json } => ui::doctor::run(&src, json),
        Command::Holders {
            target,
            json,
            pages,
            scan,
            socket,
        } => ui::holders::run(&ui::holders::Options {
            target: &target,
            json,
            pages,
            scan,
            socket: &socket,
            root: &cli.root,
        }),
        Command::Devices { json } => ui::devices::run(&Topology::read(&cli.root), json),
    }
}
