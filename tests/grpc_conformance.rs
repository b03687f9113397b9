//! snapshot-core's conformance suite through `strata serve`'s gRPC service and a gRPC client on
//! a unix socket, so every case and every error kind crosses the wire. Needs root and overlayfs.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod grpc;

use std::io;
use std::path::Path;
use std::sync::Arc;

use snapshot_core::testsuite::Mounter;
use snapshot_core::{Mount, Result, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

/// Mounts through `rootfs::mount` (containerd's `mount.All` / `UnmountAll`).
struct RootfsMounter;

impl Mounter for RootfsMounter {
    fn mount(&self, mounts: &[Mount], target: &Path) -> io::Result<()> {
        rootfs::mount::mount_all(mounts, target).map_err(io::Error::other)
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        rootfs::mount::unmount(target).map_err(io::Error::other)
    }
}

/// An overlay snapshotter at `root` behind a server on `<root>.sock`; the client it returns
/// stops the server (which closes the snapshotter) when closed or dropped.
fn factory(root: &Path) -> Result<Box<dyn Snapshotter>> {
    let sn = OverlaySnapshotter::open(root, Options::default())?;
    let client = grpc::serve_in_process(Arc::new(sn), &root.with_extension("sock"))?;
    Ok(Box::new(client))
}

snapshot_core::snapshotter_conformance!(factory, &RootfsMounter);
