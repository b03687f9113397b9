//! stargz's remote-snapshot flow on top of the overlay snapshotter (SEMANTICS.md §6.2-6.4): a
//! backing [`FileSystem`] mounts a layer into a snapshot's `fs` directory instead of it being
//! unpacked there.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, umount2};
use snapshot_core::{
    CommitOpts, Error, ErrorKind, FileSystem, Info, Kind, LABEL_REMOTE, LABEL_TARGET_REF, Labels,
    Result,
};

use crate::OverlaySnapshotter;

/// Value of [`LABEL_REMOTE`] on snapshots a backing file system provides.
pub const REMOTE_LABEL_VALUE: &str = "remote snapshot";

/// Mount points listed in `/proc/self/mountinfo` (octal escapes decoded).
pub(crate) fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True if something is mounted exactly at `path`.
pub(crate) fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|p| p == path)
}

/// Detaches every mount at or below `dir` (deepest first), as stargz does at start-up.
pub(crate) fn force_unmount_under(dir: &Path) {
    let mut points: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        if let Err(e) = umount2(&p, MntFlags::MNT_FORCE | MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p.display(), error = %e, "cannot unmount stale mount");
        }
    }
}

impl OverlaySnapshotter {
    /// The remote flow of Prepare: `key` was just created as an active snapshot. Asks the file
    /// system to mount the target layer into it; on success commits it as the target (answering
    /// AlreadyExists so the caller skips the download); on failure returns Ok and the caller
    /// falls back to an ordinary unpack.
    pub(crate) fn try_prepare_remote(&self, key: &str, labels: &Labels) -> Result<()> {
        let (Some(fs), Some(target)) = (self.filesystem(), labels.get(LABEL_TARGET_REF)) else {
            return Ok(());
        };
        let (id, _, _) = self.store().read(|tx| tx.get_info(key))?;
        let mountpoint = self.upper_dir(&id);
        if let Err(e) = fs.mount(&mountpoint, labels) {
            tracing::warn!(key, target, error = %e, remote_snapshot_prepared = false, "remote mount failed; falling back to unpacking");
            return Ok(());
        }
        let mut commit_labels = labels.clone();
        commit_labels.insert(LABEL_REMOTE.into(), REMOTE_LABEL_VALUE.into());
        let opts = CommitOpts {
            labels: commit_labels,
            parent: None,
        };
        match self.commit_inner(target, key, &opts, false) {
            Ok(()) => {}
            Err(e) if e.is(ErrorKind::AlreadyExists) => {}
            Err(e) => return Err(e),
        }
        Err(Error::AlreadyExists(format!("target snapshot {target:?}")))
    }

    /// Checks every remote layer from `key` up through its ancestors (stargz's Check on use);
    /// any failure makes the snapshot Unavailable.
    pub(crate) fn check_available(&self, key: &str) -> Result<()> {
        let Some(fs) = self.filesystem() else {
            return Ok(());
        };
        if key.is_empty() {
            return Ok(());
        }
        let chain = self.store().read(|tx| {
            let mut out = Vec::new();
            let mut next = key.to_string();
            while !next.is_empty() {
                let (id, info, _) = tx.get_info(&next)?;
                next = info.parent.clone();
                if info.labels.contains_key(LABEL_REMOTE) {
                    out.push((id, info));
                }
            }
            Ok(out)
        });
        let chain = chain.map_err(|e| Error::Unavailable(format!("snapshot {key:?}: {e}")))?;
        // Concurrently, as stargz does: each check may wait for its backend.
        let failures: Vec<Error> = std::thread::scope(|scope| {
            let checks: Vec<_> = chain
                .iter()
                .map(|(id, info)| {
                    let dir = self.upper_dir(id);
                    let fs = fs.clone();
                    scope.spawn(move || {
                        fs.check(&dir, &info.labels).map_err(|e| {
                            Error::Unavailable(format!(
                                "layer {:?} (snapshot {id}) unavailable: {e}",
                                info.name
                            ))
                        })
                    })
                })
                .collect();
            checks
                .into_iter()
                .filter_map(|c| match c.join() {
                    Ok(result) => result.err(),
                    Err(_) => Some(Error::Unavailable("a layer check panicked".into())),
                })
                .collect()
        });
        // The failure nearest to `key`, as a sequential walk would report it.
        match failures.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// On open: makes every remote snapshot usable again from its stored labels. A layer that is
    /// still mounted and passes its check is kept (another process, e.g. an earlier `strata`
    /// command, mounted it); a stale mount is detached and mounted again; a layer that cannot be
    /// mounted is logged and left to fail its availability check (like containerd's
    /// `allow_invalid_mounts_on_restart`), so one bad layer does not keep the snapshotter from
    /// starting.
    pub(crate) fn restore_remote(&self) -> Result<()> {
        let Some(fs) = self.filesystem() else {
            return Ok(());
        };
        let ids = self.store().read(|tx| tx.id_map())?;
        let by_name: std::collections::HashMap<&String, &String> =
            ids.iter().map(|(id, k)| (k, id)).collect();
        let mut remote = Vec::new();
        self.store().read(|tx| {
            let filter =
                snapshot_core::filter::Filter::parse(&[&format!("labels.\"{LABEL_REMOTE}\"")])?;
            tx.walk(&filter, &mut |info| {
                remote.push(info.clone());
                Ok(())
            })
        })?;
        // Layers are independent: remount them a few at a time (each mount reads and indexes
        // a layer's table of contents, and waits for its backend).
        let jobs: Vec<(PathBuf, &Info)> = remote
            .iter()
            .filter_map(|info| Some((self.upper_dir(by_name.get(&info.name)?), info)))
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let workers = jobs.len().clamp(1, RESTORE_WORKERS);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    while let Some((fs_dir, info)) =
                        jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        restore_one(fs.as_ref(), fs_dir, info);
                    }
                });
            }
        });
        Ok(())
    }

    /// Deletes snapshot directories, unmounting a remote layer first; a directory that is still
    /// a mount point is never deleted through (that would delete the backing store's files).
    pub(crate) fn remove_dirs(&self, dirs: Vec<PathBuf>) {
        for dir in dirs {
            let fs_dir = dir.join("fs");
            if let Some(fs) = self.filesystem()
                && is_mount_point(&fs_dir)
                && let Err(e) = fs.unmount(&fs_dir)
            {
                tracing::debug!(path = %fs_dir.display(), error = %e, "unmount before removal failed");
            }
            if is_mount_point(&fs_dir) {
                tracing::error!(path = %fs_dir.display(), "still mounted; not deleting it (cleanup will retry)");
                continue;
            }
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), %err, "failed to remove snapshot directory");
            }
        }
    }
}

/// Whether `kind` of Prepare takes the remote path (only active snapshots do).
pub(crate) fn wants_remote(kind: Kind, labels: &Labels) -> bool {
    kind == Kind::Active && labels.contains_key(LABEL_TARGET_REF)
}

/// Remote snapshots remounted at once when a snapshotter opens.
const RESTORE_WORKERS: usize = 4;

/// Makes one remote snapshot usable again (see `restore_remote`).
fn restore_one(fs: &dyn FileSystem, fs_dir: &Path, info: &Info) {
    if is_mount_point(fs_dir) {
        if fs.check(fs_dir, &info.labels).is_ok() {
            return;
        }
        force_unmount_under(fs_dir);
    }
    if let Err(e) = std::fs::create_dir_all(fs_dir) {
        tracing::warn!(path = %fs_dir.display(), error = %e, "cannot recreate remote snapshot directory");
        return;
    }
    match fs.mount(fs_dir, &info.labels) {
        Ok(()) => tracing::info!(snapshot = %info.name, "restored remote snapshot"),
        Err(e) => {
            tracing::warn!(snapshot = %info.name, error = %e, "cannot restore remote snapshot; it will be unavailable")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/x\04"), r"/x\04");
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(Path::new("/definitely/not/mounted")));
    }
}
