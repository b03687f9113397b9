//! init_rootfs with the real overlay snapshotter and real mounts.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::os::unix::fs::MetadataExt;

use rootfs::mount::MountGuard;
use rootfs::{init_layer_name, init_rootfs};
use snapshot_core::{CommitOpts, ErrorKind, Kind, Labels, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

fn base(sn: &OverlaySnapshotter) {
    let m = sn.prepare("base-key", "", &Labels::new()).unwrap();
    let dir = std::path::PathBuf::from(&m[0].source);
    std::fs::write(dir.join("hello"), "world").unwrap();
    // `etc` is a file in the image: init must replace it with a directory.
    std::fs::write(dir.join("etc"), "not a dir").unwrap();
    std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).unwrap();
    sn.commit("base", "base-key", &CommitOpts::default())
        .unwrap();
}

#[test]
fn init_rootfs_adds_the_init_layer_and_mounts_rw() {
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
    base(&sn);
    let mounts = init_rootfs("c1", "base", false, &sn).unwrap();
    assert_eq!(sn.stat("c1").unwrap().kind, Kind::Active);
    assert_eq!(sn.stat("c1").unwrap().parent, init_layer_name("base"));
    let target = tempfile::tempdir().unwrap();
    let g = MountGuard::mount(&mounts, target.path()).unwrap();
    let root = target.path();
    assert_eq!(
        std::fs::read_to_string(root.join("hello")).unwrap(),
        "world"
    );
    for d in ["dev", "dev/pts", "dev/shm", "proc", "sys", "etc"] {
        let md = std::fs::metadata(root.join(d)).unwrap();
        assert!(md.is_dir(), "{d} is a directory");
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (1000, 1000, 0o755),
            "{d}"
        );
    }
    for f in [
        "dev/console",
        "etc/resolv.conf",
        "etc/hosts",
        "etc/hostname",
    ] {
        let md = std::fs::metadata(root.join(f)).unwrap();
        assert!(md.is_file() && md.len() == 0, "{f} is an empty file");
        assert_eq!(md.mode() & 0o7777, 0o644, "{f}");
    }
    assert_eq!(
        std::fs::read_link(root.join("etc/mtab")).unwrap(),
        std::path::Path::new("/proc/mounts")
    );
    std::fs::write(root.join("new"), "x").unwrap();
    g.unmount().unwrap();
}

#[test]
fn init_layer_is_shared_and_names_are_unique() {
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
    base(&sn);
    init_rootfs("c1", "base", false, &sn).unwrap();
    let created = sn.stat(&init_layer_name("base")).unwrap().created;
    init_rootfs("c2", "base", true, &sn).unwrap();
    assert_eq!(
        sn.stat(&init_layer_name("base")).unwrap().created,
        created,
        "init layer reused"
    );
    assert_eq!(sn.stat("c2").unwrap().kind, Kind::View);
    let err = init_rootfs("c1", "base", false, &sn).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    let err = init_rootfs("c3", "missing", false, &sn).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let mut n = 0;
    sn.walk(&[], &mut |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(
        n, 4,
        "base, init layer, c1, c2 — no leftover temporary keys"
    );
}
