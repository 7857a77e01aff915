//! Writes the arm64 boot blobs of `arch::aarch64::firmware` to files, to
//! check them under QEMU TCG without KVM:
//!
//! ```text
//! cargo run -p arch --example arm64-firmware -- OUTDIR [--mem MIB] [--vcpus N]
//!     [--cmdline TEXT] [--initrd START,END] [--dt] [--no-agent-uart]
//!     [--cper-polled PA]
//! ```
//!
//! OUTDIR gets `fdt.dtb` (the device tree; x0), `firmware.bin` (everything
//! after the device tree up to the end of the firmware range, zero-filled
//! between blobs, to load at the address the tool prints) and `blobs.txt`
//! (each blob's address and length). It prints a QEMU command line.
//! QEMU places a `-dtb` file itself (after the initrd) and adds a /memory
//! node to it, so an ACPI boot under QEMU needs `acpi=on` in the command
//! line; rasvmm's own stub DT needs nothing. `--cper-polled PA` puts a
//! recoverable CPER memory error record for physical address PA (hex) in
//! the polled GHES source's block, for the guest to find at its first poll.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use arch::aarch64::firmware::{self, BootMode, Config};
use arch::aarch64::layout;

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

fn run() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: arm64-firmware OUTDIR [options]")?,
    );
    let mut mem_mib = 512u64;
    let mut vcpus = 2u8;
    let mut cmdline = String::from("console=ttyAMA0 earlycon");
    let mut initrd = None;
    let mut mode = BootMode::Acpi;
    let mut agent_uart = true;
    let mut cper_polled = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--mem" => mem_mib = val()?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--vcpus" => vcpus = val()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--cmdline" => cmdline = val()?,
            "--initrd" => {
                let v = val()?;
                let (s, e) = v.split_once(',').ok_or("--initrd START,END (hex)")?;
                initrd = Some((
                    parse_hex(s).ok_or("--initrd START")?,
                    parse_hex(e).ok_or("--initrd END")?,
                ));
            }
            "--dt" => mode = BootMode::DeviceTree,
            "--no-agent-uart" => agent_uart = false,
            "--cper-polled" => cper_polled = Some(parse_hex(&val()?).ok_or("--cper-polled PA")?),
            _ => return Err(format!("unknown option {a}")),
        }
    }
    let fw = firmware::build(&Config {
        mem_size: mem_mib << 20,
        vcpus,
        cmdline: &cmdline,
        initrd,
        mode,
        agent_uart,
    })
    .map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            let _ = write!(s, ": {c}");
            src = c.source();
        }
        s
    })?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let write = |name: &str, b: &[u8]| {
        std::fs::write(out.join(name), b).map_err(|e| format!("{name}: {e}"))
    };
    let mut list = String::new();
    let mut rest_start = u64::MAX;
    for (addr, b) in &fw.blobs {
        let _ = writeln!(list, "{addr:#x} {:#x}", b.len());
        if *addr == fw.fdt_addr {
            write("fdt.dtb", b)?;
        } else {
            rest_start = rest_start.min(*addr);
        }
    }
    write("blobs.txt", list.as_bytes())?;
    let mut cmd = format!(
        "qemu-system-aarch64 -M virt,gic-version=3 -cpu max -accel tcg -m {mem_mib} -smp {vcpus} \
         -nographic -kernel Image -dtb {}/fdt.dtb",
        out.display()
    );
    if rest_start != u64::MAX {
        let end = fw.firmware_range.1;
        let mut img = vec![0u8; usize::try_from(end - rest_start).map_err(|e| e.to_string())?];
        for (addr, b) in &fw.blobs {
            if *addr != fw.fdt_addr {
                let o = usize::try_from(addr - rest_start).map_err(|e| e.to_string())?;
                img[o..o + b.len()].copy_from_slice(b);
            }
        }
        if let (Some(pa), Some(src)) = (
            cper_polled,
            fw.ghes
                .iter()
                .find(|s| s.notify == ras::ghes::Notification::Polled),
        ) {
            let rec = ras::cper::MemoryErrorRecord {
                severity: ras::cper::Severity::Recoverable,
                physical_addr: pa,
                threshold_exceeded: false,
            }
            .encode();
            let o = usize::try_from(src.block - rest_start).map_err(|e| e.to_string())?;
            img[o..o + rec.len()].copy_from_slice(&rec);
            // Written, not yet acknowledged: read-ack 0.
            let o = usize::try_from(src.read_ack - rest_start).map_err(|e| e.to_string())?;
            img[o..o + 8].fill(0);
        }
        write("firmware.bin", &img)?;
        let _ = write!(
            cmd,
            " -device loader,file={}/firmware.bin,addr={rest_start:#x},force-raw=on",
            out.display()
        );
    }
    let _ = write!(cmd, " -append '{cmdline}'");
    Ok(format!(
        "{cmd}\n# kernel at {:#x}, x0 = {:#x}, firmware range {:#x}..{:#x}, GHES sources {:?}\n# console SPI {} (INTID {})",
        fw.kernel_addr,
        fw.fdt_addr,
        fw.firmware_range.0,
        fw.firmware_range.1,
        fw.ghes.iter().map(|s| (s.notify.as_str(), s.block)).collect::<Vec<_>>(),
        layout::CONSOLE_UART.spi,
        layout::CONSOLE_UART.intid(),
    ))
}

fn main() -> ExitCode {
    match run() {
        Ok(s) => {
            // A closed stdout (`| head -1`) is not an error of the tool.
            let _ = writeln!(std::io::stdout(), "{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("arm64-firmware: {e}");
            ExitCode::FAILURE
        }
    }
}
