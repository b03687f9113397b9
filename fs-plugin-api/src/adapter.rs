//! A loaded plugin's file system as a [`snapshot_core::FileSystem`].

use std::path::Path;

use snapshot_core::{Error, FileSystem, Labels, Result};
use tracing::debug;

use crate::{
    abi::{FileSystemBox, PluginError, labels_to_ffi},
    error::core_error,
};

/// A file system made by a plugin, callable as a [`snapshot_core::FileSystem`]; errors keep the
/// plugin's kind and gain the plugin's name, the operation and the mountpoint as context.
pub struct LoadedFileSystem {
    plugin: String,
    inner: FileSystemBox,
}

impl LoadedFileSystem {
    pub(crate) fn new(plugin: &str, inner: FileSystemBox) -> Self {
        Self {
            plugin: plugin.to_owned(),
            inner,
        }
    }

    /// The name of the plugin that made this file system.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    fn call(
        &self,
        op: &str,
        mountpoint: &Path,
        f: impl FnOnce(&str) -> abi_stable::std_types::RResult<(), PluginError>,
    ) -> Result<()> {
        let context = format!("plugin {}: {op} {}", self.plugin, mountpoint.display());
        let Some(mp) = mountpoint.to_str() else {
            return Err(Error::InvalidArgument(format!(
                "{context}: plugins take UTF-8 mountpoints"
            )));
        };
        debug!(plugin = %self.plugin, op, mountpoint = mp, "calling plugin");
        f(mp).into_result().map_err(|e| {
            debug!(plugin = %self.plugin, op, mountpoint = mp, kind = %e.kind(), error = e.message(), "plugin failed");
            core_error(e.kind(), context, e.message.into_string())
        })
    }
}

impl FileSystem for LoadedFileSystem {
    fn mount(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let labels = labels_to_ffi(labels);
        self.call("mount", mountpoint, |mp| {
            self.inner.mount(mp.into(), &labels)
        })
    }

    fn check(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let labels = labels_to_ffi(labels);
        self.call("check", mountpoint, |mp| {
            self.inner.check(mp.into(), &labels)
        })
    }

    fn unmount(&self, mountpoint: &Path) -> Result<()> {
        self.call("unmount", mountpoint, |mp| self.inner.unmount(mp.into()))
    }
}
