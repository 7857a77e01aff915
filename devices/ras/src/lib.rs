//! RAS encodings for rasvmm, kept apart from KVM so every bit is unit-tested.
//!
//! - [`mce`]: x86 machine-check bank records (MCi_STATUS, MCi_ADDR,
//!   MCi_MISC, MCG_STATUS) for the errors hardware reports on memory, in the
//!   Intel and AMD encodings Linux 7.3 grades, and MCG_CAP;
//! - [`ledger`]: the poison ledger, which pages are bad and how often the
//!   guest consumed them.

pub mod ledger;
pub mod mce;
