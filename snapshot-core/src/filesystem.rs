//! The backing `FileSystem` trait: mounts a layer that lives elsewhere instead of unpacking it.

use std::path::Path;

use crate::{Labels, Result};

/// A backing file system (stargz's `FileSystem`): makes a layer, chosen by the snapshot's labels,
/// appear at a directory. Implementations clean the mountpoint themselves when `mount` fails.
pub trait FileSystem: Send + Sync {
    /// Mounts the layer described by `labels` at `mountpoint` (an existing empty directory).
    fn mount(&self, mountpoint: &Path, labels: &Labels) -> Result<()>;

    /// Checks that the layer mounted at `mountpoint` is still usable (e.g. its backend answers).
    fn check(&self, mountpoint: &Path, labels: &Labels) -> Result<()>;

    /// Unmounts the layer at `mountpoint`.
    fn unmount(&self, mountpoint: &Path) -> Result<()>;
}
