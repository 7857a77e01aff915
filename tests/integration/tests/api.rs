//! The control API against a real guest: a run started with --api-socket is
//! driven by `rasvmm api` clients while another client streams its events.

use std::time::Duration;

use lab::Lab;
use serde_json::Value;

const SCRIPT: &str = r#"
S=$WORK/api.sock
rm -f $S
$RASVMM run --kernel $KERNEL --initramfs $INITRAMFS --cpu amd --timeout 90 \
    --console $WORK/console.log --json $WORK/report.json --api-socket $S --expect stopped \
    2>$WORK/run.err &
i=0; while [ ! -S $S ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done
$RASVMM api --socket $S events > $WORK/events.log 2>&1 &
ev=$!
$RASVMM api --socket $S alloc-page > $WORK/early.out 2>&1; echo "exit $?" >> $WORK/early.out
i=0; until $RASVMM api --socket $S state | grep -q '"agent_ready_ms": [0-9]'; do
    usleep 100000; i=$((i+1)); [ $i -gt 600 ] && break
done
api() { name=$1; shift; $RASVMM api --socket $S "$@" > $WORK/$name.out 2>&1; echo "exit $?" >> $WORK/$name.out; }
api page alloc-page
api poison poison:page0
api touch touch-page:0
api info page-info:page0
api ledger ledger
api refused inject:srao:0x40000000
api raw 'mce:0:9:0x1:0x0:0x0:0x0'
api shutdown shutdown
wait $ev
wait
for f in early page poison touch info ledger refused raw shutdown; do lab_emit $f $WORK/$f.out; done
lab_emit events $WORK/events.log
lab_emit report $WORK/report.json
"#;

fn json(text: &str) -> Value {
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("exit "))
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

#[test]
fn control_api_drives_a_real_guest() {
    let lab = Lab::new().unwrap_or_else(|e| panic!("{e} ({:?})", std::error::Error::source(&e)));
    lab::progress(&format!("control API on {}", lab.backend));
    let res = lab
        .run_shell(SCRIPT, Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e} ({:?})", std::error::Error::source(&e)));
    let f = |k: &str| res.files.get(k).cloned().unwrap_or_default();

    assert!(
        f("early").contains("the guest agent is not ready yet"),
        "{}",
        f("early")
    );
    assert!(f("early").ends_with("exit 2\n"));
    let page = json(&f("page"));
    let vaddr = page["page"]["vaddr"].as_u64().expect("a page holder");
    assert!(f("poison").ends_with("exit 0\n"), "{}", f("poison"));
    let touch = json(&f("touch"));
    assert_eq!(touch["touch"]["signal"]["code"], 4, "{}", f("touch"));
    assert_eq!(touch["touch"]["signal"]["addr"], vaddr);
    assert_eq!(
        json(&f("info"))["page-info"]["hwpoison"],
        true,
        "{}",
        f("info")
    );
    let ledger = json(&f("ledger"));
    assert_eq!(ledger[0]["consumptions"], 1, "{}", f("ledger"));
    assert!(f("refused").contains("is not in guest RAM") && f("refused").ends_with("exit 2\n"));
    assert!(
        f("raw").contains("Invalid machine-check record"),
        "{}",
        f("raw")
    );
    assert!(f("shutdown").ends_with("exit 0\n"));

    let events: Vec<Value> = f("events")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| e["event"]["event"].as_str())
        .collect();
    assert_eq!(
        kinds,
        vec!["poisoned", "consumed", "signal", "outcome"],
        "{}",
        f("events")
    );
    assert_eq!(events[3]["event"]["outcome"], "stopped");

    let report = json(&f("report"));
    assert_eq!(report["outcome"], "stopped", "{}", f("report"));
}

const GHES_SCRIPT: &str = r#"
S=$WORK/ghes.sock
rm -f $S
$RASVMM run --kernel $KERNEL --initramfs $INITRAMFS --timeout 90 \
    --console $WORK/console.log --json $WORK/report.json --api-socket $S --expect stopped \
    2>$WORK/run.err &
i=0; while [ ! -S $S ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done
$RASVMM api --socket $S events > $WORK/events.log 2>&1 &
ev=$!
i=0; until $RASVMM api --socket $S state | grep -q '"agent_ready_ms": [0-9]'; do
    usleep 100000; i=$((i+1)); [ $i -gt 600 ] && break
done
api() { name=$1; shift; $RASVMM api --socket $S "$@" > $WORK/$name.out 2>&1; echo "exit $?" >> $WORK/$name.out; }
api early sysctl:vm.memory_failure_early_kill=1
api page alloc-page
api badsource ghes-memory --severity recoverable --gpa page0 --source sci
api badsev '{"step":"ghes-memory:informational:page0"}'
api truncated ghes-raw --source nmi --record 1100000000000000
api oversized '{"step":"ghes-raw:gsiv:'$(head -c 4097 /dev/zero | od -An -v -tx1 | tr -d ' \n')'"}'
api notram ghes-memory --severity recoverable --gpa 0x7fff0000000 --source nmi
api before state
api good ghes-memory --severity recoverable --gpa page0 --source polled
i=0; until $RASVMM api --socket $S state | grep -q '"acked": 1'; do
    usleep 100000; i=$((i+1)); [ $i -gt 100 ] && break
done
usleep 500000
api after state
api shutdown shutdown
wait $ev
wait
for f in page badsource badsev truncated oversized notram before good after; do lab_emit $f $WORK/$f.out; done
lab_emit events $WORK/events.log
"#;

/// GHES over the API: bad sources, severities and records are refused with
/// the reason and write nothing; a good report reaches the guest, which
/// acknowledges it and decodes the address rasvmm wrote.
#[test]
fn ghes_over_the_control_api() {
    let lab = Lab::new().unwrap_or_else(|e| panic!("{e} ({:?})", std::error::Error::source(&e)));
    lab::progress(&format!("GHES over the control API on {}", lab.backend));
    let res = lab
        .run_shell(GHES_SCRIPT, Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e} ({:?})", std::error::Error::source(&e)));
    let f = |k: &str| res.files.get(k).cloned().unwrap_or_default();
    let refused = |k: &str, why: &str| {
        let out = f(k);
        assert!(out.contains(why) && out.ends_with("exit 2\n"), "{k}: {out}");
    };
    refused("badsource", "source is nmi, gsiv or polled");
    refused("badsev", "severity is recoverable, corrected or fatal");
    refused("truncated", "record is truncated");
    refused("oversized", "at most 4096");
    refused("notram", "is not in guest RAM");
    let written = |state: &Value, source: &str, key: &str| {
        state["ghes_sources"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["source"] == source))
            .and_then(|s| s[key].as_u64())
    };
    let before = json(&f("before"));
    for source in ["nmi", "gsiv", "polled"] {
        assert_eq!(
            written(&before, source, "written"),
            Some(0),
            "{}",
            f("before")
        );
    }
    assert!(f("good").ends_with("exit 0\n"), "{}", f("good"));
    let after = json(&f("after"));
    assert_eq!(
        written(&after, "polled", "written"),
        Some(1),
        "{}",
        f("after")
    );
    assert_eq!(
        written(&after, "polled", "acked"),
        Some(1),
        "{}",
        f("after")
    );
    let page_gpa = json(&f("page"))["page"]["pfn"].as_u64().expect("a page") * 4096;
    let events: Vec<Value> = f("events")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .map(|e: Value| e["event"].clone())
        .collect();
    let reported: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "ghes-reported")
        .collect();
    assert_eq!(reported.len(), 1, "{}", f("events"));
    assert_eq!(reported[0]["gpa"], page_gpa);
    assert!(
        events.iter().any(|e| e["event"] == "guest-decoded"
            && e["physical_addr"] == page_gpa
            && e["matches_report"] == true),
        "{}",
        f("events")
    );
    assert!(
        events.iter().any(|e| e["event"] == "signal"),
        "{}",
        f("events")
    );
}
