//! The step grammar's unit tests.

use guest_agent::{PageRecord, Payload};

use super::*;

fn agent(cmd: Command) -> Step {
    Step::Agent {
        cmd,
        pfn: None,
        bind: None,
    }
}

#[test]
fn agent_steps() {
    assert_eq!(
        parse("exec:cat /proc/cpuinfo"),
        Ok(agent(Command::Exec {
            sh: "cat /proc/cpuinfo".into(),
            env: Default::default(),
        }))
    );
    assert_eq!(parse("poweroff"), Ok(agent(Command::Poweroff)));
    assert_eq!(parse("alloc-page"), Ok(agent(Command::AllocPage)));
    assert_eq!(
        parse("touch-page:2:write"),
        Ok(agent(Command::TouchPage {
            page: 2,
            write: true
        }))
    );
    assert_eq!(
        parse("spin-page:3"),
        Ok(agent(Command::SpinPage { page: 3 }))
    );
    assert_eq!(
        parse("kernel-pages:slab:4"),
        Ok(agent(Command::KernelPages {
            kind: KernelPageKind::Slab,
            count: 4,
            stride: 0,
            poison: false,
        }))
    );
    assert_eq!(
        parse("page-info:0x1234"),
        Ok(agent(Command::PageInfo { pfn: 0x1234 }))
    );
    assert_eq!(
        parse("page-info:page0"),
        Ok(Step::Agent {
            cmd: Command::PageInfo { pfn: 0 },
            pfn: Some(Target::Ref("page0".into())),
            bind: None,
        })
    );
    assert_eq!(
        parse("sysctl:vm.panic_on_unrecoverable_memory_failure=1"),
        Ok(agent(Command::Sysctl {
            name: "vm.panic_on_unrecoverable_memory_failure".into(),
            value: Some("1".into())
        }))
    );
    assert_eq!(
        parse(r#"{"exec":{"sh":"nproc"}}"#),
        Ok(agent(Command::Exec {
            sh: "nproc".into(),
            env: Default::default(),
        }))
    );
}

#[test]
fn ras_steps() {
    assert_eq!(
        parse("inject:srao:slab0"),
        Ok(Step::Inject {
            error: MemoryError::Srao,
            target: Target::Ref("slab0".into()),
            vcpu: 0,
            local: false
        })
    );
    assert_eq!(
        parse("inject:srar:0x2000000:vcpu=1:local"),
        Ok(Step::Inject {
            error: MemoryError::Srar,
            target: Target::Gpa(0x200_0000),
            vcpu: 1,
            local: true
        })
    );
    assert_eq!(
        parse("poison:page3"),
        Ok(Step::Poison(Target::Ref("page3".into())))
    );
    assert_eq!(
        parse("ghes-memory:corrected:page1:source=polled:threshold"),
        Ok(Step::GhesMemory {
            severity: Severity::Corrected,
            target: Target::Ref("page1".into()),
            source: Notification::Polled,
            threshold: true,
            vcpu: 0
        })
    );
    assert_eq!(
        parse("ghes-memory:recoverable:0x3000:vcpu=1"),
        Ok(Step::GhesMemory {
            severity: Severity::Recoverable,
            target: Target::Gpa(0x3000),
            source: Notification::Nmi,
            threshold: false,
            vcpu: 1
        })
    );
    assert_eq!(
        parse("ghes-raw:gsiv:0011ff"),
        Ok(Step::GhesRaw {
            source: Notification::Gsiv,
            record: vec![0, 0x11, 0xff]
        })
    );
    assert_eq!(parse("kho-scan"), Ok(Step::KhoScan));
    assert_eq!(
        parse("kexec-load"),
        Ok(agent(Command::KexecLoad { append: None }))
    );
    assert_eq!(
        parse("kexec-load:memtest=1"),
        Ok(agent(Command::KexecLoad {
            append: Some("memtest=1".into())
        }))
    );
    assert_eq!(parse("kexec-reboot"), Ok(agent(Command::KexecReboot)));
    assert!(parse("kexec-reboot:x").is_err());
    assert!(parse("kexec-load:").is_err());
    assert_eq!(parse("kexec"), Ok(agent(Command::Kexec { append: None })));
    assert_eq!(
        parse("kexec:kho=on"),
        Ok(agent(Command::Kexec {
            append: Some("kho=on".into())
        }))
    );
    assert_eq!(
        parse("forge-kho:huge-blob"),
        Ok(agent(Command::ForgeKho {
            defect: guest_agent::KhoDefect::HugeBlob,
            count: None
        }))
    );
    assert_eq!(
        parse("forge-kho:bare-roots:40"),
        Ok(agent(Command::ForgeKho {
            defect: guest_agent::KhoDefect::BareRoots,
            count: Some(40)
        }))
    );
    assert_eq!(
        parse("forge-kho:consistent"),
        Ok(agent(Command::ForgeKho {
            defect: guest_agent::KhoDefect::Consistent,
            count: None
        }))
    );
    {
        use ras::kho::corrupt::{Edit, Place};
        assert_eq!(
            parse("kho-corrupt:beyond-ram:wrap:duplicate:bad-type=9:append=0x1,2:version=1:flags=0x8000:nr=9:seq=3:move-to=last-page"),
            Ok(Step::KhoCorrupt(vec![
                Edit::BeyondRam,
                Edit::Wrap,
                Edit::Duplicate,
                Edit::BadType(9),
                Edit::Append(vec![1, 2]),
                Edit::Version(1),
                Edit::Flags(0x8000),
                Edit::NrEntries(9),
                Edit::Seq(3),
                Edit::MoveTo(Place::LastPage),
            ]))
        );
        assert_eq!(
            parse("kho-corrupt:move-to=0xff000"),
            Ok(Step::KhoCorrupt(vec![Edit::MoveTo(Place::Gpa(0xff000))]))
        );
    }
    assert_eq!(
        parse("kernel-pages:free:2"),
        Ok(agent(Command::KernelPages {
            kind: KernelPageKind::Free,
            count: 2,
            stride: 0,
            poison: false,
        }))
    );
    assert_eq!(
        parse("wait:1500"),
        Ok(Step::Wait(Duration::from_millis(1500)))
    );
    assert_eq!(parse("wait-boot:2"), Ok(Step::WaitBoot(2)));
    assert_eq!(
        parse("wait-console:Kernel panic - not syncing"),
        Ok(Step::WaitConsole("Kernel panic - not syncing".into()))
    );
    assert_eq!(parse("wait-boot:0x10"), Ok(Step::WaitBoot(16)));
}

#[test]
fn bad_steps() {
    for s in [
        "",
        "exec:",
        "reboot",
        "touch-page:x",
        "touch-page:1:read",
        "spin-page",
        "spin-page:-1",
        "kernel-pages:dma:1",
        "kernel-pages:slab",
        "page-info:",
        "page-info:Page0",
        "sysctl:",
        "poweroff:now",
        "{\"exec\":{}}",
        "inject:sea:0x1000",
        "inject:srar",
        "inject:srar:0x1000:vcpu=999",
        "inject:srar:0x1000:global",
        "poison:",
        "poison:../etc",
        "ghes-memory:recoverable",
        "ghes-memory:informational:0x1000",
        "ghes-memory:recoverable:0x1000:source=sci",
        "ghes-memory:recoverable:0x1000:threshold",
        "ghes-memory:fatal:0x1000:vcpu=x",
        "ghes-raw:nmi",
        "ghes-raw:local:00",
        "ghes-raw:nmi:0",
        "ghes-raw:nmi:zz",
        "kho-scan:now",
        "kexec:",
        "forge-kho",
        "forge-kho:nice",
        "forge-kho:bare-roots:0",
        "forge-kho:bare-roots:257",
        "forge-kho:consistent:2",
        "kho-corrupt",
        "kho-corrupt:",
        "kho-corrupt:wrap:",
        "kho-corrupt:bad-type=256",
        "kho-corrupt:version=0x10000",
        "kho-corrupt:append=",
        "kho-corrupt:append=1,,2",
        "kho-corrupt:move-to=",
        "kho-corrupt:wrap=1",
        "kho-corrupt:explode",
        "wait:forever",
        "wait:99999999999",
        "wait-boot",
        "wait-boot:1",
        "wait-boot:17",
        "wait-boot:next",
        "wait-console",
        "wait-console:",
    ] {
        assert!(parse(s).is_err(), "{s:?} should be refused");
    }
    assert!(parse(&format!("wait-console:{}", "x".repeat(129))).is_err());
    assert!(parse(&format!("wait-console:{}", "x".repeat(128))).is_ok());
    assert_eq!(
        parse("reboot").unwrap_err().to_string().split(':').next(),
        Some("Bad step 'reboot'")
    );
}

#[test]
fn references_resolve_from_replies() {
    let mut refs = Refs::default();
    let page = Payload::Page(PageRecord {
        page: 0,
        pid: 9,
        vaddr: 0x7000,
        pfn: 0x1234,
        cpu: 0,
    });
    refs.learn(&Command::AllocPage, &page, None);
    refs.learn(
        &Command::KernelPages {
            kind: KernelPageKind::PageTable,
            count: 2,
            stride: 0,
            poison: false,
        },
        &Payload::KernelPages(vec![7, 8]),
        None,
    );
    assert_eq!(refs.gpa(&Target::Ref("page0".into())), Ok(0x123_4000));
    assert_eq!(refs.pfn(&Target::Ref("page-table1".into())), Ok(8));
    assert_eq!(refs.gpa(&Target::Gpa(0x5000)), Ok(0x5000));
    assert!(refs.pfn(&Target::Ref("slab0".into())).is_err());
}

#[test]
fn guest_poison_names_many_pages() {
    use guest_agent::GuestPoisonOp;

    assert_eq!(
        parse("kernel-pages:free:300:stride=3"),
        Ok(agent(Command::KernelPages {
            kind: KernelPageKind::Free,
            count: 300,
            stride: 3,
            poison: false,
        }))
    );
    for bad in [
        "kernel-pages:free:3:step=3",
        "kernel-pages:free:3:stride=3:x",
        "guest-poison:burn:free*",
        "guest-poison:corrupt:",
        "guest-poison:corrupt:0x12*",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse("guest-poison:corrupt:free*,page0,0x99"),
        Ok(Step::GuestPoison {
            op: GuestPoisonOp::Corrupt,
            pages: vec![
                Pages::Prefixed("free".into()),
                Pages::One(Target::Ref("page0".into())),
                Pages::One(Target::Gpa(0x99)),
            ],
        })
    );
    let mut refs = Refs::default();
    refs.learn(
        &Command::KernelPages {
            kind: KernelPageKind::Free,
            count: 12,
            stride: 3,
            poison: false,
        },
        &Payload::KernelPages((0..12).map(|i| 0x100 + 3 * i).collect()),
        None,
    );
    // Numeric order (free10 after free9), each page once.
    let pfns = refs
        .pages(&[
            Pages::Prefixed("free".into()),
            Pages::One(Target::Ref("free0".into())),
        ])
        .unwrap();
    assert_eq!(pfns, (0..12).map(|i| 0x100 + 3 * i).collect::<Vec<u64>>());
    assert!(refs.pages(&[Pages::Prefixed("slab".into())]).is_err());
    // `free1*` is every `free1<i>`: free10 and free11, not free1.
    assert_eq!(refs.prefixed("free1"), vec![0x100 + 3 * 10, 0x100 + 3 * 11]);
}

#[test]
fn host_poison_names_guest_pages_by_address_or_the_vmm() {
    assert_eq!(
        parse("host-poison:vmm"),
        Ok(Step::HostPoison(HostPoisonTarget::Vmm))
    );
    assert_eq!(
        parse("host-poison:page*,0x5000"),
        Ok(Step::HostPoison(HostPoisonTarget::Guest(vec![
            Pages::Prefixed("page".into()),
            Pages::One(Target::Gpa(0x5000)),
        ])))
    );
    for bad in [
        "host-poison",
        "host-poison:",
        "host-poison:0x12*",
        "host-poison:a b",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
    // A number is an address; a reference, its page; each page once.
    let mut refs = Refs::default();
    refs.learn(
        &Command::AllocPage,
        &Payload::Page(PageRecord {
            page: 0,
            pid: 9,
            vaddr: 0x1000,
            pfn: 0x77,
            cpu: 0,
        }),
        None,
    );
    let gpas = refs
        .gpas(&[
            Pages::One(Target::Gpa(0x5000)),
            Pages::Prefixed("page".into()),
            Pages::One(Target::Ref("page0".into())),
        ])
        .unwrap();
    assert_eq!(gpas, vec![0x5000, 0x77000]);
}

#[test]
fn kernel_pages_bind_under_a_name() {
    assert_eq!(
        parse("kernel-pages:free:4:as=batch:stride=2"),
        Ok(Step::Agent {
            cmd: Command::KernelPages {
                kind: KernelPageKind::Free,
                count: 4,
                stride: 2,
                poison: false,
            },
            pfn: None,
            bind: Some("batch".into()),
        })
    );
    for bad in [
        "kernel-pages:free:4:as=b2",
        "kernel-pages:free:4:as=0x12",
        "kernel-pages:free:4:as=",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
    let mut refs = Refs::default();
    let cmd = Command::KernelPages {
        kind: KernelPageKind::Free,
        count: 2,
        stride: 0,
        poison: false,
    };
    refs.learn(&cmd, &Payload::KernelPages(vec![5, 9]), Some("b"));
    refs.learn(&cmd, &Payload::KernelPages(vec![20, 30]), None);
    assert_eq!(refs.prefixed("b"), vec![5, 9]);
    assert_eq!(refs.prefixed("free"), vec![20, 30]);
}

#[test]
fn steps_on_a_condition() {
    let s = parse("if panic-sysctl: sysctl:vm.panic_on_unrecoverable_memory_failure=1").unwrap();
    let Step::When { feature, step } = s else {
        panic!("{s:?}")
    };
    assert_eq!(feature, KernelFeature::PanicSysctl);
    assert!(matches!(
        *step,
        Step::Agent {
            cmd: Command::Sysctl { .. },
            ..
        }
    ));
    for (bad, why) in [
        (
            "if panic-sysctl sysctl:x=1",
            "'if <kernel feature>: <step>'",
        ),
        ("if warp: poweroff", "unknown kernel feature 'warp'"),
        ("if kho: if ghes: poweroff", "do not nest"),
        ("if kho: frobnicate", "frobnicate"),
    ] {
        let e = parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn rasdaemon_steps_and_exec_variables() {
    assert_eq!(
        parse("rasdaemon"),
        Ok(agent(Command::Rasdaemon { at_least: 0 }))
    );
    assert_eq!(
        parse("rasdaemon:3"),
        Ok(agent(Command::Rasdaemon { at_least: 3 }))
    );
    assert!(parse("rasdaemon:-1").is_err() && parse("rasdaemon:0x100000000").is_err());
    let mut refs = Refs::default();
    refs.learn(
        &Command::AllocPage,
        &guest_agent::Payload::Page(guest_agent::PageRecord {
            page: 0,
            pid: 1,
            vaddr: 0x7f00_0000_0000,
            pfn: 0x1234,
            cpu: 0,
        }),
        None,
    );
    refs.learn(
        &Command::KernelPages {
            kind: KernelPageKind::PageTable,
            count: 1,
            stride: 0,
            poison: false,
        },
        &guest_agent::Payload::KernelPages(vec![0x55]),
        None,
    );
    let Ok(Command::Exec { env, .. }) = refs.resolve(
        &Command::Exec {
            sh: "echo $page0_pa > param1; echo $page0_pfn $page1_pa $page_table0_pa".into(),
            env: Default::default(),
        },
        None,
    ) else {
        panic!("exec resolves");
    };
    // Only what the line names, and only references that exist.
    assert_eq!(
        env.into_iter().collect::<Vec<_>>(),
        vec![
            ("page0_pa".to_string(), "0x1234000".to_string()),
            ("page0_pfn".to_string(), "0x1234".to_string()),
            ("page_table0_pa".to_string(), "0x55000".to_string()),
        ]
    );
}
