//! The guest's initramfs, written directly as a `newc` cpio archive (no cpio tool needed).
//!
//! Two parts are concatenated (the kernel accepts several archives in a row): the payload
//! shared by all kernels (our binaries, busybox, mkfs tools and their shared libraries) and
//! the per-kernel modules with the ordered list the guest's init loads.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{cmd::run, kernels::Kernel};

/// Modules the guest needs (dependencies are added from modules.dep). Names not found are
/// fine when built in (modules.builtin) or absent on that kernel.
const MODULES: &[&str] = &[
    "nfit",
    "nd_pmem",
    "nd_btt",
    "dax_pmem",
    "dax_pmem_core",
    "device_dax",
    // System RAM personality of device-dax (devdax-reconfigure).
    "kmem",
    "crc32c_generic",
    "crc32c-intel",
    "crc32c_intel",
    "ext4",
    "xfs",
    // device-mapper (linear and striped targets are part of dm_mod) for the stack scenarios.
    "dm_mod",
    // The NIC of a boot that forwards a port to the host (the metrics scenario's
    // Prometheus); the guest's init loads these (and their dependencies) only then.
    // virtio_pci is built into 6.12 and later, a module on 5.10 and 6.1.
    "virtio_pci",
    "virtio_net",
];

/// An in-memory cpio archive.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn header(&mut self, name: &str, mode: u32, size: usize) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            size as u32,
            0,
            0,
            0,
            0,
            namesize as u32,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Adds a directory and its parents (once each).
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_string());
        self.header(path, 0o040755, 0);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.header(path, 0o100000 | mode, data.len());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.header(path, 0o120777, target.len());
        self.buf.extend_from_slice(target.as_bytes());
        self.pad();
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0);
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

/// Shared libraries a dynamic executable needs, as absolute host paths (ldd).
fn shared_libs(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for l in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x..)"
        let path = match l.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => l.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Adds a host file at `guest` with its shared libraries at their host paths.
fn add_program(
    cpio: &mut Cpio,
    host: &Path,
    guest: &str,
    libs: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let data = fs::read(host).with_context(|| format!("read {}", host.display()))?;
    cpio.file(guest, 0o755, &data);
    libs.extend(shared_libs(host)?);
    Ok(())
}

/// Everything but the kernel modules: the same for every kernel.
pub fn payload(release_bin: &Path) -> Result<Vec<u8>> {
    let mut c = Cpio::default();
    for d in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "mnt",
        "root",
        "etc/dax-probe",
        "sbin",
        "usr/bin",
        "run",
    ] {
        c.dir(d);
    }
    let mut libs = BTreeSet::new();
    add_program(&mut c, &release_bin.join("dax-vm-init"), "init", &mut libs)?;
    add_program(
        &mut c,
        &release_bin.join("dax-probe"),
        "bin/dax-probe",
        &mut libs,
    )?;
    add_program(
        &mut c,
        &release_bin.join("dax-workload"),
        "bin/dax-workload",
        &mut libs,
    )?;
    c.file(
        "bin/busybox",
        0o755,
        &fs::read("/bin/busybox").context("/bin/busybox")?,
    );
    c.symlink("bin/sh", "busybox");
    for tool in ["mkfs.ext4", "mkfs.xfs", "fuser", "tmux"] {
        let host = ["/sbin", "/usr/sbin", "/bin", "/usr/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())
            .with_context(|| format!("{tool} not found (run cargo xtask setup)"))?;
        add_program(&mut c, &host, &format!("sbin/{tool}"), &mut libs)?;
    }
    // tmux (the tui scenario) looks terminals up in terminfo.
    for entry in [
        "x/xterm-256color",
        "x/xterm",
        "s/screen",
        "l/linux",
        "d/dumb",
    ] {
        for dir in ["/lib/terminfo", "/usr/share/terminfo"] {
            if let Ok(data) = fs::read(Path::new(dir).join(entry)) {
                c.file(&format!("{}/{entry}", &dir[1..]), 0o644, &data);
                break;
            }
        }
    }
    // tmux refuses to start without a UTF-8 locale: glibc's C.UTF-8 character classes.
    let ctype = "/usr/lib/locale/C.utf8/LC_CTYPE";
    if let Ok(data) = fs::read(ctype) {
        c.file(ctype, 0o644, &data);
    }
    if let Ok(conf) = fs::read("/etc/mke2fs.conf") {
        c.file("etc/mke2fs.conf", 0o644, &conf);
    }
    for lib in libs {
        // Keep the host path: the dynamic loader and RPATHs expect it.
        let real = fs::canonicalize(&lib).unwrap_or(lib.clone());
        let data = fs::read(&real).with_context(|| format!("read {}", real.display()))?;
        c.file(&lib.to_string_lossy(), 0o755, &data);
    }
    Ok(c.finish())
}

/// Module name → (path relative to the modules dir, direct dependencies).
///
/// Debian's packages ship no modules.dep (depmod runs at install time), so we read each
/// needed module's own `.modinfo` `depends=` list instead of running depmod.
fn module_deps(k: &Kernel, wanted: &[&str]) -> Result<HashMap<String, (String, Vec<String>)>> {
    let mut files = HashMap::new();
    index_modules(&k.modules, &k.modules, &mut files)?;
    let mut map = HashMap::new();
    let mut todo: Vec<String> = wanted.iter().map(|w| w.replace('-', "_")).collect();
    while let Some(m) = todo.pop() {
        if map.contains_key(&m) {
            continue;
        }
        let Some(rel) = files.get(&m) else { continue };
        let data = decompress(&k.modules.join(rel))?;
        let deps: Vec<String> = modinfo(&data, "depends")
            .map(|d| {
                d.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.replace('-', "_"))
                    .collect()
            })
            .unwrap_or_default();
        todo.extend(deps.iter().cloned());
        map.insert(m, (rel.clone(), deps));
    }
    Ok(map)
}

fn index_modules(root: &Path, dir: &Path, out: &mut HashMap<String, String>) -> Result<()> {
    for e in fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if e.file_type()?.is_dir() {
            index_modules(root, &p, out)?;
        } else if p.to_string_lossy().contains(".ko") {
            let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
            out.insert(module_name(&rel), rel);
        }
    }
    Ok(())
}

/// A `key=value` from an ELF module's `.modinfo` section.
fn modinfo(elf: &[u8], key: &str) -> Option<String> {
    let rd16 = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?) as usize);
    let rd32 = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?) as usize);
    let rd64 = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?) as usize);
    if elf.get(..4)? != b"\x7fELF" || elf[4] != 2 {
        return None;
    }
    let shoff = rd64(0x28)?;
    let shentsize = rd16(0x3a)?;
    let shnum = rd16(0x3c)?;
    let shstrndx = rd16(0x3e)?;
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = rd64(sh(shstrndx) + 0x18)?;
    for i in 0..shnum {
        let name_off = rd32(sh(i))?;
        let name = elf.get(strtab + name_off..)?;
        let name = &name[..name.iter().position(|&c| c == 0)?];
        if name == b".modinfo" {
            let off = rd64(sh(i) + 0x18)?;
            let size = rd64(sh(i) + 0x20)?;
            let prefix = format!("{key}=");
            return elf
                .get(off..off + size)?
                .split(|&c| c == 0)
                .filter_map(|kv| std::str::from_utf8(kv).ok())
                .find_map(|kv| kv.strip_prefix(&prefix).map(str::to_string));
        }
    }
    None
}

/// "kernel/drivers/nvdimm/nd_pmem.ko.xz" → "nd_pmem" (dashes and underscores are the same
/// to the kernel).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

/// Load order: dependencies first, each module once.
pub fn load_order(deps: &HashMap<String, (String, Vec<String>)>, wanted: &[&str]) -> Vec<String> {
    fn visit(
        m: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_string()) {
            return;
        }
        if let Some((_, ds)) = deps.get(m) {
            // modules.dep lists the full closure; visiting each first keeps the order right
            // even when it is not sorted.
            for d in ds {
                visit(d, deps, seen, out);
            }
            out.push(m.to_string());
        }
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for w in wanted {
        visit(&w.replace('-', "_"), deps, &mut seen, &mut out);
    }
    out
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        Ok(run_bytes(Command::new("xz").arg("-dc").arg(path))?)
    } else if name.ends_with(".zst") {
        Ok(run_bytes(Command::new("zstd").arg("-dc").arg(path))?)
    } else if name.ends_with(".gz") {
        Ok(run_bytes(Command::new("gzip").arg("-dc").arg(path))?)
    } else {
        Ok(fs::read(path)?)
    }
}

fn run_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// The per-kernel part: modules (decompressed: the guest loads them with finit_module and
/// busybox-free) and /etc/dax-probe/modules listing them in load order.
pub fn modules(k: &Kernel) -> Result<Vec<u8>> {
    let deps = module_deps(k, MODULES)?;
    let order = load_order(&deps, MODULES);
    let builtin = fs::read_to_string(k.modules.join("modules.builtin")).unwrap_or_default();
    for w in ["nfit", "nd_pmem", "ext4", "xfs"] {
        if !order.iter().any(|m| m == w) && !builtin.contains(&format!("/{w}.ko")) {
            bail!("kernel {} has no {w} module", k.release);
        }
    }
    let mut c = Cpio::default();
    let mut list = String::new();
    let mut sizes = BTreeMap::new();
    for m in &order {
        let (rel, _) = &deps[m];
        let data = decompress(&k.modules.join(rel))?;
        let guest = format!("lib/modules/{}/{m}.ko", k.release);
        sizes.insert(m.clone(), data.len());
        c.file(&guest, 0o644, &data);
        list.push_str(&format!("/{guest}\n"));
    }
    c.file("etc/dax-probe/modules", 0o644, list.as_bytes());
    Ok(c.finish())
}

/// Writes payload + modules as one initrd file.
pub fn write(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let mut f = fs::File::create(path)?;
    for p in parts {
        f.write_all(p)?;
    }
    Ok(())
}

/// Builds the release binaries that go into the guest.
pub fn build_binaries(ws: &Path) -> Result<PathBuf> {
    eprintln!("vm: building dax-probe and the guest programs (release)");
    run(Command::new("cargo").current_dir(ws).args([
        "build",
        "--release",
        "-p",
        "dax-probe",
        "-p",
        "dax-probe-tests",
    ]))?;
    Ok(ws.join("target/release"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.file("a/b/c", 0o644, b"hello");
        c.symlink("bin/sh", "busybox");
        let buf = c.finish();
        assert_eq!(&buf[..6], b"070701");
        assert_eq!(buf.len() % 512, 0);
        let text = String::from_utf8_lossy(&buf);
        // Parents first, each once.
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let abc = text.find("a/b/c\0").unwrap();
        assert!(a < ab && ab < abc);
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(text.matches("a/b\0").count(), 1);
    }

    #[test]
    fn modules_load_after_their_dependencies() {
        let mut deps = HashMap::new();
        let mut add = |n: &str, d: &[&str]| {
            deps.insert(
                n.to_string(),
                (
                    format!("kernel/{n}.ko"),
                    d.iter().map(|s| s.to_string()).collect(),
                ),
            );
        };
        add("nd_pmem", &["nd_btt", "libnvdimm"]);
        add("nd_btt", &["libnvdimm"]);
        add("libnvdimm", &[]);
        add("nfit", &["libnvdimm"]);
        let order = load_order(&deps, &["nfit", "nd_pmem", "not_here"]);
        assert_eq!(order, vec!["libnvdimm", "nfit", "nd_btt", "nd_pmem"]);
    }

    #[test]
    fn module_names_normalise_dashes_and_compression() {
        assert_eq!(
            module_name("kernel/arch/x86/crypto/crc32c-intel.ko.xz"),
            "crc32c_intel"
        );
        assert_eq!(module_name("kernel/fs/xfs/xfs.ko"), "xfs");
    }
}
