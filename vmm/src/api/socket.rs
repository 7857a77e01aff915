//! The control API's socket file and peers: bound private from creation,
//! renamed into place without replacing anything, and only our own uid (or
//! root) served.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Answer, Error};

/// Binds in a fresh 0700 directory next to `path`, makes the socket 0600
/// there (nobody else can reach it), then renames it into place without
/// replacing anything: no umask, no chmod of a path someone could swap.
pub(super) fn bind_private(path: &Path) -> Result<UnixListener, Error> {
    let name = path.display().to_string();
    let bind = |e| Error::Bind(name.clone(), e);
    let stale = match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(Error::PathInUse(name)),
        Ok(_) if UnixStream::connect(path).is_ok() => return Err(Error::InUse(name)),
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(bind(e)),
    };
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // A short name, so that the scratch path fits sun_path wherever the
    // target does (about 20 bytes more than the parent); a name someone
    // else took is skipped, never entered.
    let mut tries = 0;
    let dir = loop {
        let dir = parent.join(format!(
            ".rasvmm{}.{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
            Err(e) => return Err(bind(e)),
        }
    };
    let scratch = Scratch(dir.clone());
    let tmp = dir.join("s");
    let listener = UnixListener::bind(&tmp).map_err(bind)?;
    // `tmp` is in a 0700 directory of ours: nobody can swap it for another
    // file, so setting its mode by path is safe here (not at `path`).
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
    if stale {
        let _ = std::fs::remove_file(path);
    }
    rename_noreplace(&tmp, path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::InUse(name.clone()),
        _ => bind(e),
    })?;
    drop(scratch);
    Ok(listener)
}

/// Removes the scratch directory (and the socket if it is still there).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join("s"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// rename(2) that fails with EEXIST instead of replacing `to`; where
/// renameat2 is missing, link + unlink, which never replaces either.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let f = CString::new(from.as_os_str().as_bytes())?;
    let t = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: renameat2 reads two NUL-terminated paths that outlive the
    // call and touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS | libc::EINVAL) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(e),
    }
}

/// The peer's uid must be ours (or root's).
pub(super) fn peer_allowed(conn: &UnixStream) -> Result<(), String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .map_err(|_| "cannot check the peer".to_string())?;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred
    // that lives across the call; `conn` is an open socket.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!(
            "cannot check the peer: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid == me || cred.uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "peer uid {} is not allowed (only uid {me} and root)",
            cred.uid
        ))
    }
}

/// Writes one error line if the socket takes it at once, then closes.
pub(super) fn refuse(conn: &UnixStream, why: &str) {
    if conn.set_nonblocking(true).is_ok() {
        let _ = (&*conn).write(Answer::err(0, why).as_bytes());
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_of_our_uid_are_allowed() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_allowed(&a), Ok(()));
    }
}
