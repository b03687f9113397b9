//! Layers and the roles that turn them into snapshots and back.

use oci_spec::image::Descriptor;
use snapshot_core::Mount;

use crate::Result;

/// One image layer: `diff` describes the uncompressed tar (its digest is the diff ID), `blob`
/// the (possibly compressed) blob as stored and distributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The uncompressed layer: media type `application/vnd.oci.image.layer.v1.tar`, digest = diff ID.
    pub diff: Descriptor,
    /// The blob in the content store (gzip, zstd or plain tar).
    pub blob: Descriptor,
}

/// Applies a layer blob to mounts (containerd's `diff.Applier`): returns the descriptor of the
/// uncompressed stream that was applied (digest = the diff ID it actually had).
pub trait Applier: Send + Sync {
    /// Streams `blob` from wherever the applier reads content, verifies it, and writes its
    /// entries into what `mounts` show.
    fn apply(&self, blob: &Descriptor, mounts: &[Mount]) -> Result<Descriptor>;
}
