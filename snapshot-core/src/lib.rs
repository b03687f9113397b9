//! The snapshot model of strata: containerd's snapshotter contract without any mount, plugin,
//! async or gRPC machinery.
//!
//! - [`Snapshotter`]: the operations (prepare, view, commit, remove, walk, ...).
//! - [`MetaStore`]: durable, transactional snapshot metadata on an embedded ACID store (`redb`).
//! - [`identity`]: digests and chain IDs.
//! - [`filter`]: containerd's walk filter language.
//! - [`FileSystem`]: a backing file system that mounts layers living elsewhere.
//! - `testsuite` (feature `testsuite`): the conformance suite every snapshotter passes.

mod error;
mod filesystem;
pub mod filter;
pub mod identity;
mod metastore;
mod model;
mod snapshotter;
#[cfg(feature = "testsuite")]
pub mod testsuite;
mod usage;

pub use error::{Error, ErrorKind, Result};
pub use filesystem::FileSystem;
pub use metastore::{MetaStore, ReadTx, Snapshot, WriteTx};
pub use model::{
    CommitOpts, Info, Kind, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_OVERLAY_UPPERDIR,
    LABEL_REMOTE, LABEL_TARGET_REF, Labels, MAX_LABEL_SIZE, Mount, Usage, is_inherited_label,
    validate_labels,
};
pub use snapshotter::Snapshotter;
pub use usage::disk_usage;
