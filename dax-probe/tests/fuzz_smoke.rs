//! Every fuzz target (dax_probe::fuzzing, the bodies cargo-fuzz runs) on its checked-in
//! corpus (fuzz/corpus/TARGET) and on mutations of it, for a bounded time, under plain
//! `cargo test`: a crash or a failed assertion fails the test run, with the input saved.
//!
//! This is not coverage-guided (that is `cargo xtask fuzz`, libFuzzer on nightly, whose
//! sanitizer build does not fit the test budget); it makes every test run push crafted
//! input through each parser that crosses a trust boundary.
//!
//! DAX_PROBE_FUZZ_SMOKE_SECS sets the time per target (default 4), DAX_PROBE_FUZZ_SEED
//! replays a run (the seed is printed).

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dax_probe::fuzzing::TARGETS;

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that sit on boundaries parsers get wrong.
const INTERESTING: &[&[u8]] = &[
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    b"18446744073709551615",
    b"-1",
    b"0x",
    b"\n",
    b"\"",
    b"1e19s",
    b"99999999999999999999",
    b" ",
    b":",
    b"-",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let i = rng.below(len + 1);
                input.splice(i..i, v.iter().copied());
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                input.drain(i..i + n);
            }
            4 if len > 0 => {
                // Repeat a chunk: long lines, many records.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let chunk: Vec<u8> = input[i..i + n].to_vec();
                for _ in 0..1 + rng.below(8) {
                    input.extend_from_slice(&chunk);
                }
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let i = rng.below(len + 1);
                    input.splice(i..i, other[a..].iter().copied());
                }
            }
            _ if len > 1 => input.truncate(rng.below(len)),
            _ => input.push(rng.next() as u8),
        }
    }
    input.truncate(1 << 16);
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.push(Vec::new());
    seeds
}

fn save(target: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-smoke");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("crash-{target}-{}", input.len()));
    std::fs::write(&p, input).unwrap();
    p
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations_of_it() {
    let secs: u64 = std::env::var("DAX_PROBE_FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let seed: u64 = std::env::var("DAX_PROBE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    // The targets' own assertions are the oracle; their panic messages go to stderr once.
    let mut failures = Vec::new();
    for &(name, run) in TARGETS {
        let seeds = corpus(name);
        let mut rng = Rng(seed ^ name.len() as u64 | 1);
        let start = Instant::now();
        let mut execs = 0u64;
        let mut inputs: Vec<Vec<u8>> = seeds.clone();
        while failures.is_empty() && start.elapsed() < Duration::from_secs(secs) {
            let input = if execs < seeds.len() as u64 {
                seeds[execs as usize].clone()
            } else {
                let mut x = inputs[rng.below(inputs.len())].clone();
                mutate(&mut rng, &seeds, &mut x);
                if inputs.len() < 4096 && rng.below(8) == 0 {
                    inputs.push(x.clone());
                }
                x
            };
            execs += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&input))).is_err() {
                failures.push(format!(
                    "{name}: crashed on {} (seed {seed}; rerun with DAX_PROBE_FUZZ_SEED={seed}, \
                     or `cargo xtask fuzz --target {name}` with that file as a seed)",
                    save(name, &input).display()
                ));
            }
        }
        eprintln!(
            "fuzz-smoke: {name:<12} {execs:>8} executions in {:.1} s ({} seeds)",
            start.elapsed().as_secs_f64(),
            seeds.len()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// fuzz/Cargo.toml's binaries are exactly these targets (one list, checked).
#[test]
fn the_cargo_fuzz_binaries_are_the_targets() {
    let toml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml"))
            .unwrap();
    let bins: Vec<&str> = toml
        .split("[[bin]]")
        .skip(1)
        .filter_map(|b| b.lines().find_map(|l| l.strip_prefix("name = ")))
        .map(|n| n.trim_matches('"'))
        .collect();
    let targets: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(bins, targets);
}
