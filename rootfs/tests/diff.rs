//! Differs with real parts (run as root): the walking differ over plain directories, the
//! overlay upperdir differ on a real overlay mount, `diff_mounts`, compression, and the tar
//! they write, checked entry by entry.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;
use oci_spec::image::MediaType;
use rootfs::Error;
use rootfs::apply::{WhiteoutMode, apply_blob};
use rootfs::content::ContentStore;
use rootfs::diff::{
    ANNOTATION_UNCOMPRESSED, Compression, DiffOutput, diff_dirs, diff_mounts, diff_overlay_upper,
};
use rootfs::mount::MountGuard;
use snapshot_core::Mount;
use snapshot_core::identity::sha256_digest;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Reading layers back

/// One tar entry as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TarEntry {
    name: String,
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    link: Option<String>,
    dev: (u32, u32),
    pax: BTreeMap<String, Vec<u8>>,
    data: Vec<u8>,
}

impl TarEntry {
    /// `name type mode uid:gid` (+ `-> link`), for readable listings.
    fn summary(&self) -> String {
        let mut s = format!(
            "{} {} {:o} {}:{}",
            self.name, self.kind, self.mode, self.uid, self.gid
        );
        if let Some(l) = &self.link {
            s.push_str(&format!(" -> {l}"));
        }
        s
    }
}

fn names(entries: &[TarEntry]) -> Vec<String> {
    entries.iter().map(|e| e.name.clone()).collect()
}

/// Checks the blob and its descriptor, decompresses it, checks the diff ID, and parses the tar.
fn read_layer(store: &ContentStore, out: &DiffOutput) -> Vec<TarEntry> {
    let blob_path = store
        .root()
        .join("blobs/sha256")
        .join(out.blob.digest().digest());
    let raw = fs::read(&blob_path).unwrap();
    assert_eq!(raw.len() as u64, out.blob.size());
    assert_eq!(sha256_digest(&raw), *out.blob.digest());
    assert_eq!(
        out.blob
            .annotations()
            .as_ref()
            .unwrap()
            .get(ANNOTATION_UNCOMPRESSED),
        Some(&out.diff_id.to_string())
    );
    let tar = match out.blob.media_type() {
        MediaType::ImageLayer => raw,
        MediaType::ImageLayerGzip => {
            assert_eq!(&raw[..3], &[0x1f, 0x8b, 0x08]);
            let mut v = Vec::new();
            flate2::read::MultiGzDecoder::new(&raw[..])
                .read_to_end(&mut v)
                .unwrap();
            v
        }
        MediaType::ImageLayerZstd => {
            assert_eq!(&raw[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
            zstd::decode_all(&raw[..]).unwrap()
        }
        other => panic!("unexpected media type {other}"),
    };
    assert_eq!(sha256_digest(&tar), out.diff_id, "diff ID");
    assert_eq!(tar.len() % 512, 0);
    assert!(
        tar[tar.len() - 1024..].iter().all(|b| *b == 0),
        "end blocks"
    );
    parse_tar(&tar)
}

fn parse_tar(tar: &[u8]) -> Vec<TarEntry> {
    let mut archive = tar::Archive::new(tar);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut pax = BTreeMap::new();
        if let Some(exts) = entry.pax_extensions().unwrap() {
            for ext in exts {
                let ext = ext.unwrap();
                pax.insert(ext.key().unwrap().to_owned(), ext.value_bytes().to_vec());
            }
        }
        let h = entry.header().clone();
        // Every header is ustar/PAX: magic, version, no user or group names.
        assert_eq!(&h.as_bytes()[257..265], b"ustar\x0000");
        assert!(h.username_bytes().unwrap_or_default().is_empty());
        assert!(h.groupname_bytes().unwrap_or_default().is_empty());
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap());
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        let uid = match pax.get("uid") {
            Some(v) => std::str::from_utf8(v).unwrap().parse().unwrap(),
            None => h.uid().unwrap(),
        };
        let gid = match pax.get("gid") {
            Some(v) => std::str::from_utf8(v).unwrap().parse().unwrap(),
            None => h.gid().unwrap(),
        };
        out.push(TarEntry {
            name,
            kind: h.entry_type().as_byte() as char,
            mode: h.mode().unwrap(),
            uid,
            gid,
            size: h.size().unwrap(),
            mtime: h.mtime().unwrap(),
            link,
            dev: (
                h.device_major().unwrap().unwrap_or(0),
                h.device_minor().unwrap().unwrap_or(0),
            ),
            pax,
            data,
        });
    }
    out
}

fn find<'a>(entries: &'a [TarEntry], name: &str) -> &'a TarEntry {
    entries
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no entry {name} in {:?}", names(entries)))
}

/// Checks that `e` carries `path`'s metadata as containerd writes it.
fn assert_header_matches(e: &TarEntry, path: &Path) {
    let m = fs::symlink_metadata(path).unwrap();
    assert_eq!(e.mode, m.mode() & 0o7777, "{}", e.name);
    assert_eq!(e.uid, u64::from(m.uid()), "{}", e.name);
    assert_eq!(e.gid, u64::from(m.gid()), "{}", e.name);
    assert_eq!(
        e.mtime as i64,
        m.mtime(),
        "{}: mtime in whole seconds",
        e.name
    );
    if e.kind == '0' {
        assert_eq!(e.size, m.len(), "{}", e.name);
        assert_eq!(e.data, fs::read(path).unwrap(), "{}", e.name);
    } else {
        assert_eq!(e.size, 0, "{}", e.name);
    }
}

fn assert_whiteout(e: &TarEntry) {
    assert_eq!(e.kind, '0', "{}", e.name);
    assert_eq!(
        (e.mode, e.uid, e.gid, e.size, e.mtime),
        (0, 0, 0, 0, 0),
        "{}",
        e.name
    );
    assert!(e.pax.is_empty(), "{}", e.name);
}

// ---------------------------------------------------------------------------------------------
// Building trees

fn write(path: impl AsRef<Path>, data: &str) {
    let path = path.as_ref();
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    fs::write(path, data).unwrap();
}

fn mkdir(path: impl AsRef<Path>) {
    fs::create_dir_all(path).unwrap();
}

fn chmod(path: impl AsRef<Path>, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: impl AsRef<Path>, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

fn set_mtime(path: impl AsRef<Path>, secs: i64, nanos: i64) {
    let t = TimeSpec::new(secs, nanos);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path.as_ref(),
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

fn node(path: impl AsRef<Path>, kind: SFlag, mode: u32, major: u64, minor: u64) {
    mknod(
        path.as_ref(),
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .unwrap();
    chmod(path, mode); // past the umask
}

fn set_xattr(path: impl AsRef<Path>, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path.as_ref(), name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

fn cp_a(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A file capability (v2): cap_net_bind_service, effective.
const CAPABILITY: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // magic v2 | effective
    0x00, 0x04, 0x00, 0x00, // permitted[0]: bit 10
    0x00, 0x00, 0x00, 0x00, // inheritable[0]
    0x00, 0x00, 0x00, 0x00, // permitted[1]
    0x00, 0x00, 0x00, 0x00, // inheritable[1]
];

fn long_dir() -> String {
    "l".repeat(120)
}

/// The lower tree of the plain-directory test.
fn build_lower(lower: &Path) {
    write(lower.join("a/chmod"), "c");
    write(lower.join("a/chown"), "o");
    write(lower.join("a/gone"), "x");
    write(lower.join("a/keep"), "keep");
    write(lower.join("a/mod"), "old");
    write(lower.join("b/c/d"), "deep");
    node(lower.join("cdev"), SFlag::S_IFCHR, 0o666, 1, 3);
    write(lower.join("dir2file/child"), "c");
    write(lower.join("file2dir"), "f");
    write(lower.join("hl1"), "shared");
    fs::hard_link(lower.join("hl1"), lower.join("hl2")).unwrap();
    write(lower.join("keeplink1"), "k");
    fs::hard_link(lower.join("keeplink1"), lower.join("keeplink2")).unwrap();
    symlink("target", lower.join("link")).unwrap();
    mkdir(lower.join("perm"));
    for (name, data) in [("same0", "AAAA"), ("diff0", "AAAA")] {
        write(lower.join(name), data);
        set_mtime(lower.join(name), 1_600_000_000, 0);
    }
    symlink("aaaa", lower.join("slink0")).unwrap();
    set_mtime(lower.join("slink0"), 1_600_000_000, 0);
}

/// Changes `upper` (a copy of the lower tree) in every way the walking differ must see.
fn change_upper(upper: &Path) {
    chmod(upper.join("a/chmod"), 0o600);
    chown(upper.join("a/chown"), 1000, 1001);
    fs::remove_file(upper.join("a/gone")).unwrap();
    write(upper.join("a/mod"), "new content");
    fs::remove_dir_all(upper.join("b")).unwrap();
    fs::remove_dir_all(upper.join("dir2file")).unwrap();
    write(upper.join("dir2file"), "now a file");
    fs::remove_file(upper.join("file2dir")).unwrap();
    write(upper.join("file2dir/x"), "x");
    write(upper.join("hl1"), "shared, changed"); // same inode: hl2 changes too
    fs::remove_file(upper.join("link")).unwrap();
    symlink("elsewhere", upper.join("link")).unwrap();
    chmod(upper.join("perm"), 0o700);
    // Whole-second mtimes: content (and link targets) decide.
    write(upper.join("diff0"), "BBBB");
    set_mtime(upper.join("diff0"), 1_600_000_000, 0);
    fs::remove_file(upper.join("same0")).unwrap();
    write(upper.join("same0"), "AAAA");
    set_mtime(upper.join("same0"), 1_600_000_000, 0);
    fs::remove_file(upper.join("slink0")).unwrap();
    symlink("bbbb", upper.join("slink0")).unwrap();
    set_mtime(upper.join("slink0"), 1_600_000_000, 0);
    // Additions of every kind.
    write(upper.join("new/dir/file"), "n");
    chmod(upper.join("new/dir/file"), 0o640);
    node(upper.join("new/cdev"), SFlag::S_IFCHR, 0o620, 4, 5);
    node(upper.join("new/bdev"), SFlag::S_IFBLK, 0o660, 7, 0);
    node(upper.join("new/fifo"), SFlag::S_IFIFO, 0o600, 0, 0);
    let _sock = std::os::unix::net::UnixListener::bind(upper.join("new/sock")).unwrap();
    write(upper.join("new/nh1"), "nh");
    fs::hard_link(upper.join("new/nh1"), upper.join("new/nh2")).unwrap();
    symlink("../a/keep", upper.join("new/sym")).unwrap();
    write(upper.join("cap"), "cap");
    set_xattr(upper.join("cap"), "security.capability", &CAPABILITY);
    set_xattr(upper.join("cap"), "user.other", b"not carried");
    write(upper.join("naïve"), "u");
    write(upper.join(format!("long/{}/f", long_dir())), "long");
    write(upper.join("bigid"), "big");
    chown(upper.join("bigid"), 3_000_000, 3_000_001);
    chmod(upper.join("bigid"), 0o4755);
}

#[test]
fn walking_differ_writes_every_kind_of_change() {
    let tmp = TempDir::new().unwrap();
    let lower = tmp.path().join("lower");
    let upper = tmp.path().join("upper");
    mkdir(&lower);
    build_lower(&lower);
    cp_a(&lower, &upper);
    change_upper(&upper);
    let store = ContentStore::create(&tmp.path().join("store")).unwrap();

    let out = diff_dirs(&lower, &upper, Compression::Gzip, &store).unwrap();
    assert_eq!(out.blob.media_type(), &MediaType::ImageLayerGzip);
    let entries = read_layer(&store, &out);
    let long = long_dir();
    let expected = vec![
        "a/ 5 755 0:0".to_owned(),
        "a/chmod 0 600 0:0".into(),
        "a/chown 0 644 1000:1001".into(),
        "a/.wh.gone 0 0 0:0".into(),
        "a/mod 0 644 0:0".into(),
        ".wh.b 0 0 0:0".into(),
        "bigid 0 4755 3000000:3000001".into(),
        "cap 0 644 0:0".into(),
        "diff0 0 644 0:0".into(),
        "dir2file 0 644 0:0".into(),
        "file2dir/ 5 755 0:0".into(),
        "file2dir/x 0 644 0:0".into(),
        "hl1 0 644 0:0".into(),
        "hl2 1 644 0:0 -> hl1".into(),
        "link 2 777 0:0 -> elsewhere".into(),
        "long/ 5 755 0:0".into(),
        format!("long/{long}/ 5 755 0:0"),
        format!("long/{long}/f 0 644 0:0"),
        "naïve 0 644 0:0".into(),
        "new/ 5 755 0:0".into(),
        "new/bdev 4 660 0:0".into(),
        "new/cdev 3 620 0:0".into(),
        "new/dir/ 5 755 0:0".into(),
        "new/dir/file 0 640 0:0".into(),
        "new/fifo 6 600 0:0".into(),
        "new/nh1 0 644 0:0".into(),
        "new/nh2 1 644 0:0 -> new/nh1".into(),
        "new/sym 2 777 0:0 -> ../a/keep".into(),
        "perm/ 5 700 0:0".into(),
        "slink0 2 777 0:0 -> bbbb".into(),
    ];
    let got: Vec<String> = entries.iter().map(TarEntry::summary).collect();
    assert_eq!(got, expected);

    // Headers, entry by entry.
    for e in &entries {
        if e.name.contains(".wh.") {
            assert_whiteout(e);
            continue;
        }
        let path = upper.join(e.name.trim_end_matches('/'));
        assert_header_matches(e, &path);
    }
    assert_eq!(find(&entries, "hl1").data, b"shared, changed");
    assert_eq!(find(&entries, "hl2").size, 0);
    assert_eq!(find(&entries, "new/cdev").dev, (4, 5));
    assert_eq!(find(&entries, "new/bdev").dev, (7, 0));
    // Only security.capability is carried, as a PAX xattr record.
    let cap = find(&entries, "cap");
    assert_eq!(
        cap.pax.keys().collect::<Vec<_>>(),
        ["SCHILY.xattr.security.capability"]
    );
    assert_eq!(cap.pax["SCHILY.xattr.security.capability"], CAPABILITY);
    // Non-ASCII names and ids beyond ustar's range go into PAX records.
    assert_eq!(find(&entries, "naïve").pax["path"], "naïve".as_bytes());
    let big = find(&entries, "bigid");
    assert_eq!(big.pax["uid"], b"3000000");
    assert_eq!(big.pax["gid"], b"3000001");
    // A long ASCII name is split into ustar prefix and name (no PAX record needed).
    assert!(find(&entries, &format!("long/{long}/f")).pax.is_empty());

    // Deterministic: the same trees give the same layer.
    let again = diff_dirs(&lower, &upper, Compression::Gzip, &store).unwrap();
    assert_eq!(again, out);

    // No changes: an empty layer (just the end blocks).
    let same = diff_dirs(&lower, &lower, Compression::None, &store).unwrap();
    assert!(read_layer(&store, &same).is_empty());
    assert_eq!(same.blob.size(), 1024);
}

#[test]
fn walking_differ_from_nothing_adds_everything() {
    let tmp = TempDir::new().unwrap();
    let empty = tmp.path().join("empty");
    let tree = tmp.path().join("tree");
    mkdir(&empty);
    build_lower(&tree);
    let store = ContentStore::create(&tmp.path().join("store")).unwrap();
    let out = diff_dirs(&empty, &tree, Compression::None, &store).unwrap();
    assert_eq!(out.blob.media_type(), &MediaType::ImageLayer);
    assert_eq!(out.diff_id, *out.blob.digest());
    let entries = read_layer(&store, &out);
    assert_eq!(
        names(&entries),
        [
            "a/",
            "a/chmod",
            "a/chown",
            "a/gone",
            "a/keep",
            "a/mod",
            "b/",
            "b/c/",
            "b/c/d",
            "cdev",
            "diff0",
            "dir2file/",
            "dir2file/child",
            "file2dir",
            "hl1",
            "hl2",
            "keeplink1",
            "keeplink2",
            "link",
            "perm/",
            "same0",
            "slink0"
        ]
    );
    assert_eq!(find(&entries, "hl2").link.as_deref(), Some("hl1"));
    assert_eq!(
        find(&entries, "keeplink2").link.as_deref(),
        Some("keeplink1")
    );
    assert_eq!(find(&entries, "cdev").dev, (1, 3));
    assert_eq!(find(&entries, "same0").mtime, 1_600_000_000);
}

#[test]
fn compression_none_gzip_and_zstd_describe_their_blobs() {
    let tmp = TempDir::new().unwrap();
    let lower = tmp.path().join("lower");
    let upper = tmp.path().join("upper");
    mkdir(&lower);
    build_lower(&lower);
    cp_a(&lower, &upper);
    change_upper(&upper);
    // Something compressible and larger than a buffer.
    write(upper.join("big"), &"0123456789abcdef".repeat(200_000));
    let store = ContentStore::create(&tmp.path().join("store")).unwrap();
    let mut diff_ids = Vec::new();
    for (c, media) in [
        (Compression::None, MediaType::ImageLayer),
        (Compression::Gzip, MediaType::ImageLayerGzip),
        (Compression::Zstd, MediaType::ImageLayerZstd),
    ] {
        assert_eq!(c.media_type(), media);
        let out = diff_dirs(&lower, &upper, c, &store).unwrap();
        assert_eq!(out.blob.media_type(), &media);
        let entries = read_layer(&store, &out); // checks digest, size, annotation, diff ID
        assert_eq!(find(&entries, "big").size, 3_200_000);
        if c != Compression::None {
            assert!(
                out.blob.size() < 3_200_000 / 10,
                "{c:?}: {}",
                out.blob.size()
            );
        }
        diff_ids.push(out.diff_id);
    }
    // One tar, whatever the compression.
    assert!(diff_ids.windows(2).all(|w| w[0] == w[1]));
    // Nothing left behind in the store's ingest directory.
    assert_eq!(
        fs::read_dir(store.root().join("ingest")).unwrap().count(),
        0
    );
}

// ---------------------------------------------------------------------------------------------
// Overlay

fn overlay_mount(lowers: &[&Path], upper: Option<(&Path, &Path)>) -> Mount {
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

fn bind_ro(source: &Path) -> Mount {
    Mount {
        kind: "bind".into(),
        source: source.display().to_string(),
        options: vec!["ro".into(), "rbind".into()],
    }
}

/// The lower tree of the overlay tests.
fn build_overlay_lower(lower: &Path) {
    write(lower.join("etc/keep"), "k");
    write(lower.join("etc/passwd"), "root");
    write(lower.join("etc/gone"), "g");
    write(lower.join("etc/hosts"), "h");
    write(lower.join("etc/motd"), "m");
    write(lower.join("usr/lib/libx"), "lib");
    write(lower.join("usr/lib/liby"), "lib");
    write(lower.join("usr/share/doc/readme"), "r");
    for c in ["a", "b", "c"] {
        write(lower.join(format!("var/cache/{c}")), c);
    }
    write(lower.join("var/cache/sub/deep"), "d");
    write(lower.join("data/big"), &"x".repeat(1 << 20));
    write(lower.join("hl/one"), "1");
    fs::hard_link(lower.join("hl/one"), lower.join("hl/two")).unwrap();
    mkdir(lower.join("opt"));
}

/// Changes made through the merged view of an overlay.
fn change_merged(m: &Path) {
    write(m.join("etc/passwd"), "root\nuser");
    fs::remove_file(m.join("etc/gone")).unwrap();
    chmod(m.join("etc/hosts"), 0o600);
    fs::remove_file(m.join("etc/motd")).unwrap();
    write(m.join("etc/motd/x"), "now a dir");
    fs::hard_link(m.join("etc/keep"), m.join("etc/keep2")).unwrap();
    write(m.join("newdir/sub/f"), "new");
    fs::remove_dir_all(m.join("var/cache")).unwrap();
    write(m.join("var/cache/a"), "a");
    write(m.join("var/cache/new"), "n");
    let mut big = fs::read(m.join("data/big")).unwrap();
    big.extend_from_slice(b"tail");
    fs::write(m.join("data/big"), big).unwrap();
    symlink("/etc/passwd", m.join("opt/link")).unwrap();
    fs::remove_file(m.join("usr/lib/libx")).unwrap();
    fs::remove_dir_all(m.join("usr/share")).unwrap();
    write(m.join("hl/one"), "changed both"); // copy-up breaks the link to hl/two
}

/// The entries under `prefix`, and the others.
fn split(entries: &[TarEntry], prefix: &str) -> (Vec<TarEntry>, Vec<TarEntry>) {
    entries
        .iter()
        .cloned()
        .partition(|e| e.name.starts_with(prefix))
}

#[test]
fn overlay_differ_matches_the_walking_differ_on_a_real_overlay() {
    let tmp = TempDir::new().unwrap();
    let lower = tmp.path().join("lower");
    let upper = tmp.path().join("upper");
    let work = tmp.path().join("work");
    let merged = tmp.path().join("merged");
    for d in [&lower, &upper, &work, &merged] {
        mkdir(d);
    }
    build_overlay_lower(&lower);
    let store = ContentStore::create(&tmp.path().join("store")).unwrap();
    let mount = overlay_mount(&[&lower], Some((&upper, &work)));
    let guard = MountGuard::mount(std::slice::from_ref(&mount), &merged).unwrap();
    change_merged(&merged);

    // The kernel made var/cache opaque and left whiteouts.
    let opaque = rustix::fs::lgetxattr(
        upper.join("var/cache"),
        "trusted.overlay.opaque",
        &mut [0u8; 8][..],
    )
    .unwrap();
    assert_eq!(opaque, 1);
    assert!(
        fs::symlink_metadata(upper.join("etc/gone"))
            .unwrap()
            .file_type()
            .is_char_device_like()
    );

    let walking = diff_dirs(&lower, &merged, Compression::None, &store).unwrap();
    let ovl = diff_overlay_upper(
        &upper,
        std::slice::from_ref(&lower),
        Compression::None,
        &store,
    )
    .unwrap();
    let walking_entries = read_layer(&store, &walking);
    let ovl_entries = read_layer(&store, &ovl);

    // Outside the replaced directory: the very same entries (names, headers, data, links).
    let (w_cache, w_rest) = split(&walking_entries, "var/cache/");
    let (o_cache, o_rest) = split(&ovl_entries, "var/cache/");
    assert_eq!(o_rest, w_rest);
    assert_eq!(
        names(&w_rest),
        [
            "data/",
            "data/big",
            "etc/",
            "etc/.wh.gone",
            "etc/hosts",
            "etc/keep2",
            "etc/keep",
            "etc/motd/",
            "etc/motd/x",
            "etc/passwd",
            "hl/",
            "hl/one",
            "newdir/",
            "newdir/sub/",
            "newdir/sub/f",
            "opt/",
            "opt/link",
            "usr/",
            "usr/lib/",
            "usr/lib/.wh.libx",
            "usr/.wh.share",
            "var/",
        ]
    );
    assert_eq!(find(&w_rest, "etc/keep").link.as_deref(), Some("etc/keep2"));
    assert_eq!(find(&w_rest, "hl/one").data, b"changed both");
    // The replaced directory: one whiteout per old entry when walking, an opaque marker
    // followed by the whole new content from the upperdir.
    assert_eq!(
        names(&w_cache),
        [
            "var/cache/",
            "var/cache/a",
            "var/cache/.wh.b",
            "var/cache/.wh.c",
            "var/cache/new",
            "var/cache/.wh.sub"
        ]
    );
    assert_eq!(
        names(&o_cache),
        [
            "var/cache/",
            "var/cache/.wh..wh..opq",
            "var/cache/a",
            "var/cache/new"
        ]
    );
    assert_eq!(o_cache[0], w_cache[0]);
    assert_whiteout(find(&o_cache, "var/cache/.wh..wh..opq"));

    // diff_mounts picks the overlay differ for an overlay upper over the lower's layers...
    let via_mounts = diff_mounts(
        &[bind_ro(&lower)],
        std::slice::from_ref(&mount),
        Compression::None,
        &store,
    )
    .unwrap();
    assert_eq!(via_mounts, ovl);
    // ...and for a read-only view whose top layer is the upperdir.
    let view = overlay_mount(&[&upper, &lower], None);
    let via_view = diff_mounts(
        &[bind_ro(&lower)],
        std::slice::from_ref(&view),
        Compression::None,
        &store,
    )
    .unwrap();
    assert_eq!(via_view, ovl);
    // With a lower that is not the upper's base it mounts both and walks.
    let copy = tmp.path().join("lower-copy");
    cp_a(&lower, &copy);
    let walked = diff_mounts(
        &[bind_ro(&copy)],
        std::slice::from_ref(&mount),
        Compression::None,
        &store,
    )
    .unwrap();
    assert_eq!(walked, walking);
    guard.unmount().unwrap();
    // (Temporary mount points are not checked here: tests of this file run in parallel in
    // one process and create them concurrently.)
}

trait CharDeviceLike {
    fn is_char_device_like(&self) -> bool;
}

impl CharDeviceLike for fs::FileType {
    fn is_char_device_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_char_device()
    }
}

#[test]
fn overlay_differ_handles_layered_lowers_in_overlay_form() {
    // Lowers that are themselves upperdirs: whiteouts and opaque directories in them decide
    // what existed below.
    let tmp = TempDir::new().unwrap();
    let bottom = tmp.path().join("bottom");
    let middle = tmp.path().join("middle");
    let upper = tmp.path().join("upper");
    write(bottom.join("d/old"), "o");
    write(bottom.join("d/kept"), "k");
    write(bottom.join("x"), "x");
    write(bottom.join("o/hidden"), "h");
    // middle: x deleted, o made opaque (its old content hidden), d/kept unchanged
    mkdir(&middle);
    node(middle.join("x"), SFlag::S_IFCHR, 0, 0, 0);
    mkdir(middle.join("o"));
    set_xattr(middle.join("o"), "trusted.overlay.opaque", b"y");
    write(middle.join("o/visible"), "v");
    // upper: whiteouts for things that exist below and for things that do not
    mkdir(upper.join("d"));
    node(upper.join("d/old"), SFlag::S_IFCHR, 0, 0, 0); // exists below: deletion
    node(upper.join("x"), SFlag::S_IFCHR, 0, 0, 0); // already deleted in middle: nothing
    mkdir(upper.join("o"));
    node(upper.join("o/hidden"), SFlag::S_IFCHR, 0, 0, 0); // hidden by middle's opaque: nothing
    node(upper.join("o/visible"), SFlag::S_IFCHR, 0, 0, 0); // exists: deletion
    // a dir over which upper is opaque, existing below -> marker + content
    mkdir(upper.join("d2"));
    write(upper.join("d2/n"), "n");
    set_xattr(upper.join("d2"), "trusted.overlay.opaque", b"y");
    write(bottom.join("d2/gone"), "g");
    // an opaque dir where nothing is below: no marker needed
    mkdir(upper.join("fresh"));
    set_xattr(upper.join("fresh"), "trusted.overlay.opaque", b"y");
    write(upper.join("fresh/f"), "f");
    // dirs in the upper with nothing changed under them and the same metadata: nothing
    let store = ContentStore::create(&tmp.path().join("store")).unwrap();
    // give upper dirs the lower dirs' metadata where they exist below
    for d in ["d", "o", "d2"] {
        let m = fs::metadata(bottom.join(d)).unwrap();
        chmod(upper.join(d), m.mode() & 0o7777);
    }
    let out = diff_overlay_upper(
        &upper,
        &[middle.clone(), bottom.clone()],
        Compression::Zstd,
        &store,
    )
    .unwrap();
    let entries = read_layer(&store, &out);
    assert_eq!(
        names(&entries),
        [
            "d/",
            "d/.wh.old",
            "d2/",
            "d2/.wh..wh..opq",
            "d2/n",
            "fresh/",
            "fresh/f",
            "o/",
            "o/.wh.visible"
        ]
    );
}

#[test]
fn overlay_features_it_cannot_read_are_unsupported_and_diff_mounts_falls_back() {
    let tmp = TempDir::new().unwrap();
    let lower = tmp.path().join("lower");
    let upper = tmp.path().join("upper");
    let work = tmp.path().join("work");
    let merged = tmp.path().join("merged");
    for d in [&lower, &upper, &work, &merged] {
        mkdir(d);
    }
    write(lower.join("f"), "lower");
    write(lower.join("g"), "g");
    write(upper.join("f"), "upper");
    // The kernel ignores user.overlay.* on a mount without userxattr; this differ refuses it.
    set_xattr(upper.join("f"), "user.overlay.metacopy", b"");
    let store = ContentStore::create(&tmp.path().join("store")).unwrap();
    let e = diff_overlay_upper(
        &upper,
        std::slice::from_ref(&lower),
        Compression::Gzip,
        &store,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert_eq!(e.kind(), snapshot_core::ErrorKind::NotImplemented);
    assert_eq!(
        fs::read_dir(store.root().join("ingest")).unwrap().count(),
        0,
        "the abandoned blob is removed"
    );

    let mount = overlay_mount(&[&lower], Some((&upper, &work)));
    let guard = MountGuard::mount(std::slice::from_ref(&mount), &merged).unwrap();
    let walked = diff_dirs(&lower, &merged, Compression::Gzip, &store).unwrap();
    let via_mounts = diff_mounts(
        &[bind_ro(&lower)],
        std::slice::from_ref(&mount),
        Compression::Gzip,
        &store,
    )
    .unwrap();
    guard.unmount().unwrap();
    assert_eq!(via_mounts, walked);
    let entries = read_layer(&store, &walked);
    assert_eq!(names(&entries), ["f"]);
}

#[test]
fn diff_mounts_from_no_lower_walks_the_upper() {
    let tmp = TempDir::new().unwrap();
    let tree = tmp.path().join("tree");
    let empty = tmp.path().join("empty");
    build_lower(&tree);
    mkdir(&empty);
    let store = ContentStore::create(&tmp.path().join("store")).unwrap();
    let direct = diff_dirs(&empty, &tree, Compression::Gzip, &store).unwrap();
    let via = diff_mounts(&[], &[bind_ro(&tree)], Compression::Gzip, &store).unwrap();
    assert_eq!(via, direct);
    assert!(matches!(
        diff_mounts(&[], &[], Compression::Gzip, &store),
        Err(Error::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Round trips: apply(diff(x)) onto a copy of the lower reproduces x.

/// What the round trip must preserve of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Regular files: size and content hash; symlinks: target; devices: rdev.
    content: String,
    /// Non-directories: mtime seconds (directory times move as children change).
    mtime: Option<i64>,
    capability: Option<Vec<u8>>,
}

/// Every path under `root` (sockets excepted: layers skip them) and the hard-link groups.
fn snapshot_tree(root: &Path) -> (BTreeMap<String, Node>, Vec<Vec<String>>) {
    use std::os::unix::fs::FileTypeExt;
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let m = fs::symlink_metadata(&path).unwrap();
            let ft = m.file_type();
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let (kind, content) = if ft.is_dir() {
                stack.push(path.clone());
                ('d', String::new())
            } else if ft.is_file() {
                (
                    'f',
                    format!("{} {}", m.len(), sha256_digest(&fs::read(&path).unwrap())),
                )
            } else if ft.is_symlink() {
                ('l', fs::read_link(&path).unwrap().display().to_string())
            } else if ft.is_char_device() {
                ('c', m.rdev().to_string())
            } else if ft.is_block_device() {
                ('b', m.rdev().to_string())
            } else if ft.is_fifo() {
                ('p', String::new())
            } else {
                continue; // sockets
            };
            if kind != 'd' {
                inodes
                    .entry((m.dev(), m.ino()))
                    .or_default()
                    .push(name.clone());
            }
            let capability = {
                let mut buf = [0u8; 256];
                rustix::fs::lgetxattr(&path, "security.capability", &mut buf[..])
                    .ok()
                    .map(|n| buf[..n].to_vec())
            };
            nodes.insert(
                name,
                Node {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    content,
                    mtime: (kind != 'd').then(|| m.mtime()),
                    capability,
                },
            );
        }
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
    (nodes, groups)
}

/// Asserts that two trees are the same in everything a layer carries.
fn assert_same_tree(got: &Path, want: &Path, what: &str) {
    let (g, g_links) = snapshot_tree(got);
    let (w, w_links) = snapshot_tree(want);
    let mut problems = Vec::new();
    for (k, v) in &w {
        match g.get(k) {
            None => problems.push(format!("missing {k}: {v:?}")),
            Some(gv) if gv != v => {
                problems.push(format!("differs {k}:\n  got  {gv:?}\n  want {v:?}"))
            }
            Some(_) => {}
        }
    }
    for k in g.keys().filter(|k| !w.contains_key(*k)) {
        problems.push(format!("extra {k}: {:?}", g[k]));
    }
    if g_links != w_links {
        problems.push(format!("hard links: got {g_links:?}, want {w_links:?}"));
    }
    assert!(problems.is_empty(), "{what}:\n{}", problems.join("\n"));
}

/// Applies a stored layer to `root` and checks the diff ID the applier saw.
fn apply(store: &ContentStore, out: &DiffOutput, root: &Path, mode: &WhiteoutMode) {
    let blob = store.open_blob(&out.blob).unwrap();
    let applied = apply_blob(out.blob.media_type().as_ref(), blob, root, mode).unwrap();
    assert_eq!(applied.diff_id, out.diff_id);
}

/// Second generation of changes of the plain-directory round trip.
fn change_gen2(x: &Path) {
    fs::remove_dir_all(x.join("new")).unwrap();
    fs::remove_dir_all(x.join("a")).unwrap();
    write(x.join("a/fresh"), "fresh");
    fs::remove_file(x.join("hl2")).unwrap();
    fs::hard_link(x.join("keeplink1"), x.join("keeplink3")).unwrap();
    fs::remove_file(x.join("link")).unwrap();
    write(x.join("link/inside"), "link is a dir now");
    fs::remove_file(x.join("cdev")).unwrap();
    write(x.join("cdev"), "was a device");
    chown(x.join("perm"), 7, 8);
    write(x.join("perm/secret"), "s");
    chmod(x.join("perm/secret"), 0o400);
}

/// Third generation: names come back, directories empty out, types change again.
fn change_gen3(x: &Path) {
    for e in fs::read_dir(x.join("a")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    write(x.join("b/c/d"), "back again");
    fs::remove_dir_all(x.join("link")).unwrap();
    symlink("/nowhere", x.join("link")).unwrap();
    fs::remove_file(x.join("keeplink2")).unwrap();
    write(x.join("keeplink1"), "changed through one name");
    fs::remove_dir_all(x.join("long")).unwrap();
    write(x.join("long"), "short");
}

#[test]
fn round_trip_walking_differ_over_plain_directories() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(&tmp.path().join("store")).unwrap();
    let gens: Vec<PathBuf> = (0..4).map(|i| tmp.path().join(format!("x{i}"))).collect();
    mkdir(&gens[0]);
    build_lower(&gens[0]);
    cp_a(&gens[0], &gens[1]);
    change_upper(&gens[1]);
    cp_a(&gens[1], &gens[2]);
    change_gen2(&gens[2]);
    cp_a(&gens[2], &gens[3]);
    change_gen3(&gens[3]);

    let target = tmp.path().join("target");
    cp_a(&gens[0], &target);
    let compressions = [Compression::Gzip, Compression::Zstd, Compression::None];
    for i in 1..gens.len() {
        let out = diff_dirs(&gens[i - 1], &gens[i], compressions[i - 1], &store).unwrap();
        apply(&store, &out, &target, &WhiteoutMode::Delete);
        assert_same_tree(&target, &gens[i], &format!("after layer {i}"));
    }
}

/// Second generation of changes through an overlay's merged view.
fn change_merged_gen2(m: &Path) {
    fs::remove_dir_all(m.join("etc")).unwrap();
    write(m.join("etc/passwd"), "fresh");
    fs::remove_file(m.join("newdir/sub/f")).unwrap();
    fs::hard_link(m.join("hl/two"), m.join("hl/three")).unwrap();
    fs::remove_file(m.join("opt/link")).unwrap();
    write(m.join("opt/link"), "a file now");
    chown(m.join("usr/lib/liby"), 1234, 5678);
    mkdir(m.join("dev"));
    node(m.join("dev/tty"), SFlag::S_IFCHR, 0o666, 5, 0);
    write(m.join("var/cache/new2"), "n2");
    fs::remove_dir_all(m.join("data")).unwrap();
    write(m.join("cap"), "c");
    set_xattr(m.join("cap"), "security.capability", &CAPABILITY);
}

/// Third generation through the merged view.
fn change_merged_gen3(m: &Path) {
    write(m.join("data/again"), "again");
    fs::remove_dir_all(m.join("var")).unwrap();
    chmod(m.join("etc"), 0o700);
    fs::remove_file(m.join("hl/three")).unwrap();
    write(m.join("etc/passwd"), "fresh\nmore");
    fs::remove_dir_all(m.join("usr")).unwrap();
    mkdir(m.join("usr"));
}

#[test]
fn round_trip_both_differs_across_overlay_layers() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(&tmp.path().join("store")).unwrap();
    let merged = tmp.path().join("merged");
    mkdir(&merged);
    let l0 = tmp.path().join("l0");
    mkdir(&l0);
    build_overlay_lower(&l0);

    // Three layers made by a real overlay, each on top of the previous ones.
    let changes: [fn(&Path); 3] = [change_merged, change_merged_gen2, change_merged_gen3];
    let mut layers = vec![l0.clone()]; // nearest last
    let mut views = vec![l0.clone()]; // x0, x1, ...: copies of the merged views
    let mut overlay_layers = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        let upper = tmp.path().join(format!("u{}", i + 1));
        let work = tmp.path().join(format!("w{}", i + 1));
        mkdir(&upper);
        mkdir(&work);
        let lowers: Vec<&Path> = layers.iter().rev().map(PathBuf::as_path).collect();
        let mount = overlay_mount(&lowers, Some((&upper, &work)));
        let guard = MountGuard::mount(std::slice::from_ref(&mount), &merged).unwrap();
        change(&merged);
        let view = tmp.path().join(format!("x{}", i + 1));
        cp_a(&merged, &view);
        guard.unmount().unwrap();
        let lowers: Vec<PathBuf> = layers.iter().rev().cloned().collect();
        overlay_layers
            .push(diff_overlay_upper(&upper, &lowers, Compression::Gzip, &store).unwrap());
        layers.push(upper);
        views.push(view);
    }
    let walking_layers: Vec<DiffOutput> = (1..views.len())
        .map(|i| diff_dirs(&views[i - 1], &views[i], Compression::Zstd, &store).unwrap())
        .collect();
    // The opaque directories were really made by the kernel.
    let mut buf = [0u8; 4];
    assert!(
        rustix::fs::lgetxattr(
            layers[1].join("var/cache"),
            "trusted.overlay.opaque",
            &mut buf[..]
        )
        .is_ok()
    );
    assert!(
        rustix::fs::lgetxattr(
            layers[2].join("etc"),
            "trusted.overlay.opaque",
            &mut buf[..]
        )
        .is_ok()
    );
    assert!(
        read_layer(&store, &overlay_layers[1])
            .iter()
            .any(|e| e.name == "etc/.wh..wh..opq")
    );

    for (differ, outs) in [("overlay", &overlay_layers), ("walking", &walking_layers)] {
        // Applied to a plain copy of the bottom layer, whiteouts deleting.
        let target = tmp.path().join(format!("target-{differ}"));
        cp_a(&l0, &target);
        for (i, out) in outs.iter().enumerate() {
            apply(&store, out, &target, &WhiteoutMode::Delete);
            assert_same_tree(
                &target,
                &views[i + 1],
                &format!("{differ} differ, plain apply, layer {}", i + 1),
            );
        }
        // Applied as overlay upperdirs (whiteouts in overlay form), then mounted.
        let mut applied = vec![l0.clone()]; // nearest last
        for (i, out) in outs.iter().enumerate() {
            let dir = tmp.path().join(format!("a-{differ}-{}", i + 1));
            mkdir(&dir);
            let lowers: Vec<PathBuf> = applied.iter().rev().cloned().collect();
            let mode = WhiteoutMode::Overlay {
                opaque_xattr: "trusted.overlay.opaque".into(),
                lowers,
            };
            apply(&store, out, &dir, &mode);
            applied.push(dir);
            let stack: Vec<&Path> = applied.iter().rev().map(PathBuf::as_path).collect();
            let view = overlay_mount(&stack, None);
            let guard = MountGuard::mount(std::slice::from_ref(&view), &merged).unwrap();
            assert_same_tree(
                &merged,
                &views[i + 1],
                &format!("{differ} differ, overlay apply, layer {}", i + 1),
            );
            guard.unmount().unwrap();
        }
        // And the overlay differ reads the applied upperdirs back into the same layers.
        if differ == "overlay" {
            for i in 1..applied.len() {
                let lowers: Vec<PathBuf> = applied[..i].iter().rev().cloned().collect();
                let again =
                    diff_overlay_upper(&applied[i], &lowers, Compression::Gzip, &store).unwrap();
                let (a, b) = (read_layer(&store, &again), read_layer(&store, &outs[i - 1]));
                // The same entries; which hard-link name carries the data may change, as the
                // applied files have whole-second mtimes.
                let sorted = |e: &[TarEntry]| {
                    let mut n = names(e);
                    n.sort();
                    n
                };
                assert_eq!(
                    sorted(&a),
                    sorted(&b),
                    "layer {i} re-diffed from its applied upperdir"
                );
            }
        }
    }
}
