//! device-mapper through its control device (`/dev/mapper/control`), no `dmsetup`: read a
//! table (`DM_TABLE_STATUS` with `DM_STATUS_TABLE_FLAG`), remove a device (`DM_DEV_REMOVE`)
//! and, for the VM tests, create one (`DM_DEV_CREATE`, `DM_TABLE_LOAD`, `DM_DEV_SUSPEND`).
//!
//! Every ioctl takes one buffer: a `struct dm_ioctl` header (include/uapi/linux/dm-ioctl.h,
//! 312 bytes) followed by its data. For a table the data is a run of `struct dm_target_spec`
//! (40 bytes), each followed by its NUL-terminated parameter string. The buffer encoding and
//! decoding are pure functions so they are unit-tested without a kernel.

use std::{fs::File, io, os::fd::AsRawFd, path::Path};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::DevId;

const HEADER: usize = 312;
const SPEC: usize = 40;
const NAME_LEN: usize = 128;
// Field offsets in struct dm_ioctl: version[3] 0, data_size 12, data_start 16,
// target_count 20, open_count 24, flags 28, event_nr 32, padding 36, dev 40, name 48,
// uuid 176, data 305.
const DATA_SIZE_AT: usize = 12;
const DATA_START_AT: usize = 16;
const TARGET_COUNT_AT: usize = 20;
const FLAGS_AT: usize = 28;
const DEV_AT: usize = 40;
const NAME_AT: usize = 48;
/// Interface version 4.0.0: every kernel since 2.6 speaks it (the kernel accepts any minor
/// not above its own).
const VERSION: [u32; 3] = [4, 0, 0];

const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;

/// `_IOWR(0xfd, nr, struct dm_ioctl)`.
const fn iowr(nr: u64) -> u64 {
    (3 << 30) | ((HEADER as u64) << 16) | (0xfd << 8) | nr
}
const DM_DEV_CREATE: u64 = iowr(3);
const DM_DEV_REMOVE: u64 = iowr(4);
const DM_DEV_SUSPEND: u64 = iowr(6);
const DM_TABLE_LOAD: u64 = iowr(9);
const DM_TABLE_STATUS: u64 = iowr(12);

/// One line of a dm table: `start length type params`, in 512-byte sectors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DmTarget {
    pub start: u64,
    pub length: u64,
    /// `linear`, `striped`, `error`, …
    pub target_type: String,
    /// As the kernel prints them (`259:0 2048`, `2 8 259:0 0 259:1 0`).
    pub params: String,
}

impl DmTarget {
    /// The member devices this target maps onto with the sector offset on each, for the
    /// target types whose parameters name devices at known places (`linear`, `striped`);
    /// empty for others (`error`, `zero`).
    pub fn members(&self) -> Vec<(DevId, u64)> {
        let w: Vec<&str> = self.params.split_whitespace().collect();
        let pair = |d: &str, o: &str| Some((DevId::parse(d)?, o.parse().ok()?));
        match self.target_type.as_str() {
            "linear" if w.len() >= 2 => pair(w[0], w[1]).into_iter().collect(),
            "striped" if !w.is_empty() => {
                let n: usize = w[0].parse().unwrap_or(0);
                (0..n)
                    .filter_map(|i| pair(w.get(2 + 2 * i)?, w.get(3 + 2 * i)?))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// `striped`: the chunk size in sectors.
    pub fn chunk_sectors(&self) -> Option<u64> {
        (self.target_type == "striped")
            .then(|| self.params.split_whitespace().nth(1)?.parse().ok())
            .flatten()
    }
}

fn header(name: &str, flags: u32, data_size: usize) -> io::Result<Vec<u8>> {
    if name.is_empty() || name.len() >= NAME_LEN || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a device-mapper name"),
        ));
    }
    let mut b = vec![0u8; data_size.max(HEADER)];
    for (i, v) in VERSION.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let len = b.len() as u32;
    b[DATA_SIZE_AT..DATA_SIZE_AT + 4].copy_from_slice(&len.to_ne_bytes());
    b[DATA_START_AT..DATA_START_AT + 4].copy_from_slice(&(HEADER as u32).to_ne_bytes());
    b[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&flags.to_ne_bytes());
    b[NAME_AT..NAME_AT + name.len()].copy_from_slice(name.as_bytes());
    Ok(b)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The targets of a `DM_TABLE_STATUS` answer. A status answer's `next` counts from the
/// start of the data (not from the current spec, as in a load).
pub fn decode_table(b: &[u8]) -> io::Result<Vec<DmTarget>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("dm table: {what}"));
    let count = u32_at(b, TARGET_COUNT_AT).ok_or_else(|| bad("short header"))? as usize;
    let data_start = u32_at(b, DATA_START_AT).ok_or_else(|| bad("short header"))? as usize;
    let data_size =
        (u32_at(b, DATA_SIZE_AT).ok_or_else(|| bad("short header"))? as usize).min(b.len());
    let mut out = Vec::with_capacity(count.min(64));
    let mut at = data_start;
    for _ in 0..count {
        if at + SPEC > data_size {
            return Err(bad("a target runs past the buffer"));
        }
        let s = &b[at..];
        let start = u64_at(s, 0).ok_or_else(|| bad("short target"))?;
        let length = u64_at(s, 8).ok_or_else(|| bad("short target"))?;
        let next = u32_at(s, 20).ok_or_else(|| bad("short target"))? as usize;
        let cstr = |x: &[u8]| {
            let end = x.iter().position(|&c| c == 0).unwrap_or(x.len());
            String::from_utf8_lossy(&x[..end]).into_owned()
        };
        let target_type = cstr(&s[24..40]);
        let params = cstr(&b[at + SPEC..data_size]);
        out.push(DmTarget {
            start,
            length,
            target_type,
            params,
        });
        let following = data_start + next;
        if following <= at && out.len() < count {
            return Err(bad("targets do not advance"));
        }
        at = following;
    }
    Ok(out)
}

/// The buffer of a `DM_TABLE_LOAD`: a load's `next` counts from the current spec.
pub fn encode_load(name: &str, targets: &[DmTarget]) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    for t in targets {
        if t.target_type.len() >= 16 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "dm target type too long",
            ));
        }
        let mut params = t.params.as_bytes().to_vec();
        params.push(0);
        while !(SPEC + params.len()).is_multiple_of(8) {
            params.push(0);
        }
        let mut spec = vec![0u8; SPEC];
        spec[0..8].copy_from_slice(&t.start.to_ne_bytes());
        spec[8..16].copy_from_slice(&t.length.to_ne_bytes());
        spec[20..24].copy_from_slice(&((SPEC + params.len()) as u32).to_ne_bytes());
        spec[24..24 + t.target_type.len()].copy_from_slice(t.target_type.as_bytes());
        data.extend_from_slice(&spec);
        data.extend_from_slice(&params);
    }
    let mut b = header(name, 0, HEADER + data.len())?;
    b[TARGET_COUNT_AT..TARGET_COUNT_AT + 4].copy_from_slice(&(targets.len() as u32).to_ne_bytes());
    b[HEADER..].copy_from_slice(&data);
    Ok(b)
}

fn control(root: &Path) -> io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .open(root.join("dev/mapper/control"))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open /dev/mapper/control ({e}): reading dm tables needs root"),
            )
        })
}

fn ioctl(f: &File, req: u64, buf: &mut [u8]) -> io::Result<()> {
    // SAFETY: the buffer is at least a dm_ioctl header and its data_size says how long it
    // is; the kernel writes no further.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The table of the dm device `name` (`/sys/block/dm-X/dm/name`).
pub fn table(root: &Path, name: &str) -> io::Result<Vec<DmTarget>> {
    let f = control(root)?;
    let mut size = 16 * 1024;
    loop {
        let mut b = header(name, DM_STATUS_TABLE_FLAG, size)?;
        ioctl(&f, DM_TABLE_STATUS, &mut b)?;
        let flags = u32_at(&b, FLAGS_AT).unwrap_or(0);
        if flags & DM_BUFFER_FULL_FLAG != 0 && size < (1 << 22) {
            size *= 4;
            continue;
        }
        return decode_table(&b);
    }
}

/// Removes the dm device `name` (fails with EBUSY while it is open or mounted).
pub fn remove(root: &Path, name: &str) -> io::Result<()> {
    let f = control(root)?;
    let mut b = header(name, 0, HEADER)?;
    ioctl(&f, DM_DEV_REMOVE, &mut b)
}

/// Creates and activates the dm device `name` with `targets` (the VM tests' `dmsetup
/// create`). Returns its device number.
pub fn create(root: &Path, name: &str, targets: &[DmTarget]) -> io::Result<DevId> {
    let f = control(root)?;
    let mut b = header(name, 0, HEADER)?;
    ioctl(&f, DM_DEV_CREATE, &mut b)?;
    let mut load = encode_load(name, targets)?;
    if let Err(e) = ioctl(&f, DM_TABLE_LOAD, &mut load) {
        let _ = remove(root, name);
        return Err(e);
    }
    // Resume: a suspend without DM_SUSPEND_FLAG (1 << 1) activates the loaded table.
    let mut b = header(name, 0, HEADER)?;
    ioctl(&f, DM_DEV_SUSPEND, &mut b)?;
    let dev = u64_at(&b, DEV_AT).unwrap_or(0);
    Ok(DevId::from_user(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(start: u64, len: u64, dev: &str, off: u64) -> DmTarget {
        DmTarget {
            start,
            length: len,
            target_type: "linear".into(),
            params: format!("{dev} {off}"),
        }
    }

    /// A status answer as the kernel writes it: `next` from the start of the data.
    fn status(targets: &[DmTarget]) -> Vec<u8> {
        let load = encode_load("s", targets).unwrap();
        let mut b = load.clone();
        let mut at = HEADER;
        for _ in targets {
            let rel = u32_at(&b, at + 20).unwrap() as usize;
            let abs = (at - HEADER + rel) as u32;
            b[at + 20..at + 24].copy_from_slice(&abs.to_ne_bytes());
            at += rel;
        }
        b
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From strace of `dmsetup table` / `dmsetup remove`.
        assert_eq!(DM_TABLE_STATUS, 0xc138fd0c);
        assert_eq!(DM_DEV_REMOVE, 0xc138fd04);
        assert_eq!(DM_DEV_CREATE, 0xc138fd03);
    }

    /// A load buffer laid out as include/uapi/linux/dm-ioctl.h says, checked field by field
    /// (the first VM run found target_count written into open_count: "populate_table: no
    /// targets specified").
    #[test]
    fn the_header_is_the_kernels_struct_dm_ioctl() {
        let b = encode_load("lin", &[linear(0, 8, "259:0", 0)]).unwrap();
        let u = |at| u32_at(&b, at).unwrap();
        assert_eq!([u(0), u(4), u(8)], VERSION);
        assert_eq!(u(12) as usize, b.len(), "data_size");
        assert_eq!(u(16), 312, "data_start");
        assert_eq!(u(20), 1, "target_count");
        assert_eq!(u(24), 0, "open_count");
        assert_eq!(&b[48..52], b"lin\0", "name");
        // The spec: sector_start, length, status, next, target_type, then the params.
        assert_eq!(u64_at(&b, 312 + 8), Some(8));
        assert_eq!(u(312 + 20) as usize, b.len() - 312, "next: to the end");
        assert_eq!(&b[312 + 24..312 + 30], b"linear");
        assert_eq!(&b[352..360], b"259:0 0\0");
    }

    #[test]
    fn a_table_round_trips_and_names_its_members() {
        let t = vec![
            linear(0, 1_000_000, "259:0", 0),
            linear(1_000_000, 1_000_000, "259:1", 2048),
        ];
        let got = decode_table(&status(&t)).unwrap();
        assert_eq!(got, t);
        assert_eq!(
            got[1].members(),
            vec![(
                DevId {
                    major: 259,
                    minor: 1
                },
                2048
            )]
        );
        let s = DmTarget {
            start: 0,
            length: 2_000_000,
            target_type: "striped".into(),
            params: "2 8 259:0 0 259:1 16".into(),
        };
        assert_eq!(s.members().len(), 2);
        assert_eq!(s.members()[1].1, 16);
        assert_eq!(s.chunk_sectors(), Some(8));
        assert_eq!(
            decode_table(&status(std::slice::from_ref(&s))).unwrap(),
            vec![s]
        );
    }

    #[test]
    fn crafted_answers_are_errors_not_panics() {
        let mut b = status(&[linear(0, 8, "259:0", 0)]);
        // More targets than the buffer holds.
        b[TARGET_COUNT_AT..TARGET_COUNT_AT + 4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(decode_table(&b).is_err());
        // A `next` that points back.
        let mut b = status(&[linear(0, 8, "259:0", 0), linear(8, 8, "259:1", 0)]);
        b[HEADER + 20..HEADER + 24].copy_from_slice(&0u32.to_ne_bytes());
        assert!(decode_table(&b).is_err());
        assert!(decode_table(&[0u8; 10]).is_err());
        // Names the control device would misread.
        assert!(header("", 0, HEADER).is_err());
        assert!(header(&"x".repeat(128), 0, HEADER).is_err());
        assert!(header("a/b", 0, HEADER).is_err());
    }
}
