//! The fuzz targets' bodies, one function per target: `fuzz/` (cargo-fuzz, libFuzzer on
//! nightly) calls them on what libFuzzer generates, and `tests/fuzz_smoke.rs` on the checked-in
//! corpora and their mutations under plain `cargo test`, so every test run exercises each
//! parser that crosses a trust boundary on stable Rust without the sanitizer build.
//!
//! Each panics (an assertion or a crash) only on a real defect.

use std::{path::Path, time::Instant};

use crate::{
    holders::{
        HolderMap,
        map::{F_SHARED, FileKey, PFN_LIMIT, Run},
        query::{Target, resolve, select},
        scan::{parse_maps_line, parse_stat},
    },
    policy::{config, signal},
    probe::decode::{Decoder, NoLookup},
    topology::{DaxOption, DevId, Mode, Mount, Namespace, PhysRange, Topology, parse_mountinfo},
    ui::tui::model::Model,
};

/// A fuzz target's body.
pub type Body = fn(&[u8]);

/// The targets, by the names fuzz/Cargo.toml gives their binaries.
pub const TARGETS: &[(&str, Body)] = &[
    ("decode", decode),
    ("replay", replay),
    ("policy", policy),
    ("pfn_target", pfn_target),
    ("procfs_text", procfs_text),
    ("cgroup", cgroup),
    ("badblocks", badblocks),
];

/// Ring records as the kernel (or a corrupted ring) hands them over.
pub fn decode(data: &[u8]) {
    let topology = topology();
    let d = Decoder {
        topology: &topology,
        lookup: NoLookup,
    };
    let _ = d.decode(data);
}

/// A `monitor --json` recording given to `tui --replay`: line parsing, the model and the
/// agent's own applier behind it, and the dashboard snapshot.
pub fn replay(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut m = Model::new();
    for line in text.lines() {
        let _ = m.ingest(line);
    }
    let _ = m.snapshot();
}

/// Policy files and durations: whatever loads must be usable without a panic later.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = signal::parse_duration(text) {
        assert!(d <= signal::MAX_DURATION);
        assert!(Instant::now().checked_add(d).is_some());
    }
    if let Ok(p) = config::parse(text, "fuzz.toml") {
        // Every grace a departure can use is a deadline the clock can hold.
        let _ = format!("{p:?}");
        for line in text.lines() {
            let _ = signal::parse_duration(line);
        }
    }
}

/// `holders TARGET`: resolution of what the operator typed and the answer from a map.
pub fn pfn_target(data: &[u8]) {
    let Ok(arg) = std::str::from_utf8(data) else {
        return;
    };
    let topology = topology();
    // Files and mount points are looked up below a root that does not exist.
    let Ok(t) = resolve(arg, &topology, Path::new("/nonexistent-fuzz-root")) else {
        return;
    };
    let mut map = HolderMap::new();
    let h = map.holder(100, 1, "app");
    let file = FileKey {
        dev: topology.namespaces[0].block.as_ref().unwrap().1,
        ino: 12,
    };
    for (vpage, pfn, npages) in [(0x7f000, 0x100800, 700), (0x90000, 0x100900, 1)] {
        map.add(
            h,
            file,
            Run {
                vpage,
                pfn,
                pgoff: 0,
                npages,
                flags: F_SHARED,
            },
        );
    }
    let found = select(&map, &t);
    if let Target::Pfns { first, end } = t {
        assert!(
            first < end && end <= PFN_LIMIT,
            "{arg:?} -> {first:#x}..{end:#x}"
        );
        let inside = |p: u64| p >= first && p < end;
        // Exactly the pages in range: the answer is never "nobody" for a mapped pfn in it.
        let want: u64 = (0x100800..0x100800 + 700)
            .chain([0x100900])
            .filter(|&p| inside(p))
            .count() as u64;
        let got: u64 = found.iter().map(|v| v.pages).sum();
        assert_eq!(got, want, "{arg:?}");
        for v in &found {
            assert!(
                inside(v.pfn) && inside(v.pfn + v.pages - 1),
                "{arg:?}: {v:?}"
            );
        }
    }
}

/// Text the kernel writes that the agent parses: /proc/PID/maps, /proc/PID/stat,
/// /proc/self/mountinfo, /proc/iomem and device numbers (`259:0`). Process names and file paths in them
/// are chosen by unprivileged users.
pub fn procfs_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let _ = parse_maps_line(line);
        let _ = DevId::parse(line);
    }
    let _ = parse_stat(&text);
    let _ = parse_mountinfo(&text);
    // /proc/iomem (or a crafted one in a `--root` tree): ranges are never inverted.
    for (s, e) in crate::holders::bindings::parse_iomem_pmem(&text) {
        assert!(s <= e, "{s:#x}..{e:#x}");
    }
}

/// /proc/PID/cgroup: a process names its own cgroups within its delegated subtree (or its
/// container's cgroup namespace), so every path component is attacker-chosen.
pub fn cgroup(data: &[u8]) {
    use crate::proc::cgroup::{cgroup_path, display, matches, parse, parse_path};
    if let Some(c) = parse(data) {
        // What the parser extracted is a piece of the path, never something made up.
        if let Some(k) = &c.container {
            assert!(c.path.contains(&k.id));
        }
        let _ = display(&c.path);
        // The path doubles as a hostile pattern (globs included).
        let id = c.container.as_ref().map(|k| k.id.as_str());
        let _ = matches(&c.path, &c.path, id, c.pod_uid.as_deref());
    }
    let text = String::from_utf8_lossy(data);
    let _ = parse_path(&text);
    let _ = cgroup_path(text.as_bytes());
}

/// pmem0 (fsdax, ext4 with dax=always on /mnt/ext4) and dax1.0 (devdax).
/// A badblocks list (`/sys/block/pmemN/badblocks`, `regionX/badblocks`) as sysfs (or a
/// crafted file in a `--root` tree) hands it over: parsed, then placed in a block list and
/// a region list whose bases lie anywhere, up to the end of the address space.
pub fn badblocks(data: &[u8]) {
    use crate::badblocks::{Scope, Source, parse, place_all};
    let text = String::from_utf8_lossy(data);
    let list = match parse(&text) {
        Ok(l) => l,
        Err(e) => {
            assert!(e.line >= 1 && e.text.chars().count() <= 80);
            let _ = e.to_string();
            return;
        }
    };
    for s in &list {
        let (a, b) = s.bytes();
        assert!(s.count > 0 && a < b, "{s:?}");
    }
    let topology = topology();
    for (device, scope, base) in [
        ("pmem0", Scope::Block, Some(0x1_0080_0000)),
        ("region0", Scope::Region, Some(0x1_0000_0000)),
        ("region0", Scope::Region, Some(u64::MAX - 4096)),
        ("pmem0", Scope::Block, None),
    ] {
        let src = Source {
            device: device.into(),
            path: "/sys/x/badblocks".into(),
            scope,
            base,
            nonlinear: None,
        };
        for p in place_all(&src, &list, &topology) {
            if let Some(r) = p.phys {
                assert!(r.start < r.end, "{p:?}");
            }
            if let Some((a, b)) = p.pfns() {
                assert!(a < b, "{p:?}");
            }
            assert!(p.phys.is_some() || p.note.is_some(), "{p:?}");
        }
    }
}

pub fn topology() -> Topology {
    let ns = |name: &str, mode, start: u64, block, chardev| Namespace {
        name: name.into(),
        region: "region0".into(),
        mode,
        holder: None,
        namespace_range: PhysRange {
            start,
            end: start + (512 << 20),
        },
        data_range: PhysRange {
            start: start + (8 << 20),
            end: start + (512 << 20),
        },
        block,
        chardev,
        align: Some(2 << 20),
        enabled: true,
        range_known: true,
    };
    let pmem0 = DevId {
        major: 259,
        minor: 0,
    };
    Topology {
        dm: Vec::new(),
        namespaces: vec![
            ns(
                "namespace0.0",
                Mode::Fsdax,
                0x1_0000_0000,
                Some(("pmem0".into(), pmem0)),
                None,
            ),
            ns(
                "namespace1.0",
                Mode::Devdax,
                0x1_4000_0000,
                None,
                Some((
                    "dax1.0".into(),
                    DevId {
                        major: 252,
                        minor: 0,
                    },
                )),
            ),
        ],
        mounts: vec![Mount {
            dev: pmem0,
            mount_point: "/mnt/ext4".into(),
            fstype: "ext4".into(),
            source: "/dev/pmem0".into(),
            dax: DaxOption::Always,
            rtdev: None,
        }],
    }
}
