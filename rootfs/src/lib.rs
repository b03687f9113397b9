//! Layers <-> snapshots (containerd's `rootfs`, `diff/apply` and `archive` packages).
//!
//! - [`apply_layers`] / [`apply_layer`] / [`Unpacker`]: unpack an image's layers into snapshots
//!   named by chain ID (reusing existing ones, in parallel when the snapshotter can rebase).
//! - [`apply`]: the tar applier (OCI whiteouts, overlay-native fast path, path safety).
//! - [`diff()`] and [`mod@diff`]: a snapshot's changes as a layer (walking and overlay differs).
//! - [`init_rootfs`]: a container's root filesystem over an image.
//! - [`content`]: the OCI image-layout content store (digest-verified blobs).
//! - [`mount`]: performing and undoing a snapshotter's mounts; [`export`]: layer stores.
//! - [`registry`]: the OCI registry client (manifests, verified blob streams, range reads).
//!   With feature `testing`, `testing` has harnesses for tests (a real registry, a fault proxy).
//!
//! ```no_run
//! use rootfs::applier::ContentApplier;
//! use rootfs::content::ContentStore;
//! use snapshot_overlay::{Options, OverlaySnapshotter};
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = ContentStore::open("/images/busybox".as_ref())?;
//! let image = store.resolve(Some("latest"))?;
//! let sn = OverlaySnapshotter::open("/var/lib/strata".as_ref(), Options::default())?;
//! let chain = rootfs::apply_layers(&image.layers, &sn, &ContentApplier::new(store))?;
//! let mounts = rootfs::init_rootfs("my-container", chain.as_ref(), false, &sn)?;
//! let _guard = rootfs::mount::MountGuard::mount(&mounts, "/run/my-container".as_ref())?;
//! # Ok(())
//! # }
//! ```

pub mod applier;
pub mod apply;
pub mod content;
pub mod diff;
mod error;
pub mod estargz;
pub mod export;
mod init;
mod layer;
pub mod mount;
pub mod registry;
mod snapshot_diff;
#[cfg(feature = "testing")]
pub mod testing;
pub mod unpack;

pub use error::{Error, Result};
pub use init::{init_layer_name, init_rootfs};
pub use layer::{Applier, Layer};
pub use snapshot_diff::diff;
pub use unpack::{LayerOutcome, UnpackOpts, Unpacker, apply_layer, apply_layers};
