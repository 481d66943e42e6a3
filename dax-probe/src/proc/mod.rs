//! Reading other processes through procfs: page tables (`pagemap`), mappings (`maps`) and
//! cgroups (`cgroup`: container and pod).

pub mod cgroup;
pub mod pagemap;
pub mod procmap;
