//! Bounds-checked readers of fixed-width integers in byte buffers: the one
//! way the parsers of guest-written structures (CPER records, KHO FDTs and
//! blobs) read fields. Each returns `None` when the field does not fit.

fn array<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// Little-endian u16 at `off`.
pub fn le16(b: &[u8], off: usize) -> Option<u16> {
    array(b, off).map(u16::from_le_bytes)
}

/// Little-endian u32 at `off`.
pub fn le32(b: &[u8], off: usize) -> Option<u32> {
    array(b, off).map(u32::from_le_bytes)
}

/// Little-endian u64 at `off`.
pub fn le64(b: &[u8], off: usize) -> Option<u64> {
    array(b, off).map(u64::from_le_bytes)
}

/// Big-endian u32 at `off` (FDT cells).
pub fn be32(b: &[u8], off: usize) -> Option<u32> {
    array(b, off).map(u32::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_bounds_and_refuses_past_the_end() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le16(&b, 0), Some(0x0201));
        assert_eq!(le32(&b, 1), Some(0x0504_0302));
        assert_eq!(le64(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(be32(&b, 0), Some(0x0102_0304));
        assert_eq!(le64(&b, 2), None);
        assert_eq!(le16(&b, 8), None);
        assert_eq!(be32(&b, usize::MAX), None);
        assert_eq!(le32(&[], 0), None);
    }
}
