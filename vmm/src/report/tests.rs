//! Tests of the report: its human summary and its JSON round trip.

use super::*;

#[test]
fn a_report_reads_back_as_itself() {
    use crate::kho_observer::{Comparison, Hwpoison, KhoView};
    let mut r = RunReport::new(
        Outcome {
            kind: OutcomeKind::Panic,
            detail: "Kernel panic - not syncing: x".into(),
            log: vec!["a".into()],
        },
        "intel",
        2,
        256,
    );
    let view = KhoView {
        root: Some(0x1000),
        kexec_count: Some(2),
        pin: crate::kho_observer::Pin::Pinned {
            root: 0x1000,
            kexec_count: 2,
            handoff: crate::kho_observer::Handoff::Kept { previous: 0x5000 },
        },
        roots_found: 3,
        candidates: 3,
        rejected_total: 2,
        rejected: vec![],
        hwpoison: Hwpoison::Valid {
            entries: vec![ras::kho::Entry {
                pfn: 0x77,
                kind: ras::kho::EntryType::SoftOffline,
            }],
            incomplete: true,
            version: ras::kho::HWPOISON_VERSION,
            flags: 1,
            duplicates: 0,
            rejected: vec![ras::kho::RejectedEntry {
                index: 1,
                raw: 1 << 52,
                pfn: 1 << 52,
                problem: ras::kho::EntryProblem::AddressWraps,
            }],
            seq: 4,
        },
        comparison: Comparison::Incomplete {
            guest_missing: vec![],
            guest_extra: vec![0x77000],
            unplaceable: vec![1 << 52],
        },
        scanned_bytes: 4096,
        scan_us: 3,
    };
    r.steps = vec![
        StepRecord {
            step: "sysctl:vm.x".into(),
            reply: Some(StepReply::Agent(Payload::Sysctl(
                guest_agent::SysctlValue {
                    name: "vm.x".into(),
                    value: "1".into(),
                },
            ))),
            error: None,
            cut_short: false,
            at_ms: 1,
        },
        StepRecord {
            step: "kho-scan".into(),
            reply: Some(StepReply::Kho {
                kho: Box::new(view.clone()),
            }),
            error: None,
            cut_short: false,
            at_ms: 2,
        },
        StepRecord {
            step: "exec:true".into(),
            reply: None,
            error: Some("the run ended before the agent replied".into()),
            cut_short: true,
            at_ms: 3,
        },
    ];
    r.ras_events = vec![
        RasEvent::KhoScanned {
            after_kexec: 1,
            view: Box::new(view),
        },
        RasEvent::Consumed {
            vcpu: 1,
            gpa: 0x77000,
            error: ras::mce::MemoryError::Srar,
            consumptions: 2,
            at_ms: 9,
            result: None,
            ghes: Some(ras::ghes::Notification::Nmi),
        },
    ];
    r.boots = vec![
        BootRecord {
            index: 1,
            started_ms: 0,
            agent_ready_ms: Some(900),
            ended_ms: 2000,
            end: BootEnd::Panic {
                line: "Kernel panic - not syncing: x".into(),
            },
            pages: vec![PageFate {
                gpa: 0x77000,
                source: ras::ledger::Source::Injected,
                consumptions: 1,
                fate: ras::ledger::Fate::Remapped,
                told: Vec::new(),
            }],
        },
        BootRecord {
            index: 2,
            started_ms: 2001,
            agent_ready_ms: None,
            ended_ms: 3000,
            end: BootEnd::Outcome {
                outcome: OutcomeKind::Poweroff,
                detail: "reboot: Power down".into(),
            },
            pages: vec![],
        },
    ];
    r.mcg_cap_supplied = 1 << 24;
    r.ghes = vec![crate::ghes_sources::SourceState {
        source: ras::ghes::Notification::Gsiv,
        stats: ras::ghes::SourceStats {
            written: 3,
            acked: 2,
            queued: 1,
        },
        waiting: 1,
        unacknowledged: true,
    }];
    r.verdict = Some(Verdict {
        passed: false,
        failures: vec!["x".into()],
        not_applicable: vec!["kho: Kexec HandOver".into()],
    });
    r.guest_features = Some(vec![KernelFeature::Ghes]);
    let text = serde_json::to_string(&r).unwrap();
    let back: RunReport = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), text);
    assert!(matches!(back.steps[1].reply, Some(StepReply::Kho { .. })));
    assert!(back.steps[2].cut_short);
    assert_eq!(back.boots, r.boots);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["boots"][0]["end"]["how"], "panic");
    assert_eq!(v["boots"][0]["pages"][0]["fate"], "remapped");
    assert_eq!(v["boots"][1]["end"]["outcome"], "poweroff");
    assert!(r.human().contains(
        "boot 1: 0.00 s to 2.00 s, panic (Kernel panic - not syncing: x), page 0x77000 Remapped\n"
    ));
}

#[test]
fn json_names_are_stable() {
    let r = RunReport::new(
        Outcome {
            kind: OutcomeKind::TripleFault,
            detail: "vCPU 0 triple fault".into(),
            log: vec![],
        },
        "intel",
        1,
        256,
    );
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["outcome"], "triple-fault");
    assert_eq!(v["cpu_profile"], "intel");
    assert!(v["agent_ready_ms"].is_null());
    assert!(r
        .human()
        .starts_with("outcome: triple-fault (vCPU 0 triple fault)\n"));
}

#[test]
fn clip_respects_char_boundaries() {
    assert_eq!(clip("héllo", 2), "h...");
    assert_eq!(clip("abc", 5), "abc");
}
