//! RAS encodings for rasvmm, kept apart from KVM so every bit is unit-tested.
//!
//! - [`bytes`]: bounds-checked integer readers for the parsers;
//! - [`mce`]: x86 machine-check bank records (MCi_STATUS, MCi_ADDR,
//!   MCi_MISC, MCG_STATUS) for the errors hardware reports on memory, in the
//!   Intel and AMD encodings Linux 7.3 grades, and MCG_CAP;
//! - [`cper`]: UEFI CPER memory-error records (generic error status block,
//!   data entry, memory error section) and the validator for raw records;
//! - [`einj`]: the ACPI EINJ table and the firmware side of its injection
//!   protocol, for the guest's own injection tools;
//! - [`ghes`]: the HEST's GHESv2 error sources and the firmware side of
//!   their read-ack protocol;
//! - [`kho`]: the guest's KHO root FDT, its kexec count and its hwpoison
//!   list, parsed from bytes copied out of guest memory (hostile input);
//! - [`ledger`]: the poison ledger, which pages are bad and how often the
//!   guest consumed them.

pub mod bytes;
pub mod cper;
pub mod einj;
pub mod ghes;
pub mod kho;
pub mod ledger;
pub mod mce;
