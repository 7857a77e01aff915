//! Reading a guest's KHO (Kexec HandOver) state from outside: the root FDT
//! its kernel keeps for the next kernel, the `kexec-metadata` subtree that
//! counts kexecs, and the `hwpoison` subtree (rasvmm's guest-kernel patch)
//! listing the PFNs the guest believes are poisoned.
//!
//! Everything here parses bytes rasvmm copied out of guest memory, which the
//! guest controls: every offset, length and count is checked against the
//! bytes given, loops are bounded by them, and nothing allocates more than
//! the input's size. Layouts (Linux 7.3):
//!
//! - FDT: Devicetree Specification v0.4, chapter 5 (header, structure block
//!   tokens, strings block), big-endian;
//! - KHO root: `compatible = "kho-v4"`, `preserved-memory-map` (u64);
//!   each subtree a child node with `preserved-data` (u64 physical address of
//!   the blob) and `blob-size` (u64). These u64s are raw little-endian, not
//!   FDT cells (include/linux/kho/abi/kexec_handover.h);
//! - `kexec-metadata`: packed `{u32 version = 1; char previous_release[65];
//!   u32 kexec_count}` (include/linux/kho/abi/kexec_metadata.h);
//! - `hwpoison`: see [`HwpoisonList`] (include/linux/kho/abi/hwpoison.h in
//!   guest-kernel-patches/).

use serde::Serialize;
use thiserror::Error;

use crate::bytes::{be32, le16, le32, le64};

/// FDT magic, big-endian at offset 0.
pub const FDT_MAGIC: u32 = 0xd00d_feed;
/// The KHO root FDT's compatible string.
pub const KHO_COMPATIBLE: &str = "kho-v4";
/// Largest KHO root FDT (one page).
pub const MAX_FDT_SIZE: usize = 4096;
/// Name of the kexec-metadata subtree.
pub const METADATA_NODE: &str = "kexec-metadata";
/// Name of the hwpoison subtree.
pub const HWPOISON_NODE: &str = "hwpoison";
/// hwpoison blob magic ("HWPN" in memory order).
pub const HWPOISON_MAGIC: u32 = u32::from_le_bytes(*b"HWPN");
/// hwpoison blob version this parser reads.
pub const HWPOISON_VERSION: u16 = 1;
/// Size of the hwpoison blob header.
pub const HWPOISON_HEADER_LEN: usize = 24;
/// Largest hwpoison blob rasvmm reads (131069 PFNs).
pub const MAX_HWPOISON_BLOB: u64 = 1 << 20;
/// Most subtrees read from one root.
const MAX_SUBTREES: usize = 64;
/// Deepest node nesting walked.
const MAX_DEPTH: usize = 8;

const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

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
    #[error("kexec-metadata blob is invalid")]
    Metadata,
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
    (v.len() == 8).then(|| le64(v, 0)).flatten()
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
    depth: usize,
    name: &'a str,
    props: Vec<(&'a str, &'a [u8])>,
}

/// Walks the structure block of `fdt`, returning the root's and its direct
/// children's properties (deeper nodes are skipped, but checked).
fn walk(fdt: &[u8]) -> Result<Vec<Node<'_>>, Error> {
    if !looks_like_fdt(fdt) {
        return Err(Error::NotFdt);
    }
    let field = |i: usize| be32(fdt, 4 * i).ok_or(Error::Header("truncated header"));
    let total = field(1)? as usize;
    let off_struct = field(2)? as usize;
    let off_strings = field(3)? as usize;
    let version = field(5)?;
    let size_strings = field(8)? as usize;
    let size_struct = field(9)? as usize;
    if total > fdt.len() || total < 40 {
        return Err(Error::Header("total size"));
    }
    if version < 17 {
        return Err(Error::Header("version below 17"));
    }
    let end_struct = off_struct
        .checked_add(size_struct)
        .filter(|e| *e <= total && off_struct >= 40 && off_struct.is_multiple_of(4))
        .ok_or(Error::Header("structure block"))?;
    let end_strings = off_strings
        .checked_add(size_strings)
        .filter(|e| *e <= total)
        .ok_or(Error::Header("strings block"))?;
    let strings = &fdt[off_strings..end_strings];
    let block = &fdt[off_struct..end_struct];

    let mut nodes: Vec<Node<'_>> = Vec::new();
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
                let rest = &block[off..];
                let len = rest
                    .iter()
                    .position(|b| *b == 0)
                    .ok_or(Error::Structure(at))?;
                let name = std::str::from_utf8(&rest[..len]).map_err(|_| Error::Structure(at))?;
                off += (len + 1).next_multiple_of(4);
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Error::Structure(at));
                }
                if depth <= 2 {
                    if nodes.len() > MAX_SUBTREES {
                        return Err(Error::Structure(at));
                    }
                    nodes.push(Node {
                        depth,
                        name,
                        props: Vec::new(),
                    });
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
                let name_bytes = strings.get(nameoff..).ok_or(Error::Structure(at))?;
                let nlen = name_bytes
                    .iter()
                    .position(|b| *b == 0)
                    .ok_or(Error::Structure(at))?;
                let name =
                    std::str::from_utf8(&name_bytes[..nlen]).map_err(|_| Error::Structure(at))?;
                if depth == 0 {
                    return Err(Error::Structure(at));
                }
                if let Some(n) = nodes.last_mut().filter(|n| n.depth == depth) {
                    if n.props.len() >= 64 {
                        return Err(Error::Structure(at));
                    }
                    n.props.push((name, value));
                }
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
    Ok(nodes)
}

/// Parses a KHO root FDT.
pub fn parse_root(fdt: &[u8]) -> Result<KhoRoot, Error> {
    let nodes = walk(fdt)?;
    let root = nodes
        .first()
        .filter(|n| n.depth == 1)
        .ok_or(Error::NotKho)?;
    let compatible = root
        .props
        .iter()
        .find(|(n, _)| *n == "compatible")
        .map(|(_, v)| *v)
        .ok_or(Error::NotKho)?;
    if compatible.split(|b| *b == 0).next() != Some(KHO_COMPATIBLE.as_bytes()) {
        return Err(Error::NotKho);
    }
    let memory_map = root
        .props
        .iter()
        .find(|(n, _)| *n == "preserved-memory-map")
        .and_then(|(_, v)| u64_prop(v))
        .ok_or(Error::NotKho)?;
    let mut subtrees = Vec::new();
    for n in nodes.iter().filter(|n| n.depth == 2) {
        let prop = |name: &str| {
            n.props
                .iter()
                .find(|(p, _)| *p == name)
                .and_then(|(_, v)| u64_prop(v))
        };
        match (prop("preserved-data"), prop("blob-size")) {
            (Some(blob), Some(size)) => subtrees.push(Subtree {
                name: n.name.to_string(),
                blob,
                size,
            }),
            _ => return Err(Error::Subtree(n.name.to_string())),
        }
    }
    Ok(KhoRoot {
        total_size: be32(fdt, 4).unwrap_or(0),
        memory_map,
        subtrees,
    })
}

/// The kexec count from a `kexec-metadata` blob.
pub fn kexec_count(blob: &[u8]) -> Result<u32, Error> {
    // u32 version, char previous_release[65], u32 kexec_count, packed.
    if blob.len() != 73 {
        return Err(Error::Metadata);
    }
    if le32(blob, 0) != Some(1) {
        return Err(Error::Metadata);
    }
    le32(blob, 69).ok_or(Error::Metadata)
}

/// The `hwpoison` blob (version 1), little-endian:
///
/// | offset | field |
/// |---|---|
/// | 0 | u32 magic "HWPN" |
/// | 4 | u16 version = 1 |
/// | 6 | u16 flags = 0 |
/// | 8 | u32 nr_pfns: valid entries |
/// | 12 | u32 capacity: entries the blob has room for |
/// | 16 | u64 seq: even when stable, odd while the kernel updates the list |
/// | 24 | u64 pfns[capacity] |
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HwpoisonList {
    /// The update sequence number.
    pub seq: u64,
    /// The PFNs, sorted, duplicates dropped.
    pub pfns: Vec<u64>,
    /// Duplicate entries dropped.
    pub duplicates: u32,
}

impl HwpoisonList {
    /// Parses a blob of exactly its `blob-size` bytes.
    pub fn parse(blob: &[u8]) -> Result<Self, Error> {
        if blob.len() < HWPOISON_HEADER_LEN {
            return Err(Error::Hwpoison("shorter than its header"));
        }
        if le32(blob, 0) != Some(HWPOISON_MAGIC) {
            return Err(Error::Hwpoison("bad magic"));
        }
        if le16(blob, 4) != Some(HWPOISON_VERSION) {
            return Err(Error::Hwpoison("unknown version"));
        }
        if le16(blob, 6) != Some(0) {
            return Err(Error::Hwpoison("unknown flags"));
        }
        // The header's length was checked above.
        let nr = le32(blob, 8).unwrap_or(0) as usize;
        let capacity = le32(blob, 12).unwrap_or(0) as usize;
        let seq = le64(blob, 16).unwrap_or(0);
        if seq % 2 == 1 {
            return Err(Error::Hwpoison("being updated (odd seq)"));
        }
        if HWPOISON_HEADER_LEN + capacity.saturating_mul(8) != blob.len() {
            return Err(Error::Hwpoison("capacity disagrees with the blob size"));
        }
        if nr > capacity {
            return Err(Error::Hwpoison("more PFNs than capacity"));
        }
        let mut pfns: Vec<u64> = blob[HWPOISON_HEADER_LEN..HWPOISON_HEADER_LEN + 8 * nr]
            .chunks_exact(8)
            .filter_map(|e| le64(e, 0))
            .collect();
        pfns.sort_unstable();
        let before = pfns.len();
        pfns.dedup();
        let duplicates = u32::try_from(before - pfns.len()).unwrap_or(u32::MAX);
        Ok(HwpoisonList {
            seq,
            pfns,
            duplicates,
        })
    }
}

/// Builders for tests and fuzz seeds: a KHO root FDT and blobs as Linux
/// writes them. Their inputs are small by construction (a few properties,
/// at most a page), so lengths fit the FDT's u32 fields.
#[allow(clippy::cast_possible_truncation)]
pub mod build {
    /// Properties: (name, raw value).
    pub type Props<'a> = Vec<(&'a str, Vec<u8>)>;

    /// An FDT with a root node of `root_props` and children
    /// `(name, props)`; property values are raw bytes.
    pub fn fdt(root_props: &[(&str, Vec<u8>)], children: &[(&str, Props<'_>)]) -> Vec<u8> {
        let mut strings: Vec<u8> = Vec::new();
        let mut st: Vec<u8> = Vec::new();
        let name_off = |n: &str, strings: &mut Vec<u8>| -> u32 {
            let off = strings.len() as u32;
            strings.extend_from_slice(n.as_bytes());
            strings.push(0);
            off
        };
        let begin = |st: &mut Vec<u8>, name: &str| {
            st.extend_from_slice(&1u32.to_be_bytes());
            st.extend_from_slice(name.as_bytes());
            st.push(0);
            while !st.len().is_multiple_of(4) {
                st.push(0);
            }
        };
        let prop = |st: &mut Vec<u8>, strings: &mut Vec<u8>, n: &str, v: &[u8]| {
            let off = name_off(n, strings);
            st.extend_from_slice(&3u32.to_be_bytes());
            st.extend_from_slice(&(v.len() as u32).to_be_bytes());
            st.extend_from_slice(&off.to_be_bytes());
            st.extend_from_slice(v);
            while !st.len().is_multiple_of(4) {
                st.push(0);
            }
        };
        begin(&mut st, "");
        for (n, v) in root_props {
            prop(&mut st, &mut strings, n, v);
        }
        for (child, props) in children {
            begin(&mut st, child);
            for (n, v) in props {
                prop(&mut st, &mut strings, n, v);
            }
            st.extend_from_slice(&2u32.to_be_bytes());
        }
        st.extend_from_slice(&2u32.to_be_bytes());
        st.extend_from_slice(&9u32.to_be_bytes());
        let off_rsv = 40u32;
        let off_struct = off_rsv + 16;
        let off_strings = off_struct + st.len() as u32;
        let total = off_strings + strings.len() as u32;
        let mut out = Vec::new();
        for v in [
            super::FDT_MAGIC,
            total,
            off_struct,
            off_strings,
            off_rsv,
            17,
            16,
            0,
            strings.len() as u32,
            st.len() as u32,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&st);
        out.extend_from_slice(&strings);
        out
    }

    /// A KHO root FDT with subtrees `(name, blob address, blob size)`.
    pub fn kho_root(memory_map: u64, subtrees: &[(&str, u64, u64)]) -> Vec<u8> {
        let children: Vec<(&str, Props<'_>)> = subtrees
            .iter()
            .map(|(n, a, s)| {
                (
                    *n,
                    vec![
                        ("preserved-data", a.to_le_bytes().to_vec()),
                        ("blob-size", s.to_le_bytes().to_vec()),
                    ],
                )
            })
            .collect();
        fdt(
            &[
                ("compatible", b"kho-v4\0".to_vec()),
                ("preserved-memory-map", memory_map.to_le_bytes().to_vec()),
            ],
            &children,
        )
    }

    /// A kexec-metadata blob.
    pub fn metadata(kexec_count: u32) -> Vec<u8> {
        let mut b = 1u32.to_le_bytes().to_vec();
        let mut release = [0u8; 65];
        release[..5].copy_from_slice(b"7.3.4");
        b.extend_from_slice(&release);
        b.extend_from_slice(&kexec_count.to_le_bytes());
        b
    }

    /// A hwpoison blob with room for `capacity` PFNs.
    pub fn hwpoison(seq: u64, capacity: u32, pfns: &[u64]) -> Vec<u8> {
        let mut b = super::HWPOISON_MAGIC.to_le_bytes().to_vec();
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(pfns.len() as u32).to_le_bytes());
        b.extend_from_slice(&capacity.to_le_bytes());
        b.extend_from_slice(&seq.to_le_bytes());
        for i in 0..capacity as usize {
            b.extend_from_slice(&pfns.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kho_root_with_subtrees() {
        let f = build::kho_root(
            0x1234_5000,
            &[
                ("kexec-metadata", 0x7000, 73),
                ("hwpoison", 0x9000, 24 + 8 * 4),
            ],
        );
        let r = parse_root(&f).unwrap();
        assert_eq!(r.memory_map, 0x1234_5000);
        assert_eq!(r.total_size as usize, f.len());
        assert_eq!(
            r.subtree("hwpoison"),
            Some(&Subtree {
                name: "hwpoison".into(),
                blob: 0x9000,
                size: 56
            })
        );
        assert_eq!(r.subtree("kexec-metadata").unwrap().blob, 0x7000);
        assert!(r.subtree("luo").is_none());
    }

    #[test]
    fn not_kho_or_broken() {
        let other = build::fdt(&[("compatible", b"kho-v3\0".to_vec())], &[]);
        assert_eq!(parse_root(&other), Err(Error::NotKho));
        assert_eq!(parse_root(&[0u8; 64]), Err(Error::NotFdt));
        let good = build::kho_root(1, &[("hwpoison", 2, 3)]);
        // Truncated: total size beyond the bytes.
        assert!(matches!(
            parse_root(&good[..good.len() - 1]),
            Err(Error::Header(_))
        ));
        // A subtree without blob-size.
        let bad = build::fdt(
            &[
                ("compatible", b"kho-v4\0".to_vec()),
                ("preserved-memory-map", 1u64.to_le_bytes().to_vec()),
            ],
            &[(
                "hwpoison",
                vec![("preserved-data", 5u64.to_le_bytes().to_vec())],
            )],
        );
        assert_eq!(parse_root(&bad), Err(Error::Subtree("hwpoison".into())));
        // A property length running past the block.
        let mut f = good.clone();
        let off_struct = u32::from_be_bytes(f[8..12].try_into().unwrap()) as usize;
        // Root: BEGIN_NODE "" (8 bytes), then the first PROP's length.
        f[off_struct + 12..off_struct + 16].copy_from_slice(&0xffffu32.to_be_bytes());
        assert!(matches!(parse_root(&f), Err(Error::Structure(_))));
        // An unknown token.
        let mut f = good;
        f[off_struct..off_struct + 4].copy_from_slice(&7u32.to_be_bytes());
        assert!(matches!(parse_root(&f), Err(Error::Structure(_))));
    }

    #[test]
    fn metadata_blob() {
        assert_eq!(kexec_count(&build::metadata(3)), Ok(3));
        assert_eq!(kexec_count(&build::metadata(3)[..72]), Err(Error::Metadata));
        let mut m = build::metadata(1);
        m[0] = 2;
        assert_eq!(kexec_count(&m), Err(Error::Metadata));
    }

    #[test]
    fn hwpoison_blob() {
        let l = HwpoisonList::parse(&build::hwpoison(4, 8, &[0x300, 0x100, 0x300, 0x200])).unwrap();
        assert_eq!(l.pfns, vec![0x100, 0x200, 0x300]);
        assert_eq!(l.duplicates, 1);
        assert_eq!(l.seq, 4);
        let good = build::hwpoison(2, 4, &[1, 2]);
        assert!(HwpoisonList::parse(&good[..good.len() - 8]).is_err());
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(HwpoisonList::parse(&b), Err(Error::Hwpoison("bad magic")));
        let mut b = good.clone();
        b[8] = 5;
        assert_eq!(
            HwpoisonList::parse(&b),
            Err(Error::Hwpoison("more PFNs than capacity"))
        );
        let mut b = good.clone();
        b[16] = 3;
        assert_eq!(
            HwpoisonList::parse(&b),
            Err(Error::Hwpoison("being updated (odd seq)"))
        );
        let mut b = good;
        b[6] = 1;
        assert_eq!(
            HwpoisonList::parse(&b),
            Err(Error::Hwpoison("unknown flags"))
        );
        assert!(HwpoisonList::parse(&[0; 10]).is_err());
    }
}
