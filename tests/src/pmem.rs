//! Turning the emulated nvdimm's raw namespaces into fsdax (and devdax) devices through
//! sysfs, then making DAX file systems on them. This is what `ndctl create-namespace -m
//! fsdax` does, written out so the guest needs no ndctl.

use std::{fs, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::sys;

const ND: &str = "/sys/bus/nd/devices";

/// A configured fsdax device.
#[derive(Clone, Debug, Serialize)]
pub struct Fsdax {
    pub region: String,
    pub namespace: String,
    /// `pfnX.Y`
    pub pfn_dev: String,
    /// `pmemX`
    pub block: String,
    /// Physical range user mappings can reach: `[start, end)`, read from the pfn device.
    pub data_start: u64,
    pub data_end: u64,
}

impl Fsdax {
    pub fn dev_path(&self) -> String {
        format!("/dev/{}", self.block)
    }
    pub fn contains_pfn(&self, pfn: u64) -> bool {
        let a = pfn << 12;
        a >= self.data_start && a < self.data_end
    }
}

/// Regions of the emulated nvdimms, in order.
pub fn regions() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(ND)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("region"))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|n| {
        n.trim_start_matches("region")
            .parse::<u32>()
            .unwrap_or(u32::MAX)
    });
    v
}

/// The raw namespace of a region (`namespaceN.0` for a label-less or fresh nvdimm).
fn raw_namespace(region: &str) -> Result<String> {
    let id = region.trim_start_matches("region");
    let ns = format!("namespace{id}.0");
    let size = sys::read_u64(format!("{ND}/{ns}/size"))?;
    if size == 0 {
        bail!("{ns} has size 0: the nvdimm has no raw namespace to convert");
    }
    Ok(ns)
}

/// The block device directory name under `dir/block/`.
fn block_under(dir: &str) -> Option<String> {
    fs::read_dir(format!("{dir}/block"))
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
}

/// Converts `region`'s raw namespace to fsdax with 2 MiB alignment (PMD mappings possible).
pub fn make_fsdax(region: &str) -> Result<Fsdax> {
    let ns = raw_namespace(region)?;
    let seed = sys::read(format!("{ND}/{region}/pfn_seed"))?;
    // The namespace must be released by nd_pmem before a pfn device can claim it.
    if Path::new(&format!("{ND}/{ns}/driver")).exists() {
        sys::write("/sys/bus/nd/drivers/nd_pmem/unbind", &ns)?;
    }
    sys::write(format!("{ND}/{seed}/uuid"), &sys::uuid())?;
    sys::write(format!("{ND}/{seed}/mode"), "pmem")?;
    sys::write(format!("{ND}/{seed}/align"), "2097152")?;
    sys::write(format!("{ND}/{seed}/namespace"), &ns)?;
    sys::write("/sys/bus/nd/drivers/nd_pmem/bind", &seed)
        .with_context(|| format!("bind {seed} to nd_pmem"))?;
    let dir = format!("{ND}/{seed}");
    let mut block = None;
    sys::wait_for(Duration::from_secs(10), || {
        block = block_under(&dir);
        block
            .as_ref()
            .is_some_and(|b| Path::new(&format!("/dev/{b}")).exists())
    });
    let block = block.with_context(|| format!("{seed} bound but no block device appeared"))?;
    let data_start = sys::read_u64(format!("{dir}/resource"))?;
    let size = sys::read_u64(format!("{dir}/size"))?;
    Ok(Fsdax {
        region: region.to_string(),
        namespace: ns,
        pfn_dev: seed,
        block,
        data_start,
        data_end: data_start + size,
    })
}

/// A configured device-dax device.
#[derive(Clone, Debug, Serialize)]
pub struct Devdax {
    pub region: String,
    pub namespace: String,
    /// `daxX.Y`: the character device under /dev.
    pub name: String,
    pub data_start: u64,
    pub data_end: u64,
}

impl Devdax {
    pub fn dev_path(&self) -> String {
        format!("/dev/{}", self.name)
    }
    pub fn contains_pfn(&self, pfn: u64) -> bool {
        let a = pfn << 12;
        a >= self.data_start && a < self.data_end
    }
}

/// Converts `region`'s raw namespace to device-dax with 2 MiB alignment.
pub fn make_devdax(region: &str) -> Result<Devdax> {
    let ns = raw_namespace(region)?;
    let seed = sys::read(format!("{ND}/{region}/dax_seed"))?;
    if Path::new(&format!("{ND}/{ns}/driver")).exists() {
        sys::write("/sys/bus/nd/drivers/nd_pmem/unbind", &ns)?;
    }
    sys::write(format!("{ND}/{seed}/uuid"), &sys::uuid())?;
    sys::write(format!("{ND}/{seed}/mode"), "pmem")?;
    sys::write(format!("{ND}/{seed}/align"), "2097152")?;
    sys::write(format!("{ND}/{seed}/namespace"), &ns)?;
    sys::write("/sys/bus/nd/drivers/dax_pmem/bind", &seed)
        .with_context(|| format!("bind {seed} to dax_pmem"))?;
    // The device-dax device shows up on the dax bus (named like the seed on the kernels we
    // test, but look it up rather than assume).
    let mut name = None;
    sys::wait_for(Duration::from_secs(10), || {
        name = fs::read_dir("/sys/bus/dax/devices").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| {
                    fs::read_link(format!("/sys/bus/dax/devices/{n}"))
                        .map(|l| l.to_string_lossy().contains(&format!("/{seed}/")))
                        .unwrap_or(false)
                })
        });
        name.as_ref()
            .is_some_and(|n| Path::new(&format!("/dev/{n}")).exists())
    });
    let name = name.with_context(|| format!("{seed} bound but no /dev/dax device appeared"))?;
    let dir = format!("/sys/bus/dax/devices/{name}");
    let data_start = sys::read_u64(format!("{dir}/resource"))?;
    let size = sys::read_u64(format!("{dir}/size"))?;
    Ok(Devdax {
        region: region.to_string(),
        namespace: ns,
        name,
        data_start,
        data_end: data_start + size,
    })
}

/// Makes an ext4 file system that allows DAX and 2 MiB-aligned allocations, mounted -o dax.
pub fn mount_ext4(dev: &Fsdax, mnt: &str) -> Result<()> {
    // -b 4096: DAX needs block size == page size. stride/stripe_width of 512 blocks (2 MiB)
    // makes mballoc align large allocations, which PMD faults need.
    sys::run(
        "/sbin/mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "stride=512,stripe_width=512",
            &dev.dev_path(),
        ],
    )?;
    sys::mount(&dev.dev_path(), mnt, "ext4", "dax")
}

/// Makes an xfs with 2 MiB stripe alignment (and an explicit log: with stripe alignment on a
/// 500 MiB device mkfs.xfs would otherwise pick a log below its own 64 MiB minimum; two
/// allocation groups leave room for it). With `reflink`, also reflink and rmapbt (needed
/// for the kernel's notify_failure); returns false when this kernel refuses DAX on such a
/// file system, after falling back to one without reflink.
pub fn mount_xfs(dev: &Fsdax, mnt: &str, reflink: bool) -> Result<bool> {
    let mkfs = |m: &str| {
        sys::run(
            "/sbin/mkfs.xfs",
            &[
                "-q",
                "-f",
                "-m",
                m,
                "-d",
                "su=2m,sw=1,agcount=2",
                "-l",
                "size=64m",
                &dev.dev_path(),
            ],
        )
    };
    if reflink {
        mkfs("reflink=1,rmapbt=1")?;
        match sys::mount(&dev.dev_path(), mnt, "xfs", "dax") {
            Ok(()) => return Ok(true),
            Err(e) => crate::report::note(&format!(
                "xfs with reflink+rmapbt refuses DAX here ({e}); using reflink=0"
            )),
        }
    }
    mkfs("reflink=0")?;
    sys::mount(&dev.dev_path(), mnt, "xfs", "dax")?;
    Ok(false)
}

/// Writes `len` bytes of a recognisable pattern and syncs, so every page is allocated and
/// written (a read fault on it maps pmem, not the zero page).
///
/// The whole length is preallocated first in one request: DAX writes allocate per call, and
/// allocations smaller than the 2 MiB stripe unit are not aligned, which would rule out PMD
/// mappings of the file.
pub fn write_file(path: &Path, len: usize) -> Result<()> {
    use std::{io::Write, os::fd::AsRawFd};
    let mut f = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    // SAFETY: valid fd; plain syscall.
    if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) } != 0 {
        bail!(
            "fallocate {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    let chunk: Vec<u8> = (0..(2 << 20)).map(|i: usize| (i % 251) as u8 + 1).collect();
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.sync_all()?;
    Ok(())
}

/// A new tenant's data: a file of `len` bytes whose every 4 KiB page begins with `marker`
/// (the rest zero), synced. A process still mapping an earlier binding of the device reads
/// these pages if the kernel hands it the new tenant's memory.
pub fn fill_tenant(path: &Path, len: usize, marker: &str) -> Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut chunk = vec![0u8; 2 << 20];
    for page in chunk.chunks_mut(4096) {
        page[..marker.len()].copy_from_slice(marker.as_bytes());
    }
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])
            .with_context(|| format!("fill {}", path.display()))?;
        left -= n;
    }
    f.sync_all()?;
    Ok(())
}

/// Free bytes of the file system mounted at `mnt`.
pub fn free_bytes(mnt: &str) -> Result<u64> {
    let c = std::ffi::CString::new(mnt)?;
    // SAFETY: valid path and out-pointer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        bail!("statvfs {mnt}: {}", std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The device number of a block device node (`/dev/pmem0` → 259:0), as "MAJ:MIN".
pub fn block_devt(dev: &Fsdax) -> Option<String> {
    fs::read_to_string(format!("/sys/class/block/{}/dev", dev.block))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Unbinds an fsdax device from nd_pmem (what an operator's `echo pfn0.0 > unbind` does).
/// Returns when the kernel finished the unbind.
pub fn unbind_fsdax(dev: &Fsdax) -> Result<()> {
    sys::write("/sys/bus/nd/drivers/nd_pmem/unbind", &dev.pfn_dev)
        .with_context(|| format!("unbind {}", dev.pfn_dev))
}

/// An unbind running on its own thread: some kernels block it until every holder let go.
pub struct Unbind {
    rx: std::sync::mpsc::Receiver<Result<()>>,
}

impl Unbind {
    /// Starts unbinding `dev` without waiting for the kernel.
    pub fn start(dev: &Fsdax) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let pfn_dev = dev.pfn_dev.clone();
        std::thread::spawn(move || {
            let r = sys::write("/sys/bus/nd/drivers/nd_pmem/unbind", &pfn_dev)
                .with_context(|| format!("unbind {pfn_dev}"));
            let _ = tx.send(r);
        });
        Self { rx }
    }

    /// The unbind's result if it finished within `within`, None if it still blocks.
    pub fn wait(&self, within: Duration) -> Option<Result<()>> {
        self.rx.recv_timeout(within).ok()
    }
}

/// Is the device's driver bound?
pub fn is_bound(dev: &Fsdax) -> bool {
    Path::new(&format!("{ND}/{}/driver", dev.pfn_dev)).exists()
}

/// Binds an unbound fsdax device again and refreshes its block device name and range.
pub fn rebind_fsdax(dev: &mut Fsdax) -> Result<()> {
    if !is_bound(dev) {
        sys::write("/sys/bus/nd/drivers/nd_pmem/bind", &dev.pfn_dev)
            .with_context(|| format!("bind {}", dev.pfn_dev))?;
    }
    let dir = format!("{ND}/{}", dev.pfn_dev);
    let mut block = None;
    sys::wait_for(Duration::from_secs(10), || {
        block = block_under(&dir);
        block
            .as_ref()
            .is_some_and(|b| Path::new(&format!("/dev/{b}")).exists())
    });
    dev.block = block.with_context(|| format!("{} rebound but no block device", dev.pfn_dev))?;
    dev.data_start = sys::read_u64(format!("{dir}/resource"))?;
    dev.data_end = dev.data_start + sys::read_u64(format!("{dir}/size"))?;
    Ok(())
}

/// Detaches whatever is mounted at `mnt` (lazily: a file system whose device vanished may
/// not unmount cleanly).
pub fn detach(mnt: &str) {
    let c = std::ffi::CString::new(mnt).unwrap();
    // SAFETY: valid path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Set when an unbind in this boot never finished: every later namespace operation on the
/// nvdimm bus would wait on it, so the guest runs nothing more that needs one.
static BUS_WEDGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn mark_bus_wedged() {
    BUS_WEDGED.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub fn bus_wedged() -> bool {
    BUS_WEDGED.load(std::sync::atomic::Ordering::Relaxed)
}
