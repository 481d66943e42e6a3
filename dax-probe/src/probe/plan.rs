//! The declarative probe table: for every concern, an ordered list of ways to observe it.
//!
//! The planner walks each list and keeps the candidates whose prerequisites the running
//! kernel's facts satisfy, best first. The loader then tries them in that order and stops at
//! the first that attaches; a candidate the facts rule out is reported with the reason, never
//! silently skipped. Nothing here looks at a kernel version number.

use serde::Serialize;

use super::facts::KernelFacts;

/// What a group of programs is for.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Concern {
    /// A DAX fault completed: who, which file/offset, which address, result.
    FaultDone,
    /// The pfn a DAX fault mapped.
    FaultPfn,
    /// A device-dax fault.
    DevdaxFault,
    /// Page tables of a DAX mapping torn down (munmap, exit, exec, truncate, punch).
    Zap,
    /// A holder forked: its child may hold copies of its PTEs.
    Fork,
    /// A holder moved a mapping with mremap.
    Mremap,
    /// A write to a private DAX mapping replaced a page by an anonymous copy.
    Cow,
    /// A pmem/dax device is being unbound or removed (and when it is gone).
    Departure,
    /// `kill_dax`: DAX access to a device shut off.
    DaxKilled,
    /// A file system told of a failure or pending removal of its device (6.1+).
    HolderNotify,
    /// A memory failure starts (a poisoned pfn) and ends (the kernel's verdict).
    MemoryFailure,
    MemoryFailureResult,
    /// The kernel's machine-check SIGBUS to a process.
    KernelSigbus,
    /// Refusing new mappings of a fenced device (drain, enforcement).
    Fence,
    /// Refusing a sysfs unbind of a guarded device that has holders (policy `guard`).
    UnbindGuard,
}

impl Concern {
    pub const ALL: [Concern; 15] = [
        Concern::FaultDone,
        Concern::FaultPfn,
        Concern::DevdaxFault,
        Concern::Zap,
        Concern::Fork,
        Concern::Mremap,
        Concern::Cow,
        Concern::Departure,
        Concern::DaxKilled,
        Concern::HolderNotify,
        Concern::MemoryFailure,
        Concern::MemoryFailureResult,
        Concern::KernelSigbus,
        Concern::Fence,
        Concern::UnbindGuard,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Concern::FaultDone => "fsdax fault",
            Concern::FaultPfn => "fault pfn",
            Concern::DevdaxFault => "devdax fault",
            Concern::Zap => "PTE teardown",
            Concern::Fork => "fork",
            Concern::Mremap => "mremap",
            Concern::Cow => "copy-on-write",
            Concern::Departure => "device departure",
            Concern::DaxKilled => "DAX shut-off",
            Concern::HolderNotify => "fs notified",
            Concern::MemoryFailure => "memory failure",
            Concern::MemoryFailureResult => "failure verdict",
            Concern::KernelSigbus => "kernel SIGBUS",
            Concern::Fence => "mmap fence",
            Concern::UnbindGuard => "unbind guard",
        }
    }

    /// Is the agent still useful without this concern?
    pub fn required(self) -> bool {
        matches!(self, Concern::FaultDone)
    }

    /// Loaded only when asked for (enforcement, drain, a guard policy).
    pub fn on_demand(self) -> bool {
        matches!(self, Concern::Fence | Concern::UnbindGuard)
    }
}

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AttachKind {
    #[value(name = "tp_btf")]
    TpBtf,
    #[value(name = "raw_tp")]
    RawTp,
    #[value(name = "fentry")]
    FEntry,
    #[value(name = "fexit")]
    FExit,
    #[value(name = "kprobe")]
    KProbe,
    #[value(name = "kretprobe")]
    KRetProbe,
    #[value(name = "lsm")]
    Lsm,
}

impl AttachKind {
    pub fn label(self) -> &'static str {
        match self {
            AttachKind::TpBtf => "tp_btf",
            AttachKind::RawTp => "raw_tp",
            AttachKind::FEntry => "fentry",
            AttachKind::FExit => "fexit",
            AttachKind::KProbe => "kprobe",
            AttachKind::KRetProbe => "kretprobe",
            AttachKind::Lsm => "lsm",
        }
    }
}

/// One program and the kernel target it attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Attach {
    pub program: &'static str,
    pub kind: AttachKind,
    pub target: &'static str,
}

/// One way to serve a concern: a set of programs that must all attach, or a userspace
/// fallback that needs no program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub concern: Concern,
    pub label: &'static str,
    pub attaches: &'static [Attach],
    /// Non-empty for a userspace fallback: what the agent does instead.
    pub userspace: Option<&'static str>,
    /// For the insert hook: positions of (vmf, pfn, flags) the programs are compiled for.
    pub insert_proto: Option<(u32, u32, u32)>,
}

const fn attach(program: &'static str, kind: AttachKind, target: &'static str) -> Attach {
    Attach {
        program,
        kind,
        target,
    }
}

const fn probes(concern: Concern, label: &'static str, attaches: &'static [Attach]) -> Candidate {
    Candidate {
        concern,
        label,
        attaches,
        userspace: None,
        insert_proto: None,
    }
}

const fn insert_probe(
    label: &'static str,
    attaches: &'static [Attach],
    proto: (u32, u32, u32),
) -> Candidate {
    Candidate {
        concern: Concern::FaultPfn,
        label,
        attaches,
        userspace: None,
        insert_proto: Some(proto),
    }
}

const fn fallback(concern: Concern, label: &'static str, what: &'static str) -> Candidate {
    Candidate {
        concern,
        label,
        attaches: &[],
        userspace: Some(what),
        insert_proto: None,
    }
}

use AttachKind::*;
use Concern::*;

/// The table. Order inside a concern is preference.
pub const CANDIDATES: &[Candidate] = &[
    probes(
        FaultDone,
        "tp_btf fs_dax:dax_{pte,pmd}_fault_done",
        &[
            attach("dax_pte_fault_done_btf", TpBtf, "dax_pte_fault_done"),
            attach("dax_pmd_fault_done_btf", TpBtf, "dax_pmd_fault_done"),
        ],
    ),
    probes(
        FaultDone,
        "raw_tp fs_dax:dax_{pte,pmd}_fault_done",
        &[
            attach("dax_pte_fault_done_raw", RawTp, "dax_pte_fault_done"),
            attach("dax_pmd_fault_done_raw", RawTp, "dax_pmd_fault_done"),
        ],
    ),
    insert_probe(
        "fentry dax_insert_entry",
        &[attach(
            "dax_insert_entry_fentry",
            FEntry,
            "dax_insert_entry",
        )],
        (1, 4, 5),
    ),
    insert_probe(
        "kprobe dax_insert_entry",
        &[attach(
            "dax_insert_entry_kprobe",
            KProbe,
            "dax_insert_entry",
        )],
        (1, 4, 5),
    ),
    insert_probe(
        "kprobe dax_insert_entry (vmf 3rd)",
        &[attach(
            "dax_insert_entry_kprobe_vmf2",
            KProbe,
            "dax_insert_entry",
        )],
        (2, 4, 5),
    ),
    fallback(
        FaultPfn,
        "userspace /proc/PID/pagemap lookup",
        "reads the pfn from /proc/PID/pagemap when the event arrives",
    ),
    probes(
        DevdaxFault,
        "kprobe+kretprobe device_dax:dev_dax_huge_fault",
        &[
            attach("devdax_fault_entry", KProbe, "dev_dax_huge_fault"),
            attach("devdax_fault_exit", KRetProbe, "dev_dax_huge_fault"),
        ],
    ),
    fallback(
        DevdaxFault,
        "userspace periodic pagemap scan",
        "finds device-dax mappings at the next reconcile (load device_dax before the agent)",
    ),
    probes(
        Zap,
        "fentry unmap_page_range",
        &[attach("zap_unmap_page_range", FEntry, "unmap_page_range")],
    ),
    probes(
        Zap,
        "fentry __zap_vma_range",
        &[attach("zap_zap_vma_range", FEntry, "__zap_vma_range")],
    ),
    probes(
        Zap,
        "kprobe unmap_page_range",
        &[attach("zap_kprobe", KProbe, "unmap_page_range")],
    ),
    probes(
        Zap,
        "kprobe __zap_vma_range",
        &[attach("zap_kprobe", KProbe, "__zap_vma_range")],
    ),
    fallback(
        Zap,
        "userspace periodic pagemap reconcile",
        "notices torn-down mappings at the next reconcile",
    ),
    probes(
        Fork,
        "tp_btf sched:sched_process_fork",
        &[attach("fork_btf", TpBtf, "sched_process_fork")],
    ),
    probes(
        Fork,
        "raw_tp sched:sched_process_fork",
        &[attach("fork_raw", RawTp, "sched_process_fork")],
    ),
    fallback(
        Fork,
        "userspace periodic /proc scan",
        "finds children holding inherited mappings at the next full scan",
    ),
    probes(
        Mremap,
        "fexit __x64_sys_mremap",
        &[attach("mremap_exit", FExit, "__x64_sys_mremap")],
    ),
    probes(
        Mremap,
        "fexit __x64_sys_mremap (helper reads)",
        &[attach("mremap_exit_probe", FExit, "__x64_sys_mremap")],
    ),
    probes(
        Mremap,
        "kprobe+kretprobe __x64_sys_mremap",
        &[
            attach("mremap_entry_kprobe", KProbe, "__x64_sys_mremap"),
            attach("mremap_exit_kretprobe", KRetProbe, "__x64_sys_mremap"),
        ],
    ),
    fallback(
        Mremap,
        "userspace periodic pagemap reconcile",
        "notices moved mappings at the next reconcile",
    ),
    probes(
        Cow,
        "fexit wp_page_copy",
        &[attach("cow_exit", FExit, "wp_page_copy")],
    ),
    probes(
        Cow,
        "fentry folio_add_new_anon_rmap",
        &[attach(
            "cow_new_anon_folio",
            FEntry,
            "folio_add_new_anon_rmap",
        )],
    ),
    probes(
        Cow,
        "fentry page_add_new_anon_rmap",
        &[attach(
            "cow_new_anon_page",
            FEntry,
            "page_add_new_anon_rmap",
        )],
    ),
    fallback(
        Cow,
        "userspace periodic pagemap reconcile",
        "notices private pages copied to RAM at the next reconcile",
    ),
    // The nvdimm bus's remove callback is reached through a pointer, so it is never inlined;
    // device_release_driver_internal is inlined into the sysfs unbind path on 5.8-5.15
    // kernels (5.10 among them) and would miss those unbinds. Both together: the agent keeps
    // the first report of each departure. The teardown ends when the device's managed
    // resources are released (devres_release_all, after the bus callback returned).
    probes(
        Departure,
        "fentry+fexit device_release_driver_internal + kprobe nvdimm_bus_remove, kretprobe devres_release_all",
        &[
            attach("release_entry", FEntry, "device_release_driver_internal"),
            attach("release_exit", FExit, "device_release_driver_internal"),
            attach("nd_remove_entry", KProbe, "nvdimm_bus_remove"),
            attach("nd_remove_exit", KRetProbe, "devres_release_all"),
        ],
    ),
    probes(
        Departure,
        "fentry+fexit device_release_driver_internal",
        &[
            attach("release_entry", FEntry, "device_release_driver_internal"),
            attach("release_exit", FExit, "device_release_driver_internal"),
        ],
    ),
    probes(
        Departure,
        "kprobe device_release_driver_internal",
        &[attach(
            "release_entry_kprobe",
            KProbe,
            "device_release_driver_internal",
        )],
    ),
    fallback(
        Departure,
        "userspace sysfs polling",
        "notices a vanished device at the next topology refresh, after the fact",
    ),
    probes(
        DaxKilled,
        "fentry kill_dax",
        &[attach("kill_dax", FEntry, "kill_dax")],
    ),
    probes(
        HolderNotify,
        "fentry dax_holder_notify_failure",
        &[attach("holder_notify", FEntry, "dax_holder_notify_failure")],
    ),
    probes(
        MemoryFailure,
        "fentry memory_failure",
        &[attach("memory_failure", FEntry, "memory_failure")],
    ),
    probes(
        MemoryFailureResult,
        "tp_btf ras:memory_failure_event",
        &[attach(
            "memory_failure_result_btf",
            TpBtf,
            "memory_failure_event",
        )],
    ),
    probes(
        MemoryFailureResult,
        "raw_tp ras:memory_failure_event",
        &[attach(
            "memory_failure_result_raw",
            RawTp,
            "memory_failure_event",
        )],
    ),
    probes(
        KernelSigbus,
        "fentry force_sig_mceerr + send_sig_mceerr",
        &[
            attach("force_sig_mceerr", FEntry, "force_sig_mceerr"),
            attach("send_sig_mceerr", FEntry, "send_sig_mceerr"),
        ],
    ),
    probes(
        Fence,
        "lsm mmap_file",
        &[attach("fence_mmap", Lsm, "mmap_file")],
    ),
    // file_permission runs before the written bytes are copied, so the program reads the
    // device name from the writer's syscall registers (bpf_task_pt_regs, 5.15+) and the
    // target file from its dentry chain (<bus>/drivers/<drv>/unbind on sysfs): no kernfs
    // internals (kernfs_node's parent became __parent in 6.15) and no hook on the unbind
    // path itself (fmod_ret needs error injection, which no Debian kernel has). Same program
    // on 6.1, 6.12 and 7.x; on 5.10 the BPF LSM is not in CONFIG_LSM (boot with lsm=...,bpf).
    probes(
        UnbindGuard,
        "lsm file_permission + syscall registers",
        &[attach("guard_unbind", Lsm, "file_permission")],
    ),
];

/// Why a candidate is or is not usable on this kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub candidate: Candidate,
    /// `None` when usable; otherwise what is missing.
    pub missing: Option<String>,
}

/// Per concern, every candidate with its verdict, in preference order.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub concerns: Vec<(Concern, Vec<Verdict>)>,
}

impl Plan {
    pub fn verdicts(&self, concern: Concern) -> &[Verdict] {
        self.concerns
            .iter()
            .find(|(c, _)| *c == concern)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }

    /// Usable candidates for a concern, best first.
    pub fn usable(&self, concern: Concern) -> impl Iterator<Item = &Candidate> {
        self.verdicts(concern)
            .iter()
            .filter(|v| v.missing.is_none())
            .map(|v| &v.candidate)
    }
}

/// Checks one attach point against the facts.
fn missing_for(a: &Attach, facts: &dyn KernelFacts) -> Option<String> {
    match a.kind {
        AttachKind::TpBtf => (!facts.btf_tracepoint(a.target)).then(|| {
            format!(
                "no BTF for tracepoint {} (btf_trace_{})",
                a.target, a.target
            )
        }),
        AttachKind::RawTp => {
            (!facts.raw_tracepoint(a.target)).then(|| format!("no tracepoint {}", a.target))
        }
        AttachKind::FEntry | AttachKind::FExit => (!facts.vmlinux_btf_func(a.target))
            .then(|| format!("no BTF function {} in vmlinux", a.target)),
        AttachKind::KProbe | AttachKind::KRetProbe => (!facts.kallsyms_func(a.target))
            .then(|| format!("no symbol {} in kallsyms (module not loaded?)", a.target)),
        AttachKind::Lsm => {
            if !facts.vmlinux_btf_func(&format!("bpf_lsm_{}", a.target)) {
                Some(format!("no BPF LSM hook {} in this kernel", a.target))
            } else if facts.bpf_lsm_active() == Some(false) {
                Some("the BPF LSM is not active (boot with lsm=...,bpf)".into())
            } else {
                None
            }
        }
    }
}

/// Extra per-concern prerequisites beyond the attach points themselves.
fn missing_extra(c: &Candidate, facts: &dyn KernelFacts) -> Option<String> {
    // The insert hook reads arguments at fixed positions; BTF must confirm them.
    let want = c.insert_proto?;
    match insert_args(facts) {
        None => Some("BTF prototype of dax_insert_entry lacks vmf/pfn/flags parameters".into()),
        Some((v, p, f, _)) if (v, p, f) != want => Some(format!(
            "dax_insert_entry takes vmf/pfn/flags as arguments {}/{}/{} here, this program \
             reads {}/{}/{}",
            v + 1,
            p + 1,
            f + 1,
            want.0 + 1,
            want.1 + 1,
            want.2 + 1
        )),
        Some(_) => None,
    }
}

/// Positions of `vmf`, `pfn`, `flags` in `dax_insert_entry`, and whether `pfn` is a `pfn_t`.
pub fn insert_args(facts: &dyn KernelFacts) -> Option<(u32, u32, u32, bool)> {
    let params = facts.func_params("dax_insert_entry")?;
    let pos = |n: &str| params.iter().position(|p| p.name == n).map(|i| i as u32);
    let pfn = pos("pfn")?;
    let pfn_is_pfn_t = params[pfn as usize].type_name == "pfn_t";
    Some((pos("vmf")?, pfn, pos("flags")?, pfn_is_pfn_t))
}

/// Plans against `facts`. Candidates using an attach kind in `skip` are ruled out (the
/// operator's `--skip-hooks`, to route around a misbehaving hook type or to prove a
/// fallback).
pub fn plan(facts: &dyn KernelFacts, skip: &[AttachKind]) -> Plan {
    let concerns = Concern::ALL
        .iter()
        .map(|&concern| {
            let verdicts = CANDIDATES
                .iter()
                .filter(|c| c.concern == concern)
                .map(|c| {
                    let skipped = c.attaches.iter().find(|a| skip.contains(&a.kind));
                    let missing = match skipped {
                        Some(a) => Some(format!("skipped (--skip-hooks {})", a.kind.label())),
                        None => c
                            .attaches
                            .iter()
                            .find_map(|a| missing_for(a, facts))
                            .or_else(|| missing_extra(c, facts)),
                    };
                    Verdict {
                        candidate: *c,
                        missing,
                    }
                })
                .collect();
            (concern, verdicts)
        })
        .collect();
    Plan { concerns }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::probe::btf::Param;

    /// A fake kernel described by the names it offers.
    #[derive(Default)]
    struct Fake {
        btf_funcs: HashSet<&'static str>,
        btf_tps: HashSet<&'static str>,
        raw_tps: HashSet<&'static str>,
        syms: HashSet<&'static str>,
        insert_params: Option<Vec<(&'static str, &'static str)>>,
    }

    impl KernelFacts for Fake {
        fn vmlinux_btf_func(&self, n: &str) -> bool {
            self.btf_funcs.contains(n)
        }
        fn btf_tracepoint(&self, n: &str) -> bool {
            self.btf_tps.contains(n)
        }
        fn raw_tracepoint(&self, n: &str) -> bool {
            self.raw_tps.contains(n)
        }
        fn kallsyms_func(&self, n: &str) -> bool {
            self.syms.contains(n)
        }
        fn bpf_lsm_active(&self) -> Option<bool> {
            Some(true)
        }
        fn func_params(&self, n: &str) -> Option<Vec<Param>> {
            (n == "dax_insert_entry").then_some(())?;
            self.insert_params.as_ref().map(|v| {
                v.iter()
                    .map(|(n, t)| Param {
                        name: n.to_string(),
                        type_name: t.to_string(),
                    })
                    .collect()
            })
        }
    }

    fn debian_6_1() -> Fake {
        Fake {
            btf_funcs: ["dax_insert_entry"].into(),
            btf_tps: ["dax_pte_fault_done", "dax_pmd_fault_done"].into(),
            raw_tps: ["dax_pte_fault_done", "dax_pmd_fault_done"].into(),
            syms: ["dax_insert_entry"].into(),
            insert_params: Some(vec![
                ("xas", "struct xa_state *"),
                ("vmf", "struct vm_fault *"),
                ("iter", "const struct iomap_iter *"),
                ("entry", "void *"),
                ("pfn", "pfn_t"),
                ("flags", "long unsigned int"),
            ]),
        }
    }

    #[test]
    fn prefers_btf_programs_when_everything_is_there() {
        let p = plan(&debian_6_1(), &[]);
        assert_eq!(
            p.usable(Concern::FaultDone).next().unwrap().label,
            "tp_btf fs_dax:dax_{pte,pmd}_fault_done"
        );
        assert_eq!(
            p.usable(Concern::FaultPfn).next().unwrap().label,
            "fentry dax_insert_entry"
        );
        // Every fallback with this prototype stays usable behind the preferred one; the
        // 5.10-order kprobe is ruled out with a reason.
        let usable: Vec<_> = p.usable(Concern::FaultPfn).map(|c| c.label).collect();
        assert_eq!(
            usable,
            [
                "fentry dax_insert_entry",
                "kprobe dax_insert_entry",
                "userspace /proc/PID/pagemap lookup"
            ]
        );
        let v = p.verdicts(Concern::FaultPfn);
        assert!(
            v[2].missing.as_deref().unwrap().contains("3/5/6"),
            "{:?}",
            v[2]
        );
    }

    #[test]
    fn falls_back_to_raw_tracepoint_and_reports_why() {
        let mut k = debian_6_1();
        k.btf_tps.clear();
        let p = plan(&k, &[]);
        assert_eq!(
            p.usable(Concern::FaultDone).next().unwrap().label,
            "raw_tp fs_dax:dax_{pte,pmd}_fault_done"
        );
        let first = &p.verdicts(Concern::FaultDone)[0];
        assert!(
            first
                .missing
                .as_deref()
                .unwrap()
                .contains("btf_trace_dax_pte_fault_done")
        );
    }

    #[test]
    fn finds_argument_positions_per_prototype() {
        // 6.1 .. 6.12: (xas, vmf, iter, entry, pfn_t pfn, flags)
        assert_eq!(insert_args(&debian_6_1()), Some((1, 4, 5, true)));
        // 5.10: (xas, mapping, vmf, entry, pfn_t pfn, flags, dirty)
        let mut k = debian_6_1();
        k.insert_params = Some(vec![
            ("xas", "struct xa_state *"),
            ("mapping", "struct address_space *"),
            ("vmf", "struct vm_fault *"),
            ("entry", "void *"),
            ("pfn", "pfn_t"),
            ("flags", "long unsigned int"),
            ("dirty", "bool"),
        ]);
        assert_eq!(insert_args(&k), Some((2, 4, 5, true)));
        let usable: Vec<_> = plan(&k, &[])
            .usable(Concern::FaultPfn)
            .map(|c| c.label)
            .collect();
        assert_eq!(
            usable,
            [
                "kprobe dax_insert_entry (vmf 3rd)",
                "userspace /proc/PID/pagemap lookup"
            ]
        );
        // 7.x: pfn_t is gone, a plain unsigned long.
        let mut k = debian_6_1();
        if let Some(p) = k.insert_params.as_mut() {
            p[4].1 = "long unsigned int";
        }
        assert_eq!(insert_args(&k), Some((1, 4, 5, false)));
    }

    #[test]
    fn without_insert_hook_only_the_pagemap_fallback_remains() {
        let mut k = debian_6_1();
        k.btf_funcs.clear();
        k.syms.clear();
        k.insert_params = None;
        let p = plan(&k, &[]);
        let usable: Vec<_> = p.usable(Concern::FaultPfn).map(|c| c.label).collect();
        assert_eq!(usable, vec!["userspace /proc/PID/pagemap lookup"]);
    }

    #[test]
    fn skipped_kinds_are_ruled_out_with_the_reason() {
        let p = plan(&debian_6_1(), &[AttachKind::TpBtf, AttachKind::FEntry]);
        assert_eq!(
            p.usable(Concern::FaultDone).next().unwrap().label,
            "raw_tp fs_dax:dax_{pte,pmd}_fault_done"
        );
        assert_eq!(
            p.usable(Concern::FaultPfn).next().unwrap().label,
            "kprobe dax_insert_entry"
        );
        assert_eq!(
            p.verdicts(Concern::FaultPfn)[0].missing.as_deref(),
            Some("skipped (--skip-hooks fentry)")
        );
    }

    #[test]
    fn a_kernel_without_dax_tracepoints_has_no_fault_candidate() {
        let mut k = debian_6_1();
        k.btf_tps.clear();
        k.raw_tps.clear();
        let p = plan(&k, &[]);
        assert_eq!(p.usable(Concern::FaultDone).count(), 0);
        assert!(
            p.verdicts(Concern::FaultDone)
                .iter()
                .all(|v| v.missing.is_some())
        );
    }
}
