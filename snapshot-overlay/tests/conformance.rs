//! snapshot-core's conformance suite (containerd's snapshotter testsuite and strata's contract
//! checks) against the overlay snapshotter, with synchronous and with asynchronous remove as
//! containerd 1.6 runs it, and as a remote snapshotter (with a backing file system). Needs root
//! and overlayfs.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::io;
use std::path::Path;

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

fn open(root: &Path, async_remove: bool) -> Result<Box<dyn Snapshotter>> {
    let opts = Options {
        async_remove,
        ..Options::default()
    };
    Ok(Box::new(OverlaySnapshotter::open(root, opts)?))
}

mod sync_remove {
    use super::*;

    fn factory(root: &Path) -> Result<Box<dyn Snapshotter>> {
        open(root, false)
    }

    snapshot_core::snapshotter_conformance!(factory, &RootfsMounter);
}

mod async_remove {
    use super::*;

    fn factory(root: &Path) -> Result<Box<dyn Snapshotter>> {
        open(root, true)
    }

    snapshot_core::snapshotter_conformance!(factory, &RootfsMounter);
}

mod with_backing_filesystem {
    use super::*;
    use std::sync::Arc;

    fn factory(root: &Path) -> Result<Box<dyn Snapshotter>> {
        let store = root.with_extension("store");
        std::fs::create_dir_all(&store).unwrap();
        let fs = Arc::new(common::StoreFs::new(&store));
        Ok(Box::new(OverlaySnapshotter::open_with_filesystem(
            root,
            Options::default(),
            Some(fs),
        )?))
    }

    snapshot_core::snapshotter_conformance!(factory, &RootfsMounter);
}
