//! Builders for tests, fuzz seeds and the agent's forgeries: a KHO root FDT
//! and blobs as Linux writes them (hwpoison ABI v2). Their inputs are small
//! by construction (a few properties, at most a page), so lengths fit the
//! FDT's u32 fields.
#![allow(clippy::cast_possible_truncation)]

use super::{EntryType, HWPOISON_MAGIC};

/// Properties: (name, raw value).
pub type Props<'a> = Vec<(&'a str, Vec<u8>)>;

/// A top-level node: name, properties, children `(name, props)`.
pub type TopNode<'a> = (&'a str, Props<'a>, Vec<(&'a str, Props<'a>)>);

/// An FDT with a root node of `root_props` and children `(name, props)`;
/// property values are raw bytes.
pub fn fdt(root_props: &[(&str, Vec<u8>)], children: &[(&str, Props<'_>)]) -> Vec<u8> {
    fdt_nodes(&[("", root_props.to_vec(), children.to_vec())])
}

/// An FDT with any number of top-level nodes (the kernel writes one: more
/// is what a forger might try).
pub fn fdt_nodes(tops: &[TopNode<'_>]) -> Vec<u8> {
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
    for (name, root_props, children) in tops {
        begin(&mut st, name);
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
    }
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

/// The root node's properties as the kernel writes them.
pub fn root_props(memory_map: u64) -> Props<'static> {
    vec![
        ("compatible", b"kho-v4\0".to_vec()),
        ("preserved-memory-map", memory_map.to_le_bytes().to_vec()),
    ]
}

/// A subtree node's properties.
pub fn subtree_props(blob: u64, size: u64) -> Props<'static> {
    vec![
        ("preserved-data", blob.to_le_bytes().to_vec()),
        ("blob-size", size.to_le_bytes().to_vec()),
    ]
}

/// A KHO root FDT with subtrees `(name, blob address, blob size)`.
pub fn kho_root(memory_map: u64, subtrees: &[(&str, u64, u64)]) -> Vec<u8> {
    let children: Vec<(&str, Props<'_>)> = subtrees
        .iter()
        .map(|(n, a, s)| (*n, subtree_props(*a, *s)))
        .collect();
    fdt(&root_props(memory_map), &children)
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

/// One raw entry.
pub fn entry(pfn: u64, kind: EntryType) -> u64 {
    super::Entry { pfn, kind }.raw()
}

/// A hwpoison blob (version 2.0, no flags) with room for `capacity`
/// entries, listing `pfns` as hardware poison.
pub fn hwpoison(seq: u64, capacity: u32, pfns: &[u64]) -> Vec<u8> {
    let raw: Vec<u64> = pfns
        .iter()
        .map(|p| entry(*p, EntryType::Hardware))
        .collect();
    hwpoison_raw(super::HWPOISON_VERSION, 0, seq, capacity, &raw)
}

/// A hwpoison blob with the given version, flags and raw entries
/// (`nr_entries` is their count, even beyond `capacity`).
pub fn hwpoison_raw(version: u16, flags: u16, seq: u64, capacity: u32, raw: &[u64]) -> Vec<u8> {
    let mut b = HWPOISON_MAGIC.to_le_bytes().to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    b.extend_from_slice(&capacity.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    for i in 0..capacity as usize {
        b.extend_from_slice(&raw.get(i).copied().unwrap_or(0).to_le_bytes());
    }
    b
}
