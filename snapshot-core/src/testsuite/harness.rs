//! What the cases share: the snapshotter under test, mounting with a guard that always
//! unmounts, assertion helpers on error kinds, and containerd's `checkSnapshots` layer check.

use std::cell::Cell;
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};

use super::Mounter;
use super::fstest::{self, Change};
use crate::{CommitOpts, Error, ErrorKind, Info, Kind, Labels, Mount, Result, Snapshotter};

/// The label most snapshots of the suite carry (containerd's suite uses a GC root label too).
pub const GC_ROOT: &str = "containerd.io/gc.root";

/// Labels `{containerd.io/gc.root: testsuite}` plus `extra`.
pub fn labels(extra: &[(&str, &str)]) -> Labels {
    let mut l = Labels::from([(GC_ROOT.to_owned(), "testsuite".to_owned())]);
    l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    l
}

/// Commit options with the suite's labels and no parent.
pub fn commit_opts() -> CommitOpts {
    CommitOpts {
        labels: labels(&[]),
        parent: None,
    }
}

/// Unwraps `r`, panicking with what was being done and the error's kind otherwise.
#[track_caller]
pub fn ok<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: expected success, got {} error: {e}", e.kind()))
}

/// Requires `r` to fail with `kind`; returns the error.
#[track_caller]
pub fn fails<T: Debug>(what: &str, kind: ErrorKind, r: Result<T>) -> Error {
    match r {
        Ok(v) => panic!("{what}: expected a {kind} error, got success: {v:?}"),
        Err(e) if e.kind() != kind => panic!(
            "{what}: expected a {kind} error, got {} error: {e}",
            e.kind()
        ),
        Err(e) => e,
    }
}

/// Requires `info` to have this name, kind and parent.
#[track_caller]
pub fn expect_info(info: &Info, name: &str, kind: Kind, parent: &str) {
    assert_eq!(info.name, name, "expected stat to report name {name:?}");
    assert_eq!(info.kind, kind, "expected {name:?} to be {kind}");
    assert_eq!(
        info.parent, parent,
        "expected {name:?} to have parent {parent:?}"
    );
}

/// Applies `changes` to the plain directory `root`, panicking with the failed change.
#[track_caller]
pub fn apply_flat(root: &Path, changes: &[Change]) {
    if let Err(e) = fstest::apply(root, changes) {
        panic!("expected the changes to apply to the flat tree: {e}");
    }
}

/// One case's view of the world.
pub struct Ctx<'a> {
    /// The snapshotter under test.
    pub sn: &'a dyn Snapshotter,
    mounter: &'a dyn Mounter,
    /// Scratch directory for mountpoints and flat trees.
    pub work: PathBuf,
    seq: Cell<u32>,
}

/// A mount that is undone when dropped (also while a failing case unwinds).
pub struct Mounted<'a> {
    mounter: &'a dyn Mounter,
    /// The mountpoint.
    pub path: PathBuf,
    live: bool,
}

impl Mounted<'_> {
    /// Unmounts now, panicking if that fails.
    #[track_caller]
    pub fn unmount(mut self) {
        self.live = false;
        if let Err(e) = self.mounter.unmount(&self.path) {
            panic!("expected to unmount {}: {e}", self.path.display());
        }
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        if let Err(e) = self.mounter.unmount(&self.path) {
            eprintln!("testsuite: failed to unmount {}: {e}", self.path.display());
        }
    }
}

impl<'a> Ctx<'a> {
    /// A context whose scratch files live under `work`.
    pub fn new(sn: &'a dyn Snapshotter, mounter: &'a dyn Mounter, work: PathBuf) -> Self {
        Ctx {
            sn,
            mounter,
            work,
            seq: Cell::new(0),
        }
    }

    /// A snapshot key or name: an absolute path under `work/` (keys are arbitrary strings, and
    /// containerd's suite uses such paths).
    pub fn key(&self, name: &str) -> String {
        self.work.join(name).to_string_lossy().into_owned()
    }

    /// A number not returned before in this case (for unique names).
    pub fn next_seq(&self) -> u32 {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        n
    }

    /// Creates a new, uniquely named directory under `work/`.
    #[track_caller]
    pub fn fresh_dir(&self, prefix: &str) -> PathBuf {
        let dir = self.work.join(format!("{prefix}-{}", self.next_seq()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("expected to create {}: {e}", dir.display());
        }
        dir
    }

    /// Mounts `mounts` on a fresh directory named after `prefix`.
    #[track_caller]
    pub fn mount(&self, mounts: &[Mount], prefix: &str) -> Mounted<'a> {
        assert!(
            !mounts.is_empty(),
            "expected at least one mount for {prefix}, got none"
        );
        let path = self.fresh_dir(prefix);
        if let Err(e) = self.mounter.mount(mounts, &path) {
            panic!("expected to mount {mounts:?} on {}: {e}", path.display());
        }
        Mounted {
            mounter: self.mounter,
            path,
            live: true,
        }
    }

    /// Prepares `key` on `parent` with the suite's labels and mounts it.
    #[track_caller]
    pub fn prepare_mounted(&self, key: &str, parent: &str) -> Mounted<'a> {
        let mounts = ok(
            &format!("prepare {key} on {parent:?}"),
            self.sn.prepare(key, parent, &labels(&[])),
        );
        self.mount(&mounts, "active")
    }

    /// Commits `key` as `name` with the suite's labels.
    #[track_caller]
    pub fn commit(&self, name: &str, key: &str) {
        ok(
            &format!("commit {key} as {name}"),
            self.sn.commit(name, key, &commit_opts()),
        );
    }

    /// Creates the committed `name` on `parent` (through the active `<name>-a`).
    #[track_caller]
    pub fn committed(&self, name: &str, parent: &str) {
        let key = format!("{name}-a");
        ok(
            &format!("prepare {key}"),
            self.sn.prepare(&key, parent, &labels(&[])),
        );
        self.commit(name, &key);
    }

    /// Requires `key` to exist with this kind and parent.
    #[track_caller]
    pub fn expect_stat(&self, key: &str, kind: Kind, parent: &str) {
        expect_info(
            &ok(&format!("stat {key}"), self.sn.stat(key)),
            key,
            kind,
            parent,
        );
    }

    /// Applies `changes` to a mounted snapshot. A directory rename refused with EXDEV is left
    /// out (overlayfs without `redirect_dir` cannot rename lower directories; containerd's suite
    /// skips that rename for overlay). Returns the changes that were applied.
    #[track_caller]
    pub fn apply_mounted(&self, root: &Path, changes: &[Change]) -> Vec<Change> {
        let mut applied = Vec::new();
        for change in changes {
            match fstest::apply_one(root, change) {
                Ok(()) => applied.push(change.clone()),
                Err(e) if is_exdev_dir_rename(root, change, &e) => {
                    eprintln!("testsuite: {change:?} refused with EXDEV; left out of both trees");
                }
                Err(e) => panic!("expected {change:?} to apply under {}: {e}", root.display()),
            }
        }
        applied
    }

    /// containerd's `checkSnapshots`: builds a chain with one snapshot per layer (prepare, mount,
    /// apply, unmount, commit), applies the same layers to a flat directory, and after each layer
    /// requires a mounted view of the new snapshot to equal the flat directory.
    #[track_caller]
    pub fn check_snapshots(&self, layers: &[Vec<Change>]) {
        let flat = self.fresh_dir("flat");
        let mut parent = String::new();
        for (i, layer) in layers.iter().enumerate() {
            let n = i + 1;
            let name = self.key(&format!("layer-{}", self.next_seq()));
            let key = format!("{name}-prepare");
            let active = self.prepare_mounted(&key, &parent);
            let applied = self.apply_mounted(&active.path, layer);
            active.unmount();
            self.commit(&name, &key);
            apply_flat(&flat, &applied);
            self.check_view(&name, &flat, &format!("layer {n}"));
            parent = name;
        }
    }

    /// Requires a mounted view of the committed `name` to equal the directory `expected`, then
    /// removes the view.
    #[track_caller]
    pub fn check_view(&self, name: &str, expected: &Path, what: &str) {
        let view = format!("{name}-view");
        let mounts = ok(
            &format!("{what}: view {view} of {name}"),
            self.sn.view(&view, name, &labels(&[])),
        );
        let mounted = self.mount(&mounts, "check");
        if let Err(diff) = fstest::check_directory_equal(expected, &mounted.path) {
            panic!("{what}: expected the view of {name} to equal the flat tree: {diff}");
        }
        mounted.unmount();
        ok(
            &format!("{what}: remove view {view}"),
            self.sn.remove(&view),
        );
    }
}

fn is_exdev_dir_rename(root: &Path, change: &Change, e: &io::Error) -> bool {
    const EXDEV: i32 = 18;
    let Change::Rename { from, .. } = change else {
        return false;
    };
    let from_is_dir = root.join(from.trim_start_matches('/')).is_dir();
    from_is_dir && e.raw_os_error() == Some(EXDEV)
}
