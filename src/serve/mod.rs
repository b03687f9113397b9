//! `strata serve`: the overlay snapshotter as a containerd proxy snapshotter
//! (`[proxy_plugins.NAME] type = "snapshot"`, SEMANTICS.md §7), serving containerd's
//! `containerd.services.snapshots.v1.Snapshots` gRPC API on a unix socket.
//!
//! - `proto`: code generated from the vendored containerd protos (`proto/ORIGIN.md`).
//! - `convert`: proto <-> `snapshot_core` types, errors <-> gRPC statuses.
//! - `service`: the tonic service; every snapshotter call runs on the blocking pool.
//! - `client.rs`: a `Snapshotter` over the gRPC API, compiled by the tests (`tests/`), which
//!   run the conformance suite and containerd through this server.

mod convert;
mod proto;
mod service;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use snapshot_core::Snapshotter;
use snapshot_overlay::{Options, OverlaySnapshotter};

use crate::commands::Settings;

/// Options of `strata serve` beyond the shared settings.
pub struct ServeOpts<'a> {
    /// The unix socket to listen on.
    pub address: &'a Path,
    /// Remove only deletes metadata; disk space is reclaimed by `Cleanup` (which containerd's
    /// garbage collector calls), as containerd 1.x's built-in overlayfs snapshotter does.
    pub async_remove: bool,
}

/// Runs the server until SIGTERM or SIGINT, then shuts down gracefully: stops accepting, lets
/// calls in flight finish, closes the snapshotter and removes the socket.
pub fn run(settings: &Settings, opts: &ServeOpts<'_>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("strata-serve")
        .build()
        .context("start the async runtime")?;
    rt.block_on(serve(settings, opts))
}

async fn serve(settings: &Settings, opts: &ServeOpts<'_>) -> Result<()> {
    let address = opts.address;
    // Signals are hooked before anything is opened, so a stop request is never lost.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("install the SIGINT handler")?;

    let root = settings.root.clone();
    let filesystem = settings.filesystem()?;
    let async_remove = opts.async_remove;
    // Opening restores remote layers (mounts them again); cleanup then reclaims orphans a crash
    // or an asynchronous remove left behind.
    let sn: Arc<dyn Snapshotter> = tokio::task::spawn_blocking(move || -> Result<_> {
        let options = Options {
            async_remove,
            ..Options::default()
        };
        let sn = OverlaySnapshotter::open_with_filesystem(&root, options, filesystem)
            .with_context(|| format!("open snapshotter at {}", root.display()))?;
        if let Err(e) = sn.cleanup() {
            tracing::warn!(error = %e, "cleanup at start failed");
        }
        Ok(Arc::new(sn))
    })
    .await
    .context("open the snapshotter")??;

    let listener = match bind(address) {
        Ok(l) => l,
        Err(e) => {
            let closing = sn.clone();
            let _ = tokio::task::spawn_blocking(move || closing.close()).await;
            return Err(e);
        }
    };
    tracing::info!(
        address = %address.display(),
        root = %settings.root.display(),
        remote = settings.has_filesystem(),
        capabilities = ?sn.capabilities(),
        "serving containerd.services.snapshots.v1.Snapshots"
    );

    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM"),
            _ = sigint.recv() => tracing::info!("SIGINT"),
        }
    };
    let served = service::serve(listener, sn, shutdown).await;
    if let Err(e) = std::fs::remove_file(address) {
        tracing::warn!(address = %address.display(), error = %e, "cannot remove the socket");
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds the socket, replacing a stale one (left by a server that died): a socket file nobody
/// listens on is removed; one somebody listens on, or any other file, is an error.
fn bind(address: &Path) -> Result<tokio::net::UnixListener> {
    match std::fs::symlink_metadata(address) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(address).is_ok() {
                bail!("{} is in use by another server", address.display());
            }
            tracing::info!(address = %address.display(), "removing stale socket");
            std::fs::remove_file(address)
                .with_context(|| format!("remove stale socket {}", address.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket", address.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("stat {}", address.display())),
    }
    if let Some(dir) = address.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    tokio::net::UnixListener::bind(address)
        .with_context(|| format!("listen on {}", address.display()))
}
