//! Bad input to the `rasvmm` command: every case is one line on stderr
//! naming the problem, a non-zero exit, and never a panic.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn rasvmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rasvmm"))
        .args(args)
        .output()
        .expect("rasvmm runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

fn temp(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rasvmm-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The smallest image linux-loader accepts as a bzImage: a setup header
/// ("HdrS", protocol 2.15, loaded high) with a 255-byte command-line limit,
/// and one page of "kernel".
fn fake_bzimage() -> Vec<u8> {
    let mut b = vec![0u8; 0x1000 + 4096];
    b[0x1f1] = 7; // setup_sects: 8 sectors of setup = 0x1000 bytes
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    b[0x238..0x23c].copy_from_slice(&255u32.to_le_bytes()); // cmdline_size
    b
}

fn assert_one_line_error(code: i32, stderr: &str, needle: &str) {
    assert_ne!(code, 0, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line, got: {stderr:?}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_kernel() {
    let (c, e) = rasvmm(&["run", "--kernel", "/nonexistent/bzImage"]);
    assert_one_line_error(c, &e, "Cannot read kernel '/nonexistent/bzImage'");
}

#[test]
fn corrupt_kernel() {
    let k = temp("garbage", &[0x5a; 8192]);
    let (c, e) = rasvmm(&["run", "--kernel", k.to_str().unwrap(), "--console", "none"]);
    assert_one_line_error(c, &e, "is not a loadable bzImage or ELF vmlinux");
}

#[test]
fn missing_and_empty_initramfs() {
    let k = temp("k1", &fake_bzimage());
    let (c, e) = rasvmm(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--initramfs",
        "/nope.cpio",
    ]);
    assert_one_line_error(c, &e, "Cannot read initramfs '/nope.cpio'");
    let empty = temp("empty", b"");
    let (c, e) = rasvmm(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--initramfs",
        empty.to_str().unwrap(),
    ]);
    assert_one_line_error(c, &e, "file is empty");
}

#[test]
fn too_little_and_too_much_memory() {
    let k = temp("k2", &fake_bzimage());
    let (c, e) = rasvmm(&["run", "--kernel", k.to_str().unwrap(), "--memory", "16"]);
    assert_one_line_error(c, &e, "Memory must be 64 to 65536 MiB, got 16 MiB");
    let (c, e) = rasvmm(&["run", "--kernel", k.to_str().unwrap(), "--memory", "100G"]);
    assert_one_line_error(c, &e, "Memory must be");
    let (c, e) = rasvmm(&["run", "--kernel", k.to_str().unwrap(), "--memory", "lots"]);
    assert_one_line_error(c, &e, "invalid memory size 'lots'");
}

#[test]
fn zero_and_too_many_vcpus() {
    let k = temp("k3", &fake_bzimage());
    let (c, e) = rasvmm(&["run", "--kernel", k.to_str().unwrap(), "--vcpus", "0"]);
    assert_one_line_error(c, &e, "vCPUs must be 1 to 32, got 0");
    let (c, e) = rasvmm(&["run", "--kernel", k.to_str().unwrap(), "--vcpus", "1000"]);
    assert_one_line_error(c, &e, "got 1000");
}

#[test]
fn over_long_command_line() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is needed: the kernel's header is read while the VM is built"
    );
    let k = temp("k4", &fake_bzimage());
    let long = "x".repeat(300);
    let (c, e) = rasvmm(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--cmdline",
        &long,
        "--console",
        "none",
    ]);
    assert_one_line_error(
        c,
        &e,
        "Kernel command line is 300 bytes; this kernel accepts at most 255",
    );
}

#[test]
fn unknown_profile_step_and_expectation() {
    let k = temp("k5", &fake_bzimage());
    let k = k.to_str().unwrap();
    let (c, e) = rasvmm(&["run", "--kernel", k, "--cpu", "max"]);
    assert_one_line_error(c, &e, "Unknown CPU profile 'max' (available: intel, amd)");
    let (c, e) = rasvmm(&["run", "--kernel", k, "--agent", "reboot"]);
    assert_one_line_error(c, &e, "Bad step 'reboot'");
    let (c, e) = rasvmm(&["run", "--kernel", k, "--expect", "crash"]);
    assert_one_line_error(c, &e, "unknown outcome 'crash'");
    let (c, e) = rasvmm(&["run", "--kernel", k, "--timeout", "0"]);
    assert_one_line_error(c, &e, "Timeout must be between 1 s and 24 h");
}

#[test]
fn unknown_flag_is_one_line() {
    let (c, e) = rasvmm(&["run", "--kernal", "x"]);
    assert_one_line_error(c, &e, "--kernal");
    let (c, e) = rasvmm(&["frobnicate"]);
    assert_one_line_error(c, &e, "frobnicate");
}

#[test]
fn unwritable_report_path_fails_before_the_guest_runs() {
    let k = temp("k6", &fake_bzimage());
    let (c, e) = rasvmm(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--json",
        "/nonexistent/dir/report.json",
    ]);
    assert_one_line_error(c, &e, "cannot write report '/nonexistent/dir/report.json'");
}

#[test]
fn version_names_the_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_rasvmm"))
        .arg("--version")
        .output()
        .expect("rasvmm runs");
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(v.starts_with("rasvmm "), "{v}");
}
