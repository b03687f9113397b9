//! The stable plugin ABI of strata: backing file systems (mount a layer that lives elsewhere
//! instead of unpacking it) built as `.so` files and loaded at run time.
//!
//! - Plugin authors implement [`Plugin`] and export it with [`export_plugin!`]; see the README.
//! - The host scans a directory with [`PluginRegistry::scan`] and makes a
//!   [`snapshot_core::FileSystem`] with [`PluginRegistry::load`], or does both from the
//!   config with [`config::Config::filesystem`].
//! - [`abi`] holds the types that cross the boundary (checked by `abi_stable` at load time).
//!
//! ```no_run
//! use fs_plugin_api::PluginRegistry;
//!
//! let registry = PluginRegistry::scan("/usr/lib/strata/plugins".as_ref())?;
//! let fs = registry.load("local", &serde_json::json!({ "store": "/srv/layers" }))?;
//! # Ok::<(), fs_plugin_api::Error>(())
//! ```

pub mod abi;
mod adapter;
pub mod config;
mod error;
mod export;
pub mod fuse;
mod loader;
pub mod status;

pub use abi::ABI_VERSION;
pub use adapter::LoadedFileSystem;
pub use error::{Error, LoadFailure, Result};
#[doc(hidden)]
pub use export::__private;
pub use export::{LOG_ENV, Plugin};
pub use loader::{PluginInfo, PluginRegistry, Rejected};

/// What plugin authors need from the snapshot model, so that a plugin depends on this crate only.
pub mod model {
    pub use snapshot_core::{Error, ErrorKind, Labels, Result};
}

/// Label naming the layer (its digest, `sha256:<hex>`) a strata snapshotter asks a plugin to mount.
pub const LABEL_LAYER_DIGEST: &str = snapshot_core::LABEL_LAYER_DIGEST;

/// Label naming the image (`registry/repository[:tag|@digest]`) a layer is fetched from.
pub const LABEL_IMAGE_REF: &str = snapshot_core::LABEL_IMAGE_REF;

/// stargz-snapshotter's label with the layer digest.
pub const LABEL_STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// The CRI plugin's label with the layer digest (stargz tries it too).
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";

/// The layer digest named by `labels`: [`LABEL_LAYER_DIGEST`], else [`LABEL_CRI_LAYER_DIGEST`],
/// else [`LABEL_STARGZ_DIGEST`]. Not validated.
pub fn layer_digest(labels: &snapshot_core::Labels) -> Option<&str> {
    [
        LABEL_LAYER_DIGEST,
        LABEL_CRI_LAYER_DIGEST,
        LABEL_STARGZ_DIGEST,
    ]
    .iter()
    .find_map(|key| labels.get(*key))
    .map(String::as_str)
}

/// The README's plugin, compiled as a doctest so that it keeps up with the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strata_digest_label_wins_over_cri_and_stargz() {
        let mut labels = snapshot_core::Labels::new();
        labels.insert(LABEL_STARGZ_DIGEST.into(), "sha256:stargz".into());
        assert_eq!(layer_digest(&labels), Some("sha256:stargz"));
        labels.insert(LABEL_CRI_LAYER_DIGEST.into(), "sha256:cri".into());
        assert_eq!(layer_digest(&labels), Some("sha256:cri"));
        labels.insert(LABEL_LAYER_DIGEST.into(), "sha256:strata".into());
        assert_eq!(layer_digest(&labels), Some("sha256:strata"));
    }
}
