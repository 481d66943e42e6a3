//! Small OS helpers for the guest: mounting, sysfs writes, module loading, commands.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// Bind-mounts `src` on `target`: a second mount of the same file system.
pub fn bind_mount(src: &str, target: &str) -> Result<()> {
    fs::create_dir_all(target).ok();
    let (s, t) = (CString::new(src)?, CString::new(target)?);
    // SAFETY: valid NUL-terminated strings; MS_BIND ignores fstype and data.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(anyhow!(
            "bind mount {src} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

pub fn mount(src: &str, target: &str, fstype: &str, data: &str) -> Result<()> {
    fs::create_dir_all(target).ok();
    let c = |s: &str| CString::new(s).unwrap();
    let (s, t, f, d) = (c(src), c(target), c(fstype), c(data));
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            0,
            if data.is_empty() {
                std::ptr::null()
            } else {
                d.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        return Err(anyhow!(
            "mount {src} on {target} ({fstype}, {data}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

pub fn umount(target: &str) -> Result<()> {
    let t = CString::new(target).unwrap();
    // SAFETY: valid path.
    if unsafe { libc::umount(t.as_ptr()) } != 0 {
        bail!("umount {target}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn write(path: impl AsRef<Path>, value: &str) -> Result<()> {
    let path = path.as_ref();
    fs::write(path, value).with_context(|| format!("write {value:?} to {}", path.display()))
}

pub fn read(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    Ok(fs::read_to_string(path)
        .with_context(|| format!("read {}", path.display()))?
        .trim()
        .to_string())
}

pub fn read_u64(path: impl AsRef<Path>) -> Result<u64> {
    let s = read(path.as_ref())?;
    let v = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    v.with_context(|| format!("{} is not a number: {s:?}", path.as_ref().display()))
}

/// Loads a kernel module from a file (finit_module); "already loaded" is fine.
pub fn load_module(path: &Path) -> Result<()> {
    let f = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    use std::os::fd::AsRawFd;
    let params = CString::new("").unwrap();
    // SAFETY: valid fd and empty parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            bail!("load module {}: {err}", path.display());
        }
    }
    Ok(())
}

/// Nanoseconds since boot (CLOCK_BOOTTIME), the clock of kernel event timestamps; async-
/// signal-safe (the workload's signal handlers call it).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Removes a kernel module (delete_module; its devices are unbound first by the kernel).
pub fn unload_module(name: &str) -> Result<()> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated name.
    let rc = unsafe { libc::syscall(libc::SYS_delete_module, n.as_ptr(), libc::O_NONBLOCK) };
    if rc != 0 {
        bail!("unload module {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs a command, failing with its output if it fails.
pub fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {prog}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{prog} {} failed ({}): {}",
            args.join(" "),
            out.status,
            text.trim()
        );
    }
    Ok(text)
}

/// Waits until `cond` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

pub fn uuid() -> String {
    read("/proc/sys/kernel/random/uuid")
        .unwrap_or_else(|_| "4a3c6e58-0000-4000-8000-000000000001".into())
}

/// (st_dev, st_ino) of a path, st_dev split into major/minor.
pub fn stat_dev_ino(path: &Path) -> Result<((u32, u32), u64)> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::stat(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "stat {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(((libc::major(st.st_dev), libc::minor(st.st_dev)), st.st_ino))
}

/// Is DAX active for this file (statx STATX_ATTR_DAX, 5.8+)?
pub fn is_dax_file(path: &Path) -> Result<bool> {
    const STATX_ATTR_DAX: u64 = 0x0020_0000;
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: zeroed statx is a valid out-parameter.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            0,
            libc::STATX_BASIC_STATS,
            &mut stx,
        )
    };
    if rc != 0 {
        bail!(
            "statx {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(stx.stx_attributes_mask & STATX_ATTR_DAX != 0 && stx.stx_attributes & STATX_ATTR_DAX != 0)
}

pub fn kernel_release() -> String {
    read("/proc/sys/kernel/osrelease").unwrap_or_else(|_| "unknown".into())
}

/// Flushes and powers the VM off. Never returns.
pub fn poweroff() -> ! {
    // SAFETY: plain syscalls.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The kernel log since boot (for failure details).
pub fn dmesg_tail(lines: usize) -> Vec<String> {
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: SYSLOG_ACTION_READ_ALL into a buffer of the given size.
    let n = unsafe { libc::klogctl(3, buf.as_mut_ptr().cast(), buf.len() as i32) };
    if n <= 0 {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
    let all: Vec<String> = text.lines().map(str::to_string).collect();
    all[all.len().saturating_sub(lines)..].to_vec()
}

/// SIGKILLs a child and reaps it, waiting at most `within`: a process that died in the
/// kernel (an oops in its exit, on 7.x after an unbind) is never reaped, and a plain
/// `wait` on it would hang the guest until the host's timeout. False if it was left so.
pub fn end_child(child: &mut Child, within: Duration) -> bool {
    let _ = child.kill();
    let reaped = wait_for(within, || child.try_wait().ok().flatten().is_some());
    if !reaped {
        eprintln!(
            "[dax-vm] pid {} not reaped {within:?} after SIGKILL, left: {}",
            child.id(),
            kernel_stacks(&[child.id()])
        );
    }
    reaped
}

/// Kernel stacks of the threads of `pids` (state and innermost frames): where processes
/// the kernel holds are waiting.
pub fn kernel_stacks(pids: &[u32]) -> String {
    let mut out = Vec::new();
    for pid in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let dir = t.path();
            let stat = fs::read_to_string(dir.join("stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            let stack = fs::read_to_string(dir.join("stack")).unwrap_or_default();
            let frames: Vec<&str> = stack
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .take(12)
                .collect();
            if !frames.is_empty() {
                out.push(format!(
                    "{}[{}] {:?}: {}",
                    pid,
                    t.file_name().to_string_lossy(),
                    state,
                    frames.join(" < ")
                ));
            }
        }
    }
    out.join(" | ")
}

/// The printk time (seconds since boot) of the kernel log's last line: a mark for
/// [`kernel_trouble_since`].
pub fn kernel_log_mark() -> f64 {
    dmesg_tail(1)
        .last()
        .and_then(|l| printk_time(l))
        .unwrap_or(0.0)
}

/// The printk time of one `dmesg` line (`<6>[  118.38] text`).
pub fn printk_time(line: &str) -> Option<f64> {
    let open = line.find('[')?;
    let close = line[open..].find(']')? + open;
    line[open + 1..close].trim().parse().ok()
}

/// The first line after `mark` by which the kernel says it is damaged: an oops, a BUG, a
/// general protection fault, an RCU stall, a soft lockup or a task hung for minutes.
/// Whatever ran after such a line in the same boot proves nothing.
pub fn kernel_trouble_since(mark: f64) -> Option<String> {
    dmesg_tail(4000)
        .into_iter()
        .filter(|l| printk_time(l).is_some_and(|t| t > mark))
        .find(|l| is_kernel_trouble(l))
}

/// Whether one kernel log line reports damage (see [`kernel_trouble_since`]).
pub fn is_kernel_trouble(line: &str) -> bool {
    const SIGNS: [&str; 7] = [
        "BUG:",
        "Oops:",
        "general protection fault",
        "detected stalls on CPUs",
        "detected stall on CPU",
        "soft lockup",
        "blocked for more than",
    ];
    SIGNS.iter().any(|s| line.contains(s))
}

/// One oops or BUG report of the kernel log: the process it happened in, and where (the
/// text of its `RIP:` line, when it has one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Oops {
    pub pid: u32,
    pub comm: String,
    pub rip: Option<String>,
}

/// Every oops the kernel log reports.
pub fn oopses() -> Vec<Oops> {
    oopses_in(&dmesg_tail(4000))
}

/// Every process the kernel log reports an oops in: (pid, comm).
pub fn oopsed_in(log: &[String]) -> Vec<(u32, String)> {
    oopses_in(log)
        .into_iter()
        .map(|o| (o.pid, o.comm))
        .collect()
}

/// The oopses of the given kernel log lines: the first `PID: N Comm: X` after an oops or
/// BUG header, before the report ends or another (a WARNING's) begins, and the first
/// `RIP:` line of the kernel's frame after it.
pub fn oopses_in(log: &[String]) -> Vec<Oops> {
    let mut out: Vec<Oops> = Vec::new();
    let mut in_oops = false;
    // The report whose RIP line is still to come.
    let mut open = false;
    for l in log {
        if l.contains("BUG:") || l.contains("Oops:") {
            in_oops = true;
            open = false;
        } else if l.contains("cut here") || l.contains("WARNING:") || l.contains("end trace") {
            in_oops = false;
            open = false;
        } else if in_oops && let Some(rest) = l.split(" PID: ").nth(1) {
            let mut words = rest.split_whitespace();
            if let (Some(Ok(pid)), Some("Comm:"), Some(comm)) =
                (words.next().map(str::parse), words.next(), words.next())
            {
                out.push(Oops {
                    pid,
                    comm: comm.to_string(),
                    rip: None,
                });
                in_oops = false;
                open = true;
            }
        } else if open && let Some(rip) = l.split("RIP:").nth(1) {
            if let Some(o) = out.last_mut() {
                o.rip = Some(rip.trim().to_string());
            }
            open = false;
        }
    }
    out
}

/// Whether the kernel log reports an RCU stall: no grace period ends any more, so every
/// `synchronize_rcu` (a BPF link's release among them) waits for ever.
pub fn rcu_stalled() -> bool {
    dmesg_tail(4000).iter().any(|l| {
        l.contains("rcu: INFO:")
            && (l.contains("detected stalls on CPUs") || l.contains("detected stall on CPU"))
    })
}

/// The kernel's own report of an oops in process `pid` (its `RIP:` line), if the log has
/// one: on 7.x a holder killed during an unbind can die in the kernel tearing its stale
/// mapping down, and is then never reaped.
pub fn oops_of(pid: u32) -> Option<String> {
    oopses()
        .into_iter()
        .find(|o| o.pid == pid)
        .map(|o| o.rip.unwrap_or_else(|| "an oops".into()))
}

/// Names of every BPF program loaded in the kernel (BPF_PROG_GET_NEXT_ID + GET_INFO), to
/// prove the agent leaves nothing behind.
pub fn bpf_prog_names() -> Result<Vec<String>> {
    const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let bpf = |cmd: libc::c_long, attr: &mut [u8; 128]| -> libc::c_long {
        // SAFETY: attr is a zero-padded bpf_attr of sufficient size.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) }
    };
    let mut names = Vec::new();
    let mut id: u32 = 0;
    loop {
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&id.to_ne_bytes()); // start_id
        if bpf(BPF_PROG_GET_NEXT_ID, &mut attr) != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            bail!("BPF_PROG_GET_NEXT_ID: {e}");
        }
        id = u32::from_ne_bytes(attr[4..8].try_into().unwrap()); // next_id
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&id.to_ne_bytes()); // prog_id
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue; // went away meanwhile
        }
        let mut info = [0u8; 256];
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&(fd as u32).to_ne_bytes()); // bpf_fd
        attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes()); // info_len
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes()); // info
        let rc = bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr);
        // SAFETY: closing the fd we just got.
        unsafe { libc::close(fd as i32) };
        if rc == 0 {
            // struct bpf_prog_info: name[16] at offset 64.
            let raw = &info[64..80];
            let end = raw.iter().position(|&c| c == 0).unwrap_or(16);
            names.push(String::from_utf8_lossy(&raw[..end]).into_owned());
        }
    }
    Ok(names)
}

/// Makes a command run on one CPU only (benchmarks: workload and agent on separate CPUs so
/// the emulator's scheduling noise does not land on one of them).
pub fn pin_to_cpu(cmd: &mut std::process::Command, cpu: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: sched_setaffinity is async-signal-safe; runs in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

/// CPU time `pid` used so far, all its threads, in ns (`/proc/PID/task/*/schedstat`: exact,
/// not tick-sampled; 0 for a process gone).
pub fn cpu_ns_of(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as CI's 7.2 guest logged them when a holder's exit oopsed and RCU stalled:
    /// the damage is found after the mark, not before it, and ordinary lines are not damage.
    #[test]
    fn kernel_damage_is_found_by_its_own_words_after_the_mark() {
        let log = [
            "<6>[  117.901000] pmem pmem15: unbinding",
            "<1>[  118.384080] BUG: unable to handle page fault for address: fffff9cac77e8008",
            "<4>[  118.443876]  make_task_dead.cold+0x6b/0x11d",
            "<3>[  139.398730] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
        ];
        assert_eq!(printk_time(log[1]), Some(118.38408));
        assert_eq!(printk_time("no time"), None);
        let trouble: Vec<&str> = log
            .iter()
            .copied()
            .filter(|l| is_kernel_trouble(l))
            .collect();
        assert_eq!(trouble, [log[1], log[3]]);
        assert!(!is_kernel_trouble(
            "<4>[ 1.0] WARNING: CPU: 0 PID: 1 at mm/memremap.c"
        ));
        assert!(is_kernel_trouble(
            "<3>[ 300.1] INFO: task dmsetup:412 blocked for more than 120 seconds."
        ));
    }

    /// The process an oops happened in, from the lines a 7.2 guest logged; a `PID:` line
    /// with no oops header before it (a WARNING) names nobody.
    #[test]
    fn an_oops_names_its_process() {
        let log: Vec<String> = [
            "<1>[  100.213512] BUG: unable to handle page fault for address: fffff9344620c008",
            "<1>[  100.213999] #PF: supervisor read access in kernel mode",
            "<4>[  100.215406] CPU: 1 UID: 0 PID: 271 Comm: dax-workload Tainted: G W 7.2.13",
            "<4>[  101.0] ------------[ cut here ]------------",
            "<4>[  101.1] WARNING: CPU: 0 PID: 12 at mm/memremap.c:1 x",
            "<4>[  101.2] CPU: 0 UID: 0 PID: 12 Comm: kworker/0:1 Not tainted",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(oopsed_in(&log), vec![(271, "dax-workload".to_string())]);
        let mut with_rip = log.clone();
        with_rip.insert(
            3,
            "<4>[  100.2155] RIP: 0010:pagemap_pmd_range+0x1a/0x3c0".into(),
        );
        assert_eq!(
            oopses_in(&with_rip)[0].rip.as_deref(),
            Some("0010:pagemap_pmd_range+0x1a/0x3c0")
        );
    }
}
