//! A newc cpio writer for the kexec initramfs: the agent packs the running
//! root (its binaries, /init, /boot/bzImage) so the kernel it kexecs into
//! boots the same guest and can kexec again.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Deepest directory nesting packed.
const MAX_DEPTH: usize = 16;
/// Largest archive packed (the guest root is a few MiB).
const MAX_ARCHIVE: usize = 64 << 20;

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: u32, name: &str) {
    // Names come from directory entries: at most NAME_MAX + path, far below 4 GiB.
    let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
    let fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, namesize, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Appends one entry (a directory, regular file or symlink) named `name`.
fn entry(out: &mut Vec<u8>, ino: &mut u32, path: &Path, name: &str) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    let perm = meta.permissions().mode() & 0o7777;
    *ino += 1;
    let data: Vec<u8> = if ft.is_symlink() {
        std::fs::read_link(path)?
            .to_string_lossy()
            .into_owned()
            .into_bytes()
    } else if ft.is_file() {
        std::fs::read(path)?
    } else {
        Vec::new()
    };
    let kind = if ft.is_dir() {
        0o040000
    } else if ft.is_symlink() {
        0o120000
    } else if ft.is_file() {
        0o100000
    } else {
        // Devices, sockets, fifos: the new kernel makes its own.
        return Ok(());
    };
    let size = u32::try_from(data.len()).map_err(|_| std::io::Error::other("file too large"))?;
    header(out, *ino, kind | perm, size, name);
    out.extend_from_slice(&data);
    pad(out);
    if out.len() > MAX_ARCHIVE {
        return Err(std::io::Error::other("archive too large"));
    }
    Ok(())
}

fn walk(
    out: &mut Vec<u8>,
    ino: &mut u32,
    dir: &Path,
    prefix: &str,
    depth: usize,
) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let path = dir.join(&n);
        let name = if prefix.is_empty() {
            n.clone()
        } else {
            format!("{prefix}/{n}")
        };
        entry(out, ino, &path, &name)?;
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            walk(out, ino, &path, &name, depth + 1)?;
        }
    }
    Ok(())
}

/// Packs `/`, skipping the top-level directories in `skip` (they are
/// still created, empty, as mount points).
pub fn pack_root(skip: &[&str]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut ino = 0u32;
    let mut names: Vec<String> = std::fs::read_dir("/")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let path = Path::new("/").join(&n);
        entry(&mut out, &mut ino, &path, &n)?;
        if std::fs::symlink_metadata(&path)?.is_dir() && !skip.contains(&n.as_str()) {
            walk(&mut out, &mut ino, &path, &n, 1)?;
        }
    }
    header(&mut out, 0, 0, 0, "TRAILER!!!");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_header_layout() {
        let mut out = Vec::new();
        header(&mut out, 1, 0o100755, 5, "init");
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[6..14], b"00000001");
        assert_eq!(&out[14..22], b"000081ed");
        assert_eq!(&out[54..62], b"00000005");
        assert_eq!(&out[94..102], b"00000005"); // namesize incl. NUL
        assert_eq!(&out[110..114], b"init");
        assert_eq!(out.len() % 4, 0);
    }
}
