//! The applier for a snapshot's mounts (containerd's `diff/apply` on Linux): where to write,
//! and one `syncfs` afterwards.

use std::fs::DirBuilder;
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{Mode, OFlags};
use snapshot_core::Mount;

use super::{
    Applied, WhiteoutMode, apply_blob, apply_blob_listing_parents, decompress, in_user_namespace,
    sys,
};
use crate::mount::MountGuard;
use crate::{Error, Result};

/// Applies a layer blob to what `mounts` show and makes it durable with one `syncfs`.
///
/// * One `overlay` mount with an `upperdir=` (outside a user namespace): the layer is written
///   straight into the upperdir with [`WhiteoutMode::Overlay`] (opaque xattr `user.overlay.opaque`
///   when the mount has `userxattr`, else `trusted.overlay.opaque`), the `lowerdir=` entries as
///   lowers. This includes a `{overlay, upperdir=<dir>}` mount without lowers (parallel unpack).
/// * One read-write bind mount: written into its source with [`WhiteoutMode::Delete`].
/// * Anything else: mounted on a temporary directory (`$XDG_RUNTIME_DIR` or the temp dir;
///   overlay's `volatile` dropped), applied with [`WhiteoutMode::Delete`], unmounted, and the
///   directory removed (never recursively).
///
/// Media types and decompression as [`apply_blob`].
pub fn apply_to_mounts(
    media_type: &str,
    blob: impl Read + Send,
    mounts: &[Mount],
) -> Result<Applied> {
    decompress::check_media_type(media_type)?;
    if let [m] = mounts {
        if m.kind == "overlay"
            && !in_user_namespace()
            && let Some((upper, lowers)) = overlay_dirs(m)
        {
            let opaque_xattr = if m.options.iter().any(|o| o == "userxattr") {
                "user.overlay.opaque"
            } else {
                "trusted.overlay.opaque"
            };
            let unknown_lowers = lowers.is_empty();
            let mode = WhiteoutMode::Overlay {
                opaque_xattr: opaque_xattr.into(),
                lowers,
            };
            let (applied, implicit) = apply_blob_listing_parents(media_type, blob, &upper, &mode)?;
            sync_fs(&upper)?;
            if unknown_lowers {
                super::parents::record(&upper, implicit);
            }
            return Ok(applied);
        }
        if is_rw_bind(m) {
            let source = Path::new(&m.source);
            let applied = apply_blob(media_type, blob, source, &WhiteoutMode::Delete)?;
            sync_fs(source)?;
            return Ok(applied);
        }
    }
    if mounts.is_empty() {
        return Err(Error::InvalidArgument(
            "no mounts to apply a layer to".into(),
        ));
    }
    let mounts: Vec<Mount> = mounts
        .iter()
        .map(|m| Mount {
            options: m
                .options
                .iter()
                .filter(|o| !(m.kind == "overlay" && o.as_str() == "volatile"))
                .cloned()
                .collect(),
            ..m.clone()
        })
        .collect();
    let dir = TempDir::create()?;
    let guard = MountGuard::mount(&mounts, &dir.0)?;
    let applied = apply_blob(media_type, blob, guard.path(), &WhiteoutMode::Delete)
        .and_then(|a| sync_fs(guard.path()).map(|()| a));
    let unmounted = guard.unmount();
    match (applied, unmounted) {
        (Ok(applied), Ok(())) => dir.remove().map(|()| applied),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), unmounted) => {
            if let Err(u) = unmounted {
                tracing::warn!(error = %u, "failed to unmount after a failed apply");
            }
            Err(e)
        }
    }
}

/// The upperdir (the last one given) and lowerdirs (nearest first) of an overlay mount.
fn overlay_dirs(m: &Mount) -> Option<(PathBuf, Vec<PathBuf>)> {
    let mut upper = None;
    let mut lowers = Vec::new();
    for o in &m.options {
        if let Some(u) = o.strip_prefix("upperdir=") {
            upper = Some(PathBuf::from(u));
        } else if let Some(l) = o.strip_prefix("lowerdir=") {
            lowers = l
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect();
        } else if let Some(l) = o.strip_prefix("lowerdir+=") {
            lowers.push(PathBuf::from(l));
        }
    }
    upper
        .filter(|u| !u.as_os_str().is_empty())
        .map(|u| (u, lowers))
}

/// The layer directories (nearest first) that the mounts of a view show: an overlay's
/// lowerdirs, or a bind mount's source. None for other mounts.
pub(crate) fn layer_dirs(mounts: &[Mount]) -> Option<Vec<PathBuf>> {
    match mounts {
        [m] if m.kind == "overlay" => {
            let mut lowers = Vec::new();
            for o in &m.options {
                if let Some(l) = o.strip_prefix("lowerdir=") {
                    lowers = l
                        .split(':')
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                        .collect();
                } else if let Some(l) = o.strip_prefix("lowerdir+=") {
                    lowers.push(PathBuf::from(l));
                }
            }
            let upper = overlay_dirs(m).map(|(u, _)| u);
            Some(upper.into_iter().chain(lowers).collect())
        }
        [m] if m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
            Some(vec![PathBuf::from(&m.source)])
        }
        _ => None,
    }
}

fn is_rw_bind(m: &Mount) -> bool {
    let bind = m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
    bind && !m.is_readonly()
}

/// Flushes the filesystem holding `dir` to stable storage.
fn sync_fs(dir: &Path) -> Result<()> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| sys(format!("open {}", dir.display()), e))?;
    rustix::fs::syncfs(&fd).map_err(|e| sys(format!("syncfs {}", dir.display()), e))
}

/// A temporary mount point, removed with `rmdir` (never recursively) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty() && Path::new(d).is_dir())
            .map_or_else(std::env::temp_dir, PathBuf::from);
        loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("strata-apply-{}-{n}-{nanos}", std::process::id()));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(format!("create {}", path.display()), e)),
            }
        }
    }

    fn remove(mut self) -> Result<()> {
        let path = std::mem::take(&mut self.0);
        std::fs::remove_dir(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.0.as_os_str().is_empty() {
            return;
        }
        if let Err(e) = std::fs::remove_dir(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "failed to remove temporary mount point");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, options: &[&str]) -> Mount {
        Mount {
            kind: kind.into(),
            source: "src".into(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn overlay_dirs_from_options() {
        let m = mount(
            "overlay",
            &["workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"],
        );
        assert_eq!(
            overlay_dirs(&m),
            Some((PathBuf::from("/u"), vec!["/l1".into(), "/l2".into()]))
        );
        let fake = mount("overlay", &["upperdir=/u"]);
        assert_eq!(overlay_dirs(&fake), Some((PathBuf::from("/u"), vec![])));
        assert_eq!(overlay_dirs(&mount("overlay", &["lowerdir=/a:/b"])), None);
    }

    #[test]
    fn binds() {
        assert!(is_rw_bind(&mount("bind", &["rw", "rbind"])));
        assert!(!is_rw_bind(&mount("bind", &["ro", "rbind"])));
        assert!(is_rw_bind(&mount("none", &["rbind"])));
        assert!(!is_rw_bind(&mount("ext4", &["rw"])));
    }
}
