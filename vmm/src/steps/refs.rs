//! Names bound by earlier steps: the PFNs the guest reported (`page0`,
//! `slab1`, `free12`) and page holders' virtual addresses, resolved when a
//! later step refers to them.

use std::collections::BTreeMap;

use guest_agent::{Command, Payload};

use super::{kind_name, Pages, Target};

/// PFNs the guest reported, by name, and page holders' virtual addresses.
#[derive(Debug, Default)]
pub struct Refs {
    pfns: BTreeMap<String, u64>,
    vaddrs: BTreeMap<String, u64>,
}

/// Most names a run binds.
const MAX_REFS: usize = 8192;

impl Refs {
    /// Binds names from a reply: `pageN` for a page holder, `<kind><i>` (or
    /// `<bind><i>`) for kernel pages.
    pub fn learn(&mut self, cmd: &Command, reply: &Payload, bind: Option<&str>) {
        match (cmd, reply) {
            (_, Payload::Page(p)) => {
                self.bind(format!("page{}", p.page), p.pfn);
                if self.vaddrs.len() < MAX_REFS {
                    self.vaddrs.insert(format!("page{}", p.page), p.vaddr);
                }
            }
            (Command::KernelPages { kind, .. }, Payload::KernelPages(pfns)) => {
                let name = bind.unwrap_or(kind_name(*kind));
                for (i, pfn) in pfns.iter().enumerate() {
                    self.bind(format!("{name}{i}"), *pfn);
                }
            }
            _ => {}
        }
    }

    fn bind(&mut self, name: String, pfn: u64) {
        if self.pfns.len() < MAX_REFS || self.pfns.contains_key(&name) {
            self.pfns.insert(name, pfn);
        }
    }

    /// The PFN a reference names.
    pub fn pfn(&self, t: &Target) -> Result<u64, String> {
        match t {
            Target::Gpa(v) => Ok(*v),
            Target::Ref(name) => self
                .pfns
                .get(name)
                .copied()
                .ok_or_else(|| format!("no earlier step reported '{name}'")),
        }
    }

    /// `cmd` with the references it names resolved: a `page-info` target's
    /// PFN, an `exec` command line's shell variables.
    pub fn resolve(&self, cmd: &Command, pfn: Option<&Target>) -> Result<Command, String> {
        let mut cmd = cmd.clone();
        match (pfn, &mut cmd) {
            (Some(t), Command::PageInfo { pfn: p }) => *p = self.pfn(t)?,
            (_, Command::Exec { sh, env }) => *env = self.shell_vars(sh),
            _ => {}
        }
        Ok(cmd)
    }

    /// The shell variables an `exec` command line names, for every bound
    /// reference: `<name>_pfn` (the PFN) and `<name>_pa` (its physical
    /// address), both in hex (`page0_pa=0x1234000`); a `-` in a name is `_`
    /// in its variables (`page_table0_pa`).
    pub fn shell_vars(&self, sh: &str) -> BTreeMap<String, String> {
        let mut vars = BTreeMap::new();
        for (name, pfn) in &self.pfns {
            let name = name.replace('-', "_");
            let (v_pfn, v_pa) = (format!("{name}_pfn"), format!("{name}_pa"));
            if sh.contains(&v_pfn) {
                vars.insert(v_pfn, format!("{pfn:#x}"));
            }
            if sh.contains(&v_pa) {
                vars.insert(v_pa, format!("{:#x}", pfn.saturating_mul(4096)));
            }
        }
        vars
    }

    /// The virtual address of page holder `name` (`page0`) in its process.
    pub fn vaddr(&self, name: &str) -> Option<u64> {
        self.vaddrs.get(name).copied()
    }

    /// The PFNs of every reference named `prefix` and a number, in
    /// numeric order.
    pub fn prefixed(&self, prefix: &str) -> Vec<u64> {
        let mut found: Vec<(u64, u64)> = self
            .pfns
            .iter()
            .filter_map(|(name, pfn)| {
                let i = name.strip_prefix(prefix)?;
                (!i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| i.parse().ok().map(|i: u64| (i, *pfn)))
                    .flatten()
            })
            .collect();
        found.sort_unstable();
        found.into_iter().map(|(_, pfn)| pfn).collect()
    }

    /// The PFNs `pages` names, each once, in the order given.
    pub fn pages(&self, pages: &[Pages]) -> Result<Vec<u64>, String> {
        let mut out: Vec<u64> = Vec::new();
        for p in pages {
            let pfns = match p {
                Pages::One(t) => vec![self.pfn(t)?],
                Pages::Prefixed(prefix) => match self.prefixed(prefix) {
                    v if v.is_empty() => {
                        return Err(format!("no earlier step reported '{prefix}0'"))
                    }
                    v => v,
                },
            };
            for pfn in pfns {
                if !out.contains(&pfn) {
                    out.push(pfn);
                }
            }
        }
        Ok(out)
    }

    /// The guest-physical addresses `pages` mean, in order, each once (a
    /// number is an address; a reference, its page's first byte).
    pub fn gpas(&self, pages: &[Pages]) -> Result<Vec<u64>, String> {
        let mut out: Vec<u64> = Vec::new();
        for p in pages {
            let gpas = match p {
                Pages::One(t) => vec![self.gpa(t)?],
                other => self
                    .pages(std::slice::from_ref(other))?
                    .into_iter()
                    .filter_map(|pfn| pfn.checked_mul(4096))
                    .collect(),
            };
            for gpa in gpas {
                if !out.contains(&gpa) {
                    out.push(gpa);
                }
            }
        }
        Ok(out)
    }

    /// The PFN bound to `name`.
    pub fn named_pfn(&self, name: &str) -> Option<u64> {
        self.pfns.get(name).copied()
    }

    /// The guest-physical address a target means (a reference: its page).
    pub fn gpa(&self, t: &Target) -> Result<u64, String> {
        match t {
            Target::Gpa(v) => Ok(*v),
            r => self
                .pfn(r)?
                .checked_mul(4096)
                .ok_or_else(|| "PFN out of range".to_string()),
        }
    }
}
