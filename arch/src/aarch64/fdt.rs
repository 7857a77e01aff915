//! Device trees for arm64 guests, written with vm-fdt.
//!
//! Two kinds:
//! - [`stub_fdt`], for an ACPI boot: only `/chosen`, with the command line,
//!   the initrd and the six `linux,uefi-*` properties that point at the EFI
//!   system table and memory map ([`super::efi`]). drivers/firmware/efi/
//!   fdtparams.c takes them all or none; arch/arm64/kernel/acpi.c
//!   dt_is_stub() then turns ACPI on with no `acpi=` option, because the
//!   root has no node but /chosen.
//! - [`full_fdt`], for guests that need no APEI: memory, CPUs with PSCI,
//!   the GICv3, the architected timer, the PL011s with their APB clock
//!   (as QEMU virt describes them), and /chosen.
//!
//! `/chosen` `linux,kho-fdt` and `linux,kho-scratch` are not written here:
//! the guest kernel adds them to the DT it hands over on kexec.

use thiserror::Error;
use vm_fdt::FdtWriter;

use super::layout::{self, Slot};

/// Errors building a device tree.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// vm-fdt refused the tree.
    #[error("Cannot write the device tree")]
    Fdt(#[source] vm_fdt::Error),
    /// The tree outgrows its area.
    #[error("Device tree of {need} bytes does not fit its {room} bytes")]
    TooLarge {
        /// Bytes of the tree.
        need: u64,
        /// Bytes of the area.
        room: u64,
    },
}

impl From<vm_fdt::Error> for Error {
    fn from(e: vm_fdt::Error) -> Self {
        Error::Fdt(e)
    }
}

/// What the stub DT points the kernel at: the EFI system table and memory
/// map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UefiParams {
    /// `linux,uefi-system-table`.
    pub system_table: u64,
    /// `linux,uefi-mmap-start`.
    pub mmap_start: u64,
    /// `linux,uefi-mmap-size`.
    pub mmap_size: u32,
    /// `linux,uefi-mmap-desc-size`.
    pub desc_size: u32,
    /// `linux,uefi-mmap-desc-ver`.
    pub desc_version: u32,
}

/// GIC interrupt specifier types (`interrupts` first cell).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// IRQ_TYPE_EDGE_RISING.
const IRQ_TYPE_EDGE_RISING: u32 = 1;
/// IRQ_TYPE_LEVEL_HIGH.
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
const PHANDLE_GIC: u32 = 1;
const PHANDLE_APB_PCLK: u32 = 2;
/// The APB clock QEMU virt gives its PL011 (24 MHz).
const APB_PCLK_HZ: u32 = 24_000_000;

fn root(fdt: &mut FdtWriter) -> Result<vm_fdt::FdtWriterNode, Error> {
    let node = fdt.begin_node("")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    Ok(node)
}

fn chosen(
    fdt: &mut FdtWriter,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    stdout: Option<&str>,
) -> Result<(), Error> {
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cmdline)?;
    if let Some((start, end)) = initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    if let Some(path) = stdout {
        fdt.property_string("stdout-path", path)?;
    }
    Ok(fdt.end_node(node)?)
}

fn done(fdt: FdtWriter) -> Result<Vec<u8>, Error> {
    let b = fdt.finish()?;
    if b.len() as u64 > layout::FDT_MAX_SIZE {
        return Err(Error::TooLarge {
            need: b.len() as u64,
            room: layout::FDT_MAX_SIZE,
        });
    }
    Ok(b)
}

/// The stub DT of an ACPI boot. `initrd` is (first byte, one past the
/// last), as `linux,initrd-start`/`-end` take it.
pub fn stub_fdt(
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    uefi: &UefiParams,
) -> Result<Vec<u8>, Error> {
    let mut fdt = FdtWriter::new()?;
    let r = root(&mut fdt)?;
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cmdline)?;
    if let Some((start, end)) = initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    fdt.property_u64("linux,uefi-system-table", uefi.system_table)?;
    fdt.property_u64("linux,uefi-mmap-start", uefi.mmap_start)?;
    fdt.property_u32("linux,uefi-mmap-size", uefi.mmap_size)?;
    fdt.property_u32("linux,uefi-mmap-desc-size", uefi.desc_size)?;
    fdt.property_u32("linux,uefi-mmap-desc-ver", uefi.desc_version)?;
    fdt.property_u32("linux,uefi-secure-boot", 0)?;
    fdt.end_node(node)?;
    fdt.end_node(r)?;
    done(fdt)
}

/// The node name of a PL011 at `slot`.
pub fn uart_node_name(slot: &Slot) -> String {
    format!("pl011@{:x}", slot.base)
}

/// The full DT of a device-tree boot: `mem_size` bytes of RAM from
/// [`layout::RAM_START`], `vcpus` CPUs, the `uarts` (the first is the
/// console, `stdout-path`; `serialN` aliases in order).
pub fn full_fdt(
    mem_size: u64,
    vcpus: u8,
    uarts: &[Slot],
    cmdline: &str,
    initrd: Option<(u64, u64)>,
) -> Result<Vec<u8>, Error> {
    let mut fdt = FdtWriter::new()?;
    let r = root(&mut fdt)?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;

    let n = fdt.begin_node(&format!("memory@{:x}", layout::RAM_START))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[layout::RAM_START, mem_size])?;
    fdt.end_node(n)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for i in 0..vcpus {
        let mpidr = u32::try_from(layout::mpidr(i)).unwrap_or(0);
        let c = fdt.begin_node(&format!("cpu@{mpidr:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u32("reg", mpidr)?;
        fdt.end_node(c)?;
    }
    fdt.end_node(cpus)?;

    let n = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(n)?;

    let n = fdt.begin_node(&format!("intc@{:x}", layout::GIC_DIST_START))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#redistributor-regions", 1)?;
    fdt.property_array_u64(
        "reg",
        &[
            layout::GIC_DIST_START,
            layout::GIC_DIST_SIZE,
            layout::GIC_REDIST_START,
            layout::gic_redist_size(vcpus),
        ],
    )?;
    fdt.property_phandle(PHANDLE_GIC)?;
    fdt.end_node(n)?;

    let n = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    let mut irqs = Vec::new();
    for ppi in [
        layout::TIMER_PPI_SECURE,
        layout::TIMER_PPI_NONSECURE,
        layout::TIMER_PPI_VIRTUAL,
        layout::TIMER_PPI_HYP,
    ] {
        irqs.extend([GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH]);
    }
    fdt.property_array_u32("interrupts", &irqs)?;
    fdt.property_null("always-on")?;
    fdt.end_node(n)?;

    let n = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", APB_PCLK_HZ)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(PHANDLE_APB_PCLK)?;
    fdt.end_node(n)?;

    for u in uarts {
        let n = fdt.begin_node(&uart_node_name(u))?;
        fdt.property_string_list(
            "compatible",
            vec!["arm,pl011".into(), "arm,primecell".into()],
        )?;
        fdt.property_array_u64("reg", &[u.base, u.len])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, u.spi, IRQ_TYPE_EDGE_RISING])?;
        fdt.property_array_u32("clocks", &[PHANDLE_APB_PCLK, PHANDLE_APB_PCLK])?;
        fdt.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
        fdt.end_node(n)?;
    }

    let n = fdt.begin_node("aliases")?;
    for (i, u) in uarts.iter().enumerate() {
        fdt.property_string(&format!("serial{i}"), &format!("/{}", uart_node_name(u)))?;
    }
    fdt.end_node(n)?;

    let stdout = uarts.first().map(|u| format!("/{}", uart_node_name(u)));
    chosen(&mut fdt, cmdline, initrd, stdout.as_deref())?;
    fdt.end_node(r)?;
    done(fdt)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const UEFI: UefiParams = UefiParams {
        system_table: 0x4001_0000,
        mmap_start: 0x4001_0100,
        mmap_size: 144,
        desc_size: 48,
        desc_version: 1,
    };

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b.try_into().unwrap())
    }
    fn be64(b: &[u8]) -> u64 {
        u64::from_be_bytes(b.try_into().unwrap())
    }

    #[test]
    fn stub_dt_is_only_chosen_with_the_uefi_params() {
        let b = stub_fdt("console=ttyAMA0", Some((0x4800_0000, 0x4810_0000)), &UEFI).unwrap();
        let t = fdt::Fdt::new(&b).unwrap();
        let nodes: Vec<&str> = t
            .find_node("/")
            .unwrap()
            .children()
            .map(|n| n.name)
            .collect();
        assert_eq!(nodes, vec!["chosen"], "dt_is_stub: /chosen alone");
        let chosen = t.find_node("/chosen").unwrap();
        let mut props: Vec<&str> = chosen.properties().map(|p| p.name).collect();
        props.sort_unstable();
        assert_eq!(
            props,
            vec![
                "bootargs",
                "linux,initrd-end",
                "linux,initrd-start",
                "linux,uefi-mmap-desc-size",
                "linux,uefi-mmap-desc-ver",
                "linux,uefi-mmap-size",
                "linux,uefi-mmap-start",
                "linux,uefi-secure-boot",
                "linux,uefi-system-table",
            ]
        );
        let p = |n: &str| chosen.property(n).unwrap().value;
        assert_eq!(be64(p("linux,uefi-system-table")), 0x4001_0000);
        assert_eq!(be64(p("linux,uefi-mmap-start")), 0x4001_0100);
        assert_eq!(be32(p("linux,uefi-mmap-size")), 144);
        assert_eq!(be32(p("linux,uefi-mmap-desc-size")), 48);
        assert_eq!(be32(p("linux,uefi-mmap-desc-ver")), 1);
        assert_eq!(be32(p("linux,uefi-secure-boot")), 0);
        assert_eq!(be64(p("linux,initrd-start")), 0x4800_0000);
        assert_eq!(be64(p("linux,initrd-end")), 0x4810_0000);
        assert_eq!(t.chosen().bootargs(), Some("console=ttyAMA0"));
        // No initrd: no initrd properties.
        let b = stub_fdt("", None, &UEFI).unwrap();
        let t = fdt::Fdt::new(&b).unwrap();
        assert!(t
            .find_node("/chosen")
            .unwrap()
            .property("linux,initrd-start")
            .is_none());
    }

    #[test]
    fn full_dt_has_the_board() {
        let uarts = [layout::CONSOLE_UART, layout::AGENT_UART];
        let b = full_fdt(512 << 20, 2, &uarts, "console=ttyAMA0", None).unwrap();
        let t = fdt::Fdt::new(&b).unwrap();
        let mem: Vec<_> = t.memory().regions().collect();
        assert_eq!(mem.len(), 1);
        assert_eq!(mem[0].starting_address as u64, layout::RAM_START);
        assert_eq!(mem[0].size, Some(512 << 20));
        let cpus: Vec<_> = t.cpus().collect();
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[1].ids().first(), 1);
        assert_eq!(
            cpus[0].property("enable-method").unwrap().as_str(),
            Some("psci")
        );
        let psci = t.find_compatible(&["arm,psci-0.2"]).unwrap();
        assert_eq!(psci.property("method").unwrap().as_str(), Some("hvc"));
        assert!(psci
            .compatible()
            .unwrap()
            .all()
            .any(|c| c == "arm,psci-1.0"));
        let gic = t.find_compatible(&["arm,gic-v3"]).unwrap();
        assert_eq!(gic.interrupt_cells(), Some(3));
        assert!(gic.property("interrupt-controller").is_some());
        let regs: Vec<_> = gic.reg().unwrap().collect();
        assert_eq!(regs[0].starting_address as u64, 0x0800_0000);
        assert_eq!(regs[1].starting_address as u64, 0x080a_0000);
        assert_eq!(regs[1].size, Some(0x4_0000));
        let timer = t.find_compatible(&["arm,armv8-timer"]).unwrap();
        let cells: Vec<u32> = timer
            .property("interrupts")
            .unwrap()
            .value
            .chunks(4)
            .map(be32)
            .collect();
        assert_eq!(cells, vec![1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]);
        let uart = t.find_node("/pl011@9000000").unwrap();
        assert!(uart
            .compatible()
            .unwrap()
            .all()
            .any(|c| c == "arm,primecell"));
        let irq: Vec<u32> = uart
            .property("interrupts")
            .unwrap()
            .value
            .chunks(4)
            .map(be32)
            .collect();
        assert_eq!(irq, vec![0, 1, 1]);
        let clk = t.find_node("/apb-pclk").unwrap();
        let ph = clk.property("phandle").unwrap().as_usize().unwrap() as u32;
        let clocks: Vec<u32> = uart
            .property("clocks")
            .unwrap()
            .value
            .chunks(4)
            .map(be32)
            .collect();
        assert_eq!(clocks, vec![ph, ph]);
        assert_eq!(
            uart.property("clock-names").unwrap().value,
            b"uartclk\0apb_pclk\0"
        );
        assert!(t.find_node("/pl011@9010000").is_some());
        assert_eq!(t.chosen().stdout().unwrap().name, "pl011@9000000");
        assert_eq!(t.chosen().bootargs(), Some("console=ttyAMA0"));
        let root_ip = t.root().property("interrupt-parent").unwrap().as_usize();
        assert_eq!(root_ip, gic.property("phandle").unwrap().as_usize());
    }

    #[test]
    fn oversized_tree_is_refused() {
        let big = "x".repeat(70_000);
        assert!(matches!(
            stub_fdt(&big, None, &UEFI),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(stub_fdt("a\0b", None, &UEFI), Err(Error::Fdt(_))));
    }
}
