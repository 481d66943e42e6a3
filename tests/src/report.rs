//! The guest → host result channel.
//!
//! Results go to the second serial port (`/dev/ttyS1`, a file on the host) as one JSON object
//! per line, so kernel messages on the console can never interleave with them. The console
//! (`ttyS0`) gets a human-readable copy for people watching the boot.

use std::{fs::OpenOptions, io::Write, sync::Mutex};

use serde::Serialize;
use serde_json::{Value, json};

/// Marker prefixed to every line on the result channel.
pub const MARK: &str = "@@DAXPROBE ";

static CHANNEL: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Opens the result channel; falls back to stdout when there is no second serial port.
pub fn init() {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ttyS1")
        .ok();
    *CHANNEL.lock().unwrap() = f;
}

/// Sends one record to the host.
pub fn send(record: Value) {
    let line = format!("{MARK}{record}\n");
    let mut ch = CHANNEL.lock().unwrap();
    match ch.as_mut() {
        Some(f) => {
            let _ = f.write_all(line.as_bytes());
            let _ = f.flush();
        }
        None => {
            print!("{line}");
            let _ = std::io::stdout().flush();
        }
    }
}

/// A scenario outcome.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub scenario: String,
    /// File system or device flavour the scenario ran on (`ext4`, `xfs`, `devdax`).
    pub target: String,
    pub passed: bool,
    /// One line for humans.
    pub summary: String,
    /// Numbers the scenario compared (agent vs ground truth).
    pub counts: Value,
    /// Failure details (agent stderr, first mismatches).
    pub details: Vec<String>,
}

pub fn outcome(o: &Outcome) {
    let verdict = if o.passed { "PASS" } else { "FAIL" };
    println!(
        "[dax-vm] {verdict} {}/{}: {}",
        o.scenario, o.target, o.summary
    );
    for d in &o.details {
        println!("[dax-vm]     {d}");
    }
    send(json!({"event": "result", "result": o}));
}

/// A fact about this kernel worth keeping in the support matrix.
pub fn fact(key: &str, value: Value) {
    println!("[dax-vm] fact {key} = {value}");
    send(json!({"event": "fact", "key": key, "value": value}));
}

/// Free-form progress line (console only, plus the channel for logs).
pub fn note(msg: &str) {
    println!("[dax-vm] {msg}");
    send(json!({"event": "note", "msg": msg}));
}
