//! `bench-host-poison`: the lab host's memory under a guest page fails
//! (issue 14); what each VMM's guest makes of it, and how soon, rasvmm
//! against QEMU.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use guest_agent::{Command, KernelPageKind, Request};
use lab::{Arch, LAB_GUEST_INITRAMFS};

use super::inject::verdict_patterns;
use super::*;
use crate::chain;

/// Guest RAM, MiB, in both VMMs (as [`Peer::qemu`]'s `-m`).
const RAM_MIB: u64 = 256;

/// One of the issue's three scenarios.
struct Scenario {
    title: &'static str,
    /// rasvmm's `--host-mce-kill` (QEMU always asks the host early).
    host_mce_kill: &'static str,
    /// The guest sysctl set first, and its value.
    sysctl: (&'static str, &'static str),
    /// The page under which the host's memory fails: a slab page
    /// (`kernel-pages`), else the agent's page holder's (`alloc-page`).
    slab: bool,
    /// How long a verdict may take after the poisoning, seconds; a user
    /// page whose poisoning came to nothing by then is touched by its owner.
    window_s: u32,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        title: "user page, early kill in the guest (vm.memory_failure_early_kill=1)",
        host_mce_kill: "early",
        sysctl: ("vm.memory_failure_early_kill", "1"),
        slab: false,
        window_s: 10,
    },
    Scenario {
        title: "user page, early kill off (vm.memory_failure_early_kill=0; rasvmm --host-mce-kill late, QEMU always asks early)",
        host_mce_kill: "late",
        sysctl: ("vm.memory_failure_early_kill", "0"),
        slab: false,
        window_s: 3,
    },
    Scenario {
        title: "slab page, vm.panic_on_unrecoverable_memory_failure=1",
        host_mce_kill: "early",
        sysctl: ("vm.panic_on_unrecoverable_memory_failure", "1"),
        slab: true,
        window_s: 10,
    },
];

/// The slab pages the agent finds (count, stride) and which one (from 1)
/// is poisoned: on arm64 the second, 2 MiB above the first, which holds
/// ACPI objects the GHES interrupt path reads (scenario
/// host-poison-kernel-page-panic).
fn slab_pick(arch: Arch) -> (u32, u32, u32) {
    match arch {
        Arch::X86_64 => (1, 0, 1),
        Arch::Aarch64 => (2, 512, 2),
    }
}

/// Each VMM the bench runs: a label and rasvmm's `--cpu`, or `None` for
/// QEMU with [`Peer::inject_cpu`]'s model (its AMD `qemu64` on x86_64).
fn arms(peer: &Peer) -> Vec<(String, Option<&'static str>)> {
    let qemu = (format!("QEMU -cpu {}", peer.inject_cpu.1), None);
    match peer.arch {
        Arch::X86_64 => vec![
            ("rasvmm --cpu intel".into(), Some("intel")),
            ("rasvmm --cpu amd".into(), Some("amd")),
            qemu,
        ],
        Arch::Aarch64 => vec![("rasvmm --cpu host".into(), Some("host")), qemu],
    }
}

/// A guest agent request, as rasvmm's step and as the agent's JSON line.
struct Ask {
    step: String,
    cmd: Command,
}

/// What the guest is asked before its page goes bad (the last: the page).
fn asks(arch: Arch, s: &Scenario) -> Vec<Ask> {
    let mut v = Vec::new();
    if arch == Arch::X86_64 {
        // rasvmm's AMD profile reports a deferred error, found by the bank
        // poll: every second here, in every guest alike.
        let sh = "echo 1 > /sys/devices/system/machinecheck/machinecheck0/check_interval";
        v.push(Ask {
            step: format!("exec:{sh}"),
            cmd: Command::Exec {
                sh: sh.into(),
                env: Default::default(),
            },
        });
    }
    let (name, value) = s.sysctl;
    v.push(Ask {
        step: format!("sysctl:{name}={value}"),
        cmd: Command::Sysctl {
            name: name.into(),
            value: Some(value.into()),
        },
    });
    v.push(if s.slab {
        let (count, stride, _) = slab_pick(arch);
        Ask {
            step: match stride {
                0 => format!("kernel-pages:slab:{count}"),
                _ => format!("kernel-pages:slab:{count}:stride={stride}"),
            },
            cmd: Command::KernelPages {
                kind: KernelPageKind::Slab,
                count,
                stride,
                poison: false,
            },
        }
    } else {
        Ask {
            step: "alloc-page".into(),
            cmd: Command::AllocPage,
        }
    });
    v
}

fn touch() -> Ask {
    Ask {
        step: "touch-page:0".into(),
        cmd: Command::TouchPage {
            page: 0,
            write: false,
        },
    }
}

/// A request the agent answers only if the guest still runs.
fn alive() -> Ask {
    Ask {
        step: "sysctl:kernel.ostype".into(),
        cmd: Command::Sysctl {
            name: "kernel.ostype".into(),
            value: None,
        },
    }
}

/// `ask`'s request line for QEMU's agent.
fn json(id: u64, a: &Ask) -> String {
    let line = serde_json::to_string(&Request {
        id,
        cmd: a.cmd.clone(),
    })
    .unwrap_or_default();
    lab::shell_quote(&line)
}

/// The lab-host shell for one VMM in one scenario (`$i` is the run): boot,
/// set up, poison the host frame under the page (timed), touch it if
/// nothing came of that, check the guest still answers, and emit what
/// happened as `/tmp/$t.out`.
fn arm_script(arch: Arch, s: &Scenario, tag: &str, cpu: Option<&str>) -> String {
    let ask = asks(arch, s);
    let nth = if s.slab { slab_pick(arch).2 } else { 1 };
    // lab-timer's (file, pattern) pairs: what counts as the guest's verdict.
    let mut out = format!("t={tag}-$i\n");
    let (watch, steps) = match cpu {
        Some(cpu) => {
            let ram_start = match arch {
                Arch::X86_64 => 0,
                Arch::Aarch64 => ::arch::aarch64::layout::RAM_START,
            };
            out += &format!(
                r#"S=/tmp/$t.sock
rasvmm run --kernel {kernel} --initramfs {LAB_GUEST_INITRAMFS} --cmdline "$CMDLINE" --memory {RAM_MIB} --vcpus 1 \
	--cpu {cpu} --host-mce-kill {kill} --console /tmp/$t-console.log --json /tmp/$t.json --api-socket $S \
	--timeout 120 2>/tmp/$t-stderr.log &
p=$!
wait_for "[ -S $S ] && rasvmm api --socket $S state 2>/dev/null | grep -q '\"agent_ready_ms\": [0-9]'"
rasvmm api --socket $S events >/tmp/$t-events.log 2>&1 &
"#,
                kernel = arch.lab_guest_kernel(),
                kill = s.host_mce_kill,
            );
            let (last, first) = ask.split_last().unwrap_or((&ask[0], &[]));
            for a in first {
                out += &format!(
                    "rasvmm api --socket $S {} >/dev/null\n",
                    lab::shell_quote(&a.step)
                );
            }
            out += &format!(
                "rasvmm api --socket $S {} >/tmp/$t-target.log
pfn=$(pfn_of /tmp/$t-target.log {nth})
[ -n \"$pfn\" ] && hpfn=$(ram_pfn $p {} $((pfn * 4096 - {ram_start}))) || hpfn=none
",
                lab::shell_quote(&last.step),
                RAM_MIB << 20
            );
            (
                "/tmp/$t-events.log '\"signal\":{' /tmp/$t-console.log 'Kernel panic'",
                (
                    format!("rasvmm api --socket $S {} >/dev/null", touch().step),
                    format!(
                        "timeout 5 rasvmm api --socket $S {} >/dev/null 2>&1 && echo alive >>/tmp/$t.out
rasvmm api --socket $S poweroff >/dev/null 2>&1
wait
collect $t /tmp/$t-events.log /tmp/$t-console.log /tmp/$t-stderr.log
lab_emit $t-report /tmp/$t.json
lab_emit $t-stderr /tmp/$t-stderr.log",
                        alive().step
                    ),
                ),
            )
        }
        None => {
            out += "qemu_start $t\n";
            let mut id = 0;
            for a in &ask {
                id += 1;
                out += &format!("ask $t {id} {} >/tmp/$t-target.log\n", json(id, a));
            }
            out += &format!(
                "pfn=$(pfn_of /tmp/$t-target.log {nth})
[ -n \"$pfn\" ] && hpfn=$(host_pfn $t $(printf '0x%x' $((pfn * 4096)))) || hpfn=none
[ \"$hpfn\" = none ] && tail -n 4 /tmp/$t-mon.log /tmp/$t-agent.log /tmp/$t-stderr.log >>/tmp/$t.out
echo {} >/tmp/$t-touch.json
",
                json(id + 1, &touch())
            );
            (
                "/tmp/$t-agent.log '\"signal\":{' /tmp/$t-console.log 'Kernel panic' /tmp/$t-stderr.log 'Hardware memory error'",
                (
                    "cat /tmp/$t-touch.json >/tmp/$t-ag.in".to_string(),
                    format!(
                        "ask $t {} {} 250 >/dev/null && echo alive >>/tmp/$t.out
qemu_stop
collect $t /tmp/$t-agent.log /tmp/$t-console.log /tmp/$t-stderr.log",
                        id + 2,
                        json(id + 2, &alive())
                    ),
                ),
            )
        }
    };
    let (touch_cmd, end) = steps;
    out += "echo \"page: pfn $pfn, host frame $hpfn\" >>/tmp/$t.out\n";
    out += &format!(
        "timed $t poison {window} \"echo $hpfn > /sys/kernel/debug/hwpoison/corrupt-pfn\" {watch}\n",
        window = s.window_s
    );
    if !s.slab {
        out += &format!(
            "grep -q ready_ms /tmp/$t-poison.txt || timed $t touch 30 \"{touch_cmd}\" {watch}\n"
        );
    }
    out + "usleep 300000\n" + &end + "\n"
}

/// The host's memory under a guest page fails, in each of the issue's
/// three scenarios, rasvmm and QEMU alternating run by run in one lab host
/// with the same guest: the lab host poisons the frame behind the page
/// (its hwpoison-inject, corrupt-pfn) from outside either VMM, as a DRAM
/// failure the host found would, and times that write to the guest's
/// verdict (the agent's signal report, a panic line, QEMU's exit line). A
/// user page whose poisoning came to nothing within the scenario's window
/// is then touched by its owner, and timed from that touch instead.
pub fn host_poison(arch: Arch, args: &[String]) -> Result<ExitCode, String> {
    let (runs, lab, image) = setup("bench-host-poison", arch, args)?;
    let peer = Peer::of(arch);
    let arms = arms(&peer);
    let verdict_grep: String = verdict_patterns(arch)
        .iter()
        .map(|p| format!(" -e {}", lab::shell_quote(p)))
        .collect();
    let mut body = String::new();
    for (n, s) in SCENARIOS.iter().enumerate() {
        for (a, (_, cpu)) in arms.iter().enumerate() {
            body += &arm_script(arch, s, &format!("s{}-a{a}", n + 1), *cpu);
        }
    }
    let qemu = peer.qemu(
        peer.inject_cpu.1,
        "file,path=/tmp/$1-console.log",
        "pipe,path=/tmp/$1-ag",
    );
    let script = format!(
        r#"CMDLINE={cmdline}
{shell}
# ask <tag> <id> <request> [<tries>]: one request to QEMU's agent; prints its reply.
ask() {{ echo "$3" >/tmp/$1-ag.in; wait_for "grep -q '\"id\":$2,' /tmp/$1-agent.log && whole /tmp/$1-agent.log" $4 && grep "\"id\":$2," /tmp/$1-agent.log; }}
# pfn_of <file> <n>: the page's PFN in an agent reply (the nth of a kernel-pages list).
pfn_of() {{ tr -d ' \n' <$1 | sed -n -E -e 's/.*"pfn":([0-9]+).*/\1/p' -e 's/.*"kernel-pages":\[([0-9,]*)\].*/\1/p' | head -n 1 | cut -d, -f$2; }}
# timed <tag> <what> <secs> <command> <file> <pattern>...: the command, timed to the first pattern.
timed() {{
	t=$1; w=$2; s=$3; c=$4; shift 4
	case "$c" in *"echo none "*) echo "$w: no host frame behind the page" >>/tmp/$t.out; return ;; esac
	lab-timer --trigger "$@" $s -- sh -c "$c" >/tmp/$t-$w.txt 2>&1
	sed "s/^/$w: /" /tmp/$t-$w.txt >>/tmp/$t.out
}}
# collect <tag> <agent-or-events> <console> <stderr>: what the guest did, emitted.
collect() {{
	grep -h '"signal":{{' $2 >>/tmp/$1.out 2>/dev/null
	grep -h{verdict_grep} $3 >>/tmp/$1.out 2>/dev/null
	grep -h 'Hardware memory error' $4 >>/tmp/$1.out 2>/dev/null
	lab_emit $1 /tmp/$1.out
}}
for i in $(seq 1 {runs}); do
{body}done
"#,
        cmdline = lab::shell_quote(peer.cmdline),
        shell = lab_shell(&qemu),
    );
    eprintln!("bench-host-poison: {runs} runs each of rasvmm and QEMU in one {arch} lab host...");
    let res = lab
        .run_script(
            &script,
            &image,
            Duration::from_secs(120 + 300 * u64::from(runs)),
        )
        .map_err(|e| chain(&e))?;
    let file = |name: &str| res.files.get(name).cloned().unwrap_or_default();
    println!(
        "host poisoning (the lab host's corrupt-pfn write) to the guest's verdict, {runs} runs each, one {arch} lab host ({}), guest {}:",
        res.backend, lab.manifest.kernel_version
    );
    for (n, s) in SCENARIOS.iter().enumerate() {
        println!(" {}. {}:", n + 1, s.title);
        // Per arm: its commonest verdict and the times to it.
        let mut tops: Vec<(String, Vec<f64>)> = Vec::new();
        for (a, (label, cpu)) in arms.iter().enumerate() {
            let mut verdicts: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
            let mut own = Vec::new();
            for i in 1..=runs {
                let tag = format!("s{}-a{a}-{i}", n + 1);
                let mut o = outcome(arch, &file(&tag), s.window_s);
                if o.verdict.contains("no host frame") {
                    // The guest never got as far as its page: say why, with
                    // the VMM's own last words, and count it as a verdict.
                    let stderr = file(&format!("{tag}-stderr"));
                    let why = stderr
                        .lines()
                        .find_map(|l| l.strip_prefix("outcome: "))
                        .unwrap_or("no page to poison");
                    println!(
                        "  {label}, run {i}: the guest never reported its page ({why}); its log: {} | VMM stderr: {}",
                        lab::last_lines(&file(&tag), 6),
                        lab::last_lines(&stderr, 6)
                    );
                    o.verdict = format!("the guest never reported its page: {why}");
                }
                verdicts.entry(o.verdict).or_default().push(o.ms);
                if cpu.is_some() {
                    if let Ok(r) = report(&res.files, &format!("{tag}-report")) {
                        own.extend(event_to_signal_ms(&r, |e| {
                            matches!(e, RasEvent::HostMemoryError { .. })
                        }));
                    }
                }
            }
            // (verdict, times, runs)
            let mut top = (String::new(), Vec::new(), 0);
            for (v, all) in &verdicts {
                let mut ms: Vec<f64> = all.iter().flatten().copied().collect();
                println!("  {label}: {v} ({} of {runs})", all.len());
                if !ms.is_empty() {
                    report_ms(&format!("  {label}, to that"), &mut ms);
                }
                if all.len() > top.2 {
                    top = (v.clone(), ms, all.len());
                }
            }
            if !own.is_empty() {
                println!(
                    "    of which rasvmm's own clock, the host's report to the agent's signal: median {:.0} ms",
                    median(&mut own)
                );
            }
            tops.push((top.0, top.1));
        }
        let (qemu, rasvmm) = tops.split_last().ok_or("no arms")?;
        for ((label, _), (v, ms)) in arms.iter().zip(rasvmm) {
            println!("  {}", compare(label, v, ms, &qemu.0, &qemu.1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// rasvmm's arm against QEMU's: the ratio of the medians of the time from
/// the host's poisoning to each guest's verdict, saying whether the
/// verdicts are the same (a signal in one guest and a panic in the other
/// are both the guest's first reaction, which is what is timed).
fn compare(label: &str, rv: &str, rms: &[f64], qv: &str, qms: &[f64]) -> String {
    let med = |v: &[f64]| -> Option<f64> { (!v.is_empty()).then(|| median(&mut v.to_vec())) };
    let show = |m: Option<f64>| m.map_or("no time".to_string(), |m| format!("{m:.0} ms"));
    let same = if rv == qv {
        "the same verdict"
    } else {
        "different verdicts"
    };
    match (med(rms), med(qms)) {
        (Some(r), Some(q)) if q > 0.0 => {
            format!(
                "{label} / QEMU: {:.2}x ({r:.0} ms / {q:.0} ms, {same})",
                r / q
            )
        }
        (r, q) => format!(
            "{label} / QEMU: no ratio (rasvmm {}, QEMU {}, {same})",
            show(r),
            show(q)
        ),
    }
}

/// What one VMM's guest did in one run.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Comparable between VMMs (a PFN in a panic line reads `<pfn>`).
    verdict: String,
    /// From the poisoning, or from the owner's touch when the verdict
    /// came on it, to the verdict.
    ms: Option<f64>,
}

/// Reads one arm's `/tmp/$t.out`: lab-timer's lines (`poison: ...`,
/// `touch: ...`), `alive` if the agent answered afterwards, and the
/// [`verdict_patterns`] and signal lines of its logs.
fn outcome(arch: Arch, text: &str, window_s: u32) -> Outcome {
    let line = |what: &str| text.lines().find_map(|l| l.strip_prefix(what));
    // lab-timer's own lines name the patterns it waited for: not verdicts.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("poison: ") && !l.starts_with("touch: "))
        .filter(|l| verdict_patterns(arch).iter().any(|p| l.contains(p)))
        .map(|l| l.split_once("] ").map_or(l, |(_, t)| t).trim())
        .collect();
    let find = |p: &str| lines.iter().find(|l| l.contains(p)).map(|l| pfn_free(l));
    let alive = text.lines().any(|l| l.trim() == "alive");
    let signal = text
        .lines()
        .find(|l| l.starts_with('{') && l.contains("\"signal\":{"))
        .map(
            |l| match l.split("\"code\":").nth(1).map(|c| c.trim_start()) {
                Some(c) if c.starts_with('4') => "BUS_MCEERR_AR".to_string(),
                Some(c) if c.starts_with('5') => "BUS_MCEERR_AO".to_string(),
                c => format!("code {}", c.unwrap_or("?")),
            },
        );
    let what = if let Some(code) = signal {
        let then = if alive {
            "the guest ran on"
        } else {
            "the guest then stopped answering"
        };
        format!("SIGBUS {code} in the owner, {then}")
    } else if let Some(p) = find("Kernel panic") {
        match find("Machine check:") {
            Some(m) => format!("the guest panicked: {m}; {p}"),
            None => format!("the guest panicked: {p}"),
        }
    } else if let Some(e) = find("Hardware memory error") {
        format!("QEMU exited: {e}")
    } else if alive {
        "no signal, no panic; the guest ran on".to_string()
    } else {
        "no signal, no panic; the guest stopped answering".to_string()
    };
    if let Some(no) = line("poison: ").filter(|l| l.contains("no host frame")) {
        return Outcome {
            verdict: no.to_string(),
            ms: None,
        };
    }
    let ms = |l: Option<&str>| l.and_then(|l| timer_field(l, "ready_ms"));
    match line("touch: ") {
        Some(t) => Outcome {
            verdict: format!("nothing for {window_s} s; on the owner's touch, {what}"),
            ms: ms(Some(t)),
        },
        None => Outcome {
            verdict: match ms(line("poison: ")) {
                Some(_) => what,
                None => format!("nothing within {window_s} s: {what}"),
            },
            ms: ms(line("poison: ")),
        },
    }
}

/// `l` with each hex number (a PFN in "Memory failure: 0x1a2b: ...") as
/// `<pfn>`, so the same verdict reads the same in two guests.
fn pfn_free(l: &str) -> String {
    l.split(' ')
        .map(|w| match w.strip_prefix("0x") {
            Some(h)
                if h.trim_end_matches(':')
                    .chars()
                    .all(|c| c.is_ascii_hexdigit()) =>
            {
                if w.ends_with(':') {
                    "<pfn>:"
                } else {
                    "<pfn>"
                }
            }
            _ => w,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_and_times_read_from_an_arm() {
        let ao = "poison: ready_ms=52 matched=0\nalive\n{\"event\":{\"event\":\"signal\",\"signal\":{\"code\":5,\"page\":0}}}\n";
        assert_eq!(
            outcome(Arch::X86_64, ao, 10),
            Outcome {
                verdict: "SIGBUS BUS_MCEERR_AO in the owner, the guest ran on".into(),
                ms: Some(52.0)
            }
        );
        let late = "poison: lab-timer: none of '\"signal\":{' in /tmp/x appeared\ntouch: ready_ms=9 matched=0\nalive\n\
                    {\"signal\":{\"page\":0,\"pid\":9,\"signo\":7,\"code\":4,\"addr\":1}}\n";
        let o = outcome(Arch::X86_64, late, 3);
        assert_eq!(
            o.verdict,
            "nothing for 3 s; on the owner's touch, SIGBUS BUS_MCEERR_AR in the owner, the guest ran on"
        );
        assert_eq!(o.ms, Some(9.0));
        let panic = "poison: ready_ms=30 matched=1\n[ 5.1] Kernel panic - not syncing: Memory failure: 0xa1e9: unrecoverable page\n";
        assert_eq!(
            outcome(Arch::X86_64, panic, 10).verdict,
            "the guest panicked: Kernel panic - not syncing: Memory failure: <pfn>: unrecoverable page"
        );
        let mce = "poison: ready_ms=30 matched=1\n[ 5.0] mce: [Hardware Error]: Machine check: Uncorrected in kernel\n\
                   [ 5.1] Kernel panic - not syncing: Fatal machine check\n";
        assert_eq!(
            outcome(Arch::X86_64, mce, 10).verdict,
            "the guest panicked: mce: [Hardware Error]: Machine check: Uncorrected in kernel; Kernel panic - not syncing: Fatal machine check"
        );
        let quiet = "poison: lab-timer: none appeared\nalive\n";
        assert_eq!(
            outcome(Arch::Aarch64, quiet, 10),
            Outcome {
                verdict: "nothing within 10 s: no signal, no panic; the guest ran on".into(),
                ms: None
            }
        );
        let exit = "poison: lab-timer: none of '\"signal\":{' in /tmp/a, 'Kernel panic' in /tmp/b appeared\ntouch: ready_ms=20 matched=2\nqemu-system-aarch64: Hardware memory error!\n";
        assert_eq!(
            outcome(Arch::Aarch64, exit, 3).verdict,
            "nothing for 3 s; on the owner's touch, QEMU exited: qemu-system-aarch64: Hardware memory error!"
        );
        assert!(
            outcome(Arch::X86_64, "poison: no host frame behind the page\n", 3)
                .verdict
                .contains("no host frame")
        );
    }

    #[test]
    fn ratios_say_whether_the_verdicts_agree() {
        assert_eq!(
            compare("rasvmm", "a", &[10.0, 30.0, 20.0], "a", &[40.0]),
            "rasvmm / QEMU: 0.50x (20 ms / 40 ms, the same verdict)"
        );
        assert_eq!(
            compare("rasvmm", "a", &[10.0], "b", &[20.0]),
            "rasvmm / QEMU: 0.50x (10 ms / 20 ms, different verdicts)"
        );
        assert_eq!(
            compare("rasvmm", "a", &[10.0], "b", &[]),
            "rasvmm / QEMU: no ratio (rasvmm 10 ms, QEMU no time, different verdicts)"
        );
    }

    #[test]
    fn both_vmms_are_asked_the_same() {
        for arch in Arch::ALL {
            let peer = Peer::of(arch);
            for (n, s) in SCENARIOS.iter().enumerate() {
                let ask = asks(arch, s);
                assert_eq!(ask.len(), if arch == Arch::X86_64 { 3 } else { 2 });
                for (a, (_, cpu)) in arms(&peer).iter().enumerate() {
                    let sh = arm_script(arch, s, &format!("s{n}-a{a}"), *cpu);
                    assert!(sh.contains("timed $t poison"), "{sh}");
                    assert_eq!(sh.contains("timed $t touch"), !s.slab, "{sh}");
                    match cpu {
                        Some(_) => {
                            assert!(sh.contains(&format!("--host-mce-kill {}", s.host_mce_kill)))
                        }
                        None => {
                            assert!(sh.contains("\"sysctl\":{\"name\":") && sh.contains("host_pfn"))
                        }
                    }
                }
            }
        }
        assert_eq!(
            pfn_free("Memory failure: 0x1a2b: unrecoverable page"),
            "Memory failure: <pfn>: unrecoverable page"
        );
    }
}
