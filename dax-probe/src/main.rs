//! Command line: parse, dispatch, map errors to exit codes. Nothing else lives here.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, Subcommand};
use dax_probe::{
    control, exit, history, incident, policy, policy::signal::Signal, probe, topology::Topology, ui,
};

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
        /// One record per fault instead of one per run of successive faults (debugging; it
        /// costs a ring record and the agent's time for every page).
        #[arg(long)]
        per_fault: bool,
        /// Answer `dax-probe holders` on this socket.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Do not open the control socket.
        #[arg(long)]
        no_socket: bool,
        /// Compare the holder map with every process's page tables this often.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        reconcile_secs: u64,
        /// Act on departing devices as the policy says (signal their holders).
        #[arg(long)]
        enforce: bool,
        /// Policy file (TOML; see contrib/policy.toml).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Audit log of every enforcement decision and signal (JSON lines).
        #[arg(long, value_name = "PATH", default_value = policy::audit::DEFAULT_AUDIT_LOG)]
        audit_log: PathBuf,
        /// Record incidents in this SQLite database (default $DAX_PROBE_HISTORY_DB, else
        /// /var/lib/dax-probe/incidents.db).
        #[arg(long, value_name = "PATH")]
        history_db: Option<PathBuf>,
        /// Record no incident history.
        #[arg(long, conflicts_with = "history_db")]
        no_history: bool,
        /// Prune incidents older than this at start (e.g. 90d, 2w, 12h).
        #[arg(long, value_name = "AGE", default_value = history::DEFAULT_KEEP, value_parser = history::parse_age)]
        history_keep: Duration,
        /// Serve Prometheus metrics (OpenMetrics, GET /metrics) on [ADDR:]PORT; without an
        /// address on 127.0.0.1 only (0.0.0.0:9464 for every interface).
        #[arg(long, value_name = "[ADDR:]PORT")]
        metrics: Option<String>,
    },
    /// Fence a device, signal its holders, wait, escalate, verify nobody maps it, and with
    /// --unbind unmount and unbind it.
    Drain {
        /// pmem0, /dev/pmem0, namespace0.0, pfn0.0, /dev/dax0.0.
        device: String,
        /// First signal (default from the policy, else TERM).
        #[arg(long, value_parser = parse_signal)]
        signal: Option<Signal>,
        /// Time to leave before escalating, e.g. 10s, 500ms (default from policy, else 10s).
        #[arg(long, value_parser = parse_grace)]
        grace: Option<Duration>,
        /// Escalation signal, or `none` (default from policy, else KILL).
        #[arg(long, value_parser = parse_then)]
        then: Option<Then>,
        /// Also unmount the device's file system and unbind the device.
        #[arg(long)]
        unbind: bool,
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        #[arg(long, value_name = "PATH", default_value = policy::audit::DEFAULT_AUDIT_LOG)]
        audit_log: PathBuf,
        #[arg(long)]
        json: bool,
        /// A running monitor's control socket: the unbind is asked of it (its unbind guard
        /// lets only the agent's own write through).
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Find page-table entries that still point into a departed device (exit 1 if any).
    Audit {
        #[arg(long)]
        json: bool,
        /// Departures recorded by the monitor.
        #[arg(long, value_name = "PATH", default_value = incident::DEFAULT_DEPARTED)]
        departed: PathBuf,
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
        /// Only processes whose cgroup matches: a glob (`*`, `?`) on the whole cgroup path,
        /// else a substring of the path, the container id or the pod UID.
        #[arg(long, value_name = "PATTERN")]
        cgroup: Option<String>,
        /// The monitor's control socket.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Known-bad media of every pmem/dax device (the kernel's badblocks lists): physical
    /// range, the files and offsets (or free space / metadata) on it, and who maps it now
    /// (exit 65 if a list is unreadable, 66 for an unknown device).
    Badblocks {
        /// pmem0, dax1.0, namespace0.0 or region0; all devices when left out.
        device: Option<String>,
        #[arg(long)]
        json: bool,
        /// The monitor's control socket.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Past incidents the monitor recorded (departures, memory failures, enforcement, stale
    /// mappings), newest first, with their files and holders.
    History {
        /// Only incidents this recent (e.g. 7d, 2w, 12h).
        #[arg(long, value_name = "AGE", value_parser = history::parse_age)]
        since: Option<Duration>,
        /// Only incidents of this device (pmem1, /dev/pmem1).
        #[arg(long, value_name = "NAME")]
        device: Option<String>,
        #[arg(long)]
        json: bool,
        /// Run SQLite's integrity check on the database instead (prints `ok`).
        #[arg(long, conflicts_with_all = ["since", "device", "json"])]
        check: bool,
        /// The database (default $DAX_PROBE_HISTORY_DB, else /var/lib/dax-probe/incidents.db).
        #[arg(long, value_name = "PATH")]
        history_db: Option<PathBuf>,
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
    /// Dashboard: devices, who maps them, fault rates, events, drain (live needs root;
    /// --replay plays a `monitor --json` recording anywhere).
    Tui {
        /// Play this `monitor --json` recording instead of watching this machine.
        #[arg(long, value_name = "FILE")]
        replay: Option<PathBuf>,
        /// Replay speed: 10 plays ten times faster.
        #[arg(long, value_name = "N", default_value_t = 1.0, requires = "replay")]
        speed: f64,
        /// Start with this device selected (pmem0, dax0.0).
        #[arg(long, value_name = "NAME")]
        device: Option<String>,
        /// Policy for drains started with `d` (signal, grace, escalation, exclusions).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Size of the kernel→agent event ring buffer (power of two).
        #[arg(long, value_name = "KIB", default_value_t = dax_probe_common::EVENTS_RING_BYTES / 1024)]
        ring_size_kib: u32,
        /// Compare the holder map with every process's page tables this often.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        reconcile_secs: u64,
        /// Replay only: print the final frame (e.g. 100x30) as text and exit.
        #[arg(long, value_name = "COLSxROWS", value_parser = parse_size, requires = "replay", hide = true)]
        print_frame: Option<(u16, u16)>,
        /// Attach to the monitor answering on this socket; without one, the dashboard
        /// starts an agent of its own.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Print the JSON Schema of every line `monitor --json`, `drain --json` and `audit
    /// --json` print (also in docs/events.schema.json).
    Schema,
    /// Benchmark floor (`cargo xtask bench fault-overhead`): attach nothing but an empty
    /// program to each DAX fault tracepoint until stdin closes, then print their runs.
    #[command(hide = true)]
    BenchFloor,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), or with --dir write one page per subcommand there.
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
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

/// `--then none` or a signal.
#[derive(Clone, Copy, Debug)]
struct Then(Option<Signal>);

fn parse_signal(s: &str) -> Result<Signal, String> {
    s.parse()
        .map_err(|e: policy::signal::BadSignal| e.to_string())
}

fn parse_then(s: &str) -> Result<Then, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Then(None));
    }
    parse_signal(s).map(|x| Then(Some(x)))
}

/// The longest `monitor --duration`.
const MAX_RUN: Duration = Duration::from_secs(365 * 24 * 3600);

fn parse_grace(s: &str) -> Result<Duration, String> {
    policy::signal::parse_duration(s)
}

fn parse_size(s: &str) -> Result<(u16, u16), String> {
    s.split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .filter(|&(w, h)| w > 0 && h > 0)
        .ok_or_else(|| format!("bad size {s:?}: use COLSxROWS, e.g. 100x30"))
}

fn load_policy(path: Option<&std::path::Path>) -> anyhow::Result<Option<policy::Policy>> {
    path.map(|p| {
        policy::config::load(p)
            .map_err(|e| exit::Failure::new(exit::Code::Config, e.to_string()).into())
    })
    .transpose()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let src = probe::live(&cli.root, cli.btf.as_deref(), &cli.skip_hooks);
    match cli.command {
        Command::Monitor {
            json,
            wait,
            duration,
            ring_size_kib,
            per_fault,
            socket,
            no_socket,
            reconcile_secs,
            enforce,
            policy,
            audit_log,
            history_db,
            no_history,
            history_keep,
            metrics,
        } => {
            let ring_bytes = probe::ring_bytes(ring_size_kib)?;
            // Parsed here, not by clap: a bad address is a warning, not a reason to leave
            // the machine unwatched (the agent runs on without metrics).
            let metrics = metrics.as_deref().and_then(|a| {
                dax_probe::metrics::parse_addr(a)
                    .map_err(|e| dax_probe::metrics::warn_unserved(&e))
                    .ok()
            });
            let policy = load_policy(policy.as_deref())?.unwrap_or_default();
            let duration = match duration {
                // Bounded so that `now + duration` is always representable.
                Some(s) if !(s > 0.0 && s <= MAX_RUN.as_secs_f64()) => {
                    return Err(exit::Failure::new(
                        exit::Code::Usage,
                        format!(
                            "--duration must be a positive number of seconds up to {} (a \
                             year), not {s}",
                            MAX_RUN.as_secs()
                        ),
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
                        ring: probe::Ring {
                            bytes: ring_bytes,
                            per_fault,
                        },
                        wait,
                        socket: (!no_socket).then_some(socket),
                        reconcile: Duration::from_secs(reconcile_secs.max(1)),
                        enforce,
                        policy,
                        audit_log,
                        departed: Some(PathBuf::from(incident::DEFAULT_DEPARTED)),
                        history: (!no_history).then(|| history::Settings {
                            path: history::db_path(history_db.as_deref()),
                            keep: history_keep,
                        }),
                        metrics,
                    },
                },
            ))
        }
        Command::Doctor { json } => ui::doctor::run(&src, json),
        Command::History {
            since,
            device,
            json,
            check,
            history_db,
        } => ui::history::run(&ui::history::Options {
            path: history::db_path(history_db.as_deref()),
            since,
            device: device.as_deref(),
            json,
            check,
        }),
        Command::Holders {
            target,
            json,
            pages,
            scan,
            cgroup,
            socket,
        } => ui::holders::run(&ui::holders::Options {
            target: &target,
            json,
            pages,
            scan,
            cgroup: cgroup.as_deref(),
            socket: &socket,
            root: &cli.root,
        }),
        Command::Badblocks {
            device,
            json,
            socket,
        } => ui::badblocks::run(&ui::badblocks::Options {
            device: device.as_deref(),
            json,
            socket: &socket,
            root: &cli.root,
        }),
        Command::Devices { json } => ui::devices::run(&Topology::read(&cli.root), json),
        Command::Drain {
            device,
            signal,
            grace,
            then,
            unbind,
            policy,
            audit_log,
            json,
            socket,
        } => ui::drain::run(
            &src,
            &ui::drain::Options {
                device: &device,
                signal,
                grace,
                then: then.map(|t| t.0),
                unbind,
                policy: load_policy(policy.as_deref())?,
                audit_log,
                json,
                ring_bytes: dax_probe_common::EVENTS_RING_BYTES,
                socket,
            },
        ),
        Command::Audit { json, departed } => ui::audit::run(&src, json, &departed),
        Command::Tui {
            replay,
            speed,
            device,
            policy,
            ring_size_kib,
            reconcile_secs,
            print_frame,
            socket,
        } => {
            let ring_bytes = probe::ring_bytes(ring_size_kib)?;
            let loaded = load_policy(policy.as_deref())?.unwrap_or_default();
            ui::tui::run(
                &src,
                ui::tui::Options {
                    replay,
                    speed,
                    device,
                    policy: loaded.clone(),
                    policy_path: policy,
                    print_frame,
                    socket,
                    agent: dax_probe::agent::Options {
                        ring: probe::Ring {
                            bytes: ring_bytes,
                            per_fault: false,
                        },
                        wait: true,
                        // The dashboard watches; the monitor service answers `holders`,
                        // enforces and keeps the departed record.
                        socket: None,
                        reconcile: Duration::from_secs(reconcile_secs.max(1)),
                        enforce: false,
                        policy: loaded,
                        audit_log: PathBuf::from(policy::audit::DEFAULT_AUDIT_LOG),
                        departed: None,
                        history: None,
                        metrics: None,
                    },
                },
            )
        }
        Command::BenchFloor => probe::floor::run(&src),
        Command::Schema => {
            print!("{}", dax_probe::schema::json_schema());
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "dax-probe",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir: None } => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(Cli::command(), &dir)?;
            Ok(())
        }
    }
}
