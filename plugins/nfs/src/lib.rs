//! strata plugin `nfs`: mounts a layer kept unpacked in a layer store exported over NFS.
//!
//! A cluster fills one layer store (`strata export --to <store> <image>`) on an NFS export; every
//! node mounts layers from it instead of downloading and unpacking them. The plugin needs no
//! kernel NFS client: it speaks NFSv3 itself (the `nfs3_client` crate, on a small runtime of
//! its own) and serves each layer through FUSE (`fuser`), read-only and in overlay form, so the
//! mountpoint is directly an overlay lower directory.
//!
//! Options (`[filesystem.options]`):
//!
//! ```toml
//! server = "10.0.0.5"        # IP address or host name
//! export = "/srv/layers"     # the exported layer store
//! mount_port = 20048         # MOUNT and NFS ports (rpcbind is not consulted)
//! nfs_port = 2049
//! store_layout = "sha256-dirs"   # <export>/<algorithm>/<hex>/ per layer (the only layout)
//! nfs_version = 3            # the only version
//! timeout_ms = 5000          # bound on every NFS call
//! ```
//!
//! NFSv3 carries no extended attributes, so overlay's opaque markers, file capabilities and
//! `user.*` attributes come from the layer's metadata index, which `strata export` publishes
//! beside the layer (`<export>/.strata-meta/<algorithm>/<hex>.json`); a layer without one is
//! refused rather than served incompletely.
//!
//! The FUSE mounts are served by the process that loaded the plugin and end with it (the plugin
//! unmounts them when it is dropped); a long-running `strata serve` keeps them up.

mod client;
mod fs;
mod index;
mod options;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use fs_plugin_api::{
    Plugin,
    model::{Error, Labels, Result},
};
use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use nfs3_client::nfs3_types::nfs3::{fattr3, ftype3, nfs_fh3};

pub use crate::options::Options;
use crate::{
    client::{Client, NfsError},
    fs::{LayerFs, Shared},
    index::LayerIndex,
};
/// FUSE mount helpers shared by the plugins.
pub(crate) use fs_plugin_api::fuse as sys;

fs_plugin_api::export_plugin!(
    name = "nfs",
    version = env!("CARGO_PKG_VERSION"),
    constructor = NfsFs::new,
);

/// Largest metadata index the plugin reads.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// How long unmount waits for a FUSE session to end, before and after aborting it.
const SESSION_END_WAIT: Duration = Duration::from_secs(2);

/// One mounted layer.
struct Mounted {
    session: BackgroundSession,
    shared: Arc<Shared>,
    digest: String,
    /// The export's root handle, to look the layer up again on check.
    export_root: nfs_fh3,
    /// The layer directory's NFS file id when it was mounted.
    fileid: u64,
    /// The kernel's FUSE connection id.
    connection: u64,
}

/// Mounts layers from one NFS-exported layer store.
pub struct NfsFs {
    client: Arc<Client>,
    // An Option so that Drop can shut it down after the mounts are gone.
    runtime: Option<tokio::runtime::Runtime>,
    mounts: Mutex<HashMap<PathBuf, Mounted>>,
}

/// The layer digest named by `labels`, validated.
fn digest_of(labels: &Labels) -> Result<&str> {
    let digest = fs_plugin_api::layer_digest(labels).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "no layer digest in the labels (expected {})",
            fs_plugin_api::LABEL_LAYER_DIGEST
        ))
    })?;
    fs_plugin_api::split_layer_digest(digest)?;
    Ok(digest)
}

/// The key of a mountpoint in the table of mounts.
fn key(mountpoint: &Path) -> PathBuf {
    mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf())
}

/// What the plugin found for a layer on the server.
struct Located {
    export_root: nfs_fh3,
    layer: (nfs_fh3, fattr3),
    index: LayerIndex,
}

impl NfsFs {
    /// Checks the options and starts the plugin's runtime; connects lazily.
    pub fn new(options: Options) -> Result<Self> {
        let settings = options::Settings::new(options)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-nfs")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the nfs plugin's runtime", e))?;
        Ok(NfsFs {
            client: Arc::new(Client::new(settings)),
            runtime: Some(runtime),
            mounts: Mutex::new(HashMap::new()),
        })
    }

    fn runtime(&self) -> Result<&tokio::runtime::Runtime> {
        self.runtime
            .as_ref()
            .ok_or_else(|| Error::Unavailable("the nfs plugin is shutting down".into()))
    }

    fn mounts(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Mounted>> {
        self.mounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `nfs://server/export`, for messages.
    fn store_url(&self) -> String {
        let s = self.client.settings();
        format!("nfs://{}{}", s.server_name, s.export)
    }

    /// The error a failed NFS call means to the host.
    fn error(&self, what: &str, e: NfsError) -> Error {
        match e {
            NfsError::MountDenied { .. } if e.is_not_found() => Error::NotFound(format!(
                "{what}: the export is not on the server {} ({e})",
                self.store_url()
            )),
            NfsError::MountDenied { .. } => {
                Error::FailedPrecondition(format!("{what}: {} refused: {e}", self.store_url()))
            }
            NfsError::Status { .. } if e.is_not_found() => Error::NotFound(format!(
                "{what}: not in the store {} ({e})",
                self.store_url()
            )),
            NfsError::Status { .. } => {
                Error::FailedPrecondition(format!("{what}: {} ({e})", self.store_url()))
            }
            _ => Error::Unavailable(format!("{what}: {} ({e})", self.store_url())),
        }
    }

    /// Finds layer `digest` and its metadata index on the server.
    async fn locate(&self, digest: &str) -> Result<Located> {
        let (algorithm, hex) = fs_plugin_api::split_layer_digest(digest)?;
        let layer_what = format!("layer {digest}");
        let export_root = self
            .client
            .export_root()
            .await
            .map_err(|e| self.error(&layer_what, e))?;
        let layer = self
            .client
            .lookup_path(&export_root, &[algorithm.as_bytes(), hex.as_bytes()])
            .await
            .map_err(|e| self.error(&layer_what, e))?;
        if layer.1.type_ != ftype3::NF3DIR {
            return Err(Error::FailedPrecondition(format!(
                "{layer_what}: {}/{algorithm}/{hex} is not a directory",
                self.store_url()
            )));
        }
        let index_name = format!("{hex}.json");
        let index_what = format!(
            "metadata index of {layer_what} ({}/{}/{algorithm}/{index_name})",
            self.store_url(),
            String::from_utf8_lossy(index::INDEX_DIR)
        );
        let (index_fh, index_attr) = self
            .client
            .lookup_path(
                &export_root,
                &[
                    index::INDEX_DIR,
                    algorithm.as_bytes(),
                    index_name.as_bytes(),
                ],
            )
            .await
            .map_err(|e| match self.error(&index_what, e) {
                // The layer is there but cannot be served exactly: not a missing layer.
                Error::NotFound(m) => Error::FailedPrecondition(format!(
                    "{m}; publish the layer with `strata export`, which writes it"
                )),
                other => other,
            })?;
        if index_attr.size > MAX_INDEX_BYTES {
            return Err(Error::FailedPrecondition(format!(
                "{index_what}: {} bytes, more than the {MAX_INDEX_BYTES} this plugin reads",
                index_attr.size
            )));
        }
        let data = self
            .client
            .read_exact(&index_fh, 0, index_attr.size as usize)
            .await
            .map_err(|e| self.error(&index_what, e))?;
        let index = LayerIndex::parse(&data, digest)
            .map_err(|e| Error::FailedPrecondition(format!("{index_what}: {e}")))?;
        Ok(Located {
            export_root,
            layer,
            index,
        })
    }

    /// Unmounts a mount of this plugin.
    fn unmount_mounted(mounted: Mounted, mountpoint: &Path) -> Result<()> {
        mounted.shared.cancel();
        sys::unmount_session(
            mountpoint,
            mounted.session,
            mounted.connection,
            SESSION_END_WAIT,
        )
    }
}

impl Plugin for NfsFs {
    fn mount(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let digest = digest_of(labels)?;
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
        let key = key(mountpoint);
        if self.mounts().contains_key(&key) {
            return Err(Error::AlreadyExists(format!(
                "a layer is already mounted at {}",
                mountpoint.display()
            )));
        }
        let runtime = self.runtime()?;
        let located = runtime.block_on(self.locate(digest))?;
        let fileid = located.layer.1.fileid;
        let xattr_paths = located.index.len();
        let shared = Shared::new(
            self.client.clone(),
            runtime.handle().clone(),
            located.index,
            located.layer,
        );
        let (algorithm, hex) = fs_plugin_api::split_layer_digest(digest)?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName(format!("{}/{algorithm}/{hex}", self.store_url())),
            MountOption::Subtype("strata-nfs".into()),
            MountOption::Dev,
            MountOption::Suid,
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(LayerFs::new(shared.clone()), &key, &config)
            .map_err(|e| Error::io(format!("FUSE mount at {}", mountpoint.display()), e))?;
        let connection = match sys::connection_id(&key) {
            Ok(id) => id,
            Err(e) => {
                shared.cancel();
                // Nothing may stay mounted when mount fails.
                let _ = session.umount_and_join();
                return Err(e);
            }
        };
        tracing::info!(mountpoint = %key.display(), digest, xattr_paths, "mounted layer from {}", self.store_url());
        self.mounts().insert(
            key,
            Mounted {
                session,
                shared,
                digest: digest.to_owned(),
                export_root: located.export_root,
                fileid,
                connection,
            },
        );
        Ok(())
    }

    fn check(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let digest = digest_of(labels)?;
        let (algorithm, hex) = fs_plugin_api::split_layer_digest(digest)?;
        let unavailable = |what: String| Error::Unavailable(format!("layer {digest}: {what}"));
        let key = key(mountpoint);
        let (export_root, fileid) = {
            let mounts = self.mounts();
            let Some(m) = mounts.get(&key) else {
                return Err(unavailable(format!(
                    "not mounted at {} by this plugin",
                    mountpoint.display()
                )));
            };
            if m.digest != digest {
                return Err(unavailable(format!(
                    "{} holds layer {}",
                    mountpoint.display(),
                    m.digest
                )));
            }
            if m.session.guard.is_finished() {
                return Err(unavailable(format!(
                    "the FUSE session at {} has ended",
                    mountpoint.display()
                )));
            }
            (m.export_root.clone(), m.fileid)
        };
        if !sys::is_mount_point(&key) {
            return Err(unavailable(format!(
                "not mounted at {}",
                mountpoint.display()
            )));
        }
        // A check is a probe: it asks the server even if calls were failing fast.
        self.client.reset_unresponsive();
        let found = self.runtime()?.block_on(
            self.client
                .lookup_path(&export_root, &[algorithm.as_bytes(), hex.as_bytes()]),
        );
        match found {
            Ok((_, attr)) if attr.fileid == fileid => Ok(()),
            Ok(_) => Err(unavailable(format!(
                "replaced in the store {} since it was mounted",
                self.store_url()
            ))),
            Err(e) => Err(unavailable(format!("{} ({e})", self.store_url()))),
        }
    }

    fn unmount(&self, mountpoint: &Path) -> Result<()> {
        let key = key(mountpoint);
        let mounted = self.mounts().remove(&key);
        match mounted {
            Some(m) => Self::unmount_mounted(m, &key),
            // A mount left by an earlier process (its server is gone), or nothing.
            None => sys::unmount(mountpoint),
        }
    }
}

impl Drop for NfsFs {
    fn drop(&mut self) {
        // The mounts are served by this instance: unmount them rather than leave dead ones.
        let mounts: Vec<(PathBuf, Mounted)> = self.mounts().drain().collect();
        for (mountpoint, mounted) in mounts {
            if let Err(e) = Self::unmount_mounted(mounted, &mountpoint) {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "unmount at shutdown failed");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fs_plugin_api::model::ErrorKind;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn labels(digest: &str) -> Labels {
        [(
            fs_plugin_api::LABEL_LAYER_DIGEST.to_owned(),
            digest.to_owned(),
        )]
        .into_iter()
        .collect()
    }

    /// A plugin whose server port has nothing listening.
    fn unreachable() -> NfsFs {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        NfsFs::new(
            serde_json::from_value(serde_json::json!({
                "server": "127.0.0.1", "export": "/export",
                "mount_port": port, "nfs_port": port, "timeout_ms": 1000
            }))
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_digest_that_could_leave_the_store_is_an_invalid_argument() {
        for digest in [
            "sha256:../../etc",
            "sha256:",
            "md5:0123",
            "0123456789abcdef",
            &format!("sha256:{}", HEX.to_uppercase()),
            &format!("sha256:{HEX}/.."),
        ] {
            let e = digest_of(&labels(digest)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{digest}: {e}");
        }
        assert_eq!(
            fs_plugin_api::split_layer_digest(&format!("sha256:{HEX}")).unwrap(),
            ("sha256", HEX)
        );
    }

    #[test]
    fn mount_with_the_server_down_is_unavailable_and_leaves_nothing_mounted() {
        let fs = unreachable();
        let mnt = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        let e = fs
            .mount(mnt.path(), &labels(&format!("sha256:{HEX}")))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains("nfs://127.0.0.1/export"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(!sys::is_mount_point(mnt.path()));
    }

    #[test]
    fn check_of_a_layer_never_mounted_is_unavailable() {
        let fs = unreachable();
        let mnt = tempfile::tempdir().unwrap();
        let e = fs
            .check(mnt.path(), &labels(&format!("sha256:{HEX}")))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains("not mounted"), "{e}");
    }

    #[test]
    fn unmount_of_nothing_is_not_found() {
        let fs = unreachable();
        let mnt = tempfile::tempdir().unwrap();
        let e = fs.unmount(mnt.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    }
}
