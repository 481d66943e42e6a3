//! Mounts from `/proc/self/mountinfo`, with their DAX setting.

use std::{fs, path::Path};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::DevId;

/// The file system's DAX setting as mount options express it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DaxOption {
    /// `-o dax` / `dax=always`: every regular file is DAX.
    Always,
    /// `dax=inode`: per-file attribute (FS_XFLAG_DAX) decides.
    Inode,
    /// Not DAX (`dax=never` or no option).
    Never,
}

impl DaxOption {
    pub fn is_dax(self) -> bool {
        !matches!(self, DaxOption::Never)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Mount {
    pub dev: DevId,
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
    pub dax: DaxOption,
    /// XFS: the realtime device (`rtdev=` among the super options), as the mount names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtdev: Option<String>,
}

/// Reads `proc/self/mountinfo` below `root`. Unreadable → no mounts (reported by callers
/// that need them).
pub fn read_mounts(root: &Path) -> Vec<Mount> {
    fs::read_to_string(root.join("proc/self/mountinfo"))
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// mountinfo escapes blanks in paths as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // The kernel writes \000-\377 only; "\777" (found by the procfs_text fuzz target)
        // overflowed a u8 and is kept literally.
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            && let Ok(v) = u8::try_from(
                u16::from(b[i + 1] - b'0') * 64
                    + u16::from(b[i + 2] - b'0') * 8
                    + u16::from(b[i + 3] - b'0'),
            )
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mount_point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 3 {
            continue;
        }
        let Some(dev) = DevId::parse(l[2]) else {
            continue;
        };
        let opts = l[5].split(',').chain(r[2].split(','));
        let mut dax = DaxOption::Never;
        let mut rtdev = None;
        for o in opts {
            match o {
                "dax" | "dax=always" => dax = DaxOption::Always,
                "dax=inode" => dax = DaxOption::Inode,
                _ => {
                    if let Some(rt) = o.strip_prefix("rtdev=") {
                        rtdev = Some(unescape(rt));
                    }
                }
            }
        }
        out.push(Mount {
            dev,
            mount_point: unescape(l[4]),
            fstype: r[0].to_string(),
            source: unescape(r[1]),
            dax,
            rtdev,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_dax_mounts_in_both_spellings() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
30 1 259:0 / /mnt/ext4 rw,relatime - ext4 /dev/pmem0 rw,dax
31 1 259:1 / /mnt/xfs\\040dir rw,relatime - xfs /dev/pmem1 rw,attr2,dax=always,inode64
32 1 259:2 / /mnt/inode rw - xfs /dev/pmem2 rw,dax=inode
33 1 8:1 / / rw - ext4 /dev/sda1 rw,dax=never
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 5);
        assert_eq!(m[1].dax, DaxOption::Always);
        assert_eq!(
            m[1].dev,
            DevId {
                major: 259,
                minor: 0
            }
        );
        assert_eq!(m[2].mount_point, "/mnt/xfs dir");
        assert_eq!(m[2].dax, DaxOption::Always);
        assert_eq!(m[3].dax, DaxOption::Inode);
        assert_eq!(m[4].dax, DaxOption::Never);
        assert_eq!(m[0].dax, DaxOption::Never);
        assert!(m.iter().all(|m| m.rtdev.is_none()));
        let rt = parse_mountinfo(
            "40 1 259:0 / /mnt/rt rw - xfs /dev/pmem0 rw,dax=always,rtdev=/dev/pmem1,noquota\n",
        );
        assert_eq!(rt[0].rtdev.as_deref(), Some("/dev/pmem1"));
    }

    #[test]
    fn ignores_garbage_lines() {
        assert!(parse_mountinfo("nonsense\n1 2 3\n").is_empty());
    }

    #[test]
    fn octal_escapes_beyond_a_byte_stay_literal() {
        assert_eq!(super::unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(super::unescape("/mnt/\\777"), "/mnt/\\777");
    }
}
