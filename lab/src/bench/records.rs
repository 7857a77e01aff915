//! `bench-ghes` (the ways an action-optional error reaches a user page)
//! and `bench-kho` (the KHO scan against one read per page).

use std::process::ExitCode;
use std::time::Duration;

use lab::{Arch, Job, Lab};

use super::*;
use crate::chain;

/// Injection to verdict through the ways rasvmm reports an action-optional
/// memory error on a user page with early kill, per architecture:
///
/// - x86_64: a GHES recoverable record notified by NMI; an Intel MCE SRAO,
///   signalled as a machine check (SER_P, which rasvmm supplies where KVM
///   drops it); and an AMD MCE SRAO, a deferred error the guest finds by its
///   bank poll (every second here);
/// - aarch64: a GHES recoverable record in the GSIV-notified source (an
///   interrupt) and the same record in the polled source (the guest reads
///   it every 100 ms).
///
/// The verdict is the page owner's SIGBUS BUS_MCEERR_AO reaching rasvmm;
/// the runs alternate in one lab host (or run directly on hardware KVM).
/// The first arm is compared with each of the others.
pub fn ghes(arch: Arch, args: &[String]) -> Result<ExitCode, String> {
    let runs = parse_runs("bench-ghes", args)?;
    let lab = Lab::for_arch(arch).map_err(|e| chain(&e))?;
    // (label, rasvmm --cpu, the injection step)
    let arms: &[(&str, &str, &str)] = match arch {
        Arch::X86_64 => &[
            (
                "GHES recoverable, NMI    ",
                "intel",
                "ghes-memory:recoverable:page0:source=nmi",
            ),
            ("MCE SRAO, Intel (#MC)    ", "intel", "inject:srao:page0"),
            ("MCE SRAO, AMD (bank poll)", "amd", "inject:srao:page0"),
        ],
        Arch::Aarch64 => &[
            (
                "GHES recoverable, GSIV  ",
                "host",
                "ghes-memory:recoverable:page0:source=gsiv",
            ),
            (
                "GHES recoverable, polled",
                "host",
                "ghes-memory:recoverable:page0:source=polled",
            ),
        ],
    };
    // x86_64's SRAO on AMD waits for the bank poll: poll at the minimum.
    let poll: &[&str] = match arch {
        Arch::X86_64 => &[
            "--step",
            "exec:echo 1 > /sys/devices/system/machinecheck/machinecheck0/check_interval",
        ],
        Arch::Aarch64 => &[],
    };
    let common = [
        "--step",
        "sysctl:vm.memory_failure_early_kill=1",
        "--step",
        "alloc-page",
    ];
    let tail = ["--step", "wait:3000", "--step", "poweroff"];
    let arm = |cpu: &str, inject: &str| -> Vec<String> {
        ["--cpu", cpu]
            .iter()
            .chain(poll)
            .chain(&common)
            .chain(&["--step", inject])
            .chain(&tail)
            .map(|s| s.to_string())
            .collect()
    };
    let mut job_runs = Vec::new();
    for _ in 0..runs {
        for (_, cpu, inject) in arms {
            job_runs.push(arm(cpu, inject));
        }
    }
    let job = Job {
        runs: job_runs,
        timeout: Duration::from_secs(60 + 45 * u64::from(runs)),
        files: Vec::new(),
        run_limits: Vec::new(),
        silence_limit: None,
    };
    let names: Vec<&str> = arms.iter().map(|(name, ..)| name.trim()).collect();
    eprintln!(
        "bench-ghes: {runs} runs each of {} ({arch})...",
        names.join(", ")
    );
    let res = lab.run(&job).map_err(|e| chain(&e))?;
    let mut latency: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    for (i, r) in res.runs.iter().enumerate() {
        let report = r.typed().map_err(|e| format!("run {}: {e}", i + 1))?;
        let ms = event_to_signal_ms(&report, injected_or_reported).ok_or(format!(
            "run {} saw no injection and signal: {}",
            i + 1,
            report.detail
        ))?;
        latency[i % arms.len()].push(ms);
    }
    println!(
        "injection to the owner's SIGBUS BUS_MCEERR_AO (user page, early kill), {runs} runs each, {arch}, {}:",
        res.backend
    );
    let medians: Vec<f64> = arms
        .iter()
        .zip(latency.iter_mut())
        .map(|((name, ..), l)| report_ms(name, l))
        .collect();
    let ratios: Vec<String> = names
        .iter()
        .zip(&medians)
        .skip(1)
        .map(|(name, m)| format!("{}/{name}: {:.2}x", names[0], medians[0] / m))
        .collect();
    println!("  ratio {}", ratios.join("; "));
    Ok(ExitCode::SUCCESS)
}

/// KHO scan speed: rasvmm's observer over `--gib` GiB of guest memory
/// (default 1) holding a KHO root, its metadata and a hwpoison list, against
/// the least a scan must do, one read per page, timed in the same run.
/// Guest memory is an ordinary mapping of this process, populated first, as
/// a VM's would be; nothing needs KVM. Also reports this process's RSS
/// before and after the scans.
pub fn kho(args: &[String]) -> Result<ExitCode, String> {
    use std::collections::BTreeSet;
    use std::time::Instant;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    let gib: u64 = match args {
        [] => 1,
        [flag, n] if flag == "--gib" => n
            .parse()
            .ok()
            .filter(|n| (1..=16).contains(n))
            .ok_or("--gib takes 1 to 16")?,
        _ => return Err("usage: rasvmm-lab bench-kho [--gib N]".into()),
    };
    let size = gib << 30;
    let len = usize::try_from(size).map_err(|_| "too large")?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|e| format!("cannot map {gib} GiB: {e}"))?;
    // Populate every page, as a running guest's RAM is.
    for page in (0..size).step_by(4096) {
        mem.write_obj(1u8, GuestAddress(page))
            .map_err(|e| e.to_string())?;
    }
    let hw = ras::kho::build::hwpoison(2, 4093, &[0x1234, 0x5678, 0x9abc]);
    let root = ras::kho::build::kho_root(
        0,
        &[
            ("kexec-metadata", size / 2 + 0x1000, 73),
            ("hwpoison", size / 2 + 0x2000, hw.len() as u64),
        ],
    );
    for (at, bytes) in [
        (size / 2, root),
        (size / 2 + 0x1000, ras::kho::build::metadata(1)),
        (size / 2 + 0x2000, hw),
    ] {
        mem.write_slice(&bytes, GuestAddress(at))
            .map_err(|e| e.to_string())?;
    }
    let ledger = [0x0123_4000, 0x0567_8000, 0x09ab_c000];
    let rss_before = vmm::report::process_rss_kib();
    let (mut scan, mut floor) = (Vec::new(), Vec::new());
    let mut found = true;
    // The kernel's root, pinned as at the agent's hello.
    let mut tracker = vmm::kho_observer::KhoTracker::new();
    tracker.at_hello(&mem, &BTreeSet::new(), 0);
    for _ in 0..7 {
        let t = Instant::now();
        let v = vmm::kho_observer::observe(&mem, &ledger, &BTreeSet::new(), &tracker);
        scan.push(t.elapsed().as_secs_f64());
        found &= v.comparison == vmm::kho_observer::Comparison::Agree;
        let t = Instant::now();
        let mut acc = 0u32;
        for r in mem.iter() {
            let base = r.as_ptr();
            let n = usize::try_from(r.len()).unwrap_or(0);
            for off in (0..n).step_by(4096) {
                // SAFETY: `off < n`, inside this live mapping of `n` bytes.
                acc = acc
                    .wrapping_add(unsafe { std::ptr::read_volatile(base.add(off).cast::<u32>()) });
            }
        }
        std::hint::black_box(acc);
        floor.push(t.elapsed().as_secs_f64());
    }
    let rss_after = vmm::report::process_rss_kib();
    if !found {
        return Err("the observer did not find the planted KHO list".into());
    }
    let (s, fl) = (median(&mut scan), median(&mut floor));
    let gibs = gib as f64 / s;
    println!("KHO scan over {gib} GiB of populated guest memory, 7 scans, this host:");
    println!(
        "  rasvmm observer : median {:.2} ms = {gibs:.1} GiB/s (target >= 10 GiB/s)",
        s * 1e3
    );
    println!(
        "  one read a page : median {:.2} ms = {:.1} GiB/s",
        fl * 1e3,
        gib as f64 / fl
    );
    println!("  ratio observer/floor: {:.2}x", s / fl);
    println!(
        "  RSS before the scans {rss_before} KiB, after {rss_after} KiB: growth {} KiB (target: near zero)",
        rss_after.saturating_sub(rss_before)
    );
    Ok(ExitCode::SUCCESS)
}
