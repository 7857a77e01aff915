//! Guest physical memory layout for x86_64 direct boot.
//!
//! The same layout as Cloud Hypervisor and Firecracker use: low boot
//! structures below 1 MiB, the kernel at 1 MiB, the 32-bit MMIO hole below
//! 4 GiB, and RAM above 4 GiB for large guests.

/// GDT used for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT (the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB = the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line Linux x86 accepts (COMMAND_LINE_SIZE), with its NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP first, inside the BIOS area Linux scans.
pub const ACPI_START: u64 = 0xe_0000;
/// Room for the ACPI tables.
pub const ACPI_SIZE: u64 = 0x1_0000;
/// GHES error source registers and error status blocks (e820-reserved).
pub const GHES_START: u64 = 0xf_0000;
/// Room for the GHES registers and blocks.
pub const GHES_SIZE: u64 = 0x1_0000;
/// Where bzImage protected-mode code and ELF kernels are loaded.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (IOAPIC, LAPIC and room for devices).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The EINJ register window (ACPI error injection: [`ras::einj`]), one
/// page of MMIO that rasvmm traps.
pub const EINJ_START: u64 = 0xfe00_0000;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) just below the IOAPIC's region, inside the hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page, right below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

// The boot structures must not overlap: pinned at compile time.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(KVM_IDENTITY_MAP_ADDRESS + 0x1000 == KVM_TSS_ADDRESS);
const _: () = assert!(EBDA_START + 0x400 <= ACPI_START && ACPI_START + ACPI_SIZE <= GHES_START);
const _: () = assert!(GHES_START + GHES_SIZE <= HIGH_RAM_START);
const _: () =
    assert!(EINJ_START >= MMIO_HOLE_START && EINJ_START + ras::einj::WINDOW_SIZE <= IOAPIC_START);
const _: () =
    assert!(KVM_TSS_ADDRESS >= MMIO_HOLE_START && KVM_TSS_ADDRESS + 0x3000 <= MMIO_HOLE_END);

/// The guest RAM regions (start, length) for `mem_size` bytes of RAM.
///
/// RAM up to the MMIO hole is mapped 1:1; the rest continues at 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_regions(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, 1 << 30)]
        );
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let pages = [ZERO_PAGE_START, PML4_START, PDPTE_START, PDE_START];
        for (i, a) in pages.iter().enumerate() {
            for b in &pages[i + 1..] {
                assert!(a + 0x1000 <= *b || b + 0x1000 <= *a);
            }
        }
    }
}
