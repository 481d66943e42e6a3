//! PID 1 of the dax-probe test VM.
//!
//! Mounts the pseudo file systems, loads the nvdimm/DAX modules, turns the emulated nvdimms
//! into fsdax devices with ext4 and xfs mounted `-o dax`, then runs what the kernel command
//! line asks for (`daxprobe.mode=test|demo|bench|shell`) and powers off. Results go to the
//! host through the second serial port (see `report`).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use dax_probe_tests::{
    agent, pmem,
    puppet::{Huge, Puppet},
    report::{self, Outcome},
    scenarios::{self, DaxFs, Env, Target},
    sys,
};
use serde_json::json;

fn main() {
    let result = std::panic::catch_unwind(real_main);
    if let Err(p) = result {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        report::send(json!({"event": "fatal", "error": format!("init panicked: {msg}")}));
    }
    sys::poweroff();
}

fn cmdline_param(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| {
        w.strip_prefix(&format!("daxprobe.{key}="))
            .map(str::to_string)
    })
}

fn real_main() {
    if let Err(e) = mount_pseudo() {
        println!("[dax-vm] {e:#}");
    }
    report::init();
    let cmdline = sys::read("/proc/cmdline").unwrap_or_default();
    let mode = cmdline_param(&cmdline, "mode").unwrap_or_else(|| "test".into());
    report::send(json!({"event": "boot", "kernel": sys::kernel_release(), "mode": mode}));
    println!("[dax-vm] booted {} (mode {mode})", sys::kernel_release());

    let env = match setup(&cmdline) {
        Ok(env) => env,
        Err(e) => {
            report::send(
                json!({"event": "fatal", "error": format!("setup failed: {e:#}"),
                                "dmesg": sys::dmesg_tail(30)}),
            );
            println!("[dax-vm] setup failed: {e:#}");
            report::send(json!({"event": "done"}));
            return;
        }
    };
    // Everything before this line is the kernel's and the harness's (boot, modules, nvdimm
    // discovery): the host retries a guest that dies before it, and fails one that dies after.
    // The clock the guest keeps time with, and what the kernel said about its TSC: under
    // TCG a clocksource switch at run time patches code the other vCPU may be executing.
    let clock = sys::read("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .unwrap_or_default();
    let clock_lines: Vec<String> = sys::dmesg_tail(2000)
        .into_iter()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("tsc") || l.contains("clocksource")
        })
        .take(20)
        .collect();
    println!("[dax-vm] clocksource {clock}");
    report::send(json!({"event": "ready", "clocksource": clock, "clock_log": clock_lines}));
    match mode.as_str() {
        // `vm-test --boot-only`: boot, load modules, find the nvdimms, stop.
        "boot" => {}
        "test" => run_tests(&env, &cmdline),
        "demo" => {
            if let Err(e) = demo(&env) {
                println!("[dax-vm] demo failed: {e:#}");
            }
        }
        "bench" => {
            let which = cmdline_param(&cmdline, "bench").unwrap_or_default();
            if let Err(e) = bench(&env, &which) {
                report::send(json!({"event": "fatal", "error": format!("bench failed: {e:#}")}));
            }
        }
        "shell" => shell(),
        other => report::send(json!({"event": "fatal", "error": format!("unknown mode {other}")})),
    }
    report::send(json!({"event": "done"}));
}

fn mount_pseudo() -> Result<()> {
    sys::mount("proc", "/proc", "proc", "")?;
    sys::mount("sysfs", "/sys", "sysfs", "")?;
    sys::mount("devtmpfs", "/dev", "devtmpfs", "")?;
    sys::mount("tmpfs", "/tmp", "tmpfs", "")?;
    // Pseudo-terminals for tmux (the tui scenario).
    let _ = std::fs::create_dir_all("/dev/pts");
    let _ = sys::mount("devpts", "/dev/pts", "devpts", "ptmxmode=0666");
    // Optional ones: the agent must cope without them, but operators have them.
    let _ = sys::mount("tracefs", "/sys/kernel/tracing", "tracefs", "");
    let _ = sys::mount("securityfs", "/sys/kernel/security", "securityfs", "");
    Ok(())
}

/// The virtio NIC's modules: its PCI transport (a module on 5.10 and 6.1), virtio_net and
/// what they depend on.
fn is_net_module(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    [
        "virtio_net.ko",
        "net_failover.ko",
        "failover.ko",
        "virtio_pci.ko",
        "virtio_pci_modern_dev.ko",
        "virtio_pci_legacy_dev.ko",
        "virtio.ko",
        "virtio_ring.ko",
    ]
    .contains(&name)
}

fn setup(cmdline: &str) -> Result<Env> {
    let t = Instant::now();
    if let Ok(list) = std::fs::read_to_string("/etc/dax-probe/modules") {
        // The NIC only for a boot that forwards a port to the host: every other boot
        // keeps the network stack idle.
        let net = cmdline_param(cmdline, "promport").is_some();
        for m in list
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| net || !is_net_module(l))
        {
            if let Err(e) = sys::load_module(Path::new(m)) {
                report::note(&format!("{e:#}"));
            }
        }
    }
    let want: usize = cmdline_param(cmdline, "nvdimms")
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    sys::wait_for(Duration::from_secs(15), || pmem::regions().len() >= want);
    let regions = pmem::regions();
    if regions.len() < want {
        anyhow::bail!(
            "expected {want} nvdimm regions, found {:?} (nfit/libnvdimm not loaded?)",
            regions
        );
    }
    let mut env = Env::default();
    // The machine has pmem but nothing DAX yet: what does the agent say? (bad-input checks.)
    if let Ok((code, _, err)) = agent::run_once(&["monitor", "--duration", "1"]) {
        env.before_setup_monitor = Some((code, err));
    }
    let ext4 = pmem::make_fsdax(&regions[0]).context("fsdax for ext4")?;
    pmem::mount_ext4(&ext4, "/mnt/ext4")?;
    env.fs.push(DaxFs {
        target: Target::Ext4,
        dev: ext4,
        mnt: "/mnt/ext4".into(),
        reflink: false,
    });
    let xfs = pmem::make_fsdax(&regions[1]).context("fsdax for xfs")?;
    let reflink = pmem::mount_xfs(&xfs, "/mnt/xfs", true)?;
    report::fact("xfs_reflink_dax_mount", json!(reflink));
    env.fs.push(DaxFs {
        target: Target::Xfs,
        dev: xfs,
        mnt: "/mnt/xfs".into(),
        reflink,
    });
    if let Some(r) = regions.get(2) {
        env.devdax = Some(pmem::make_devdax(r).context("devdax")?);
    }
    // The rest are spares for scenarios that need a device of their own (taken from the
    // end, so the first spare is regions[3]).
    *env.pool.borrow_mut() = regions.iter().skip(3).rev().cloned().collect();
    report::note(&format!(
        "setup done in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        env.fs
            .iter()
            .map(|f| format!("{} on {} ({})", f.target, f.dev.block, f.dev.pfn_dev))
            .chain(
                env.devdax
                    .iter()
                    .map(|d| format!("devdax {}", d.dev_path()))
            )
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(env)
}

/// The tracepoints our programs attach to.
const HOOKED_TRACEPOINTS: [&str; 4] = [
    "fs_dax/dax_pte_fault_done",
    "fs_dax/dax_pmd_fault_done",
    "ras/memory_failure_event",
    "sched/sched_process_fork",
];

/// Under TCG a vCPU can run a call site the other vCPU is patching: a 7.2 guest died so
/// ("Oops: int3" at `dax_iomap_pte_fault+0x2f2`, "Fatal exception in interrupt") while a
/// drain attached its programs and a holder faulted. Attaching the first probe to a
/// tracepoint flips its static key, and going from one probe to two (and back) re-targets
/// its static call: both are text pokes. Two probes held on each hooked tracepoint for the
/// whole boot (its tracefs event enabled, with tracing off so nothing is recorded, and a
/// disabled perf event on it) leave every attach and detach of ours adding or removing a
/// third: no text is patched under the scenarios. Hardware runs the int3 protocol
/// correctly; this is for the emulator. Not in bench mode: benches measure the kernel as
/// it is. Returns what it could not hold, for the log.
fn hold_tracepoints() -> Vec<String> {
    let root = "/sys/kernel/tracing";
    let _ = std::fs::write(format!("{root}/tracing_on"), "0");
    let mut missed = Vec::new();
    for tp in HOOKED_TRACEPOINTS {
        let dir = format!("{root}/events/{tp}");
        let Some(id) = sys::read(format!("{dir}/id"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        else {
            missed.push(format!("{tp}: no tracefs event"));
            continue;
        };
        if std::fs::write(format!("{dir}/enable"), "1").is_err() {
            missed.push(format!("{tp}: enable refused"));
        }
        // perf_event_attr as its first version (64 bytes; libc has no binding): type
        // PERF_TYPE_TRACEPOINT (2) and size in the first word, config = the event id, and
        // the `disabled` bit (bit 0 of the flags word, the sixth).
        let mut attr = [0u64; 8];
        attr[0] = 2 | (64u64 << 32);
        attr[1] = id;
        attr[5] = 1;
        // SAFETY: a valid 64-byte perf_event_attr; the descriptor is kept open (leaked) for
        // the whole boot on purpose.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                -1,
                0,
                -1,
                8, // PERF_FLAG_FD_CLOEXEC: the agents and workloads it starts do not inherit it
            )
        };
        if fd < 0 {
            missed.push(format!(
                "{tp}: perf_event_open: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    missed
}

fn run_tests(env: &Env, cmdline: &str) {
    let missed = hold_tracepoints();
    println!(
        "[dax-vm] hooked tracepoints held (no text poke under the scenarios){}",
        if missed.is_empty() {
            String::new()
        } else {
            format!("; not held: {}", missed.join(", "))
        }
    );
    // What the agent makes of this kernel, for the host's report and the support matrix.
    if cmdline_param(cmdline, "verbose").as_deref() == Some("1") {
        // Verifier logs of anything that failed to load.
        if let Ok((_, _, err)) = agent::run_once(&["doctor", "-vv"]) {
            for l in err
                .lines()
                .filter(|l| !l.contains("DEBUG] relocat") && !l.contains("callee"))
            {
                println!("[doctor] {l}");
            }
        }
    }
    match agent::run_once(&["doctor"]) {
        Ok((code, out, err)) => {
            println!("{out}{err}");
            let json = agent::run_once(&["doctor", "--json"])
                .ok()
                .and_then(|(_, o, _)| serde_json::from_str::<serde_json::Value>(&o).ok());
            report::send(json!({"event": "doctor", "exit": code, "text": out, "report": json}));
        }
        Err(e) => report::note(&format!("doctor did not run: {e:#}")),
    }
    let wanted = cmdline_param(cmdline, "scenario").unwrap_or_else(|| "all".into());
    let wanted: Vec<&str> = wanted.split(',').collect();
    let (plan, isolated) = scenarios::plan(&wanted);
    // The host counts a planned target without a result as failed (the guest died in it).
    report::send(json!({
        "event": "plan",
        "scenarios": plan.iter().map(|(n, t)| format!("{n}/{t}")).collect::<Vec<_>>(),
    }));
    let all = scenarios::all();
    for (i, &(name, target)) in plan.iter().enumerate() {
        let s = all
            .iter()
            .find(|s| s.name == name)
            .expect("planned scenario");
        let t = Instant::now();
        let mark = sys::kernel_log_mark();
        println!("[dax-vm] running {name}/{target}");
        let mut o: Outcome = scenarios::execute(s, env, target);
        if let serde_json::Value::Object(m) = &mut o.counts {
            m.insert("seconds".into(), json!(t.elapsed().as_secs_f64()));
        }
        report::outcome(&o);
        let rest = &plan[i + 1..];
        if !rest.is_empty()
            && scenarios::ISOLATED.contains(&(name, target))
            && let Some(why) = nvdimm_bus_wedged(env, mark)
        {
            // Everything after it would wait on the bus; the host boots again for them.
            report::send(json!({
                "event": "deferred",
                "after": format!("{name}/{target}"),
                "why": why,
                "scenarios": rest.iter().map(|(n, t)| format!("{n}/{t}")).collect::<Vec<_>>(),
            }));
            break;
        }
    }
    if !isolated.is_empty() {
        report::send(json!({"event": "isolated", "scenarios": isolated}));
    }
}

/// Whether the kernel can still run scenarios after one that may wedge it (an xfs unbind
/// that never finishes holds the bus's probe lock; on 7.x a holder's exit after an unbind
/// can oops, and an oops inside an RCU read-side section stalls RCU for good, so the next
/// scenario would hang until the host's timeout). `Some(why)` when the kernel's log
/// reports damage since `mark` (the scenario's start), a scenario saw an unbind never
/// finish, or a spare region's `available_size` (which waits for probes in flight, the way
/// the next scenario's namespace creation would) does not return within 10 s.
fn nvdimm_bus_wedged(env: &Env, mark: f64) -> Option<String> {
    if let Some(line) = sys::kernel_trouble_since(mark) {
        return Some(format!("the kernel reported damage: {}", line.trim()));
    }
    if pmem::bus_wedged() {
        return Some("an unbind in this boot never finished".into());
    }
    let region = env.pool.borrow().last().cloned()?;
    let path = format!("/sys/bus/nd/devices/{region}/available_size");
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.clone();
    // A reader stuck in the kernel stays stuck; the guest is powered off after the run.
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_to_string(&p));
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(_) => None,
        Err(_) => Some(format!("reading {path} did not return within 10 s")),
    }
}

/// The demo: the real agent, in text mode, on the console, watching a workload.
fn demo(env: &Env) -> Result<()> {
    let say = |s: &str| println!("\n\x1b[1m== {s}\x1b[0m");
    say("pmem devices in this VM (dax-probe devices)");
    let _ = Command::new(agent::AGENT).arg("devices").status();
    say("what this kernel offers (dax-probe doctor)");
    let _ = Command::new(agent::AGENT).arg("doctor").status();

    let fs = env.fs(Target::Ext4).context("ext4 not prepared")?;
    let file = format!("{}/demo.dat", fs.mnt);
    pmem::write_file(Path::new(&file), 8 << 20)?;

    say("live monitor (sudo dax-probe monitor) while a workload maps a DAX file");
    let mut mon = Command::new(agent::AGENT)
        .arg("monitor")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // Forward the monitor's stderr and notice when it is attached.
    let stderr = mon.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.contains("watching") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(90))
        .context("monitor did not attach")?;

    let mut p = Puppet::spawn()?;
    println!("-- workload {} maps {file}: 16 pages with 4K faults", p.pid);
    let a = p.map(&file, 0, 4 << 20, true, Huge::Pte)?;
    p.touch(a, 16 * 4096, false, 4096)?;
    std::thread::sleep(Duration::from_millis(500));
    println!("-- workload {} writes 4 pages", p.pid);
    p.touch(a, 4 * 4096, true, 4096)?;
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "-- workload {} maps 4 MiB at a 2 MiB boundary: 2 PMD faults",
        p.pid
    );
    let b = p.map(&file, 4 << 20, 4 << 20, true, Huge::Pmd)?;
    p.touch(b, 4 << 20, false, 4096)?;
    std::thread::sleep(Duration::from_millis(500));
    p.exit()?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(mon.id() as i32, libc::SIGINT) };
    mon.wait()?;
    say("demo over");
    Ok(())
}

/// Benchmarks that need the VM. Results go to the host as `bench` records.
fn bench(env: &Env, which: &str) -> Result<()> {
    match which {
        "fault-overhead" => bench_fault_overhead(env),
        "holders" => bench_holders(env),
        "reaction" => bench_reaction(env),
        other => anyhow::bail!("unknown benchmark {other}"),
    }
}

/// Fault cost of the agent, against no program and against the floor (an empty program on
/// the same tracepoints), in paired rounds: each pair runs the conditions back to back in an
/// order that rotates, so drift of the emulator hits each alike. Per mode: 4 KiB faults in
/// order (`seq`), shuffled (`rand`), 2 MiB faults (`pmd`), two threads (`mt`), and anonymous
/// memory (`anon`: what a process that maps no DAX pays for the agent's hooks). The agent
/// runs where the scheduler puts it, as on a server; `seq` also has it pinned away from the
/// toucher. Program run times come from the kernel (`kernel.bpf_stats_enabled`).
fn bench_fault_overhead(env: &Env) -> Result<()> {
    let fs = env.fs(Target::Ext4).context("ext4 not prepared")?;
    let file = format!("{}/bench-64m", fs.mnt);
    let len: u64 = 64 << 20;
    pmem::write_file(Path::new(&file), len as usize)?;
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enable kernel.bpf_stats_enabled")?;
    let cmdline = sys::read("/proc/cmdline").unwrap_or_default();
    let pairs: usize = cmdline_param(&cmdline, "pairs")
        .and_then(|p| p.parse().ok())
        .unwrap_or(30);
    let modes: Vec<String> = cmdline_param(&cmdline, "modes")
        .map(|m| m.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| {
            ["seq", "rand", "pmd", "mt", "anon"]
                .map(String::from)
                .to_vec()
        });
    let round = |mode: &str, pin: Option<usize>| -> Result<u64> {
        let mut cmd = Command::new(dax_probe_tests::puppet::WORKLOAD);
        if let Some(cpu) = pin {
            sys::pin_to_cpu(&mut cmd, cpu);
        }
        let out = cmd
            .args(["rounds", &file, &len.to_string(), "1", mode])
            .output()?;
        anyhow::ensure!(out.status.success(), "workload failed: {:?}", out.status);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("workload printed no round time")
    };
    // Warm-up: first-touch costs (metadata caches, allocation) out of the way.
    for m in &modes {
        round(m, None)?;
    }
    let mut rows = Vec::new();
    for mode in &modes {
        let mut conds = vec!["none", "floor", "agent"];
        if mode == "seq" {
            conds.push("agent-pinned");
        }
        for i in 0..pairs {
            let mut row = serde_json::Map::new();
            row.insert("mode".into(), json!(mode));
            row.insert("pair".into(), json!(i));
            // Rotate the order: every condition runs first, middle and last equally often.
            let k = conds.len();
            for j in 0..k {
                let cond = conds[(i + j) % k];
                match cond {
                    "none" => {
                        row.insert("none_ns".into(), json!(round(mode, None)?));
                    }
                    "floor" => {
                        let mut floor = Command::new(agent::AGENT)
                            .arg("bench-floor")
                            .stdin(Stdio::piped())
                            .stdout(Stdio::piped())
                            .spawn()?;
                        let mut lines = BufReader::new(floor.stdout.take().unwrap()).lines();
                        let first = lines.next().transpose()?.unwrap_or_default();
                        anyhow::ensure!(first == "attached", "bench-floor said {first:?}");
                        row.insert("floor_ns".into(), json!(round(mode, None)?));
                        drop(floor.stdin.take());
                        let stats = lines.next().transpose()?.unwrap_or_default();
                        floor.wait()?;
                        row.insert(
                            "floor_programs".into(),
                            serde_json::from_str(&stats).unwrap_or(json!([])),
                        );
                    }
                    _ => {
                        let pinned = cond == "agent-pinned";
                        let mon = agent::Monitor::start_on("bench", &[], pinned.then_some(1))?;
                        let pid = mon.pid().unwrap();
                        let cpu0 = sys::cpu_ns_of(pid);
                        let ns = round(mode, pinned.then_some(0))?;
                        // Let it catch up (its poll is 200 ms), then read its CPU time.
                        std::thread::sleep(Duration::from_millis(400));
                        let cpu = sys::cpu_ns_of(pid).saturating_sub(cpu0);
                        let out = mon.stop()?;
                        let s = out.summary().cloned().unwrap_or_default();
                        let key = if pinned { "pinned" } else { "agent" };
                        row.insert(format!("{key}_ns"), json!(ns));
                        row.insert(format!("{key}_cpu_ns"), json!(cpu));
                        row.insert(
                            format!("{key}_records"),
                            json!(s.events_attempted_by_kernel),
                        );
                        row.insert(format!("{key}_faults"), json!(s.faults_seen_by_kernel));
                        row.insert(format!("{key}_lines"), json!(out.faults().count()));
                        // What the agent reported, fault by fault: the bench's unit.
                        let (mut small, mut huge) = (0u64, 0u64);
                        for f in out.faults() {
                            if f.page_size > 4096 {
                                huge += f.pages;
                            } else {
                                small += f.pages;
                            }
                        }
                        row.insert(format!("{key}_line_faults"), json!(small + huge));
                        row.insert(format!("{key}_line_pmd_faults"), json!(huge));
                        row.insert(format!("{key}_dropped"), json!(s.dropped));
                        row.insert(format!("{key}_programs"), json!(s.programs));
                    }
                }
            }
            rows.push(serde_json::Value::Object(row));
        }
    }
    report::send(json!({"event": "bench", "name": "fault-overhead",
        "bytes_per_round": len, "pairs": pairs, "rows": rows}));
    Ok(())
}

/// `n` processes that each map and touch `len` bytes of `file`, ready when this returns;
/// they exit when the child's stdin closes.
fn spawn_holders(file: &str, len: u64, n: u32) -> Result<std::process::Child> {
    let mut hold = Command::new(dax_probe_tests::puppet::WORKLOAD)
        .args(["hold", file, &len.to_string(), &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(hold.stdout.take().unwrap()).read_line(&mut line)?;
    anyhow::ensure!(line.trim() == "ready", "workload said {line:?}");
    Ok(hold)
}

/// `holders /dev/pmem0` from the running monitor against `fuser -m`, the agent's own procfs
/// scan and the bare process start (`--version`), with 500 and then 1,000 processes mapping
/// a DAX file: the four commands interleaved round by round (the order rotating), the
/// agent caught up (its answer lists every holder) before the first round.
fn bench_holders(env: &Env) -> Result<()> {
    const ROUNDS: usize = 9;
    let fs = env.fs(Target::Ext4).context("ext4 not prepared")?;
    let file = format!("{}/bench-holders", fs.mnt);
    pmem::write_file(Path::new(&file), 1 << 20)?;
    let mon = agent::Monitor::start("bench-holders", &[])?;
    let dev = fs.dev.dev_path();
    let answer = || -> serde_json::Value {
        agent::run_once(&["holders", &dev, "--json"])
            .ok()
            .and_then(|(_, out, _)| serde_json::from_str(out.trim()).ok())
            .unwrap_or_default()
    };
    let listed = |v: &serde_json::Value| v["holders"].as_array().map_or(0, |a| a.len());
    // What an operator types (text output), psmisc's fuser (the one operators use, checking
    // every process's files and maps), the agent's own scan, and process start alone.
    let commands: [(&str, Vec<&str>); 4] = [
        (agent::AGENT, vec!["--version"]),
        (agent::AGENT, vec!["holders", &dev]),
        (agent::AGENT, vec!["holders", &dev, "--scan"]),
        ("/sbin/fuser", vec!["-m", &fs.mnt]),
    ];
    let mut holds = Vec::new();
    let mut rows = Vec::new();
    let mut have = 0;
    for n in [500u32, 1000] {
        holds.push(spawn_holders(&file, 1 << 20, n - have)?);
        have = n;
        let caught_up = sys::wait_for(Duration::from_secs(120), || listed(&answer()) >= n as usize);
        let mut ms: [Vec<f64>; 4] = Default::default();
        let mut fuser_out = String::new();
        for round in 0..ROUNDS {
            for k in 0..commands.len() {
                let i = (round + k) % commands.len();
                let (prog, args) = &commands[i];
                let t = Instant::now();
                let out = Command::new(prog).args(args).output()?;
                ms[i].push(t.elapsed().as_secs_f64() * 1e3);
                if i == 3 {
                    fuser_out = String::from_utf8_lossy(&out.stdout).into_owned();
                }
            }
        }
        let last = answer();
        let [start_ms, monitor_ms, scan_ms, fuser_ms] = ms;
        rows.push(json!({"processes": n, "caught_up": caught_up,
            "monitor_ms": monitor_ms, "scan_ms": scan_ms, "fuser_ms": fuser_ms,
            "agent_start_ms": start_ms, "agent_answer_us": last["agent_us"].clone(),
            "holders_reported": listed(&last),
            "fuser_pids": fuser_out.split_whitespace().count()}));
    }
    for mut h in holds {
        drop(h.stdin.take());
        h.wait()?;
    }
    mon.stop()?;
    report::send(json!({"event": "bench", "name": "holders", "rows": rows}));
    Ok(())
}

/// The children of `parent` (from every /proc/PID/stat's ppid).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// The floor of a departure's signals in this boot: `n` holders of a DAX file (as in the
/// round) killed by a bare loop of `pidfd_open` + `pidfd_send_signal`, no proof, no audit,
/// no agent; milliseconds. What TCG makes of a kill is in it, so the agent's own share of
/// a round is its last signal minus this.
fn kill_floor(file: &str, n: u32) -> Result<f64> {
    let mut hold = spawn_holders(file, 1 << 20, n)?;
    let pids = children_of(hold.id());
    anyhow::ensure!(
        pids.len() == n as usize,
        "{} of {n} holders found",
        pids.len()
    );
    let t = Instant::now();
    for pid in &pids {
        // SAFETY: plain syscalls on processes we spawned.
        unsafe {
            let fd = libc::syscall(libc::SYS_pidfd_open, *pid as i32, 0) as i32;
            if fd >= 0 {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
                libc::close(fd);
            }
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    drop(hold.stdin.take());
    hold.wait()?;
    Ok(ms)
}

/// Reaction time of `monitor --enforce`: from the kernel's unbind hook firing to the last
/// holder signalled, for 1, 10, 100 and 1,000 holders of one DAX file, five rounds each,
/// each on a fresh device, the agent caught up (its `holders` answer lists them all) before
/// the unbind. After each round, the floor: as many holders killed by a bare loop.
fn bench_reaction(env: &Env) -> Result<()> {
    // The audit log on a disk file system (the shared ext4, never the device that leaves):
    // its fdatasyncs are part of the reaction, and tmpfs would make them free.
    let disk = env
        .fs(Target::Ext4)
        .context("ext4 not prepared")?
        .mnt
        .clone();
    let floor_file = format!("{disk}/reaction-floor");
    pmem::write_file(Path::new(&floor_file), 1 << 20)?;
    let mut rows = Vec::new();
    for n in [1u32, 10, 100, 1000] {
        for round in 0..5 {
            // The device is left unbound and its file system mounted: unmounting ext4 after a
            // surprise unbind oopses some kernels (6.12), and the VM powers off next anyway.
            let fs = env.fresh(Target::Ext4, &format!("reaction-{n}-{round}"))?;
            let file = format!("{}/reaction", fs.mnt);
            pmem::write_file(Path::new(&file), 1 << 20)?;
            let policy = format!("/tmp/reaction-{n}-{round}.toml");
            std::fs::write(
                &policy,
                format!(
                    "[device.{}]\naction = \"signal\"\nsignal = \"KILL\"\ngrace = \"1s\"\n",
                    fs.dev.block
                ),
            )?;
            let audit = format!("{disk}/reaction-{n}-{round}.jsonl");
            let mon = agent::Monitor::start(
                &format!("reaction-{n}-{round}"),
                &["--enforce", "--policy", &policy, "--audit-log", &audit],
            )?;
            let mut hold = spawn_holders(&file, 1 << 20, n)?;
            // The agent has seen every fault before the device goes.
            let dev = fs.dev.dev_path();
            let caught_up = sys::wait_for(Duration::from_secs(60), || {
                agent::run_once(&["holders", &dev, "--json"])
                    .ok()
                    .and_then(|(_, out, _)| serde_json::from_str::<serde_json::Value>(&out).ok())
                    .and_then(|v| v["holders"].as_array().map(|a| a.len()))
                    .is_some_and(|k| k >= n as usize)
            });
            let t = Instant::now();
            pmem::unbind_fsdax(&fs.dev)?;
            let unbind_ms = t.elapsed().as_secs_f64() * 1e3;
            // The holders stay until the agent decided about every one (a `result` or a
            // `skip` record each): released earlier, the slow ones would exit by themselves
            // and be counted as not signalled.
            let decided = |audit: &str| -> usize {
                std::fs::read_to_string(audit)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|r| r["action"] == "result" || r["action"] == "skip")
                    .filter_map(|r| r["pid"].as_u64())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            };
            sys::wait_for(Duration::from_secs(60), || decided(&audit) >= n as usize);
            std::thread::sleep(Duration::from_millis(200));
            drop(hold.stdin.take());
            hold.wait()?;
            let out = mon.stop()?;
            let signalled: Vec<f64> = out
                .enforcement()
                .filter(|a| a.action == "signal")
                .filter_map(|a| a.since_departure_us)
                .map(|us| us as f64 / 1e3)
                .collect();
            // hook -> the agent read it -> first verdict: the steps before the signals.
            let ms = |u: Option<u64>| u.map_or(f64::NAN, |u| u as f64 / 1e3);
            let sig_lines: Vec<_> = out.enforcement().filter(|a| a.action == "signal").collect();
            let received_ms = ms(sig_lines.iter().find_map(|a| a.received_us));
            let listed_ms = ms(sig_lines.iter().find_map(|a| a.listed_us));
            let fenced_ms = ms(sig_lines.iter().find_map(|a| a.fenced_us));
            let first_verdict_ms = ms(sig_lines.iter().filter_map(|a| a.verdict_us).min());
            let listed = out
                .departures()
                .next()
                .map(|d| d.holders.len())
                .unwrap_or(0);
            let mut skipped: std::collections::BTreeMap<String, u64> = Default::default();
            for a in out.enforcement().filter(|a| a.action == "skip") {
                *skipped.entry(a.reason.clone()).or_default() += 1;
            }
            rows.push(json!({"holders": n, "round": round, "listed": listed,
                "skipped": skipped,
                "caught_up": caught_up,
                "signalled": signalled.len(),
                "received_ms": received_ms,
                "listed_ms": listed_ms,
                "fenced_ms": fenced_ms,
                "first_verdict_ms": first_verdict_ms,
                "first_ms": signalled.iter().cloned().fold(f64::NAN, f64::min),
                "last_ms": signalled.iter().cloned().fold(f64::NAN, f64::max),
                "unbind_ms": unbind_ms,
                "floor_ms": kill_floor(&floor_file, n).unwrap_or(f64::NAN)}));
        }
    }
    report::send(json!({"event": "bench", "name": "reaction", "rows": rows}));
    Ok(())
}

fn shell() {
    let _ = Command::new("/bin/busybox")
        .args(["--install", "-s", "/bin"])
        .status();
    println!(
        "[dax-vm] shell: ext4 on /mnt/ext4, xfs on /mnt/xfs; agent at /bin/dax-probe; exit to power off"
    );
    let _ = Command::new("/bin/busybox")
        .args(["cttyhack", "/bin/sh"])
        .env("PATH", "/bin:/sbin")
        .status();
}
