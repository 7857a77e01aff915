//! Puts an x86_64 guest into memory: a Linux bzImage or ELF vmlinux with its
//! initramfs, command line, zero page, e820 map, ACPI tables (with the HEST
//! that describes the GHESv2 error sources) and MP table, or a flat payload;
//! and says where the boot vCPU starts.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use ras::ghes::SourceLayout;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{acpi, board, boot, layout, mptable, regs};

/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors loading a guest.
#[derive(Debug, Error)]
pub enum Error {
    /// A file cannot be read.
    #[error("Cannot read {0} '{1}'")]
    Read(&'static str, String, #[source] std::io::Error),
    /// The kernel is neither a bzImage nor an ELF vmlinux.
    #[error("Kernel '{0}' is not a loadable bzImage or ELF vmlinux")]
    KernelFormat(String, #[source] linux_loader::loader::Error),
    /// The initramfs is larger than guest RAM can hold.
    #[error("Initramfs '{0}' does not fit in guest memory")]
    InitrdTooLarge(String, #[source] boot::Error),
    /// The boot layout cannot be built.
    #[error("Invalid boot configuration")]
    Boot(#[source] boot::Error),
    /// The MP table cannot be built.
    #[error("Cannot describe the vCPUs")]
    MpTable(#[source] mptable::Error),
    /// The boot page tables cannot be written.
    #[error("Cannot write the boot page tables")]
    BootTables(#[source] regs::Error),
    /// Writing into guest memory failed.
    #[error("Failed to write {0} into guest memory")]
    GuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
    /// The ACPI tables cannot be built.
    #[error("Cannot build the ACPI tables")]
    Acpi(#[source] acpi::Error),
}

/// What to boot.
#[derive(Debug, Clone, Copy)]
pub enum Image<'a> {
    /// A flat 64-bit payload entered at its load address.
    Payload {
        /// The code.
        bytes: &'a [u8],
        /// Where it goes and starts.
        load_addr: u64,
    },
    /// A Linux kernel.
    Linux {
        /// bzImage or ELF vmlinux.
        kernel: &'a Path,
        /// Initramfs, if any.
        initramfs: Option<&'a Path>,
        /// Command line.
        cmdline: &'a str,
    },
}

/// The machine the image is loaded for.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// CPUID leaf 1 EAX (signature) and EDX (features), for the MP table.
    pub cpu_signature: (u32, u32),
}

/// A loaded guest.
#[derive(Debug)]
pub struct Loaded {
    /// Where the boot vCPU starts (64-bit mode).
    pub entry: u64,
    /// The GHESv2 error sources the HEST describes (Linux guests only).
    pub ghes_sources: Option<Vec<SourceLayout>>,
    /// Guest pages rasvmm itself reads and writes (ACPI tables, GHES
    /// blocks): never to be poisoned.
    pub firmware: std::ops::Range<u64>,
    /// The EINJ register window's address, if the tables offer EINJ (Linux
    /// guests only; the address the tables give): the VMM traps it there.
    pub einj: Option<u64>,
}

/// Loads `image` into `memory` and writes the boot tables.
pub fn load(memory: &GuestMemoryMmap, image: Image<'_>, m: Machine) -> Result<Loaded, Error> {
    let mpt =
        mptable::build(m.vcpus, m.cpu_signature.0, m.cpu_signature.1).map_err(Error::MpTable)?;
    memory
        .write_slice(&mpt, GuestAddress(layout::EBDA_START))
        .map_err(|e| Error::GuestMemory("MP table", e))?;
    regs::write_boot_tables(memory).map_err(Error::BootTables)?;
    let firmware = layout::ACPI_START..layout::GHES_START + layout::GHES_SIZE;
    match image {
        Image::Payload { bytes, load_addr } => {
            memory
                .write_slice(bytes, GuestAddress(load_addr))
                .map_err(|e| Error::GuestMemory("payload", e))?;
            Ok(Loaded {
                entry: load_addr,
                ghes_sources: None,
                firmware,
                einj: None,
            })
        }
        Image::Linux {
            kernel,
            initramfs,
            cmdline,
        } => {
            let (entry, sources, einj) = load_linux(memory, kernel, initramfs, cmdline, m)?;
            Ok(Loaded {
                entry,
                ghes_sources: Some(sources),
                firmware,
                einj: Some(einj),
            })
        }
    }
}

fn load_linux(
    memory: &GuestMemoryMmap,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    m: Machine,
) -> Result<(u64, Vec<SourceLayout>, u64), Error> {
    let kname = kernel.display().to_string();
    let mut kf = File::open(kernel).map_err(|e| Error::Read("kernel", kname.clone(), e))?;
    let mut magic = [0u8; 4];
    kf.read_exact(&mut magic)
        .map_err(|e| Error::Read("kernel", kname.clone(), e))?;
    let high = Some(GuestAddress(layout::HIGH_RAM_START));
    let (loaded, entry) = if magic == *b"\x7fELF" {
        let r = Elf::load(memory, None, &mut kf, high)
            .map_err(|e| Error::KernelFormat(kname.clone(), e))?;
        let entry = r.kernel_load.0;
        (r, entry)
    } else {
        let r = BzImage::load(memory, None, &mut kf, high)
            .map_err(|e| Error::KernelFormat(kname.clone(), e))?;
        let entry = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
        (r, entry)
    };
    let hdr = loaded.setup_header.as_ref();
    boot::check_cmdline(cmdline, hdr).map_err(Error::Boot)?;
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    memory
        .write_slice(&c, GuestAddress(layout::CMDLINE_START))
        .map_err(|e| Error::GuestMemory("command line", e))?;

    let kernel_end = loaded.kernel_load.0 + loaded.kernel_end;
    let initrd = match initramfs {
        Some(path) => Some(load_initramfs(memory, path, hdr, m.mem_size, kernel_end)?),
        None => None,
    };
    let (sources, ghes_size) = ras::ghes::layout(layout::GHES_START, board::GHES_GSI);
    debug_assert!(ghes_size <= layout::GHES_SIZE);
    let einj = layout::EINJ_START;
    let tables = write_acpi_tables(memory, m.vcpus, &sources, einj)?;
    let acpi_size = tables.size.next_multiple_of(0x1000);
    let e820 = boot::e820_map(
        m.mem_size,
        &[
            (layout::ACPI_START, acpi_size, boot::E820_ACPI),
            (layout::GHES_START, layout::GHES_SIZE, boot::E820_RESERVED),
        ],
    );
    let params = boot::boot_params(&boot::BootSpec {
        hdr,
        cmdline_len: cmdline.len(),
        initrd,
        e820: &e820,
        acpi_rsdp: Some(tables.rsdp),
    })
    .map_err(Error::Boot)?;
    memory
        .write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|e| Error::GuestMemory("zero page", e))?;
    Ok((entry, sources, einj))
}

/// Writes the ACPI tables, with a HEST describing `sources` and an EINJ
/// whose register window is at `einj`.
fn write_acpi_tables(
    memory: &GuestMemoryMmap,
    vcpus: u8,
    sources: &[SourceLayout],
    einj: u64,
) -> Result<acpi::Tables, Error> {
    let hest = ras::ghes::hest(sources, acpi::OEM_ID, acpi::OEM_TABLE_ID);
    let einj = ras::einj::table(einj, acpi::OEM_ID, acpi::OEM_TABLE_ID);
    let tables = acpi::build(&acpi::Platform {
        vcpus,
        ioapic_id: mptable::ioapic_id(vcpus),
        devices: &board::ISA_DEVICES,
        extra: &[hest, einj],
        error_gsi: Some(board::GHES_GSI),
    })
    .map_err(Error::Acpi)?;
    for (addr, bytes) in &tables.blobs {
        memory
            .write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| Error::GuestMemory("ACPI tables", e))?;
    }
    Ok(tables)
}

fn load_initramfs(
    memory: &GuestMemoryMmap,
    path: &Path,
    hdr: Option<&setup_header>,
    mem_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), Error> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| Error::Read("initramfs", name.clone(), e))?;
    let size = f
        .metadata()
        .map_err(|e| Error::Read("initramfs", name.clone(), e))?
        .len();
    let addr = boot::initrd_address(hdr, mem_size, kernel_end, size)
        .map_err(|e| Error::InitrdTooLarge(name.clone(), e))?;
    let written = memory
        .read_volatile_from(
            GuestAddress(addr),
            &mut f,
            usize::try_from(size).unwrap_or(usize::MAX),
        )
        .map_err(|e| Error::GuestMemory("initramfs", e))?;
    if written as u64 != size {
        return Err(Error::Read(
            "initramfs",
            name,
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read"),
        ));
    }
    Ok((addr, size))
}
