//! Named, conservative CPU models for guests.
//!
//! A guest is given what KVM supports *and* what its profile allows, never
//! the host's whole feature set: nested under QEMU TCG `-cpu max`, a guest
//! given every supported feature crashed early in boot. The profiles keep the
//! baseline x86-64 features Linux needs, machine-check architecture
//! (MCE/MCA), and the KVM paravirtual leaves (without the features used
//! through hypercalls when the profile is not the host's vendor:
//! `KVM_HYPERCALL_FEATURES`); they drop XSAVE/AVX and leaf 7
//! extensions. The vendor string decides which machine-check decoder the
//! guest uses (Intel's or `mce_severity_amd`).

use kvm_bindings::kvm_cpuid_entry2;

/// CPU vendor presented to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD".
    Amd,
}

impl Vendor {
    fn id(self) -> &'static [u8; 12] {
        match self {
            Vendor::Intel => b"GenuineIntel",
            Vendor::Amd => b"AuthenticAMD",
        }
    }
}

/// A named CPU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuProfile {
    /// Name used on the command line.
    pub name: &'static str,
    /// Vendor string.
    pub vendor: Vendor,
    /// CPUID.1:EAX (family, model, stepping).
    pub signature: u32,
    /// Brand string (leaves 0x80000002..4), at most 48 bytes.
    pub brand: &'static str,
    /// CPUID.80000007H:EBX, the AMD RAS capabilities
    /// (bit 0 McaOverflowRecov, bit 1 SUCCOR, bit 3 ScalableMca).
    pub ras_caps: u32,
}

/// CPUID.1:EDX bits allowed: FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR
/// PGE MCA CMOV PAT PSE36 CLFSH MMX FXSR SSE SSE2 HTT.
const LEAF1_EDX: u32 = bits(&[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26, 28,
]);
/// CPUID.1:ECX bits allowed: SSE3 PCLMULQDQ SSSE3 CX16 SSE4.1 SSE4.2 MOVBE
/// POPCNT TSC-deadline AES RDRAND.
const LEAF1_ECX: u32 = bits(&[0, 1, 9, 13, 19, 20, 22, 23, 24, 25, 30]);
/// CPUID.1:ECX "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX HTT (more than one logical processor).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CPUID.80000001H:ECX: LAHF/SAHF in 64-bit mode, LZCNT.
const EXT1_ECX: u32 = bits(&[0, 5]);
/// CPUID.80000001H:EDX: SYSCALL, NX, LM; on AMD also the leaf 1 mirror bits.
const EXT1_EDX: u32 = bits(&[11, 20, 29]);
const EXT1_EDX_AMD_MIRROR: u32 = 0x0183_f3ff;
/// CPUID.40000001H:EAX, KVM's paravirtual features that the guest uses
/// through hypercalls: PV_UNHALT (KVM_HC_KICK_CPU, the PV spinlocks' kick),
/// PV_SEND_IPI, PV_SCHED_YIELD, HC_MAP_GPA_RANGE. A hypercall is VMCALL on
/// an Intel guest and VMMCALL on an AMD one; the other vendor's instruction
/// traps, and KVM then rewrites it in guest memory (the
/// FIX_HYPERCALL_INSN quirk). That write goes through the guest's page
/// tables and faults on a kernel whose text is read-only: Debian's 7.3
/// kernel, an Intel profile on an AMD host, 2 vCPUs, died with "Fatal
/// exception in interrupt" at VMCALL in kvm_kick_cpu, CR2 in kernel text.
/// So a profile whose vendor is not the host's does not offer them.
const KVM_HYPERCALL_FEATURES: u32 = bits(&[7, 11, 13, 16]);
/// Highest basic leaf presented. Leaves above 7 (topology, XSAVE) are hidden.
const MAX_BASIC_LEAF: u32 = 7;
/// Highest extended leaf presented.
const MAX_EXT_LEAF: u32 = 0x8000_0008;

const fn bits(list: &[u32]) -> u32 {
    let mut v = 0;
    let mut i = 0;
    while i < list.len() {
        v |= 1 << list[i];
        i += 1;
    }
    v
}

/// The profiles rasvmm offers.
pub const PROFILES: &[CpuProfile] = &[
    CpuProfile {
        name: "intel",
        vendor: Vendor::Intel,
        // Family 6, model 0x55 (Skylake-SP), stepping 4.
        signature: 0x0005_0654,
        brand: "rasvmm conservative Intel CPU",
        ras_caps: 0,
    },
    CpuProfile {
        name: "amd",
        vendor: Vendor::Amd,
        // Family 0x17 (0xf + 0x8), model 0x31, stepping 0.
        signature: 0x0083_0f10,
        brand: "rasvmm conservative AMD CPU",
        // SUCCOR and McaOverflowRecov: mce_severity_amd needs SUCCOR to treat
        // a user-mode poison consumption as recoverable.
        ras_caps: 0b11,
    },
];

/// The default profile.
pub const DEFAULT_PROFILE: &str = "intel";

/// Looks a profile up by name.
pub fn profile(name: &str) -> Option<&'static CpuProfile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// Names of all profiles, for error messages.
pub fn profile_names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}

/// Filters KVM's supported CPUID down to `profile` for vCPU `cpu_index` of
/// `cpu_count`. Leaves the profile does not present are removed, so the
/// guest reads them as zero.
pub fn apply(
    profile: &CpuProfile,
    supported: &[kvm_cpuid_entry2],
    cpu_index: u8,
    cpu_count: u8,
) -> Vec<kvm_cpuid_entry2> {
    let mut out = Vec::with_capacity(supported.len());
    let mut host_id = [0u8; 12];
    if let Some(l0) = supported.iter().find(|e| e.function == 0) {
        for (i, w) in [l0.ebx, l0.edx, l0.ecx].iter().enumerate() {
            host_id[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
    }
    let cross_vendor = &host_id != profile.vendor.id();
    for e in supported {
        let mut e = *e;
        match e.function {
            0 => {
                e.eax = e.eax.min(MAX_BASIC_LEAF);
                set_vendor(&mut e, profile.vendor);
            }
            1 => {
                e.eax = profile.signature;
                // APIC ID, logical processor count, CLFLUSH line size (8 x 8 bytes).
                e.ebx = (u32::from(cpu_index) << 24) | (u32::from(cpu_count) << 16) | (8 << 8);
                e.ecx = (e.ecx & LEAF1_ECX) | LEAF1_ECX_HYPERVISOR;
                e.edx &= LEAF1_EDX;
                if cpu_count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            7 if e.index == 0 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x4000_0001 if cross_vendor => e.eax &= !KVM_HYPERCALL_FEATURES,
            0x4000_0000..=0x4000_00ff => {}
            0x8000_0000 => {
                e.eax = e.eax.min(MAX_EXT_LEAF);
                set_vendor(&mut e, profile.vendor);
            }
            0x8000_0001 => {
                e.ecx &= EXT1_ECX;
                let mut mask = EXT1_EDX;
                if profile.vendor == Vendor::Amd {
                    mask |= EXT1_EDX_AMD_MIRROR & LEAF1_EDX;
                }
                e.edx &= mask;
            }
            f @ 0x8000_0002..=0x8000_0004 => {
                let chunk = usize::try_from(f - 0x8000_0002).unwrap_or(0) * 16;
                let [a, b, c, d] = brand_words(profile.brand, chunk);
                (e.eax, e.ebx, e.ecx, e.edx) = (a, b, c, d);
            }
            0x8000_0005 | 0x8000_0006 => {}
            0x8000_0007 => {
                e.eax = 0;
                e.ebx = profile.ras_caps;
                e.ecx = 0;
                e.edx &= 1 << 8; // invariant TSC
            }
            0x8000_0008 => {
                // Keep the address sizes; core count for AMD topology.
                e.eax &= 0xffff;
                e.ebx = 0;
                e.ecx = u32::from(cpu_count.saturating_sub(1));
                e.edx = 0;
            }
            _ => continue,
        }
        out.push(e);
    }
    out
}

/// CPUID.1:EDX MCE (bit 7) and MCA (bit 14).
const LEAF1_EDX_MCE_MCA: u32 = (1 << 7) | (1 << 14);

/// Clears MCE and MCA from leaf 1, for a vCPU without machine-check banks.
pub fn clear_mca(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.edx &= !LEAF1_EDX_MCE_MCA;
    }
}

fn set_vendor(e: &mut kvm_cpuid_entry2, vendor: Vendor) {
    let id = vendor.id();
    let word = |i: usize| u32::from_le_bytes([id[i], id[i + 1], id[i + 2], id[i + 3]]);
    e.ebx = word(0);
    e.edx = word(4);
    e.ecx = word(8);
}

fn brand_words(brand: &str, offset: usize) -> [u32; 4] {
    let mut buf = [0u8; 48];
    let b = brand.as_bytes();
    let n = b.len().min(47);
    buf[..n].copy_from_slice(&b[..n]);
    let mut w = [0u32; 4];
    for (i, v) in w.iter_mut().enumerate() {
        let o = offset + i * 4;
        *v = u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            ..Default::default()
        }
    }

    /// What KVM nested under TCG `-cpu max` offers, roughly: everything.
    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, [0x1f, 0, 0, 0]),
            leaf(1, 0, [0x806f8, 0xff_0800, 0xffff_ffff, 0xffff_ffff]),
            leaf(7, 0, [0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff]),
            leaf(0xb, 0, [1, 1, 0x100, 0]),
            leaf(0xd, 0, [7, 0x340, 0x340, 0]),
            leaf(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            leaf(0x4000_0001, 0, [0xffff_ffff, 0, 0, 0]),
            leaf(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            leaf(0x8000_0001, 0, [0, 0, 0xffff_ffff, 0xffff_ffff]),
            leaf(0x8000_0002, 0, [0; 4]),
            leaf(0x8000_0007, 0, [0, 0xffff_ffff, 0, 0xffff_ffff]),
            leaf(0x8000_0008, 0, [0x3030, 0xffff, 0xff, 0]),
            leaf(0x8000_001e, 0, [0; 4]),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32) -> Option<&kvm_cpuid_entry2> {
        v.iter().find(|e| e.function == f)
    }

    #[test]
    fn intel_profile_hides_xsave_avx_and_high_leaves() {
        let p = profile("intel").unwrap();
        let out = apply(p, &host(), 1, 2);
        let l0 = find(&out, 0).unwrap();
        assert_eq!(l0.eax, 7);
        let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&vendor, b"GenuineIntel");
        let l1 = find(&out, 1).unwrap();
        assert_eq!(l1.eax, 0x0005_0654);
        assert_eq!(l1.ebx >> 24, 1, "APIC ID is the vCPU index");
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
        assert_eq!(
            l1.ecx & (1 << 26 | 1 << 27 | 1 << 28),
            0,
            "no XSAVE/OSXSAVE/AVX"
        );
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & (1 << 7), 0, "MCE");
        assert_ne!(l1.edx & (1 << 14), 0, "MCA");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&out, 7).map(|e| e.ebx), Some(0));
        assert!(find(&out, 0xb).is_none() && find(&out, 0xd).is_none());
        assert!(find(&out, 0x8000_001e).is_none());
        assert!(find(&out, 0x4000_0000).is_some(), "KVM leaves stay");
        // The host of these tests has no vendor: the Intel profile is
        // another vendor's, so no hypercall features.
        assert_eq!(
            find(&out, 0x4000_0001).unwrap().eax,
            !KVM_HYPERCALL_FEATURES
        );
        assert_eq!(find(&out, 0x8000_0000).unwrap().eax, 0x8000_0008);
        assert_eq!(find(&out, 0x8000_0007).unwrap().ebx, 0);
        assert_eq!(find(&out, 0x8000_0008).unwrap().eax, 0x3030);
    }

    #[test]
    fn features_are_never_added_beyond_what_kvm_offers() {
        let mut h = host();
        h[1].ecx = 0;
        h[1].edx = 1 << 7; // only MCE
        let out = apply(profile("intel").unwrap(), &h, 0, 1);
        let l1 = find(&out, 1).unwrap();
        assert_eq!(l1.edx, 1 << 7);
        assert_eq!(l1.ecx, LEAF1_ECX_HYPERVISOR);
    }

    #[test]
    fn amd_profile_has_amd_vendor_and_ras_caps() {
        let out = apply(profile("amd").unwrap(), &host(), 0, 1);
        let l = find(&out, 0x8000_0000).unwrap();
        let vendor: Vec<u8> = [l.ebx, l.edx, l.ecx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&vendor, b"AuthenticAMD");
        assert_eq!(find(&out, 0x8000_0007).unwrap().ebx, 0b11);
        let l1 = find(&out, 1).unwrap();
        assert_eq!(l1.eax >> 8 & 0xf, 0xf);
        assert_eq!((l1.eax >> 20) & 0xff, 0x8, "family 0x17");
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0, "one vCPU");
    }

    #[test]
    fn brand_string_is_spread_over_three_leaves() {
        let out = apply(profile("intel").unwrap(), &host(), 0, 1);
        let e = find(&out, 0x8000_0002).unwrap();
        let s: Vec<u8> = [e.eax, e.ebx, e.ecx, e.edx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&s, b"rasvmm conservat");
    }

    #[test]
    fn mca_can_be_withdrawn() {
        let mut out = apply(profile("intel").unwrap(), &host(), 0, 1);
        clear_mca(&mut out);
        let l1 = find(&out, 1).unwrap();
        assert_eq!(l1.edx & LEAF1_EDX_MCE_MCA, 0);
        assert_ne!(l1.edx & 1, 0, "FPU stays");
    }

    #[test]
    fn unknown_profile_is_none() {
        assert!(profile("max").is_none());
        assert_eq!(profile_names(), vec!["intel", "amd"]);
    }

    #[test]
    fn hypercall_features_only_for_the_host_vendor() {
        let mut h = host();
        let amd = b"AuthenticAMD";
        let word = |i: usize| u32::from_le_bytes([amd[i], amd[i + 1], amd[i + 2], amd[i + 3]]);
        (h[0].ebx, h[0].edx, h[0].ecx) = (word(0), word(4), word(8));
        let kvm = |p| {
            find(&apply(profile(p).unwrap(), &h, 0, 2), 0x4000_0001)
                .unwrap()
                .eax
        };
        assert_eq!(
            kvm("amd"),
            0xffff_ffff,
            "the host's own vendor: all of KVM's"
        );
        assert_eq!(
            kvm("intel") & KVM_HYPERCALL_FEATURES,
            0,
            "VMCALL would trap on AMD"
        );
        assert_eq!(
            kvm("intel") | KVM_HYPERCALL_FEATURES,
            0xffff_ffff,
            "the rest stay"
        );
    }
}
