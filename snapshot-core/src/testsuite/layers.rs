//! containerd's file-level cases (SEMANTICS.md §4): changes applied layer by layer through real
//! mounts must look exactly like the same changes applied to one flat directory.

use std::io::ErrorKind as IoKind;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use super::fstest::{self, create_dir, create_file, link, remove_all, symlink};
use super::harness::{Ctx, apply_flat, labels, ok};

/// Changing a file's content and mode in an upper layer is visible (5 runs, each starting on a
/// fresh second so equal mtimes cannot hide a stale copy).
pub fn layer_file_update(ctx: &Ctx) {
    let l1 = vec![
        create_dir("/etc", 0o700),
        create_file("/etc/hosts", "mydomain 10.0.0.1", 0o644),
        create_file("/etc/profile", "PATH=/usr/bin", 0o644),
    ];
    let l2 = vec![
        create_file("/etc/hosts", "mydomain 10.0.0.2", 0o644),
        create_file("/etc/profile", "PATH=/usr/bin", 0o666),
        create_dir("/root", 0o700),
        create_file("/root/.bashrc", "PATH=/usr/sbin:/usr/bin", 0o644),
    ];
    for run in 0..5 {
        if run > 0 {
            sleep_to_next_second();
        }
        ctx.check_snapshots(&[l1.clone(), l2.clone()]);
    }
}

/// A directory removed and re-created in an upper layer hides the lower one's children.
pub fn remove_directory_in_lower_layer(ctx: &Ctx) {
    ctx.check_snapshots(&[
        vec![
            create_dir("/lib", 0o700),
            create_file("/lib/hidden", "", 0o644),
        ],
        vec![
            remove_all("/lib"),
            create_dir("/lib", 0o700),
            create_file("/lib/not-hidden", "", 0o644),
        ],
        vec![create_file("/lib/newfile", "", 0o644)],
    ]);
}

/// Ownership changes of lower-layer directories and files (needs root).
pub fn chown(ctx: &Ctx) {
    ctx.check_snapshots(&[
        vec![
            create_dir("/opt", 0o700),
            create_dir("/opt/a", 0o700),
            create_dir("/opt/a/b", 0o700),
            create_file("/opt/a/b/file.txt", "hello", 0o644),
        ],
        vec![
            fstest::chown("/opt", 1, 1),
            fstest::chown("/opt/a", 1, 1),
            fstest::chown("/opt/a/b", 1, 1),
            fstest::chown("/opt/a/b/file.txt", 1, 1),
        ],
    ]);
}

/// Ownership, removal and re-creation of directories across three layers (needs root).
pub fn directory_permission_on_commit(ctx: &Ctx) {
    ctx.check_snapshots(&[
        vec![
            create_dir("/dir1", 0o700),
            create_dir("/dir2", 0o700),
            create_dir("/dir3", 0o700),
            create_dir("/dir4", 0o700),
            create_file("/dir4/f1", "...", 0o644),
            create_dir("/dir5", 0o700),
            create_file("/dir5/f1", "...", 0o644),
            fstest::chown("/dir1", 1, 1),
            fstest::chown("/dir2", 1, 1),
            fstest::chown("/dir3", 1, 1),
            fstest::chown("/dir5", 1, 1),
            fstest::chown("/dir5/f1", 1, 1),
        ],
        vec![
            fstest::chown("/dir2", 0, 0),
            remove_all("/dir3"),
            fstest::chown("/dir4", 1, 1),
            fstest::chown("/dir4/f1", 1, 1),
        ],
        vec![
            create_dir("/dir3", 0o700),
            fstest::chown("/dir3", 1, 1),
            remove_all("/dir5"),
            create_dir("/dir5", 0o700),
            fstest::chown("/dir5", 1, 1),
        ],
    ]);
}

/// A file deleted in layer 2 stays deleted below an empty layer 3.
pub fn deleted_files_in_child_snapshot(ctx: &Ctx) {
    ctx.check_snapshots(&[
        vec![
            create_file("/foo", "foo\n", 0o777),
            create_file("/foobar", "foobar\n", 0o777),
        ],
        vec![remove_all("/foobar")],
        vec![],
    ]);
}

/// Moving a lower file by hard link plus removal; a removed directory stays gone.
pub fn move_file_from_lower_layer(ctx: &Ctx) {
    ctx.check_snapshots(&[
        vec![
            create_dir("/dir1", 0o700),
            create_file("/dir1/f1", "Hello", 0o644),
            create_dir("dir2", 0o700),
            create_file("dir2/f2", "...", 0o644),
        ],
        vec![
            create_dir("/dir3", 0o700),
            create_file("/dir3/f1", "Hello", 0o644),
            remove_all("/dir1"),
            link("dir2/f2", "dir3/f2"),
            remove_all("dir2/f2"),
        ],
    ]);
}

/// containerd HEAD's rename case: a lower directory and lower files renamed in an upper layer,
/// plus a symlink. The directory rename is left out where the mount refuses it with EXDEV
/// (overlayfs without `redirect_dir`, which HEAD skips for overlay).
pub fn rename(ctx: &Ctx) {
    ctx.check_snapshots(&[
        vec![
            create_dir("/dir1", 0o700),
            create_dir("/somefiles", 0o700),
            create_file("/somefiles/f1", "was here first!", 0o644),
            create_file("/somefiles/f2", "nothing interesting", 0o644),
            symlink("f2", "/somefiles/link"),
        ],
        vec![
            fstest::rename("/dir1", "/dir2"),
            create_file("/somefiles/f1-overwrite", "new content 1", 0o644),
            fstest::rename("/somefiles/f1-overwrite", "/somefiles/f1"),
            fstest::rename("/somefiles/f2", "/somefiles/f3"),
            fstest::rename("/somefiles/link", "/somefiles/link2"),
        ],
    ]);
}

#[track_caller]
fn expect_read_only(mounted: &std::path::Path, what: &str) {
    let file = mounted.join("testfile");
    match std::fs::write(&file, "testcontent") {
        Ok(()) => panic!(
            "{what}: expected writing {} to fail with EROFS, it succeeded",
            file.display()
        ),
        Err(e) => assert_eq!(
            e.kind(),
            IoKind::ReadOnlyFilesystem,
            "{what}: expected EROFS, got {e}"
        ),
    }
}

/// Mounted views are read-only (EROFS), with one parent (bind) and with two (overlay).
pub fn view_readonly(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    let (preparing, committed) = (ctx.key("preparing"), ctx.key("committed"));
    ok("prepare", sn.prepare(&preparing, "", &l));
    ctx.commit(&committed, &preparing);
    let view = ctx.key("view");
    let mounts = ok("view with one parent", sn.view(&view, &committed, &l));
    let mounted = ctx.mount(&mounts, "view-mount");
    expect_read_only(&mounted.path, "view with one parent");
    mounted.unmount();
    ok("remove the view", sn.remove(&view));

    let (next, top) = (ctx.key("next"), ctx.key("top"));
    ok("prepare next", sn.prepare(&next, &committed, &l));
    ctx.commit(&top, &next);
    let view2 = ctx.key("view2");
    let mounts = ok("view with two parents", sn.view(&view2, &top, &l));
    let mounted = ctx.mount(&mounts, "view-mount");
    expect_read_only(&mounted.path, "view with two parents");
    mounted.unmount();
    ok("remove the second view", sn.remove(&view2));
    ok("remove top", sn.remove(&top));
    ok("remove the committed", sn.remove(&committed));
}

/// The root of a mounted active has mode 0755, without and with a parent.
pub fn root_permission(ctx: &Ctx) {
    let preparing = ctx.key("preparing");
    let mounted = ctx.prepare_mounted(&preparing, "");
    let check = |path: &std::path::Path, what: &str| {
        let md = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        let mode = md.permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o755,
            "expected the root of {what} to have mode 0755, got {mode:o}"
        );
    };
    check(&mounted.path, "a parentless active");
    mounted.unmount();
    let committed = ctx.key("committed");
    ctx.commit(&committed, &preparing);
    let mounted = ctx.prepare_mounted(&ctx.key("child"), &committed);
    check(&mounted.path, "an active with a parent");
    mounted.unmount();
}

/// 128 chained layers (beyond one page of absolute lowerdirs): every active equals the flat tree
/// before and after its changes, and the final view equals it too.
pub fn mount_128_layers(ctx: &Ctx) {
    let mut layers = vec![vec![
        create_file("/bottom", "way at the bottom\n", 0o777),
        create_file("/overwriteme", "FIRST!\n", 0o777),
        create_dir("/ADDHERE", 0o755),
        create_dir("/ONLYME", 0o755),
        create_file("/ONLYME/bottom", "bye!\n", 0o777),
    ]];
    for i in 1..=127 {
        layers.push(vec![
            create_file("/overwriteme", format!("{i} WAS HERE!\n"), 0o777),
            create_file(&format!("/ADDHERE/file-{i}"), "same\n", 0o755),
            remove_all("/ONLYME"),
            create_dir("/ONLYME", 0o755),
            create_file(&format!("/ONLYME/file-{i}"), "only me!\n", 0o777),
        ]);
    }
    let flat = ctx.fresh_dir("flat");
    let mut parent = String::new();
    for (i, layer) in layers.iter().enumerate() {
        let preparing = ctx.key(&format!("prepare-layer-{i}"));
        let mounted = ctx.prepare_mounted(&preparing, &parent);
        if let Err(d) = fstest::check_directory_equal(&flat, &mounted.path) {
            panic!(
                "[layer {i}] expected the active to equal the flat tree before the changes: {d}"
            );
        }
        apply_flat(&flat, layer);
        ctx.apply_mounted(&mounted.path, layer);
        if let Err(d) = fstest::check_directory_equal(&flat, &mounted.path) {
            panic!("[layer {i}] expected the active to equal the flat tree after the changes: {d}");
        }
        mounted.unmount();
        parent = ctx.key(&format!("committed-{i}"));
        ctx.commit(&parent, &preparing);
    }
    ctx.check_view(&parent, &flat, "full view of 128 layers");
}

/// Sleeps until just after the next whole second (mtime granularity, as containerd's suite).
fn sleep_to_next_second() {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    std::thread::sleep(Duration::from_nanos(
        1_000_000_000 - u64::from(now.subsec_nanos()),
    ));
}
