//! Overlay-specific behaviour with real directories and mounts (SEMANTICS.md §3).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;

use rootfs::mount::MountGuard;
use snapshot_core::{CommitOpts, ErrorKind, Kind, LABEL_OVERLAY_UPPERDIR, Labels, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

fn open(root: &Path, opts: Options) -> OverlaySnapshotter {
    OverlaySnapshotter::open(root, opts).unwrap()
}

fn no_labels() -> Labels {
    Labels::new()
}

fn commit(sn: &OverlaySnapshotter, name: &str, key: &str) {
    sn.commit(name, key, &CommitOpts::default()).unwrap();
}

/// Prepares `key` on `parent`, writes `file` with `content` into its upper dir, commits `name`.
fn layer(sn: &OverlaySnapshotter, name: &str, parent: &str, file: &str, content: &str) {
    let key = format!("{name}-active");
    sn.prepare(&key, parent, &no_labels()).unwrap();
    let id = id_of(sn, &key);
    std::fs::write(sn.upper_dir(&id).join(file), content).unwrap();
    commit(sn, name, &key);
}

/// The ID (directory name) of `key`, read from the mounts or the upperdir label.
fn id_of(sn: &OverlaySnapshotter, key: &str) -> String {
    let mounts = sn.mounts(key).unwrap();
    let dir = match mounts[0].option("upperdir") {
        Some(u) => u.to_string(),
        None => mounts[0].source.clone(),
    };
    Path::new(&dir)
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn index_opt() -> Vec<String> {
    if Path::new("/sys/module/overlay/parameters/index").exists() {
        vec!["index=off".to_string()]
    } else {
        vec![]
    }
}

#[test]
fn first_prepare_is_rw_bind_of_snapshot_one() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path(), Options::default());
    let m = sn.prepare("/tmp/test", "", &no_labels()).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].kind, "bind");
    assert_eq!(
        m[0].source,
        dir.path().join("snapshots/1/fs").display().to_string()
    );
    assert_eq!(m[0].options, ["rw", "rbind"]);
    let work = dir.path().join("snapshots/1/work");
    assert!(work.is_dir(), "active snapshots get a workdir");
}

#[test]
fn overlay_mount_options_are_in_containerd_order_and_mount() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path(), Options::default());
    layer(&sn, "base", "", "foo", "hi");
    let m = sn.prepare("/tmp/layer2", "base", &no_labels()).unwrap();
    let root = dir.path().join("snapshots");
    let mut expected = index_opt();
    expected.push(format!("workdir={}", root.join("2/work").display()));
    expected.push(format!("upperdir={}", root.join("2/fs").display()));
    expected.push(format!("lowerdir={}", root.join("1/fs").display()));
    assert_eq!(
        (m[0].kind.as_str(), m[0].source.as_str()),
        ("overlay", "overlay")
    );
    assert_eq!(m[0].options, expected);

    let target = tempfile::tempdir().unwrap();
    let g = MountGuard::mount(&m, target.path()).unwrap();
    assert_eq!(
        std::fs::read_to_string(target.path().join("foo")).unwrap(),
        "hi"
    );
    std::fs::write(target.path().join("bar"), "new").unwrap();
    g.unmount().unwrap();
    assert!(
        root.join("2/fs/bar").exists(),
        "writes land in the upperdir"
    );
}

#[test]
fn views_bind_one_layer_and_overlay_several() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path(), Options::default());
    layer(&sn, "base", "", "a", "1");
    let m = sn.view("/tmp/view1", "base", &no_labels()).unwrap();
    assert_eq!(m[0].kind, "bind");
    assert_eq!(
        m[0].source,
        dir.path().join("snapshots/1/fs").display().to_string()
    );
    assert_eq!(m[0].options, ["ro", "rbind"]);
    layer(&sn, "top", "base", "b", "2");
    let m = sn.view("/tmp/view2", "top", &no_labels()).unwrap();
    assert_eq!(m[0].kind, "overlay");
    let root = dir.path().join("snapshots");
    assert_eq!(m[0].options.len(), index_opt().len() + 1);
    assert_eq!(
        m[0].options.last().unwrap(),
        &format!(
            "lowerdir={}:{}",
            root.join("3/fs").display(),
            root.join("1/fs").display()
        )
    );
    assert!(!root.join("4/work").exists(), "views get no workdir");
}

#[test]
fn usage_is_computed_at_commit_and_counts_hard_links_once() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path(), Options::default());
    sn.prepare("a", "", &no_labels()).unwrap();
    let fs = sn.upper_dir("1");
    std::fs::write(fs.join("f"), vec![7u8; 64 * 1024]).unwrap();
    std::fs::hard_link(fs.join("f"), fs.join("g")).unwrap();
    let live = sn.usage("a").unwrap();
    assert_eq!(live.inodes, 2, "root dir + one file inode");
    assert!(live.size >= 64 * 1024, "{live:?}");
    commit(&sn, "A", "a");
    assert_eq!(sn.usage("A").unwrap(), live);
    std::fs::write(fs.join("later"), "x").unwrap();
    assert_eq!(
        sn.usage("A").unwrap(),
        live,
        "committed usage is the recorded value"
    );
    sn.view("v", "A", &no_labels()).unwrap();
    assert_eq!(sn.usage("v").unwrap(), Default::default());
}

#[test]
fn synchronous_remove_deletes_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path(), Options::default());
    sn.prepare("a", "", &no_labels()).unwrap();
    sn.remove("a").unwrap();
    assert!(!dir.path().join("snapshots/1").exists());
}

#[test]
fn asynchronous_remove_keeps_the_directory_until_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(
        dir.path(),
        Options {
            async_remove: true,
            ..Default::default()
        },
    );
    sn.prepare("a", "", &no_labels()).unwrap();
    sn.remove("a").unwrap();
    assert!(dir.path().join("snapshots/1").exists());
    assert_eq!(sn.stat("a").unwrap_err().kind(), ErrorKind::NotFound);
    sn.prepare("a", "", &no_labels()).unwrap();
    sn.cleanup().unwrap();
    assert!(!dir.path().join("snapshots/1").exists());
    assert!(
        dir.path().join("snapshots/2").exists(),
        "live snapshots survive cleanup"
    );
}

#[test]
fn cleanup_removes_orphan_directories() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path(), Options::default());
    sn.prepare("a", "", &no_labels()).unwrap();
    let snapshots = dir.path().join("snapshots");
    std::fs::create_dir_all(snapshots.join("new-123/fs")).unwrap();
    std::fs::create_dir_all(snapshots.join("99/fs")).unwrap();
    sn.cleanup().unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["1"]);
}

#[test]
fn upperdir_label_is_synthesised_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(
        dir.path(),
        Options {
            upperdir_label: true,
            ..Default::default()
        },
    );
    sn.prepare("a", "", &no_labels()).unwrap();
    let upper = dir.path().join("snapshots/1/fs").display().to_string();
    assert_eq!(sn.stat("a").unwrap().labels[LABEL_OVERLAY_UPPERDIR], upper);
    let mut walked = Vec::new();
    sn.walk(&[], &mut |i| {
        walked.push(i.labels.get(LABEL_OVERLAY_UPPERDIR).cloned());
        Ok(())
    })
    .unwrap();
    assert_eq!(walked, [Some(upper.clone())]);
    let mut info = sn.stat("a").unwrap();
    info.labels.insert("x".into(), "y".into());
    let out = sn.update(&info, &["labels.x"]).unwrap();
    assert_eq!(out.labels[LABEL_OVERLAY_UPPERDIR], upper);
    drop(sn);
    let plain = open(dir.path(), Options::default());
    let stored = plain.stat("a").unwrap().labels;
    assert!(!stored.contains_key(LABEL_OVERLAY_UPPERDIR), "{stored:?}");
}

#[test]
fn failed_filesystem_step_rolls_back_and_leaves_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path(), Options::default());
    layer(&sn, "base", "", "a", "1");
    // Break the parent's data directory: prepare must fail copying its ownership.
    std::fs::remove_dir_all(sn.upper_dir("1")).unwrap();
    let err = sn.prepare("child", "base", &no_labels()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unknown, "{err}");
    assert_eq!(sn.stat("child").unwrap_err().kind(), ErrorKind::NotFound);
    let entries: Vec<String> = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["1"], "no temp or half-made directory is left");
}

#[test]
fn child_fs_takes_the_parent_owner() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path(), Options::default());
    sn.prepare("a", "", &no_labels()).unwrap();
    std::os::unix::fs::chown(sn.upper_dir("1"), Some(1234), Some(5678)).unwrap();
    commit(&sn, "A", "a");
    sn.prepare("b", "A", &no_labels()).unwrap();
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(sn.upper_dir("2")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
}

#[test]
fn chain_of_128_layers_mounts_and_shows_every_layer() {
    let dir = tempfile::Builder::new()
        .prefix("strata-a-rather-long-directory-name-to-make-lowerdir-paths-long-")
        .tempdir()
        .unwrap();
    let sn = open(dir.path(), Options::default());
    let mut parent = String::new();
    for i in 0..128 {
        let name = format!("layer-{i}");
        layer(&sn, &name, &parent, &format!("file-{i}"), &i.to_string());
        // Each layer overwrites `top` so the topmost one must win.
        let id = (i + 1).to_string();
        std::fs::write(sn.upper_dir(&id).join("top"), i.to_string()).unwrap();
        parent = name;
    }
    let m = sn.prepare("rw", &parent, &no_labels()).unwrap();
    let lowerdir = m[0].option("lowerdir").unwrap();
    assert_eq!(lowerdir.split(':').count(), 128);
    assert!(
        m[0].options.iter().map(|o| o.len() + 1).sum::<usize>() > 4096,
        "the mount data must exceed a page for this test to mean anything"
    );
    let target = tempfile::tempdir().unwrap();
    let g = MountGuard::mount(&m, target.path()).unwrap();
    for i in 0..128 {
        let got = std::fs::read_to_string(target.path().join(format!("file-{i}"))).unwrap();
        assert_eq!(got, i.to_string());
    }
    assert_eq!(
        std::fs::read_to_string(target.path().join("top")).unwrap(),
        "127"
    );
    g.unmount().unwrap();
    let v = sn.view("ro", &parent, &no_labels()).unwrap();
    let g = MountGuard::mount(&v, target.path()).unwrap();
    assert_eq!(std::fs::read_dir(target.path()).unwrap().count(), 129);
    assert!(
        std::fs::write(target.path().join("x"), "y").is_err(),
        "views are read-only"
    );
    g.unmount().unwrap();
    assert_eq!(sn.stat("rw").unwrap().kind, Kind::Active);
}
