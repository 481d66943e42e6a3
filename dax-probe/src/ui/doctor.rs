//! `dax-probe doctor`: what this kernel offers, per concern, and what the agent chooses.
//!
//! As root it really loads and attaches (then detaches) the programs, so "chosen" means "works
//! here", not "should work". Without privileges it reports the plan from BTF and kallsyms
//! and says that it did not verify.

use std::io::Write;

use serde::Serialize;

use crate::{
    exit::{Code, Failure},
    privilege,
    probe::{
        self, KernelSource,
        facts::{KernelFacts, LiveFacts},
        plan::{self, Concern, Plan},
    },
    topology::Topology,
};

#[derive(Serialize)]
struct Report {
    kernel: String,
    btf: String,
    kallsyms_readable: bool,
    tracefs: Option<String>,
    active_lsms: Option<String>,
    bpf_lsm_active: Option<bool>,
    /// True when the choices below were proven by loading and attaching.
    verified: bool,
    concerns: Vec<ConcernReport>,
    /// What an fsdax fault and an anonymous fault of any process cost here: the programs
    /// that run for each, and why (see [`fault_path`]).
    fault_path: FaultPath,
    dax_namespaces: usize,
    dax_mounts: usize,
    /// Device-dax personalities this kernel offers, and what can be observed of each.
    dax_personalities: Vec<crate::topology::personality::Personality>,
    /// What this kernel does, read off its BTF (scenario expectations and the README's
    /// support matrix use these).
    kernel_facts: KernelFactsReport,
}

#[derive(Serialize)]
struct KernelFactsReport {
    /// `MF_MEM_PRE_REMOVE` exists: file systems with notify_failure (xfs with rmapbt) kill
    /// the holders of a device being removed.
    mf_mem_pre_remove: bool,
    /// `dax_holder_notify_failure` exists: file systems can be told their device fails.
    holder_notify_failure: bool,
    /// Modules carry BTF (/sys/kernel/btf/<module>).
    module_btf: bool,
    /// DAX pages are `pfn_t`/devmap special entries (up to 6.12): tearing down a stale
    /// mapping after the device left does not touch its (freed) struct pages. From 7.x DAX
    /// pages are ordinary folios and it does.
    dax_devmap: bool,
    bpf_lsm_active: Option<bool>,
}

#[derive(Serialize)]
struct FaultPath {
    /// Programs that run on each fsdax fault.
    programs_per_dax_fault: u32,
    /// How successive faults reach the agent.
    records: &'static str,
    why: String,
    /// What every anonymous page fault of the machine runs (the copy-on-write hook where
    /// the kernel inlines `wp_page_copy`), or None.
    on_anonymous_faults: Option<&'static str>,
}

/// One program per fault where the kernel allows: the fault-done tracepoint names the file,
/// the address and the result, but not the pfn; the insert hook is the only place the pfn
/// is handed over before the PTE is written (reading it back from the page table would need
/// a page walk no program type offers on these kernels).
fn fault_path(chosen: impl Fn(Concern) -> Option<&'static str>) -> FaultPath {
    let done = chosen(Concern::FaultDone);
    let pfn = chosen(Concern::FaultPfn);
    let kernel_pfn = pfn.is_some_and(|p| !p.starts_with("userspace"));
    let (n, records, why) = match (done, kernel_pfn) {
        (None, _) => (
            0,
            "none",
            "no fault-done hook: faults are found by reconciling".into(),
        ),
        (Some(d), true) => (
            2,
            "coalesced: one record per run of successive faults",
            format!(
                "{d} (file, address, result) and {} (the pfn, which the tracepoint does not \
                 carry)",
                pfn.unwrap_or("?")
            ),
        ),
        (Some(d), false) => (
            1,
            "one record per fault (no pfn to coalesce on: the agent reads it from pagemap)",
            format!("{d}; no insert hook here"),
        ),
    };
    let cow = chosen(Concern::Cow);
    FaultPath {
        programs_per_dax_fault: n,
        records,
        why,
        on_anonymous_faults: cow.filter(|c| c.contains("anon_rmap")),
    }
}

#[derive(Serialize)]
struct ConcernReport {
    concern: Concern,
    required: bool,
    chosen: Option<&'static str>,
    candidates: Vec<CandidateReport>,
}

#[derive(Serialize)]
struct CandidateReport {
    label: &'static str,
    /// chosen | available | missing | failed
    status: &'static str,
    reason: Option<String>,
}

pub fn run(src: &KernelSource, json: bool) -> anyhow::Result<()> {
    let facts = probe::collect_facts(src)?;
    let plan = plan::plan(&facts, &src.skip);
    let privileged = privilege::can_trace() && src.btf.is_none();

    // As root: prove it. Loading happens here and is dropped (detached) right away.
    let attempt = if privileged {
        Some(
            probe::layout::compute(
                &facts.btf,
                &facts,
                probe::layout::Extra {
                    dax_major: crate::topology::dax_char_major(&src.root),
                },
            )
            .map_err(|e| e.to_string())
            .and_then(|l| {
                probe::loader::load(&plan, &l, &facts.btf_path, probe::Ring::DEFAULT, true)
                    .map_err(|e| e.to_string())
            }),
        )
    } else {
        None
    };

    let topo = Topology::read(&src.root);
    let mut report = build(&facts, &plan, attempt.as_ref(), &topo);
    report.dax_personalities =
        crate::topology::personality::personalities(&src.root, &facts.release, &topo);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write_text(&mut out, &report)?;
        if let Some(Err(e)) = &attempt {
            writeln!(out, "\nloading failed: {e}")?;
        }
    }
    out.flush()?;

    let missing: Vec<_> = report
        .concerns
        .iter()
        .filter(|c| c.required && c.chosen.is_none())
        .map(|c| c.concern.name())
        .collect();
    if !missing.is_empty() {
        return Err(Failure::new(
            Code::Unavailable,
            format!(
                "this kernel offers no way to observe: {}",
                missing.join(", ")
            ),
        )
        .into());
    }
    Ok(())
}

fn build(
    facts: &LiveFacts,
    plan: &Plan,
    attempt: Option<&Result<probe::Probe, String>>,
    topo: &Topology,
) -> Report {
    let probe = attempt.and_then(|a| a.as_ref().ok());
    let concerns: Vec<ConcernReport> = plan
        .concerns
        .iter()
        .map(|(concern, verdicts)| {
            let choice = probe.and_then(|p| p.choice(*concern));
            let chosen = match (attempt, choice) {
                (Some(_), Some(c)) => c.chosen,
                (Some(Err(_)), _) => None,
                // Not verified: the first usable candidate is what the agent would pick.
                _ => plan.usable(*concern).next().map(|c| c.label),
            };
            let candidates = verdicts
                .iter()
                .map(|v| {
                    let failed = choice.and_then(|c| {
                        c.failed
                            .iter()
                            .find(|(l, _)| *l == v.candidate.label)
                            .map(|(_, e)| e.clone())
                    });
                    let (status, reason) = if Some(v.candidate.label) == chosen {
                        ("chosen", v.candidate.userspace.map(str::to_string))
                    } else if let Some(e) = failed {
                        ("failed", Some(e))
                    } else if let Some(m) = &v.missing {
                        ("missing", Some(m.clone()))
                    } else {
                        ("available", v.candidate.userspace.map(str::to_string))
                    };
                    CandidateReport {
                        label: v.candidate.label,
                        status,
                        reason,
                    }
                })
                .collect();
            ConcernReport {
                concern: *concern,
                required: concern.required(),
                chosen,
                candidates,
            }
        })
        .collect();
    let fault_path = fault_path(|c| {
        concerns
            .iter()
            .find(|r| r.concern == c)
            .and_then(|r| r.chosen)
    });
    Report {
        fault_path,
        kernel: facts.release.clone(),
        btf: facts.btf_path.display().to_string(),
        kallsyms_readable: facts.kallsyms_readable,
        tracefs: facts.tracefs.as_ref().map(|p| p.display().to_string()),
        active_lsms: facts.lsm.clone(),
        bpf_lsm_active: facts.bpf_lsm_active(),
        verified: matches!(attempt, Some(Ok(_))),
        concerns,
        dax_namespaces: topo
            .namespaces
            .iter()
            .filter(|n| {
                matches!(
                    n.mode,
                    crate::topology::Mode::Fsdax | crate::topology::Mode::Devdax
                )
            })
            .count(),
        dax_mounts: topo.mounts.iter().filter(|m| m.dax.is_dax()).count(),
        dax_personalities: Vec::new(),
        kernel_facts: KernelFactsReport {
            mf_mem_pre_remove: facts
                .btf
                .enum_value("mf_flags", "MF_MEM_PRE_REMOVE")
                .is_some(),
            holder_notify_failure: facts.btf.has_func("dax_holder_notify_failure"),
            module_btf: facts
                .btf_path
                .parent()
                .and_then(|d| std::fs::read_dir(d).ok())
                .is_some_and(|d| d.flatten().any(|e| e.file_name() != "vmlinux")),
            bpf_lsm_active: facts.bpf_lsm_active(),
            dax_devmap: facts.dax_devmap(),
        },
    }
}

fn write_text(out: &mut impl Write, r: &Report) -> std::io::Result<()> {
    writeln!(out, "kernel      {}", r.kernel)?;
    writeln!(out, "BTF         {}", r.btf)?;
    writeln!(
        out,
        "kallsyms    {}",
        if r.kallsyms_readable {
            "readable"
        } else {
            "unreadable (kprobe fallbacks unknown)"
        }
    )?;
    writeln!(
        out,
        "tracefs     {}",
        r.tracefs.as_deref().unwrap_or(
            "not mounted (not needed: BTF/raw tracepoints and perf kprobes work without it)"
        )
    )?;
    writeln!(
        out,
        "BPF LSM     {}",
        match r.bpf_lsm_active {
            Some(true) => "active".to_string(),
            Some(false) => format!(
                "inactive (active LSMs: {}); boot with lsm=...,bpf to allow mmap fencing",
                r.active_lsms.as_deref().unwrap_or("?")
            ),
            None => "unknown (securityfs not mounted)".to_string(),
        }
    )?;
    writeln!(out, "unbind guard {}", guard_line(r))?;
    writeln!(
        out,
        "DAX         {} fsdax/devdax namespace(s), {} DAX mount(s)",
        r.dax_namespaces, r.dax_mounts
    )?;
    if !r.dax_personalities.is_empty() {
        writeln!(out, "\ndevice-dax personalities (dax bus drivers)")?;
    }
    for p in &r.dax_personalities {
        writeln!(
            out,
            "  {:<14} {}{}{}",
            p.driver,
            p.mode,
            if p.loaded { "" } else { " (module not loaded)" },
            if p.devices.is_empty() {
                String::new()
            } else {
                format!(": {}", p.devices.join(", "))
            }
        )?;
        for o in &p.observable {
            writeln!(out, "     + {o}")?;
        }
        for o in &p.not_observable {
            writeln!(out, "     - not observable: {o}")?;
        }
    }
    writeln!(
        out,
        "\n{}",
        if r.verified {
            "hooks (verified: loaded and attached, then detached)"
        } else {
            "hooks (from BTF and kallsyms; not verified: run as root to test-attach)"
        }
    )?;
    writeln!(
        out,
        "  fault path: {} program(s) per fsdax fault, {}: {}",
        r.fault_path.programs_per_dax_fault, r.fault_path.records, r.fault_path.why
    )?;
    if let Some(c) = r.fault_path.on_anonymous_faults {
        writeln!(
            out,
            "  every anonymous page fault runs {c} (copy-on-write of private DAX pages; it \
             returns at its first test for memory that is not a file's)"
        )?;
    }
    for c in &r.concerns {
        writeln!(
            out,
            "  {:<14} -> {}",
            c.concern.name(),
            c.chosen.unwrap_or(if c.required {
                "UNAVAILABLE"
            } else {
                "unavailable"
            })
        )?;
        for cand in &c.candidates {
            let mark = match cand.status {
                "chosen" => "*",
                "available" => "+",
                "failed" => "!",
                _ => "-",
            };
            match &cand.reason {
                Some(reason) => writeln!(out, "     {mark} {:<40} {reason}", cand.label)?,
                None => writeln!(out, "     {mark} {}", cand.label)?,
            }
        }
    }
    writeln!(
        out,
        "\n  * chosen   + available   ! failed to attach   - missing on this kernel"
    )
}

/// Whether policy `guard = "refuse-unbind"` can work here, and what it covers.
fn guard_line(r: &Report) -> String {
    let c = r
        .concerns
        .iter()
        .find(|c| c.concern == crate::probe::plan::Concern::UnbindGuard);
    let usable = c.and_then(|c| {
        c.candidates
            .iter()
            .find(|x| matches!(x.status, "chosen" | "available"))
    });
    match (c, usable) {
        (_, Some(x)) => format!(
            "available ({}): guard = \"refuse-unbind\" refuses (EBUSY) writes to the nd/dax \
             drivers' unbind files naming a guarded device with holders (echo > unbind, ndctl \
             disable-namespace/disable-region, daxctl disable-device); not covered: rmmod of \
             a driver, ndbus/nfit and DIMM unbinds, io_uring/splice writes are refused blind",
            x.label
        ),
        (c, None) => format!(
            "UNAVAILABLE: {}; a policy with guard = \"refuse-unbind\" only warns here and \
             unbinds go through",
            c.and_then(|c| c.candidates.iter().find_map(|x| x.reason.clone()))
                .unwrap_or_else(|| "no candidate".into())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(
        done: Option<&'static str>,
        pfn: Option<&'static str>,
        cow: Option<&'static str>,
    ) -> FaultPath {
        fault_path(|c| match c {
            Concern::FaultDone => done,
            Concern::FaultPfn => pfn,
            Concern::Cow => cow,
            _ => None,
        })
    }

    #[test]
    fn the_fault_path_names_its_programs_and_what_coalesces() {
        let two = path(
            Some("tp_btf fs_dax:dax_{pte,pmd}_fault_done"),
            Some("fentry dax_insert_entry"),
            Some("fentry folio_add_new_anon_rmap"),
        );
        assert_eq!(two.programs_per_dax_fault, 2);
        assert!(two.records.starts_with("coalesced"));
        assert!(two.why.contains("fentry dax_insert_entry"));
        assert_eq!(
            two.on_anonymous_faults,
            Some("fentry folio_add_new_anon_rmap")
        );
        // No insert hook: one program, one record per fault.
        let one = path(
            Some("raw_tp fs_dax:dax_{pte,pmd}_fault_done"),
            Some("userspace /proc/PID/pagemap lookup"),
            Some("fexit wp_page_copy"),
        );
        assert_eq!(
            (one.programs_per_dax_fault, one.on_anonymous_faults),
            (1, None)
        );
        assert!(one.records.starts_with("one record per fault"));
        assert_eq!(path(None, None, None).programs_per_dax_fault, 0);
    }
}
