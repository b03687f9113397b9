//! The `Snapshotter` trait: containerd's snapshotter contract, synchronously.

use crate::{CommitOpts, Info, Labels, Mount, Result, Usage};

/// containerd's snapshotter operations (SEMANTICS.md §1). Keys, names and parents share one key
/// space; an empty parent means "no parent". Implementations are safe to call from many threads.
pub trait Snapshotter: Send + Sync {
    /// Info of an active, view or committed snapshot. NotFound if missing.
    fn stat(&self, key: &str) -> Result<Info>;

    /// Updates labels only. No field paths, or `labels`: replace all labels; `labels.<k>`: set or
    /// (when absent from `info.labels`) delete `<k>`; any other path: InvalidArgument.
    fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info>;

    /// Resources used by the snapshot alone: live for active, recorded at commit for committed.
    fn usage(&self, key: &str) -> Result<Usage>;

    /// The mounts of an active or view snapshot (FailedPrecondition for committed).
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;

    /// Creates an active snapshot `key` on top of the committed `parent` ("" for none).
    fn prepare(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>>;

    /// Creates a read-only view `key` of the committed `parent`.
    fn view(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>>;

    /// Captures the active snapshot `key` as committed `name`; `key` disappears.
    fn commit(&self, name: &str, key: &str, opts: &CommitOpts) -> Result<()>;

    /// Removes a snapshot without children (FailedPrecondition otherwise).
    fn remove(&self, key: &str) -> Result<()>;

    /// Calls `f` for every snapshot matching any of `filters` (containerd filter syntax); no
    /// filters match everything. An error from `f` stops the walk and is returned.
    fn walk(&self, filters: &[&str], f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()>;

    /// Reclaims disk space of removed snapshots (and orphans left by a crash).
    fn cleanup(&self) -> Result<()>;

    /// Releases resources; a second call returns Ok.
    fn close(&self) -> Result<()>;

    /// Capabilities advertised to containerd (e.g. `rebase`: commit may adopt a parent).
    fn capabilities(&self) -> Vec<String> {
        Vec::new()
    }
}
