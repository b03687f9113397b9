//! Parent directories of a parallel unpack's layers.
//!
//! A layer written into an upperdir without lowers (a parallel unpack writes every layer at
//! once) cannot copy the metadata of a missing parent from the layers below, as containerd's
//! `mkparent` does: they are being written too. Such parents are created with mode 0755 and
//! recorded here (per upperdir, in this process); once every layer is written and before any
//! is committed, [`settle_parents`] gives them the owner, mode, xattrs and times of the layer
//! below that has them, as an unpack in order would have. (containerd's parallel unpack leaves
//! them at 0755 root: a layer that adds `/root/x` without a `/root/` entry opens `/root`.)

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rustix::fs::{AtFlags, FileType, statat};
use rustix::io::Errno;

use super::path::{Missing, Resolver};
use super::sys;
use crate::Result;

/// Upperdir -> parents created there with default metadata (relative paths).
static UNSETTLED: Mutex<Option<HashMap<PathBuf, Vec<PathBuf>>>> = Mutex::new(None);

fn unsettled() -> MutexGuard<'static, Option<HashMap<PathBuf, Vec<PathBuf>>>> {
    UNSETTLED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records the parents an apply into `upper` (without lowers) created with default metadata.
pub(super) fn record(upper: &Path, dirs: Vec<PathBuf>) {
    let mut map = unsettled();
    let map = map.get_or_insert_with(HashMap::new);
    if dirs.is_empty() {
        map.remove(upper);
    } else {
        map.insert(upper.to_path_buf(), dirs);
    }
}

/// Whether a layer applied into `upper` left parents for [`settle_parents`].
pub(crate) fn unsettled_parents(upper: &Path) -> bool {
    unsettled().as_ref().is_some_and(|m| m.contains_key(upper))
}

/// Drops what was recorded for `upper` (its layer is discarded).
pub(crate) fn forget_parents(upper: &Path) {
    if let Some(m) = unsettled().as_mut() {
        m.remove(upper);
    }
}

/// Gives the parents recorded for `upper` the owner, mode, xattrs (except reserved ones) and
/// times of the first of `lowers` (nearest first, all fully written) that has them as a
/// directory; a lower holding something else there hides those below, as in an unpack in order.
/// Parents that an entry of the layer later replaced or removed are left alone.
pub(crate) fn settle_parents(upper: &Path, lowers: &[PathBuf]) -> Result<()> {
    let dirs = unsettled()
        .as_mut()
        .and_then(|m| m.remove(upper))
        .unwrap_or_default();
    if dirs.is_empty() || lowers.is_empty() {
        return Ok(());
    }
    let mut dirs = dirs;
    // Parents before their children, each once.
    dirs.sort();
    dirs.dedup();
    let mut paths = Resolver::new(upper, lowers)?;
    for rel in &dirs {
        let comps: Vec<&OsStr> = rel.iter().collect();
        let Some((&name, parent)) = comps.split_last() else {
            continue;
        };
        // Only along the same symlink-free path the apply created it on.
        if !paths.resolve(parent, Missing::Fail)? || paths.rel() != rel.parent().unwrap_or(rel) {
            continue;
        }
        match statat(paths.dir(), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Ok(_) | Err(Errno::NOENT) => continue,
            Err(e) => return Err(sys(format!("stat {}", rel.display()), e)),
        }
        paths.copy_from_lowers(rel, name)?;
    }
    tracing::debug!(upper = %upper.display(), parents = dirs.len(), "parents settled");
    Ok(())
}
