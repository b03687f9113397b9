//! A complete strata plugin in one file: what the README walks through.
//!
//! Plugin `hello` mounts, for any layer, a small read-only tmpfs holding `hello.txt` with the
//! configured greeting and the layer's digest. Built by `cargo test` as a `cdylib`
//! (`target/debug/examples/libhello_plugin.so`); `cargo xtask test-plugins` loads and mounts it.
//!
//! ```toml
//! [filesystem]
//! plugin = "hello"
//! [filesystem.options]
//! greeting = "hello from a plugin"
//! ```

use std::path::Path;

use fs_plugin_api::{
    Plugin,
    model::{Error, Labels, Result},
};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::statfs::{TMPFS_MAGIC, statfs},
};
use serde::Deserialize;

fs_plugin_api::export_plugin!(
    name = "hello",
    version = env!("CARGO_PKG_VERSION"),
    constructor = Hello::new,
);

/// `[filesystem.options]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    greeting: String,
}

struct Hello {
    greeting: String,
}

impl Hello {
    fn new(options: Options) -> Result<Self> {
        if options.greeting.is_empty() {
            return Err(Error::InvalidArgument("greeting: must not be empty".into()));
        }
        Ok(Hello {
            greeting: options.greeting,
        })
    }
}

fn io(context: &str, mountpoint: &Path, e: impl Into<std::io::Error>) -> Error {
    Error::io(format!("{context} {}", mountpoint.display()), e.into())
}

impl Plugin for Hello {
    fn mount(&self, mountpoint: &Path, labels: &Labels) -> Result<()> {
        let digest = fs_plugin_api::layer_digest(labels)
            .ok_or_else(|| Error::InvalidArgument("no layer digest label".into()))?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(
            Some("hello"),
            mountpoint,
            Some("tmpfs"),
            flags,
            Some("size=64k"),
        )
        .map_err(|e| io("mount tmpfs at", mountpoint, e))?;
        let filled = std::fs::write(
            mountpoint.join("hello.txt"),
            format!("{} {digest}\n", self.greeting),
        )
        .map_err(|e| io("write hello.txt in", mountpoint, e))
        .and_then(|()| {
            mount(
                None::<&str>,
                mountpoint,
                None::<&str>,
                flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(|e| io("remount read-only", mountpoint, e))
        });
        if filled.is_err() {
            // Leave the mountpoint clean, as the contract asks.
            let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
        }
        filled
    }

    fn check(&self, mountpoint: &Path, _labels: &Labels) -> Result<()> {
        let fs = statfs(mountpoint).map_err(|e| io("statfs", mountpoint, e))?;
        if fs.filesystem_type() != TMPFS_MAGIC || !mountpoint.join("hello.txt").exists() {
            return Err(Error::Unavailable(format!(
                "{}: not a hello mount",
                mountpoint.display()
            )));
        }
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> Result<()> {
        umount2(mountpoint, MntFlags::empty()).map_err(|e| io("unmount", mountpoint, e))
    }
}
