//! Reading other processes through procfs: page tables (`pagemap`) and mappings (`maps`).

pub mod pagemap;
