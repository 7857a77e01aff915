//! Reading a guest's KHO (Kexec HandOver) state from outside: the root FDT
//! its kernel keeps for the next kernel, the `kexec-metadata` subtree that
//! counts kexecs, and the `hwpoison` subtree (rasvmm's guest-kernel patch,
//! ABI v2) listing the PFNs the guest believes are poisoned.
//!
//! Everything here parses bytes rasvmm copied out of guest memory, which the
//! guest controls: every offset, length and count is checked against the
//! bytes given, loops are bounded by them, and nothing allocates more than
//! the input's size. The parsers accept what Linux 7.3 writes and nothing
//! looser (kernel/liveupdate/kexec_handover.c):
//!
//! - FDT: Devicetree Specification v0.4, chapter 5, big-endian, as libfdt's
//!   sequential-write API leaves it: version 17, last compatible version 16,
//!   an empty memory reservation map, at most a page;
//! - KHO root: exactly one top-level node, the root (name ""), with exactly
//!   `compatible = "kho-v4"` and `preserved-memory-map` (u64); its direct
//!   children are the subtrees, each with exactly `preserved-data` (u64
//!   physical address of the blob) and `blob-size` (u64), no children and
//!   unique names. These u64s are raw little-endian, not FDT cells
//!   (include/linux/kho/abi/kexec_handover.h);
//! - `kexec-metadata`: packed `{u32 version = 1; char previous_release[65];
//!   u32 kexec_count}`, exactly 73 bytes, the release NUL-terminated
//!   (include/linux/kho/abi/kexec_metadata.h). The kernel publishes its
//!   incoming count plus one: 1 on a cold boot;
//! - `hwpoison`: see [`HwpoisonList`] (ABI v2, include/linux/kho/abi/hwpoison.h
//!   in guest-kernel-patches/).

use serde::Serialize;
use thiserror::Error;

use crate::bytes::{be32, le32};

pub mod build;
pub mod corrupt;
mod hwpoison;

pub use hwpoison::{Entry, EntryProblem, EntryType, HwpoisonList, RejectedEntry};

/// FDT magic, big-endian at offset 0.
pub const FDT_MAGIC: u32 = 0xd00d_feed;
/// The KHO root FDT's compatible string.
pub const KHO_COMPATIBLE: &str = "kho-v4";
/// Largest KHO root FDT (one page).
pub const MAX_FDT_SIZE: usize = 4096;
/// Name of the kexec-metadata subtree.
pub const METADATA_NODE: &str = "kexec-metadata";
/// Size of the kexec-metadata blob.
pub const METADATA_LEN: u64 = 73;
/// The kexec-metadata version Linux 7.3 writes.
pub const METADATA_VERSION: u32 = 1;
/// Name of the hwpoison subtree.
pub const HWPOISON_NODE: &str = "hwpoison";
/// hwpoison blob magic ("HWPN" in memory order).
pub const HWPOISON_MAGIC: u32 = u32::from_le_bytes(*b"HWPN");
/// hwpoison blob major version this parser reads (any minor).
pub const HWPOISON_MAJOR: u8 = 2;
/// The minor version this parser knows every flag and type of.
pub const HWPOISON_MINOR: u8 = 0;
/// The version the kernel writes: 2.0 (major << 8 | minor).
pub const HWPOISON_VERSION: u16 = u16::from_be_bytes([HWPOISON_MAJOR, HWPOISON_MINOR]);
/// Flag bit 0: the list lacks pages some kernel in the chain knew of.
pub const HWPOISON_F_INCOMPLETE: u16 = 1;
/// Bits of an entry that hold the PFN.
pub const HWPOISON_PFN_MASK: u64 = (1 << 56) - 1;
/// Size of the hwpoison blob header.
pub const HWPOISON_HEADER_LEN: usize = 24;
/// Largest hwpoison blob rasvmm reads (131069 entries).
pub const MAX_HWPOISON_BLOB: u64 = 1 << 20;
/// Most subtrees read from one root.
const MAX_SUBTREES: usize = 64;
/// Most properties a node may carry before the walk gives up.
const MAX_PROPS: usize = 64;

const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
/// Size of the FDT header (version 17).
const FDT_HEADER_LEN: usize = 40;

/// Why bytes are not a usable KHO FDT or blob.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// Not an FDT.
    #[error("no FDT magic")]
    NotFdt,
    /// The header's offsets or sizes do not fit.
    #[error("FDT header is inconsistent: {0}")]
    Header(&'static str),
    /// The structure block is malformed.
    #[error("FDT structure block is malformed at offset {0}")]
    Structure(usize),
    /// Not shaped as the kernel writes a KHO root.
    #[error("not a KHO root as Linux writes it: {0}")]
    Shape(&'static str),
    /// Not a KHO root FDT.
    #[error("not a KHO root FDT (compatible is not \"kho-v4\")")]
    NotKho,
    /// A subtree lacks its properties or has bad ones.
    #[error("KHO subtree '{0}' is malformed")]
    Subtree(String),
    /// The hwpoison blob is invalid.
    #[error("hwpoison blob is invalid: {0}")]
    Hwpoison(&'static str),
    /// The kexec-metadata blob is invalid.
    #[error("kexec-metadata blob is invalid: {0}")]
    Metadata(&'static str),
}

/// A subtree of the KHO root: where its blob is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subtree {
    /// Node name (the subsystem).
    pub name: String,
    /// Guest-physical address of the blob.
    pub blob: u64,
    /// Blob size in bytes.
    pub size: u64,
}

/// A parsed KHO root FDT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KhoRoot {
    /// The FDT's total size.
    pub total_size: u32,
    /// `preserved-memory-map`.
    pub memory_map: u64,
    /// Its subtrees.
    pub subtrees: Vec<Subtree>,
}

impl KhoRoot {
    /// The subtree called `name`.
    pub fn subtree(&self, name: &str) -> Option<&Subtree> {
        self.subtrees.iter().find(|s| s.name == name)
    }
}

/// A property holding exactly one little-endian u64 (how KHO stores
/// physical addresses and sizes).
fn u64_prop(v: &[u8]) -> Option<u64> {
    crate::bytes::le64(v, 0).filter(|_| v.len() == 8)
}

/// Whether `page` starts with the FDT magic (the cheap test of a scan).
pub fn looks_like_fdt(page: &[u8]) -> bool {
    be32(page, 0) == Some(FDT_MAGIC)
}

/// The total size an FDT header claims, if `b` starts with one.
pub fn fdt_total_size(b: &[u8]) -> Option<u32> {
    if !looks_like_fdt(b) {
        return None;
    }
    be32(b, 4)
}

/// A node's name and properties, as the walk meets them.
struct Node<'a> {
    name: &'a str,
    props: Vec<(&'a str, &'a [u8])>,
}

/// The checked header: the structure and strings blocks.
fn blocks(fdt: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    if !looks_like_fdt(fdt) {
        return Err(Error::NotFdt);
    }
    let field = |i: usize| be32(fdt, 4 * i).ok_or(Error::Header("truncated header"));
    let total = field(1)? as usize;
    let off_struct = field(2)? as usize;
    let off_strings = field(3)? as usize;
    let off_rsvmap = field(4)? as usize;
    let version = field(5)?;
    let last_comp = field(6)?;
    let size_strings = field(8)? as usize;
    let size_struct = field(9)? as usize;
    if total > fdt.len() || !(FDT_HEADER_LEN..=MAX_FDT_SIZE).contains(&total) {
        return Err(Error::Header("total size"));
    }
    // libfdt's fdt_create() writes version 17, last compatible 16.
    if version != 17 || last_comp != 16 {
        return Err(Error::Header("version is not 17 (last compatible 16)"));
    }
    // fdt_finish_reservemap() with no entries: one terminating zero entry.
    let rsv_end = off_rsvmap
        .checked_add(16)
        .filter(|e| off_rsvmap >= FDT_HEADER_LEN && off_rsvmap.is_multiple_of(8) && *e <= total)
        .ok_or(Error::Header("memory reservation map"))?;
    if fdt[off_rsvmap..rsv_end].iter().any(|b| *b != 0) {
        return Err(Error::Header("memory reservation map is not empty"));
    }
    let end_struct = off_struct
        .checked_add(size_struct)
        .filter(|e| *e <= total && off_struct >= rsv_end && off_struct.is_multiple_of(4))
        .ok_or(Error::Header("structure block"))?;
    let end_strings = off_strings
        .checked_add(size_strings)
        .filter(|e| *e <= total)
        .ok_or(Error::Header("strings block"))?;
    Ok((&fdt[off_struct..end_struct], &fdt[off_strings..end_strings]))
}

/// A NUL-terminated UTF-8 string at the start of `b`, and its length.
fn c_str(b: &[u8]) -> Option<(&str, usize)> {
    let len = b.iter().position(|c| *c == 0)?;
    Some((std::str::from_utf8(&b[..len]).ok()?, len))
}

/// Walks the structure block of `fdt`, returning the root node and its
/// children. Exactly one top-level node; no node deeper than the root's
/// children (the kernel writes none).
fn walk(fdt: &[u8]) -> Result<(Node<'_>, Vec<Node<'_>>), Error> {
    let (block, strings) = blocks(fdt)?;
    let mut root: Option<Node<'_>> = None;
    let mut children: Vec<Node<'_>> = Vec::new();
    let mut depth = 0usize;
    let mut off = 0usize;
    let mut ended = false;
    // Each iteration consumes at least four bytes of a bounded block.
    while off < block.len() {
        let at = off;
        let token = be32(block, off).ok_or(Error::Structure(at))?;
        off += 4;
        match token {
            FDT_BEGIN_NODE => {
                let (name, len) = c_str(&block[off..]).ok_or(Error::Structure(at))?;
                off += (len + 1).next_multiple_of(4);
                depth += 1;
                let node = Node {
                    name,
                    props: Vec::new(),
                };
                match depth {
                    1 if root.is_some() => {
                        return Err(Error::Shape("more than one top-level node"))
                    }
                    1 => root = Some(node),
                    2 => {
                        if children.len() >= MAX_SUBTREES {
                            return Err(Error::Shape("too many subtrees"));
                        }
                        children.push(node);
                    }
                    _ => return Err(Error::Shape("a subtree has a child node")),
                }
            }
            FDT_END_NODE => {
                depth = depth.checked_sub(1).ok_or(Error::Structure(at))?;
            }
            FDT_PROP => {
                let len = be32(block, off).ok_or(Error::Structure(at))? as usize;
                let nameoff = be32(block, off + 4).ok_or(Error::Structure(at))? as usize;
                off += 8;
                let value = block
                    .get(off..off.checked_add(len).ok_or(Error::Structure(at))?)
                    .ok_or(Error::Structure(at))?;
                off += len.next_multiple_of(4);
                let (name, _) = strings
                    .get(nameoff..)
                    .and_then(c_str)
                    .ok_or(Error::Structure(at))?;
                let node = match depth {
                    1 => root.as_mut(),
                    2 => children.last_mut(),
                    _ => None,
                }
                .ok_or(Error::Structure(at))?;
                if node.props.len() >= MAX_PROPS {
                    return Err(Error::Structure(at));
                }
                node.props.push((name, value));
            }
            FDT_NOP => {}
            FDT_END => {
                ended = true;
                break;
            }
            _ => return Err(Error::Structure(at)),
        }
    }
    if !ended || depth != 0 {
        return Err(Error::Structure(off.min(block.len())));
    }
    let root = root.ok_or(Error::Shape("no root node"))?;
    Ok((root, children))
}

/// Exactly the properties `names`, each once, and no other.
fn exactly<'a>(node: &Node<'a>, names: [&str; 2]) -> Option<[&'a [u8]; 2]> {
    if node.props.len() != names.len() {
        return None;
    }
    let one = |want: &str| {
        let mut it = node.props.iter().filter(|(n, _)| *n == want);
        let (_, v) = it.next()?;
        it.next().is_none().then_some(*v)
    };
    Some([one(names[0])?, one(names[1])?])
}

/// Parses a KHO root FDT, accepting only what the kernel writes.
pub fn parse_root(fdt: &[u8]) -> Result<KhoRoot, Error> {
    let (root, children) = walk(fdt)?;
    let compatible = root
        .props
        .iter()
        .find(|(n, _)| *n == "compatible")
        .map(|(_, v)| *v)
        .ok_or(Error::NotKho)?;
    if compatible != b"kho-v4\0" {
        return Err(Error::NotKho);
    }
    if !root.name.is_empty() {
        return Err(Error::Shape("the root node has a name"));
    }
    let [_, map] = exactly(&root, ["compatible", "preserved-memory-map"]).ok_or(Error::Shape(
        "the root has other properties than compatible and preserved-memory-map",
    ))?;
    let memory_map = u64_prop(map).ok_or(Error::Shape("preserved-memory-map is not one u64"))?;
    let mut subtrees: Vec<Subtree> = Vec::new();
    for n in &children {
        let bad = || Error::Subtree(n.name.to_string());
        if n.name.is_empty() || subtrees.iter().any(|s| s.name == n.name) {
            return Err(bad());
        }
        let [data, size] = exactly(n, ["preserved-data", "blob-size"]).ok_or_else(bad)?;
        subtrees.push(Subtree {
            name: n.name.to_string(),
            blob: u64_prop(data).ok_or_else(bad)?,
            size: u64_prop(size).ok_or_else(bad)?,
        });
    }
    Ok(KhoRoot {
        total_size: be32(fdt, 4).unwrap_or(0),
        memory_map,
        subtrees,
    })
}

/// The offset in `fdt` of the value of property `prop` of subtree `node`
/// (for rewriting it in place), if `fdt` is a KHO root that has it.
pub fn subtree_prop_offset(fdt: &[u8], node: &str, prop: &str) -> Option<usize> {
    parse_root(fdt).ok()?;
    let (_, children) = walk(fdt).ok()?;
    let n = children.iter().find(|n| n.name == node)?;
    let (_, v) = n.props.iter().find(|(p, _)| *p == prop)?;
    // `v` borrows from `fdt`: its distance from the start is its offset.
    (v.as_ptr() as usize).checked_sub(fdt.as_ptr() as usize)
}

/// The kexec count from a `kexec-metadata` blob.
pub fn kexec_count(blob: &[u8]) -> Result<u32, Error> {
    // u32 version, char previous_release[65], u32 kexec_count, packed.
    if blob.len() as u64 != METADATA_LEN {
        return Err(Error::Metadata("not 73 bytes"));
    }
    if le32(blob, 0) != Some(METADATA_VERSION) {
        return Err(Error::Metadata("version is not 1"));
    }
    // strscpy() always terminates the release string.
    if !blob[4..69].contains(&0) {
        return Err(Error::Metadata("previous_release is not NUL-terminated"));
    }
    le32(blob, 69).ok_or(Error::Metadata("truncated"))
}

#[cfg(test)]
mod tests;
