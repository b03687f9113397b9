//! `strata` with the `nfs` backing file system, against a real nfs-ganesha on 127.0.0.1: an image
//! exported with `strata export` into the exported directory is unpacked on another root from
//! NFS (its layers are remote snapshots), and its root filesystem is exactly a normal unpack's;
//! reads are cached, fail cleanly while the server is down and recover; a layer missing from the
//! store is unpacked instead.
//!
//! Run by `cargo xtask test-plugins`, which builds and installs the plugins into
//! `STRATA_PLUGINS_DIR` (it is `test = false`, so a plain `cargo test` does not pick it up).
#![allow(clippy::unwrap_used)] // tests may unwrap

#[path = "../fs-plugin-api/tests/common/nfs_server.rs"]
mod nfs_server;
mod support;

use std::{
    io::Read,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use nfs_server::NfsServer;
use snapshot_core::{ErrorKind, FileSystem, Labels, Snapshotter};
use support::layers::{CAPABILITY, assert_same_tree, build_image, xattr};
use support::strata_ok;

fn plugins_dir() -> String {
    std::env::var("STRATA_PLUGINS_DIR").expect(
        "STRATA_PLUGINS_DIR must name the installed plugins: run `cargo xtask test-plugins`",
    )
}

/// Detaches whatever is mounted at its path when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        for _ in 0..8 {
            if nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// An image exported into a directory that a fresh nfs-ganesha exports, and a config naming it.
struct Setup {
    tmp: tempfile::TempDir,
    image: String,
    server: NfsServer,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("image");
        build_image(&layout);
        let image = format!("{}:t", layout.display());
        let export = tmp.path().join("export");
        let exported = strata_ok(&["export", "--to", export.to_str().unwrap(), &image]);
        assert_eq!(exported.lines().count(), 3, "{exported}");
        let server = NfsServer::start_on_free_ports(&export);
        Setup { tmp, image, server }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A strata config with the nfs plugin over this server, rooted at `root`.
    fn config(&self, root: &str, timeout_ms: u64) -> String {
        let o = self.server.options(timeout_ms);
        let path = self.path(&format!("{root}.toml"));
        std::fs::write(
            &path,
            format!(
                "root = {:?}\nplugins_dir = {:?}\n[filesystem]\nplugin = \"nfs\"\n[filesystem.options]\n\
                 server = \"127.0.0.1\"\nexport = {}\nmount_port = {}\nnfs_port = {}\n\
                 store_layout = \"sha256-dirs\"\nnfs_version = 3\ntimeout_ms = {timeout_ms}\n",
                self.path(root),
                plugins_dir(),
                o["export"],
                o["mount_port"],
                o["nfs_port"],
            ),
        )
        .unwrap();
        path.display().to_string()
    }

    /// The exported layer directories (sorted by digest) and their labels.
    fn layers(&self) -> Vec<(PathBuf, Labels)> {
        let dir = self.server.export.join("sha256");
        let mut layers: Vec<(PathBuf, Labels)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| {
                let hex = e.file_name().into_string().unwrap();
                let labels = [(
                    fs_plugin_api::LABEL_LAYER_DIGEST.to_owned(),
                    format!("sha256:{hex}"),
                )]
                .into_iter()
                .collect();
                (e.path(), labels)
            })
            .collect();
        layers.sort_by(|a, b| a.0.cmp(&b.0));
        layers
    }

    /// The exported layer holding `file`.
    fn layer_with(&self, file: &str) -> (PathBuf, Labels) {
        self.layers()
            .into_iter()
            .find(|(dir, _)| dir.join(file).exists())
            .unwrap()
    }

    /// The nfs plugin loaded in this process, with this server and `timeout_ms`.
    fn plugin(&self, timeout_ms: u64) -> Arc<dyn FileSystem> {
        let registry = fs_plugin_api::PluginRegistry::scan(Path::new(&plugins_dir())).unwrap();
        registry
            .load("nfs", &self.server.options(timeout_ms))
            .unwrap()
    }
}

fn remote_count(ls: &str) -> usize {
    ls.lines().filter(|l| l.contains(" remote ")).count()
}

#[test]
fn an_exported_image_mounts_from_nfs_exactly_as_a_normal_unpack() {
    let s = Setup::new();
    let cfg = s.config("root-nfs", 5000);

    // Node 2 unpacks from NFS: every layer is a remote snapshot.
    let chain = strata_ok(&["--config", &cfg, "unpack", &s.image]);
    let ls = strata_ok(&["--config", &cfg, "ls"]);
    assert_eq!(remote_count(&ls), 3, "every layer is remote: {ls}");
    assert!(ls.contains(chain.trim()), "{ls}");

    // A normal unpack and mount, for reference.
    let plain = s.path("rootfs-plain");
    std::fs::create_dir(&plain).unwrap();
    let _plain_guard = Unmount(plain.clone());
    let root_plain = s.path("root-plain");
    strata_ok(&[
        "--root",
        root_plain.to_str().unwrap(),
        "mount",
        &s.image,
        plain.to_str().unwrap(),
        "--name",
        "plain",
    ]);

    // The nfs root, mounted in this process (FUSE mounts live as long as their plugin).
    let config = fs_plugin_api::config::Config::load(Path::new(&cfg)).unwrap();
    let fs = config.filesystem().unwrap().unwrap();
    let sn = snapshot_overlay::OverlaySnapshotter::open_with_filesystem(
        &s.path("root-nfs"),
        snapshot_overlay::Options::default(),
        Some(fs.clone()),
    )
    .unwrap();
    let merged = s.path("rootfs-nfs");
    std::fs::create_dir(&merged).unwrap();
    let merged_guard = Unmount(merged.clone());
    let mounts = rootfs::init_rootfs("nfs-view", chain.trim(), true, &sn).unwrap();
    rootfs::mount::mount_all(&mounts, &merged).unwrap();

    // Contents, modes, owners, times, links, devices, xattrs and applied whiteouts.
    assert_same_tree(&merged, &plain, true);
    assert!(!merged.join("etc/motd").exists(), "whiteout applies");
    assert!(
        !merged.join("var/cache/stale").exists(),
        "opaque directory applies"
    );
    assert_eq!(
        xattr::lgetxattr(&merged.join("usr/bin/ping"), "security.capability"),
        CAPABILITY
    );

    // Each remote layer, as mounted, is exactly the exported layer: 0/0 whiteouts and opaque
    // markers (served from the metadata index) included.
    let mut seen = 0;
    sn.walk(&[], &mut |info| {
        if info.labels.contains_key(snapshot_core::LABEL_REMOTE) {
            let digest = fs_plugin_api::layer_digest(&info.labels)
                .unwrap()
                .to_owned();
            let hex = digest.strip_prefix("sha256:").unwrap();
            let store = s.server.export.join("sha256").join(hex);
            let mounted = find_mount_of(&s.path("root-nfs/snapshots"), &store);
            assert_same_tree(&mounted, &store, false);
            seen += 1;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, 3);
    let opaque = s.layer_with("var/cache/fresh");
    let mounted = find_mount_of(&s.path("root-nfs/snapshots"), &opaque.0);
    assert_eq!(
        xattr::lgetxattr(&mounted.join("var/cache"), "trusted.overlay.opaque"),
        b"y"
    );
    let wh = std::fs::symlink_metadata(mounted.join("etc/motd")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "0/0 whiteout"
    );

    rootfs::mount::unmount(&merged).unwrap();
    drop(merged_guard);
    sn.remove("nfs-view").unwrap();
    sn.close().unwrap();
    // The plugin, dropped with its last user, unmounts the layers it serves.
    drop(sn);
    drop(fs);
    drop(config);
    let left = nfs_server_mounts_under(&s.path("root-nfs"));
    assert!(left.is_empty(), "mounts left behind: {left:?}");
}

/// The snapshot directory under `snapshots` whose mounted layer has the inode layout of `store`
/// (found by the layer's unique top-level names).
fn find_mount_of(snapshots: &Path, store: &Path) -> PathBuf {
    let names = |d: &Path| -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    };
    let want = names(store);
    for e in std::fs::read_dir(snapshots).unwrap() {
        let fs = e.unwrap().path().join("fs");
        if fs.is_dir() && names(&fs) == want {
            return fs;
        }
    }
    panic!("no snapshot mounts {}", store.display());
}

fn nfs_server_mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_layer_missing_from_the_store_is_unpacked_instead() {
    let s = Setup::new();
    let (missing, labels) = s.layer_with("app/hello.txt");
    std::fs::rename(&missing, s.path("moved-away")).unwrap();
    let missing_digest = fs_plugin_api::layer_digest(&labels).unwrap().to_owned();

    // The plugin says NotFound, quickly, and mounts nothing.
    let fs = s.plugin(5000);
    let mnt = s.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let start = Instant::now();
    let e = fs.mount(&mnt, &labels).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(nfs_server_mounts_under(&mnt).is_empty());
    drop(fs);

    // The snapshotter falls back to unpacking that layer; the others stay remote.
    let cfg = s.config("root", 5000);
    let chain = strata_ok(&["--config", &cfg, "unpack", &s.image]);
    assert!(!chain.trim().is_empty());
    let ls = strata_ok(&["--config", &cfg, "ls"]);
    assert_eq!(remote_count(&ls), 2, "{ls}");
    let local: Vec<&str> = ls
        .lines()
        .skip(1)
        .filter(|l| !l.contains(" remote "))
        .collect();
    assert_eq!(local.len(), 1, "{ls}");
    // The unpacked layer's files are on local disk.
    let on_disk = std::fs::read_dir(s.path("root/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path().join("fs/app/hello.txt"))
        .filter(|p| {
            p.exists() && nfs_server_mounts_under(p.parent().unwrap().parent().unwrap()).is_empty()
        })
        .count();
    assert_eq!(on_disk, 1, "layer {missing_digest} was unpacked");
}

/// Reads every file under `dir`: path -> bytes.
fn read_all(dir: &Path, names: &[&str]) -> Vec<Vec<u8>> {
    names
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect()
}

fn read_error(path: &Path) -> std::io::Error {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).unwrap_err()
}

#[test]
fn reads_are_cached_and_fail_cleanly_while_the_server_is_down_then_recover() {
    let mut s = Setup::new();
    let (store, labels) = s.layer_with("big.bin");
    let fs = s.plugin(2000);
    let mnt = s.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = Unmount(mnt.clone());
    fs.mount(&mnt, &labels).unwrap();
    fs.check(&mnt, &labels).unwrap();

    // Mounted with allow_other: other users read it too (permissions checked by the kernel).
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(mnt.join("top.txt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"hello from the top layer\n");

    let names = ["top.txt", "big.bin", "small-1", "small-2"];
    let first = read_all(&mnt, &names);
    assert_eq!(first, read_all(&store, &names), "the data is the store's");

    // Server gone: what was read is served from the cache, the rest fails with EIO, at once.
    s.server.stop();
    assert_eq!(
        read_all(&mnt, &names),
        first,
        "second read does not cross the network"
    );
    let start = Instant::now();
    let e = read_error(&mnt.join("unread.bin"));
    assert_eq!(e.raw_os_error(), Some(nix::libc::EIO), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let e = fs.check(&mnt, &labels).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");

    // Back again: check passes and the file reads correctly.
    s.server.restart();
    fs.check(&mnt, &labels).unwrap();
    assert_eq!(
        std::fs::read(mnt.join("unread.bin")).unwrap(),
        std::fs::read(store.join("unread.bin")).unwrap()
    );
    fs.unmount(&mnt).unwrap();
    assert!(nfs_server_mounts_under(&mnt).is_empty());
}

#[test]
fn a_hung_server_fails_reads_within_the_timeout_and_unmount_is_clean_with_a_read_in_flight() {
    const TIMEOUT_MS: u64 = 1500;
    let mut s = Setup::new();
    let (store, labels) = s.layer_with("big.bin");
    let fs = s.plugin(TIMEOUT_MS);
    let mnt = s.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = Unmount(mnt.clone());
    fs.mount(&mnt, &labels).unwrap();
    // Directory listing fetched while the server answers.
    assert!(mnt.join("unread.bin").exists() && mnt.join("unread-2.bin").exists());

    s.server.pause();
    let start = Instant::now();
    let e = read_error(&mnt.join("unread.bin"));
    let took = start.elapsed();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EIO), "{e}");
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS)
            && took < Duration::from_millis(TIMEOUT_MS + 3000),
        "a read fails after the timeout, not before or much later: {took:?}"
    );

    // A read in flight while unmounting: unmount returns promptly, the read fails, nothing stays.
    // (After a timeout, reads fail at once for one timeout's length: wait that out first, so
    // that this read really waits on the server.)
    std::thread::sleep(Duration::from_millis(TIMEOUT_MS + 300));
    let path = mnt.join("unread-2.bin");
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(path).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
    });
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    fs.unmount(&mnt).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(reader.join().unwrap().is_err(), "the read in flight fails");
    assert!(
        nfs_server_mounts_under(&mnt).is_empty(),
        "nothing left mounted"
    );
    s.server.resume();

    // The mountpoint is usable again and the data right.
    fs.mount(&mnt, &labels).unwrap();
    assert_eq!(
        std::fs::read(mnt.join("unread-2.bin")).unwrap(),
        std::fs::read(store.join("unread-2.bin")).unwrap()
    );
    fs.unmount(&mnt).unwrap();
}
