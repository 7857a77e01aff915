//! Initial vCPU state for the 64-bit Linux boot protocol: long mode with
//! identity-mapped page tables, a flat GDT, and RSI pointing at the zero
//! page (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

/// Errors programming a vCPU.
#[derive(Debug, Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("Failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing boot tables into guest memory failed.
    #[error("Failed to write {0} into guest memory")]
    GuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
    /// KVM accepted fewer MSRs than given.
    #[error("KVM accepted {0} of {1} boot MSRs")]
    Msrs(usize, usize),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// GDT entries: null, 64-bit code, data, TSS (the layout Linux's own
/// boot code and Firecracker use).
const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes GDT entry `index` into a KVM segment register.
fn segment(index: u8) -> kvm_segment {
    let e = GDT[usize::from(index)];
    let base = ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000);
    let limit_raw = (e & 0xffff) | ((e >> 32) & 0x000f_0000);
    let g = ((e >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: u16::from(index) * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and page tables identity-mapping the first
/// GiB with 2 MiB pages. Shared by all vCPUs.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|e| Error::GuestMemory("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| Error::GuestMemory("IDT", e))?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(|e| Error::GuestMemory("PML4", e))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(|e| Error::GuestMemory("PDPT", e))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(|e| Error::GuestMemory("page directory", e))?;
    }
    Ok(())
}

/// Puts a vCPU in 64-bit mode at `entry` with RSI = zero page.
/// Secondary vCPUs get the same state; Linux keeps them in wait-for-SIPI
/// through the in-kernel LAPIC until the boot CPU starts them.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), Error> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("get special registers", e))?;
    let code = segment(1);
    let data = segment(2);
    let tss = segment(3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(GDT.len() * 8 - 1).unwrap_or(0);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("set special registers", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm("set registers", e))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("set FPU", e))?;

    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Msrs(0, entries.len()))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::Kvm("set MSRs", e))?;
    if set != entries.len() {
        return Err(Error::Msrs(set, entries.len()));
    }
    setup_lapic(vcpu)
}

/// LINT0 takes ExtINT (the PIC), LINT1 delivers NMI, as on a PC.
fn setup_lapic(vcpu: &VcpuFd) -> Result<(), Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(|e| Error::Kvm("get LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = u32::from_le_bytes(bytes);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as std::os::raw::c_char;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::Kvm("set LAPIC", e))
}

/// A vCPU's state for a diagnosis (a triple fault, a deadline): where it
/// was, in what mode, and the event KVM was delivering.
pub fn describe(vcpu: &VcpuFd) -> String {
    let mut s = String::new();
    if let Ok(r) = vcpu.get_regs() {
        s += &format!("rip {:#x} rsp {:#x} rflags {:#x}", r.rip, r.rsp, r.rflags);
    }
    if let Ok(sr) = vcpu.get_sregs() {
        s += &format!(
            " cs {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            sr.cs.selector, sr.cr0, sr.cr3, sr.cr4, sr.efer
        );
    }
    if let Ok(e) = vcpu.get_vcpu_events() {
        let x = e.exception;
        s += &format!(
            "; exception nr {} injected {} pending {} error {:#x}; interrupt nr {} injected {}; nmi injected {} pending {}",
            x.nr, x.injected, x.pending, x.error_code,
            e.interrupt.nr, e.interrupt.injected, e.nmi.injected, e.nmi.pending
        );
    }
    if let Ok(mp) = vcpu.get_mp_state() {
        s += &format!("; mp_state {}", mp.mp_state);
    }
    // Which interrupts the local APIC holds in service and requested: a
    // vector stuck in service blocks every vector of its priority class
    // and below, the guest's timer and devices included.
    if let Ok(l) = vcpu.get_lapic() {
        let bytes: Vec<u8> = l.regs.iter().map(|b| *b as u8).collect();
        let reg = |off: usize| {
            u32::from_le_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]])
        };
        s += &format!(
            "; lapic tpr {:#x} ppr {:#x} isr {:x?} irr {:x?}",
            reg(APIC_TPR),
            reg(APIC_PPR),
            apic_vectors(&bytes, APIC_ISR),
            apic_vectors(&bytes, APIC_IRR)
        );
    }
    s
}

/// Offsets in the local APIC's register page (Intel SDM Vol. 3A, table 11-1).
const APIC_TPR: usize = 0x80;
const APIC_PPR: usize = 0xa0;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;

/// The vectors set in a 256-bit APIC register (ISR, TMR, IRR) at `base` of
/// the register page: eight 32-bit words, 16 bytes apart.
fn apic_vectors(page: &[u8], base: usize) -> Vec<u8> {
    (0..=255u8)
        .filter(|v| {
            let off = base + usize::from(v / 32) * 16;
            page.get(off..off + 4).is_some_and(|w| {
                u32::from_le_bytes([w[0], w[1], w[2], w[3]]) & (1 << (v % 32)) != 0
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_vectors_read_the_256_bit_registers() {
        let mut page = vec![0u8; 1024];
        page[APIC_ISR + 7 * 16 + 2] = 0x40; // vector 0xf6: word 7, bit 22
        page[APIC_IRR] = 0x01; // vector 0
        page[APIC_IRR + 16] = 0x80; // vector 39: word 1, bit 7
        assert_eq!(apic_vectors(&page, APIC_ISR), vec![0xf6]);
        assert_eq!(apic_vectors(&page, APIC_IRR), vec![0, 39]);
        assert!(apic_vectors(&page[..0x100], APIC_IRR).is_empty());
    }

    #[test]
    fn gdt_code_segment_is_64_bit() {
        let cs = segment(1);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(2);
        assert_eq!((ds.l, ds.db, ds.type_, ds.selector), (0, 1, 3, 16));
        assert_eq!(segment(3).type_, 0xb, "busy 64-bit TSS");
    }

    #[test]
    fn identity_map_covers_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }
}
