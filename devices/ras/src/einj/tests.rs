use super::*;

const BASE: u64 = 0xfe00_0000;

fn u32_at(b: &[u8], o: usize) -> u32 {
    le32(b, o).unwrap()
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    le64(b, o).unwrap()
}

/// An instruction entry as Linux's struct acpi_whea_header reads it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    action: u8,
    instruction: u8,
    space: u8,
    width: u8,
    address: u64,
    value: u64,
    mask: u64,
}

/// The entries, after the checks of Linux's einj_check_table().
fn entries(t: &[u8]) -> Vec<Entry> {
    assert_eq!(&t[0..4], b"EINJ");
    assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
    let length = u32_at(t, 4) as usize;
    assert_eq!(length, t.len());
    let header_length = u32_at(t, 36);
    assert!(header_length == 12 || header_length == 48);
    let count = u32_at(t, 44) as usize;
    assert_eq!(count, (length - 48) / 32);
    (0..count)
        .map(|i| {
            let e = &t[48 + 32 * i..48 + 32 * (i + 1)];
            Entry {
                action: e[0],
                instruction: e[1],
                space: e[4],
                width: e[5],
                address: u64_at(e, 8),
                value: u64_at(e, 16),
                mask: u64_at(e, 24),
            }
        })
        .collect()
}

/// Linux's apei_exec_run() for `action` over the window: returns the output.
fn run(es: &[Entry], w: &mut Window, action: u8, input: u64) -> (u64, Option<Operation>) {
    let mut out = 0;
    let mut req = None;
    let mut found = false;
    for e in es.iter().filter(|e| e.action == action) {
        found = true;
        assert_eq!(e.space, 0, "system memory");
        let off = e.address - w.base();
        let bytes = usize::from(e.width / 8);
        match e.instruction {
            instruction::READ_REGISTER => {
                let mut b = [0u8; 8];
                w.read(off, &mut b[..bytes]);
                out = u64::from_le_bytes(b) & e.mask;
            }
            instruction::WRITE_REGISTER | instruction::WRITE_REGISTER_VALUE => {
                let v = if e.instruction == instruction::WRITE_REGISTER {
                    input
                } else {
                    e.value
                } & e.mask;
                if let Some(r) = w.write(off, &v.to_le_bytes()[..bytes]) {
                    req = Some(r);
                }
            }
            i => panic!("instruction {i}"),
        }
    }
    assert!(found, "no entry for action {action}");
    (out, req)
}

/// What Linux's __einj_error_inject() does in ACPI 5 mode, up to the
/// status; `answer` plays the VMM.
fn inject(
    w: &mut Window,
    es: &[Entry],
    error_type: u32,
    flags: u32,
    param1: u64,
    param2: u64,
    answer: impl FnOnce(Request) -> CommandStatus,
) -> (u64, Request) {
    run(es, w, action::BEGIN_OPERATION, 0);
    // The data structure is found from SET_ERROR_TYPE_WITH_ADDRESS's register.
    let pa = es
        .iter()
        .find(|e| e.action == action::SET_ERROR_TYPE_WITH_ADDRESS)
        .unwrap()
        .address;
    let off = pa - w.base();
    let mut p = [0u8; PARAMETERS_LEN];
    w.read(off, &mut p);
    p[0..4].copy_from_slice(&error_type.to_le_bytes());
    let flags = if flags == 0 { FLAG_MEMORY } else { flags };
    p[8..12].copy_from_slice(&flags.to_le_bytes());
    p[16..24].copy_from_slice(&param1.to_le_bytes());
    p[24..32].copy_from_slice(&param2.to_le_bytes());
    for (i, chunk) in p.chunks(8).enumerate() {
        w.write(off + 8 * i as u64, chunk);
    }
    let (_, op) = run(es, w, action::EXECUTE_OPERATION, 0);
    let op = op.expect("EXECUTE_OPERATION asks the VMM");
    let req = op.request;
    assert_eq!(
        run(es, w, action::CHECK_BUSY_STATUS, 0).0,
        1,
        "busy until answered"
    );
    w.complete(op.id, answer(req));
    assert_eq!(run(es, w, action::CHECK_BUSY_STATUS, 0).0, 0);
    let status = run(es, w, action::GET_COMMAND_STATUS, 0).0;
    // The trigger table: header only, as einj_check_trigger_header() wants.
    let trigger = run(es, w, action::GET_TRIGGER_ACTION_TABLE, 0).0;
    let mut h = [0u8; 16];
    w.read(trigger - w.base(), &mut h);
    assert_eq!((u32_at(&h, 0), u32_at(&h, 8), u32_at(&h, 12)), (16, 16, 0));
    run(es, w, action::END_OPERATION, 0);
    (status, req)
}

#[test]
fn table_has_every_action_linux_runs() {
    let t = table(BASE, *b"RASVMM", *b"RASVMM  ");
    let es = entries(t.as_slice());
    for a in 0..=action::SET_ERROR_TYPE_WITH_ADDRESS {
        assert!(es.iter().any(|e| e.action == a), "action {a}");
    }
    for e in &es {
        assert!(e.address >= BASE && e.address + u64::from(e.width / 8) <= BASE + WINDOW_SIZE);
        assert!(matches!(e.width, 8 | 16 | 32 | 64));
    }
    // ACPI 5 mode: SET_ERROR_TYPE_WITH_ADDRESS writes a register in system
    // memory (Linux's einj_get_parameter_address()).
    let s = es
        .iter()
        .find(|e| e.action == action::SET_ERROR_TYPE_WITH_ADDRESS)
        .unwrap();
    assert_eq!(
        (s.instruction, s.space, s.address),
        (instruction::WRITE_REGISTER, 0, BASE + PARAMETERS)
    );
}

#[test]
fn get_error_type_offers_the_memory_types() {
    let t = table(BASE, *b"RASVMM", *b"RASVMM  ");
    let es = entries(t.as_slice());
    let mut w = Window::new(BASE);
    assert_eq!(run(&es, &mut w, action::GET_ERROR_TYPE, 0).0, 0x38);
}

#[test]
fn an_uncorrectable_injection_reaches_the_vmm_and_its_status_the_os() {
    let t = table(BASE, *b"RASVMM", *b"RASVMM  ");
    let es = entries(t.as_slice());
    let mut w = Window::new(BASE);
    let (status, req) = inject(&mut w, &es, 0x10, 0, 0x12_3456, !0xfff, |r| {
        assert_eq!(
            validate(&r),
            Ok(Planned {
                kind: Kind::Uncorrectable,
                page: 0x12_3000
            })
        );
        CommandStatus::Success
    });
    assert_eq!(status, 0);
    assert_eq!(req.flags, FLAG_MEMORY);
    // A refusal reads as INVALID_ACCESS, which Linux turns into -EINVAL.
    let (status, _) = inject(&mut w, &es, 0x8, 0, 0x5000, !0xfff, |_| {
        CommandStatus::InvalidAccess
    });
    assert_eq!(status, 2);
    // The next operation starts clean.
    let (status, req) = inject(&mut w, &es, 0x20, 0, 0x7000, !0xfff, |_| {
        CommandStatus::Success
    });
    assert_eq!((status, req.error_type), (0, 0x20));
}

#[test]
fn writes_while_busy_and_to_read_only_registers_change_nothing() {
    let mut w = Window::new(BASE);
    w.write(PARAMETERS, &0x10u32.to_le_bytes());
    w.write(PARAMETERS + 8, &FLAG_MEMORY.to_le_bytes());
    let op = w.write(COMMAND, &2u64.to_le_bytes()).unwrap();
    assert!(w.busy());
    // A second EXECUTE and new parameters while busy are dropped.
    assert!(w.write(COMMAND, &2u64.to_le_bytes()).is_none());
    w.write(PARAMETERS, &0x8u32.to_le_bytes());
    let mut b = [0u8; 4];
    w.read(PARAMETERS, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x10);
    // Read-only registers keep their values.
    w.write(ERROR_TYPES, &0u64.to_le_bytes());
    w.write(TRIGGER_TABLE, &[0xff; 16]);
    let mut v = [0u8; 8];
    w.read(ERROR_TYPES, &mut v);
    assert_eq!(u64::from_le_bytes(v), 0x38);
    w.read(TRIGGER_TABLE, &mut v);
    assert_eq!(u32_at(&v, 0), 16);
    // Accesses past the window read zeros and are dropped.
    let mut far = [0xffu8; 8];
    w.read(WINDOW_SIZE - 4, &mut far);
    assert_eq!(far, [0; 8]);
    assert!(w.write(u64::MAX - 2, &[1, 2, 3, 4]).is_none());
    w.complete(op.id, CommandStatus::Success);
    assert!(!w.busy());
}

#[test]
fn an_abandoned_operation_never_answers_the_next() {
    let t = table(BASE, *b"RASVMM", *b"RASVMM  ");
    let es = entries(t.as_slice());
    let mut w = Window::new(BASE);
    // The OS gives up on an operation the VMM has not answered ...
    run(&es, &mut w, action::BEGIN_OPERATION, 0);
    w.write(PARAMETERS, &0x10u32.to_le_bytes());
    w.write(PARAMETERS + 8, &FLAG_MEMORY.to_le_bytes());
    let (_, old) = run(&es, &mut w, action::EXECUTE_OPERATION, 0);
    let old = old.unwrap();
    // ... and begins the next: not busy, its own parameters taken.
    let (status, req) = inject(&mut w, &es, 0x8, 0, 0x9000, !0xfff, |_| {
        CommandStatus::InvalidAccess
    });
    assert_eq!((status, req.error_type), (2, 0x8));
    // The late answer to the first changes nothing.
    w.complete(old.id, CommandStatus::Success);
    let mut v = [0u8; 8];
    w.read(STATUS, &mut v);
    assert_eq!(u64::from_le_bytes(v), 2);
    assert!(!w.busy());
}

#[test]
fn refusals() {
    let ok = Request {
        error_type: MEMORY_UNCORRECTABLE,
        vendor_extension: 0,
        flags: FLAG_MEMORY,
        memory_address: 0x4000,
        memory_address_range: !0xfff,
    };
    assert!(validate(&ok).is_ok());
    let with = |f: &dyn Fn(&mut Request)| {
        let mut r = ok;
        f(&mut r);
        validate(&r)
    };
    assert_eq!(
        with(&|r| r.error_type = 0x2),
        Err(Refusal::UnsupportedType(0x2))
    );
    assert_eq!(
        with(&|r| r.error_type = 0x18),
        Err(Refusal::UnsupportedType(0x18))
    );
    assert_eq!(
        with(&|r| r.error_type = 0x8000_0000),
        Err(Refusal::UnsupportedType(0x8000_0000))
    );
    assert_eq!(
        with(&|r| r.flags = FLAG_APICID),
        Err(Refusal::NoAddress(FLAG_APICID))
    );
    assert_eq!(
        with(&|r| r.flags = FLAG_MEMORY | FLAG_EINJV2),
        Err(Refusal::BadFlags(0xa))
    );
    assert_eq!(
        with(&|r| r.flags = FLAG_MEMORY | FLAG_PCIE_SBDF),
        Err(Refusal::BadFlags(0x6))
    );
    assert_eq!(
        with(&|r| r.vendor_extension = 0x40),
        Err(Refusal::VendorExtension)
    );
    assert_eq!(
        with(&|r| r.memory_address_range = !0x1fff),
        Err(Refusal::CoarseRange(!0x1fff))
    );
    // A finer mask (a cache line) still names the page.
    assert_eq!(
        with(&|r| {
            r.memory_address = 0x4fc0;
            r.memory_address_range = !0x3f;
        }),
        Ok(Planned {
            kind: Kind::Uncorrectable,
            page: 0x4000
        })
    );
}

#[test]
fn any_guest_write_sequence_is_safe() {
    // Hostile input: every offset and size, including ones straddling the
    // registers and the window's end, never panics.
    let mut w = Window::new(BASE);
    let mut seed = 0x1234_5678_u64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let off = seed % (WINDOW_SIZE + 16);
        let len = (seed >> 20) as usize % 9;
        let data = seed.to_le_bytes();
        if let Some(op) = w.write(off, &data[..len]) {
            let _ = validate(&op.request);
            w.complete(op.id, CommandStatus::UnknownFailure);
        }
        let mut out = [0u8; 8];
        w.read(off, &mut out[..len]);
    }
}
