//! Layers <-> snapshots: rootfs applies OCI layers to snapshots, diffs snapshots back into layers
//! and mounts snapshots.
//!
//! Only mounting exists so far: [`mount`] performs the [`snapshot_core::Mount`]s a snapshotter
//! returns at a target directory and unmounts them again.
//!
//! ```no_run
//! use std::path::Path;
//! use rootfs::mount::MountGuard;
//! # fn demo(mounts: &[snapshot_core::Mount]) -> rootfs::Result<()> {
//! let guard = MountGuard::mount(mounts, Path::new("/run/strata/rootfs"))?;
//! // ... use guard.path() ...
//! guard.unmount()?; // or let it drop (errors are then only logged)
//! # Ok(())
//! # }
//! ```

pub mod applier;
pub mod apply;
pub mod content;
pub mod diff;
mod error;
pub mod export;
mod init;
mod layer;
pub mod mount;
mod snapshot_diff;
pub mod unpack;

pub use error::{Error, Result};
pub use init::{init_layer_name, init_rootfs};
pub use layer::{Applier, Layer};
pub use snapshot_diff::diff;
pub use unpack::{LayerOutcome, UnpackOpts, Unpacker, apply_layer, apply_layers};
