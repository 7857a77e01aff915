//! ACPI EINJ (error injection, ACPI 6.5 §18.6): the table rasvmm gives the
//! guest and the firmware side of its injection protocol, so the guest's
//! own tools (Linux's /sys/kernel/debug/apei/einj, and ras-tools or lab
//! scripts over it) drive rasvmm.
//!
//! Every register the table names lives in one MMIO window that rasvmm
//! traps ([`Window`]): the command register that BEGIN_OPERATION,
//! EXECUTE_OPERATION and END_OPERATION write, the read-only registers that
//! GET_TRIGGER_ACTION_TABLE, GET_ERROR_TYPE, CHECK_BUSY_STATUS and
//! GET_COMMAND_STATUS read, SET_ERROR_TYPE's register, the
//! SET_ERROR_TYPE_WITH_ADDRESS data structure (§18.6.4; the OS reads and
//! writes it as memory) and the trigger error action table (§18.6.5).
//!
//! EXECUTE_OPERATION hands the VMM a [`Request`] and sets the busy bit; the
//! VMM [`validate`]s it, acts, and [`Window::complete`]s it with a
//! [`CommandStatus`], which the OS then reads. The error is planted at
//! EXECUTE_OPERATION, so the trigger table has no entries: a memory error
//! surfaces when the memory is next accessed, as on hardware.

use acpi_tables::sdt::Sdt;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bytes::{le32, le64};

/// Injection actions (ACPI 6.5 §18.6.2).
pub mod action {
    /// Begin an injection.
    pub const BEGIN_OPERATION: u8 = 0x0;
    /// The trigger error action table's address.
    pub const GET_TRIGGER_ACTION_TABLE: u8 = 0x1;
    /// Set the error type (ACPI 4 style).
    pub const SET_ERROR_TYPE: u8 = 0x2;
    /// The error types the platform supports.
    pub const GET_ERROR_TYPE: u8 = 0x3;
    /// End an injection.
    pub const END_OPERATION: u8 = 0x4;
    /// Inject the error set up.
    pub const EXECUTE_OPERATION: u8 = 0x5;
    /// Whether the platform is still busy with the operation.
    pub const CHECK_BUSY_STATUS: u8 = 0x6;
    /// The operation's status.
    pub const GET_COMMAND_STATUS: u8 = 0x7;
    /// Set the error type and its address (ACPI 5 style: a data structure).
    pub const SET_ERROR_TYPE_WITH_ADDRESS: u8 = 0x8;
}

/// Injection instructions (ACPI 6.5 §18.6.3).
pub mod instruction {
    /// Read a register (masked) into the output.
    pub const READ_REGISTER: u8 = 0x0;
    /// Write the input (masked) to a register.
    pub const WRITE_REGISTER: u8 = 0x2;
    /// Write the entry's value (masked) to a register.
    pub const WRITE_REGISTER_VALUE: u8 = 0x3;
}

/// Error type: memory correctable (§18.6.4).
pub const MEMORY_CORRECTABLE: u32 = 1 << 3;
/// Error type: memory uncorrectable non-fatal.
pub const MEMORY_UNCORRECTABLE: u32 = 1 << 4;
/// Error type: memory uncorrectable fatal.
pub const MEMORY_FATAL: u32 = 1 << 5;
/// The error types rasvmm offers (GET_ERROR_TYPE).
pub const SUPPORTED_TYPES: u32 = MEMORY_CORRECTABLE | MEMORY_UNCORRECTABLE | MEMORY_FATAL;

/// SET_ERROR_TYPE_WITH_ADDRESS flags: the processor APIC id is valid.
pub const FLAG_APICID: u32 = 1 << 0;
/// Flags: the memory address and range are valid.
pub const FLAG_MEMORY: u32 = 1 << 1;
/// Flags: the PCIe SBDF is valid.
pub const FLAG_PCIE_SBDF: u32 = 1 << 2;
/// Flags: an EINJv2 request (ACPI 6.5 errata), not offered.
pub const FLAG_EINJV2: u32 = 1 << 3;

/// The window's size: one page.
pub const WINDOW_SIZE: u64 = 0x1000;
/// The same, as a length.
const WINDOW_LEN: usize = 0x1000;
const _: () = assert!(WINDOW_SIZE == WINDOW_LEN as u64);
/// Command register: BEGIN/EXECUTE/END_OPERATION write their codes here.
pub const COMMAND: u64 = 0x00;
/// Read-only: the trigger error action table's address.
pub const TRIGGER_TABLE_ADDRESS: u64 = 0x08;
/// SET_ERROR_TYPE's register (ACPI 4 style).
pub const ERROR_TYPE: u64 = 0x10;
/// Read-only: the supported error types.
pub const ERROR_TYPES: u64 = 0x18;
/// Read-only: bit 0 set while an operation is in progress.
pub const BUSY: u64 = 0x20;
/// Read-only: the last operation's [`CommandStatus`].
pub const STATUS: u64 = 0x28;
/// The SET_ERROR_TYPE_WITH_ADDRESS data structure.
pub const PARAMETERS: u64 = 0x40;
/// Bytes of it the OS reads and writes (Linux's struct
/// set_error_type_with_address without EINJv2 components: 48).
pub const PARAMETERS_SIZE: u64 = 0x30;
const PARAMETERS_LEN: usize = 0x30;
const _: () = assert!(PARAMETERS_SIZE == PARAMETERS_LEN as u64);
/// The trigger error action table.
pub const TRIGGER_TABLE: u64 = 0x100;
/// Its size: the 16-byte header, no entries.
const TRIGGER_TABLE_SIZE: u32 = 16;

/// Command codes written to [`COMMAND`].
const CMD_BEGIN: u64 = 1;
const CMD_EXECUTE: u64 = 2;
const CMD_END: u64 = 3;

/// The status of an operation (§18.6.1, command status definition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommandStatus {
    /// The error was injected.
    Success = 0,
    /// Unknown failure: the platform could not inject it.
    UnknownFailure = 1,
    /// Invalid access: the request names something that cannot be injected.
    InvalidAccess = 2,
}

impl CommandStatus {
    /// The name reports and scenarios use (`invalid-access`).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Success => "success",
            CommandStatus::UnknownFailure => "unknown-failure",
            CommandStatus::InvalidAccess => "invalid-access",
        }
    }
}

/// One instruction entry: 32 bytes (§18.6.2).
fn entry(action: u8, instruction: u8, reg: u64, width: u8, value: u64, mask: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0] = action;
    b[1] = instruction;
    // b[2]: flags (PRESERVE_REGISTER not needed), b[3] reserved.
    // Register region: a Generic Address Structure in system memory.
    b[4] = 0; // SystemMemory
    b[5] = width;
    b[6] = 0; // bit offset
    b[7] = match width {
        8 => 1,
        16 => 2,
        32 => 3,
        _ => 4,
    };
    b[8..16].copy_from_slice(&reg.to_le_bytes());
    b[16..24].copy_from_slice(&value.to_le_bytes());
    b[24..32].copy_from_slice(&mask.to_le_bytes());
    b
}

/// The EINJ table for a window at `base` (§18.6.1).
pub fn table(base: u64, oem_id: [u8; 6], oem_table_id: [u8; 8]) -> Sdt {
    use action::*;
    use instruction::*;
    let all = u64::MAX;
    let entries = [
        entry(
            BEGIN_OPERATION,
            WRITE_REGISTER_VALUE,
            base + COMMAND,
            64,
            CMD_BEGIN,
            all,
        ),
        entry(
            GET_TRIGGER_ACTION_TABLE,
            READ_REGISTER,
            base + TRIGGER_TABLE_ADDRESS,
            64,
            0,
            all,
        ),
        entry(
            SET_ERROR_TYPE,
            WRITE_REGISTER,
            base + ERROR_TYPE,
            64,
            0,
            0xffff_ffff,
        ),
        entry(
            GET_ERROR_TYPE,
            READ_REGISTER,
            base + ERROR_TYPES,
            64,
            0,
            0xffff_ffff,
        ),
        entry(
            END_OPERATION,
            WRITE_REGISTER_VALUE,
            base + COMMAND,
            64,
            CMD_END,
            all,
        ),
        entry(
            EXECUTE_OPERATION,
            WRITE_REGISTER_VALUE,
            base + COMMAND,
            64,
            CMD_EXECUTE,
            all,
        ),
        entry(CHECK_BUSY_STATUS, READ_REGISTER, base + BUSY, 64, 0, 1),
        entry(
            GET_COMMAND_STATUS,
            READ_REGISTER,
            base + STATUS,
            64,
            0,
            0xff,
        ),
        // The data structure's first field (the error type) is the register;
        // the OS finds the structure from it.
        entry(
            SET_ERROR_TYPE_WITH_ADDRESS,
            WRITE_REGISTER,
            base + PARAMETERS,
            32,
            0,
            0xffff_ffff,
        ),
    ];
    let mut t = Sdt::new(*b"EINJ", 48, 1, oem_id, oem_table_id, 1);
    // Injection header size: the bytes after the standard header (flags,
    // reserved, entry count).
    t.write_u32(36, 12);
    t.write_u32(44, u32::try_from(entries.len()).unwrap_or(0));
    for e in &entries {
        t.append_slice(e);
    }
    t.update_checksum();
    t
}

/// An injection the OS asked for: the SET_ERROR_TYPE_WITH_ADDRESS data
/// structure as it stood at EXECUTE_OPERATION.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Error type (one bit, §18.6.4).
    pub error_type: u32,
    /// Vendor error type extension structure offset (0: none).
    pub vendor_extension: u32,
    /// Which of the fields below are valid ([`FLAG_MEMORY`], ...).
    pub flags: u32,
    /// Memory address.
    pub memory_address: u64,
    /// Memory address range: a mask of the address bits that matter.
    pub memory_address_range: u64,
}

/// What rasvmm does for a request it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Memory correctable: a corrected error record for the page.
    Correctable,
    /// Memory uncorrectable non-fatal: the page goes bad (sticky); its next
    /// access raises a synchronous error.
    Uncorrectable,
    /// Memory uncorrectable fatal: a fatal error record for the page.
    Fatal,
}

/// An accepted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// What to do.
    pub kind: Kind,
    /// The guest page (its first byte).
    pub page: u64,
}

/// Why a request is refused (the OS reads INVALID_ACCESS for each).
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum Refusal {
    /// Not one memory error type rasvmm offers.
    #[error(
        "error type {0:#x} is not offered (memory correctable 0x8, uncorrectable 0x10, fatal 0x20)"
    )]
    UnsupportedType(u32),
    /// Flags other than the ones a memory error uses, or EINJv2.
    #[error("flags {0:#x} are not supported for a memory error")]
    BadFlags(u32),
    /// The memory address is not marked valid.
    #[error("no memory address (flags {0:#x} lack the memory address bit)")]
    NoAddress(u32),
    /// A vendor extension structure, which rasvmm does not offer.
    #[error("vendor extensions are not offered")]
    VendorExtension,
    /// The range mask leaves a page's address bits free.
    #[error("address range mask {0:#x} is coarser than a page")]
    CoarseRange(u64),
}

/// Page size EINJ's addresses are resolved to.
const PAGE_SIZE: u64 = 4096;

/// Checks a request and says what it asks for; the VMM still checks the
/// page is guest RAM it may make bad.
pub fn validate(r: &Request) -> Result<Planned, Refusal> {
    let kind = match r.error_type {
        MEMORY_CORRECTABLE => Kind::Correctable,
        MEMORY_UNCORRECTABLE => Kind::Uncorrectable,
        MEMORY_FATAL => Kind::Fatal,
        t => return Err(Refusal::UnsupportedType(t)),
    };
    if r.vendor_extension != 0 {
        return Err(Refusal::VendorExtension);
    }
    if r.flags & !(FLAG_MEMORY | FLAG_APICID) != 0 {
        return Err(Refusal::BadFlags(r.flags));
    }
    if r.flags & FLAG_MEMORY == 0 {
        return Err(Refusal::NoAddress(r.flags));
    }
    let page_mask = !(PAGE_SIZE - 1);
    if r.memory_address_range & page_mask != page_mask {
        return Err(Refusal::CoarseRange(r.memory_address_range));
    }
    let page = r.memory_address & r.memory_address_range & page_mask;
    Ok(Planned { kind, page })
}

/// An EXECUTE_OPERATION: the request, and the id its answer must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    /// Which operation of this window (answers to an abandoned one are
    /// ignored).
    pub id: u64,
    /// What the guest asked for.
    pub request: Request,
}

/// The EINJ register window at `base`, as the guest reads and writes it.
#[derive(Debug, Clone)]
pub struct Window {
    base: u64,
    /// Bytes the guest reads: registers, the data structure, the trigger
    /// table.
    image: Vec<u8>,
    /// The operation EXECUTE_OPERATION started and not yet answered.
    in_flight: Option<u64>,
    /// The next operation's id.
    next_id: u64,
}

fn put(image: &mut [u8], off: u64, bytes: &[u8]) {
    let off = usize::try_from(off).unwrap_or(usize::MAX);
    if let Some(d) = off
        .checked_add(bytes.len())
        .and_then(|end| image.get_mut(off..end))
    {
        d.copy_from_slice(bytes);
    }
}

impl Window {
    /// A window at guest-physical `base`.
    pub fn new(base: u64) -> Self {
        let mut image = vec![0u8; WINDOW_LEN];
        put(
            &mut image[..],
            TRIGGER_TABLE_ADDRESS,
            &(base + TRIGGER_TABLE).to_le_bytes(),
        );
        put(
            &mut image[..],
            ERROR_TYPES,
            &u64::from(SUPPORTED_TYPES).to_le_bytes(),
        );
        // Trigger error action table header (§18.6.5): header size, revision,
        // table size, entry count.
        let mut trigger = [0u8; 16];
        trigger[0..4].copy_from_slice(&TRIGGER_TABLE_SIZE.to_le_bytes());
        trigger[8..12].copy_from_slice(&TRIGGER_TABLE_SIZE.to_le_bytes());
        put(&mut image[..], TRIGGER_TABLE, &trigger);
        Self {
            base,
            image,
            in_flight: None,
            next_id: 1,
        }
    }

    /// `len` bytes of the image at `offset`, if they are inside it.
    fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let off = usize::try_from(offset).ok()?;
        self.image.get(off..off.checked_add(len)?)
    }

    /// The window's guest-physical address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// A guest read of `data.len()` bytes at `offset`; outside the window,
    /// zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        match self.bytes(offset, data.len()) {
            Some(s) => data.copy_from_slice(s),
            None => data.fill(0),
        }
    }

    /// Whether an operation is in progress.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    fn set_busy(&mut self, busy: bool) {
        put(&mut self.image[..], BUSY, &u64::from(busy).to_le_bytes());
    }

    /// A guest write of `data` at `offset`. Returns the operation an
    /// EXECUTE_OPERATION starts; the busy bit then stays set until
    /// [`Window::complete`] answers it. A BEGIN_OPERATION while busy (the
    /// OS gave up waiting, Linux after about a second) abandons the
    /// operation in flight: its answer, when it comes, is ignored. Writes
    /// to read-only registers, and to the data structure while busy, are
    /// dropped.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<Operation> {
        let end = offset.checked_add(data.len() as u64)?;
        let writable = |lo: u64, hi: u64| offset >= lo && end <= hi;
        if writable(PARAMETERS, PARAMETERS + PARAMETERS_SIZE)
            || writable(ERROR_TYPE, ERROR_TYPE + 8)
        {
            if !self.busy() {
                put(&mut self.image[..], offset, data);
            }
            return None;
        }
        if offset != COMMAND || data.is_empty() || data.len() > 8 {
            return None;
        }
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        match u64::from_le_bytes(v) {
            CMD_BEGIN => {
                self.in_flight = None;
                self.set_busy(false);
                put(&mut self.image[..], STATUS, &0u64.to_le_bytes());
                None
            }
            CMD_EXECUTE if !self.busy() => {
                let id = self.next_id;
                self.next_id = self.next_id.wrapping_add(1);
                self.in_flight = Some(id);
                self.set_busy(true);
                Some(Operation {
                    id,
                    request: self.request(),
                })
            }
            // END_OPERATION, and EXECUTE while busy: nothing to do.
            _ => None,
        }
    }

    /// The request the SET_ERROR_TYPE_WITH_ADDRESS data structure holds.
    /// (SET_ERROR_TYPE's register, the ACPI 4 form, carries no address: an
    /// OS that uses only it names no memory and is refused.)
    fn request(&self) -> Request {
        let p = self.bytes(PARAMETERS, PARAMETERS_LEN).unwrap_or(&[]);
        let field32 = |o| le32(p, o).unwrap_or(0);
        let field64 = |o| le64(p, o).unwrap_or(0);
        Request {
            error_type: field32(0),
            vendor_extension: field32(4),
            flags: field32(8),
            memory_address: field64(16),
            memory_address_range: field64(24),
        }
    }

    /// Answers operation `id` with `status`, if it is still the one in
    /// flight (an abandoned one's answer is dropped).
    pub fn complete(&mut self, id: u64, status: CommandStatus) {
        if self.in_flight != Some(id) {
            return;
        }
        self.in_flight = None;
        put(&mut self.image[..], STATUS, &(status as u64).to_le_bytes());
        self.set_busy(false);
    }
}

#[cfg(test)]
mod tests;
