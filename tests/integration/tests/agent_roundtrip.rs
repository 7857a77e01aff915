//! The agent channel under load: `exec` requests of random sizes, from a
//! one-byte payload up to the protocol's longest request line, each echoed
//! back intact, through COM2 with no help from the VMM; then the same while
//! the guest floods its console UART (COM1) with `yes`.
//!
//! Every request is `p='<payload>'; echo ${#p} $(printf %s "$p" | crc32)`,
//! plus the payload itself when it is at most [`ECHO_MAX`] bytes, so a
//! request that arrived damaged or not at all shows. Payload sizes are
//! log-uniform over 1..=max from a seeded generator, and every run includes
//! a one-byte payload, the longest line (64 KiB) and lines of 257, 307 and
//! 831 bytes, which stalled before the UART fix. The requests are split
//! into scenario files of at most [`CHUNK_BYTES`] (rasvmm reads at most
//! 1 MiB of scenario), one rasvmm run each, all in one lab-host boot.
//!
//! Both architectures: x86_64's agent is COM2 (a 16550A on port I/O),
//! aarch64's the second PL011 (MMIO), each with its own receive FIFO.
//!
//! Requests per variant: [`DEFAULT_COUNT`] on hardware KVM; in the lab host
//! the channel moves only a few KiB/s (every byte is two nested exits), so
//! there the defaults are [`LabCounts`] per architecture, to stay near four
//! minutes (x86_64) and one (aarch64). `RASVMM_ROUNDTRIP_COUNT` sets both
//! variants' counts, `RASVMM_ROUNDTRIP_SEED` the seed. The test prints
//! counts, bytes, timing, a fit of time against size, and what 1,000
//! requests would take.

// All of this file is test code: a failed unwrap is a failed test, and the
// size arithmetic stays far below any truncation.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::time::Duration;

use guest_agent::{encode, Command, Request, MAX_LINE};
use lab::{Arch, Backend, Lab};
use serde_json::Value;

/// Requests per variant on hardware KVM.
const DEFAULT_COUNT: usize = 1000;
/// Requests with a quiet and with a flooded console in the lab host.
struct LabCounts {
    quiet: usize,
    flood: usize,
}

/// The two tests share the machine's two cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Payloads up to this size are echoed back in full (the rest by length
/// and CRC-32): keeps the reports small enough to bring back from the lab.
const ECHO_MAX: usize = 2048;
/// Most request bytes in one scenario file.
const CHUNK_BYTES: usize = 900 * 1024;
/// Payload characters: nothing that needs quoting in sh or JSON.
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.,";

/// The guest's console flood: its console device is named as the lab
/// host's (the same kernel).
fn flood(arch: Arch) -> String {
    format!(
        "yes rasvmm-console-flood-0123456789 >/dev/{} 2>&1 </dev/null &",
        arch.console()
    )
}

/// xorshift64*: a small, seeded generator (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }
}

/// zlib's CRC-32, as busybox `crc32` prints it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn command(payload: &str) -> String {
    let echo = if payload.len() <= ECHO_MAX {
        "; printf %s \"$p\""
    } else {
        ""
    };
    format!("p='{payload}'; echo ${{#p}} $(printf %s \"$p\" | crc32){echo}")
}

/// The request line rasvmm sends for `sh` as agent request `id`, newline
/// excluded.
fn line_len(id: u64, sh: &str) -> usize {
    let cmd = Command::Exec {
        sh: sh.to_string(),
        env: Default::default(),
    };
    encode(&Request { id, cmd }).len() - 1
}

/// One request.
struct Probe {
    payload: String,
    /// Its agent request id, once placed in a scenario.
    id: u64,
}

impl Probe {
    fn line(&self) -> usize {
        line_len(self.id, &command(&self.payload))
    }
}

/// A variant: its scenarios, each a list of probes after `before` steps.
struct Variant {
    name: &'static str,
    before: Vec<String>,
    chunks: Vec<Vec<Probe>>,
}

/// `count` probes (module docs), placed in chunks after `before` steps.
fn variant(name: &'static str, before: &[String], count: usize, rng: &mut Rng) -> Variant {
    let before = before.to_vec();
    let first_id = u64::try_from(before.len()).unwrap() + 1;
    // Overhead of a line for request ids of up to five digits.
    let over = line_len(10_000, &command(""));
    let mut chunks: Vec<Vec<Probe>> = vec![Vec::new()];
    let mut bytes = 0;
    // Overhead of request `i` (all in the first chunk), short or long payload.
    let short = |i: u64| line_len(first_id + i, &command(""));
    let long = |i: u64| {
        let p = "x".repeat(ECHO_MAX + 1);
        line_len(first_id + i, &command(&p)) - p.len()
    };
    for i in 0..count {
        let len = match i {
            0 => 1,
            // Exactly the longest line.
            1 => MAX_LINE - long(1),
            2 => 257 - short(2),
            3 => 307 - short(3),
            4 => 831 - short(4),
            _ => {
                // Log-uniform over 1..=max.
                let lmax = ((MAX_LINE - over) as f64).ln();
                let x = rng.below(1_000_000) as f64 / 1_000_000.0;
                ((x * lmax).exp() as usize).clamp(1, MAX_LINE - over)
            }
        };
        let payload: String = (0..len)
            .map(|_| char::from(ALPHABET[rng.below(ALPHABET.len())]))
            .collect();
        if bytes + len > CHUNK_BYTES && !chunks[chunks.len() - 1].is_empty() {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += len;
        let chunk = chunks.last_mut().unwrap();
        let id = first_id + u64::try_from(chunk.len()).unwrap();
        chunk.push(Probe { payload, id });
    }
    for p in chunks.iter().flatten() {
        assert!(p.line() <= MAX_LINE, "{} > {MAX_LINE}", p.line());
    }
    let lines: Vec<usize> = chunks[0].iter().take(5).map(Probe::line).collect();
    assert_eq!(lines[1..], [MAX_LINE, 257, 307, 831][..lines.len() - 1]);
    Variant {
        name,
        before,
        chunks,
    }
}

/// The scenario for one chunk.
fn scenario(name: &str, before: &[String], probes: &[Probe]) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let mut steps: Vec<String> = before.iter().map(|s| q(&format!("exec:{s}"))).collect();
    steps.extend(
        probes
            .iter()
            .map(|p| q(&format!("exec:{}", command(&p.payload)))),
    );
    if !before.is_empty() {
        steps.push(q("exec:pidof yes"));
    }
    steps.push(q("poweroff"));
    format!(
        "name = \"{name}\"\ndescription = \"agent round trips\"\nsteps = [\n{}\n]\n\n\
         [guest]\ntimeout_s = 900\n\n[expect]\noutcome = \"poweroff\"\n",
        steps.join(",\n")
    )
}

const SCRIPT: &str = r#"
for s in $(ls $JOB | sed -n 's/\.toml$//p'); do
    $RASVMM run --kernel $KERNEL --initramfs $INITRAMFS --console none \
        --scenario $JOB/$s.toml --json $WORK/$s.json 2>$WORK/$s.err
    echo "exit $?" >> $WORK/$s.err
    # The requests are the test's own; bring back the replies.
    grep -v '^ *"step": ' $WORK/$s.json > $WORK/$s.small
    lab_emit $s $WORK/$s.small
    lab_emit $s-err $WORK/$s.err
    rm -f $WORK/$s.json $WORK/$s.small
done
"#;

/// Per-request durations of one run: (line bytes, ms).
fn check_run(what: &str, report: &str, before: usize, probes: &[Probe]) -> Vec<(usize, f64)> {
    let report: Value = serde_json::from_str(report.trim())
        .unwrap_or_else(|e| panic!("{what}: no report ({e}): {}", lab::last_lines(report, 20)));
    assert_eq!(
        report["outcome"], "poweroff",
        "{what}: {}",
        report["detail"]
    );
    assert!(report.get("agent_kicks").is_none(), "no kick counter");
    let steps = report["steps"].as_array().expect("steps");
    let mut prev = report["agent_ready_ms"].as_u64().expect("agent ready");
    if before > 0 {
        prev = steps[before - 1]["at_ms"].as_u64().unwrap();
    }
    let mut times = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        let step = &steps[before + i];
        let exec = &step["reply"]["exec"];
        let out = exec["stdout"].as_str().unwrap_or_else(|| {
            panic!(
                "{what}: request {} ({}-byte line) failed: {step}",
                p.id,
                p.line()
            )
        });
        let mut want = format!("{} {:08x}\n", p.payload.len(), crc32(p.payload.as_bytes()));
        if p.payload.len() <= ECHO_MAX {
            want += &p.payload;
        }
        assert_eq!(
            out,
            want,
            "{what}: request {} ({}-byte line) came back wrong",
            p.id,
            p.line()
        );
        assert_eq!(exec["status"], 0);
        let at = step["at_ms"].as_u64().unwrap();
        times.push((p.line() + 1, (at - prev) as f64));
        prev = at;
    }
    if before > 0 {
        let pid = &steps[before + probes.len()]["reply"]["exec"]["stdout"];
        assert!(
            !pid.as_str().unwrap_or("").trim().is_empty(),
            "{what}: the console flood stopped before the last request"
        );
    }
    times
}

/// Least-squares fit ms = a + b * bytes.
fn fit(times: &[(usize, f64)]) -> (f64, f64) {
    let n = times.len() as f64;
    let (sx, sy) = times
        .iter()
        .fold((0.0, 0.0), |(x, y), &(b, t)| (x + b as f64, y + t));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for &(b, t) in times {
        sxy += (b as f64 - mx) * (t - my);
        sxx += (b as f64 - mx) * (b as f64 - mx);
    }
    let b = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - b * mx, b)
}

#[test]
fn x86_64_agent_round_trips_with_a_quiet_and_a_flooded_console() {
    round_trips(
        Arch::X86_64,
        LabCounts {
            quiet: 40,
            flood: 20,
        },
    );
}

#[test]
fn aarch64_agent_round_trips_with_a_quiet_and_a_flooded_console() {
    round_trips(
        Arch::Aarch64,
        LabCounts {
            quiet: 20,
            flood: 10,
        },
    );
}

fn round_trips(arch: Arch, in_lab: LabCounts) {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let lab =
        Lab::for_arch(arch).unwrap_or_else(|e| panic!("{e} ({:?})", std::error::Error::source(&e)));
    let env = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<u64>().ok());
    let (quiet_n, flood_n) = match (env("RASVMM_ROUNDTRIP_COUNT"), lab.backend) {
        (Some(n), _) => (n as usize, n as usize),
        (None, Backend::Direct) => (DEFAULT_COUNT, DEFAULT_COUNT),
        (None, Backend::Lab) => (in_lab.quiet, in_lab.flood),
    };
    let (quiet_n, flood_n) = (quiet_n.max(5), flood_n.max(5));
    let seed = env("RASVMM_ROUNDTRIP_SEED").unwrap_or(0x5eed_0a11) | 1;
    lab::progress(&format!(
        "agent round trips on {} ({arch} guests): {quiet_n} requests, then {flood_n} with the console flooded; seed {seed}",
        lab.backend
    ));
    let mut rng = Rng(seed);
    let variants = [
        variant("quiet", &[], quiet_n, &mut rng),
        variant("flood", &[flood(arch)], flood_n, &mut rng),
    ];
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("agent-roundtrip-{arch}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for v in &variants {
        for (i, chunk) in v.chunks.iter().enumerate() {
            let name = format!("{}-{i:03}.toml", v.name);
            let path = dir.join(&name);
            let text = scenario(&format!("roundtrip-{}-{i}", v.name), &v.before, chunk);
            std::fs::write(&path, text).unwrap();
            files.push((name, path));
        }
    }
    let res = lab
        .run_shell_with_files(SCRIPT, &files, Duration::from_secs(1800))
        .unwrap_or_else(|e| panic!("{e} ({:?})", std::error::Error::source(&e)));
    let f = |k: &str| res.files.get(k).cloned().unwrap_or_default();
    println!(
        "{} lab job wall time {:.1} s ({} rasvmm runs)",
        lab.backend,
        res.wall.as_secs_f64(),
        files.len()
    );
    for v in &variants {
        let mut times = Vec::new();
        for (i, chunk) in v.chunks.iter().enumerate() {
            let key = format!("{}-{i:03}", v.name);
            let err = f(&format!("{key}-err"));
            assert!(
                err.ends_with("exit 0\n"),
                "{key}: {}",
                lab::last_lines(&err, 8)
            );
            times.extend(check_run(&key, &f(&key), v.before.len(), chunk));
        }
        let n = times.len();
        let bytes: usize = times.iter().map(|t| t.0).sum();
        let ms: f64 = times.iter().map(|t| t.1).sum();
        let longest = v
            .chunks
            .iter()
            .flatten()
            .map(Probe::line)
            .max()
            .unwrap_or(0);
        let (a, b) = fit(&times);
        println!(
            "{}: {n}/{n} requests answered intact, {bytes} request bytes (lines of {}..={longest} bytes), \
             {:.1} s in requests: {:.0} ms per request, {:.2} KiB/s; fit: {a:.0} ms + {:.1} ms/KiB; \
             1,000 requests of this mix would take about {:.0} s",
            v.name,
            times.iter().map(|t| t.0 - 1).min().unwrap_or(0),
            ms / 1000.0,
            ms / n as f64,
            bytes as f64 / 1024.0 / (ms / 1000.0),
            b * 1024.0,
            ms / n as f64 * 1000.0 / 1000.0,
        );
    }
}
