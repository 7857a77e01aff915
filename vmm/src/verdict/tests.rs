//! The verdict's unit tests: typed reports judged against expectations.

use guest_agent::{Command, KernelPageKind, PageRecord, Payload, SignalReport};
use ras::ledger::{Entry, Source};

use super::*;
use crate::kho_observer::Rejected;
use crate::outcome::{Outcome, OutcomeKind};
use crate::report::StepRecord;
use crate::scenario::Scenario;
use crate::steps::StepError;
use guest_agent::{BUS_MCEERR_AO, BUS_MCEERR_AR};

const FILE: &str = r#"
name = "sticky-user-page"
steps = ["alloc-page", "poison:page0", "touch-page:0", "page-info:page0", "poweroff"]
[guest]
cpu = "amd"
[expect]
outcome = "poweroff"
signals = [{ code = "BUS_MCEERR_AR", page = "page0" }]
hwpoison = ["page0"]
hardware_corrupted_kb = 4
consumptions = { page0 = 1 }
"#;

fn refs() -> Refs {
    let mut r = Refs::default();
    let page = PageRecord {
        page: 0,
        pid: 40,
        vaddr: 0x7f00_0000_0000,
        pfn: 0x1234,
        cpu: 0,
    };
    r.learn(&Command::AllocPage, &Payload::Page(page), None);
    r.learn(
        &Command::KernelPages {
            kind: KernelPageKind::Slab,
            count: 1,
            stride: 0,
            poison: false,
        },
        &Payload::KernelPages(vec![0x141]),
        None,
    );
    r
}

fn report(kind: OutcomeKind, detail: &str) -> RunReport {
    let mut r = RunReport::new(
        Outcome {
            kind,
            detail: detail.into(),
            log: vec!["mce: [Hardware Error]: Machine check events logged".into()],
        },
        "amd",
        1,
        256,
    );
    r.signals.push(SignalReport {
        page: 0,
        pid: 40,
        signo: 7,
        code: BUS_MCEERR_AR,
        addr: 0x7f00_0000_0000,
        addr_lsb: 12,
    });
    r.steps.push(StepRecord {
        step: "page-info:page0".into(),
        reply: Some(StepReply::Agent(Payload::PageInfo(PageInfo {
            pfn: 0x1234,
            hwpoison: true,
            hardware_corrupted_kb: 4,
            kpageflags: 0,
        }))),
        error: None,
        cut_short: false,
        at_ms: 1,
    });
    r.ledger.push(Entry {
        gpa: 0x1234 * 4096,
        source: Source::Injected,
        poisoned_at_ms: 0,
        consumptions: 1,
        told: Vec::new(),
    });
    r
}

#[test]
fn passes() {
    let s = Scenario::parse(FILE).unwrap();
    let v = evaluate(&s.expect, &report(OutcomeKind::Poweroff, ""), &refs());
    assert_eq!(
        v,
        Verdict {
            passed: true,
            failures: vec![],
            not_applicable: vec![]
        }
    );
}

#[test]
fn every_mismatch_is_named() {
    let s = Scenario::parse(FILE).unwrap();
    let mut r = report(OutcomeKind::Panic, "Kernel panic - not syncing: x");
    r.signals[0].code = BUS_MCEERR_AO;
    r.ledger[0].consumptions = 3;
    let v = evaluate(&s.expect, &r, &refs());
    assert!(!v.passed);
    assert_eq!(v.failures.len(), 3, "{v:?}");
    assert!(v.failures[0].starts_with("outcome is panic"));
    assert!(v.failures[1].contains("expected SIGBUS BUS_MCEERR_AR"));
    assert_eq!(v.failures[2], "page0 was consumed 3 times, expected 1");
}

#[test]
fn unexpected_step_errors_fail_but_cut_short_steps_do_not() {
    let s = Scenario::parse(FILE).unwrap();
    let mut r = report(OutcomeKind::Poweroff, "");
    r.steps.push(StepRecord {
        step: "exec:true".into(),
        reply: None,
        error: Some(StepError::Ended.to_string()),
        cut_short: true,
        at_ms: 2,
    });
    assert!(evaluate(&s.expect, &r, &refs()).passed);
    r.steps.push(StepRecord {
        step: "poison:page0".into(),
        reply: None,
        error: Some("Cannot poison guest page 0x1000: busy".into()),
        cut_short: false,
        at_ms: 3,
    });
    let v = evaluate(&s.expect, &r, &refs());
    assert_eq!(
        v.failures,
        vec!["step 3 (poison:page0) failed: Cannot poison guest page 0x1000: busy"]
    );
}

#[test]
fn kho_views_are_checked() {
    let text = r#"
name = "kho"
steps = ["kho-scan"]
[expect]
outcome = "poweroff"
[expect.kho]
views = 1
state = "valid"
verdict = "agree"
pfns = ["page0"]
rejected = ["bad magic"]
min_rejected = 1
types = { page0 = "simulated" }
pin = "pinned"
handoff = "first-boot"
"#;
    let s = Scenario::parse(text).unwrap();
    let mut r = report(OutcomeKind::Poweroff, "");
    let view = |pfns: Vec<u64>, comparison, rejected| StepReply::Kho {
        kho: Box::new(KhoView {
            root: Some(0x2000),
            kexec_count: Some(1),
            pin: crate::kho_observer::Pin::Pinned {
                root: 0x2000,
                kexec_count: 1,
                handoff: crate::kho_observer::Handoff::FirstBoot,
            },
            roots_found: 2,
            candidates: 2,
            rejected_total: 1,
            rejected,
            hwpoison: Hwpoison::Valid {
                entries: pfns
                    .into_iter()
                    .map(|pfn| ras::kho::Entry {
                        pfn,
                        kind: ras::kho::EntryType::Simulated,
                    })
                    .collect(),
                incomplete: false,
                version: ras::kho::HWPOISON_VERSION,
                flags: 0,
                duplicates: 0,
                rejected: vec![],
                seq: 2,
            },
            comparison,
            scanned_bytes: 0,
            scan_us: 0,
        }),
    };
    r.steps.push(StepRecord {
        step: "kho-scan".into(),
        reply: Some(view(
            vec![0x1234],
            Comparison::Agree,
            vec![Rejected {
                root: 4096,
                kexec_count: None,
                reason: "hwpoison blob is invalid: bad magic".into(),
            }],
        )),
        error: None,
        cut_short: false,
        at_ms: 3,
    });
    assert!(evaluate(&s.expect, &r, &refs()).passed);
    let differ = Comparison::Differ {
        guest_missing: vec![0x1234000],
        guest_extra: vec![0x99000],
        unplaceable: vec![],
    };
    r.steps[1].reply = Some(view(vec![0x99], differ, vec![]));
    let v = evaluate(&s.expect, &r, &refs());
    assert_eq!(v.failures.len(), 4, "{v:?}");
}

#[test]
fn consumptions_are_counted_per_vcpu() {
    let text = r#"
name = "burst"
steps = []
[expect]
outcome = "poweroff"
consumptions_per_vcpu = { 0 = 1, 1 = 2 }
"#;
    let s = Scenario::parse(text).unwrap();
    let mut r = report(OutcomeKind::Poweroff, "");
    r.signals.clear();
    let consumed = |vcpu| RasEvent::Consumed {
        vcpu,
        gpa: 0x1234 * 4096,
        error: ras::mce::MemoryError::Srar,
        consumptions: 1,
        at_ms: 5,
        result: None,
        ghes: None,
    };
    r.ras_events = vec![consumed(0), consumed(1)];
    assert_eq!(
        evaluate(&s.expect, &r, &refs()).failures,
        vec!["vCPU 1 took 1 consumptions, expected at least 2"]
    );
    r.ras_events.push(consumed(1));
    assert!(evaluate(&s.expect, &r, &refs()).passed);
}

#[test]
fn detail_names_pfns_as_linux_prints_them() {
    let text = r#"
name = "kernel-page"
steps = ["kernel-pages:slab:1", "inject:srao:slab0"]
[expect]
outcome = "panic"
detail = "Kernel panic - not syncing: Memory failure: {slab0}: unrecoverable page"
"#;
    let s = Scenario::parse(text).unwrap();
    let r = report(
        OutcomeKind::Panic,
        "Kernel panic - not syncing: Memory failure: 0x141: unrecoverable page",
    );
    let mut e = s.expect.clone();
    e.signals = None;
    assert!(evaluate(&e, &r, &refs()).passed);
    e.detail = Some("{nothing}".into());
    assert_eq!(
        evaluate(&e, &r, &refs()).failures,
        vec!["'nothing' was never reported"]
    );
}

#[test]
fn boots_are_checked_one_by_one() {
    use crate::report::{BootEnd, BootRecord};
    use ras::ledger::{Fate, PageFate};
    let s = Scenario::parse(
        r#"
name = "panic-reboot"
steps = []
[expect]
outcome = "poweroff"
not_hwpoison = ["slab0"]
[[expect.boots]]
end = "panic"
detail_contains = "Memory failure: {slab0}: unrecoverable page"
agent = true
remapped = ["slab0"]
[[expect.boots]]
end = "poweroff"
consumed = ["slab0"]
"#,
    )
    .unwrap();
    let mut r = report(OutcomeKind::Poweroff, "");
    r.steps.push(StepRecord {
        step: "page-info:slab0".into(),
        reply: Some(StepReply::Agent(Payload::PageInfo(PageInfo {
            pfn: 0x141,
            hwpoison: false,
            hardware_corrupted_kb: 0,
            kpageflags: 0,
        }))),
        error: None,
        cut_short: false,
        at_ms: 5,
    });
    let fate = |fate| PageFate {
        gpa: 0x141000,
        source: Source::Injected,
        consumptions: 0,
        fate,
        told: Vec::new(),
    };
    r.boots = vec![
        BootRecord {
            index: 1,
            started_ms: 0,
            agent_ready_ms: Some(10),
            ended_ms: 100,
            end: BootEnd::Panic {
                line: "Kernel panic - not syncing: Memory failure: 0x141: unrecoverable page"
                    .into(),
            },
            pages: vec![fate(Fate::Remapped)],
        },
        BootRecord {
            index: 2,
            started_ms: 101,
            agent_ready_ms: Some(150),
            ended_ms: 300,
            end: BootEnd::Outcome {
                outcome: OutcomeKind::Poweroff,
                detail: String::new(),
            },
            pages: vec![],
        },
    ];
    r.ras_events.push(RasEvent::Consumed {
        vcpu: 0,
        gpa: 0x141000,
        error: ras::mce::MemoryError::Srar,
        consumptions: 1,
        at_ms: 200,
        result: None,
        ghes: None,
    });
    assert_eq!(
        evaluate(&s.expect, &r, &refs()).failures,
        Vec::<String>::new()
    );
    // Kept instead of remapped, consumed in the wrong boot, one boot too
    // many, and the page shows as poisoned.
    r.boots[0].pages = vec![fate(Fate::Kept)];
    if let Some(RasEvent::Consumed { at_ms, .. }) = r.ras_events.last_mut() {
        *at_ms = 50;
    }
    let mut third = r.boots[1].clone();
    third.index = 3;
    r.boots.push(third);
    if let Some(StepReply::Agent(Payload::PageInfo(i))) = &mut r.steps.last_mut().unwrap().reply {
        i.hwpoison = true;
    }
    let v = evaluate(&s.expect, &r, &refs());
    assert_eq!(
        v.failures,
        vec![
            "slab0 (PFN 0x141) is KPF_HWPOISON in the guest",
            "the guest booted 3 times (panic, poweroff, poweroff), expected 2",
            "boot 1's reset left slab0 (0x141000) Kept, expected Remapped",
            "the guest did not consume slab0 (0x141000) during boot 2",
        ]
    );
}

#[test]
fn a_boot_end_must_be_known() {
    let e = Scenario::parse(
        "name = \"x\"\nsteps = []\n[expect]\noutcome = \"poweroff\"\n[[expect.boots]]\nend = \"crash\"",
    )
    .unwrap_err();
    assert_eq!(
        e,
        "boot 1: unknown end 'crash' (reset, panic, or an outcome)"
    );
}

#[test]
fn einj_requests_and_exec_results_are_checked() {
    use ras::einj::{CommandStatus, Kind, Request};
    let file = r#"
name = "einj"
steps = ["alloc-page", "exec:echo 1 > error_inject && echo injected", "poweroff"]
[expect]
outcome = "poweroff"
einj = [
    { error_type = 0x10, page = "page0", status = "success" },
    { error_type = 0x80000000, status = "invalid-access" },
]
exec = { 2 = { status = 0, stdout_contains = ["injected"] } }
"#;
    let s = Scenario::parse(file).unwrap();
    let einj = |error_type, gpa: Option<u64>, status| RasEvent::GuestEinj {
        request: Request {
            error_type,
            ..Request::default()
        },
        kind: gpa.map(|_| Kind::Uncorrectable),
        gpa,
        status,
        reason: None,
        at_ms: 1,
    };
    let exec = |status, stdout: &str| StepRecord {
        step: "exec:echo 1 > error_inject && echo injected".into(),
        reply: Some(StepReply::Agent(Payload::Exec(guest_agent::ExecResult {
            status,
            stdout: stdout.into(),
            stderr: "sh: write error: Invalid argument".into(),
        }))),
        error: None,
        cut_short: false,
        at_ms: 1,
    };
    let run = |events: Vec<RasEvent>, step: StepRecord| {
        let mut r = report(OutcomeKind::Poweroff, "");
        r.steps.insert(
            0,
            StepRecord {
                step: "alloc-page".into(),
                ..step.clone()
            },
        );
        r.steps.insert(1, step);
        r.ras_events = events;
        evaluate(&s.expect, &r, &refs())
    };
    let good = vec![
        einj(0x10, Some(0x1234 * 4096), CommandStatus::Success),
        einj(0x8000_0000, None, CommandStatus::InvalidAccess),
    ];
    assert!(run(good.clone(), exec(0, "injected\n")).passed);
    let v = run(
        vec![
            einj(0x10, Some(0x9999 * 4096), CommandStatus::InvalidAccess),
            einj(0x8, None, CommandStatus::InvalidAccess),
            einj(0x8, None, CommandStatus::InvalidAccess),
        ],
        exec(1, ""),
    );
    assert_eq!(
        v.failures,
        vec![
            "the guest made 3 EINJ requests, expected 2",
            "EINJ request 1 was answered invalid-access, expected success",
            "EINJ request 1 named 0x9999000, expected page0 (0x1234000)",
            "EINJ request 2 asked for error type 0x8, expected 0x80000000",
            "step 2 exited 1, expected 0; stderr: sh: write error: Invalid argument",
            "step 2's output lacks 'injected'; it was: ",
        ]
    );
    // An exec expectation on a step that is not an exec fails by name.
    let mut r = report(OutcomeKind::Poweroff, "");
    r.ras_events = good;
    r.steps.push(StepRecord {
        step: "poweroff".into(),
        reply: None,
        error: None,
        cut_short: false,
        at_ms: 2,
    });
    let v = evaluate(&s.expect, &r, &refs());
    assert_eq!(
        v.failures,
        vec!["step 2 (poweroff) returned no exec result"]
    );
}

#[test]
fn rasdaemon_records_are_checked() {
    use guest_agent::rasdaemon::{McEvent, MceRecord, MemoryFailureEvent, RasdaemonView};
    let file = r#"
name = "rasdaemon"
steps = ["rasdaemon:2"]
[guest]
image = "rasdaemon"
[expect]
outcome = "poweroff"
[expect.rasdaemon]
mce_record = [{ bank = 9, status = 0xbc00080000000000, page = "page0" }]
memory_failure = [{ page = "page0", page_type = "dirty LRU page", action_result = "Recovered" }]
"#;
    let s = Scenario::parse(file).unwrap();
    let with = |view: Option<RasdaemonView>| {
        let mut r = report(OutcomeKind::Poweroff, "");
        if let Some(v) = view {
            r.steps.push(StepRecord {
                step: "rasdaemon:2".into(),
                reply: Some(StepReply::Agent(Payload::Rasdaemon(v))),
                error: None,
                cut_short: false,
                at_ms: 2,
            });
        }
        evaluate(&s.expect, &r, &refs()).failures
    };
    let good = RasdaemonView {
        running: true,
        mce_record: vec![MceRecord {
            bank: 9,
            status: 0xbc00_0800_0000_0000,
            addr: 0x0123_4000,
            ..MceRecord::default()
        }],
        memory_failure_event: vec![MemoryFailureEvent {
            pfn: 0x1234,
            page_type: "dirty LRU page".into(),
            action_result: "Recovered".into(),
            ..MemoryFailureEvent::default()
        }],
        mc_event: vec![McEvent::default()],
        log_tail: vec!["rasdaemon: Listening to events for cpus 0 to 0".into()],
    };
    assert_eq!(with(Some(good.clone())), Vec::<String>::new());
    assert_eq!(
        with(None),
        vec!["no rasdaemon step read rasdaemon's records"]
    );
    let mut stopped = good.clone();
    stopped.running = false;
    assert!(
        with(Some(stopped))[0].starts_with("rasdaemon is not running in the guest; its log ends")
    );
    let empty = RasdaemonView {
        running: true,
        ..RasdaemonView::default()
    };
    assert_eq!(with(Some(empty)), vec!["rasdaemon recorded nothing"]);
    let mut wrong = good;
    wrong.mce_record[0].bank = 4;
    wrong.memory_failure_event[0].action_result = "Failed".into();
    assert_eq!(
        with(Some(wrong)),
        vec![
            "rasdaemon has no mce_record in bank 9 with status 0xbc00080000000000 at page0; it has bank 4 status 0xbc00080000000000 addr 0x1234000",
            "rasdaemon has no memory_failure_event for page0 (0x1234), dirty LRU page, Recovered; it has 0x1234 dirty LRU page: Failed",
        ]
    );
}
