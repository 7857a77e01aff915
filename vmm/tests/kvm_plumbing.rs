//! rasvmm's own KVM plumbing on tiny hand-assembled payloads: vCPU set-up in
//! long mode, the port-I/O bus, both UARTs' paths, the i8042 reset line and
//! the outcome classifier, without Linux. These need /dev/kvm (any backend,
//! PVM included: the payloads are a few instructions) and fail, never skip,
//! without it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vmm::config::{BootSource, ConsoleTarget, VmConfig};
use vmm::outcome::OutcomeKind;
use vmm::steps::Step;

const LOAD: u64 = 0x10_0000;

fn config(bytes: Vec<u8>, vcpus: u8) -> VmConfig {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests exercise rasvmm's KVM code and need it"
    );
    VmConfig {
        boot: BootSource::Payload {
            bytes,
            load_addr: LOAD,
        },
        poison_report: Default::default(),
        tables: Default::default(),
        memory_mib: 64,
        vcpus,
        cpu: arch::x86_64::cpuid::profile("intel").unwrap(),
        console: ConsoleTarget::Discard,
        timeout: Duration::from_secs(30),
        host_mce_kill: Default::default(),
        reboot: Default::default(),
    }
}

/// `mov dx, 0x3f8`, then `mov al, c; out dx, al` for each byte of `text`.
fn print(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for &c in text {
        code.extend_from_slice(&[0xb0, c, 0xee]);
    }
    code
}

#[test]
fn payload_prints_on_com1_and_resets_through_i8042() {
    let mut code = print(b"rasvmm payload OK\n");
    // mov al, 0xfe; out 0x64, al; then spin.
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    let report = vmm::run::run(&config(code, 1), &[]).unwrap();
    assert_eq!(report.outcome, OutcomeKind::Reboot, "{report:?}");
    assert_eq!(report.log, vec!["rasvmm payload OK".to_string()]);
    assert!(report.agent_ready_ms.is_none());
}

#[test]
fn panic_line_then_reset_is_classified_as_panic() {
    let mut code = print(b"before\nKernel panic - not syncing: payload test\n");
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    let report = vmm::run::run(&config(code, 2), &[]).unwrap();
    assert_eq!(report.outcome, OutcomeKind::Panic);
    assert_eq!(report.detail, "Kernel panic - not syncing: payload test");
    assert_eq!(report.log[0], "before");
}

#[test]
fn a_panic_the_guest_does_not_reboot_from_still_ends_the_run_under_restart() {
    // No panic=N > 0 on the command line (a payload has none): the reset
    // after the panic is the end of the run, not the next boot.
    let mut code = print(b"Kernel panic - not syncing: payload test\n");
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    let mut cfg = config(code, 1);
    cfg.reboot.on_reboot = vmm::config::OnReboot::Restart;
    let report = vmm::run::run(&cfg, &[]).unwrap();
    assert_eq!(report.outcome, OutcomeKind::Panic);
    assert_eq!(report.boots.len(), 1);
    assert_eq!(report.boots[0].end.name(), "panic");
}

#[test]
fn exception_without_idt_is_a_triple_fault() {
    // ud2 through the empty boot IDT: #UD -> #NP -> #DF -> shutdown. (Not
    // int3: KVM's PVM backend emulates int3 and reports an emulation failure.)
    let report = vmm::run::run(&config(vec![0x0f, 0x0b], 1), &[]).unwrap();
    assert_eq!(report.outcome, OutcomeKind::TripleFault, "{report:?}");
    assert_eq!(report.detail, "vCPU 0 triple fault");
}

#[test]
fn spinning_guest_times_out_at_the_deadline() {
    let mut cfg = config(vec![0xeb, 0xfe], 1);
    cfg.timeout = Duration::from_secs(2);
    let start = std::time::Instant::now();
    let report = vmm::run::run(&cfg, &[]).unwrap();
    assert_eq!(report.outcome, OutcomeKind::Timeout);
    // Where the guest was: the spinning vCPU at its jmp $.
    let at = report
        .log
        .iter()
        .find(|l| l.starts_with("rasvmm: vCPU 0 at the deadline"))
        .unwrap_or_else(|| panic!("{:?}", report.log));
    assert!(at.contains(&format!("rip {:#x}", LOAD)), "{at}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[test]
fn agent_hello_over_com2_is_decoded() {
    // A payload that plays agent: writes a hello line on COM2 (0x2f8), then
    // powers off the way Linux announces it on the console.
    let hello = br#"{"hello":{"version":1,"kernel":"payload","cpus":1}}"#;
    let mut code = vec![0x66, 0xba, 0xf8, 0x02];
    for &c in hello.iter().chain(b"\n") {
        code.extend_from_slice(&[0xb0, c, 0xee]);
    }
    code.extend(print(b"reboot: Power down\n"));
    code.extend_from_slice(&[0xeb, 0xfe]);
    let report = vmm::run::run(&config(code, 1), &[]).unwrap();
    assert_eq!(report.outcome, OutcomeKind::Poweroff);
    assert_eq!(report.guest_kernel.as_deref(), Some("payload"));
    assert!(report.agent_ready_ms.is_some());
}

fn steps(list: &[&str]) -> Vec<(String, Step)> {
    list.iter()
        .map(|s| (s.to_string(), vmm::steps::parse(s).unwrap()))
        .collect()
}

/// A payload that enables machine checks (CR4.MCE), installs an IDT whose
/// #MC gate (vector 18) prints "MC", reads MC9_STATUS with rdmsr and prints
/// "OK" if its high half is 0xBD000000 (Intel SRAO), then resets. It prints
/// "R" once ready.
fn mc_payload() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x0f, 0x20, 0xe0,                         // 0:  mov rax, cr4
        0x48, 0x83, 0xc8, 0x40,                   // 3:  or rax, 0x40 (CR4.MCE)
        0x0f, 0x22, 0xe0,                         // 7:  mov cr4, rax
        0x0f, 0x01, 0x1c, 0x25, 0x00, 0x07, 0x10, 0x00, // 10: lidt [0x100700]
        0x66, 0xba, 0xf8, 0x03,                   // 18: mov dx, 0x3f8
        0xb0, b'R', 0xee, 0xb0, b'\n', 0xee,      // 22: "R\n"
        0xf3, 0x90, 0xeb, 0xfc,                   // 28: pause; jmp 28
        // 32: the #MC handler
        0x66, 0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
        0xb0, b'M', 0xee, 0xb0, b'C', 0xee, 0xb0, b'\n', 0xee,
        0xb9, 0x25, 0x04, 0x00, 0x00,             // 45: mov ecx, 0x425 (MC9_STATUS)
        0x0f, 0x32,                               // 50: rdmsr
        0x81, 0xfa, 0x00, 0x00, 0x00, 0xbd,       // 52: cmp edx, 0xbd000000
        0x75, 0x0d,                               // 58: jne 73
        0x66, 0xba, 0xf8, 0x03,                   // 60: mov dx, 0x3f8
        0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xb0, b'\n', 0xee,
        0xb0, 0xfe, 0xe6, 0x64,                   // 73: reset through the i8042
        0xeb, 0xfe,
    ];
    let mut p = vec![0u8; 0x1000];
    p[..code.len()].copy_from_slice(code);
    // IDTR at +0x700: limit, base = LOAD + 0x800.
    p[0x700..0x702].copy_from_slice(&0x0fffu16.to_le_bytes());
    p[0x702..0x70a].copy_from_slice(&(LOAD + 0x800).to_le_bytes());
    // Gate 18: 64-bit interrupt gate to LOAD + 32, code selector 8.
    let handler = LOAD + 32;
    let gate = 0x800 + 18 * 16;
    p[gate..gate + 2].copy_from_slice(&((handler & 0xffff) as u16).to_le_bytes());
    p[gate + 2..gate + 4].copy_from_slice(&8u16.to_le_bytes());
    p[gate + 5] = 0x8e;
    p[gate + 6..gate + 8].copy_from_slice(&(((handler >> 16) & 0xffff) as u16).to_le_bytes());
    p
}

#[test]
fn srao_reaches_the_guest_machine_check_handler() {
    let cfg = config(mc_payload(), 1);
    let report = vmm::run::run(&cfg, &steps(&["wait:300", "inject:srao:0x200000"])).unwrap();
    assert_eq!(report.outcome, OutcomeKind::Reboot, "{report:?}");
    assert_eq!(report.log, vec!["R", "MC", "OK"], "{report:?}");
    assert!(report.steps[1].error.is_none(), "{:?}", report.steps[1]);
}

#[test]
fn injections_the_guest_cannot_take_are_refused() {
    // Spins without enabling CR4.MCE.
    let mut cfg = config(vec![0xf3, 0x90, 0xeb, 0xfc], 2);
    cfg.timeout = Duration::from_secs(3);
    let report = vmm::run::run(
        &cfg,
        &steps(&[
            "wait:200",
            "inject:srao:0x200000",
            "inject:srar:0x200000:vcpu=1",
            "inject:srao:0x10000000000",
            "inject:srao:0x200000:vcpu=2",
            "poison:0x200001",
            "poison:0x10000000000",
        ]),
    )
    .unwrap();
    let errors: Vec<String> = report
        .steps
        .iter()
        .map(|s| s.error.clone().unwrap_or_default())
        .collect();
    assert_eq!(errors[0], "");
    assert!(errors[1].contains("CR4.MCE clear"), "{errors:?}");
    assert!(
        errors[2].contains("vCPU 0 has CR4.MCE clear"),
        "broadcast checks every vCPU first: {errors:?}"
    );
    assert_eq!(
        errors[3],
        "Guest-physical address 0x10000000000 is not in guest RAM"
    );
    assert_eq!(errors[4], "vCPU 2 does not exist (the VM has 2)");
    assert_eq!(
        errors[5],
        "Guest-physical address 0x200001 is not page-aligned"
    );
    assert_eq!(
        errors[6],
        "Guest-physical address 0x10000000000 is not in guest RAM"
    );
    assert!(
        report.ras_events.is_empty(),
        "nothing was injected: {:?}",
        report.ras_events
    );
    assert!(report.ledger.is_empty());
    assert_eq!(report.outcome, OutcomeKind::Timeout);
}

#[test]
fn payload_that_does_not_fit_is_an_error() {
    let cfg = config(vec![0x90; 65 << 20], 1);
    let err = vmm::run::run(&cfg, &[]).expect_err("must fail");
    assert!(err.to_string().contains("payload"), "{err}");
}

/// Connects to a run's API socket once it exists.
fn connect_when_ready(path: &std::path::Path) -> std::os::unix::net::UnixStream {
    for _ in 0..500 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(path) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the API socket {} never appeared", path.display());
}

/// Sends one request line and reads lines until the answer with `id`.
fn api_call(
    w: &mut std::os::unix::net::UnixStream,
    r: &mut impl std::io::BufRead,
    id: u64,
    request: &str,
) -> serde_json::Value {
    use std::io::Write;
    writeln!(w, "{{\"id\":{id},\"request\":{request}}}").unwrap();
    loop {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "connection closed");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["id"] == id {
            return v;
        }
    }
}

#[test]
fn control_api_injects_streams_events_and_shuts_down() {
    use std::io::{BufRead, BufReader, Write};
    let path = std::env::temp_dir().join(format!("rasvmm-plumbing-api-{}", std::process::id()));
    let client_path = path.clone();
    let client = std::thread::spawn(move || {
        let mut s = connect_when_ready(&client_path);
        let mut r = BufReader::new(s.try_clone().unwrap());
        let state = api_call(&mut s, &mut r, 1, "\"state\"");
        assert!(
            state["ok"]["mcg_cap"].as_u64().unwrap() & 0xff > 0,
            "{state}"
        );
        let bad = api_call(
            &mut s,
            &mut r,
            2,
            "{\"step\":\"inject:srao:0x10000000000\"}",
        );
        assert_eq!(
            bad["error"],
            "Guest-physical address 0x10000000000 is not in guest RAM"
        );
        writeln!(s, "not json").unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("malformed request"), "{l}");
        assert_eq!(
            api_call(&mut s, &mut r, 3, "\"subscribe\"")["ok"],
            serde_json::Value::Null
        );
        std::thread::sleep(Duration::from_millis(300));
        writeln!(
            s,
            "{{\"id\":4,\"request\":{{\"step\":\"inject:srao:0x200000\"}}}}"
        )
        .unwrap();
        // The injection's event, its answer, then the guest's reset.
        let mut seen = Vec::new();
        for l in r.lines() {
            let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
            if v["id"] == 4 {
                assert_eq!(v["ok"], serde_json::Value::Null, "{v}");
                seen.push("answer".to_string());
                continue;
            }
            let e = v["event"]["event"].as_str().unwrap_or("").to_string();
            seen.push(e.clone());
            if e == "outcome" {
                assert_eq!(v["event"]["outcome"], "reboot", "{v}");
                break;
            }
        }
        assert_eq!(seen, vec!["injected", "answer", "outcome"]);
    });
    let cfg = config(mc_payload(), 1);
    let report = vmm::run::run_expecting(&cfg, &[], None, Some(&path)).unwrap();
    client.join().unwrap();
    assert_eq!(report.outcome, OutcomeKind::Reboot);
    assert_eq!(report.log, vec!["R", "MC", "OK"]);
    assert!(!path.exists(), "the socket is removed with the run");

    // A run stopped over the API ends as "stopped".
    let path2 = path.with_extension("2");
    let p2 = path2.clone();
    let stopper = std::thread::spawn(move || {
        let mut s = connect_when_ready(&p2);
        let mut r = BufReader::new(s.try_clone().unwrap());
        assert_eq!(
            api_call(&mut s, &mut r, 9, "\"shutdown\"")["ok"],
            serde_json::Value::Null
        );
    });
    let report =
        vmm::run::run_expecting(&config(vec![0xeb, 0xfe], 1), &[], None, Some(&path2)).unwrap();
    stopper.join().unwrap();
    assert_eq!(report.outcome, OutcomeKind::Stopped);
}

#[test]
fn guest_reads_the_mcg_cap_rasvmm_reports() {
    // mov ecx, IA32_MCG_CAP; rdmsr; mov ebx, eax; then print bit 24 (SER_P)
    // and bit 8 (MCG_CTL_P) as digits on COM1, a newline, and reset.
    let mut code = vec![0xb9, 0x79, 0x01, 0x00, 0x00, 0x0f, 0x32, 0x89, 0xc3];
    code.extend_from_slice(&[0xc1, 0xe8, 0x18, 0x24, 0x01, 0x04, 0x30]);
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xee]);
    code.extend_from_slice(&[0x89, 0xd8, 0xc1, 0xe8, 0x08, 0x24, 0x01, 0x04, 0x30, 0xee]);
    code.extend_from_slice(&[0xb0, 0x0a, 0xee]);
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    let report = vmm::run::run(&config(code, 1), &[]).unwrap();
    assert_eq!(report.outcome, OutcomeKind::Reboot, "{report:?}");
    let bit = |n: u32| (report.mcg_cap >> n) & 1;
    assert_eq!(report.log, vec![format!("{}{}", bit(24), bit(8))]);
    // An Intel profile always gets SER_P: from KVM, or supplied by rasvmm.
    assert_eq!(bit(24), 1, "{report:?}");
}

#[test]
fn a_thousand_injections_and_rasvmms_share_of_each() {
    use ras::mce::{MceRecord, MCI_STATUS_ADDRV, MCI_STATUS_EN, MCI_STATUS_MISCV, MCI_STATUS_VAL};
    use vmm::event::RasEvent;
    // A spinning guest: every injection kicks its vCPU out of KVM_RUN,
    // which checks and injects the record on its own thread. A corrected
    // record only fills the bank, so the guest needs no handler.
    let vm = vmm::vm::Vm::start(&config(vec![0xeb, 0xfe], 1)).unwrap();
    let corrected = MceRecord {
        bank: 9,
        status: MCI_STATUS_VAL | MCI_STATUS_EN | MCI_STATUS_ADDRV | MCI_STATUS_MISCV,
        addr: 0x20_0000,
        misc: 0x8c,
        mcg_status: 0,
    };
    let mut us: Vec<u64> = (0..1000)
        .map(|i| {
            match vm
                .ras()
                .inject_record(0, &corrected, std::time::Instant::now())
            {
                Ok(RasEvent::InjectedRaw {
                    vmm_us, vcpu: 0, ..
                }) => vmm_us,
                other => panic!("injection {i}: {other:?}"),
            }
        })
        .collect();
    us.sort_unstable();
    let pct = |p: usize| us[(us.len() * p / 100).min(us.len() - 1)];
    println!(
        "rasvmm's share of an injection (request at the RAS controller to KVM_X86_SET_MCE returned), \
         1000 corrected records into a spinning payload on this /dev/kvm: p50 {} us, p99 {} us, max {} us",
        pct(50),
        pct(99),
        us[us.len() - 1]
    );
    assert!(us.iter().all(|&u| u > 0), "every injection was timed");
}

#[test]
fn an_early_host_report_goes_into_the_ledger_and_to_the_guest() {
    use ras::ledger::{Source, Told};
    use ras::mce::MemoryError;
    use vmm::event::{HostErrorCode, RasEvent};
    use vmm::ras_controller::HostReport;
    // The guest enables machine checks and waits: the host's early report of
    // a page of guest RAM becomes an SRAO the guest takes, and the page is
    // the host's in the ledger.
    let vm = vmm::vm::Vm::start(&config(mc_payload(), 1)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let hva = vm.ras().host_addresses(&[0x20_0000]).unwrap()[0];
    match vm.ras().host_reported(libc::BUS_MCEERR_AO, hva, true) {
        HostReport::Guest(RasEvent::HostMemoryError {
            code,
            gpa,
            told,
            result,
            ..
        }) => {
            assert_eq!(code, HostErrorCode::ActionOptional);
            assert_eq!(gpa, Some(0x20_0000));
            assert_eq!(
                told,
                Some(Told::MachineCheck(MemoryError::Srao)),
                "{result:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let entry = vm.ras().ledger()[0].clone();
    assert_eq!((entry.gpa, entry.source), (0x20_0000, Source::Host));
    assert_eq!(entry.told, vec![Told::MachineCheck(MemoryError::Srao)]);
    // Host memory already bad is not poisoned again from outside.
    assert!(vm.ras().host_addresses(&[0x20_0000]).is_err());
    // Memory that is not guest RAM ends the run.
    match vm.ras().host_reported(libc::BUS_MCEERR_AO, 0x1000, true) {
        HostReport::Vmm { detail, .. } => {
            assert!(detail.contains("rasvmm's own memory"), "{detail}");
            assert!(detail.contains("BUS_MCEERR_AO"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    drop(vm);

    // A guest that has not enabled machine checks cannot take the report:
    // the page is still the host's, and the event says why the guest was
    // not told.
    let vm = vmm::vm::Vm::start(&config(vec![0xeb, 0xfe], 1)).unwrap();
    let hva = vm.ras().host_addresses(&[0x30_0000]).unwrap()[0];
    match vm.ras().host_reported(libc::BUS_MCEERR_AO, hva, true) {
        HostReport::Guest(RasEvent::HostMemoryError { told, result, .. }) => {
            assert_eq!(told, None);
            assert!(result.unwrap_or_default().contains("CR4.MCE clear"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.ras().ledger()[0].source, Source::Host);
}

/// Counts its boots in guest RAM (at 0x200000, which no load writes):
/// resets through the i8042 until the count reaches `until`, then powers
/// off through the ACPI sleep control register (S5).
fn count_boots_payload(until: u8) -> Vec<u8> {
    let mut code = vec![
        0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov rax, [0x200000]
        0x48, 0xff, 0xc0, // inc rax
        0x48, 0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov [0x200000], rax
        0x48, 0x83, 0xf8, until, // cmp rax, until
        0x73, 0x06, // jae poweroff
    ];
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]); // reset; jmp $
                                                                   // poweroff: mov dx, 0x600; mov al, SLP_EN | S5 << 2; out dx, al; jmp $
    code.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xeb, 0xfe]);
    code
}

#[test]
fn restart_boots_again_on_the_same_memory_with_new_vcpus() {
    use vmm::config::OnReboot;
    let mut cfg = config(count_boots_payload(3), 2);
    cfg.reboot.on_reboot = OnReboot::Restart;
    let report = vmm::run::run(&cfg, &[]).unwrap();
    // Three boots: the count in guest RAM survived both resets (a fresh
    // memory would count 1 forever, up to the reboot loop), and each boot
    // ran on newly created vCPUs (KVM cannot reset them in place).
    assert_eq!(report.outcome, OutcomeKind::Poweroff, "{report:?}");
    let ends: Vec<&str> = report.boots.iter().map(|b| b.end.name()).collect();
    assert_eq!(ends, ["reset", "reset", "poweroff"]);
    let indexes: Vec<u32> = report.boots.iter().map(|b| b.index).collect();
    assert_eq!(indexes, [1, 2, 3]);
    for w in report.boots.windows(2) {
        assert!(w[0].ended_ms <= w[1].started_ms, "{:?}", report.boots);
    }
    assert!(report.boots.iter().all(|b| b.pages.is_empty()));
}

#[test]
fn exit_ends_the_run_at_the_first_reset_as_before() {
    let report = vmm::run::run(&config(count_boots_payload(3), 1), &[]).unwrap();
    assert_eq!(report.outcome, OutcomeKind::Reboot);
    assert_eq!(report.boots.len(), 1);
    assert_eq!(report.boots[0].end.name(), "reboot");
}

#[test]
fn a_guest_that_always_resets_ends_as_a_reboot_loop() {
    use vmm::config::{OnReboot, MAX_BOOTS};
    // Counts to 255 before it would power off: far beyond the bound.
    let mut cfg = config(count_boots_payload(255), 1);
    cfg.reboot.on_reboot = OnReboot::Restart;
    let report = vmm::run::run(&cfg, &[]).unwrap();
    assert_eq!(report.outcome, OutcomeKind::RebootLoop, "{report:?}");
    assert_eq!(report.detail, "the guest reset after 16 boots");
    assert_eq!(report.boots.len(), MAX_BOOTS as usize);
    assert_eq!(report.boots.last().unwrap().end.name(), "reboot-loop");
}
