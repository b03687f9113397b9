//! For plugins that serve layers through FUSE: unmounting (also with requests in flight), the
//! kernel connection, the mount table.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::model::{Error, Result};
use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags, mount, umount2},
};

/// Where the kernel's FUSE control file system lists connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The kernel's identifier of the FUSE connection mounted at `mountpoint` (its superblock's
/// device number, as `/sys/fs/fuse/connections/<id>` names it).
pub fn connection_id(mountpoint: &Path) -> Result<u64> {
    let meta = std::fs::metadata(mountpoint)
        .map_err(|e| Error::io(format!("stat {}", mountpoint.display()), e))?;
    let dev = meta.dev();
    // The kernel's internal dev_t is major << 20 | minor.
    Ok((nix::sys::stat::major(dev) << 20) | nix::sys::stat::minor(dev))
}

/// Unmounts `mountpoint`: a plain unmount, or a lazy one when files are still open.
pub fn unmount(mountpoint: &Path) -> Result<()> {
    let context = || format!("unmount {}", mountpoint.display());
    match umount2(mountpoint, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => {
            umount2(mountpoint, MntFlags::MNT_DETACH).map_err(|e| Error::io(context(), e.into()))
        }
        Err(e @ (Errno::EINVAL | Errno::ENOENT)) => Err(Error::NotFound(format!(
            "{}: nothing mounted there ({e})",
            context()
        ))),
        Err(e) => Err(Error::io(context(), e.into())),
    }
}

/// Aborts FUSE connection `id` (every request pending or to come fails), mounting the FUSE
/// control file system at its usual place first if nothing is mounted there.
pub fn abort_connection(id: u64) -> Result<()> {
    let dir = PathBuf::from(FUSECTL);
    let abort = dir.join(id.to_string()).join("abort");
    if !abort.exists() && !is_mount_point(&dir) {
        mount(
            Some("fusectl"),
            &dir,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::io(format!("mount fusectl at {FUSECTL}"), e.into()))?;
    }
    match std::fs::write(&abort, "1") {
        Ok(()) => Ok(()),
        // The connection ended meanwhile.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("write {}", abort.display()), e)),
    }
}

/// The mount points of this process's mount namespace.
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// True if something is mounted at `path`.
pub fn is_mount_point(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mount_points().contains(&path)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits up to `limit` for a FUSE session to end once its mount is gone, then aborts its kernel
/// connection (requests waiting on a backend, files still open after a lazy unmount) and waits
/// `limit` again. False if it never ended: the caller must then leak the session, since dropping
/// it could unmount whatever is mounted at `mountpoint` next.
pub fn await_session_end(
    mountpoint: &Path,
    connection: u64,
    limit: Duration,
    is_finished: impl FnMut() -> bool + Copy,
) -> bool {
    if wait_until(limit, is_finished) {
        return true;
    }
    if let Err(e) = abort_connection(connection) {
        tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot abort the FUSE connection");
    }
    if wait_until(limit, is_finished) {
        return true;
    }
    tracing::error!(mountpoint = %mountpoint.display(), "FUSE session did not end; leaving it behind");
    false
}

/// Unmounts `mountpoint` (lazily when busy; already gone is fine) and ends its FUSE `session`
/// (kernel connection `connection`): see [`await_session_end`]. A session that never ends is
/// leaked rather than dropped.
pub fn unmount_session(
    mountpoint: &Path,
    session: fuser::BackgroundSession,
    connection: u64,
    limit: Duration,
) -> Result<()> {
    let result = match unmount(mountpoint) {
        // Unmounted behind our back: the session is ending anyway.
        Err(e) if e.kind() == crate::model::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    let ended = || session.guard.is_finished();
    if !await_session_end(mountpoint, connection, limit, ended) {
        std::mem::forget(session);
        return result;
    }
    if let Err(e) = session.join() {
        tracing::debug!(mountpoint = %mountpoint.display(), error = %e, "FUSE session ended with an error");
    }
    result
}

/// Polls `done` every 10 ms until it is true or `limit` has passed; returns the last answer.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/bad\9"), r"/bad\9");
    }

    #[test]
    fn waiting_is_bounded() {
        let start = Instant::now();
        assert!(!wait_until(Duration::from_millis(50), || false));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(wait_until(Duration::from_secs(5), || true));
    }
}
