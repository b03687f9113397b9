//! Images made by other tools unpack identically: a multi-layer image is built with `umoci`
//! (unpack/repack, `insert`, `insert --opaque`, `insert --whiteout`), copied with `skopeo` into
//! zstd, Docker-manifest and plain-tar variants, and each variant is unpacked by strata (real
//! overlay snapshotter, `ContentApplier`, ordered and parallel unpack, a view mounted) and
//! compared with what `umoci unpack` makes of the original image: paths, types, contents, modes,
//! owners, times, symlink targets, hard-link groups, xattrs and device numbers.
//!
//! `umoci` and `skopeo` are Debian packages (`cargo xtask test` installs them): without them
//! the test fails, it never skips. It runs as root (device nodes, owners, mounts).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs::applier::ContentApplier;
use rootfs::content::ContentStore;
use rootfs::mount::MountGuard;
use rootfs::{UnpackOpts, Unpacker};
use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};
use sha2::{Digest as _, Sha256};
use snapshot_core::{Labels, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

/// Fails (never skips) when a tool is missing, saying which package provides it.
fn require_tool(cmd: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(cmd).is_file()));
    assert!(
        found,
        "`{cmd}` is not installed: this test needs the Debian package `{package}` \
         (`apt-get install {package}`; `cargo xtask test` installs it)"
    );
}

/// Runs a command in `dir`, failing with its command line and output.
fn run(dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(CWD, p, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, XattrFlags::empty()).unwrap();
}

fn mknod(p: &Path, kind: FileType, mode: u32, major: u32, minor: u32) {
    let dev = rustix::fs::makedev(major, minor);
    rustix::fs::mknodat(CWD, p, kind, Mode::from_raw_mode(mode), dev).unwrap();
    chmod(p, mode);
}

fn write(p: &Path, data: impl AsRef<[u8]>) {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(p, data).unwrap();
}

/// Bytes that do not compress, reproducibly.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The first layer's tree: every kind of entry and metadata a layer can carry.
fn fill_base(r: &Path) {
    for d in ["etc", "data/sub", "opq/keep", "del/deep", "empty-dir"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    write(&r.join("etc/hello"), "hello\n");
    set_mtime(&r.join("etc/hello"), 981_173_106, 0);
    write(&r.join("etc/gone"), "gone\n");
    write(&r.join("data/big"), noise(300_000, 1));
    write(&r.join("data/text"), "x".repeat(5000));
    fs::hard_link(r.join("data/big"), r.join("data/hl")).unwrap();
    fs::hard_link(r.join("data/big"), r.join("etc/hl2")).unwrap();
    setxattr(&r.join("data/big"), "user.foo", b"bar");
    setxattr(&r.join("data/sub"), "user.dir", b"yes");
    write(&r.join("data/owned"), "owned\n");
    chown(&r.join("data/owned"), 1000, 1001);
    chmod(&r.join("data/owned"), 0o640);
    // Beyond the 7 octal digits of a ustar header: PAX (or base-256) numbers.
    write(&r.join("data/big-ids"), "ids\n");
    chown(&r.join("data/big-ids"), 3_000_000, 4_000_000);
    // A PAX path (over 100 bytes) and a non-ASCII name.
    let long = format!("data/{}/{}", "d".repeat(90), "f".repeat(80));
    write(&r.join(long), "long name\n");
    write(&r.join("data/ünïcødé €.txt"), "utf-8\n");
    write(&r.join("suid"), noise(4000, 2));
    chmod(&r.join("suid"), 0o4755);
    write(&r.join("sgid-file"), "sgid\n");
    chown(&r.join("sgid-file"), 0, 50);
    chmod(&r.join("sgid-file"), 0o2711);
    fs::create_dir(r.join("tmp")).unwrap();
    chmod(&r.join("tmp"), 0o1777);
    fs::create_dir(r.join("sgid")).unwrap();
    chown(&r.join("sgid"), 0, 50);
    chmod(&r.join("sgid"), 0o2775);
    write(&r.join("nothing"), "");
    chmod(&r.join("nothing"), 0o000);
    symlink("../etc/hello", r.join("data/rel")).unwrap();
    symlink("/etc/hello", r.join("abs")).unwrap();
    symlink("nowhere", r.join("dangling")).unwrap();
    symlink("data", r.join("dirlink")).unwrap();
    chown(&r.join("dangling"), 7, 8);
    mknod(&r.join("fifo"), FileType::Fifo, 0o620, 0, 0);
    mknod(&r.join("null"), FileType::CharacterDevice, 0o666, 1, 3);
    mknod(&r.join("blk"), FileType::BlockDevice, 0o660, 7, 200);
    write(&r.join("opq/a"), "a\n");
    write(&r.join("opq/keep/k"), "k\n");
    write(&r.join("del/deep/d"), "d\n");
    write(&r.join("swap"), "a file, later a directory\n");
    // A private directory that later layers write into without naming it.
    write(&r.join("home/u/.profile"), "profile\n");
    write(&r.join("home/u/gone"), "gone\n");
    chown(&r.join("home/u"), 1000, 1000);
    chmod(&r.join("home/u"), 0o700);
    chmod(&r.join("home"), 0o711);
    setxattr(&r.join("home/u"), "user.home", b"u");
    set_mtime(&r.join("home/u"), 1_000_000_000, 0);
}

/// The second layer's changes (umoci repack turns them into a diff with whiteouts).
fn change(r: &Path) {
    fs::remove_file(r.join("etc/gone")).unwrap();
    fs::remove_dir_all(r.join("del")).unwrap();
    chmod(&r.join("data/big-ids"), 0o600);
    write(&r.join("etc/hello"), "changed\n");
    write(&r.join("etc/new"), "new\n");
    setxattr(&r.join("etc/new"), "user.bin", b"\0\x01\xffbinary\n");
    chown(&r.join("suid"), 2000, 2000);
    chmod(&r.join("suid"), 0o4755);
    fs::remove_dir_all(r.join("data/sub")).unwrap();
    symlink("../etc", r.join("data/sub")).unwrap();
    fs::hard_link(r.join("data/text"), r.join("data/text2")).unwrap();
    // An xattr change re-emits the file with all its links.
    rustix::fs::lremovexattr(r.join("data/big"), "user.foo").unwrap();
    setxattr(&r.join("data/big"), "user.other", b"1");
    fs::remove_file(r.join("swap")).unwrap();
    write(&r.join("swap/inside"), "now a directory\n");
    write(&r.join("opq/a"), "a, rewritten\n");
}

/// Builds `<dir>/umoci` (tag `t`) with umoci alone.
fn build_umoci_image(dir: &Path) -> PathBuf {
    let layout = dir.join("umoci");
    let image = "umoci:t";
    run(dir, "umoci", &["init", "--layout", "umoci"]);
    run(dir, "umoci", &["new", "--image", image]);
    for (i, edit) in [fill_base as fn(&Path), change].into_iter().enumerate() {
        let bundle = format!("bundle{i}");
        run(dir, "umoci", &["unpack", "--image", image, &bundle]);
        edit(&dir.join(&bundle).join("rootfs"));
        run(dir, "umoci", &["repack", "--image", image, &bundle]);
        fs::remove_dir_all(dir.join(&bundle)).unwrap();
    }
    write(&dir.join("ins/opq/c"), "c\n");
    run(
        dir,
        "umoci",
        &["insert", "--image", image, "--opaque", "ins/opq", "/opq"],
    );
    run(
        dir,
        "umoci",
        &["insert", "--image", image, "--whiteout", "/data/owned"],
    );
    // Layers that name only a file or a whiteout under the private directory, not the
    // directories above it.
    write(&dir.join("ins/added"), "added\n");
    run(
        dir,
        "umoci",
        &["insert", "--image", image, "ins/added", "/home/u/added"],
    );
    run(
        dir,
        "umoci",
        &["insert", "--image", image, "--whiteout", "/home/u/gone"],
    );
    run(dir, "umoci", &["gc", "--layout", "umoci"]);
    layout
}

/// One node of a tree as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: String,
    owner: (u32, u32),
    /// Modification time (seconds, nanoseconds).
    mtime: (i64, i64),
    /// SHA-256 and size of a regular file's content.
    content: Option<(String, u64)>,
    link: Option<PathBuf>,
    device: Option<(u32, u32)>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// The paths sharing this inode (hard links), for non-directories.
    links: Vec<PathBuf>,
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap();
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        // security.* belongs to the host (SELinux, capabilities are not in these images);
        // overlay's own xattrs are hidden by overlayfs anyway.
        if name.starts_with(b"security.")
            || name.starts_with(b"trusted.overlay.")
            || name.starts_with(b"user.overlay.")
        {
            continue;
        }
        let mut value = vec![0u8; 64 * 1024];
        let len = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut value[..]).unwrap();
        value.truncate(len);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    out
}

/// Every path under `root` (the root itself as `/`) with what is compared.
fn scan(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let md = fs::symlink_metadata(&p).unwrap();
        let rel = match p.strip_prefix(root).unwrap() {
            r if r.as_os_str().is_empty() => PathBuf::from("/"),
            r => r.to_path_buf(),
        };
        let ft = md.file_type();
        let kind = match FileType::from_raw_mode(md.mode()) {
            FileType::Directory => "dir",
            FileType::RegularFile => "file",
            FileType::Symlink => "symlink",
            FileType::Fifo => "fifo",
            FileType::CharacterDevice => "char device",
            FileType::BlockDevice => "block device",
            _ => "other",
        };
        let device = (kind == "char device" || kind == "block device").then(|| {
            let rdev = md.rdev();
            (rustix::fs::major(rdev), rustix::fs::minor(rdev))
        });
        let content = ft.is_file().then(|| {
            let data = fs::read(&p).unwrap();
            let hex: String = Sha256::digest(&data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (hex, data.len() as u64)
        });
        if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        } else {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(rel.clone());
        }
        nodes.insert(
            rel,
            Node {
                kind,
                mode: format!("{:04o}", md.mode() & 0o7777),
                owner: (md.uid(), md.gid()),
                mtime: (md.mtime(), md.mtime_nsec()),
                content,
                link: ft.is_symlink().then(|| fs::read_link(&p).unwrap()),
                device,
                xattrs: xattrs(&p),
                links: Vec::new(),
            },
        );
    }
    for mut group in inodes.into_values() {
        group.sort();
        for p in &group {
            if let Some(n) = nodes.get_mut(p) {
                n.links = group.clone();
            }
        }
    }
    nodes
}

/// The differences between the reference tree and strata's, one line each.
fn differences(reference: &BTreeMap<PathBuf, Node>, ours: &BTreeMap<PathBuf, Node>) -> Vec<String> {
    let mut out = Vec::new();
    for (path, want) in reference {
        match ours.get(path) {
            None => out.push(format!(
                "{}: missing (umoci has a {})",
                path.display(),
                want.kind
            )),
            Some(got) => {
                let mut want = want.clone();
                if path == Path::new("/") {
                    // The root's times are the snapshot directory's: containerd ignores `./`.
                    want.mtime = got.mtime;
                }
                if &want != got {
                    out.push(format!(
                        "{}:\n    umoci:  {want:?}\n    strata: {got:?}",
                        path.display()
                    ));
                }
            }
        }
    }
    for (path, got) in ours {
        if !reference.contains_key(path) {
            out.push(format!(
                "{}: unexpected {} (not in umoci's tree)",
                path.display(),
                got.kind
            ));
        }
    }
    out
}

/// Unpacks `layout:t` into a fresh overlay snapshotter under `work`, mounts a view of the top
/// and scans it.
fn unpack_with_strata(work: &Path, layout: &Path, max_parallel: usize) -> BTreeMap<PathBuf, Node> {
    let store = ContentStore::open(layout).unwrap();
    let image = store.resolve(Some("t")).unwrap();
    let sn = OverlaySnapshotter::open(&work.join("snapshots"), Options::default()).unwrap();
    let applier = ContentApplier::new(store);
    let chain = Unpacker::new()
        .apply_layers(&image.layers, &sn, &applier, &UnpackOpts { max_parallel })
        .unwrap_or_else(|e| panic!("strata cannot unpack {}: {e}", layout.display()));
    let mounts = sn.view("view", chain.as_ref(), &Labels::new()).unwrap();
    let target = work.join("view");
    fs::create_dir_all(&target).unwrap();
    let guard = MountGuard::mount(&mounts, &target).unwrap();
    let tree = scan(&target);
    guard.unmount().unwrap();
    sn.remove("view").unwrap();
    sn.close().unwrap();
    tree
}

fn layer_media_types(layout: &Path) -> Vec<String> {
    let store = ContentStore::open(layout).unwrap();
    let image = store.resolve(Some("t")).unwrap();
    image
        .layers
        .iter()
        .map(|l| l.blob.media_type().to_string())
        .collect()
}

#[test]
fn images_made_by_umoci_and_skopeo_unpack_as_umoci_unpacks_them() {
    require_tool("umoci", "umoci");
    require_tool("skopeo", "skopeo");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let umoci = build_umoci_image(dir);
    assert_eq!(layer_media_types(&umoci).len(), 6, "umoci made six layers");

    // The same image through skopeo: zstd layers; a Docker schema 2 manifest with Docker
    // media types; plain tar layers (decompressed through a `dir:` copy).
    run(
        dir,
        "skopeo",
        &[
            "copy",
            "-q",
            "--dest-compress-format",
            "zstd",
            "oci:umoci:t",
            "oci:zstd:t",
        ],
    );
    run(
        dir,
        "skopeo",
        &[
            "copy",
            "-q",
            "--format",
            "v2s2",
            "oci:umoci:t",
            "oci:docker:t",
        ],
    );
    run(
        dir,
        "skopeo",
        &[
            "copy",
            "-q",
            "--dest-decompress",
            "oci:umoci:t",
            "dir:plain-dir",
        ],
    );
    run(
        dir,
        "skopeo",
        &[
            "copy",
            "-q",
            "--format",
            "oci",
            "--dest-oci-accept-uncompressed-layers",
            "dir:plain-dir",
            "oci:plain:t",
        ],
    );
    let variants = [
        (
            "umoci, gzip, unpacked in order",
            "umoci",
            1,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            "umoci, gzip, unpacked in parallel",
            "umoci",
            4,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            "skopeo, zstd, in parallel",
            "zstd",
            4,
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (
            "skopeo, zstd, in order",
            "zstd",
            1,
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (
            "skopeo, Docker v2s2 manifest",
            "docker",
            4,
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
        (
            "skopeo, plain tar",
            "plain",
            4,
            "application/vnd.oci.image.layer.v1.tar",
        ),
    ];
    for (what, layout, _, media_type) in &variants {
        let types = layer_media_types(&dir.join(layout));
        assert!(
            types.iter().all(|t| t == media_type),
            "{what}: expected every layer as {media_type}, the image has {types:?}"
        );
    }

    run(dir, "umoci", &["unpack", "--image", "umoci:t", "reference"]);
    let reference = scan(&dir.join("reference/rootfs"));
    // The fixture is what it claims to be (so a broken fixture cannot pass vacuously).
    for (path, check) in [
        ("etc/gone", None),
        ("del", None),
        ("data/owned", None),
        ("opq/a", None),
        ("opq/keep", None),
        ("home/u/gone", None),
        ("opq/c", Some("file")),
        ("home/u/added", Some("file")),
        ("swap/inside", Some("file")),
        ("data/sub", Some("symlink")),
        ("null", Some("char device")),
        ("blk", Some("block device")),
        ("fifo", Some("fifo")),
    ] {
        assert_eq!(
            reference.get(Path::new(path)).map(|n| n.kind),
            check,
            "umoci's tree at {path}"
        );
    }
    assert_eq!(reference[Path::new("home/u")].mode, "0700");
    assert_eq!(reference[Path::new("data/big")].links.len(), 3);
    assert_eq!(reference[Path::new("suid")].mode, "4755");
    assert_eq!(
        reference[Path::new("data/big-ids")].owner,
        (3_000_000, 4_000_000)
    );
    assert_eq!(
        reference[Path::new("etc/new")]
            .xattrs
            .get("user.bin")
            .map(Vec::as_slice),
        Some(&b"\0\x01\xffbinary\n"[..])
    );

    let mut failures = Vec::new();
    for (i, (what, layout, max_parallel, _)) in variants.iter().enumerate() {
        let work = dir.join(format!("strata-{i}"));
        let ours = unpack_with_strata(&work, &dir.join(layout), *max_parallel);
        let diffs = differences(&reference, &ours);
        if !diffs.is_empty() {
            failures.push(format!(
                "{what} ({} differences):\n  {}",
                diffs.len(),
                diffs.into_iter().take(20).collect::<Vec<_>>().join("\n  ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "strata's unpack differs from `umoci unpack`:\n{}",
        failures.join("\n")
    );
}
