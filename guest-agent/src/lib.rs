//! The rasvmm guest agent protocol, version 1.
//!
//! The agent runs in the guest and talks to the VMM over its own UART
//! (COM2, `/dev/ttyS1`, on x86_64; the second PL011, `/dev/ttyAMA1`, on
//! aarch64), never the console. Each message is one
//! line of JSON, at most [`MAX_LINE`] bytes:
//!
//! ```text
//! VMM   -> agent: {"id":7,"cmd":{"page-info":{"pfn":4660}}}
//! agent -> VMM  : {"reply":{"id":7,"ok":{"page-info":{...}}}}
//! agent -> VMM  : {"reply":{"id":8,"error":"no such page 3"}}
//! agent -> VMM  : {"hello":{"version":1,"kernel":"7.3.4","cpus":2,"features":["ghes",...]}}
//!                                                                       (once, at start)
//! agent -> VMM  : {"signal":{"page":0,"pid":91,"signo":7,"code":4,"addr":1234}}
//! ```
//!
//! Requests carry an id the reply echoes; `hello` and `signal` are
//! unsolicited events. The VMM treats everything the agent sends as hostile
//! input: [`decode`] bounds the line and rejects anything malformed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod kernel_feature;
pub mod rasdaemon;

pub use kernel_feature::KernelFeature;

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest line either side sends or accepts, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;
/// Most bytes of a command's stdout or stderr an `exec` reply carries.
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024;
/// Most PFNs one `kernel-pages` request may ask for.
pub const MAX_KERNEL_PAGES: u32 = 1024;
/// Longest a `spin-page` holder spins without a signal.
pub const SPIN_LIMIT_SECS: u64 = 60;

/// `si_code` for an action-required memory error (asm-generic/siginfo.h).
pub const BUS_MCEERR_AR: i32 = 4;
/// `si_code` for an action-optional memory error.
pub const BUS_MCEERR_AO: i32 = 5;
/// /proc/kpageflags bit for a hardware-poisoned page (KPF_HWPOISON).
pub const KPF_HWPOISON: u32 = 19;

/// Kinds of kernel page the agent can find through /proc/kpageflags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelPageKind {
    /// KPF_SLAB (bit 7): slab allocator pages.
    Slab,
    /// KPF_RESERVED (bit 32): reserved pages such as the kernel image.
    Reserved,
    /// KPF_PGTABLE (bit 26): page-table pages.
    PageTable,
    /// KPF_BUDDY (bit 10): free pages (the head of a free buddy block).
    Free,
}

impl KernelPageKind {
    /// The /proc/kpageflags bit for this kind (include/uapi/linux/kernel-page-flags.h).
    pub fn kpf_bit(self) -> u32 {
        match self {
            KernelPageKind::Slab => 7,
            KernelPageKind::Reserved => 32,
            KernelPageKind::PageTable => 26,
            KernelPageKind::Free => 10,
        }
    }
}

/// A request from the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Echoed in the reply.
    pub id: u64,
    /// What to do.
    pub cmd: Command,
}

/// What the VMM asks the agent to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Run `sh -c <sh>` and wait for it.
    Exec {
        /// Shell command line.
        sh: String,
        /// Environment variables it gets besides the agent's own (the VMM
        /// passes the references the command line names: `page0_pa`, ...).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
    },
    /// Start a page-holder process that maps, touches and keeps one user page.
    AllocPage,
    /// Make page holder `page` read (or write) its page again.
    TouchPage {
        /// Holder index from `alloc-page`.
        page: u32,
        /// Write instead of read.
        #[serde(default)]
        write: bool,
    },
    /// Make page holder `page` read its page in a loop, without pause,
    /// until a SIGBUS arrives or [`SPIN_LIMIT_SECS`] pass. Replies at once;
    /// the signal follows as an asynchronous report. A machine check
    /// injected at the page meanwhile lands in user context, on that process.
    SpinPage {
        /// Holder index from `alloc-page`.
        page: u32,
    },
    /// Find up to `count` PFNs of a kind of kernel page.
    KernelPages {
        /// Which kind.
        kind: KernelPageKind,
        /// How many (at most [`MAX_KERNEL_PAGES`]).
        count: u32,
        /// Least distance between two PFNs returned (0 and 1: any).
        #[serde(default, skip_serializing_if = "is_zero")]
        stride: u32,
        /// Poison each page with hwpoison-inject as it is found (free pages
        /// go fast: one found free may be allocated before it is poisoned,
        /// and is then passed over); only pages now poisoned are returned.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        poison: bool,
    },
    /// Test only: poison (`corrupt`) or unpoison pages from inside the guest
    /// with the kernel's hwpoison-inject
    /// (/sys/kernel/debug/hwpoison/{corrupt,unpoison}-pfn): memory failure
    /// handling as for a software injection (`MF_SW_SIMULATED`). Done when
    /// every page's KPF_HWPOISON says so afterwards, whatever the write
    /// returned (memory failure handling can poison a page and still answer
    /// EBUSY because it could not isolate it).
    GuestPoison {
        /// What to do.
        op: GuestPoisonOp,
        /// The pages (at most [`MAX_KERNEL_PAGES`]).
        pfns: Vec<u64>,
    },
    /// Read /proc/kpageflags for `pfn` and HardwareCorrupted.
    PageInfo {
        /// Page frame number.
        pfn: u64,
    },
    /// Read, or set then read, a sysctl such as `vm.panic_on_unrecoverable_memory_failure`.
    Sysctl {
        /// Dotted name.
        name: String,
        /// New value, if setting.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
    },
    /// Read what rasdaemon recorded (the rasdaemon guest image), waiting
    /// up to [`rasdaemon::MAX_WAIT_MS`] until its output shows `at_least`
    /// recorded events.
    Rasdaemon {
        /// Rows to wait for.
        #[serde(default)]
        at_least: u32,
    },
    /// Sync and power the guest off.
    Poweroff,
    /// Test only, a hostile guest: write forged KHO root FDTs into the
    /// agent's own memory, as `defect` says: one root claiming to be newer
    /// (kexec count 1000) with a broken hwpoison subtree, one consistent
    /// root (kexec count u32::MAX, a valid v2 list), or `count` bare roots
    /// (no subtrees) in the lowest-addressed pages the agent can get.
    /// Nothing in the kernel uses them; they are there for the VMM's KHO
    /// observer to find and refuse.
    ForgeKho {
        /// What to forge.
        defect: KhoDefect,
        /// How many bare roots (`bare-roots` only; default 16, at most
        /// [`MAX_FORGED_ROOTS`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u32>,
    },
    /// Load /boot/bzImage (aarch64: /boot/Image) with kexec_file_load (the
    /// current command line, plus `append`; an initramfs packed from the
    /// current root), reply, then reboot into it. The new kernel's agent
    /// says hello again.
    Kexec {
        /// Appended to the current kernel command line.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        append: Option<String>,
    },
    /// [`Command::Kexec`]'s load alone: the next kernel is loaded and the
    /// guest runs on until [`Command::KexecReboot`]. Between the two, the
    /// kexec load's own allocations are done, so a test can edit guest
    /// memory that the load would otherwise have reused.
    KexecLoad {
        /// Appended to the current kernel command line.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        append: Option<String>,
    },
    /// Reply, then reboot into the kernel [`Command::KexecLoad`] loaded.
    KexecReboot,
}

impl Command {
    /// Whether the guest reboots into a new kernel after replying.
    pub fn reboots_into_next_kernel(&self) -> bool {
        matches!(self, Command::Kexec { .. } | Command::KexecReboot)
    }
}

/// What a `guest-poison` request does to each page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestPoisonOp {
    /// Write the PFN to hwpoison-inject's corrupt-pfn.
    Corrupt,
    /// Write the PFN to hwpoison-inject's unpoison-pfn.
    Unpoison,
}

impl GuestPoisonOp {
    /// The hwpoison-inject file.
    pub fn debugfs_file(self) -> &'static str {
        match self {
            GuestPoisonOp::Corrupt => "/sys/kernel/debug/hwpoison/corrupt-pfn",
            GuestPoisonOp::Unpoison => "/sys/kernel/debug/hwpoison/unpoison-pfn",
        }
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// What `forge-kho` forges (how a forged hwpoison subtree is broken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KhoDefect {
    /// The blob's magic is wrong.
    BadMagic,
    /// More PFNs than the blob has room for.
    Overfull,
    /// A blob size of 1 TiB.
    HugeBlob,
    /// The blob address is outside guest RAM.
    WildPointer,
    /// Nothing: a consistent root (valid kexec-metadata with kexec count
    /// u32::MAX, a valid v2 hwpoison blob listing PFN 0x1234 as hardware).
    Consistent,
    /// Bare roots (no subtrees) at the lowest addresses the agent gets.
    BareRoots,
}

/// Most bare roots one `forge-kho` writes.
pub const MAX_FORGED_ROOTS: u32 = 256;

/// Longest `append` a kexec request carries.
pub const MAX_KEXEC_APPEND: usize = 1024;

/// Result of `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    /// Exit status, or 128 + signal number.
    pub status: i32,
    /// Standard output, at most [`MAX_EXEC_OUTPUT`] bytes (lossy UTF-8).
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
}

/// A user page held by a page-holder process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageRecord {
    /// Holder index, used by `touch-page`.
    pub page: u32,
    /// Holder's pid.
    pub pid: i32,
    /// Virtual address of the page in the holder.
    pub vaddr: u64,
    /// Physical frame number, from /proc/<pid>/pagemap.
    pub pfn: u64,
    /// The CPU the holder is pinned to: holder N runs on CPU N modulo the
    /// online CPUs, so its accesses (and the machine checks they raise)
    /// spread evenly over the vCPUs.
    pub cpu: u32,
}

/// Result of `touch-page`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouchResult {
    /// Holder index.
    pub page: u32,
    /// The signal the access raised, if any (also sent as a `signal` event).
    pub signal: Option<SignalReport>,
    /// Whether the page still held what the holder last wrote (a read
    /// compares all of it; after a soft offline the data must survive the
    /// move).
    #[serde(default)]
    pub intact: bool,
    /// The page's PFN after the touch (it changes when the kernel migrated
    /// or replaced the page).
    #[serde(default)]
    pub pfn: Option<u64>,
}

/// A signal a page holder received (SIGBUS from memory-failure handling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalReport {
    /// Holder index.
    pub page: u32,
    /// Holder's pid.
    pub pid: i32,
    /// Signal number (7 = SIGBUS).
    pub signo: i32,
    /// si_code ([`BUS_MCEERR_AR`], [`BUS_MCEERR_AO`], ...).
    pub code: i32,
    /// si_addr.
    pub addr: u64,
    /// si_addr_lsb (12 for a 4 KiB page).
    pub addr_lsb: i32,
}

/// Result of `page-info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageInfo {
    /// Page frame number.
    pub pfn: u64,
    /// Raw /proc/kpageflags word.
    pub kpageflags: u64,
    /// KPF_HWPOISON is set.
    pub hwpoison: bool,
    /// /proc/meminfo HardwareCorrupted, in kB.
    pub hardware_corrupted_kb: u64,
}

/// Result of a sysctl request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysctlValue {
    /// Dotted name.
    pub name: String,
    /// Value read after any write, trimmed.
    pub value: String,
}

/// A successful reply's payload, tagged by command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Payload {
    /// From `exec`.
    Exec(ExecResult),
    /// From `alloc-page`.
    Page(PageRecord),
    /// From `touch-page`.
    Touch(TouchResult),
    /// From `kernel-pages`.
    KernelPages(Vec<u64>),
    /// From `page-info`.
    PageInfo(PageInfo),
    /// From `sysctl`.
    Sysctl(SysctlValue),
    /// From `rasdaemon`.
    Rasdaemon(rasdaemon::RasdaemonView),
    /// From `poweroff`: sent before the guest goes down.
    Done,
}

/// A reply to request `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// The request's id.
    pub id: u64,
    /// Payload on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Payload>,
    /// Reason on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The agent's greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Protocol version the agent speaks.
    pub version: u32,
    /// Guest kernel release (uname -r).
    pub kernel: String,
    /// Online CPUs the guest sees.
    pub cpus: u32,
    /// What the running kernel offers of what scenarios need, as the agent
    /// found it at start; `None` from an older agent that does not say
    /// (nothing is then known to be missing).
    #[serde(default)]
    pub features: Option<Vec<KernelFeature>>,
}

/// Anything the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum AgentMessage {
    /// Sent once when the agent is ready.
    Hello(Hello),
    /// A reply to a request.
    Reply(Reply),
    /// A signal a page holder received.
    Signal(SignalReport),
}

/// Errors decoding a line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The line is longer than [`MAX_LINE`].
    #[error("Agent line of {0} bytes exceeds the {MAX_LINE}-byte limit")]
    TooLong(usize),
    /// The line is not valid UTF-8.
    #[error("Agent line is not UTF-8")]
    NotUtf8,
    /// The line is not a message of this protocol.
    #[error("Malformed agent line: {0}")]
    Malformed(String),
    /// The peer speaks another protocol version.
    #[error("Agent speaks protocol version {0}, rasvmm speaks {PROTOCOL_VERSION}")]
    Version(u32),
    /// A reply with both or neither of `ok` and `error`.
    #[error("Reply {0} has both or neither of ok and error")]
    AmbiguousReply(u64),
}

/// Decodes one line (without its newline) into `T`, bounding its size.
pub fn decode<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, ProtocolError> {
    if line.len() > MAX_LINE {
        return Err(ProtocolError::TooLong(line.len()));
    }
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
    serde_json::from_str(text.trim_end_matches('\r'))
        .map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Decodes and validates a line from the agent.
pub fn decode_agent_message(line: &[u8]) -> Result<AgentMessage, ProtocolError> {
    let msg: AgentMessage = decode(line)?;
    match &msg {
        AgentMessage::Hello(h) if h.version != PROTOCOL_VERSION => {
            Err(ProtocolError::Version(h.version))
        }
        AgentMessage::Reply(r) if r.ok.is_some() == r.error.is_some() => {
            Err(ProtocolError::AmbiguousReply(r.id))
        }
        _ => Ok(msg),
    }
}

/// Encodes a message as one line with its newline.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain data types cannot fail.
    let mut v = serde_json::to_vec(msg).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Splits a byte stream into lines, bounding each: bytes past [`MAX_LINE`]
/// are dropped and the line is reported as too long when it ends.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    overflow: usize,
}

impl LineBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; calls `line` for each complete line (without the newline),
    /// or with `Err(TooLong)` for a line that exceeded the limit.
    pub fn push(&mut self, bytes: &[u8], mut line: impl FnMut(Result<&[u8], ProtocolError>)) {
        for &b in bytes {
            if b == b'\n' {
                if self.overflow > 0 {
                    line(Err(ProtocolError::TooLong(self.buf.len() + self.overflow)));
                } else {
                    line(Ok(&self.buf));
                }
                self.buf.clear();
                self.overflow = 0;
            } else if self.buf.len() < MAX_LINE {
                self.buf.push(b);
            } else {
                self.overflow += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_stable() {
        let r = Request {
            id: 7,
            cmd: Command::PageInfo { pfn: 4660 },
        };
        assert_eq!(
            encode(&r),
            b"{\"id\":7,\"cmd\":{\"page-info\":{\"pfn\":4660}}}\n".to_vec()
        );
        let p = Request {
            id: 1,
            cmd: Command::Poweroff,
        };
        assert_eq!(encode(&p), b"{\"id\":1,\"cmd\":\"poweroff\"}\n".to_vec());
        let back: Request = decode(br#"{"id":3,"cmd":{"touch-page":{"page":2}}}"#).unwrap();
        assert_eq!(
            back.cmd,
            Command::TouchPage {
                page: 2,
                write: false
            }
        );
        let spin: Request = decode(br#"{"id":4,"cmd":{"spin-page":{"page":1}}}"#).unwrap();
        assert_eq!(spin.cmd, Command::SpinPage { page: 1 });
    }

    #[test]
    fn agent_messages_round_trip() {
        let msgs = [
            AgentMessage::Hello(Hello {
                version: 1,
                kernel: "7.3.4".into(),
                cpus: 2,
                features: Some(vec![KernelFeature::PanicSysctl, KernelFeature::KhoHwpoison]),
            }),
            AgentMessage::Reply(Reply {
                id: 9,
                ok: Some(Payload::KernelPages(vec![1, 2, 3])),
                error: None,
            }),
            AgentMessage::Reply(Reply {
                id: 10,
                ok: None,
                error: Some("no such page 4".into()),
            }),
            AgentMessage::Signal(SignalReport {
                page: 0,
                pid: 42,
                signo: 7,
                code: BUS_MCEERR_AR,
                addr: 0x7f00_0000_0000,
                addr_lsb: 12,
            }),
        ];
        for m in msgs {
            let line = encode(&m);
            assert_eq!(line.last(), Some(&b'\n'));
            let back = decode_agent_message(&line[..line.len() - 1]).unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn malformed_lines_are_rejected() {
        for bad in [
            &b""[..],
            b"hello",
            b"{\"hello\":{\"version\":1}}",
            b"{\"reply\":{\"id\":1}}",
            b"{\"reply\":{\"id\":-1,\"error\":\"x\"}}",
            b"{\"nonsense\":{}}",
            b"{\"hello\":{\"version\":1,\"kernel\":\"x\",\"cpus\":1,\"extra\":0}}",
            b"{\"hello\":{\"version\":1,\"kernel\":\"x\",\"cpus\":1,\"features\":[\"warp-drive\"]}}",
            b"\xff\xfe",
        ] {
            assert!(decode_agent_message(bad).is_err(), "{:?}", bad);
        }
        assert_eq!(
            decode_agent_message(br#"{"hello":{"version":2,"kernel":"x","cpus":1}}"#),
            Err(ProtocolError::Version(2))
        );
        assert_eq!(
            decode_agent_message(br#"{"reply":{"id":5,"ok":"done","error":"x"}}"#),
            Err(ProtocolError::AmbiguousReply(5))
        );
        assert_eq!(
            decode_agent_message(&vec![b' '; MAX_LINE + 1]),
            Err(ProtocolError::TooLong(MAX_LINE + 1))
        );
    }

    #[test]
    fn line_buffer_splits_and_bounds() {
        let mut lb = LineBuffer::new();
        let mut got = Vec::new();
        lb.push(b"ab\ncd", |l| got.push(l.map(|b| b.to_vec())));
        lb.push(b"e\n", |l| got.push(l.map(|b| b.to_vec())));
        assert_eq!(got, vec![Ok(b"ab".to_vec()), Ok(b"cde".to_vec())]);
        got.clear();
        let long = vec![b'x'; MAX_LINE + 10];
        lb.push(&long, |l| got.push(l.map(|b| b.to_vec())));
        lb.push(b"\nok\n", |l| got.push(l.map(|b| b.to_vec())));
        assert_eq!(
            got,
            vec![
                Err(ProtocolError::TooLong(MAX_LINE + 10)),
                Ok(b"ok".to_vec())
            ]
        );
    }

    #[test]
    fn kernel_feature_names_round_trip() {
        for f in KernelFeature::ALL {
            assert_eq!(KernelFeature::parse(f.name()), Ok(f));
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
        }
        let e = KernelFeature::parse("warp-drive").unwrap_err();
        assert!(e.contains("panic-sysctl"), "{e}");
        // An older agent's hello, without features, still decodes.
        let h = decode_agent_message(br#"{"hello":{"version":1,"kernel":"x","cpus":1}}"#);
        assert!(matches!(
            h,
            Ok(AgentMessage::Hello(Hello { features: None, .. }))
        ));
    }
}
