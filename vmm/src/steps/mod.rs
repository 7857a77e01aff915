//! Steps of a run: agent requests, machine-check injections, poisoning and
//! waits, in order, with references to pages the guest reported earlier.
//!
//! Text form (the CLI's `--step`):
//!
//! | step | meaning |
//! |---|---|
//! | `exec:<sh>` | run a shell command in the guest |
//! | `alloc-page` | start page holder N; its PFN becomes `pageN` |
//! | `touch-page:<n>[:write]` | page holder n reads (writes) its page |
//! | `spin-page:<n>` | page holder n reads its page without pause until a SIGBUS (at most a minute); returns at once |
//! | `kernel-pages:<slab\|reserved\|page-table\|free>:<count>[:stride=<n>][:as=<name>][:poison]` | find kernel (or free) pages, at least `n` PFNs apart; they become `slab0`, `slab1`, ... (`<name>0`, ...); `poison` (free pages): the guest poisons each with hwpoison-inject as it finds it, and the ledger follows |
//! | `guest-poison:<corrupt\|unpoison>:<page>[,<page>...]` | the guest poisons (unpoisons) pages itself with hwpoison-inject; a page is a PFN, a reference or `<name>*` (every `<name><i>`); the ledger follows |
//! | `host-poison:<page>[,<page>...]` | make the host memory under guest pages fail, as the host would see it: a helper process finds each page's host frame in rasvmm's /proc/PID/pagemap and poisons it through the host's /sys/kernel/debug/hwpoison/corrupt-pfn (needs root); a page is an address, a reference or `<name>*` |
//! | `host-poison:vmm` | the same for a page of rasvmm's own memory, outside guest RAM |
//! | `page-info:<pfn\|ref>` | kpageflags and HardwareCorrupted for a page |
//! | `sysctl:<name>[=<value>]` | read or set a sysctl |
//! | `rasdaemon[:<events>]` | read what rasdaemon recorded (the rasdaemon guest image), once its output shows `events` recorded events (at most 10 s) |
//! | `poweroff` | power the guest off |
//! | `forge-kho:<bad-magic\|overfull\|huge-blob\|wild-pointer\|consistent>` | test only: the agent writes a forged KHO root into its own memory: kexec count 1000 with a broken hwpoison subtree, or (`consistent`) a valid one with kexec count u32::MAX listing PFN 0x1234 |
//! | `forge-kho:bare-roots[:<n>]` | test only: the agent writes n (default 16, at most 256) bare KHO roots into the lowest-addressed pages it can get |
//! | `kho-corrupt:<edit>[:<edit>...]` | rewrite the running kernel's real (pinned) hwpoison blob in guest memory; edits: `append=<u64>[,<u64>...]` (raw entries), `beyond-ram`, `wrap`, `duplicate`, `bad-type[=<t>]`, `version=<n>`, `flags=<n>`, `nr=<n>`, `seq=<n>`, `move-to=<gpa\|last-page>` |
//! | `kexec[:<append>]` | kexec the guest into /boot/bzImage (same command line, plus `append`); later steps wait for the new kernel's agent |
//! | `kexec-load[:<append>]`, `kexec-reboot` | `kexec` in two steps: load the next kernel, and (after steps that must come once the load's own allocations are done) reboot into it |
//! | `inject:<srar\|srao\|ucna>:<gpa\|ref>[:vcpu=<n>][:local]` | report a memory error |
//! | `poison:<gpa\|ref>` | make a page bad: every later access raises SRAR |
//! | `ghes-memory:<recoverable\|corrected\|fatal>:<gpa\|ref>[:source=<nmi\|gsiv\|polled>][:threshold][:vcpu=<n>]` | report a CPER memory error through a GHES error source (default: NMI on x86_64, GSIV on aarch64; `sea` too on aarch64) |
//! | `ghes-raw:<nmi\|gsiv\|polled>:<hex>` | report a raw CPER record (validated first) |
//! | `kho-scan` | read the guest's own poison list from its KHO state and compare it with the ledger |
//! | `wait:<ms>` | let the guest run |
//! | `wait-console:<text>` | wait until a console line of the current boot contains `text` (at most 128 bytes) |
//! | `wait-boot:<n>` | with `--on-reboot restart`: wait until boot n (2 is the first reboot's) is up and its agent said hello |
//!
//! A reference names a PFN; where an address is meant it stands for the
//! page's first byte. Agent commands may also be given as JSON.
//!
//! Grammar shared by every number rasvmm reads from users (steps, control
//! API words, command-line options): [`number`], decimal digits or `0x` and
//! hex digits, nothing else (no sign, no underscore, no whitespace). Steps
//! refuse control characters (NUL included) anywhere, JSON escapes too.

use std::time::Duration;

use guest_agent::{Command, GuestPoisonOp, KernelFeature, KernelPageKind};
use ras::cper::Severity;
use ras::ghes::Notification;
use ras::kho::corrupt::Edit;
use ras::mce::MemoryError;
use serde::Serialize;
use thiserror::Error;

/// Longest text a `wait-console` step waits for.
const MAX_WAIT_TEXT: usize = 128;

/// Longest `wait` step.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A step that does not parse.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("Bad step '{step}': {why}")]
pub struct ParseError {
    /// The step as given.
    pub step: String,
    /// What is wrong.
    pub why: String,
}

/// A page: a guest-physical address, or a reference to a reported PFN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// A literal guest-physical address.
    Gpa(u64),
    /// A name bound by an earlier step (`page0`, `slab1`).
    Ref(String),
}

/// Pages named in a step that takes several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pages {
    /// One page.
    One(Target),
    /// Every reference whose name is this prefix and a number (`free*`).
    Prefixed(String),
}

/// Parses `<page>[,<page>...]`: targets, or `<name>*` for every reference
/// `<name><i>`.
fn page_list(list: &str) -> Option<Vec<Pages>> {
    list.split(',')
        .map(|p| match p.strip_suffix('*') {
            Some(prefix) => target(prefix)
                .filter(|t| matches!(t, Target::Ref(_)))
                .map(|_| Pages::Prefixed(prefix.to_string())),
            None => target(p).map(Pages::One),
        })
        .collect()
}

/// Whose memory a `host-poison` step makes fail on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPoisonTarget {
    /// The host frames behind these guest pages (a number is a
    /// guest-physical address).
    Guest(Vec<Pages>),
    /// A page of rasvmm's own, outside guest RAM.
    Vmm,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An agent request. For `page-info`, `pfn` overrides the command's PFN.
    Agent {
        /// The request.
        cmd: Command,
        /// A reference to resolve into the PFN, for `page-info`.
        pfn: Option<Target>,
        /// The name the reply's pages are bound under, for `kernel-pages`
        /// (default: the kind's name).
        bind: Option<String>,
    },
    /// A machine-check injection.
    Inject {
        /// What to report.
        error: MemoryError,
        /// Where.
        target: Target,
        /// Which vCPU.
        vcpu: u8,
        /// LMCE instead of broadcast.
        local: bool,
    },
    /// Poison a page.
    Poison(Target),
    /// A CPER memory error through a GHES error source.
    GhesMemory {
        /// Severity.
        severity: Severity,
        /// Where.
        target: Target,
        /// Which source.
        source: Notification,
        /// Corrected: the error threshold was exceeded.
        threshold: bool,
        /// The vCPU that takes the NMI.
        vcpu: u8,
    },
    /// A raw CPER record through a GHES error source.
    GhesRaw {
        /// Which source.
        source: Notification,
        /// The record.
        record: Vec<u8>,
    },
    /// Poison or unpoison pages from inside the guest (hwpoison-inject).
    GuestPoison {
        /// What to do.
        op: GuestPoisonOp,
        /// Which pages.
        pages: Vec<Pages>,
    },
    /// Make host memory fail under rasvmm, from outside it: a helper
    /// process poisons the host frames with the host kernel's
    /// hwpoison-inject.
    HostPoison(HostPoisonTarget),
    /// Read the guest's KHO state.
    KhoScan,
    /// Rewrite the running kernel's hwpoison blob.
    KhoCorrupt(Vec<Edit>),
    /// Let the guest run.
    Wait(Duration),
    /// Wait until boot n's agent is up.
    WaitBoot(u32),
    /// Wait until a console line of the current boot contains this.
    WaitConsole(String),
    /// `if <feature>: <step>`: the step, on a guest kernel that offers the
    /// feature (by its agent's hello); on one that does not, nothing, and
    /// the step's record says so. Where kernels differ, a scenario does
    /// what each one can.
    When {
        /// What the kernel must offer.
        feature: KernelFeature,
        /// The step to perform then (never another `if`).
        step: Box<Step>,
    },
}

/// Parses one step.
pub fn parse(s: &str) -> Result<Step, ParseError> {
    let bad = |why: &str| ParseError {
        step: s.into(),
        why: why.into(),
    };
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(bad(&format!("control character {c:?} in a step")));
    }
    if let Some(rest) = s.strip_prefix("if ") {
        let (name, step) = rest
            .split_once(": ")
            .ok_or_else(|| bad("a condition is 'if <kernel feature>: <step>'"))?;
        let feature = KernelFeature::parse(name).map_err(|e| bad(&e))?;
        if step.starts_with("if ") {
            return Err(bad("conditions do not nest"));
        }
        return Ok(Step::When {
            feature,
            step: Box::new(parse(step)?),
        });
    }
    if s.trim_start().starts_with('{') || s.trim_start().starts_with('"') {
        let value: serde_json::Value = serde_json::from_str(s).map_err(|e| bad(&e.to_string()))?;
        if has_control(&value) {
            return Err(bad("control character in a JSON string"));
        }
        let cmd: Command = serde_json::from_value(value).map_err(|e| bad(&e.to_string()))?;
        return Ok(Step::Agent {
            cmd,
            pfn: None,
            bind: None,
        });
    }
    let (verb, arg) = match s.split_once(':') {
        Some((v, a)) => (v, Some(a)),
        None => (s, None),
    };
    let agent = |cmd| {
        Ok(Step::Agent {
            cmd,
            pfn: None,
            bind: None,
        })
    };
    match (verb, arg) {
        ("exec", Some(sh)) if !sh.trim().is_empty() => agent(Command::Exec {
            sh: sh.into(),
            env: Default::default(),
        }),
        ("alloc-page", None) => agent(Command::AllocPage),
        ("rasdaemon", None) => agent(Command::Rasdaemon { at_least: 0 }),
        ("rasdaemon", Some(n)) => {
            let at_least = number(n)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad("expected rasdaemon[:<rows>]"))?;
            agent(Command::Rasdaemon { at_least })
        }
        ("touch-page", Some(a)) => {
            let (n, write) = match a.split_once(':') {
                Some((n, "write")) => (n, true),
                Some(_) => return Err(bad("expected touch-page:<n>[:write]")),
                None => (a, false),
            };
            let page = u32::try_from(number(n).ok_or_else(|| bad("expected a page number"))?)
                .map_err(|_| bad("page index too large"))?;
            agent(Command::TouchPage { page, write })
        }
        ("spin-page", Some(n)) => {
            let page = u32::try_from(number(n).ok_or_else(|| bad("expected a page number"))?)
                .map_err(|_| bad("page index too large"))?;
            agent(Command::SpinPage { page })
        }
        ("kernel-pages", Some(a)) => {
            let usage = "expected kernel-pages:<kind>:<count>[:stride=<n>][:as=<name>][:poison (free pages only)]";
            let mut parts = a.split(':');
            let (Some(kind), Some(count)) = (parts.next(), parts.next()) else {
                return Err(bad(usage));
            };
            let kind =
                kind_of(kind).ok_or_else(|| bad("kind is slab, reserved, page-table or free"))?;
            let count = number(count)
                .and_then(|c| u32::try_from(c).ok())
                .ok_or_else(|| bad("expected a count"))?;
            let (mut stride, mut bind, mut poison) = (0, None, false);
            for opt in parts {
                if opt == "poison" && kind == KernelPageKind::Free {
                    poison = true;
                    continue;
                }
                match opt.split_once('=') {
                    Some(("stride", n)) => {
                        stride = number(n)
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| bad("expected stride=<n>"))?
                    }
                    Some(("as", name)) => match target(name) {
                        Some(Target::Ref(_)) if !name.ends_with(|c: char| c.is_ascii_digit()) => {
                            bind = Some(name.to_string())
                        }
                        _ => return Err(bad("as=<name>: a lowercase name not ending in a digit")),
                    },
                    _ => return Err(bad(usage)),
                }
            }
            Ok(Step::Agent {
                cmd: Command::KernelPages {
                    kind,
                    count,
                    stride,
                    poison,
                },
                pfn: None,
                bind,
            })
        }
        ("guest-poison", Some(a)) => {
            let (op, list) = a
                .split_once(':')
                .ok_or_else(|| bad("expected guest-poison:<corrupt|unpoison>:<pages>"))?;
            let op = match op {
                "corrupt" => GuestPoisonOp::Corrupt,
                "unpoison" => GuestPoisonOp::Unpoison,
                _ => return Err(bad("the operation is corrupt or unpoison")),
            };
            let pages = page_list(list).ok_or_else(|| {
                bad("pages are PFNs, references or <name>* (every reference starting so)")
            })?;
            Ok(Step::GuestPoison { op, pages })
        }
        ("host-poison", Some("vmm")) => Ok(Step::HostPoison(HostPoisonTarget::Vmm)),
        ("host-poison", Some(list)) => {
            let pages = page_list(list).ok_or_else(|| {
                bad("pages are addresses, references or <name>* (every reference starting so), or vmm")
            })?;
            Ok(Step::HostPoison(HostPoisonTarget::Guest(pages)))
        }
        ("page-info", Some(a)) => {
            match target(a).ok_or_else(|| bad("expected a PFN or a reference"))? {
                Target::Gpa(pfn) => agent(Command::PageInfo { pfn }),
                r => Ok(Step::Agent {
                    cmd: Command::PageInfo { pfn: 0 },
                    pfn: Some(r),
                    bind: None,
                }),
            }
        }
        ("sysctl", Some(a)) => {
            let (name, value) = match a.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (a, None),
            };
            if name.is_empty() {
                return Err(bad("missing sysctl name"));
            }
            agent(Command::Sysctl {
                name: name.into(),
                value,
            })
        }
        ("poweroff", None) => agent(Command::Poweroff),
        ("forge-kho", Some(a)) => {
            let (d, count) = match a.split_once(':') {
                Some((d, n)) => (
                    d,
                    Some(
                        number(n)
                            .and_then(|n| u32::try_from(n).ok())
                            .filter(|n| (1..=guest_agent::MAX_FORGED_ROOTS).contains(n))
                            .ok_or_else(|| bad("count is 1 to 256"))?,
                    ),
                ),
                None => (a, None),
            };
            let defect = serde_json::from_value(serde_json::Value::String(d.into())).map_err(|_| {
                bad("defect is bad-magic, overfull, huge-blob, wild-pointer, consistent or bare-roots")
            })?;
            if count.is_some() && defect != guest_agent::KhoDefect::BareRoots {
                return Err(bad("only bare-roots takes a count"));
            }
            agent(Command::ForgeKho { defect, count })
        }
        ("kexec", None) => agent(Command::Kexec { append: None }),
        ("kexec-load", None) => agent(Command::KexecLoad { append: None }),
        ("kexec" | "kexec-load", Some(a))
            if !a.trim().is_empty() && a.len() <= guest_agent::MAX_KEXEC_APPEND =>
        {
            let append = Some(a.to_string());
            agent(match verb {
                "kexec" => Command::Kexec { append },
                _ => Command::KexecLoad { append },
            })
        }
        ("kexec-reboot", None) => agent(Command::KexecReboot),
        ("inject", Some(a)) => {
            let mut parts = a.split(':');
            let error = parts
                .next()
                .and_then(MemoryError::parse)
                .ok_or_else(|| bad("error is srar, srao or ucna"))?;
            let target = parts
                .next()
                .and_then(target)
                .ok_or_else(|| bad("expected an address or a reference"))?;
            let (mut vcpu, mut local) = (0, false);
            for opt in parts {
                match opt.split_once('=') {
                    Some(("vcpu", n)) => {
                        vcpu = number(n)
                            .and_then(|v| u8::try_from(v).ok())
                            .ok_or_else(|| bad("vcpu takes a vCPU index"))?;
                    }
                    None if opt == "local" => local = true,
                    _ => return Err(bad("options are vcpu=<n> and local")),
                }
            }
            Ok(Step::Inject {
                error,
                target,
                vcpu,
                local,
            })
        }
        ("ghes-memory", Some(a)) => {
            let mut parts = a.split(':');
            let severity = parts
                .next()
                .and_then(Severity::parse)
                .filter(|s| *s != Severity::Informational)
                .ok_or_else(|| bad("severity is recoverable, corrected or fatal"))?;
            let target = parts
                .next()
                .and_then(target)
                .ok_or_else(|| bad("expected an address or a reference"))?;
            let (mut source, mut threshold, mut vcpu) = (arch::ras::DEFAULT_GHES_SOURCE, false, 0);
            for opt in parts {
                match opt.split_once('=') {
                    Some(("source", n)) => {
                        source = Notification::parse(n)
                            .ok_or_else(|| bad("source is nmi, gsiv or polled"))?;
                    }
                    Some(("vcpu", n)) => {
                        vcpu = number(n)
                            .and_then(|v| u8::try_from(v).ok())
                            .ok_or_else(|| bad("vcpu takes a vCPU index"))?;
                    }
                    None if opt == "threshold" => threshold = true,
                    _ => {
                        return Err(bad(
                            "options are source=<nmi|gsiv|polled>, threshold and vcpu=<n>",
                        ))
                    }
                }
            }
            if threshold && severity != Severity::Corrected {
                return Err(bad("threshold applies to corrected errors"));
            }
            Ok(Step::GhesMemory {
                severity,
                target,
                source,
                threshold,
                vcpu,
            })
        }
        ("ghes-raw", Some(a)) => {
            let (source, hex) = a
                .split_once(':')
                .ok_or_else(|| bad("expected ghes-raw:<source>:<hex>"))?;
            let source =
                Notification::parse(source).ok_or_else(|| bad("source is nmi, gsiv or polled"))?;
            // Hex digits in pairs, whitespace between them; no sign.
            if !hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace())
            {
                return Err(bad("record is not hex"));
            }
            let record =
                crate::ghes_sources::parse_hex(hex, ras::cper::MAX_RECORD_LEN).map_err(|e| bad(&e))?;
            Ok(Step::GhesRaw { source, record })
        }
        ("poison", Some(a)) => {
            Ok(Step::Poison(target(a).ok_or_else(|| {
                bad("expected an address or a reference")
            })?))
        }
        ("kho-scan", None) => Ok(Step::KhoScan),
        ("kho-corrupt", Some(a)) => {
            let edits = a
                .split(':')
                .map(edit)
                .collect::<Result<Vec<Edit>, String>>()
                .map_err(|e| bad(&e))?;
            if edits.len() > MAX_EDITS {
                return Err(bad("at most 16 edits"));
            }
            Ok(Step::KhoCorrupt(edits))
        }
        ("wait-console", Some(t)) if !t.is_empty() && t.len() <= MAX_WAIT_TEXT => {
            Ok(Step::WaitConsole(t.to_string()))
        }
        ("wait-boot", Some(n)) => {
            let n = number(n)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (2..=crate::config::MAX_BOOTS).contains(n))
                .ok_or_else(|| bad("wait-boot takes a boot number, 2 to 16"))?;
            Ok(Step::WaitBoot(n))
        }
        ("wait", Some(ms)) => {
            let d = number(ms)
                .map(Duration::from_millis)
                .filter(|d| *d <= MAX_WAIT)
                .ok_or_else(|| bad("wait takes milliseconds, at most an hour"))?;
            Ok(Step::Wait(d))
        }
        _ => Err(bad(
            "expected exec, alloc-page, touch-page, spin-page, kernel-pages, guest-poison, host-poison, page-info, \
             sysctl, rasdaemon, poweroff, kexec, kexec-load, kexec-reboot, inject, poison, ghes-memory, ghes-raw, forge-kho, kho-scan, kho-corrupt, wait, \
             wait-console, wait-boot, or JSON",
        )),
    }
}

fn kind_of(s: &str) -> Option<KernelPageKind> {
    match s {
        "slab" => Some(KernelPageKind::Slab),
        "reserved" => Some(KernelPageKind::Reserved),
        "page-table" => Some(KernelPageKind::PageTable),
        "free" => Some(KernelPageKind::Free),
        _ => None,
    }
}

fn kind_name(k: KernelPageKind) -> &'static str {
    match k {
        KernelPageKind::Slab => "slab",
        KernelPageKind::Reserved => "reserved",
        KernelPageKind::PageTable => "page-table",
        KernelPageKind::Free => "free",
    }
}

fn target(s: &str) -> Option<Target> {
    if let Some(n) = number(s) {
        return Some(Target::Gpa(n));
    }
    let valid = !s.is_empty()
        && s.len() <= 32
        && s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    valid.then(|| Target::Ref(s.to_string()))
}

/// Why a step did not do what it was to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// Refused or failed (a bad reference, a refused injection, ...).
    Failed(String),
    /// The agent answered with an error.
    Agent(String),
    /// The run ended (the guest stopped or the deadline passed) first.
    Ended,
    /// The guest rebooted before the agent replied (its agent is gone).
    Rebooted,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Failed(e) => write!(f, "{e}"),
            StepError::Agent(e) => write!(f, "agent: {e}"),
            StepError::Ended => write!(f, "the run ended before the agent replied"),
            StepError::Rebooted => write!(f, "the guest rebooted before the agent replied"),
        }
    }
}

mod grammar;
mod kho_edit;
mod refs;

use grammar::has_control;
pub use grammar::number;
use kho_edit::{edit, MAX_EDITS};
pub use refs::Refs;

#[cfg(test)]
mod tests;
