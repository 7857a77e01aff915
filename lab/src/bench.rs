//! Benchmarks that print rasvmm's figures as ratios against QEMU measured in
//! the same lab-host run (never timed assertions).

use std::process::ExitCode;
use std::time::Duration;

use lab::{Arch, Backend, Job, Lab, LAB_GUEST_INITRAMFS};
use serde_json::Value;

use crate::chain;

/// How one architecture's benchmarks run the same guest in rasvmm and in
/// its peer, `qemu-system-<arch> -enable-kvm`, inside that architecture's
/// lab host.
struct Peer {
    arch: Arch,
    /// rasvmm's default guest command line for `arch`; QEMU's guest gets
    /// it too, plus [`Peer::qemu_agent_arg`].
    cmdline: &'static str,
    /// Appended to QEMU's guest command line: where images/guest-init starts
    /// the agent, when QEMU's board cannot put it where rasvmm's does.
    qemu_agent_arg: &'static str,
    /// QEMU's binary and machine options, before the CPU model.
    qemu_machine: &'static str,
    /// The devices that carry QEMU's chardevs `console` and `agent`.
    qemu_devices: &'static str,
    /// rasvmm's `--cpu` and QEMU's `-cpu` for the boot benchmark.
    boot_cpu: (&'static str, &'static str),
    /// rasvmm's `--cpu` and QEMU's `-cpu` for the injection benchmark.
    inject_cpu: (&'static str, &'static str),
}

impl Peer {
    fn of(arch: Arch) -> Peer {
        match arch {
            // pc: SeaBIOS + linuxboot_dma option ROM, QEMU's usual direct
            // kernel boot; the agent on COM2 as in rasvmm. qemu64 with the
            // Intel vendor is the closest named model to rasvmm's "intel"
            // profile (family 6, no XSAVE/AVX); the injection compares AMD
            // guests (QEMU cannot give an Intel guest SER_P on the lab
            // host's SVM).
            Arch::X86_64 => Peer {
                arch,
                cmdline: arch::guest::X86_64_CMDLINE,
                qemu_agent_arg: "",
                qemu_machine: "qemu-system-x86_64 -enable-kvm -L /usr/share/qemu",
                qemu_devices: "-serial chardev:console -serial chardev:agent",
                boot_cpu: ("intel", "qemu64,vendor=GenuineIntel"),
                inject_cpu: ("amd", "qemu64"),
            },
            // virt: QEMU's firmware-less direct boot with a device tree. It
            // has one PL011 (the console), so the agent talks on a virtio
            // console (virtio-mmio), /dev/hvc0 in the guest.
            Arch::Aarch64 => Peer {
                arch,
                cmdline: arch::guest::AARCH64_CMDLINE,
                qemu_agent_arg: " rasvmm.agent=/dev/hvc0",
                qemu_machine: "qemu-system-aarch64 -enable-kvm -M virt,gic-version=3",
                qemu_devices: "-serial chardev:console -device virtio-serial-device \
                               -device virtconsole,chardev=agent",
                boot_cpu: ("host", "host"),
                inject_cpu: ("host", "host"),
            },
        }
    }

    /// The QEMU command (for the lab host's shell, which has `$CMDLINE`):
    /// the guest kernel and initramfs, 256 MiB, one vCPU, CPU model `cpu`,
    /// the console and the agent's device on chardev backends `console`
    /// and `agent` (e.g. `null`, `file,path=F`, `pipe,path=P`).
    fn qemu(&self, cpu: &str, console: &str, agent: &str) -> String {
        format!(
            "{machine} -cpu {cpu} -m 256 -smp 1 -nodefaults -no-user-config -display none \
             -no-reboot -kernel {kernel} -initrd {LAB_GUEST_INITRAMFS} -append \"$CMDLINE{extra}\" \
             -chardev {console},id=console -chardev {agent},id=agent {devices}",
            machine = self.qemu_machine,
            kernel = self.arch.lab_guest_kernel(),
            extra = self.qemu_agent_arg,
            devices = self.qemu_devices,
        )
    }
}

/// Boot to agent ready, rasvmm vs `qemu-system-<arch> -enable-kvm` with the
/// same kernel, initramfs, command line, memory and one vCPU, interleaved
/// run by run in one lab host.
pub fn boot(arch: Arch, args: &[String]) -> Result<ExitCode, String> {
    let (runs, lab, image) = setup("bench-boot", arch, args)?;
    let peer = Peer::of(arch);
    let script = format!(
        r#"CMDLINE={cmdline}
for i in $(seq 1 {runs}); do
	rasvmm run --kernel {kernel} --initramfs {LAB_GUEST_INITRAMFS} --cmdline "$CMDLINE" \
		--memory 256 --vcpus 1 --cpu {rasvmm_cpu} --console none --json /tmp/r-$i.json --agent poweroff 2>/dev/null
	lab_emit rasvmm-$i /tmp/r-$i.json
	lab-timer /tmp/agent-$i.log '{{"hello"' 60 -- {qemu} >/tmp/q-$i.txt 2>&1
	lab_emit qemu-$i /tmp/q-$i.txt
done
"#,
        cmdline = lab::shell_quote(peer.cmdline),
        kernel = arch.lab_guest_kernel(),
        rasvmm_cpu = peer.boot_cpu.0,
        qemu = peer.qemu(peer.boot_cpu.1, "null", "file,path=/tmp/agent-$i.log"),
    );
    eprintln!("bench-boot: {runs} runs each of rasvmm and QEMU in one {arch} lab host...");
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
        let ready =
            timer_field(&q, "ready_ms").ok_or(format!("QEMU run {i} failed: {}", q.trim()))?;
        qemu_ms.push(ready);
        qemu_rss.push(timer_field(&q, "maxrss_kib").unwrap_or(0.0));
    }
    println!(
        "boot to agent ready, {runs} runs each, one {arch} lab host ({}), guest {}:",
        res.backend, lab.manifest.kernel_version
    );
    let rm = report_ms("rasvmm", &mut rasvmm_ms);
    let qm = report_ms("QEMU  ", &mut qemu_ms);
    println!("  ratio rasvmm/QEMU: {:.2}x (target <= 0.5x)", rm / qm);
    println!(
        "  rasvmm RSS beyond guest RAM: median {:.0} KiB (target <= 8192 KiB); QEMU peak RSS incl. guest RAM: median {:.0} KiB",
        median(&mut rasvmm_overhead),
        median(&mut qemu_rss)
    );
    Ok(ExitCode::SUCCESS)
}

/// Parses `[--runs N]` and opens `arch`'s lab with its bench image;
/// benchmarks measure rasvmm and QEMU in the same lab host, so only the lab
/// backend will do.
fn setup(
    name: &str,
    arch: Arch,
    args: &[String],
) -> Result<(u32, Lab, std::path::PathBuf), String> {
    setup_lab(name, arch, parse_runs(name, args)?)
}

/// Opens `arch`'s lab with its bench image for measurement `name` of `runs` runs.
pub fn setup_lab(
    name: &str,
    arch: Arch,
    runs: u32,
) -> Result<(u32, Lab, std::path::PathBuf), String> {
    let lab = Lab::for_arch(arch).map_err(|e| chain(&e))?;
    if lab.backend != Backend::Lab {
        return Err(format!(
            "{name} measures inside the lab host; set RASVMM_BACKEND=lab"
        ));
    }
    let image = lab.manifest.lab_bench_initramfs.clone().ok_or(format!(
        "no {arch} bench lab image: run scripts/build-images.sh --bench {arch} (scripts/bench.sh does)"
    ))?;
    Ok((runs, lab, image))
}

/// `[--runs N]` (1 to 50, default 5) for benchmark `name`.
fn parse_runs(name: &str, args: &[String]) -> Result<u32, String> {
    match args {
        [] => Ok(5),
        [flag, n] if flag == "--runs" => n
            .parse()
            .ok()
            .filter(|n| (1..=50).contains(n))
            .ok_or_else(|| "--runs takes 1 to 50".to_string()),
        _ => Err(format!("usage: rasvmm-lab {name} [--arch A] [--runs N]")),
    }
}

/// Prints `label: median X ms (min, max)` for `v` and returns the median.
fn report_ms(label: &str, v: &mut [f64]) -> f64 {
    let m = median(v);
    println!(
        "  {label}: median {m:.0} ms (min {:.0}, max {:.0})",
        min(v),
        max(v)
    );
    m
}

/// A `key=value` figure from lab-timer's output.
fn timer_field(output: &str, key: &str) -> Option<f64> {
    output
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
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
    // host_pfn <tag> <gpa>: the lab host's PFN behind QEMU's guest page.
    let host_pfn = r#"mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
host_pfn() {
	echo "gpa2hva $2" >/tmp/$1-mon.in
	wait_for "grep -q 'Host virtual address for $2' /tmp/$1-mon.log"
	hva=$(sed -n "s/.*Host virtual address for $2 .* is \(0x[0-9a-fA-F]*\).*/\1/p" /tmp/$1-mon.log | tail -n 1)
	# (An arithmetic error would end the lab host's job: check each step.)
	[ -n "$hva" ] || { echo none; return; }
	ent=$(dd if=/proc/$q/pagemap bs=8 count=1 skip=$((hva / 4096)) 2>/dev/null | od -An -tx8 | tr -d ' ')
	[ -n "$ent" ] || { echo none; return; }
	echo $((0x$ent & 0x7fffffffffffff))
}"#;
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
            host_pfn.to_string(),
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
wait_for() {{ n=0; until eval "$1"; do usleep 20000; n=$((n+1)); [ $n -gt 1500 ] && return 1; done; }}
# qemu_start <tag>: QEMU with the agent's device on a pipe and HMP on
# another; the shell holds both input FIFOs open read-write, so no write
# ever blocks.
qemu_start() {{
	rm -f /tmp/$1-*
	mkfifo /tmp/$1-mon.in /tmp/$1-mon.out /tmp/$1-ag.in /tmp/$1-ag.out
	exec 8<>/tmp/$1-mon.in 9<>/tmp/$1-ag.in
	{qemu} -monitor pipe:/tmp/$1-mon >/dev/null 2>/tmp/$1-stderr.log &
	q=$!
	cat /tmp/$1-mon.out >/tmp/$1-mon.log &
	cat /tmp/$1-ag.out >/tmp/$1-agent.log &
	wait_for "grep -q hello /tmp/$1-agent.log 2>/dev/null"
	usleep 500000
}}
qemu_stop() {{ kill $q 2>/dev/null; exec 8>&- 9>&-; wait; }}
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
	wait_for "grep -q '\"pfn\"' /tmp/qu-agent.log"
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
        if let Ok(report) = serde_json::from_str::<Value>(&file(&format!("rasvmm-report-{i}"))) {
            r_own_user.extend(event_to_signal_ms(&report, &["poisoned"]));
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
fn verdict_patterns(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::X86_64 => &["Machine check:", "Kernel panic"],
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
fn qemu_verdict(arch: Arch, output: &str) -> String {
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
fn guest_mce_to_panic_ms(console: &str) -> Option<f64> {
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
    };
    let names: Vec<&str> = arms.iter().map(|(name, ..)| name.trim()).collect();
    eprintln!(
        "bench-ghes: {runs} runs each of {} ({arch})...",
        names.join(", ")
    );
    let res = lab.run(&job).map_err(|e| chain(&e))?;
    let mut latency: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    for (i, r) in res.runs.iter().enumerate() {
        let report = r.report.as_ref().ok_or(format!(
            "run {} wrote no report: {}",
            i + 1,
            r.stderr.trim()
        ))?;
        let ms = event_to_signal_ms(report, &["ghes-reported", "injected"]).ok_or(format!(
            "run {} saw no injection and signal: {}",
            i + 1,
            report["detail"]
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
    for _ in 0..7 {
        let t = Instant::now();
        let v = vmm::kho_observer::observe(&mem, &ledger, &BTreeSet::new());
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

/// From a rasvmm report, by the VMM's own clock: the first RAS event of
/// one of `kinds` (an injection, a GHES report, a poisoning) to the first
/// signal the agent reported.
fn event_to_signal_ms(report: &Value, kinds: &[&str]) -> Option<f64> {
    let at = report["ras_events"]
        .as_array()?
        .iter()
        .find(|e| kinds.iter().any(|k| e["event"] == *k))?["at_ms"]
        .as_u64()?;
    let signal = report["signal_ms"].as_array()?.first()?.as_u64()?;
    Some(signal.checked_sub(at)? as f64)
}

/// Where the benchmark's machine check points: 32 MiB, guest RAM in both VMMs.
const GPA: u64 = 0x200_0000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_to_signal_reads_the_report() {
        let r = serde_json::json!({
            "ras_events": [{"event": "poisoned", "at_ms": 100}, {"event": "consumed", "at_ms": 101}],
            "signal_ms": [160]
        });
        assert_eq!(event_to_signal_ms(&r, &["poisoned"]), Some(60.0));
        assert_eq!(
            event_to_signal_ms(&serde_json::json!({}), &["poisoned"]),
            None
        );
    }

    #[test]
    fn guest_span_is_last_mce_line_to_panic_line() {
        let console = "[    1.000000] mce: [Hardware Error]: CPU 0: Machine Check Exception: 7 Bank 9\n\
                       [    1.500000] Memory failure: 0x1: recovered\n\
                       [    2.000000] mce: [Hardware Error]: CPU 0: Machine Check Exception: 5 Bank 9\n\
                       [    2.001000] mce: [Hardware Error]: RIP 10:<ffffffff81000000>\n\
                       [    2.042500] Kernel panic - not syncing: Fatal local machine check\n";
        let ms = guest_mce_to_panic_ms(console).unwrap();
        assert!((ms - 42.5).abs() < 1e-6, "{ms}");
        assert_eq!(
            guest_mce_to_panic_ms("[ 1.0] Kernel panic - not syncing: x"),
            None
        );
        assert_eq!(guest_mce_to_panic_ms(""), None);
    }

    #[test]
    fn latency_is_injection_to_first_signal() {
        let r = serde_json::json!({
            "ras_events": [{"event": "poisoned", "at_ms": 1}, {"event": "ghes-reported", "at_ms": 2000}],
            "signal_ms": [2042, 3000]
        });
        assert_eq!(
            event_to_signal_ms(&r, &["ghes-reported", "injected"]),
            Some(42.0)
        );
        assert_eq!(
            event_to_signal_ms(&serde_json::json!({"ras_events": []}), &["injected"]),
            None
        );
    }

    #[test]
    fn qemu_verdicts_name_what_happened() {
        let arm = "ready_ms=62\nqemu-system-aarch64: Hardware memory error!\n";
        assert_eq!(
            qemu_verdict(Arch::Aarch64, arm),
            "QEMU: qemu-system-aarch64: Hardware memory error!"
        );
        let x86 = "ready_ms=40\n[    9.1] mce: [Hardware Error]: Machine check: Uncorrected error without MCA Recovery\n\
                   [    9.2] Kernel panic - not syncing: Fatal machine check\n";
        assert_eq!(
            qemu_verdict(Arch::X86_64, x86),
            "its guest: mce: [Hardware Error]: Machine check: Uncorrected error without MCA Recovery; \
             Kernel panic - not syncing: Fatal machine check"
        );
        assert_eq!(
            qemu_verdict(Arch::Aarch64, "{\"signal\":{\"code\":\"BUS_MCEERR_AR\"}}"),
            "the agent's SIGBUS"
        );
        assert!(qemu_verdict(Arch::Aarch64, "lab-timer: never").starts_with("nothing within 30 s"));
    }

    #[test]
    fn both_vmms_boot_the_same_guest() {
        for arch in Arch::ALL {
            let peer = Peer::of(arch);
            let q = peer.qemu("host", "null", "file,path=/tmp/a");
            assert!(q.contains(arch.lab_guest_kernel()), "{q}");
            assert!(
                q.contains(LAB_GUEST_INITRAMFS) && q.contains("-m 256 -smp 1"),
                "{q}"
            );
            assert!(q.contains(&format!("-append \"$CMDLINE{}\"", peer.qemu_agent_arg)));
            assert!(q.contains("-chardev file,path=/tmp/a,id=agent"), "{q}");
        }
        // The arm64 virt board has one PL011: the agent is on a virtio console there.
        let arm = Peer::of(Arch::Aarch64);
        assert_eq!(arm.cmdline, "console=ttyAMA0 panic=-1 quiet");
        assert!(arm
            .qemu("host", "null", "null")
            .contains("virtconsole,chardev=agent"));
    }

    #[test]
    fn lab_timer_figures_are_read_by_name() {
        let out = "ready_ms=116 maxrss_kib=68132\n";
        assert_eq!(timer_field(out, "ready_ms"), Some(116.0));
        assert_eq!(timer_field(out, "maxrss_kib"), Some(68132.0));
        assert_eq!(
            timer_field("lab-timer: 'x' did not appear", "ready_ms"),
            None
        );
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
