//! arm64 guests booted without firmware.
//!
//! The pure parts (no KVM types) build and are tested on any host:
//! - [`layout`]: the board (GICv3, PL011s, interrupt numbers) and the
//!   firmware area at the start of RAM;
//! - [`fdt`]: the stub device tree of an ACPI boot and the full one of a
//!   device-tree boot;
//! - [`efi`]: the minimal EFI system table and memory map Linux needs to
//!   take ACPI without UEFI firmware;
//! - [`acpi`]: FADT, MADT, GTDT, SPCR, DSDT and the HEST;
//! - [`firmware`]: every blob with its guest address, and the FDT address
//!   the boot vCPU gets in x0;
//! - [`cpu`]: the CPU models.
//!
//! The KVM parts, built on arm64 only:
//! - `loader`: the Image, the initramfs and the firmware blobs in memory;
//! - `regs`: KVM_ARM_VCPU_INIT and the boot register state;
//! - `gic`: the in-kernel GICv3;
//! - `sea`: synchronous external aborts through KVM_SET_VCPU_EVENTS.

pub mod acpi;
pub mod cpu;
pub mod efi;
pub mod fdt;
pub mod firmware;
#[cfg(target_arch = "aarch64")]
pub mod gic;
pub mod layout;
#[cfg(target_arch = "aarch64")]
pub mod loader;
#[cfg(target_arch = "aarch64")]
pub mod regs;
#[cfg(target_arch = "aarch64")]
pub mod sea;
