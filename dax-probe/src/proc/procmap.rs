//! `PROCMAP_QUERY` (Linux 6.11+): the one vma of a process that covers an address, asked of
//! its `/proc/PID/maps` with one ioctl instead of reading and parsing every line. A
//! departure's re-check of a holder asks for the vma at an address the holder map says
//! it holds; reading the whole maps is the fallback (older kernels, an odd answer).

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
};

use crate::{holders::scan::Vma, topology::DevId};

/// `struct procmap_query` of `include/uapi/linux/fs.h`.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: u64 =
    (3 << 30) | ((size_of::<ProcmapQuery>() as u64) << 16) | (0x66 << 8) | 17;
const VMA_WRITABLE: u64 = 0x02;
const VMA_SHARED: u64 = 0x08;

/// Cleared on the first kernel that does not know the ioctl: no further tries.
static SUPPORTED: AtomicBool = AtomicBool::new(true);

/// What one query found.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The vma covering the address.
    Vma(Vma),
    /// No vma covers it.
    None,
    /// The kernel cannot answer this way: read the maps instead.
    Unsupported,
}

/// The vma of the process whose `/proc/PID/maps` is `maps` that covers `addr`.
pub fn vma_at(maps: &File, addr: u64) -> io::Result<Answer> {
    if !SUPPORTED.load(Ordering::Relaxed) {
        return Ok(Answer::Unsupported);
    }
    let mut name = [0u8; 512];
    let mut q = ProcmapQuery {
        size: size_of::<ProcmapQuery>() as u64,
        query_addr: addr,
        vma_name_size: name.len() as u32,
        vma_name_addr: name.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `q` is a valid procmap_query whose name buffer outlives the call.
    let r = unsafe { libc::ioctl(maps.as_raw_fd(), PROCMAP_QUERY as _, &mut q) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(Answer::None),
            Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                SUPPORTED.store(false, Ordering::Relaxed);
                Ok(Answer::Unsupported)
            }
            // A name longer than the buffer, or anything else: the maps say it all.
            Some(libc::ENAMETOOLONG) => Ok(Answer::Unsupported),
            _ => Err(e),
        };
    }
    Ok(Answer::Vma(of_query(&q, &name)))
}

fn of_query(q: &ProcmapQuery, name: &[u8]) -> Vma {
    // vma_name_size comes back as the name's length with its NUL (0: no name).
    let len = (q.vma_name_size as usize).saturating_sub(1).min(name.len());
    Vma {
        start: q.vma_start,
        end: q.vma_end,
        shared: q.vma_flags & VMA_SHARED != 0,
        write: q.vma_flags & VMA_WRITABLE != 0,
        offset: q.vma_offset,
        dev: DevId {
            major: q.dev_major,
            minor: q.dev_minor,
        },
        ino: q.inode,
        path: String::from_utf8_lossy(&name[..len]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The struct is the kernel's 104 bytes, so the ioctl number is the kernel's.
    #[test]
    fn the_query_is_the_kernels_layout() {
        assert_eq!(size_of::<ProcmapQuery>(), 104);
        assert_eq!(PROCMAP_QUERY, 0xC068_6611);
    }

    /// On this machine's kernel (6.11+ answers; older ones say unsupported), the vma at
    /// an address of a file we map is that file's, as /proc/self/maps says it is.
    #[test]
    fn the_vma_at_an_address_is_the_one_maps_lists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * 4096]).unwrap();
        let f = File::open(&path).unwrap();
        // SAFETY: a fresh read-only mapping of our own file, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * 4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                4096,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let a = addr as u64;
        let maps = File::open("/proc/self/maps").unwrap();
        let answer = vma_at(&maps, a + 4096).unwrap();
        let listed = std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter_map(crate::holders::scan::parse_maps_line)
            .find(|v| v.start <= a && a < v.end)
            .unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(addr, 3 * 4096) };
        match answer {
            Answer::Vma(v) => assert_eq!(v, listed),
            Answer::Unsupported => eprintln!("PROCMAP_QUERY unsupported by this kernel"),
            Answer::None => panic!("no vma at a mapped address"),
        }
        assert_eq!(listed.offset, 4096);
        assert!(matches!(
            vma_at(&maps, 8).unwrap(),
            Answer::None | Answer::Unsupported
        ));
    }
}
