//! arm64 guests booted without firmware: the board and the boot blobs.
//!
//! Everything here is pure (no KVM types), so it builds and is tested on
//! any host:
//! - [`layout`]: the board (GICv3, PL011s, interrupt numbers) and the
//!   firmware area at the start of RAM;
//! - [`fdt`]: the stub device tree of an ACPI boot and the full one of a
//!   device-tree boot;
//! - [`efi`]: the minimal EFI system table and memory map Linux needs to
//!   take ACPI without UEFI firmware;
//! - [`acpi`]: FADT, MADT, GTDT, SPCR, DSDT and the HEST;
//! - [`firmware`]: the one call the VMM makes: every blob with its guest
//!   address, and the FDT address the boot vCPU gets in x0.

pub mod acpi;
pub mod efi;
pub mod fdt;
pub mod firmware;
pub mod layout;
