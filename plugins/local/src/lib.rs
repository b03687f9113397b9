//! strata plugin `local`: mounts a layer kept unpacked in a local layer store.
//!
//! Options: `{ "store": "/path/to/layer-store" }`. The store has one directory per layer,
//! `<store>/<algorithm>/<hex>/`, holding the unpacked layer in overlay form (whiteouts as 0/0
//! character devices, opaque directories with `trusted.overlay.opaque=y`), so a mounted layer is
//! directly usable as an overlay lower directory. The layer is named by its digest in the labels
//! (see [`fs_plugin_api::layer_digest`]) and mounted as a read-only bind mount.

mod sys;

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use fs_plugin_api::{
    Plugin,
    model::{Error, Labels, Result},
};
use serde::Deserialize;

fs_plugin_api::export_plugin!(
    name = "local",
    version = env!("CARGO_PKG_VERSION"),
    constructor = LocalFs::new,
);

/// The plugin's options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The layer store: an absolute path to an existing directory.
    pub store: PathBuf,
}

/// Mounts layers from one local layer store.
#[derive(Debug)]
pub struct LocalFs {
    store: PathBuf,
}

impl LocalFs {
    /// Checks the options: the store must be an existing directory, given by an absolute path.
    pub fn new(options: Options) -> Result<Self> {
        let store = options.store;
        if !store.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "store {}: must be an absolute path",
                store.display()
            )));
        }
        match std::fs::metadata(&store) {
            Ok(m) if m.is_dir() => Ok(LocalFs { store }),
            Ok(_) => Err(Error::InvalidArgument(format!(
                "store {}: not a directory",
                store.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(Error::NotFound(format!("layer store {}", store.display())))
            }
            Err(e) => Err(Error::io(format!("layer store {}", store.display()), e)),
        }
    }

    /// The store directory of the layer named by `labels`.
    fn layer_dir(&self, labels: &Labels) -> Result<PathBuf> {
        let digest = fs_plugin_api::layer_digest(labels).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no layer digest in the labels (expected {})",
                fs_plugin_api::LABEL_LAYER_DIGEST
            ))
        })?;
        let (algorithm, hex) = fs_plugin_api::split_layer_digest(digest)?;
        Ok(self.store.join(algorithm).join(hex))
    }
}

impl Plugin for LocalFs {
    fn mount(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let layer = self.layer_dir(labels)?;
        match std::fs::metadata(mountpoint) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "mountpoint {}: not a directory",
                    mountpoint.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("mountpoint {}", mountpoint.display()), e)),
        }
        match std::fs::metadata(&layer) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "layer {}: not a directory",
                    layer.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "layer {} in the store",
                    layer.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("layer {}", layer.display()), e)),
        }
        sys::bind_mount_read_only(&layer, mountpoint)
    }

    fn check(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let layer = self.layer_dir(labels)?;
        let unavailable =
            |what: String| Error::Unavailable(format!("layer {}: {what}", layer.display()));
        let store = std::fs::metadata(&layer)
            .map_err(|e| unavailable(format!("gone from the store ({e})")))?;
        let mounted = std::fs::metadata(mountpoint)
            .map_err(|e| unavailable(format!("mountpoint {}: {e}", mountpoint.display())))?;
        // A bind mount's root is the store directory itself: same device, same inode.
        if (store.dev(), store.ino()) != (mounted.dev(), mounted.ino()) {
            return Err(unavailable(format!(
                "not mounted at {}",
                mountpoint.display()
            )));
        }
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> Result<()> {
        sys::unmount(mountpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fs_plugin_api::model::ErrorKind;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn labels(key: &str, value: &str) -> Labels {
        [(key.to_owned(), value.to_owned())].into_iter().collect()
    }

    fn store() -> (tempfile::TempDir, LocalFs) {
        let dir = tempfile::tempdir().unwrap();
        let fs = LocalFs::new(Options {
            store: dir.path().to_path_buf(),
        })
        .unwrap();
        (dir, fs)
    }

    #[test]
    fn a_layer_lives_under_its_algorithm_and_hex() {
        let (dir, fs) = store();
        let digest = format!("sha256:{HEX}");
        for key in [
            fs_plugin_api::LABEL_LAYER_DIGEST,
            fs_plugin_api::LABEL_STARGZ_DIGEST,
            fs_plugin_api::LABEL_CRI_LAYER_DIGEST,
        ] {
            let path = fs.layer_dir(&labels(key, &digest)).unwrap();
            assert_eq!(path, dir.path().join("sha256").join(HEX));
        }
    }

    #[test]
    fn a_digest_that_could_leave_the_store_is_an_invalid_argument() {
        let (_dir, fs) = store();
        for digest in [
            "sha256:../../etc",
            "sha256:",
            "md5:0123",
            "0123456789abcdef",
            &format!("sha256:{}", HEX.to_uppercase()),
            &format!("sha256:{HEX}/.."),
        ] {
            let e = fs
                .layer_dir(&labels(fs_plugin_api::LABEL_LAYER_DIGEST, digest))
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{digest}: {e}");
        }
    }

    #[test]
    fn labels_without_a_digest_are_an_invalid_argument() {
        let (_dir, fs) = store();
        let e = fs.layer_dir(&labels("other", "x")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("no layer digest"), "{e}");
    }

    #[test]
    fn a_missing_store_is_not_found_and_a_relative_one_invalid() {
        let e = LocalFs::new(Options {
            store: "/nonexistent/store".into(),
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = LocalFs::new(Options {
            store: "store".into(),
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn check_of_an_unmounted_layer_is_unavailable() {
        let (dir, fs) = store();
        let layer = dir.path().join("sha256").join(HEX);
        std::fs::create_dir_all(&layer).unwrap();
        let mountpoint = tempfile::tempdir().unwrap();
        let l = labels(fs_plugin_api::LABEL_LAYER_DIGEST, &format!("sha256:{HEX}"));
        let e = fs.check(mountpoint.path(), &l).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("not mounted at"), "{e}");
    }
}
