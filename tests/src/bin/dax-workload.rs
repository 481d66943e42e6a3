//! A workload that maps DAX files and touches their pages, on command.
//!
//! `dax-workload puppet` reads commands on stdin, one per line, and answers each with one
//! JSON line on stdout:
//!   map PATH OFFSET LEN shared|private pte|pmd   -> {"ok":true,"addr":N}
//!   map-ro PATH LEN                              -> {"ok":true,"addr":N} (O_RDONLY, shared,
//!                                                   LEN may far exceed the file: any user can)
//!   touch ADDR LEN read|write STEP               -> {"ok":true,"pages":N}
//!   unmap ADDR LEN                               -> {"ok":true}
//!   content ADDR LEN MARKER                      -> {"ok":true,"pages":N,"marker":N,"own":N}
//!                                                   (reads each 4 KiB page's first bytes:
//!                                                   how many begin with MARKER, how many
//!                                                   still hold `pmem::write_file`'s pattern)
//!   mremap ADDR OLDLEN NEWLEN move|inplace       -> {"ok":true,"addr":N}
//!   fork                                         -> {"ok":true,"child":PID}
//!   reap PID                                     -> {"ok":true}  (ends a forked child)
//!   open PATH                                    -> {"ok":true}  (keeps it open, unmapped)
//!   ignore SIGNUM                                -> {"ok":true}  (SIG_IGN)
//!   poison ADDR                                  -> {"ok":true,"rc":N} (madvise MADV_HWPOISON)
//!   exit
//! `dax-workload rounds PATH LEN ROUNDS [MODE]` maps, touches every 4 KiB page and unmaps,
//! ROUNDS times, and prints the nanoseconds of each round (fault-overhead benchmark). MODE:
//! `seq` (4 KiB faults in address order, the default), `rand` (in shuffled order), `pmd`
//! (2 MiB faults), `mt` (two threads, each its half) or `anon` (anonymous memory, not DAX).
//! `dax-workload churn PATH N` forks N short-lived processes one after another, each mapping
//! and touching PATH and exiting at once (processes vanishing under a scan).
//! `dax-workload reader PATH LEN STATUS` maps PATH and reads it in a loop, recording in
//! STATUS (a small file it maps) the boot-time ns of its last read and of any SIGTERM/SIGBUS,
//! after which it stops reading (unbind-enforce: did it read after the unbind completed?).
//! `dax-workload fence-probe PATH STATUS [exit]` faults on PATH over and over and counts in
//! STATUS the SIGUSR1s and SIGTERMs the kernel's fence sent it apart from those a process sent
//! (fence-excluded); with `exit` it unmaps and exits once told to stop.
//! `dax-workload hold PATH LEN N` starts N processes that each map PATH and touch it, prints
//! `ready` once all did, and keeps them until stdin closes (holders benchmark).

use std::{
    ffi::CString,
    io::{BufRead, Write},
    time::Instant,
};

use serde_json::json;

fn main() {
    // The Rust runtime catches SIGBUS/SIGSEGV to report stack overflows and, for a signal
    // it did not cause, returns: a kernel SIGBUS (memory failure, pre-remove kill) would be
    // swallowed. A workload must react to those like any program: default dispositions.
    // SAFETY: setting signal dispositions before anything else runs.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::signal(libc::SIGSEGV, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("puppet") => puppet(),
        Some("rounds") => rounds(&args[2..]),
        Some("hold") => hold(&args[2..]),
        Some("churn") => churn(&args[2..]),
        Some("reader") => reader(&args[2..]),
        Some("fence-probe") => fence_probe(&args[2..]),
        _ => {
            eprintln!("usage: dax-workload puppet | rounds PATH LEN ROUNDS");
            std::process::exit(2);
        }
    }
}

/// Forked children, with the write end of the pipe that keeps each alive.
static CHILDREN: std::sync::Mutex<Vec<(i32, i32)>> = std::sync::Mutex::new(Vec::new());

fn puppet() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"exit") {
            break;
        }
        let reply = match run(&words) {
            Ok(v) => v,
            Err(e) => json!({"ok": false, "error": e}),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}

fn num(w: Option<&&str>) -> Result<u64, String> {
    let w = w.ok_or("missing number")?;
    w.parse().map_err(|_| format!("not a number: {w}"))
}

fn run(w: &[&str]) -> Result<serde_json::Value, String> {
    match w.first().copied() {
        Some("map") => {
            let path = w.get(1).ok_or("missing path")?;
            let offset = num(w.get(2))?;
            let len = num(w.get(3))?;
            let shared = w.get(4) == Some(&"shared");
            let pmd = w.get(5) == Some(&"pmd");
            let addr = map_file(path, offset, len, shared, pmd)?;
            Ok(json!({"ok": true, "addr": addr}))
        }
        Some("map-ro") => {
            let path = w.get(1).ok_or("missing path")?;
            let len = num(w.get(2))?;
            Ok(json!({"ok": true, "addr": map_readonly(path, len)?}))
        }
        Some("touch") => {
            let addr = num(w.get(1))?;
            let len = num(w.get(2))?;
            let write = w.get(3) == Some(&"write");
            let step = num(w.get(4))?.max(1);
            Ok(json!({"ok": true, "pages": touch(addr, len, write, step)}))
        }
        Some("content") => {
            let addr = num(w.get(1))?;
            let len = num(w.get(2))?;
            let marker = w.get(3).ok_or("MARKER")?.as_bytes();
            let (pages, marker, own) = content(addr, len, marker);
            Ok(json!({"ok": true, "pages": pages, "marker": marker, "own": own}))
        }
        Some("unmap") => {
            let addr = num(w.get(1))?;
            let len = num(w.get(2))?;
            // SAFETY: the scenario names a range it mapped through us.
            if unsafe { libc::munmap(addr as *mut _, len as usize) } != 0 {
                return Err(format!("munmap: {}", std::io::Error::last_os_error()));
            }
            Ok(json!({"ok": true}))
        }
        Some("mremap") => {
            let addr = num(w.get(1))?;
            let old = num(w.get(2))?;
            let new = num(w.get(3))?;
            let mv = w.get(4) == Some(&"move");
            Ok(json!({"ok": true, "addr": remap(addr, old, new, mv)?}))
        }
        Some("dontneed") => {
            let addr = num(w.get(1))?;
            let len = num(w.get(2))?;
            // SAFETY: the scenario names a range it mapped through us; the mapping stays,
            // its page table entries go (the next access faults the page in again).
            let rc = unsafe { libc::madvise(addr as *mut _, len as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(format!("madvise: {}", std::io::Error::last_os_error()));
            }
            Ok(json!({"ok": true}))
        }
        Some("fork") => Ok(json!({"ok": true, "child": fork_child()?})),
        Some("clone-vm") => Ok(json!({"ok": true, "child": clone_vm_child()?})),
        Some("open") => {
            let path = w.get(1).ok_or("missing path")?;
            let f = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
            // Kept open (not mapped) for the rest of the puppet's life.
            std::mem::forget(f);
            Ok(json!({"ok": true}))
        }
        Some("ignore") => {
            let sig = num(w.get(1))? as i32;
            // SAFETY: setting a signal disposition.
            unsafe { libc::signal(sig, libc::SIG_IGN) };
            Ok(json!({"ok": true}))
        }
        Some("catch-sigbus") => {
            // SAFETY: installing a handler that only stores into atomics.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigbus as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO;
                libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
            }
            Ok(json!({"ok": true}))
        }
        Some("sigbus") => Ok(json!({"ok": true,
            "count": SIGBUS_COUNT.load(std::sync::atomic::Ordering::SeqCst),
            "code": SIGBUS_CODE.load(std::sync::atomic::Ordering::SeqCst)})),
        Some("poison") => {
            let addr = num(w.get(1))?;
            // SAFETY: the scenario names a page it mapped through us; the kernel may kill us.
            let rc = unsafe { libc::madvise(addr as *mut _, 4096, libc::MADV_HWPOISON) };
            let err = std::io::Error::last_os_error();
            Ok(json!({"ok": true, "rc": rc, "errno": err.raw_os_error()}))
        }
        Some("reap") => {
            let pid = num(w.get(1))? as i32;
            let mut kids = CHILDREN.lock().unwrap();
            let Some(pos) = kids.iter().position(|(p, _)| *p == pid) else {
                return Err(format!("no child {pid}"));
            };
            let (_, fd) = kids.remove(pos);
            // SAFETY: closing our pipe end lets the child's read return; then reap it.
            unsafe {
                libc::close(fd);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            Ok(json!({"ok": true}))
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

/// mremap: `move` forces a new address (MREMAP_MAYMOVE|MREMAP_FIXED to a fresh 2 MiB-aligned
/// place), `inplace` only resizes.
fn remap(addr: u64, old: u64, new: u64, mv: bool) -> Result<u64, String> {
    // SAFETY: the scenario names a range it mapped through us.
    unsafe {
        let p = if mv {
            // Find a free, 2 MiB-aligned destination.
            let resv = libc::mmap(
                std::ptr::null_mut(),
                (new + TWO_MIB) as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if resv == libc::MAP_FAILED {
                return Err(format!("reserve: {}", std::io::Error::last_os_error()));
            }
            let dest = (resv as u64 + TWO_MIB - 1) & !(TWO_MIB - 1);
            libc::mremap(
                addr as *mut _,
                old as usize,
                new as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dest as *mut libc::c_void,
            )
        } else {
            libc::mremap(addr as *mut _, old as usize, new as usize, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mremap: {}", std::io::Error::last_os_error()));
        }
        Ok(p as u64)
    }
}

/// The stack of a `clone_vm_child`: it shares our memory, so it needs its own.
const CLONE_STACK: usize = 64 * 1024;

/// Runs in the CLONE_VM child: no Rust runtime, no allocation (the memory is the parent's):
/// waits for signals until one ends it, outliving the parent.
extern "C" fn clone_vm_idle(_: *mut libc::c_void) -> libc::c_int {
    loop {
        // SAFETY: plain syscall.
        unsafe { libc::pause() };
    }
}

/// `clone(CLONE_VM | SIGCHLD)` without CLONE_THREAD: a process of its own (another tgid)
/// using this address space, so every DAX page mapped here is its too. It idles until
/// signalled and outlives us.
fn clone_vm_child() -> Result<i32, String> {
    // SAFETY: a fresh private stack; the child runs only `clone_vm_idle`.
    unsafe {
        let stack = libc::mmap(
            std::ptr::null_mut(),
            CLONE_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        );
        if stack == libc::MAP_FAILED {
            return Err(format!("stack: {}", std::io::Error::last_os_error()));
        }
        let top = (stack as *mut u8).add(CLONE_STACK).cast::<libc::c_void>();
        match libc::clone(
            clone_vm_idle,
            top,
            libc::CLONE_VM | libc::SIGCHLD,
            std::ptr::null_mut(),
        ) {
            -1 => Err(format!("clone: {}", std::io::Error::last_os_error())),
            pid => Ok(pid),
        }
    }
}

/// Forks a child that keeps the parent's mappings and does nothing until reaped.
fn fork_child() -> Result<i32, String> {
    let mut fds = [0i32; 2];
    // SAFETY: plain syscalls; the child only reads a pipe and exits.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return Err(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        match libc::fork() {
            -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
            0 => {
                libc::close(fds[1]);
                let mut b = 0u8;
                libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                libc::_exit(0);
            }
            pid => {
                libc::close(fds[0]);
                CHILDREN.lock().unwrap().push((pid, fds[1]));
                Ok(pid)
            }
        }
    }
}

const TWO_MIB: u64 = 2 << 20;

/// A read-only shared mapping of `len` bytes, what a user who may only read the file can
/// make: the mapping may be far larger than the file (pages past its end are never faulted).
fn map_readonly(path: &str, len: u64) -> Result<u64, String> {
    let c = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: plain syscalls; the mapping keeps the file once the fd is closed.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return Err(format!("open {path}: {}", std::io::Error::last_os_error()));
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            0,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if p == libc::MAP_FAILED {
            return Err(format!("mmap {len} bytes of {path}: {err}"));
        }
        Ok(p as u64)
    }
}

fn map_file(path: &str, offset: u64, len: u64, shared: bool, pmd: bool) -> Result<u64, String> {
    let c = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: plain syscalls; the fd is closed after mmap (the mapping keeps the file).
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return Err(format!("open {path}: {}", std::io::Error::last_os_error()));
        }
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let addr = if pmd {
            // Reserve room, then place the file at a 2 MiB-aligned address: PMD faults need
            // the virtual and file offsets to agree modulo 2 MiB.
            let resv = libc::mmap(
                std::ptr::null_mut(),
                (len + TWO_MIB) as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if resv == libc::MAP_FAILED {
                libc::close(fd);
                return Err(format!("reserve: {}", std::io::Error::last_os_error()));
            }
            let aligned = (resv as u64 + TWO_MIB - 1) & !(TWO_MIB - 1);
            let p = libc::mmap(
                aligned as *mut _,
                len as usize,
                prot,
                flags | libc::MAP_FIXED,
                fd,
                offset as i64,
            );
            // Give back the unused head and tail of the reservation.
            let head = aligned - resv as u64;
            if head > 0 {
                libc::munmap(resv, head as usize);
            }
            let tail_start = aligned + len;
            let tail = resv as u64 + len + TWO_MIB - tail_start;
            if tail > 0 {
                libc::munmap(tail_start as *mut _, tail as usize);
            }
            p
        } else {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                flags,
                fd,
                offset as i64,
            );
            if p != libc::MAP_FAILED {
                libc::madvise(p, len as usize, libc::MADV_NOHUGEPAGE);
            }
            p
        };
        libc::close(fd);
        if addr == libc::MAP_FAILED {
            return Err(format!("mmap {path}: {}", std::io::Error::last_os_error()));
        }
        Ok(addr as u64)
    }
}

fn touch(addr: u64, len: u64, write: bool, step: u64) -> u64 {
    let mut pages = 0;
    let mut off = 0;
    while off < len {
        let p = (addr + off) as *mut u8;
        // SAFETY: the scenario names a range it mapped through us.
        unsafe {
            let v = std::ptr::read_volatile(p);
            if write {
                std::ptr::write_volatile(p, v.wrapping_add(1));
            }
        }
        pages += 1;
        off += step;
    }
    pages
}

/// Per 4 KiB page of `[addr, addr+len)` (at file offset 0): does it begin with `marker`, or
/// with what `pmem::write_file` wrote there (byte `i` of each 2 MiB chunk is `i % 251 + 1`)?
fn content(addr: u64, len: u64, marker: &[u8]) -> (u64, u64, u64) {
    let (mut pages, mut hits, mut own) = (0, 0, 0);
    let mut off = 0;
    while off < len {
        let p = (addr + off) as *const u8;
        // SAFETY: the scenario names a range it mapped through us.
        let head: Vec<u8> = (0..16)
            .map(|i| unsafe { std::ptr::read_volatile(p.add(i)) })
            .collect();
        let mine: Vec<u8> = (0..16)
            .map(|i| (((off as usize % (2 << 20)) + i) % 251) as u8 + 1)
            .collect();
        pages += 1;
        hits += u64::from(head.starts_with(marker));
        own += u64::from(head == mine);
        off += 4096;
    }
    (pages, hits, own)
}

fn rounds(args: &[String]) {
    let path = &args[0];
    let len: u64 = args[1].parse().expect("LEN");
    let n: u32 = args[2].parse().expect("ROUNDS");
    let mode = args.get(3).map(String::as_str).unwrap_or("seq");
    for _ in 0..n {
        let addr = match mode {
            // Not DAX: what every other process of the machine pays for our hooks.
            "anon" => anon_map(len),
            "pmd" => map_file(path, 0, len, true, true).expect("map"),
            _ => map_file(path, 0, len, true, false).expect("map"),
        };
        let t = Instant::now();
        match mode {
            "rand" => touch_shuffled(addr, len),
            "mt" => touch_threads(addr, len, 2),
            _ => {
                touch(addr, len, false, 4096);
            }
        }
        let ns = t.elapsed().as_nanos();
        // SAFETY: unmapping what we just mapped.
        unsafe { libc::munmap(addr as *mut _, len as usize) };
        println!("{ns}");
    }
}

/// `len` bytes of fresh anonymous memory.
fn anon_map(len: u64) -> u64 {
    // SAFETY: plain syscall.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(
        p != libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p as u64
}

/// Reads every 4 KiB page once, in an order no two neighbours share (a fixed-seed shuffle):
/// the worst case for coalescing.
fn touch_shuffled(addr: u64, len: u64) {
    let pages = len / 4096;
    let mut order: Vec<u64> = (0..pages).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for p in order {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::read_volatile((addr + p * 4096) as *const u8) };
    }
}

/// `threads` threads, each reading its own contiguous share of the pages.
fn touch_threads(addr: u64, len: u64, threads: u64) {
    let share = len / threads;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                touch(addr + t * share, share, false, 4096);
            });
        }
    });
}

fn hold(args: &[String]) {
    let path = &args[0];
    let len: u64 = args[1].parse().expect("LEN");
    let n: u32 = args[2].parse().expect("N");
    let mut kids = Vec::new();
    for _ in 0..n {
        let mut ready = [0i32; 2];
        let mut quit = [0i32; 2];
        // SAFETY: plain syscalls; the child maps, touches, reports and waits for EOF.
        unsafe {
            libc::pipe(ready.as_mut_ptr());
            libc::pipe(quit.as_mut_ptr());
            match libc::fork() {
                0 => {
                    libc::close(ready[0]);
                    libc::close(quit[1]);
                    // Earlier siblings' pipe ends came along with fork: close them, or those
                    // siblings would never see EOF.
                    for fd in 3..4096 {
                        if fd != ready[1] && fd != quit[0] {
                            libc::close(fd);
                        }
                    }
                    let addr = map_file(path, 0, len, true, false).expect("map");
                    touch(addr, len, false, 4096);
                    libc::write(ready[1], b"r".as_ptr().cast(), 1);
                    let mut b = 0u8;
                    libc::read(quit[0], (&mut b as *mut u8).cast(), 1);
                    libc::_exit(0);
                }
                pid => {
                    libc::close(ready[1]);
                    libc::close(quit[0]);
                    let mut b = 0u8;
                    libc::read(ready[0], (&mut b as *mut u8).cast(), 1);
                    libc::close(ready[0]);
                    kids.push((pid, quit[1]));
                }
            }
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    for (pid, fd) in kids {
        // SAFETY: our children and our pipe ends.
        unsafe {
            libc::close(fd);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

fn churn(args: &[String]) {
    let path = &args[0];
    let n: u32 = args[1].parse().expect("N");
    for _ in 0..n {
        // SAFETY: the child maps, touches and exits.
        unsafe {
            match libc::fork() {
                0 => {
                    if let Ok(addr) = map_file(path, 0, 1 << 20, true, false) {
                        touch(addr, 1 << 20, false, 4096);
                    }
                    libc::_exit(0);
                }
                pid if pid > 0 => {
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                _ => {}
            }
        }
    }
}

static SIGBUS_COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static SIGBUS_CODE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Counts SIGBUS and keeps the last si_code. Only for signals the kernel sends about pages
/// it already unmapped (BUS_MCEERR_AO): returning from a fault's own SIGBUS would refault.
extern "C" fn on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo.
    let code = unsafe { (*info).si_code };
    SIGBUS_CODE.store(code, std::sync::atomic::Ordering::SeqCst);
    SIGBUS_COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static STATUS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn on_signal(_: i32) {
    let st = STATUS.load(std::sync::atomic::Ordering::Relaxed) as *mut u64;
    if !st.is_null() {
        // SAFETY: slot 1 of the status mapping; async-signal-safe store.
        unsafe { std::ptr::write_volatile(st.add(1), dax_probe_tests::sys::boottime_ns()) };
    }
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn reader(args: &[String]) {
    let path = &args[0];
    let len: u64 = args[1].parse().expect("LEN");
    let status = &args[2];
    std::fs::write(status, [0u8; 4096]).expect("status file");
    let st = map_file(status, 0, 4096, true, false).expect("map status") as *mut u64;
    STATUS.store(st as usize, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: installing handlers that only store.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as usize);
        libc::signal(libc::SIGBUS, on_signal as *const () as usize);
    }
    let addr = map_file(path, 0, len, true, false).expect("map");
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sum = 0u64;
    while !STOP.load(std::sync::atomic::Ordering::SeqCst) {
        let mut off = 0;
        while off < len && !STOP.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: our mapping.
            sum = sum
                .wrapping_add(unsafe { std::ptr::read_volatile((addr + off) as *const u8) } as u64);
            // SAFETY: slot 0 of the status mapping.
            unsafe { std::ptr::write_volatile(st, dax_probe_tests::sys::boottime_ns()) };
            off += 4096;
        }
    }
    std::hint::black_box(sum);
    // Stay alive (not reading) until killed or stdin closes.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// The status mapping of `fence-probe`: [kernel USR1, user USR1, SIGBUS, passes,
/// kernel TERM, user TERM].
static PROBE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PROBE_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `si_code` of a signal sent by the kernel itself (`SEND_SIG_PRIV`: bpf_send_signal), as
/// opposed to SI_USER from kill/pidfd_send_signal.
const SI_KERNEL: i32 = 0x80;

fn probe_slot(i: usize) -> Option<*mut u64> {
    let st = PROBE.load(std::sync::atomic::Ordering::Relaxed) as *mut u64;
    // SAFETY: slot i < 6 of the 4 KiB status mapping.
    (!st.is_null()).then(|| unsafe { st.add(i) })
}

fn probe_bump(i: usize) {
    if let Some(p) = probe_slot(i) {
        // SAFETY: our status mapping; a plain volatile increment (handlers do not nest for
        // one signal, and each slot has one writer context).
        unsafe { std::ptr::write_volatile(p, std::ptr::read_volatile(p) + 1) };
    }
}

/// Counts USR1 and TERM by who sent them: the kernel's fence (SI_KERNEL) or a process (the
/// agent's pidfd signal). A caught TERM does not end the probe: it goes on faulting.
extern "C" fn on_probe_sig(sig: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo.
    let code = unsafe { (*info).si_code };
    let base = if sig == libc::SIGTERM { 4 } else { 0 };
    probe_bump(base + usize::from(code != SI_KERNEL));
}

/// A fault on a dead device: counted, and the page replaced by anonymous memory so the
/// faulting access completes (returning would refault forever; dying during an unbind
/// races the device's teardown, see ISOLATED in scenarios/mod.rs).
extern "C" fn on_probe_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    probe_bump(2);
    // SAFETY: the kernel passes a valid siginfo; mmap is async-signal-safe and replaces only
    // the faulting page of our own mapping.
    unsafe {
        let addr = ((*info).si_addr() as u64) & !4095;
        libc::mmap(
            addr as *mut _,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
    }
}

extern "C" fn on_probe_stop(_: i32) {
    PROBE_STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// `fence-probe PATH STATUS [exit]`: faults on 16 pages of PATH again and again
/// (MADV_DONTNEED drops the PTEs after each pass) until SIGUSR2, counting into STATUS the
/// USR1s and TERMs from the kernel and from processes, the SIGBUSes, and the passes. Then it
/// stays, not faulting, until stdin closes; with `exit` it unmaps PATH and exits 0 instead.
fn fence_probe(args: &[String]) {
    const LEN: u64 = 16 * 4096;
    let path = &args[0];
    let status = &args[1];
    std::fs::write(status, [0u8; 4096]).expect("status file");
    let st = map_file(status, 0, 4096, true, false).expect("map status");
    PROBE.store(st as usize, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: installing handlers that only count (and map over one page).
    unsafe {
        for (sig, h) in [
            (libc::SIGUSR1, on_probe_sig as *const () as usize),
            (libc::SIGTERM, on_probe_sig as *const () as usize),
            (libc::SIGBUS, on_probe_sigbus as *const () as usize),
        ] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = h;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
        libc::signal(libc::SIGUSR2, on_probe_stop as *const () as usize);
    }
    let addr = map_file(path, 0, LEN, true, false).expect("map");
    // One more page, touched once and never dropped: the faulting pages are absent from the
    // page tables most of the time, and a holder found by its present pages (drain's scan)
    // must be seen to hold the device for as long as it maps it.
    let resident = map_file(path, LEN, 4096, true, false).expect("map");
    touch(resident, 4096, false, 4096);
    let c = CString::new(path.as_str()).expect("path");
    // SAFETY: plain open; kept for remapping over pages the SIGBUS handler replaced.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sigbus = 0;
    while !PROBE_STOP.load(std::sync::atomic::Ordering::SeqCst) {
        let now = probe_slot(2).map_or(0, |p| unsafe { std::ptr::read_volatile(p) });
        if now != sigbus {
            sigbus = now;
            // Pages were replaced by anonymous ones: map the file over them again, to keep
            // faulting on the device for as long as the file system lets us map it.
            // SAFETY: MAP_FIXED over our own mapping.
            let p = unsafe {
                libc::mmap(
                    addr as *mut _,
                    LEN as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                break;
            }
        }
        touch(addr, LEN, false, 4096);
        // SAFETY: our mapping; the next pass faults every page again (replaced anonymous
        // pages go too, so a dead device is faulted on again).
        unsafe { libc::madvise(addr as *mut _, LEN as usize, libc::MADV_DONTNEED) };
        probe_bump(3);
        // Leave the CPU to the agent and the unbind (two vCPUs under TCG).
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    if args.get(2).map(String::as_str) == Some("exit") {
        // SAFETY: our mapping and descriptor; nothing uses them after this.
        unsafe {
            libc::munmap(addr as *mut _, LEN as usize);
            libc::munmap(resident as *mut _, 4096);
            libc::close(fd);
        }
        std::process::exit(0);
    }
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}
