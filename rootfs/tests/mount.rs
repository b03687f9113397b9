//! Real mounts (run as root): bind and overlay mounts as the overlay snapshotter returns them,
//! overlays past mount(2)'s one-page data limit, and unmounting.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rootfs::mount::{self, LongOverlay, MountGuard};
use snapshot_core::{ErrorKind, Mount};
use tempfile::TempDir;

const EROFS: i32 = 30;

fn bind(source: &Path, mode: &str) -> Mount {
    Mount {
        kind: "bind".into(),
        source: source.display().to_string(),
        options: vec![mode.into(), "rbind".into()],
    }
}

/// An overlay as the snapshotter returns it: lowers nearest first; no upper means read-only.
fn overlay(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> Mount {
    let mut options = vec!["index=off".to_owned()];
    if let Some((upper, work)) = upper {
        options.push(format!("workdir={}", work.display()));
        options.push(format!("upperdir={}", upper.display()));
    }
    let lowers: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
    options.push(format!("lowerdir={}", lowers.join(":")));
    Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }
}

fn mkdir(path: PathBuf) -> PathBuf {
    fs::create_dir_all(&path).unwrap();
    path
}

fn read(path: PathBuf) -> String {
    fs::read_to_string(path).unwrap()
}

/// How many mounts are stacked at `path` (from /proc/self/mountinfo).
fn mounts_at(path: &Path) -> usize {
    let path = fs::canonicalize(path).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| Path::new(&unescape(mp)) == path)
        .count()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap());
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Unmounts everything at a path when dropped, for tests of [`mount::mount_all`].
struct UnmountAll<'a>(&'a Path);

impl Drop for UnmountAll<'_> {
    fn drop(&mut self) {
        let _ = mount::unmount(self.0);
    }
}

fn assert_erofs(result: io::Result<()>) {
    let err = result.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EROFS), "{err}");
}

#[test]
fn rw_bind_shows_the_source_and_accepts_writes() {
    let tmp = TempDir::new().unwrap();
    let source = mkdir(tmp.path().join("fs"));
    fs::write(source.join("hello"), "world").unwrap();
    let target = mkdir(tmp.path().join("target"));

    let guard = MountGuard::mount(&[bind(&source, "rw")], &target).unwrap();
    assert_eq!(guard.path(), target);
    assert_eq!(mounts_at(&target), 1);
    assert_eq!(read(target.join("hello")), "world");
    fs::write(target.join("new"), "written through").unwrap();
    assert_eq!(read(source.join("new")), "written through");

    guard.unmount().unwrap();
    assert_eq!(mounts_at(&target), 0);
    assert!(!target.join("hello").exists());
}

#[test]
fn ro_bind_refuses_writes_with_erofs() {
    let tmp = TempDir::new().unwrap();
    let source = mkdir(tmp.path().join("fs"));
    fs::write(source.join("hello"), "world").unwrap();
    let target = mkdir(tmp.path().join("target"));

    let _guard = MountGuard::mount(&[bind(&source, "ro")], &target).unwrap();
    assert_eq!(read(target.join("hello")), "world");
    assert_erofs(fs::write(target.join("new"), "x"));
    assert_erofs(fs::write(target.join("hello"), "x"));
    assert_erofs(fs::create_dir(target.join("dir")));
    // Only the bind is read-only, not the source.
    fs::write(source.join("new"), "x").unwrap();
}

#[test]
fn overlay_merges_lowers_and_copies_up_into_the_upperdir() {
    let tmp = TempDir::new().unwrap();
    let top = mkdir(tmp.path().join("l1"));
    let bottom = mkdir(tmp.path().join("l0"));
    let upper = mkdir(tmp.path().join("upper"));
    let work = mkdir(tmp.path().join("work"));
    let target = mkdir(tmp.path().join("target"));
    fs::write(top.join("shadowed"), "top").unwrap();
    fs::write(top.join("only-top"), "t").unwrap();
    fs::write(bottom.join("shadowed"), "bottom").unwrap();
    fs::write(bottom.join("only-bottom"), "b").unwrap();
    fs::write(bottom.join("doomed"), "d").unwrap();

    let m = overlay(&[top.clone(), bottom.clone()], Some((&upper, &work)));
    let _guard = MountGuard::mount(&[m], &target).unwrap();
    assert_eq!(read(target.join("shadowed")), "top");
    assert_eq!(read(target.join("only-top")), "t");
    assert_eq!(read(target.join("only-bottom")), "b");

    // Writing a lower file copies it up; the lower stays as it was.
    fs::write(target.join("only-bottom"), "changed").unwrap();
    assert_eq!(read(upper.join("only-bottom")), "changed");
    assert_eq!(read(bottom.join("only-bottom")), "b");
    // New files land in the upperdir; deleting a lower file leaves a whiteout (0/0 char device).
    fs::write(target.join("new"), "n").unwrap();
    assert_eq!(read(upper.join("new")), "n");
    fs::remove_file(target.join("doomed")).unwrap();
    assert!(!target.join("doomed").exists());
    let whiteout = fs::symlink_metadata(upper.join("doomed")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    assert!(bottom.join("doomed").exists());
}

#[test]
fn read_only_overlay_of_lowers_only_refuses_writes() {
    let tmp = TempDir::new().unwrap();
    let top = mkdir(tmp.path().join("l1"));
    let bottom = mkdir(tmp.path().join("l0"));
    let target = mkdir(tmp.path().join("target"));
    fs::write(top.join("a"), "top").unwrap();
    fs::write(bottom.join("a"), "bottom").unwrap();
    fs::write(bottom.join("b"), "b").unwrap();

    let _guard = MountGuard::mount(&[overlay(&[top, bottom], None)], &target).unwrap();
    assert_eq!(read(target.join("a")), "top");
    assert_eq!(read(target.join("b")), "b");
    assert_erofs(fs::write(target.join("b"), "x"));
    assert_erofs(fs::write(target.join("new"), "x"));
    assert_erofs(fs::remove_file(target.join("a")));
}

/// 200 layers under a deep directory, named like snapshot dirs (`snapshots/<n>/fs`), so that
/// the overlay's options are several pages long.
struct ManyLayers {
    tmp: TempDir,
    mount: Mount,
    target: PathBuf,
    upper: PathBuf,
}

const LAYERS: usize = 200;

fn many_layers() -> ManyLayers {
    let tmp = TempDir::new().unwrap();
    let deep = tmp
        .path()
        .join("a-rather-long-directory-name-to-push-lowerdir-past-one-page")
        .join("io.containerd.snapshotter.v1.overlayfs");
    // Nearest first, as the snapshotter lists parents: layer LAYERS is the top.
    let mut lowers = Vec::new();
    for n in (1..=LAYERS).rev() {
        let fs_dir = mkdir(deep.join("snapshots").join(n.to_string()).join("fs"));
        fs::write(fs_dir.join(format!("layer-{n}")), n.to_string()).unwrap();
        fs::write(fs_dir.join("shadowed"), n.to_string()).unwrap();
        if n <= LAYERS / 2 {
            fs::write(fs_dir.join("lower-half"), n.to_string()).unwrap();
        }
        lowers.push(fs_dir);
    }
    let id = LAYERS + 1;
    let upper = mkdir(deep.join("snapshots").join(id.to_string()).join("fs"));
    let work = mkdir(deep.join("snapshots").join(id.to_string()).join("work"));
    let target = mkdir(tmp.path().join("rootfs"));
    let mount = overlay(&lowers, Some((&upper, &work)));
    let size: usize = mount.options.iter().map(String::len).sum();
    assert!(size > 3 * 4096, "options are only {size} bytes");
    ManyLayers {
        tmp,
        mount,
        target,
        upper,
    }
}

fn check_many_layers(l: &ManyLayers) {
    for n in 1..=LAYERS {
        assert_eq!(read(l.target.join(format!("layer-{n}"))), n.to_string());
    }
    assert_eq!(read(l.target.join("shadowed")), LAYERS.to_string());
    assert_eq!(read(l.target.join("lower-half")), (LAYERS / 2).to_string());
    fs::write(l.target.join("shadowed"), "up").unwrap();
    assert_eq!(read(l.upper.join("shadowed")), "up");
    assert!(l.tmp.path().exists());
}

#[test]
fn two_hundred_long_lowerdirs_mount_with_lowerdir_plus() {
    let l = many_layers();
    let guard = MountGuard::mount_with(
        std::slice::from_ref(&l.mount),
        &l.target,
        LongOverlay::LowerdirPlus,
    )
    .unwrap();
    check_many_layers(&l);
    guard.unmount().unwrap();
    assert_eq!(mounts_at(&l.target), 0);
}

#[test]
fn two_hundred_long_lowerdirs_mount_with_compaction() {
    let l = many_layers();
    let cwd = std::env::current_dir().unwrap();
    let guard = MountGuard::mount_with(
        std::slice::from_ref(&l.mount),
        &l.target,
        LongOverlay::Compact,
    )
    .unwrap();
    // The chdir happened on the mounting thread only.
    assert_eq!(std::env::current_dir().unwrap(), cwd);
    check_many_layers(&l);
    guard.unmount().unwrap();
    assert_eq!(mounts_at(&l.target), 0);
}

#[test]
fn two_hundred_long_lowerdirs_mount_by_default() {
    let l = many_layers();
    let _guard = MountGuard::mount(std::slice::from_ref(&l.mount), &l.target).unwrap();
    check_many_layers(&l);
}

#[test]
fn more_lowerdirs_than_the_kernel_allows_fail_with_the_kernels_reason() {
    let tmp = TempDir::new().unwrap();
    let lowers: Vec<PathBuf> = (0..501)
        .map(|n| mkdir(tmp.path().join("s").join(n.to_string())))
        .collect();
    let target = mkdir(tmp.path().join("target"));
    let err = MountGuard::mount(&[overlay(&lowers, None)], &target).unwrap_err();
    assert!(
        matches!(&err, rootfs::Error::Mount { source, .. } if source.raw_os_error() == Some(22)),
        "{err}"
    );
    // The kernel's own reason from lowerdir+, then the compaction fallback was tried too.
    assert!(err.to_string().contains("limit is 500"), "{err}");
    assert!(err.to_string().contains("compacted lowerdir"), "{err}");
    assert_eq!(mounts_at(&target), 0);
}

#[test]
fn unmount_of_a_directory_that_is_not_mounted_says_so() {
    let tmp = TempDir::new().unwrap();
    let err = mount::unmount(tmp.path()).unwrap_err();
    assert!(matches!(err, rootfs::Error::NotMounted(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(
        err.to_string(),
        format!("unmount {}: not a mount point", tmp.path().display())
    );

    let err = mount::unmount(&tmp.path().join("missing")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[test]
fn unmount_removes_every_stacked_mount() {
    let tmp = TempDir::new().unwrap();
    let first = mkdir(tmp.path().join("first"));
    let second = mkdir(tmp.path().join("second"));
    fs::write(second.join("second"), "2").unwrap();
    let target = mkdir(tmp.path().join("target"));

    let _cleanup = UnmountAll(&target);
    mount::mount_all(&[bind(&first, "rw"), bind(&second, "ro")], &target).unwrap();
    assert_eq!(mounts_at(&target), 2);
    assert_eq!(read(target.join("second")), "2");
    mount::unmount(&target).unwrap();
    assert_eq!(mounts_at(&target), 0);
}

#[test]
fn a_failed_mount_all_leaves_nothing_mounted() {
    let tmp = TempDir::new().unwrap();
    let source = mkdir(tmp.path().join("fs"));
    let target = mkdir(tmp.path().join("target"));
    let missing = tmp.path().join("missing");
    let mounts = [
        bind(&source, "rw"),
        overlay(&[missing.clone(), missing], None),
    ];

    let err = MountGuard::mount(&mounts, &target).unwrap_err();
    assert!(
        matches!(&err, rootfs::Error::Mount { kind, .. } if kind == "overlay"),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(mounts_at(&target), 0);
}

#[test]
fn dropping_a_guard_unmounts_and_unmount_reports_errors() {
    let tmp = TempDir::new().unwrap();
    let source = mkdir(tmp.path().join("fs"));
    let target = mkdir(tmp.path().join("target"));

    drop(MountGuard::mount(&[bind(&source, "rw")], &target).unwrap());
    assert_eq!(mounts_at(&target), 0);

    // Someone else unmounted first: the guard's own unmount says so.
    let guard = MountGuard::mount(&[bind(&source, "rw")], &target).unwrap();
    mount::unmount(&target).unwrap();
    let err = guard.unmount().unwrap_err();
    assert!(matches!(err, rootfs::Error::NotMounted(_)), "{err:?}");
}

#[test]
fn a_guard_leaves_mounts_that_were_there_before_it() {
    let tmp = TempDir::new().unwrap();
    let first = mkdir(tmp.path().join("first"));
    let second = mkdir(tmp.path().join("second"));
    let target = mkdir(tmp.path().join("target"));

    let _cleanup = UnmountAll(&target);
    mount::mount_all(&[bind(&first, "rw")], &target).unwrap();
    let guard = MountGuard::mount(&[bind(&second, "ro")], &target).unwrap();
    assert_eq!(mounts_at(&target), 2);
    drop(guard);
    assert_eq!(mounts_at(&target), 1);
    mount::unmount(&target).unwrap();
    assert_eq!(mounts_at(&target), 0);
}

#[test]
fn malformed_and_unsupported_mounts_are_refused_before_any_syscall() {
    let tmp = TempDir::new().unwrap();
    let target = mkdir(tmp.path().join("target"));
    let no_lower = Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options: vec!["upperdir=/u".into(), "workdir=/w".into()],
    };
    let err = mount::mount_all(&[no_lower], &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");

    let fuse = Mount {
        kind: "fuse.sshfs".into(),
        source: "host:/".into(),
        options: vec![],
    };
    let err = mount::mount_all(&[fuse], &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotImplemented, "{err}");
    assert_eq!(mounts_at(&target), 0);
}
