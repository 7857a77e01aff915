//! The arm64 board and its guest physical memory layout.
//!
//! A QEMU-virt-like board, so that the same blobs can be checked under
//! `qemu-system-aarch64 -M virt,gic-version=3`: the GICv3 distributor and
//! redistributors, the console PL011 where QEMU has its UART, and RAM from
//! 1 GiB. The first 2 MiB of RAM hold what firmware would: the device tree,
//! the EFI system table and memory map, the ACPI tables and the GHES error
//! status blocks; the kernel Image follows at 2 MiB.
//!
//! Interrupt numbers: a GIC INTID is what the guest's tables name (ACPI
//! GSIV = INTID; a DT `interrupts` cell holds the SPI or PPI number);
//! KVM's arm irqfd GSI n is SPI n, INTID n + 32 (the default routing of
//! kvm_vgic_setup_default_irq_routing). [`Slot::spi`] is what to register.

/// Start of guest RAM.
pub const RAM_START: u64 = 0x4000_0000;
/// The GICv3 distributor.
pub const GIC_DIST_START: u64 = 0x0800_0000;
/// Size of the distributor's frame.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// The first GICv3 redistributor; one frame pair per vCPU follows.
pub const GIC_REDIST_START: u64 = 0x080A_0000;
/// One vCPU's redistributor (RD_base and SGI_base frames).
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
/// The most vCPUs rasvmm gives an arm64 guest (123 would fit below the UART).
pub const MAX_VCPUS: u8 = 8;

/// Offset between a GIC SPI number and its INTID.
pub const SPI_BASE: u32 = 32;
/// Offset between a GIC PPI number and its INTID.
pub const PPI_BASE: u32 = 16;

/// A device window on the MMIO bus and the SPI it raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// First MMIO address.
    pub base: u64,
    /// Bytes of MMIO space.
    pub len: u64,
    /// Its SPI number: the KVM irqfd GSI to register.
    pub spi: u32,
}

impl Slot {
    /// The GIC INTID (the ACPI GSIV).
    pub const fn intid(&self) -> u32 {
        self.spi + SPI_BASE
    }
}

/// The console PL011 (ttyAMA0), where QEMU virt has its UART.
pub const CONSOLE_UART: Slot = Slot {
    base: 0x0900_0000,
    len: 0x1000,
    spi: 1,
};

/// The guest agent's PL011 (ttyAMA1). QEMU virt has its PL031 RTC here.
pub const AGENT_UART: Slot = Slot {
    base: 0x0901_0000,
    len: 0x1000,
    spi: 2,
};

/// The EINJ register window (ACPI error injection: [`ras::einj`]), one
/// page of MMIO that rasvmm traps. QEMU virt has fw-cfg here.
pub const EINJ_START: u64 = 0x0902_0000;

/// The SPI of the Generic Event Device that notifies GSIV-signalled GHES
/// sources (INTID 35).
pub const GHES_SPI: u32 = 3;

/// Architected timer PPIs (QEMU virt's; the INTIDs are 16 more).
pub const TIMER_PPI_SECURE: u32 = 13;
/// Non-secure EL1 physical timer PPI.
pub const TIMER_PPI_NONSECURE: u32 = 14;
/// EL1 virtual timer PPI.
pub const TIMER_PPI_VIRTUAL: u32 = 11;
/// EL2 (hypervisor) physical timer PPI.
pub const TIMER_PPI_HYP: u32 = 10;

/// The flattened device tree: x0 at the kernel's entry.
pub const FDT_START: u64 = RAM_START;
/// Room for the device tree.
pub const FDT_MAX_SIZE: u64 = 0x1_0000;
/// EFI system table, its configuration tables, vendor string and the EFI
/// memory map.
pub const EFI_START: u64 = RAM_START + 0x1_0000;
/// Room for the EFI structures.
pub const EFI_SIZE: u64 = 0x1_0000;
/// ACPI tables, the RSDP first.
pub const ACPI_START: u64 = RAM_START + 0x2_0000;
/// Room for the ACPI tables.
pub const ACPI_SIZE: u64 = 0x1_0000;
/// GHES error source registers and error status blocks (EfiACPIMemoryNVS).
pub const GHES_START: u64 = RAM_START + 0x4_0000;
/// Room for the GHES registers and blocks.
pub const GHES_SIZE: u64 = 0x1_0000;
/// The firmware area: the first 2 MiB of RAM.
pub const FIRMWARE_SIZE: u64 = 0x20_0000;
/// Where the kernel Image goes (2 MiB aligned, as arm64's boot protocol
/// asks: Documentation/arch/arm64/booting.rst).
pub const KERNEL_START: u64 = RAM_START + FIRMWARE_SIZE;

const _: () = assert!(FDT_START + FDT_MAX_SIZE <= EFI_START);
const _: () = assert!(EFI_START + EFI_SIZE <= ACPI_START);
const _: () = assert!(ACPI_START + ACPI_SIZE <= GHES_START);
const _: () = assert!(GHES_START + GHES_SIZE <= KERNEL_START);
const _: () = assert!(KERNEL_START.is_multiple_of(0x20_0000));
const _: () = assert!(GIC_DIST_START + GIC_DIST_SIZE <= GIC_REDIST_START);
const _: () =
    assert!(GIC_REDIST_START + GIC_REDIST_SIZE_PER_CPU * MAX_VCPUS as u64 <= CONSOLE_UART.base);
const _: () = assert!(CONSOLE_UART.base + CONSOLE_UART.len <= AGENT_UART.base);
const _: () = assert!(AGENT_UART.base + AGENT_UART.len <= EINJ_START);
const _: () = assert!(EINJ_START + ras::einj::WINDOW_SIZE <= RAM_START);

/// Bytes of redistributor space for `vcpus` vCPUs.
pub const fn gic_redist_size(vcpus: u8) -> u64 {
    GIC_REDIST_SIZE_PER_CPU * vcpus as u64
}

/// The MPIDR_EL1 affinity of vCPU `index` as the tables describe it
/// (MADT GICC, DT `cpu@N` reg): KVM's default for vcpu_id `index`
/// (arch/arm64/kvm/sys_regs.c reset_mpidr: Aff0 = id[3:0], Aff1 = id[11:4]),
/// so Aff0 = index for the 8 vCPUs rasvmm allows and the VMM need not set
/// MPIDR_EL1. A VMM that does set it must write exactly this (bit 31, RES1,
/// is added by the hardware view and not compared).
pub const fn mpidr(index: u8) -> u64 {
    let i = index as u64;
    (i & 0xf) | (((i >> 4) & 0xff) << 8)
}

/// The guest RAM regions (start, length) for `mem_size` bytes of RAM: one,
/// from [`RAM_START`].
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    vec![(RAM_START, mem_size)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_numbers() {
        assert_eq!(CONSOLE_UART.intid(), 33);
        assert_eq!(AGENT_UART.intid(), 34);
        assert_eq!(GHES_SPI + SPI_BASE, 35);
        assert_eq!(
            [
                TIMER_PPI_SECURE,
                TIMER_PPI_NONSECURE,
                TIMER_PPI_VIRTUAL,
                TIMER_PPI_HYP
            ]
            .map(|p| p + PPI_BASE),
            [29, 30, 27, 26]
        );
    }

    #[test]
    fn mpidr_follows_kvm() {
        assert_eq!(mpidr(0), 0);
        assert_eq!(mpidr(7), 7);
        assert_eq!(mpidr(17), 0x101);
    }

    #[test]
    fn redistributors_fit_below_the_uart() {
        // 123 vCPUs' frames fit between the redistributor base and the UART.
        assert!(GIC_REDIST_START + gic_redist_size(123) <= CONSOLE_UART.base);
        assert!(GIC_REDIST_START + gic_redist_size(124) > CONSOLE_UART.base);
        assert_eq!(ram_regions(512 << 20), vec![(RAM_START, 512 << 20)]);
    }
}
