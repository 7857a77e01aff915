//! Payload tests of the VM's vCPU threads and boots, on this machine's
//! /dev/kvm (any backend, PVM included). The payloads are x86 code.
//!
//! Test code only (the layering test reads no further than this): vm.rs
//! declares the module under #[cfg(all(test, target_arch = "x86_64"))].

#![allow(clippy::unwrap_used)]

use super::*;
use crate::config::{BootSource, ConsoleTarget};
use crate::event::{VcpuStop, VmEvent};

/// A payload VM on this machine's /dev/kvm (any backend, PVM included).
fn payload(bytes: Vec<u8>, vcpus: u8) -> VmConfig {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test exercises rasvmm's vCPU threads and needs it"
    );
    VmConfig {
        boot: BootSource::Payload {
            bytes,
            load_addr: 0x10_0000,
        },
        poison_report: Default::default(),
        tables: Default::default(),
        memory_mib: 64,
        vcpus,
        cpu: arch::guest::profile("amd").unwrap(),
        console: ConsoleTarget::Discard,
        timeout: Duration::from_secs(30),
        host_mce_kill: Default::default(),
        reboot: Default::default(),
    }
}

#[test]
fn vcpu_threads_start_kick_finish_and_join() {
    // vCPU 0 runs ud2 through the empty boot IDT and triple-faults, so
    // its thread ends; vCPU 1 waits for a SIPI inside KVM_RUN.
    let mut vm = Vm::start(&payload(vec![0x0f, 0x0b], 2)).unwrap();
    let mut waiter = crate::event_loop::EventLoop::new(vm.events().wake_fd()).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Ok(e) = vm.events().try_recv() {
            break e;
        }
        assert!(Instant::now() < until, "no event from the vCPUs");
        waiter.wait(Duration::from_millis(100)).unwrap();
    };
    match first {
        VmEvent::Stopped {
            vcpu: 0,
            stop: VcpuStop::TripleFault(state),
        } => assert!(state.contains("rip 0x"), "{state}"),
        other => panic!("expected vCPU 0's triple fault, got {other:?}"),
    }
    // A kick for the stopped vCPU reaches no thread; the waiting one is
    // kicked out of KVM_RUN and answers from its own thread.
    let states = vm.vcpu_states(Duration::from_millis(500), "now");
    assert!(states[0].contains("no answer"), "{states:?}");
    assert!(states[1].contains("mp_state"), "{states:?}");
    // Again: kicks are repeatable and never hit an exited thread.
    let again = vm.vcpu_states(Duration::from_millis(500), "now");
    assert!(again[1].contains("mp_state"), "{again:?}");
    let t = Instant::now();
    assert!(vm.finish_vcpus(), "every vCPU thread joined cleanly");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Finished: nothing answers, nothing is signalled.
    let after = vm.vcpu_states(Duration::from_millis(100), "now");
    assert!(after.iter().all(|s| s.contains("no answer")), "{after:?}");
    assert!(vm.finish_vcpus(), "finishing twice is harmless");
}

#[test]
fn a_running_vcpu_is_finished_and_joined_when_the_vm_drops() {
    // jmp $: the vCPU never leaves the guest on its own.
    let vm = Vm::start(&payload(vec![0xeb, 0xfe], 1)).unwrap();
    let states = vm.vcpu_states(Duration::from_secs(2), "now");
    assert!(states[0].contains("rip 0x100000"), "{states:?}");
    let t = Instant::now();
    drop(vm);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// Guest page the poison payload writes a pattern to, then reads back in
/// its second boot.
const PAGE_P: u64 = 0x30_0000;
/// Its flags: `ready` (set by the first boot once the pattern is written)
/// and `go` (set by the test once the page is poisoned).
const READY: u64 = 0x20_1008;
const GO: u64 = 0x20_1000;
/// Where the second boot stores what it read from the page.
const READ_BACK: u64 = 0x20_2000;

/// Boot 1: writes a pattern to PAGE_P, says ready, waits for go, resets.
/// Boot 2: reads PAGE_P into READ_BACK and powers off.
fn poison_payload() -> Vec<u8> {
    let mut c = vec![
        0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov rax, [0x200000]
        0x48, 0xff, 0xc0, // inc rax
        0x48, 0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov [0x200000], rax
        0x48, 0x83, 0xf8, 0x01, // cmp rax, 1
        0x75, 0x2d, // jne second
        0x48, 0xbb, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // mov rbx, pattern
        0x48, 0x89, 0x1c, 0x25, 0x00, 0x00, 0x30, 0x00, // mov [PAGE_P], rbx
        0xc6, 0x04, 0x25, 0x08, 0x10, 0x20, 0x00, 0x01, // mov byte [READY], 1
        // wait: mov rcx, [GO]; test rcx, rcx; jz wait
        0x48, 0x8b, 0x0c, 0x25, 0x00, 0x10, 0x20, 0x00, 0x48, 0x85, 0xc9, 0x74, 0xf3, 0xb0, 0xfe,
        0xe6, 0x64, 0xeb, 0xfe, // reset; jmp $
    ];
    // second: mov rbx, [PAGE_P]; mov [READ_BACK], rbx
    c.extend_from_slice(&[0x48, 0x8b, 0x1c, 0x25, 0x00, 0x00, 0x30, 0x00]);
    c.extend_from_slice(&[0x48, 0x89, 0x1c, 0x25, 0x00, 0x20, 0x20, 0x00]);
    // poweroff: mov dx, 0x600; mov al, SLP_EN | S5 << 2; out dx, al; jmp $
    c.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xeb, 0xfe]);
    c
}

fn read(session: &crate::session::Session, gpa: u64) -> u64 {
    use vm_memory::Bytes;
    session.vm().memory.read_obj(GuestAddress(gpa)).unwrap()
}

/// What the first boot writes to PAGE_P.
const PATTERN: u64 = 0x1122_3344_5566_7788;

/// Boots the poison payload with `reboot` and waits until its first boot
/// wrote its pattern to PAGE_P and waits for GO.
fn first_boot_wrote_its_pattern(reboot: crate::config::Reboot) -> crate::session::Session {
    let mut cfg = payload(poison_payload(), 1);
    cfg.reboot = reboot;
    let vm = Vm::start(&cfg).unwrap();
    let mut s = crate::session::Session::new(vm).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while read(&s, READY) != 1 {
        assert!(
            Instant::now() < until,
            "the payload never wrote its pattern"
        );
        s.wait(Duration::from_millis(5));
    }
    assert_eq!(read(&s, PAGE_P), PATTERN);
    s
}

/// Boots the poison payload with `--on-reboot restart`, poisons PAGE_P
/// once the first boot wrote its pattern there, and lets it reset. True
/// with the session if the host page is hwpoisoned; a host kernel without
/// CONFIG_MEMORY_FAILURE refuses MADV_HWPOISON, and the page is then only
/// recorded as sticky in the ledger (what the reset decides from).
fn poisoned_then_reset(keep: bool) -> (crate::session::Session, bool) {
    use vm_memory::Bytes;
    let mut s = first_boot_wrote_its_pattern(crate::config::Reboot {
        on_reboot: crate::config::OnReboot::Restart,
        keep_poison_on_reset: keep,
    });
    // Sticky poison (MADV_HWPOISON: needs CAP_SYS_ADMIN, and fails the
    // test without it).
    let hwpoisoned = match s.poison(PAGE_P) {
        Ok(_) => true,
        Err(crate::ras_controller::RasError::Poison { reason, .. })
            if reason.contains("CONFIG_MEMORY_FAILURE") =>
        {
            s.vm().ras().mark_sticky_for_test(PAGE_P);
            false
        }
        Err(e) => panic!("{e}"),
    };
    s.vm().memory.write_obj(1u64, GuestAddress(GO)).unwrap();
    (s, hwpoisoned)
}

#[test]
fn a_reset_replaces_a_poisoned_page_with_zeroed_memory() {
    let (mut s, _) = poisoned_then_reset(false);
    let o = s.wait_outcome();
    assert_eq!(o.kind, crate::outcome::OutcomeKind::Poweroff, "{o:?}");
    let boots = s.boot_records();
    assert_eq!(boots.len(), 2);
    assert_eq!(
        boots[0].pages,
        [PageFate {
            gpa: PAGE_P,
            source: ras::ledger::Source::Injected,
            consumptions: 0,
            fate: ras::ledger::Fate::Remapped,
            told: Vec::new(),
        }]
    );
    // The second boot read zero where the first wrote its pattern, without
    // a machine check: fresh memory, and no longer in the ledger.
    assert_eq!(read(&s, 0x20_0000), 2);
    assert_eq!(read(&s, READ_BACK), 0);
    assert!(s.vm().ras().ledger().is_empty());
    assert!(!s
        .ras_events
        .iter()
        .any(|e| matches!(e, crate::event::RasEvent::Consumed { .. })));
}

#[test]
fn a_page_kept_poisoned_raises_a_fresh_error_in_the_next_boot() {
    let (mut s, hwpoisoned) = poisoned_then_reset(true);
    if !hwpoisoned {
        // This host cannot poison pages: the reset kept the page as it was
        // (not remapped), and the second boot read the first one's data.
        let o = s.wait_outcome();
        assert_eq!(o.kind, crate::outcome::OutcomeKind::Poweroff, "{o:?}");
        let boots = s.boot_records();
        assert_eq!(boots[0].pages[0].fate, ras::ledger::Fate::Kept);
        assert_eq!(read(&s, READ_BACK), PATTERN);
        assert_eq!(s.vm().ras().ledger().len(), 1);
        return;
    }
    let until = Instant::now() + Duration::from_secs(10);
    let consumed = |s: &crate::session::Session| {
        s.ras_events
            .iter()
            .any(|e| matches!(e, crate::event::RasEvent::Consumed { gpa: PAGE_P, .. }))
    };
    while !consumed(&s) {
        assert!(Instant::now() < until, "no consumption: {:?}", s.ras_events);
        assert!(s.outcome.is_none(), "{:?}", s.outcome);
        s.wait(Duration::from_millis(5));
    }
    // The access came from boot 2, after the reset kept the page bad.
    let boots = s.boot_records();
    assert_eq!(boots.len(), 2);
    assert_eq!(boots[0].pages.len(), 1);
    assert_eq!(boots[0].pages[0].fate, ras::ledger::Fate::Kept);
    assert_eq!(read(&s, 0x20_0000), 2);
    let ledger = s.vm().ras().ledger();
    assert_eq!(ledger.len(), 1);
    assert!(ledger[0].source.is_sticky() && ledger[0].consumptions >= 1);
    // The read never completed (it cannot, while the page is bad).
    assert_eq!(read(&s, READ_BACK), 0);
}

#[test]
fn a_kept_page_under_the_image_stops_the_next_boot_before_it_is_written() {
    // Resets at once; the page it runs from is recorded as kept-poisoned
    // before the session sees the reset.
    let mut cfg = payload(vec![0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe], 1);
    cfg.reboot.on_reboot = crate::config::OnReboot::Restart;
    cfg.reboot.keep_poison_on_reset = true;
    let vm = Vm::start(&cfg).unwrap();
    let mut s = crate::session::Session::new(vm).unwrap();
    s.vm().ras().mark_sticky_for_test(0x10_0000);
    let o = s.wait_outcome();
    assert_eq!(o.kind, crate::outcome::OutcomeKind::VmmError, "{o:?}");
    assert_eq!(
        o.detail,
        "Cannot load the guest again: page 0x100000, kept poisoned across the reset, lies under its image or tables"
    );
    let boots = s.boot_records();
    assert_eq!(boots.len(), 2);
    assert_eq!(boots[0].end.name(), "reset");
    assert_eq!(boots[0].pages[0].fate, ras::ledger::Fate::Kept);
    assert_eq!(boots[1].end.name(), "vmm-error");
    assert_eq!(boots[1].agent_ready_ms, None);
    // A kept page elsewhere is no obstacle.
    let vm = Vm::start(&payload_counting_to(2, &cfg)).unwrap();
    let mut s = crate::session::Session::new(vm).unwrap();
    s.vm().ras().mark_sticky_for_test(0x30_0000);
    let o = s.wait_outcome();
    assert_eq!(o.kind, crate::outcome::OutcomeKind::Poweroff, "{o:?}");
    assert_eq!(s.boot_records().len(), 2);
}

/// `cfg` with a payload that counts its boots at 0x200000 and powers off
/// at `until`, resetting before.
fn payload_counting_to(until: u8, cfg: &VmConfig) -> VmConfig {
    let mut code = vec![
        0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov rax, [0x200000]
        0x48, 0xff, 0xc0, // inc rax
        0x48, 0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov [0x200000], rax
        0x48, 0x83, 0xf8, until, // cmp rax, until
        0x73, 0x06, // jae poweroff
        0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe, // reset; jmp $
    ];
    code.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xeb, 0xfe]);
    let mut c = cfg.clone();
    c.boot = BootSource::Payload {
        bytes: code,
        load_addr: 0x10_0000,
    };
    c
}

/// Boots the poison payload (with `restart` or not), poisons PAGE_P once
/// the first boot wrote its pattern, and stops its vCPU as the x86
/// consumption path does when the guest cannot take the machine check.
fn shut_down_by_a_machine_check(restart: bool) -> crate::session::Session {
    let on_reboot = match restart {
        true => crate::config::OnReboot::Restart,
        false => crate::config::OnReboot::Exit,
    };
    let mut s = first_boot_wrote_its_pattern(crate::config::Reboot {
        on_reboot,
        keep_poison_on_reset: false,
    });
    if s.poison(PAGE_P).is_err() {
        // A host without CONFIG_MEMORY_FAILURE: the ledger alone.
        s.vm().ras().mark_sticky_for_test(PAGE_P);
    }
    let _ = s.vm().event_sender().send(crate::event::VmEvent::Stopped {
        vcpu: 0,
        stop: crate::event::VcpuStop::MachineCheckShutdown(
            "machine check while CR4.MCE is clear: guest page 0x300000, rip 0x100040".into(),
        ),
    });
    s
}

#[test]
fn a_machine_check_shutdown_ends_the_run_without_restart() {
    let mut s = shut_down_by_a_machine_check(false);
    let o = s.wait_outcome();
    assert_eq!(
        o.kind,
        crate::outcome::OutcomeKind::MachineCheckShutdown,
        "{o:?}"
    );
    assert!(
        o.detail
            .starts_with("vCPU 0: machine check while CR4.MCE is clear"),
        "{o:?}"
    );
    assert_eq!(s.boot_records().len(), 1);
}

#[test]
fn a_machine_check_shutdown_resets_the_platform_under_restart() {
    let mut s = shut_down_by_a_machine_check(true);
    let o = s.wait_outcome();
    // The second boot ran: it read the page (remapped, zero) and powered off.
    assert_eq!(o.kind, crate::outcome::OutcomeKind::Poweroff, "{o:?}");
    let boots = s.boot_records();
    assert_eq!(boots.len(), 2, "{boots:?}");
    assert_eq!(boots[0].end.name(), "machine-check-shutdown");
    assert!(
        boots[0].end.detail().contains("guest page 0x300000"),
        "{boots:?}"
    );
    assert_eq!(boots[0].pages[0].fate, ras::ledger::Fate::Remapped);
    assert_eq!(read(&s, 0x20_0000), 2);
    assert_eq!(read(&s, READ_BACK), 0);
}

#[test]
fn guest_einj_requests_are_checked_before_anything_is_poisoned() {
    use ras::einj::{CommandStatus, Request, FLAG_MEMORY};
    // A halted payload: the controller is what is tested, not the guest.
    let vm = Vm::start(&payload(vec![0xf4], 1)).unwrap();
    let ras = vm.ras();
    let ask = |error_type, memory_address| {
        ras.guest_einj(&Request {
            error_type,
            vendor_extension: 0,
            flags: FLAG_MEMORY,
            memory_address,
            memory_address_range: !0xfff,
        })
    };
    let reason = |a: &crate::ras_controller::EinjAnswer| match &a.event {
        crate::event::RasEvent::GuestEinj { reason, .. } => reason.clone().unwrap_or_default(),
        e => panic!("{e:?}"),
    };
    // Firmware pages, beyond RAM, an unsupported type: refused, nothing bad.
    for (t, addr, why) in [
        (0x10, 0xe_0123, "ACPI tables"),
        (0x10, 1 << 40, "not in guest RAM"),
        (0x2, 0x20_0000, "not offered"),
    ] {
        let a = ask(t, addr);
        assert_eq!(a.status, CommandStatus::InvalidAccess);
        assert!(reason(&a).contains(why), "{}", reason(&a));
        assert!(a.effect.is_none());
    }
    // A payload guest has no GHES sources to report a corrected error in.
    let a = ask(0x8, 0x20_0000);
    assert_eq!(a.status, CommandStatus::UnknownFailure);
    assert!(
        reason(&a).contains("no ACPI error sources"),
        "{}",
        reason(&a)
    );
    assert!(ras.ledger().is_empty());
    // Memory uncorrectable makes the page bad, once; asked again, it is.
    // Where the host cannot poison pages (this machine's PVM backend), it
    // is an UNKNOWN_FAILURE saying why, and nothing is recorded; the lab's
    // scenarios cover the other side.
    let first = ask(0x10, 0x20_0abc);
    if first.status == CommandStatus::UnknownFailure {
        assert!(reason(&first).contains("poison"), "{}", reason(&first));
        assert!(ras.ledger().is_empty());
        return;
    }
    for a in [first, ask(0x10, 0x20_0abc)] {
        assert_eq!(a.status, CommandStatus::Success, "{}", reason(&a));
    }
    let ledger = ras.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(
        (ledger[0].gpa, ledger[0].source),
        (0x20_0000, ras::ledger::Source::GuestEinj)
    );
}
