//! The overlayfs snapshotter: each snapshot is a directory `<root>/snapshots/<id>/fs` (plus `work`
//! for active ones); active snapshots with parents mount as overlay with the parents as lower
//! layers. Behaviour follows containerd's overlay snapshotter (SEMANTICS.md §3).
//!
//! ```no_run
//! use snapshot_core::{Labels, Snapshotter};
//! use snapshot_overlay::{Options, OverlaySnapshotter};
//! let sn = OverlaySnapshotter::open("/var/lib/strata".as_ref(), Options::default())?;
//! let mounts = sn.prepare("my-container", "", &Labels::new())?;
//! # Ok::<(), snapshot_core::Error>(())
//! ```

mod mounts;
mod overlay;
mod remote;

pub use mounts::{needs_userxattr, running_in_user_namespace};
pub use overlay::{Options, OverlaySnapshotter};
pub use remote::REMOTE_LABEL_VALUE;
