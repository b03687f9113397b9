//! `diff`: a snapshot's changes as a layer (containerd's `rootfs.CreateDiff`, SEMANTICS.md §5.3).

use snapshot_core::{Kind, Labels, Snapshotter};

use crate::Result;
use crate::content::ContentStore;
use crate::diff::{Compression, DiffOutput, diff_mounts};
use crate::unpack::unique_key_suffix;

/// Removes a temporary view, logging failures (the diff result does not depend on it).
struct TempView<'a> {
    sn: &'a dyn Snapshotter,
    key: String,
}

impl Drop for TempView<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.sn.remove(&self.key) {
            tracing::warn!(key = %self.key, error = %e, "failed to remove temporary view");
        }
    }
}

/// Writes the changes of snapshot `name` relative to its parent as a layer blob into `store`.
/// An active snapshot is diffed through its own mounts (for overlay: only its upper dir is
/// read); a committed one through a temporary view.
pub fn diff(
    name: &str,
    sn: &dyn Snapshotter,
    store: &ContentStore,
    compression: Compression,
) -> Result<DiffOutput> {
    let info = sn.stat(name)?;
    let suffix = unique_key_suffix();
    let lower_key = format!("{}-parent-view-{suffix}", info.parent);
    let lower = sn.view(&lower_key, &info.parent, &Labels::new())?;
    let _lower_view = TempView { sn, key: lower_key };
    let (upper, _upper_view) = match info.kind {
        Kind::Active => (sn.mounts(name)?, None),
        _ => {
            let key = format!("{name}-view-{suffix}");
            let m = sn.view(&key, name, &Labels::new())?;
            (m, Some(TempView { sn, key }))
        }
    };
    diff_mounts(&lower, &upper, compression, store)
}
