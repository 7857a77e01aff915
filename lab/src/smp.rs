//! `rasvmm-lab smp-boots [--runs N]`: how often a 2-vCPU guest fails to
//! boot, rasvmm against QEMU, alternating run by run in one lab host.
//!
//! A measurement, not a benchmark of speed: each run boots the same kernel
//! and initramfs with two vCPUs until the guest agent reports both CPUs
//! online (rasvmm: then powers off; QEMU: killed at the agent's hello). It
//! prints each VMM's failure count and every failure's evidence, so that a
//! failure rate can be compared with the peer's under the same lab host
//! (docs/lab-host.md records the figures).

use std::process::ExitCode;
use std::time::Duration;

use crate::chain;

/// Most runs of each VMM in one measurement.
const MAX_RUNS: u32 = 500;

/// Runs the measurement.
pub fn boots(args: &[String]) -> Result<ExitCode, String> {
    let runs = match args {
        [] => 50,
        [flag, n] if flag == "--runs" => n
            .parse()
            .ok()
            .filter(|n| (1..=MAX_RUNS).contains(n))
            .ok_or(format!("--runs takes 1 to {MAX_RUNS}"))?,
        _ => return Err("usage: rasvmm-lab smp-boots [--runs N]".into()),
    };
    let (runs_checked, lab, image) = crate::bench::setup_lab("smp-boots", lab::Arch::X86_64, runs)?;
    let cmdline = vmm::config::DEFAULT_CMDLINE;
    let script = format!(
        r#"CMDLINE={cmdline}
for i in $(seq 1 {runs_checked}); do
	rasvmm run --kernel {kernel} --initramfs {initramfs} --cmdline "$CMDLINE" \
		--memory 256 --vcpus 2 --cpu intel --timeout 60 --console /tmp/rc.log \
		--json /tmp/r.json --agent poweroff 2>/tmp/r.err
	if grep -q '"outcome": "poweroff"' /tmp/r.json && grep -q '"guest_cpus": 2' /tmp/r.json; then
		echo "rasvmm $i ok" > /tmp/t
	else
		echo "rasvmm $i FAIL" > /tmp/t; lab_emit rasvmm-$i /tmp/r.json; lab_emit rasvmm-err-$i /tmp/r.err
	fi
	lab_emit tally-r-$i /tmp/t
	rm -f /tmp/qa.log /tmp/qc.log
	if lab-timer /tmp/qa.log '"cpus":2' 60 -- qemu-system-x86_64 -enable-kvm -cpu qemu64,vendor=GenuineIntel \
		-m 256 -smp 2 -nodefaults -no-user-config -display none -no-reboot -L /usr/share/qemu \
		-kernel {kernel} -initrd {initramfs} -append "$CMDLINE" \
		-serial file:/tmp/qc.log -serial file:/tmp/qa.log >/tmp/q.txt 2>&1; then
		echo "qemu $i ok" > /tmp/t
	else
		echo "qemu $i FAIL" > /tmp/t; lab_emit qemu-$i /tmp/qc.log
	fi
	lab_emit tally-q-$i /tmp/t
done
"#,
        cmdline = lab::shell_quote(cmdline),
        kernel = lab::LAB_GUEST_KERNEL,
        initramfs = lab::LAB_GUEST_INITRAMFS,
    );
    eprintln!("smp-boots: {runs_checked} 2-vCPU boots each of rasvmm and QEMU in one lab host...");
    let res = lab
        .run_script_partial(
            &script,
            &image,
            Duration::from_secs(120 + 60 * u64::from(runs_checked)),
            // Each boot has 60 s (rasvmm's watchdog 10 s more) and emits its
            // tally line when it ends: a lab host silent for twice that has
            // frozen (docs/lab-host.md).
            Duration::from_secs(140),
        )
        .map_err(|e| chain(&e))?;
    // Each run's line was emitted as it finished, so a lab host that dies
    // part-way still leaves the runs before it.
    let tally: String = res
        .files
        .iter()
        .filter(|(k, _)| k.starts_with("tally-"))
        .map(|(_, v)| v.as_str())
        .collect();
    let count = |who: &str, what: &str| {
        tally
            .lines()
            .filter(|l| l.starts_with(who) && l.ends_with(what))
            .count()
    };
    let (r_ok, r_fail) = (count("rasvmm", " ok"), count("rasvmm", " FAIL"));
    let (q_ok, q_fail) = (count("qemu", " ok"), count("qemu", " FAIL"));
    println!(
        "2-vCPU boots to agent ready with both CPUs, one lab host ({}), guest {}:",
        res.backend, lab.manifest.kernel_version
    );
    println!("  rasvmm: {r_fail} failed of {}", r_ok + r_fail);
    println!("  QEMU:   {q_fail} failed of {}", q_ok + q_fail);
    for l in tally.lines().filter(|l| l.ends_with(" FAIL")) {
        let mut words = l.split_whitespace();
        let (who, i) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        println!("  failure: {who} run {i}");
        if who == "rasvmm" {
            match crate::bench::report(&res.files, &format!("rasvmm-{i}")) {
                Ok(r) => {
                    println!("    outcome {} ({})", r.outcome.as_str(), r.detail);
                    for line in r.log.iter().skip(r.log.len().saturating_sub(25)) {
                        println!("    | {line}");
                    }
                }
                Err(e) => println!("    {e}"),
            }
            let err = res
                .files
                .get(&format!("rasvmm-err-{i}"))
                .cloned()
                .unwrap_or_default();
            for line in err.lines().filter(|l| !l.is_empty()) {
                println!("    stderr | {line}");
            }
        } else {
            let console = res
                .files
                .get(&format!("qemu-{i}"))
                .cloned()
                .unwrap_or_default();
            let lines: Vec<&str> = console.lines().collect();
            for line in &lines[lines.len().saturating_sub(25)..] {
                println!("    | {line}");
            }
        }
    }
    if let Some(why) = &res.incomplete {
        println!(
            "  the lab host itself stopped after {} rasvmm and {} QEMU runs: {why}",
            r_ok + r_fail,
            q_ok + q_fail
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
