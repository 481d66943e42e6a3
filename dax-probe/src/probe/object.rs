//! What the embedded eBPF object says about itself, read with the same ELF reader aya uses,
//! before anything is loaded: the ABI it was built for and the programs it carries.

use std::collections::BTreeSet;

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

/// Section that carries the object's ABI stamp (`dax-probe-ebpf/src/main.rs`).
pub const ABI_SECTION: &str = "dax_probe_abi";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error(
        "this dax-probe was built with DAX_PROBE_EBPF=placeholder and carries no eBPF \
         programs: rebuild it without that variable (`cargo xtask setup` installs the eBPF \
         toolchain)"
    )]
    Placeholder,
    #[error("the embedded eBPF object is not a readable ELF file ({0}): rebuild dax-probe")]
    Unreadable(String),
    #[error(
        "the embedded eBPF object has no ABI stamp (section {ABI_SECTION}): it was built from \
         another tree; rebuild dax-probe"
    )]
    NoStamp,
    #[error(
        "the embedded eBPF object was built for ABI {object} but this agent speaks ABI \
         {agent}: the programs and the agent come from different builds; rebuild dax-probe \
         (`cargo build --release -p dax-probe`)"
    )]
    Mismatch { object: u32, agent: u32 },
}

/// The ABI version stamped into `elf`.
pub fn abi_of(elf: &[u8]) -> Result<u32, ObjectError> {
    if elf.is_empty() {
        return Err(ObjectError::Placeholder);
    }
    let file = object::File::parse(elf).map_err(|e| ObjectError::Unreadable(e.to_string()))?;
    let sec = file
        .section_by_name(ABI_SECTION)
        .ok_or(ObjectError::NoStamp)?;
    let data = sec
        .data()
        .map_err(|e| ObjectError::Unreadable(e.to_string()))?;
    let bytes: [u8; 4] = data
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(ObjectError::NoStamp)?;
    Ok(u32::from_le_bytes(bytes))
}

/// Refuses an object whose ABI is not `agent`'s.
pub fn check_abi(elf: &[u8], agent: u32) -> Result<(), ObjectError> {
    let object = abi_of(elf)?;
    if object != agent {
        return Err(ObjectError::Mismatch { object, agent });
    }
    Ok(())
}

/// Names of the programs (function symbols in program sections) in `elf`.
pub fn programs(elf: &[u8]) -> Result<BTreeSet<String>, ObjectError> {
    if elf.is_empty() {
        return Err(ObjectError::Placeholder);
    }
    let file = object::File::parse(elf).map_err(|e| ObjectError::Unreadable(e.to_string()))?;
    Ok(file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.is_global())
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::plan::CANDIDATES;

    #[test]
    fn placeholder_and_garbage_are_refused_with_what_to_do() {
        assert_eq!(abi_of(b""), Err(ObjectError::Placeholder));
        let e = abi_of(b"not an elf").unwrap_err();
        assert!(matches!(e, ObjectError::Unreadable(_)), "{e:?}");
        assert!(e.to_string().contains("rebuild"), "{e}");
    }

    /// The real object (the default build): stamped with this tree's ABI, and carrying
    /// every program the plan's candidate table names. With DAX_PROBE_EBPF=placeholder there
    /// is no object to check; `cargo xtask test` always builds the real one.
    #[test]
    fn embedded_object_matches_the_agent_and_the_plan() {
        let elf = super::super::loader::object_bytes();
        if cfg!(ebpf_placeholder) {
            assert_eq!(abi_of(elf), Err(ObjectError::Placeholder));
            eprintln!("placeholder build: the embedded object is checked by the real build");
            return;
        }
        assert_eq!(abi_of(elf), Ok(dax_probe_common::ABI_VERSION));
        check_abi(elf, dax_probe_common::ABI_VERSION).unwrap();
        let have = programs(elf).unwrap();
        let missing: Vec<&str> = CANDIDATES
            .iter()
            .flat_map(|c| c.attaches.iter().map(|a| a.program))
            .filter(|p| !have.contains(*p))
            .collect();
        assert!(
            missing.is_empty(),
            "programs named in plan.rs but absent from the object: {missing:?}; object has {have:?}"
        );
        let stale = check_abi(elf, dax_probe_common::ABI_VERSION + 1).unwrap_err();
        assert!(stale.to_string().contains("rebuild"), "{stale}");
    }
}
