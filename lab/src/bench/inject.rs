//! `bench-inject`: injection to verdict, rasvmm against QEMU.

use std::process::ExitCode;
use std::time::Duration;

use lab::{Arch, LAB_GUEST_INITRAMFS};

use super::*;
use crate::chain;

/// Injection to verdict, both VMMs driven through their own interfaces,
/// alternating run by run in one lab host with the same guest:
///
/// - user context (both architectures): the page a process reads without
///   pause goes bad, until the agent's SIGBUS BUS_MCEERR_AR report arrives
///   on the VMM's event stream. rasvmm poisons the page (sticky: the next
///   read is the consumption, in user context by construction: an SRAR on
///   x86_64, an SEA with a CPER record in the SEA-notified GHES source on
///   aarch64). QEMU 7.2 cannot reach this verdict; the bench prints what it
///   did instead, and how long that took:
///   - x86_64: QEMU gets the same SRAR record at the page through HMP `mce`
///     while the process spins; its CPU models lack SUCCOR, so its AMD guest
///     grades the record as unrecoverable and panics (the same AMD guest in
///     both: QEMU cannot give an Intel guest SER_P on the lab host's SVM).
///   - aarch64: QEMU has no injection command, so the lab host does what
///     hardware would: it poisons the host page behind the guest page
///     (HMP `gpa2hva`, QEMU's /proc/PID/pagemap, the lab kernel's
///     hwpoison/corrupt-pfn). The guest's next read stops in KVM, QEMU gets
///     SIGBUS BUS_MCEERR_AR on the vCPU thread, and without the GHES tables
///     only firmware would set up it has no SEA to inject: it exits.
/// - kernel context (x86_64 only: HMP `mce` is x86's): the same SRAR record
///   delivered to the idle guest, until its panic line appears on the
///   console; rasvmm through its control API, QEMU through HMP `mce`.
pub fn inject(arch: Arch, args: &[String]) -> Result<ExitCode, String> {
    let (runs, lab, image) = setup("bench-inject", arch, args)?;
    let peer = Peer::of(arch);
    let qemu = peer.qemu(
        peer.inject_cpu.1,
        "file,path=/tmp/$1-console.log",
        "pipe,path=/tmp/$1-ag",
    );
    let x86 = arch == Arch::X86_64;
    // The AMD SRAR record: VAL EN MISCV ADDRV UC POISON, MCG_STATUS MCIP EIPV RIPV.
    let amd_srar = ras::mce::encode(
        ras::mce::MemoryError::Srar,
        ras::mce::Vendor::Amd,
        GPA,
        false,
    );
    let hmp_mce = format!(
        "hmp_mce() {{ echo \"echo 'mce 0 {} {:#x} {:#x} $2 {:#x}' > /tmp/$1-mon.in\"; }}",
        amd_srar.bank, amd_srar.status, amd_srar.mcg_status, amd_srar.misc
    );
    // What each architecture's QEMU is made to do to the spinning page
    // ($gpa), timed to `pattern` in `file` by lab-timer.
    let (helpers, qemu_poison, rasvmm_then, expect) = if x86 {
        (
            hmp_mce,
            r#"lab-timer --trigger /tmp/qu-console.log 'Kernel panic' 30 -- sh -c "$(hmp_mce qu $gpa)" >/tmp/qs-$i.txt 2>&1"#.to_string(),
            format!(
                "lab-timer --trigger /tmp/rc-$i.log 'Kernel panic' 30 -- rasvmm api --socket $S inject:srar:{GPA:#x} >/tmp/rt-$i.txt 2>&1"
            ),
            "panic",
        )
    } else {
        (
            String::new(),
            r#"hpfn=$(host_pfn qu $gpa)
	lab-timer --trigger /tmp/qu-stderr.log 'Hardware memory error' 30 -- sh -c "echo $hpfn > /sys/kernel/debug/hwpoison/corrupt-pfn" >/tmp/qs-$i.txt 2>&1"#.to_string(),
            "rasvmm api --socket $S poweroff >/dev/null 2>&1".to_string(),
            "poweroff",
        )
    };
    let verdict_grep: String = verdict_patterns(arch)
        .iter()
        .map(|p| format!(" -e {}", lab::shell_quote(p)))
        .collect();
    let kernel_context = if x86 {
        "qemu_start qk
	lab-timer --trigger /tmp/qk-console.log 'Kernel panic' 30 -- sh -c \"$(hmp_mce qk $GPA)\" >/tmp/qt-$i.txt 2>&1
	usleep 300000
	qemu_stop
	lab_emit qemu-$i /tmp/qt-$i.txt
	lab_emit qemu-console-$i /tmp/qk-console.log"
    } else {
        ""
    };
    let script = format!(
        r#"CMDLINE={cmdline}
GPA={GPA:#x}
{shell}
{helpers}
for i in $(seq 1 {runs}); do
	S=/tmp/api-$i
	rasvmm run --kernel {kernel} --initramfs {LAB_GUEST_INITRAMFS} --cmdline "$CMDLINE" --memory 256 --vcpus 1 \
		--cpu {rasvmm_cpu} --console /tmp/rc-$i.log --json /tmp/rr-$i.json --api-socket $S --timeout 90 \
		--expect {expect} 2>/tmp/rerr-$i.txt &
	wait_for "[ -S $S ] && rasvmm api --socket $S state 2>/dev/null | grep -q '\"agent_ready_ms\": [0-9]'"
	rasvmm api --socket $S alloc-page >/dev/null
	rasvmm api --socket $S events >/tmp/re-$i.log 2>&1 &
	rasvmm api --socket $S spin-page:0 >/dev/null
	usleep 500000
	lab-timer --trigger /tmp/re-$i.log '"signal"' 30 -- rasvmm api --socket $S poison:page0 >/tmp/rs-$i.txt 2>&1
	lab_emit rasvmm-sigbus-$i /tmp/rs-$i.txt
	lab_emit rasvmm-stderr-$i /tmp/rerr-$i.txt
	usleep 500000
	{rasvmm_then}
	wait
	lab_emit rasvmm-$i /tmp/rt-$i.txt
	lab_emit rasvmm-console-$i /tmp/rc-$i.log
	lab_emit rasvmm-report-$i /tmp/rr-$i.json
	qemu_start qu
	echo '{{"id":1,"cmd":"alloc-page"}}' >/tmp/qu-ag.in
	wait_for "grep -q '\"pfn\"' /tmp/qu-agent.log && whole /tmp/qu-agent.log"
	pfn=$(sed -n 's/.*"pfn":\([0-9]*\).*/\1/p' /tmp/qu-agent.log | head -n 1)
	gpa=$(printf '0x%x' $((pfn * 4096)))
	echo '{{"id":2,"cmd":{{"spin-page":{{"page":0}}}}}}' >/tmp/qu-ag.in
	wait_for "grep -q '\"id\":2' /tmp/qu-agent.log"
	usleep 500000
	{qemu_poison}
	usleep 300000
	qemu_stop
	grep -h{verdict_grep} -e '"signal"' /tmp/qu-console.log /tmp/qu-stderr.log /tmp/qu-agent.log >>/tmp/qs-$i.txt
	lab_emit qemu-user-$i /tmp/qs-$i.txt
	{kernel_context}
done
"#,
        cmdline = lab::shell_quote(peer.cmdline),
        kernel = arch.lab_guest_kernel(),
        rasvmm_cpu = peer.inject_cpu.0,
        shell = lab_shell(&qemu),
    );
    eprintln!("bench-inject: {runs} runs each of rasvmm and QEMU in one {arch} lab host...");
    let res = lab
        .run_script(
            &script,
            &image,
            Duration::from_secs(60 + 120 * u64::from(runs)),
        )
        .map_err(|e| chain(&e))?;
    let file = |name: &str| res.files.get(name).cloned().unwrap_or_default();
    let ms = |name: &str| -> Result<f64, String> {
        let t = file(name);
        timer_field(&t, "ready_ms").ok_or_else(|| {
            let run = name.rsplit('-').next().unwrap_or_default();
            format!(
                "{name} measured nothing: {}; rasvmm's stderr ends: {}",
                t.trim(),
                lab::last_lines(&file(&format!("rasvmm-stderr-{run}")), 4)
            )
        })
    };
    let (mut rs, mut r, mut q) = (Vec::new(), Vec::new(), Vec::new());
    let (mut r_guest, mut q_guest) = (Vec::new(), Vec::new());
    let mut r_own_user = Vec::new();
    let mut q_user_ms = Vec::new();
    let mut qemu_user = std::collections::BTreeSet::new();
    for i in 1..=runs {
        rs.push(ms(&format!("rasvmm-sigbus-{i}"))?);
        if let Ok(report) = report(&res.files, &format!("rasvmm-report-{i}")) {
            r_own_user.extend(event_to_signal_ms(&report, |e| {
                matches!(e, RasEvent::Poisoned { .. })
            }));
        }
        if x86 {
            r.push(ms(&format!("rasvmm-{i}"))?);
            q.push(ms(&format!("qemu-{i}"))?);
            r_guest.extend(guest_mce_to_panic_ms(&file(&format!("rasvmm-console-{i}"))));
            q_guest.extend(guest_mce_to_panic_ms(&file(&format!("qemu-console-{i}"))));
        }
        // QEMU, its page gone bad under the same spinning process: what it did.
        let u = file(&format!("qemu-user-{i}"));
        q_user_ms.extend(timer_field(&u, "ready_ms"));
        qemu_user.insert(qemu_verdict(arch, &u));
    }
    println!(
        "injection to verdict, {runs} runs each, one {arch} lab host ({}), guest {}:",
        res.backend, lab.manifest.kernel_version
    );
    println!(" user context, API call to the agent's SIGBUS BUS_MCEERR_AR on the event stream:");
    report_ms(
        if x86 {
            "rasvmm (control API poison, SRAR)"
        } else {
            "rasvmm (control API poison, SEA + GHES)"
        },
        &mut rs,
    );
    println!(
        "  of which rasvmm's own clock, poisoning to the SIGBUS report: median {:.0} ms",
        median(&mut r_own_user)
    );
    let how = if x86 {
        "QEMU (HMP mce)"
    } else {
        "QEMU (host page hwpoisoned in the lab host)"
    };
    for v in &qemu_user {
        println!("  {how}: no SIGBUS; {v}");
    }
    if !q_user_ms.is_empty() {
        println!(
            "  {how}, to that verdict: median {:.0} ms (min {:.0}, max {:.0})",
            median(&mut q_user_ms),
            min(&q_user_ms),
            max(&q_user_ms)
        );
    }
    if x86 {
        println!(" kernel context, to the panic line:");
        let rm = report_ms("rasvmm (control API)", &mut r);
        let qm = report_ms("QEMU (HMP mce)      ", &mut q);
        println!("  ratio rasvmm/QEMU: {:.2}x (target <= 0.5x)", rm / qm);
        println!(
            "  of which the guest's own work, its first machine-check line to its panic line (printk clock): rasvmm median {:.0} ms, QEMU median {:.0} ms",
            median(&mut r_guest),
            median(&mut q_guest)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The lines of QEMU's guest console, QEMU's stderr and the agent's
/// output that tell what became of the spinning process's page in
/// `arch`'s QEMU (besides the agent's `"signal"` report).
pub(super) fn verdict_patterns(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::X86_64 => &["Machine check:", "Kernel panic", "Hardware memory error"],
        Arch::Aarch64 => &[
            "Hardware memory error",
            "SEA",
            "External Abort",
            "Internal error",
            "Kernel panic",
            "Memory failure",
        ],
    }
}

/// What QEMU did when its guest's page went bad, from the benchmark's
/// `qemu-user-N` file (lab-timer's line and the [`verdict_patterns`] lines).
pub(super) fn qemu_verdict(arch: Arch, output: &str) -> String {
    if output.contains("\"signal\"") {
        return "the agent's SIGBUS".to_string();
    }
    let verdict = output
        .lines()
        .filter(|l| verdict_patterns(arch).iter().any(|p| l.contains(p)))
        .map(|l| l.split_once("] ").map_or(l, |(_, t)| t).trim().to_string())
        .collect::<Vec<_>>()
        .join("; ");
    match (arch, verdict.is_empty()) {
        (_, true) => format!("nothing within 30 s ({})", output.trim()),
        (Arch::X86_64, false) => format!("its guest: {verdict}"),
        (Arch::Aarch64, false) => format!("QEMU: {verdict}"),
    }
}

/// The guest's own time from the last "Machine Check Exception" console
/// line before its panic line to the panic line, by the printk timestamps.
pub(super) fn guest_mce_to_panic_ms(console: &str) -> Option<f64> {
    let stamp = |l: &str| -> Option<f64> {
        let rest = l.trim_start().strip_prefix('[')?;
        rest.split_once(']')?.0.trim().parse::<f64>().ok()
    };
    let lines: Vec<&str> = console.lines().collect();
    let panic = lines
        .iter()
        .position(|l| l.contains("Kernel panic - not syncing"))?;
    let mce = lines[..panic]
        .iter()
        .rposition(|l| l.contains("Machine Check Exception"))?;
    Some((stamp(lines[panic])? - stamp(lines[mce])?) * 1000.0)
}
