//! The control API under abuse, against a real `rasvmm run` process with
//! `--api-socket` and a tiny guest (an ELF "kernel" that halts forever;
//! needs /dev/kvm, any backend). Each test prints its measured figures;
//! docs/benchmarks.md ("Control API under abuse") records them.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests measure RSS and latency: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// An ELF64 x86_64 executable with one PT_LOAD at 1 MiB: `cli; hlt; jmp`
/// back to the hlt. linux-loader loads it as a vmlinux; it never wakes.
fn halting_elf() -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let code = [0xfa, 0xf4, 0xeb, 0xfd];
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    // PT_LOAD, R+X, file offset 0x1000.
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&5u32.to_le_bytes());
    for v in [0x1000, LOAD, LOAD, 4, 4, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.resize(0x1000, 0);
    e.extend_from_slice(&code);
    e
}

/// A `rasvmm run` with the control API; killed when dropped.
struct Vmm {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Vmm {
    fn start(name: &str) -> Vmm {
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: these tests run rasvmm on KVM and need it"
        );
        let dir = std::env::temp_dir().join(format!("rasvmm-abuse-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("halt.elf");
        std::fs::write(&kernel, halting_elf()).unwrap();
        let socket = dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_rasvmm"))
            .args(["run", "--kernel"])
            .arg(&kernel)
            .args(["--memory", "64", "--console", "none", "--timeout", "300"])
            .arg("--api-socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let vmm = Vmm { child, dir, socket };
        let until = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&vmm.socket).is_err() {
            assert!(Instant::now() < until, "rasvmm never served its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        vmm
    }

    fn connect(&self) -> Client {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            s,
        }
    }

    /// VmRSS of the rasvmm process, KiB.
    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Client {
    s: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }

    /// Sends a request and returns the answer and how long it took.
    fn ask(&mut self, id: u64, request: &str) -> (String, Duration) {
        let t = Instant::now();
        writeln!(self.s, "{{\"id\":{id},\"request\":{request}}}").unwrap();
        let l = self.line();
        (l, t.elapsed())
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[test]
fn a_million_bad_lines_from_a_client_that_never_reads() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vmm = Vmm::start("million");
    let mut probe = vmm.connect();
    assert!(probe.ask(1, "\"state\"").0.contains("\"ok\""));
    let before = vmm.rss_kib();
    let t = Instant::now();
    let mut flood = UnixStream::connect(&vmm.socket).unwrap();
    flood
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = b"x\n".repeat(4096);
    let mut sent = 0usize;
    let mut dropped = None;
    while sent < 1_000_000 {
        if let Err(e) = flood.write_all(&chunk) {
            dropped = Some(e);
            break;
        }
        sent += 4096;
    }
    let took = t.elapsed();
    let after = vmm.rss_kib();
    let growth = after.saturating_sub(before);
    println!(
        "1M bad lines, never read: client dropped after {sent} lines ({:?}) in {took:?}; \
         rasvmm RSS {before} KiB -> {after} KiB (+{growth} KiB)",
        dropped.as_ref().map(std::io::Error::kind)
    );
    assert!(dropped.is_some(), "the client that never reads is dropped");
    assert!(growth < 8 * 1024, "RSS grew by {growth} KiB");
    // Everyone else is still served.
    let (a, d) = probe.ask(2, "\"state\"");
    assert!(a.contains("\"ok\""), "{a}");
    println!("another client's answer after the flood: {d:?}");
    // The dropped client's slot came back: 15 more clients (16 with the
    // probe) are all served.
    drop(flood);
    let t = Instant::now();
    let mut others = Vec::new();
    while others.len() < 15 {
        let mut c = vmm.connect();
        // A refused client may find the socket closed before it writes.
        let _ = writeln!(c.s, "{{\"id\":3,\"request\":\"state\"}}");
        let a = c.line();
        if a.contains("too many connections") {
            assert!(t.elapsed() < Duration::from_secs(1), "a slot was lost");
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        assert!(a.contains("\"ok\""), "{a}");
        others.push(c);
    }
    println!("16 clients served after the drop, within {:?}", t.elapsed());
}

#[test]
fn idle_clients_do_not_stall_a_served_one() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vmm = Vmm::start("idle");
    let mut served = vmm.connect();
    assert!(served.ask(1, "\"state\"").0.contains("\"ok\""));
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&vmm.socket).unwrap())
        .collect();
    let mut lat = Vec::new();
    for id in 2..52 {
        let (a, d) = served.ask(id, "\"state\"");
        assert!(a.contains("\"ok\""), "{a}");
        lat.push(d);
    }
    // Those past the 16 connections were told so and closed at once.
    std::thread::sleep(Duration::from_millis(300));
    let mut refused = 0;
    for c in &idle {
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut s = String::new();
        if (&*c).read_to_string(&mut s).is_ok() && s.contains("too many connections") {
            refused += 1;
        }
    }
    lat.sort();
    let max = *lat.last().unwrap();
    println!(
        "64 idle clients: {refused} refused at once; served client's answers p50 {:?}, max {max:?}",
        percentile(&lat, 50)
    );
    assert!(max < Duration::from_secs(1), "{max:?}");
    // At most the 15 slots left are taken (one more may still be held by
    // start()'s probe connection, whose reader has yet to see its EOF).
    assert!(refused >= 64 - 15, "{refused} refused");
}

#[test]
fn subscribe_and_disconnect_cycles_lose_no_slot() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vmm = Vmm::start("cycles");
    let t = Instant::now();
    for id in 0..100 {
        let mut c = vmm.connect();
        let (a, _) = c.ask(id, "\"subscribe\"");
        assert_eq!(a, format!("{{\"id\":{id},\"ok\":null}}\n"), "cycle {id}");
    }
    let cycles = t.elapsed();
    // Slots come back when each reader sees EOF: give the last one a moment.
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let mut all: Vec<Client> = (0..16).map(|_| vmm.connect()).collect();
    for (i, c) in all.iter_mut().enumerate() {
        let (a, _) = c.ask(1000 + i as u64, "\"subscribe\"");
        assert!(a.contains("\"ok\":null"), "client {}: {a}", 101 + i);
        let (a, _) = c.ask(2000 + i as u64, "\"state\"");
        assert!(a.contains("\"elapsed_ms\""), "client {}: {a}", 101 + i);
    }
    let served = t.elapsed();
    // Events reach every subscriber: the outcome of a shutdown.
    let (a, _) = all[0].ask(3000, "\"shutdown\"");
    assert_eq!(a, "{\"id\":3000,\"ok\":null}\n");
    for (i, c) in all.iter_mut().enumerate() {
        let e = c.line();
        assert!(
            e.contains("\"outcome\":\"stopped\""),
            "client {}: {e}",
            101 + i
        );
    }
    println!(
        "100 subscribe-and-disconnect cycles in {cycles:?}; then 16 concurrent subscribers \
         (clients 101..116) all served in {served:?} and all got the outcome event"
    );
}

#[test]
fn injection_is_answered_quickly_under_a_kho_flood() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vmm = Vmm::start("flood");
    // A refused raw machine check: validated and answered by the session.
    let mce = r#"{"mce":{"vcpu":0,"bank":9,"status":1,"addr":0,"misc":0,"mcg_status":0}}"#;
    let mut probe = vmm.connect();
    let mut quiet = Vec::new();
    for id in 0..100 {
        let (a, d) = probe.ask(id, mce);
        assert!(a.contains("lacks VAL"), "{a}");
        quiet.push(d);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..6)
        .map(|_| {
            let mut c = vmm.connect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (a, _) = c.ask(n, "\"kho\"");
                    assert!(a.contains("\"ok\""), "{a}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut loaded = Vec::new();
    for id in 100..300 {
        let (a, d) = probe.ask(id, mce);
        assert!(a.contains("lacks VAL"), "{a}");
        loaded.push(d);
    }
    let window = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kho: u64 = flooders.into_iter().map(|h| h.join().unwrap()).sum();
    quiet.sort();
    loaded.sort();
    let max = *loaded.last().unwrap();
    println!(
        "raw mce answer latency: quiet p50 {:?} p99 {:?}; under a kho flood from 6 connections \
         ({kho} kho answers, ~{:.0}/s) p50 {:?} p99 {:?} max {max:?}",
        percentile(&quiet, 50),
        percentile(&quiet, 99),
        kho as f64 / (window.as_secs_f64() + 0.3),
        percentile(&loaded, 50),
        percentile(&loaded, 99),
    );
    assert!(max < Duration::from_secs(1), "{max:?}");
}

#[test]
fn a_thousand_injections_through_the_api() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vmm = Vmm::start("inject");
    let mut events = vmm.connect();
    let (a, _) = events.ask(0, "\"subscribe\"");
    assert!(a.contains("\"ok\":null"), "{a}");
    // A corrected record (VAL, EN, MISCV, ADDRV) in bank 9: it only fills
    // the bank, so the halted guest needs no handler.
    let status = (1u64 << 63) | (1 << 60) | (1 << 59) | (1 << 58);
    let mce = format!(
        r#"{{"mce":{{"vcpu":0,"bank":9,"status":{status},"addr":2097152,"misc":140,"mcg_status":0}}}}"#
    );
    let mut probe = vmm.connect();
    let mut answered = Vec::new();
    for id in 1..=1000 {
        let (a, d) = probe.ask(id, &mce);
        assert_eq!(a, format!("{{\"id\":{id},\"ok\":null}}\n"));
        answered.push(d);
    }
    // rasvmm's own share of each, from its events: from the request line
    // read to KVM_X86_SET_MCE returned.
    let mut share: Vec<Duration> = (0..1000)
        .map(|i| {
            let line = events.line();
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("event {i}: {e}: {line}"));
            let us = v["event"]["vmm_us"]
                .as_u64()
                .unwrap_or_else(|| panic!("event {i} has no vmm_us: {line}"));
            Duration::from_micros(us)
        })
        .collect();
    answered.sort();
    share.sort();
    println!(
        "1000 corrected machine checks through the control API into a halted vCPU: \
         rasvmm's share (request line read to KVM_X86_SET_MCE returned) p50 {:?} p99 {:?} max {:?}; \
         the client's round trip p50 {:?} p99 {:?} max {:?}",
        percentile(&share, 50),
        percentile(&share, 99),
        share[share.len() - 1],
        percentile(&answered, 50),
        percentile(&answered, 99),
        answered[answered.len() - 1],
    );
}

#[test]
fn other_uids_are_refused() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("not root: a foreign uid cannot be tried here (peer check of our own uid is a unit test)");
        return;
    }
    let vmm = Vmm::start("peer");
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    for p in [&vmm.dir, &vmm.socket] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rasvmm"))
        .args(["api", "--socket"])
        .arg(&vmm.socket)
        .arg("state")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!(
        "uid 65534 asking: exit {:?}, {}",
        out.status.code(),
        err.trim()
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("peer uid 65534 is not allowed"), "{err}");
}
