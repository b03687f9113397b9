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

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use nfs_server::NfsServer;
use oci_spec::image::{
    ConfigBuilder, DescriptorBuilder, ImageConfigurationBuilder, ImageManifestBuilder, MediaType,
    RootFsBuilder,
};
use rootfs::content::ContentStore;
use sha2::Digest as _;
use snapshot_core::{ErrorKind, FileSystem, Labels, Snapshotter};

fn strata(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

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
// The test image: three layers with everything a layer can hold.

/// Deterministic bytes that do not compress to nothing.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, owner: (u64, u64)) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(IMAGE_MTIME);
        h.set_size(0);
        h
    }

    fn xattrs(&mut self, xattrs: &[(&str, &[u8])]) {
        if xattrs.is_empty() {
            return;
        }
        let keys: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.0
            .append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
    }

    fn dir(&mut self, path: &str, mode: u32, owner: (u64, u64)) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, owner);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32, owner: (u64, u64)) -> &mut Self {
        self.file_x(path, data, mode, owner, &[])
    }

    fn file_x(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        owner: (u64, u64),
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        self.xattrs(xattrs);
        let mut h = Self::header(tar::EntryType::Regular, mode, owner);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    /// A symlink, or a hard link (whose header, as tar writes it, repeats the target's mode and
    /// owner: the applier sets them on the shared inode, as containerd does).
    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let (mode, owner) = match (kind, target) {
            (tar::EntryType::Link, "usr/bin/tool") => (0o755, (1000, 1000)),
            (tar::EntryType::Link, "app/hello.txt") => (0o640, (0, 33)),
            _ => (0o777, (0, 0)),
        };
        let mut h = Self::header(kind, mode, owner);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn device(&mut self, kind: tar::EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(kind, 0o666, (0, 0));
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// `security.capability` for cap_net_bind_service, permitted and effective (v2).
const CAPABILITY: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// Writes a three-layer image (gzip, zstd, plain) into the OCI layout at `dir`, tag `t`.
fn build_image(dir: &Path) {
    let store = ContentStore::create(dir).unwrap();
    use tar::EntryType as T;
    let mut l1 = Tar::new();
    l1.dir("etc/", 0o755, (0, 0))
        .file("etc/motd", b"deleted by layer 2\n", 0o644, (0, 0))
        .file("etc/os-release", b"ID=strata\n", 0o644, (0, 0))
        .dir("usr/", 0o755, (0, 0))
        .dir("usr/bin/", 0o755, (0, 0))
        .file_x(
            "usr/bin/tool",
            &pseudo_random(3 << 20, 1),
            0o755,
            (1000, 1000),
            &[("user.origin", b"layer one")],
        )
        .file_x(
            "usr/bin/ping",
            b"#!/bin/sh\n",
            0o755,
            (0, 0),
            &[("security.capability", CAPABILITY)],
        )
        .file("usr/bin/suid", b"#!/bin/sh\n", 0o4755, (0, 0))
        .link(T::Link, "usr/bin/tool-again", "usr/bin/tool")
        .link(T::Symlink, "usr/bin/sh", "tool")
        .link(T::Symlink, "usr/bin/dangling", "/nowhere")
        .dir("dev/", 0o755, (0, 0))
        .device(T::Char, "dev/null", 1, 3)
        .device(T::Block, "dev/loop9", 7, 9)
        .device(T::Fifo, "dev/fifo", 0, 0)
        .dir("var/", 0o755, (0, 0))
        .dir("var/cache/", 0o755, (0, 0))
        .file("var/cache/stale", b"hidden by layer 2\n", 0o600, (0, 0))
        .dir("home/", 0o755, (0, 0))
        .dir("home/user/", 0o700, (2000, 2000))
        .file("home/user/secret", b"mode 0400\n", 0o400, (2000, 2000));
    let mut l2 = Tar::new();
    l2.file("etc/.wh.motd", b"", 0o644, (0, 0))
        .dir("var/cache/", 0o755, (0, 0))
        .file("var/cache/.wh..wh..opq", b"", 0o644, (0, 0))
        .file("var/cache/fresh", b"written by layer 2\n", 0o644, (0, 0))
        .dir("app/", 0o750, (0, 33))
        .file_x(
            "app/hello.txt",
            b"hello from layer 2\n",
            0o640,
            (0, 33),
            &[("user.lang", b"en")],
        )
        .link(T::Link, "app/hello-link", "app/hello.txt");
    let mut l3 = Tar::new();
    l3.file("top.txt", b"hello from the top layer\n", 0o644, (0, 0))
        .file("big.bin", &pseudo_random(9 << 20, 3), 0o644, (0, 0))
        .file("small-1", b"one\n", 0o644, (0, 0))
        .file("small-2", &pseudo_random(300_000, 4), 0o644, (0, 0))
        .file("unread.bin", &pseudo_random(5 << 20, 5), 0o644, (0, 0))
        .file("unread-2.bin", &pseudo_random(5 << 20, 6), 0o644, (0, 0))
        .file("usr/bin/.wh.dangling", b"", 0o644, (0, 0));

    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, media_type) in [
        (l1.finish(), MediaType::ImageLayerGzip),
        (l2.finish(), MediaType::ImageLayerZstd),
        (l3.finish(), MediaType::ImageLayer),
    ] {
        diff_ids.push(format!("sha256:{:x}", sha2::Sha256::digest(&tar)));
        let blob = match media_type {
            MediaType::ImageLayerGzip => {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(&tar).unwrap();
                gz.finish().unwrap()
            }
            MediaType::ImageLayerZstd => zstd::encode_all(&tar[..], 3).unwrap(),
            _ => tar,
        };
        let mut w = store.writer().unwrap();
        w.write_all(&blob).unwrap();
        let (digest, size) = w.commit(None).unwrap();
        descs.push(
            DescriptorBuilder::default()
                .media_type(media_type)
                .digest(digest)
                .size(size)
                .build()
                .unwrap(),
        );
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(oci_spec::image::Arch::Amd64)
        .os(oci_spec::image::Os::Linux)
        .config(ConfigBuilder::default().build().unwrap())
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let mut w = store.writer().unwrap();
    w.write_all(&serde_json::to_vec(&config).unwrap()).unwrap();
    let (digest, size) = w.commit(None).unwrap();
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(digest)
                .size(size)
                .build()
                .unwrap(),
        )
        .layers(descs)
        .build()
        .unwrap();
    store.add_image(&manifest, Some("t")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tree comparison.

/// The mtime of every entry of the test image.
const IMAGE_MTIME: u64 = 1_700_000_000;

/// Everything observable about one path (times other than mtime aside).
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    /// The image's (all its entries have the same); None for files made when the root was
    /// (the init layer's) and for directories (their mtimes change as entries are created).
    mtime: Option<(i64, i64)>,
    rdev: u64,
    content: String,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn xattrs_of(path: &Path, skip_overlay: bool) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 64 * 1024];
    let n = xattr::llistxattr(path, &mut names);
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8(name.to_vec()).unwrap();
        if skip_overlay && name.starts_with("trusted.overlay.") {
            continue;
        }
        out.insert(name.clone(), xattr::lgetxattr(path, &name));
    }
    out
}

/// Reading xattrs without following symlinks: `nix` has no wrapper and this package does not
/// depend on `rustix`, so these call libc (re-exported by `nix`) directly.
mod xattr {
    use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

    fn c(path: &Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).unwrap()
    }

    pub fn llistxattr(path: &Path, buf: &mut [u8]) -> usize {
        let p = c(path);
        // SAFETY: valid C string and buffer.
        let n = unsafe { nix::libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(
            n >= 0,
            "llistxattr {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        n as usize
    }

    pub fn lgetxattr(path: &Path, name: &str) -> Vec<u8> {
        let p = c(path);
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: valid C strings and buffer.
        let len = unsafe {
            nix::libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        assert!(
            len >= 0,
            "lgetxattr {} {name}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        buf.truncate(len as usize);
        buf
    }
}

/// Every path under `root` with what it is, plus the hard-link groups (paths sharing an inode).
fn observe(
    root: &Path,
    skip_overlay_xattrs: bool,
) -> (BTreeMap<String, Observed>, Vec<Vec<String>>) {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let m = std::fs::symlink_metadata(&path).unwrap();
        let ft = m.file_type();
        let (kind, content) = if ft.is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
            ("dir", String::new())
        } else if ft.is_symlink() {
            (
                "symlink",
                std::fs::read_link(&path).unwrap().display().to_string(),
            )
        } else if ft.is_file() {
            let mut data = Vec::new();
            std::fs::File::open(&path)
                .unwrap()
                .read_to_end(&mut data)
                .unwrap();
            (
                "file",
                format!("{} bytes {:x}", data.len(), sha2::Sha256::digest(&data)),
            )
        } else if ft.is_char_device() {
            ("char", String::new())
        } else if ft.is_block_device() {
            ("block", String::new())
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else {
            ("other", String::new())
        };
        let name = rel.display().to_string();
        if !ft.is_dir() {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(name.clone());
        }
        out.insert(
            name,
            Observed {
                kind,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                nlink: if ft.is_dir() { 0 } else { m.nlink() },
                mtime: (!ft.is_dir() && m.mtime() == IMAGE_MTIME as i64)
                    .then(|| (m.mtime(), m.mtime_nsec())),
                rdev: m.rdev(),
                content,
                xattrs: xattrs_of(&path, skip_overlay_xattrs),
            },
        );
    }
    let mut groups: Vec<Vec<String>> = inodes
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    (out, groups)
}

fn assert_same_tree(actual: &Path, expected: &Path, skip_overlay_xattrs: bool) {
    let (a, ag) = observe(actual, skip_overlay_xattrs);
    let (e, eg) = observe(expected, skip_overlay_xattrs);
    let a_names: Vec<&String> = a.keys().collect();
    let e_names: Vec<&String> = e.keys().collect();
    assert_eq!(
        a_names,
        e_names,
        "{} vs {}: paths",
        actual.display(),
        expected.display()
    );
    for (name, obs) in &e {
        assert_eq!(
            &a[name],
            obs,
            "{name}: {} vs {}",
            actual.display(),
            expected.display()
        );
    }
    assert_eq!(ag, eg, "hard-link groups");
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
        let exported = strata(&["export", "--to", export.to_str().unwrap(), &image]);
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
    let chain = strata(&["--config", &cfg, "unpack", &s.image]);
    let ls = strata(&["--config", &cfg, "ls"]);
    assert_eq!(remote_count(&ls), 3, "every layer is remote: {ls}");
    assert!(ls.contains(chain.trim()), "{ls}");

    // A normal unpack and mount, for reference.
    let plain = s.path("rootfs-plain");
    std::fs::create_dir(&plain).unwrap();
    let _plain_guard = Unmount(plain.clone());
    let root_plain = s.path("root-plain");
    strata(&[
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
    let chain = strata(&["--config", &cfg, "unpack", &s.image]);
    assert!(!chain.trim().is_empty());
    let ls = strata(&["--config", &cfg, "ls"]);
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
