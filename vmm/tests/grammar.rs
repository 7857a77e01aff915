//! The number and string grammar of steps, as users reach it (`--step`,
//! scenario files, the control API): strict numbers through
//! `vmm::steps::number`, no control characters. Prints how many cases it
//! checked.

#![allow(clippy::unwrap_used)]

use vmm::steps::{number, parse};

#[test]
fn numbers_are_digits_or_0x_hex() {
    let cases = [
        ("0", Some(0)),
        ("4096", Some(4096)),
        ("0x1000", Some(0x1000)),
        ("0xFFff", Some(0xffff)),
        ("18446744073709551615", Some(u64::MAX)),
        ("0xffffffffffffffff", Some(u64::MAX)),
        ("18446744073709551616", None),
        ("+4096", None),
        ("0x+ff", None),
        ("-1", None),
        ("", None),
        ("0x", None),
        (" 1", None),
        ("1 ", None),
        ("1_000", None),
        ("0X10", None),
        ("0b101", None),
        ("1e3", None),
        ("\u{0}", None),
    ];
    for (text, want) in cases {
        assert_eq!(number(text), want, "{text:?}");
    }
    println!("number grammar: {} cases", cases.len());
}

#[test]
fn steps_refuse_signs_and_control_characters() {
    let refused = [
        // Strict numbers: no sign, no whitespace, no underscore.
        "poison:+4096",
        "poison:0x+ff",
        "poison:-0",
        "poison: 4096",
        "poison:4096 ",
        "poison:4_096",
        "poison:0X1000",
        "poison:0x",
        "poison:0x10000000000000000",
        "wait:+5",
        "touch-page:+1",
        "inject:srao:0x1000:vcpu=+1",
        "ghes-memory:fatal:0x1000:vcpu= 1",
        "ghes-raw:nmi:+1+1",
        "ghes-raw:nmi:-1-1",
        // Control characters, raw or escaped in JSON.
        "exec:echo\0x",
        "exec:echo \u{0}",
        "sysctl:kernel.x=\u{1b}[2J",
        "kexec:a\nb",
        r#"{"exec":{"sh":"echo \u0000"}}"#,
        r#"{"sysctl":{"name":"a\u0007","value":null}}"#,
    ];
    for s in refused {
        assert!(parse(s).is_err(), "{s:?} should be refused");
    }
    // What stays accepted.
    for s in [
        "poison:0x2000000",
        "wait:0",
        "ghes-raw:nmi:00 ff",
        "exec:echo a b",
    ] {
        assert!(parse(s).is_ok(), "{s:?}");
    }
    println!("step grammar: {} refusals checked", refused.len());
}
