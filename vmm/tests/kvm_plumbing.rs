//! rasvmm's own KVM plumbing on tiny hand-assembled payloads: vCPU set-up in
//! long mode, the port-I/O bus, both UARTs' paths, the i8042 reset line and
//! the outcome classifier, without Linux. These need /dev/kvm (any backend,
//! PVM included: the payloads are a few instructions) and fail, never skip,
//! without it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vmm::config::{BootSource, ConsoleTarget, VmConfig};
use vmm::outcome::OutcomeKind;

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
        memory_mib: 64,
        vcpus,
        cpu: arch::x86_64::cpuid::profile("intel").unwrap(),
        console: ConsoleTarget::Discard,
        timeout: Duration::from_secs(30),
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

#[test]
fn payload_that_does_not_fit_is_an_error() {
    let cfg = config(vec![0x90; 65 << 20], 1);
    let err = vmm::run::run(&cfg, &[]).expect_err("must fail");
    assert!(err.to_string().contains("payload"), "{err}");
}
