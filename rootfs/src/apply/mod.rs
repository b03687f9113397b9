//! Applying OCI layers: a layer blob (gzip, zstd or plain tar) streamed into a directory
//! (containerd's `diff/apply` and `archive.Apply`, SEMANTICS §5.5 and §5.6).
//!
//! * [`apply_to_mounts`] is the applier for a snapshot's mounts: it writes straight into an
//!   overlay upperdir (whiteouts in overlay's own form) or a bind mount's source, and mounts
//!   only when neither applies. One `syncfs` makes the layer durable.
//! * [`apply_blob`] decompresses by media type and magic bytes, then [`apply_tar`] applies the
//!   tar stream to a directory.
//!
//! Every entry stays inside the root: names are resolved chroot-like (absolute names re-rooted,
//! `..` clamped, symlinked parents followed inside the root only), the last component is never
//! followed, hardlinks must point inside the root and whiteouts at a sibling. GNU long names and
//! PAX headers over 1 MiB are refused before they are read. Errors never leave a panic behind;
//! a failed apply may leave partial content in the root, which the caller discards.
//!
//! Differences from containerd: an opaque marker keeps the parents of this layer's entries even
//! when no entry of their own created them (containerd deletes them, entries included); the xattrs `user.overlay.*` are refused like `trusted.*` (a
//! rootless overlay would obey them); a hardlink to a symlink never has its mode applied
//! through the symlink; an overlay whiteout replaces whatever the same layer put at its name;
//! a directory deleted later in the same layer does not fail the final time fix-up; parents
//! created with a lower's metadata get that lower's times back after their children are
//! written; sparse files are not supported; media types with suffixes other than `+gzip` /
//! `+zstd` (e.g. `+encrypted`) are unsupported rather than passed through; and a bind mount is
//! written through its source instead of a temporary mount.

mod decompress;
mod entry;
mod mounts;
mod parents;
mod path;
mod stream;
mod whiteout;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use snapshot_core::identity::Digest;

use crate::{Error, Result};

pub(crate) use decompress::decompress;
pub use mounts::apply_to_mounts;
pub(crate) use mounts::layer_dirs;
pub(crate) use parents::{forget_parents, settle_parents, unsettled_parents};
pub(crate) use stream::{Header as TarHeader, Kind as TarKind, TarStream, Time as TarTime};

/// How OCI whiteouts (`.wh.<name>`, `.wh..wh..opq`) are materialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// Plain directory (first layer, or a temporarily mounted merged view): `.wh.x` deletes
    /// `x`; an opaque marker deletes the directory's children not created by this layer.
    Delete,
    /// Writing straight into an overlay upperdir: `.wh.x` becomes a 0/0 character device `x`
    /// owned by the header's uid/gid; `.wh..wh..opq` sets `<opaque_xattr>=y` on its directory;
    /// missing parent directories copy owner, mode, times and xattrs from the first of `lowers`
    /// (nearest first) that has them as a directory.
    Overlay {
        /// `trusted.overlay.opaque` as root, `user.overlay.opaque` for rootless overlay.
        opaque_xattr: String,
        /// The overlay's lower directories, nearest first.
        lowers: Vec<PathBuf>,
    },
}

/// What an apply read: the uncompressed stream's digest (the layer's diff ID) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// SHA-256 of the whole uncompressed stream, trailing bytes after the tar end included.
    pub diff_id: Digest,
    /// Bytes in the uncompressed stream.
    pub size: u64,
}

/// Applies a tar stream (already decompressed) into `root`, an existing directory.
///
/// The stream is drained to its end, so the digest covers all of it. Checking it against the
/// expected diff ID is the caller's job.
pub fn apply_tar(tar: impl Read, root: &Path, mode: &WhiteoutMode) -> Result<Applied> {
    apply_tar_listing_parents(tar, root, mode).map(|(applied, _)| applied)
}

/// [`apply_tar`], also returning the parent directories created with default metadata because
/// `mode` is [`WhiteoutMode::Overlay`] without lowers (see [`settle_parents`]).
fn apply_tar_listing_parents(
    tar: impl Read,
    root: &Path,
    mode: &WhiteoutMode,
) -> Result<(Applied, Vec<PathBuf>)> {
    let mut stream = stream::TarStream::new(tar);
    let mut unpacker = entry::Unpacker::new(root, mode)?;
    let mut entries = 0u64;
    while let Some(header) = stream.next()? {
        unpacker.entry(&header, &mut stream)?;
        entries += 1;
    }
    let implicit = unpacker.finish()?;
    let (diff_id, size) = stream.finish()?;
    tracing::debug!(root = %root.display(), entries, size, %diff_id, "applied layer");
    Ok((Applied { diff_id, size }, implicit))
}

/// Applies a layer blob into `root`: decompression is chosen by media type (the OCI and Docker
/// layer types; others are [`Error::Unsupported`]) and always by magic bytes (gzip, zstd, else
/// plain; an empty blob is an empty layer), whatever compression the type claims. Then as
/// [`apply_tar`].
///
/// The blob is read and decompressed on a thread of its own while the entries are written.
///
/// An error the blob reader carries inside its `io::Error` (a [`crate::Error`], e.g. a digest
/// mismatch) is returned as that error.
pub fn apply_blob(
    media_type: &str,
    blob: impl Read + Send,
    root: &Path,
    mode: &WhiteoutMode,
) -> Result<Applied> {
    apply_blob_listing_parents(media_type, blob, root, mode).map(|(applied, _)| applied)
}

/// [`apply_blob`] with the implicit parents of [`apply_tar_listing_parents`].
fn apply_blob_listing_parents(
    media_type: &str,
    blob: impl Read + Send,
    root: &Path,
    mode: &WhiteoutMode,
) -> Result<(Applied, Vec<PathBuf>)> {
    decompress::check_media_type(media_type)?;
    decompress::with_decompressed(blob, |tar| apply_tar_listing_parents(tar, root, mode))
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArchive(msg.into())
}

fn sys(context: impl Into<String>, e: rustix::io::Errno) -> Error {
    Error::io(context, e.into())
}

/// Xattrs never taken from a layer nor copied from a lower: `trusted.*` (as containerd) and
/// overlayfs' own `user.overlay.*`, which a rootless overlay would obey.
fn reserved_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.") || name.starts_with(b"user.overlay.")
}

/// True in a user namespace that does not map the whole ID range (no device nodes there).
fn in_user_namespace() -> bool {
    static USERNS: OnceLock<bool> = OnceLock::new();
    *USERNS.get_or_init(|| match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => map.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"],
        Err(_) => false,
    })
}
