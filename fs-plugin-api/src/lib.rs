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
#[cfg(feature = "fuse")]
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

/// Splits a layer digest `sha256:<64 hex>` / `sha512:<128 hex>` into algorithm and hex, as
/// layer stores name their directories; anything else (which could name a path outside a
/// store) is an invalid argument.
pub fn split_layer_digest(digest: &str) -> model::Result<(&str, &str)> {
    let invalid = || {
        model::Error::InvalidArgument(format!(
            "layer digest {digest:?}: expected sha256:<64 lowercase hex>"
        ))
    };
    let (algorithm, hex) = digest.split_once(':').ok_or_else(invalid)?;
    let len = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err(invalid()),
    };
    if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(invalid());
    }
    Ok((algorithm, hex))
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

    #[test]
    fn layer_digests_split_only_when_they_cannot_name_another_path() {
        let hex = "a".repeat(64);
        assert_eq!(
            split_layer_digest(&format!("sha256:{hex}")).unwrap(),
            ("sha256", hex.as_str())
        );
        for bad in [
            "sha256:../../etc".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("md5:{hex}"),
            hex.clone(),
            format!("sha512:{hex}"),
        ] {
            assert!(split_layer_digest(&bad).is_err(), "{bad}");
        }
    }
}
