//! A backing file system for tests: layers kept unpacked in a store directory
//! (`<store>/<name>`), mounted read-only by bind mount, chosen by the `test/layer` label.
#![allow(dead_code)] // each test crate uses part of it

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use snapshot_core::{Error, FileSystem, Labels, Mount, Result};

/// Label naming the layer directory in the store.
pub const LAYER_LABEL: &str = "containerd.io/snapshot/test.layer";

/// Bind-mounts `<store>/<layer>` read-only.
pub struct StoreFs {
    pub store: PathBuf,
    pub mounts: AtomicUsize,
    pub checks: AtomicUsize,
    pub mounted: Mutex<Vec<PathBuf>>,
}

impl StoreFs {
    pub fn new(store: &Path) -> StoreFs {
        StoreFs {
            store: store.to_path_buf(),
            mounts: AtomicUsize::new(0),
            checks: AtomicUsize::new(0),
            mounted: Mutex::new(Vec::new()),
        }
    }

    fn layer_dir(&self, labels: &Labels) -> Result<PathBuf> {
        let name = labels
            .get(LAYER_LABEL)
            .ok_or_else(|| Error::InvalidArgument(format!("no {LAYER_LABEL} label")))?;
        let dir = self.store.join(name);
        if !dir.is_dir() {
            return Err(Error::NotFound(format!(
                "layer {name} in {}",
                self.store.display()
            )));
        }
        Ok(dir)
    }
}

impl FileSystem for StoreFs {
    fn mount(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let dir = self.layer_dir(labels)?;
        let m = Mount {
            kind: "bind".into(),
            source: dir.display().to_string(),
            options: vec!["ro".into(), "rbind".into()],
        };
        rootfs::mount::mount_all(&[m], mountpoint)?;
        self.mounts.fetch_add(1, Ordering::SeqCst);
        self.mounted.lock().unwrap().push(mountpoint.to_path_buf());
        Ok(())
    }

    fn check(&self, _mountpoint: &Path, labels: &Labels) -> Result<()> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        self.layer_dir(labels)
            .map(|_| ())
            .map_err(|e| Error::Unavailable(e.to_string()))
    }

    fn unmount(&self, mountpoint: &Path) -> Result<()> {
        rootfs::mount::unmount(mountpoint)?;
        self.mounted.lock().unwrap().retain(|p| p != mountpoint);
        Ok(())
    }
}
