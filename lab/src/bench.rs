//! Benchmarks that print rasvmm's figures as ratios against QEMU measured in
//! the same lab-host run (never timed assertions).

use std::process::ExitCode;
use std::time::Duration;

use lab::{Backend, Lab};
use serde_json::Value;

use crate::chain;

/// CPU model QEMU is given: the closest named model to rasvmm's "intel"
/// profile (family 6, no XSAVE/AVX), with the Intel vendor.
const QEMU_CPU: &str = "qemu64,vendor=GenuineIntel";

/// Boot to agent ready, rasvmm vs `qemu-system-x86_64 -enable-kvm` with the
/// same kernel, initramfs, command line, memory and one vCPU, interleaved
/// run by run in one lab host.
pub fn boot(args: &[String]) -> Result<ExitCode, String> {
    let runs: u32 = match args {
        [] => 5,
        [flag, n] if flag == "--runs" => n
            .parse()
            .ok()
            .filter(|n| (1..=50).contains(n))
            .ok_or("--runs takes 1 to 50")?,
        _ => return Err("usage: rasvmm-lab bench-boot [--runs N]".into()),
    };
    let lab = Lab::new().map_err(|e| chain(&e))?;
    if lab.backend != Backend::Lab {
        return Err("bench-boot measures inside the lab host; set RASVMM_BACKEND=lab".into());
    }
    let image =
        lab.manifest.lab_bench_initramfs.clone().ok_or(
            "no bench lab image: run scripts/build-images.sh --bench (scripts/bench.sh does)",
        )?;
    let cmdline = vmm::config::DEFAULT_CMDLINE;
    let script = format!(
        r#"CMDLINE={cmdline}
for i in $(seq 1 {runs}); do
	rasvmm run --kernel {kernel} --initramfs {initramfs} --cmdline "$CMDLINE" \
		--memory 256 --vcpus 1 --cpu intel --console none --json /tmp/r-$i.json --agent poweroff 2>/dev/null
	lab_emit rasvmm-$i /tmp/r-$i.json
	lab-timer /tmp/agent-$i.log '{{"hello"' 60 -- qemu-system-x86_64 -enable-kvm -cpu {QEMU_CPU} \
		-m 256 -smp 1 -nodefaults -no-user-config -display none -no-reboot -L /usr/share/qemu \
		-kernel {kernel} -initrd {initramfs} -append "$CMDLINE" \
		-serial null -serial file:/tmp/agent-$i.log >/tmp/q-$i.txt 2>&1
	lab_emit qemu-$i /tmp/q-$i.txt
done
"#,
        cmdline = lab::shell_quote(cmdline),
        kernel = lab::LAB_GUEST_KERNEL,
        initramfs = lab::LAB_GUEST_INITRAMFS,
    );
    eprintln!("bench-boot: {runs} runs each of rasvmm and QEMU in one lab host...");
    let res = lab
        .run_script(
            &script,
            &image,
            Duration::from_secs(60 + 40 * u64::from(runs)),
        )
        .map_err(|e| chain(&e))?;

    let mut rasvmm_ms = Vec::new();
    let mut rasvmm_overhead = Vec::new();
    let mut qemu_ms = Vec::new();
    let mut qemu_rss = Vec::new();
    for i in 1..=runs {
        let r: Value = res
            .files
            .get(&format!("rasvmm-{i}"))
            .and_then(|t| serde_json::from_str(t).ok())
            .ok_or(format!("rasvmm run {i} wrote no report"))?;
        let ready = r["agent_ready_ms"].as_u64().ok_or(format!(
            "rasvmm run {i} never reached agent ready: {}",
            r["detail"]
        ))?;
        rasvmm_ms.push(ready as f64);
        rasvmm_overhead.push(r["memory_use"]["vmm_overhead_kib"].as_u64().unwrap_or(0) as f64);
        let q = res
            .files
            .get(&format!("qemu-{i}"))
            .cloned()
            .unwrap_or_default();
        let field = |k: &str| -> Option<f64> {
            q.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
        };
        let ready = field("ready_ms=").ok_or(format!("QEMU run {i} failed: {}", q.trim()))?;
        qemu_ms.push(ready);
        qemu_rss.push(field("maxrss_kib=").unwrap_or(0.0));
    }
    let (rm, qm) = (median(&mut rasvmm_ms), median(&mut qemu_ms));
    println!(
        "boot to agent ready, {runs} runs each, one lab host ({}), guest {}:",
        res.backend, lab.manifest.kernel_version
    );
    println!(
        "  rasvmm: median {rm:.0} ms (min {:.0}, max {:.0})",
        min(&rasvmm_ms),
        max(&rasvmm_ms)
    );
    println!(
        "  QEMU  : median {qm:.0} ms (min {:.0}, max {:.0})",
        min(&qemu_ms),
        max(&qemu_ms)
    );
    println!("  ratio rasvmm/QEMU: {:.2}x (target <= 0.5x)", rm / qm);
    println!(
        "  rasvmm RSS beyond guest RAM: median {:.0} KiB (target <= 8192 KiB); QEMU peak RSS incl. guest RAM: median {:.0} KiB",
        median(&mut rasvmm_overhead),
        median(&mut qemu_rss)
    );
    Ok(ExitCode::SUCCESS)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}
