//! Benchmarks that print rasvmm's figures as ratios against QEMU measured in
//! the same lab-host run (never timed assertions).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use lab::{Arch, Backend, Lab, LAB_GUEST_INITRAMFS, LAB_GUEST_RASDAEMON_INITRAMFS};
use vmm::event::RasEvent;
use vmm::report::RunReport;

use crate::chain;

mod host_poison;
mod inject;
mod records;

pub use host_poison::host_poison;
pub use inject::inject;
pub use records::{ghes, kho};

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
    /// The guest kernel inside the lab host (the project's, unless a
    /// benchmark is given another).
    kernel: String,
    /// The guest initramfs inside the lab host (the default image, unless
    /// a benchmark is given another).
    initramfs: &'static str,
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
                kernel: arch.lab_guest_kernel().into(),
                initramfs: LAB_GUEST_INITRAMFS,
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
                kernel: arch.lab_guest_kernel().into(),
                initramfs: LAB_GUEST_INITRAMFS,
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
             -no-reboot -kernel {kernel} -initrd {initramfs} -append \"$CMDLINE{extra}\" \
             -chardev {console},id=console -chardev {agent},id=agent {devices}",
            machine = self.qemu_machine,
            kernel = self.kernel,
            initramfs = self.initramfs,
            extra = self.qemu_agent_arg,
            devices = self.qemu_devices,
        )
    }
}

/// The lab-host shell functions the benchmarks that drive a running QEMU
/// share; `qemu` is its command from [`Peer::qemu`], with `$1` (the tag)
/// in its chardev paths:
///
/// - `wait_for <cond> [<tries>]`: polls a shell condition every 20 ms
///   (1500 tries, 30 s, unless told);
/// - `whole <file>`: the file ends with a whole line (an agent's line
///   comes over a UART, a few bytes at a time);
/// - `qemu_start <tag>`: QEMU (pid `$q`) with the agent's device on the
///   pipe `/tmp/<tag>-ag` and HMP on `/tmp/<tag>-mon`, its agent ready;
///   the shell holds both input FIFOs open read-write, so no write ever
///   blocks; `qemu_stop` ends it (SIGTERM, then SIGKILL after 5 s: a QEMU
///   whose vCPU keeps faulting on a poisoned page may not get to its
///   SIGTERM, and the lab host's job must not wait for it forever);
/// - `hva_pfn <pid> <hva>`: the lab host's frame behind a process's
///   address (its /proc/PID/pagemap), or `none`;
/// - `host_pfn <tag> <gpa>`: the frame behind QEMU's guest page (HMP
///   gpa2hva);
/// - `ram_pfn <pid> <ram-bytes> <offset>`: the frame behind rasvmm's guest
///   RAM at `offset` (its RAM is one anonymous mapping of `ram-bytes`).
fn lab_shell(qemu: &str) -> String {
    format!(
        r#"mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
wait_for() {{ n=0; until eval "$1"; do usleep 20000; n=$((n+1)); [ $n -gt ${{2:-1500}} ] && return 1; done; return 0; }}
whole() {{ [ -z "$(tail -c 1 $1 | tr -d '\n')" ]; }}
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
qemu_stop() {{
	kill $q 2>/dev/null
	n=0; while kill -0 $q 2>/dev/null && [ $n -lt 50 ]; do usleep 100000; n=$((n+1)); done
	kill -0 $q 2>/dev/null && {{ echo "qemu_stop: QEMU $q ignored SIGTERM for 5 s: SIGKILL" >&2; kill -9 $q; }}
	exec 8>&- 9>&-; wait
}}
# (An arithmetic error would end the lab host's job: check each step.)
hva_pfn() {{
	case "$2" in 0x[0-9a-fA-F]*) ;; *) echo none; return ;; esac
	ent=$(dd if=/proc/$1/pagemap bs=8 count=1 skip=$(($2 / 4096)) 2>/dev/null | od -An -tx8 | tr -d ' ')
	[ -n "$ent" ] || {{ echo none; return; }}
	pfn=$((0x$ent & 0x7fffffffffffff))
	[ "$pfn" != 0 ] && echo $pfn || echo none
}}
host_pfn() {{
	echo "gpa2hva $2" >/tmp/$1-mon.in
	wait_for "grep -q 'Host virtual address for $2' /tmp/$1-mon.log"
	hva_pfn $q "$(sed -n "s/.*Host virtual address for $2 .* is \(0x[0-9a-fA-F]*\).*/\1/p" /tmp/$1-mon.log | tail -n 1)"
}}
ram_pfn() {{
	base=$(while read -r range perms rest; do
		[ "$perms" = rw-p ] && [ $((0x${{range#*-}} - 0x${{range%-*}})) = $2 ] && {{ echo 0x${{range%-*}}; break; }}
	done </proc/$1/maps)
	[ -n "$base" ] && hva_pfn $1 $(printf '0x%x' $((base + $3))) || echo none
}}"#
    )
}

/// Boot to agent ready, rasvmm vs `qemu-system-<arch> -enable-kvm` with the
/// same kernel, initramfs, command line, memory and one vCPU, interleaved
/// run by run in one lab host.
///
/// `--kernel [NAME=]PATH` boots that kernel in both instead of the
/// project's (the kernel matrix's distribution kernels, for example);
/// `--image rasdaemon` boots the rasdaemon guest image in both (rasdaemon
/// started before the agent's hello).
pub fn boot(arch: Arch, args: &[String]) -> Result<ExitCode, String> {
    let mut rest = Vec::new();
    let mut kernel = None;
    let mut rasdaemon = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--kernel" {
            let k = it.next().ok_or("--kernel needs [NAME=]PATH")?;
            kernel = Some(lab::kernels::GuestKernel::from_arg(k)?);
        } else if a == "--image" {
            match it.next().map(String::as_str) {
                Some("rasdaemon") => rasdaemon = true,
                Some("default") => rasdaemon = false,
                _ => return Err("--image needs default or rasdaemon".into()),
            }
        } else {
            rest.push(a.clone());
        }
    }
    let (runs, lab, image) = setup("bench-boot", arch, &rest)?;
    let mut peer = Peer::of(arch);
    if rasdaemon {
        peer.initramfs = LAB_GUEST_RASDAEMON_INITRAMFS;
    }
    let mut files = Vec::new();
    let mut kernel_name = lab.manifest.kernel_version.clone();
    if let Some(k) = kernel.as_ref().filter(|k| k.path.is_some()) {
        files.push((
            "bench-kernel".to_string(),
            k.path.clone().unwrap_or_default(),
        ));
        peer.kernel = "/job/bench-kernel".into();
        kernel_name = k.name.clone();
    }
    let script = format!(
        r#"CMDLINE={cmdline}
for i in $(seq 1 {runs}); do
	rasvmm run --kernel {kernel} --initramfs {initramfs} --cmdline "$CMDLINE" \
		--memory 256 --vcpus 1 --cpu {rasvmm_cpu} --console none --json /tmp/r-$i.json --agent poweroff 2>/dev/null
	lab_emit rasvmm-$i /tmp/r-$i.json
	lab-timer /tmp/agent-$i.log '{{"hello"' 60 -- {qemu} >/tmp/q-$i.txt 2>&1
	lab_emit qemu-$i /tmp/q-$i.txt
done
"#,
        cmdline = lab::shell_quote(peer.cmdline),
        kernel = peer.kernel,
        initramfs = peer.initramfs,
        rasvmm_cpu = peer.boot_cpu.0,
        qemu = peer.qemu(peer.boot_cpu.1, "null", "file,path=/tmp/agent-$i.log"),
    );
    eprintln!("bench-boot: {runs} runs each of rasvmm and QEMU in one {arch} lab host...");
    let res = lab
        .run_script_with_files(
            &script,
            &image,
            &files,
            Duration::from_secs(60 + 60 * u64::from(runs)),
        )
        .map_err(|e| chain(&e))?;

    let mut rasvmm_ms = Vec::new();
    let mut rasvmm_overhead = Vec::new();
    let mut qemu_ms = Vec::new();
    let mut qemu_rss = Vec::new();
    for i in 1..=runs {
        let r = report(&res.files, &format!("rasvmm-{i}"))
            .map_err(|e| format!("rasvmm run {i}: {e}"))?;
        let ready = r.agent_ready_ms.ok_or(format!(
            "rasvmm run {i} never reached agent ready: {}",
            r.detail
        ))?;
        rasvmm_ms.push(ready as f64);
        rasvmm_overhead.push(r.memory_use.vmm_overhead_kib as f64);
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
        "boot to agent ready, {runs} runs each, one {arch} lab host ({}), guest {kernel_name}, {} image:",
        res.backend,
        if rasdaemon { "rasdaemon" } else { "default" }
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

/// The rasvmm report a lab job emitted as file `name`, as rasvmm's type.
pub(crate) fn report(files: &BTreeMap<String, String>, name: &str) -> Result<RunReport, String> {
    let text = files.get(name).ok_or("it wrote no report")?;
    serde_json::from_str(text).map_err(|e| format!("its report does not parse: {e}"))
}

/// From a rasvmm report, by the VMM's own clock: the first RAS event that
/// `is` picks (an injection, a GHES report, a poisoning) to the first
/// signal the agent reported.
fn event_to_signal_ms(report: &RunReport, is: fn(&RasEvent) -> bool) -> Option<f64> {
    let at = report.ras_events.iter().find(|e| is(e))?.at_ms()?;
    let signal = *report.signal_ms.first()?;
    Some(signal.checked_sub(at)? as f64)
}

/// An injection or a GHES report: what a latency is measured from.
fn injected_or_reported(e: &RasEvent) -> bool {
    matches!(e, RasEvent::GhesReported { .. } | RasEvent::Injected { .. })
}

/// Where the benchmark's machine check points: 32 MiB, guest RAM in both VMMs.
const GPA: u64 = 0x200_0000;

#[cfg(test)]
mod tests {
    use super::inject::{guest_mce_to_panic_ms, qemu_verdict};
    use super::*;

    fn report_with(events: Vec<RasEvent>, signal_ms: Vec<u64>) -> RunReport {
        let outcome = vmm::outcome::Outcome {
            kind: vmm::outcome::OutcomeKind::Poweroff,
            detail: String::new(),
            log: Vec::new(),
        };
        let mut r = RunReport::new(outcome, "intel", 1, 256);
        r.ras_events = events;
        r.signal_ms = signal_ms;
        r
    }

    #[test]
    fn poison_to_signal_reads_the_report() {
        let poisoned = |e: &RasEvent| matches!(e, RasEvent::Poisoned { .. });
        let r = report_with(
            vec![
                RasEvent::Poisoned {
                    gpa: 0x1000,
                    at_ms: 100,
                },
                RasEvent::GuestKexec {
                    kexecs: 1,
                    at_ms: 101,
                },
            ],
            vec![160],
        );
        assert_eq!(event_to_signal_ms(&r, poisoned), Some(60.0));
        assert_eq!(
            event_to_signal_ms(&report_with(vec![], vec![160]), poisoned),
            None
        );
        // A signal before the event is no latency.
        let early = report_with(r.ras_events.clone(), vec![50]);
        assert_eq!(event_to_signal_ms(&early, poisoned), None);
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
        let r = report_with(
            vec![
                RasEvent::Poisoned { gpa: 0, at_ms: 1 },
                RasEvent::GhesReported {
                    source: ras::ghes::Notification::Nmi,
                    severity: ras::cper::Severity::Recoverable,
                    gpa: Some(0x1000),
                    submitted: ras::ghes::Submitted::Written,
                    at_ms: 2000,
                },
            ],
            vec![2042, 3000],
        );
        assert_eq!(event_to_signal_ms(&r, injected_or_reported), Some(42.0));
        assert_eq!(
            event_to_signal_ms(&report_with(vec![], vec![]), injected_or_reported),
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
