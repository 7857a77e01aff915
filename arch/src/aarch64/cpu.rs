//! arm64 CPU models. There is one: the host's CPU as KVM presents it
//! (KVM_ARM_PREFERRED_TARGET); the RAS behaviour rasvmm tests (SEA, GHES)
//! does not depend on the CPU model, unlike x86's machine-check encodings.

/// A named CPU model.
#[derive(Debug, PartialEq, Eq)]
pub struct CpuProfile {
    /// Its name.
    pub name: &'static str,
}

/// The model guests get unless told otherwise.
pub const DEFAULT_PROFILE: &str = "host";

/// Most vCPUs a guest may have (the GIC redistributor area holds 123; eight
/// is what RAS scenarios need and what was measured).
pub const MAX_VCPUS: u8 = 8;

const PROFILES: [CpuProfile; 1] = [CpuProfile { name: "host" }];

/// The model called `name`.
pub fn profile(name: &str) -> Option<&'static CpuProfile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// Every model's name.
pub fn profile_names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_model() {
        assert_eq!(profile("host").map(|p| p.name), Some("host"));
        assert!(profile("amd").is_none());
        assert_eq!(profile_names(), vec!["host"]);
    }
}
