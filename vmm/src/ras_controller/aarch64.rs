//! Memory errors on arm64: a synchronous external abort with a CPER record
//! in the SEA-notified GHESv2 source for an access (`srar`, a consumed
//! sticky page), and a recoverable CPER record through the GSIV source for
//! an asynchronous report (`srao`). Linux reaches memory_failure() from an
//! arm64 memory error only through APEI (drivers/acpi/apei/ghes.c), so
//! every report carries a record.
