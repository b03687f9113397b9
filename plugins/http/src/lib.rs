//! strata plugin `http`: mounts eStargz layers lazily from an OCI registry.
//!
//! A layer stored in a registry as eStargz (SEMANTICS §6.7) is mounted at once: the plugin reads
//! its footer and table of contents (TOC) with HTTP `Range` requests, checks the TOC against the
//! digest the image manifest promised, and serves the file tree through FUSE (`fuser`),
//! read-only and in overlay form (whiteouts as 0/0 character devices, opaque directories with
//! the opaque xattr), so the mountpoint is directly an overlay lower directory. File contents
//! are fetched when read, one chunk (a gzip member) at a time, adjacent chunks of one read in
//! one request, each verified against its `chunkDigest` before any byte of it is returned: a
//! mismatch is an I/O error (EIO), never wrong data. Two readers of one chunk fetch it once.
//!
//! Fetched chunks go to an on-disk cache (`<cache_dir>/chunks/<chunk digest hex>`), bounded by
//! `cache_max_bytes` (least recently used evicted), shared by every mount of this process and
//! kept across restarts, as are the TOCs (`<cache_dir>/toc/<layer digest hex>`: a remount reads
//! no TOC from the network; it is verified again all the same). Several processes may share a
//! cache directory, each bounding what it indexed.
//!
//! At mount time the prioritised files are prefetched (up to `.prefetch.landmark`; nothing with
//! `.no.prefetch.landmark`; else the first `prefetch_bytes` of the blob), then, with
//! `background_fetch`, the rest of the layer at low priority (one thread per layer, pausing
//! while reads are in flight) until it is all local. Each mounted layer reports its progress in
//! `<parent of the mountpoint>/remote-status.json` ([`fs_plugin_api::status::LayerStatus`]:
//! `state` `lazy` or `complete`, `bytes_fetched`, `bytes_cached`, `bytes_total`,
//! `percent_cached`), rewritten about once a second while it changes and removed on unmount.
//!
//! Options (`[filesystem.options]`, all optional, unknown ones refused):
//!
//! ```toml
//! cache_dir = "/var/cache/strata/http"
//! cache_max_bytes = 10737418240   # 10 GiB
//! prefetch_bytes = 10485760       # 10 MiB, without landmark; label stargz.prefetch overrides
//! background_fetch = true
//! allow_no_verification = false   # mount layers without TOC digest if labelled skipverify
//! resolve_timeout_secs = 30       # bound on finding a layer at mount time
//! check_interval_secs = 60        # a registry answer this recent passes Check; 0: always ask
//! prefetch_timeout_secs = 10      # how long Check waits for the mount-time prefetch; 0: not at all
//! opaque_xattrs = ["trusted.overlay.opaque"]   # add "user.overlay.opaque" for rootless
//!
//! [filesystem.options.registry]   # rootfs::registry::RegistryOptions
//! max_in_flight = 8
//! timeout_secs = 30
//! retries = 3
//! docker_config = "/root/.docker/config.json"   # basic and token auth
//! [filesystem.options.registry.hosts."127.0.0.1:5000"]
//! plain_http = true
//! mirrors = ["127.0.0.1:5001"]
//! ```
//!
//! Labels (SEMANTICS §6.5; names in the [`labels`] table): the image reference and the layer
//! digest, in strata's, CRI's or stargz's spelling, and `containerd.io/snapshot/stargz/toc.digest`.
//! Without a TOC digest the mount is refused ("digest of TOC JSON must be passed") unless
//! `allow_no_verification` is set and the layer carries `.../stargz.skipverify`. A layer that is
//! not eStargz fails to mount right after its footer is read, with a reason saying so (the
//! snapshotter then falls back to an ordinary unpack).
//!
//! When a layer mounts, the other layers its layers label names are read ahead (footer, TOC,
//! tree; module `warm`): their mounts, which follow one by one, take them over after checking them
//! against their own TOC digest label.
//!
//! Check: the layer must be mounted here; if it is not all cached, the registry must have
//! served its blob within `check_interval_secs` (opening it, a fetch, an earlier Check) or
//! serve it now (else Unavailable; it recovers when the registry does), as stargz's
//! `valid_interval`; then it waits, up to `prefetch_timeout_secs`, for the mount-time prefetch. Unmount aborts reads still waiting for the registry.
//!
//! The FUSE mounts are served by the process that loaded the plugin and end with it.

mod cache;
mod fetch;
mod fs;
pub mod labels;
mod layer;
mod options;
mod warm;

#[cfg(test)]
mod tests;

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
use rootfs::registry::Registry;

pub use crate::options::Options;
use crate::{
    cache::ChunkCache,
    fs::LayerFs,
    labels::LayerSource,
    layer::{Layer, LayerSettings},
    warm::Warmer,
};
/// FUSE mount helpers shared by the plugins.
pub(crate) use fs_plugin_api::fuse as sys;

fs_plugin_api::export_plugin!(
    name = "http",
    version = env!("CARGO_PKG_VERSION"),
    constructor = HttpFs::new,
);

/// How long unmount waits for a FUSE session to end, before and after aborting it.
const SESSION_END_WAIT: Duration = Duration::from_secs(2);

/// One mounted layer.
struct Mounted {
    session: BackgroundSession,
    layer: Arc<Layer>,
    /// The kernel's FUSE connection id.
    connection: u64,
}

/// Mounts eStargz layers from OCI registries.
pub struct HttpFs {
    options: Options,
    registry: Registry,
    cache: Arc<ChunkCache>,
    mounts: Mutex<HashMap<PathBuf, Mounted>>,
    /// The image's other layers, read ahead of their mounts.
    warmer: Arc<Warmer>,
}

/// The key of a mountpoint in the table of mounts.
fn key(mountpoint: &Path) -> PathBuf {
    mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf())
}

impl HttpFs {
    /// Checks the options, opens the cache; connects lazily.
    pub fn new(options: Options) -> Result<Self> {
        options.validate()?;
        let registry = Registry::new(options.registry.clone())
            .map_err(|e| layer::error("http options: registry", e))?;
        let cache = ChunkCache::open(&options.cache_dir, options.cache_max_bytes).map_err(|e| {
            Error::io(
                format!("open the chunk cache in {}", options.cache_dir.display()),
                e,
            )
        })?;
        tracing::debug!(
            cache_dir = %options.cache_dir.display(),
            cached_bytes = cache.total_bytes(),
            "opened the chunk cache"
        );
        let cache = Arc::new(cache);
        let warmer = Warmer::new(registry.clone(), cache.clone(), options.index_options());
        Ok(HttpFs {
            options,
            registry,
            cache,
            mounts: Mutex::new(HashMap::new()),
            warmer: Arc::new(warmer),
        })
    }

    fn mounts(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Mounted>> {
        self.mounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unmounts a mount of this plugin.
    fn unmount_mounted(mounted: Mounted, mountpoint: &Path) -> Result<()> {
        mounted.layer.cancel();
        sys::unmount_session(
            mountpoint,
            mounted.session,
            mounted.connection,
            SESSION_END_WAIT,
        )
    }
}

impl Plugin for HttpFs {
    fn mount(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let source = LayerSource::from_labels(labels)?;
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
        // The image's other layers are read meanwhile; this one may have been read already.
        self.warmer
            .schedule(&source.reference, &source.digest, &source.image_layers);
        // One bound for both: waiting for a read ahead, then reading the layer here.
        let deadline = std::time::Instant::now() + self.options.resolve_timeout();
        let resolved = match self.warmer.take(
            &source.reference,
            &source.digest,
            self.options.resolve_timeout(),
        ) {
            Some(r) => {
                layer::verify_toc(&source, &r.toc_digest, self.options.allow_no_verification)?;
                r
            }
            None => layer::resolve_within(
                deadline,
                self.registry.clone(),
                self.cache.clone(),
                source.clone(),
                self.options.allow_no_verification,
                self.options.index_options(),
            )?,
        };
        let settings = LayerSettings {
            prefetch_bytes: self.options.prefetch_bytes,
            background_fetch: self.options.background_fetch,
            check_interval: self.options.check_interval(),
            prefetch_timeout: self.options.prefetch_timeout(),
        };
        let layer = Layer::new(
            source,
            resolved,
            self.registry.clone(),
            self.cache.clone(),
            &key,
            settings,
        );
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName("strata-http".into()),
            MountOption::Subtype("strata-http".into()),
            MountOption::Dev,
            MountOption::Suid,
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(LayerFs::new(layer.clone()), &key, &config)
            .map_err(|e| Error::io(format!("FUSE mount at {}", mountpoint.display()), e))?;
        let connection = match sys::connection_id(&key) {
            Ok(id) => id,
            Err(e) => {
                layer.cancel();
                // Nothing may stay mounted when mount fails.
                let _ = session.umount_and_join();
                return Err(e);
            }
        };
        layer.write_status();
        let worker = layer.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("strata-http-fetch".into())
            .spawn(move || worker.run_worker())
        {
            tracing::warn!(error = %e, "cannot start the layer's fetch thread; fetching on demand only");
            layer.end_prefetch();
        }
        tracing::info!(
            mountpoint = %key.display(),
            layer = %layer.source.digest,
            reference = %layer.source.reference,
            files = layer.index.nodes.len(),
            "mounted eStargz layer"
        );
        self.mounts().insert(
            key,
            Mounted {
                session,
                layer,
                connection,
            },
        );
        Ok(())
    }

    fn check(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let source = LayerSource::from_labels(labels)?;
        let key = key(mountpoint);
        let layer = {
            let mounts = self.mounts();
            let Some(m) = mounts.get(&key) else {
                // Another process (sharing the state dir) may serve the layer: its live FUSE
                // mount answers stat; a dead one fails with ENOTCONN.
                if sys::is_mount_point(mountpoint) && std::fs::metadata(mountpoint).is_ok() {
                    return Ok(());
                }
                return Err(Error::Unavailable(format!(
                    "layer {}: not mounted at {} by this plugin",
                    source.digest,
                    mountpoint.display()
                )));
            };
            if m.layer.source.digest != source.digest {
                return Err(Error::Unavailable(format!(
                    "layer {}: {} holds layer {}",
                    source.digest,
                    mountpoint.display(),
                    m.layer.source.digest
                )));
            }
            if m.session.guard.is_finished() {
                return Err(Error::Unavailable(format!(
                    "layer {}: the FUSE session at {} has ended",
                    source.digest,
                    mountpoint.display()
                )));
            }
            m.layer.clone()
        };
        layer.check()
    }

    fn unmount(&self, mountpoint: &Path) -> Result<()> {
        let key = key(mountpoint);
        let mounted = self.mounts().remove(&key);
        match mounted {
            Some(m) => Self::unmount_mounted(m, &key),
            // A mount left by an earlier process (its server is gone), or nothing (NotFound).
            None => sys::unmount(mountpoint),
        }
    }
}

impl Drop for HttpFs {
    fn drop(&mut self) {
        // The mounts are served by this instance: unmount them rather than leave dead ones.
        let mounts: Vec<(PathBuf, Mounted)> = self.mounts().drain().collect();
        for (mountpoint, mounted) in mounts {
            if let Err(e) = Self::unmount_mounted(mounted, &mountpoint) {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "unmount at shutdown failed");
            }
        }
    }
}
