//! What scenarios may need of the guest kernel: the names the hello
//! carries and scenarios' `requires` use, with their descriptions.

use serde::{Deserialize, Serialize};

/// Something a scenario may need of the guest kernel, found by the agent
/// in the running kernel's /proc, /sys and debugfs (never from its
/// version: distributions backport and configure as they please).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelFeature {
    /// Memory failure handling (CONFIG_MEMORY_FAILURE):
    /// /proc/sys/vm/memory_failure_early_kill.
    MemoryFailure,
    /// The sysctl vm.panic_on_unrecoverable_memory_failure (Linux 7.3).
    PanicSysctl,
    /// x86 machine-check handling (CONFIG_X86_MCE):
    /// /sys/devices/system/machinecheck.
    MachineCheck,
    /// APEI GHES (CONFIG_ACPI_APEI_GHES): the GHES platform driver.
    Ghes,
    /// kexec_file_load(2) (CONFIG_KEXEC_FILE).
    KexecFile,
    /// Kexec HandOver with its debugfs (CONFIG_KEXEC_HANDOVER_DEBUGFS),
    /// enabled (kho=on): /sys/kernel/debug/kho/out.
    Kho,
    /// The hwpoison KHO subtree (guest-kernel-patches/series, not in
    /// upstream Linux): /sys/kernel/debug/kho/out/sub_fdts/hwpoison.
    KhoHwpoison,
    /// hwpoison-inject (CONFIG_HWPOISON_INJECT built in, or its module
    /// loaded): /sys/kernel/debug/hwpoison/corrupt-pfn.
    HwpoisonInject,
    /// ACPI EINJ (CONFIG_ACPI_APEI_EINJ built in, or its module loaded)
    /// bound to the platform's EINJ table: /sys/kernel/debug/apei/einj.
    Einj,
}

impl KernelFeature {
    /// Every feature, in a stable order.
    pub const ALL: [KernelFeature; 9] = [
        KernelFeature::MemoryFailure,
        KernelFeature::PanicSysctl,
        KernelFeature::MachineCheck,
        KernelFeature::Ghes,
        KernelFeature::KexecFile,
        KernelFeature::Kho,
        KernelFeature::KhoHwpoison,
        KernelFeature::HwpoisonInject,
        KernelFeature::Einj,
    ];

    /// The name scenarios use (`requires = ["panic-sysctl"]`).
    pub fn name(self) -> &'static str {
        match self {
            KernelFeature::MemoryFailure => "memory-failure",
            KernelFeature::PanicSysctl => "panic-sysctl",
            KernelFeature::MachineCheck => "machine-check",
            KernelFeature::Ghes => "ghes",
            KernelFeature::KexecFile => "kexec-file",
            KernelFeature::Kho => "kho",
            KernelFeature::KhoHwpoison => "kho-hwpoison",
            KernelFeature::HwpoisonInject => "hwpoison-inject",
            KernelFeature::Einj => "einj",
        }
    }

    /// What it is, for a person reading why a scenario was not applicable.
    pub fn describe(self) -> &'static str {
        match self {
            KernelFeature::MemoryFailure => "memory failure handling (CONFIG_MEMORY_FAILURE)",
            KernelFeature::PanicSysctl => {
                "the sysctl vm.panic_on_unrecoverable_memory_failure (Linux 7.3 and later)"
            }
            KernelFeature::MachineCheck => "x86 machine-check handling (CONFIG_X86_MCE)",
            KernelFeature::Ghes => "APEI GHES (CONFIG_ACPI_APEI_GHES)",
            KernelFeature::KexecFile => "kexec_file_load (CONFIG_KEXEC_FILE)",
            KernelFeature::Kho => {
                "Kexec HandOver (CONFIG_KEXEC_HANDOVER, CONFIG_KEXEC_HANDOVER_DEBUGFS, kho=on)"
            }
            KernelFeature::KhoHwpoison => {
                "the hwpoison KHO subtree (rasvmm's guest-kernel-patches/series, not upstream)"
            }
            KernelFeature::HwpoisonInject => {
                "hwpoison-inject (CONFIG_HWPOISON_INJECT built in or loaded)"
            }
            KernelFeature::Einj => "ACPI EINJ (CONFIG_ACPI_APEI_EINJ built in or loaded)",
        }
    }

    /// The feature a scenario names; the error lists the names.
    pub fn parse(name: &str) -> Result<KernelFeature, String> {
        KernelFeature::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                let all: Vec<&str> = KernelFeature::ALL.iter().map(|f| f.name()).collect();
                format!("unknown kernel feature '{name}' ({})", all.join(", "))
            })
    }
}
