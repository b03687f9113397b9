//! TEST FIXTURE, not a real plugin: it panics, so tests can see the host survive.
//!
//! - options `{ "panic_in_new": true }` make the constructor panic;
//! - `mount` panics with a message, `unmount` with a non-string payload;
//! - `check` succeeds, to show the instance still works after a panic.

use std::path::Path;

use fs_plugin_api::{
    Plugin,
    model::{Labels, Result},
};
use serde::Deserialize;

fs_plugin_api::export_plugin!(
    name = "panicking",
    version = env!("CARGO_PKG_VERSION"),
    constructor = Panicking::new,
);

/// The fixture's options.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Make the constructor panic.
    #[serde(default)]
    pub panic_in_new: bool,
}

/// A file system that panics.
pub struct Panicking;

impl Panicking {
    /// Panics if the options ask for it.
    pub fn new(options: Options) -> Result<Self> {
        if options.panic_in_new {
            panic!("panicking plugin: boom in the constructor");
        }
        Ok(Panicking)
    }
}

impl Plugin for Panicking {
    fn mount(&self, mountpoint: &Path, _labels: &Labels) -> Result<()> {
        panic!("panicking plugin: boom in mount {}", mountpoint.display());
    }

    fn check(&self, _mountpoint: &Path, _labels: &Labels) -> Result<()> {
        Ok(())
    }

    fn unmount(&self, _mountpoint: &Path) -> Result<()> {
        std::panic::panic_any(42_u32);
    }
}
