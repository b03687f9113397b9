//! Layer stores: each layer kept unpacked, in overlay form, at `<store>/<algorithm>/<hex>` of its
//! blob digest — what the `local` (and `nfs`) backing file systems mount instead of unpacking.
//!
//! Beside each layer, `strata export` writes a metadata index (see [`index`]): what a file
//! protocol such as NFSv3 cannot carry (extended attributes: overlay's opaque markers,
//! `security.capability`, `user.*`), so a plugin that reads the store remotely can serve the
//! layer exactly.

pub mod index;

use std::path::{Path, PathBuf};

use snapshot_core::identity::Digest;

use crate::Result;
use crate::apply::{WhiteoutMode, apply_blob};
use crate::content::ContentStore;
use crate::{Error, Layer};

/// The directory of `digest` in the layer store at `store`.
pub fn layer_dir(store: &Path, digest: &Digest) -> PathBuf {
    store
        .join(digest.algorithm().as_ref())
        .join(digest.digest())
}

/// Whether a layer was newly exported or already in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exported {
    /// Written now.
    Written,
    /// Already there (published by an earlier export).
    Present,
}

/// Unpacks `layer` from `content` into the layer store at `store`, atomically: it is written
/// into a temporary directory, verified (blob digest and diff ID), synced, then renamed into
/// place, so a half-written layer is never visible under its digest.
pub fn export_layer(content: &ContentStore, layer: &Layer, store: &Path) -> Result<Exported> {
    let digest: Digest = layer.blob.digest().clone();
    let target = layer_dir(store, &digest);
    if target.is_dir() {
        // Published by an exporter that predates the index: add it (idempotent).
        if !index::index_path(store, &digest).is_file() {
            index::LayerIndex::scan(&target)?.publish(store, &digest)?;
        }
        return Ok(Exported::Present);
    }
    let parent = target
        .parent()
        .ok_or_else(|| Error::InvalidArgument(format!("bad store path {}", target.display())))?;
    std::fs::create_dir_all(parent)
        .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{}-", digest.digest()))
        .tempdir_in(parent)
        .map_err(|e| Error::io(format!("create temp dir in {}", parent.display()), e))?;
    // A layer's root is 0755 like a snapshot's `fs` (tempdir makes it 0700).
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| Error::io(format!("chmod {}", tmp.path().display()), e))?;
    let mode = WhiteoutMode::Overlay {
        opaque_xattr: "trusted.overlay.opaque".into(),
        lowers: Vec::new(),
    };
    let blob = content.open_blob(&layer.blob)?;
    let applied = apply_blob(layer.blob.media_type().as_ref(), blob, tmp.path(), &mode)?;
    if applied.diff_id.as_ref() != layer.diff.digest().as_ref() {
        return Err(Error::DigestMismatch {
            what: format!("diff ID of layer {digest}"),
            expected: layer.diff.digest().to_string(),
            actual: applied.diff_id.to_string(),
        });
    }
    // The index is published before the layer: a layer visible under its digest always has one.
    index::LayerIndex::scan(tmp.path())?.publish(store, &digest)?;
    let dir = std::fs::File::open(tmp.path())
        .map_err(|e| Error::io(format!("open {}", tmp.path().display()), e))?;
    nix::unistd::syncfs(&dir).map_err(|e| Error::io("syncfs layer store", e.into()))?;
    let tmp_path = tmp.keep();
    match std::fs::rename(&tmp_path, &target) {
        Ok(()) => Ok(Exported::Written),
        // Another exporter published the same layer first.
        Err(_) if target.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp_path);
            Ok(Exported::Present)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp_path);
            Err(Error::io(format!("publish {}", target.display()), e))
        }
    }
}
