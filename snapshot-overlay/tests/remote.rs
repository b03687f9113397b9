//! The remote-snapshot flow (stargz, SEMANTICS.md §6.2-6.4) with a real bind-mounting backing
//! file system and real overlay mounts.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{LAYER_LABEL, StoreFs};
use rootfs::mount::MountGuard;
use snapshot_core::{
    ErrorKind, FileSystem, Kind, LABEL_REMOTE, LABEL_TARGET_REF, Labels, Snapshotter,
};
use snapshot_overlay::{Options, OverlaySnapshotter, REMOTE_LABEL_VALUE};

struct Setup {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    store: std::path::PathBuf,
    fs: Arc<StoreFs>,
}

impl Drop for Setup {
    /// Remote layers stay mounted after close: unmount what a test left behind.
    fn drop(&mut self) {
        let mounted: Vec<_> = self.fs.mounted.lock().unwrap().clone();
        for m in mounted {
            let _ = self.fs.unmount(&m);
        }
    }
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(store.join("layer-a")).unwrap();
    std::fs::write(store.join("layer-a/a.txt"), "from a").unwrap();
    std::fs::create_dir_all(store.join("layer-b")).unwrap();
    std::fs::write(store.join("layer-b/b.txt"), "from b").unwrap();
    let fs = Arc::new(StoreFs::new(&store));
    Setup {
        root: dir.path().join("root"),
        store,
        fs,
        _dir: dir,
    }
}

fn open(s: &Setup, opts: Options) -> OverlaySnapshotter {
    OverlaySnapshotter::open_with_filesystem(&s.root, opts, Some(s.fs.clone())).unwrap()
}

fn target_labels(target: &str, layer: &str) -> Labels {
    let mut l = Labels::new();
    l.insert(LABEL_TARGET_REF.into(), target.into());
    l.insert(LAYER_LABEL.into(), layer.into());
    l
}

/// Prepares `target` remotely on `parent`, expecting the AlreadyExists answer.
fn prepare_remote(sn: &OverlaySnapshotter, key: &str, parent: &str, target: &str, layer: &str) {
    let err = sn
        .prepare(key, parent, &target_labels(target, layer))
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::AlreadyExists,
        "remote prepare answers AlreadyExists: {err}"
    );
}

fn read(mounts: &[snapshot_core::Mount], file: &str) -> std::io::Result<String> {
    let target = tempfile::tempdir().unwrap();
    let g = MountGuard::mount(mounts, target.path()).unwrap();
    let out = std::fs::read_to_string(target.path().join(file));
    g.unmount().unwrap();
    out
}

#[test]
fn prepare_with_target_mounts_the_layer_and_commits_it_as_remote() {
    let s = setup();
    let sn = open(&s, Options::default());
    prepare_remote(&sn, "extract-1", "", "chain-a", "layer-a");
    let info = sn.stat("chain-a").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.labels[LABEL_REMOTE], REMOTE_LABEL_VALUE);
    assert_eq!(info.labels[LABEL_TARGET_REF], "chain-a");
    assert_eq!(
        sn.stat("extract-1").unwrap_err().kind(),
        ErrorKind::NotFound,
        "the extraction key became the target"
    );
    // A second layer on top, remote too, then a container over both: overlay merges them.
    prepare_remote(&sn, "extract-2", "chain-a", "chain-b", "layer-b");
    let m = sn.prepare("container", "chain-b", &Labels::new()).unwrap();
    assert_eq!(read(&m, "a.txt").unwrap(), "from a");
    assert_eq!(read(&m, "b.txt").unwrap(), "from b");
    // Writes go to the container's upper dir, never into the store.
    let target = tempfile::tempdir().unwrap();
    let g = MountGuard::mount(&m, target.path()).unwrap();
    std::fs::write(target.path().join("a.txt"), "changed").unwrap();
    g.unmount().unwrap();
    assert_eq!(
        std::fs::read_to_string(s.store.join("layer-a/a.txt")).unwrap(),
        "from a"
    );
    assert!(
        s.fs.checks.load(Ordering::SeqCst) >= 2,
        "layers are checked when used"
    );
}

#[test]
fn failed_remote_mount_falls_back_to_an_ordinary_active_snapshot() {
    let s = setup();
    let sn = open(&s, Options::default());
    let m = sn
        .prepare("extract-1", "", &target_labels("chain-x", "no-such-layer"))
        .unwrap();
    assert_eq!(
        m[0].kind, "bind",
        "fallback returns the mounts to unpack into"
    );
    assert_eq!(sn.stat("extract-1").unwrap().kind, Kind::Active);
    assert_eq!(sn.stat("chain-x").unwrap_err().kind(), ErrorKind::NotFound);
    let src = Path::new(&m[0].source);
    assert_eq!(
        std::fs::read_dir(src).unwrap().count(),
        0,
        "the mountpoint is clean"
    );
}

#[test]
fn a_failing_check_makes_dependent_snapshots_unavailable() {
    let s = setup();
    let sn = open(&s, Options::default());
    prepare_remote(&sn, "extract-1", "", "chain-a", "layer-a");
    sn.prepare("container", "chain-a", &Labels::new()).unwrap();
    std::fs::rename(s.store.join("layer-a"), s.store.join("gone")).unwrap();
    let err = sn.mounts("container").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains("chain-a"),
        "names the layer: {err}"
    );
    let err = sn.view("v", "chain-a", &Labels::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    std::fs::rename(s.store.join("gone"), s.store.join("layer-a")).unwrap();
    sn.mounts("container").unwrap();
}

#[test]
fn remote_snapshots_are_mounted_again_after_a_restart() {
    let s = setup();
    {
        let sn = open(&s, Options::default());
        prepare_remote(&sn, "extract-1", "", "chain-a", "layer-a");
        sn.close().unwrap();
    }
    // Still mounted and healthy: reopening keeps the mount (no second mount).
    let sn = open(&s, Options::default());
    assert_eq!(s.fs.mounts.load(Ordering::SeqCst), 1);
    sn.close().unwrap();
    // After a reboot the mount is gone: opening mounts it again from the stored labels.
    let mounted: Vec<_> = s.fs.mounted.lock().unwrap().clone();
    for m in mounted {
        s.fs.unmount(&m).unwrap();
    }
    let sn = open(&s, Options::default());
    assert_eq!(
        s.fs.mounts.load(Ordering::SeqCst),
        2,
        "mounted once at prepare, once at restore"
    );
    let m = sn.view("v", "chain-a", &Labels::new()).unwrap();
    assert_eq!(read(&m, "a.txt").unwrap(), "from a");
    sn.remove("v").unwrap();
    sn.remove("chain-a").unwrap();
    sn.close().unwrap();
}

#[test]
fn removing_a_remote_snapshot_unmounts_it_and_keeps_the_store() {
    for async_remove in [false, true] {
        let s = setup();
        let sn = open(
            &s,
            Options {
                async_remove,
                ..Default::default()
            },
        );
        prepare_remote(&sn, "extract-1", "", "chain-a", "layer-a");
        assert_eq!(s.fs.mounted.lock().unwrap().len(), 1);
        sn.remove("chain-a").unwrap();
        if async_remove {
            assert_eq!(
                s.fs.mounted.lock().unwrap().len(),
                1,
                "async remove defers the unmount to cleanup"
            );
            sn.cleanup().unwrap();
        }
        assert!(
            s.fs.mounted.lock().unwrap().is_empty(),
            "unmounted (async_remove={async_remove})"
        );
        assert_eq!(
            std::fs::read_to_string(s.store.join("layer-a/a.txt")).unwrap(),
            "from a",
            "the store is intact"
        );
        assert_eq!(
            std::fs::read_dir(s.root.join("snapshots")).unwrap().count(),
            0
        );
        sn.close().unwrap();
    }
}

#[test]
fn without_a_filesystem_the_target_label_is_an_ordinary_prepare() {
    let s = setup();
    let sn = OverlaySnapshotter::open(&s.root, Options::default()).unwrap();
    let m = sn
        .prepare("extract-1", "", &target_labels("chain-a", "layer-a"))
        .unwrap();
    assert_eq!(m[0].kind, "bind");
    assert_eq!(s.fs.mounts.load(Ordering::SeqCst), 0);
}
