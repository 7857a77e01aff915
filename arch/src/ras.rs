//! How memory errors reach a guest of rasvmm's own architecture: the name
//! of its synchronous error, the GHESv2 error sources its HEST describes
//! (in source-id order), and the asynchronous source a report uses when
//! none is named. The encodings themselves are the ras crate's.

use ras::ghes::Notification;

/// The synchronous error, by the name `--poison-report` takes: an SRAR
/// machine check.
#[cfg(target_arch = "x86_64")]
pub const SYNCHRONOUS_ERROR: &str = "mce";
/// The synchronous error, by the name `--poison-report` takes: a
/// synchronous external abort with its CPER record.
#[cfg(target_arch = "aarch64")]
pub const SYNCHRONOUS_ERROR: &str = "sea";

/// The GHESv2 sources, in source-id order.
#[cfg(target_arch = "x86_64")]
pub const GHES_SOURCES: [Notification; 3] = Notification::X86_64;
/// The GHESv2 sources, in source-id order.
#[cfg(target_arch = "aarch64")]
pub const GHES_SOURCES: [Notification; 3] = Notification::AARCH64;

/// The source a GHES report uses when none is named: the NMI on x86 (taken
/// at once, in any context), GSIV on arm64 (its SEA source is synchronous:
/// it reports an access, not news).
#[cfg(target_arch = "x86_64")]
pub const DEFAULT_GHES_SOURCE: Notification = Notification::Nmi;
/// The source a GHES report uses when none is named: the NMI on x86 (taken
/// at once, in any context), GSIV on arm64 (its SEA source is synchronous:
/// it reports an access, not news).
#[cfg(target_arch = "aarch64")]
pub const DEFAULT_GHES_SOURCE: Notification = Notification::Gsiv;

/// Whether `n` is one of this architecture's sources.
pub fn has_source(n: Notification) -> bool {
    GHES_SOURCES.contains(&n)
}
