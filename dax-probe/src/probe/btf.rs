//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux` and split module BTF).
//!
//! aya can load programs against BTF but does not expose the type graph, and we need more than
//! "does this function exist": struct member offsets (through anonymous members, because
//! `struct vm_fault` hides its fields in an anonymous const struct from 6.1), function
//! parameter names (to find where `vmf` and `pfn` sit in a prototype that changed three
//! times), enum values and tracepoint typedefs. This module parses exactly that, read-only.

use std::{collections::HashMap, fs, path::Path};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: not BTF ({why})")]
    Malformed { what: String, why: String },
}

const BTF_MAGIC: u16 = 0xeb9f;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Void,
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
    Unknown(u32),
}

impl Kind {
    fn from_raw(k: u32) -> Self {
        match k {
            0 => Self::Void,
            1 => Self::Int,
            2 => Self::Ptr,
            3 => Self::Array,
            4 => Self::Struct,
            5 => Self::Union,
            6 => Self::Enum,
            7 => Self::Fwd,
            8 => Self::Typedef,
            9 => Self::Volatile,
            10 => Self::Const,
            11 => Self::Restrict,
            12 => Self::Func,
            13 => Self::FuncProto,
            14 => Self::Var,
            15 => Self::Datasec,
            16 => Self::Float,
            17 => Self::DeclTag,
            18 => Self::TypeTag,
            19 => Self::Enum64,
            other => Self::Unknown(other),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub type_id: u32,
    /// Offset in bits from the start of the containing struct.
    pub bit_offset: u32,
}

#[derive(Clone, Debug)]
pub struct Type {
    pub kind: Kind,
    pub name: String,
    /// Size for INT/STRUCT/UNION/ENUM; referenced type id for PTR/TYPEDEF/CONST/FUNC/….
    pub size_or_type: u32,
    /// STRUCT/UNION members, FUNC_PROTO parameters (bit_offset unused), ENUM values in
    /// `bit_offset` (as u32 bits of the i32 value).
    pub members: Vec<Member>,
}

/// A parsed BTF blob. For split (module) BTF, type ids continue after the base's.
#[derive(Debug)]
pub struct Btf {
    /// Index 0 is `void`. For split BTF, ids below `first_id` belong to the base and are
    /// looked up there.
    types: Vec<Type>,
    first_id: u32,
    by_name: HashMap<String, Vec<u32>>,
    /// This blob's own string section; offsets below `strings_base` belong to the base.
    strings: Vec<u8>,
    strings_base: usize,
    base: Option<Box<Btf>>,
}

/// A parameter of a kernel function, by position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub type_name: String,
}

impl Btf {
    /// Parses `/sys/kernel/btf/vmlinux` (or any standalone BTF file).
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data, None, &path.display().to_string())
    }

    /// Parses a module's split BTF on top of `base` (vmlinux).
    pub fn from_module_file(path: &Path, base: Btf) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data, Some(base), &path.display().to_string())
    }

    pub fn parse(data: &[u8], base: Option<Btf>, what: &str) -> Result<Self, BtfError> {
        let bad = |why: &str| BtfError::Malformed {
            what: what.to_string(),
            why: why.to_string(),
        };
        if data.len() < 24 {
            return Err(bad("shorter than a header"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
        if u16_at(0) != BTF_MAGIC {
            return Err(bad("bad magic (big-endian BTF is not supported)"));
        }
        let rd = |o: usize| -> Result<u32, BtfError> {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| bad("truncated"))
        };
        let hdr_len = rd(4)? as usize;
        let type_off = rd(8)? as usize;
        let type_len = rd(12)? as usize;
        let str_off = rd(16)? as usize;
        let str_len = rd(20)? as usize;
        let types_start = hdr_len + type_off;
        let strs_start = hdr_len + str_off;
        if types_start + type_len > data.len() || strs_start + str_len > data.len() {
            return Err(bad("sections run past the end of the file"));
        }
        let strings = &data[strs_start..strs_start + str_len];
        let (base_str_len, first_id) = match &base {
            Some(b) => (b.string_len(), b.next_id()),
            None => (0, 1),
        };
        let base_ref = base.as_ref();
        let name_at = |off: u32| -> String {
            let off = off as usize;
            if off < base_str_len {
                base_ref.map(|b| b.string_at(off)).unwrap_or_default()
            } else {
                let off = off - base_str_len;
                strings
                    .get(off..)
                    .map(|s| {
                        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
                        String::from_utf8_lossy(&s[..end]).into_owned()
                    })
                    .unwrap_or_default()
            }
        };

        let mut types = Vec::new();
        if base.is_none() {
            types.push(Type {
                kind: Kind::Void,
                name: String::new(),
                size_or_type: 0,
                members: Vec::new(),
            });
        }
        let mut pos = types_start;
        let end = types_start + type_len;
        while pos < end {
            let name_off = rd(pos)?;
            let info = rd(pos + 4)?;
            let size_or_type = rd(pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = Kind::from_raw((info >> 24) & 0x1f);
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                Kind::Int | Kind::Var | Kind::DeclTag => pos += 4,
                Kind::Array => pos += 12,
                Kind::Struct | Kind::Union => {
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let raw_off = rd(m + 8)?;
                        members.push(Member {
                            name: name_at(rd(m)?),
                            type_id: rd(m + 4)?,
                            bit_offset: if kind_flag {
                                raw_off & 0x00ff_ffff
                            } else {
                                raw_off
                            },
                        });
                    }
                    pos += vlen * 12;
                }
                Kind::Enum => {
                    for i in 0..vlen {
                        let m = pos + i * 8;
                        members.push(Member {
                            name: name_at(rd(m)?),
                            type_id: 0,
                            bit_offset: rd(m + 4)?,
                        });
                    }
                    pos += vlen * 8;
                }
                Kind::Enum64 => {
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        members.push(Member {
                            name: name_at(rd(m)?),
                            type_id: 0,
                            bit_offset: rd(m + 4)?,
                        });
                    }
                    pos += vlen * 12;
                }
                Kind::FuncProto => {
                    for i in 0..vlen {
                        let m = pos + i * 8;
                        members.push(Member {
                            name: name_at(rd(m)?),
                            type_id: rd(m + 4)?,
                            bit_offset: 0,
                        });
                    }
                    pos += vlen * 8;
                }
                Kind::Datasec => pos += vlen * 12,
                Kind::Ptr
                | Kind::Fwd
                | Kind::Typedef
                | Kind::Volatile
                | Kind::Const
                | Kind::Restrict
                | Kind::Func
                | Kind::Float
                | Kind::TypeTag
                | Kind::Void => {}
                Kind::Unknown(k) => return Err(bad(&format!("unknown BTF kind {k}"))),
            }
            types.push(Type {
                kind,
                name: name_at(name_off),
                size_or_type,
                members,
            });
        }
        if pos != end {
            return Err(bad("type section does not end on a type boundary"));
        }

        let first = if base.is_none() { 0 } else { first_id };
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, t) in types.iter().enumerate() {
            if !t.name.is_empty() {
                by_name
                    .entry(t.name.clone())
                    .or_default()
                    .push(first + i as u32);
            }
        }
        Ok(Btf {
            types,
            first_id: first,
            by_name,
            strings: strings.to_vec(),
            strings_base: base_str_len,
            base: base.map(Box::new),
        })
    }

    fn next_id(&self) -> u32 {
        self.first_id + self.types.len() as u32
    }

    /// Total string section length including the base's: split BTF continues from here.
    fn string_len(&self) -> usize {
        self.strings_base + self.strings.len()
    }

    fn string_at(&self, off: usize) -> String {
        if off < self.strings_base {
            return self
                .base
                .as_ref()
                .map(|b| b.string_at(off))
                .unwrap_or_default();
        }
        let s = &self.strings[off - self.strings_base..];
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        String::from_utf8_lossy(&s[..end]).into_owned()
    }

    pub fn type_by_id(&self, id: u32) -> Option<&Type> {
        if id < self.first_id {
            return self.base.as_ref()?.type_by_id(id);
        }
        self.types.get((id - self.first_id) as usize)
    }

    /// Ids of every type called `name` in this BTF (not the base).
    fn ids_named(&self, name: &str) -> &[u32] {
        self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    fn find(&self, name: &str, kind: Kind) -> Option<(u32, &Type)> {
        for &id in self.ids_named(name) {
            if let Some(t) = self.type_by_id(id)
                && t.kind == kind
            {
                return Some((id, t));
            }
        }
        self.base.as_ref()?.find(name, kind)
    }

    /// Is there a FUNC of this name (in this BTF or its base)?
    pub fn has_func(&self, name: &str) -> bool {
        self.find(name, Kind::Func).is_some()
    }

    /// Is there a FUNC of this name in this BTF itself (not the base)? Used for modules.
    pub fn has_own_func(&self, name: &str) -> bool {
        self.ids_named(name)
            .iter()
            .any(|&id| self.type_by_id(id).is_some_and(|t| t.kind == Kind::Func))
    }

    pub fn has_typedef(&self, name: &str) -> bool {
        self.find(name, Kind::Typedef).is_some()
    }

    pub fn has_struct(&self, name: &str) -> bool {
        self.find(name, Kind::Struct).is_some()
    }

    /// Parameters of function `name`, in order.
    pub fn func_params(&self, name: &str) -> Option<Vec<Param>> {
        let (_, func) = self.find(name, Kind::Func)?;
        let proto = self.type_by_id(func.size_or_type)?;
        if proto.kind != Kind::FuncProto {
            return None;
        }
        Some(
            proto
                .members
                .iter()
                .map(|m| Param {
                    name: m.name.clone(),
                    type_name: self.type_name(m.type_id),
                })
                .collect(),
        )
    }

    /// Value of enumerator `variant` of `enum name`, searching every enum of that name.
    pub fn enum_value(&self, enum_name: &str, variant: &str) -> Option<i64> {
        for kind in [Kind::Enum, Kind::Enum64] {
            if let Some((_, t)) = self.find(enum_name, kind)
                && let Some(m) = t.members.iter().find(|m| m.name == variant)
            {
                return Some(m.bit_offset as i32 as i64);
            }
        }
        None
    }

    /// Byte offset of `path` (e.g. `["address"]`, `["vm_file"]`) inside `struct name`,
    /// descending through anonymous struct/union members the way C name lookup does.
    pub fn member_offset(&self, struct_name: &str, path: &[&str]) -> Option<u32> {
        let (mut id, _) = self.find(struct_name, Kind::Struct)?;
        let mut total_bits = 0u32;
        for (i, field) in path.iter().enumerate() {
            let (bits, member_type) = self.find_member(id, field)?;
            total_bits += bits;
            if i + 1 < path.len() {
                id = self.resolve(member_type)?;
            }
        }
        total_bits.is_multiple_of(8).then_some(total_bits / 8)
    }

    /// Size in bytes of the type of `struct_name.field` (after typedef/const resolution).
    pub fn member_size(&self, struct_name: &str, field: &str) -> Option<u32> {
        let (id, _) = self.find(struct_name, Kind::Struct)?;
        let (_, ty) = self.find_member(id, field)?;
        self.size_of(ty)
    }

    fn find_member(&self, struct_id: u32, field: &str) -> Option<(u32, u32)> {
        let t = self.type_by_id(self.resolve(struct_id)?)?;
        if !matches!(t.kind, Kind::Struct | Kind::Union) {
            return None;
        }
        for m in &t.members {
            if m.name == field {
                return Some((m.bit_offset, m.type_id));
            }
        }
        for m in t.members.iter().filter(|m| m.name.is_empty()) {
            if let Some((bits, ty)) = self.find_member(m.type_id, field) {
                return Some((m.bit_offset + bits, ty));
            }
        }
        None
    }

    /// Follows typedef/const/volatile/restrict/type_tag to the underlying type id.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            let t = self.type_by_id(id)?;
            match t.kind {
                Kind::Typedef | Kind::Const | Kind::Volatile | Kind::Restrict | Kind::TypeTag => {
                    id = t.size_or_type
                }
                _ => return Some(id),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<u32> {
        let t = self.type_by_id(self.resolve(id)?)?;
        match t.kind {
            Kind::Int | Kind::Struct | Kind::Union | Kind::Enum | Kind::Enum64 | Kind::Float => {
                Some(t.size_or_type)
            }
            Kind::Ptr => Some(8),
            _ => None,
        }
    }

    /// A C-ish spelling of a type, for prototypes shown by `doctor` and for matching.
    pub fn type_name(&self, id: u32) -> String {
        let Some(t) = self.type_by_id(id) else {
            return "?".into();
        };
        match t.kind {
            Kind::Void => "void".into(),
            Kind::Ptr => format!("{} *", self.type_name(t.size_or_type)),
            Kind::Const => format!("const {}", self.type_name(t.size_or_type)),
            Kind::Volatile => format!("volatile {}", self.type_name(t.size_or_type)),
            Kind::Struct => format!("struct {}", t.name),
            Kind::Union => format!("union {}", t.name),
            Kind::Enum | Kind::Enum64 => format!("enum {}", t.name),
            Kind::FuncProto => "fn".into(),
            _ if t.name.is_empty() => "?".into(),
            _ => t.name.clone(),
        }
    }
}
