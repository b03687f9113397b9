//! Applying layers into real directories (run as root): every entry type with its metadata,
//! whiteouts in both modes (then a real overlay mount), compression and diff IDs, the applier
//! for mounts, and a corpus of hostile archives that must neither escape the root nor panic.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rootfs::Error;
use rootfs::apply::{Applied, WhiteoutMode, apply_blob, apply_tar, apply_to_mounts};
use rootfs::mount::MountGuard;
use sha2::{Digest as _, Sha256};
use snapshot_core::{ErrorKind, Mount};
use tempfile::TempDir;

const OCI: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const MTIME: u64 = 1_600_000_000;

// ---------------------------------------------------------------------------------------------
// Writing tars by hand, so hostile headers can say anything.

/// One tar entry to write.
#[derive(Clone)]
struct E {
    name: Vec<u8>,
    kind: u8,
    link: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    data: Vec<u8>,
    /// Size field if not `data.len()` (a lie).
    size: Option<u64>,
    major: u32,
    minor: u32,
}

impl E {
    fn new(name: impl AsRef<[u8]>, kind: u8) -> E {
        E {
            name: name.as_ref().to_vec(),
            kind,
            link: Vec::new(),
            mode: if kind == b'5' { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: MTIME,
            data: Vec::new(),
            size: None,
            major: 0,
            minor: 0,
        }
    }
    fn mode(mut self, mode: u32) -> E {
        self.mode = mode;
        self
    }
    fn owner(mut self, uid: u32, gid: u32) -> E {
        self.uid = uid;
        self.gid = gid;
        self
    }
    fn mtime(mut self, mtime: u64) -> E {
        self.mtime = mtime;
        self
    }
    fn size(mut self, size: u64) -> E {
        self.size = Some(size);
        self
    }
    fn dev(mut self, major: u32, minor: u32) -> E {
        self.major = major;
        self.minor = minor;
        self
    }
}

fn file(name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> E {
    let mut e = E::new(name, b'0');
    e.data = data.as_ref().to_vec();
    e
}
fn dir(name: impl AsRef<[u8]>) -> E {
    E::new(name, b'5')
}
fn link(name: impl AsRef<[u8]>, kind: u8, target: impl AsRef<[u8]>) -> E {
    let mut e = E::new(name, kind);
    e.link = target.as_ref().to_vec();
    e.mode = 0o777;
    e
}
fn symlink_entry(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    link(name, b'2', target)
}
fn hardlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    let mut e = link(name, b'1', target);
    e.mode = 0o644;
    e
}
fn whiteout(name: impl AsRef<[u8]>) -> E {
    file(name, b"").mode(0)
}

/// Octal when it fits, else base-256 (as GNU tar writes big numbers).
fn octal(field: &mut [u8], value: u64) {
    let n = field.len();
    let text = format!("{value:0width$o}", width = n - 1);
    if text.len() < n {
        field[..n - 1].copy_from_slice(text.as_bytes());
        return;
    }
    field.fill(0);
    field[n - 8..].copy_from_slice(&value.to_be_bytes());
    field[0] = 0x80;
}

/// A ustar header block; names and link names must fit their 100-byte fields.
fn header(e: &E, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..e.name.len()].copy_from_slice(&e.name);
    octal(&mut h[100..108], u64::from(e.mode));
    octal(&mut h[108..116], u64::from(e.uid));
    octal(&mut h[116..124], u64::from(e.gid));
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], e.mtime);
    h[156] = e.kind;
    h[157..157 + e.link.len()].copy_from_slice(&e.link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], u64::from(e.major));
    octal(&mut h[337..345], u64::from(e.minor));
    set_checksum(&mut h);
    h
}

fn set_checksum(h: &mut [u8; 512]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    octal(&mut h[148..155], sum);
    h[155] = b' ';
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(512) {
        out.push(0);
    }
}

/// A tar being written.
#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn add(mut self, e: E) -> Tar {
        let size = e.size.unwrap_or(e.data.len() as u64);
        self.0.extend_from_slice(&header(&e, size));
        self.0.extend_from_slice(&e.data);
        pad(&mut self.0);
        self
    }
    /// A PAX extended header for the next entry.
    fn pax(self, records: &[(&str, &[u8])]) -> Tar {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3; // ' ', '=', '\n'
            let mut len = body + 1;
            while format!("{len}").len() + body != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let mut e = E::new("PaxHeaders/x", b'x');
        e.data = data;
        self.add(e)
    }
    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
    fn entries(entries: impl IntoIterator<Item = E>) -> Vec<u8> {
        entries.into_iter().fold(Tar::default(), Tar::add).finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn apply(tar: &[u8], root: &Path) -> rootfs::Result<Applied> {
    apply_tar(tar, root, &WhiteoutMode::Delete)
}

fn overlay_mode(lowers: &[&Path]) -> WhiteoutMode {
    WhiteoutMode::Overlay {
        opaque_xattr: "trusted.overlay.opaque".into(),
        lowers: lowers.iter().map(|l| l.to_path_buf()).collect(),
    }
}

fn lstat(p: impl AsRef<Path>) -> fs::Metadata {
    let p = p.as_ref();
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn exists(p: impl AsRef<Path>) -> bool {
    fs::symlink_metadata(p).is_ok()
}

fn xattr(p: impl AsRef<Path>, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    match rustix::fs::lgetxattr(p.as_ref(), name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

fn mkdir(p: PathBuf) -> PathBuf {
    fs::create_dir_all(&p).unwrap();
    p
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A root next to an `outside` directory holding a sentinel no entry may touch.
struct Sandbox {
    _tmp: TempDir,
    root: PathBuf,
    outside: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        let tmp = TempDir::new().unwrap();
        let root = mkdir(tmp.path().join("root"));
        let outside = mkdir(tmp.path().join("outside"));
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(outside.join("sentinel"), "precious").unwrap();
        fs::set_permissions(outside.join("sentinel"), fs::Permissions::from_mode(0o600)).unwrap();
        Sandbox {
            _tmp: tmp,
            root,
            outside,
        }
    }

    /// The outside directory's path as an absolute name in an archive.
    fn outside_abs(&self) -> String {
        self.outside.to_str().unwrap().to_owned()
    }

    fn sentinel_abs(&self) -> String {
        format!("{}/sentinel", self.outside_abs())
    }

    #[track_caller]
    fn assert_outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["sentinel"], "outside directory changed");
        let m = lstat(&self.outside);
        assert_eq!(m.mode() & 0o7777, 0o755, "outside dir mode changed");
        assert_eq!((m.uid(), m.gid()), (0, 0));
        let s = lstat(self.outside.join("sentinel"));
        assert!(s.file_type().is_file());
        assert_eq!(s.mode() & 0o7777, 0o600, "sentinel mode changed");
        assert_eq!((s.uid(), s.gid(), s.nlink()), (0, 0, 1));
        assert_eq!(
            fs::read_to_string(self.outside.join("sentinel")).unwrap(),
            "precious"
        );
        assert!(xattr(self.outside.join("sentinel"), "user.x").is_none());
    }

    /// Applies `tar`; whatever happens, nothing outside the root changed.
    #[track_caller]
    fn apply(&self, tar: &[u8], mode: &WhiteoutMode) -> rootfs::Result<Applied> {
        let result = apply_tar(tar, &self.root, mode);
        self.assert_outside_untouched();
        result
    }
}

#[track_caller]
fn assert_invalid(result: rootfs::Result<Applied>, needle: &str) {
    match result {
        Err(Error::InvalidArchive(msg)) => {
            assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}")
        }
        other => panic!("expected an invalid archive ({needle}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Entry types and metadata.

#[test]
fn every_entry_type_keeps_owner_mode_xattrs_and_times() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    let tar = Tar::default()
        .add(dir("d/").mode(0o750).owner(1000, 1001).mtime(1_000_000))
        .pax(&[
            ("SCHILY.xattr.user.color", b"blue\n\0binary"),
            ("SCHILY.xattr.trusted.evil", b"y"),
            ("SCHILY.xattr.user.overlay.opaque", b"y"),
            ("mtime", b"2000000.25"),
            ("atime", b"2500000.5"),
        ])
        .add(file("d/suid", "hello").mode(0o4755).owner(1000, 1000))
        .add(file("d/sgid", "x").mode(0o2711).owner(1, 2))
        .add(
            symlink_entry("d/link", "suid")
                .owner(1002, 1003)
                .mtime(3_000_000),
        )
        .add(E::new("d/null", b'3').dev(1, 3).mode(0o666).owner(5, 6))
        .add(E::new("d/loop", b'4').dev(7, 0).mode(0o660).owner(0, 6))
        .add(E::new("d/pipe", b'6').mode(0o620).owner(7, 7))
        .add(dir("d/sub/").mode(0o1777).mtime(4_000_000))
        .add(file("d/sub/inner", "in"))
        .add(dir("plain/").mode(0o700))
        .finish();
    let applied = apply(&tar, root).unwrap();
    assert_eq!(applied.size, tar.len() as u64);
    assert_eq!(applied.diff_id.to_string(), sha256(&tar));

    let d = lstat(root.join("d"));
    assert!(d.is_dir());
    assert_eq!(d.mode() & 0o7777, 0o750);
    assert_eq!((d.uid(), d.gid()), (1000, 1001));
    assert_eq!(
        d.mtime(),
        1_000_000,
        "directory mtime kept despite its children"
    );

    let suid = lstat(root.join("d/suid"));
    assert!(suid.is_file());
    assert_eq!(suid.mode() & 0o7777, 0o4755, "setuid survives the chown");
    assert_eq!((suid.uid(), suid.gid()), (1000, 1000));
    assert_eq!((suid.mtime(), suid.mtime_nsec()), (2_000_000, 250_000_000));
    assert_eq!((suid.atime(), suid.atime_nsec()), (2_500_000, 500_000_000));
    assert_eq!(fs::read(root.join("d/suid")).unwrap(), b"hello");
    assert_eq!(
        xattr(root.join("d/suid"), "user.color").unwrap(),
        b"blue\n\0binary"
    );
    assert!(xattr(root.join("d/suid"), "trusted.evil").is_none());
    assert!(xattr(root.join("d/suid"), "user.overlay.opaque").is_none());

    let sgid = lstat(root.join("d/sgid"));
    assert_eq!(sgid.mode() & 0o7777, 0o2711);
    assert_eq!((sgid.uid(), sgid.gid()), (1, 2));
    assert_eq!(sgid.mtime(), MTIME as i64);

    let l = lstat(root.join("d/link"));
    assert!(l.file_type().is_symlink());
    assert_eq!(
        fs::read_link(root.join("d/link")).unwrap(),
        Path::new("suid")
    );
    assert_eq!((l.uid(), l.gid()), (1002, 1003));
    assert_eq!(l.mtime(), 3_000_000);

    let null = lstat(root.join("d/null"));
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (
            rustix::fs::major(null.rdev()),
            rustix::fs::minor(null.rdev())
        ),
        (1, 3)
    );
    assert_eq!(null.mode() & 0o7777, 0o666);
    assert_eq!((null.uid(), null.gid()), (5, 6));
    let blk = lstat(root.join("d/loop"));
    assert!(blk.file_type().is_block_device());
    assert_eq!(rustix::fs::major(blk.rdev()), 7);
    assert_eq!(blk.mode() & 0o7777, 0o660);
    let pipe = lstat(root.join("d/pipe"));
    assert!(pipe.file_type().is_fifo());
    assert_eq!(pipe.mode() & 0o7777, 0o620);
    assert_eq!((pipe.uid(), pipe.gid()), (7, 7));

    let sub = lstat(root.join("d/sub"));
    assert_eq!(sub.mode() & 0o7777, 0o1777);
    assert_eq!(sub.mtime(), 4_000_000);
    assert_eq!(lstat(root.join("plain")).mode() & 0o7777, 0o700);
}

#[test]
fn missing_parents_are_created_0755_and_the_root_entry_is_ignored() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    fs::set_permissions(root, fs::Permissions::from_mode(0o711)).unwrap();
    let tar = Tar::entries([
        dir("./").mode(0o777).owner(9, 9),
        dir("/").mode(0o777),
        file("a/b/c/file", "deep"),
        dir("..").mode(0o777),
    ]);
    apply(&tar, root).unwrap();
    assert_eq!(fs::read(root.join("a/b/c/file")).unwrap(), b"deep");
    for p in ["a", "a/b", "a/b/c"] {
        let m = lstat(root.join(p));
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o7777, 0o755, "{p}");
    }
    let r = lstat(root);
    assert_eq!(r.mode() & 0o7777, 0o711, "root entries are ignored");
    assert_eq!(r.uid(), 0);
}

#[test]
fn hardlinks_share_the_inode_and_targets_are_rerooted() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    let tar = Tar::entries([
        file("a", "shared").mode(0o640),
        hardlink("b", "a").mode(0o640),
        hardlink("sub/c", "/a").mode(0o640),
        hardlink("sub/d", "../../a").mode(0o640),
        hardlink("a", "a").mode(0o640), // a link to itself is a no-op
    ]);
    apply(&tar, root).unwrap();
    let a = lstat(root.join("a"));
    assert_eq!(a.nlink(), 4);
    for other in ["b", "sub/c", "sub/d"] {
        assert_eq!(lstat(root.join(other)).ino(), a.ino(), "{other}");
    }
    assert_eq!(fs::read(root.join("sub/d")).unwrap(), b"shared");
}

#[test]
fn existing_paths_are_replaced_except_directories_which_merge() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    apply(
        &Tar::entries([
            file("f", "old"),
            dir("d/").mode(0o700),
            file("d/child", "kept"),
            dir("t/"),
            file("t/x", "gone"),
            file("l", "was a file"),
            file("linked", "data"),
            hardlink("other", "linked"),
        ]),
        root,
    )
    .unwrap();
    apply(
        &Tar::entries([
            dir("f/").mode(0o711),
            dir("d/").mode(0o755).owner(3, 3),
            file("t", "now a file"),
            symlink_entry("l", "f"),
            file("linked", "new data"),
        ]),
        root,
    )
    .unwrap();
    assert!(lstat(root.join("f")).is_dir());
    let d = lstat(root.join("d"));
    assert_eq!((d.mode() & 0o7777, d.uid()), (0o755, 3));
    assert_eq!(fs::read(root.join("d/child")).unwrap(), b"kept");
    assert_eq!(fs::read(root.join("t")).unwrap(), b"now a file");
    assert!(lstat(root.join("l")).file_type().is_symlink());
    // A replaced file is a new inode: its old hardlink peer keeps the old data.
    assert_eq!(fs::read(root.join("linked")).unwrap(), b"new data");
    assert_eq!(fs::read(root.join("other")).unwrap(), b"data");
}

#[test]
fn long_names_ustar_prefixes_pax_paths_and_global_headers() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    let long_dir = "d".repeat(120);
    let long_path = format!("{long_dir}/{}", "f".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    // GNU long name and long link ('L' / 'K').
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_mtime(MTIME);
    b.append_data(&mut h, &long_path, &b"long"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mtime(MTIME);
    b.append_link(&mut h, "gnu-link", &long_path).unwrap();
    // ustar with a prefix.
    let prefixed = format!("{}/{}", "p".repeat(90), "q".repeat(60));
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    h.set_mode(0o600);
    b.append_data(&mut h, &prefixed, &b"u"[..]).unwrap();
    // PAX global header (ignored) and a PAX path.
    let mut g = tar::Header::new_ustar();
    g.set_entry_type(tar::EntryType::XGlobalHeader);
    let global = b"22 comment=ignore me!\n";
    g.set_size(global.len() as u64);
    g.set_path("pax_global_header").unwrap();
    g.set_cksum();
    b.append(&g, &global[..]).unwrap();
    b.append_pax_extensions([("path", format!("pax/{}", "x".repeat(200)).as_bytes())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "short-name", &b"pax"[..]).unwrap();
    let tar = b.into_inner().unwrap();

    apply(&tar, root).unwrap();
    assert_eq!(fs::read(root.join(&long_path)).unwrap(), b"long");
    assert_eq!(
        fs::read_link(root.join("gnu-link")).unwrap(),
        Path::new(&long_path)
    );
    assert_eq!(fs::read(root.join(&prefixed)).unwrap(), b"u");
    assert_eq!(
        fs::read(root.join(format!("pax/{}", "x".repeat(200)))).unwrap(),
        b"pax"
    );
    assert!(!exists(root.join("short-name")));
    assert!(!exists(root.join("pax_global_header")));
}

#[test]
fn v7_entries_with_a_trailing_slash_are_directories() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    let mut d = E::new("olddir/", 0);
    d.mode = 0o711;
    let tar = Tar::entries([d, E::new("oldfile", 0)]);
    apply(&tar, root).unwrap();
    assert!(lstat(root.join("olddir")).is_dir());
    assert_eq!(lstat(root.join("olddir")).mode() & 0o7777, 0o711);
    assert!(lstat(root.join("oldfile")).is_file());
}

// ---------------------------------------------------------------------------------------------
// Whiteouts.

fn base_layer() -> Vec<u8> {
    Tar::entries([
        file("a/f1", "1"),
        file("a/f2", "2"),
        dir("b/"),
        file("b/x", "x"),
        dir("o/").mode(0o750),
        file("o/old", "old"),
        file("o/sub/y", "y"),
        file("keep", "k"),
    ])
}

#[test]
fn delete_mode_removes_whited_out_files_dirs_and_opaque_children() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    apply(&base_layer(), root).unwrap();
    let tar = Tar::entries([
        whiteout("a/.wh.f1"),
        whiteout(".wh.b"),
        whiteout("a/.wh.never-existed"),
        file("o/new", "from this layer"),
        file("o/newdir/z", "z"),
        whiteout("o/.wh..wh..opq"),
        file("o/after", "after the marker"),
    ]);
    apply(&tar, root).unwrap();
    assert!(!exists(root.join("a/f1")));
    assert!(!exists(root.join("a/.wh.f1")));
    assert_eq!(fs::read(root.join("a/f2")).unwrap(), b"2");
    assert!(!exists(root.join("b")));
    assert!(!exists(root.join("o/old")));
    assert!(!exists(root.join("o/sub")));
    assert!(!exists(root.join("o/.wh..wh..opq")));
    assert_eq!(fs::read(root.join("o/new")).unwrap(), b"from this layer");
    assert_eq!(fs::read(root.join("o/newdir/z")).unwrap(), b"z");
    assert_eq!(fs::read(root.join("o/after")).unwrap(), b"after the marker");
    assert_eq!(lstat(root.join("o")).mode() & 0o7777, 0o750);
    assert_eq!(fs::read(root.join("keep")).unwrap(), b"k");
}

#[test]
fn overlay_mode_writes_overlay_whiteouts_that_a_real_overlay_obeys() {
    let tmp = TempDir::new().unwrap();
    let lower = mkdir(tmp.path().join("lower"));
    let upper = mkdir(tmp.path().join("upper"));
    let work = mkdir(tmp.path().join("work"));
    let merged = mkdir(tmp.path().join("merged"));
    apply(&base_layer(), &lower).unwrap();
    // A lower directory with its own owner, mode, times and xattrs.
    fs::set_permissions(lower.join("a"), fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::lchown(lower.join("a"), Some(5), Some(6)).unwrap();
    rustix::fs::lsetxattr(
        lower.join("a"),
        "user.from-lower",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let lower_a = lstat(lower.join("a"));

    let tar = Tar::entries([
        whiteout("a/.wh.f1").owner(7, 8),
        file("a/added", "new"),
        whiteout("o/.wh..wh..opq"),
        file("o/new", "n"),
        whiteout(".wh.b"),
    ]);
    let applied = apply_tar(&tar[..], &upper, &overlay_mode(&[&lower])).unwrap();
    assert_eq!(applied.diff_id.to_string(), sha256(&tar));

    let wh = lstat(upper.join("a/f1"));
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert_eq!((wh.uid(), wh.gid()), (7, 8));
    assert!(lstat(upper.join("b")).file_type().is_char_device());
    assert_eq!(
        xattr(upper.join("o"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert!(!exists(upper.join("o/.wh..wh..opq")));
    // The parent created in the upperdir copies the lower's directory.
    let a = lstat(upper.join("a"));
    assert_eq!(a.mode() & 0o7777, 0o711);
    assert_eq!((a.uid(), a.gid()), (5, 6));
    assert_eq!(a.mtime(), lower_a.mtime());
    assert_eq!(xattr(upper.join("a"), "user.from-lower").unwrap(), b"1");

    let options = vec![
        "index=off".to_owned(),
        format!("workdir={}", work.display()),
        format!("upperdir={}", upper.display()),
        format!("lowerdir={}", lower.display()),
    ];
    let m = Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    };
    let guard = MountGuard::mount(&[m], &merged).unwrap();
    assert!(!exists(merged.join("a/f1")), "whited-out file gone");
    assert_eq!(fs::read(merged.join("a/f2")).unwrap(), b"2");
    assert_eq!(fs::read(merged.join("a/added")).unwrap(), b"new");
    assert!(!exists(merged.join("b")), "whited-out dir gone");
    assert!(
        !exists(merged.join("o/old")),
        "opaque dir hides lower children"
    );
    assert!(!exists(merged.join("o/sub")));
    assert_eq!(fs::read(merged.join("o/new")).unwrap(), b"n");
    assert_eq!(fs::read(merged.join("keep")).unwrap(), b"k");
    guard.unmount().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Compression and diff IDs.

fn sample_layer() -> Vec<u8> {
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    Tar::entries([file("small", "hello"), file("big", &big), dir("d/")])
}

#[test]
fn gzip_zstd_and_plain_blobs_give_the_diff_id_whatever_the_media_type_says() {
    let tar = sample_layer();
    let diff_id = sha256(&tar);
    let blobs = [
        ("plain", tar.clone()),
        ("gzip", gzip(&tar)),
        ("zstd", zstd(&tar)),
    ];
    for (what, blob) in &blobs {
        for media_type in [OCI, OCI_GZIP, OCI_ZSTD, DOCKER, DOCKER_GZIP] {
            let tmp = TempDir::new().unwrap();
            let applied = apply_blob(media_type, &blob[..], tmp.path(), &WhiteoutMode::Delete)
                .unwrap_or_else(|e| panic!("{what} as {media_type}: {e}"));
            assert_eq!(
                applied.diff_id.to_string(),
                diff_id,
                "{what} as {media_type}"
            );
            assert_eq!(applied.size, tar.len() as u64);
            assert_eq!(fs::read(tmp.path().join("small")).unwrap(), b"hello");
            assert_eq!(lstat(tmp.path().join("big")).len(), 3_000_000);
        }
    }
}

#[test]
fn multi_member_gzip_and_skippable_zstd_frames() {
    let tar = sample_layer();
    let (a, b) = tar.split_at(1_000_001);
    let mut two_members = gzip(a);
    two_members.extend(gzip(b));
    let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
    skippable.extend(zstd(a));
    skippable.extend(zstd(b));
    for blob in [two_members, skippable] {
        let tmp = TempDir::new().unwrap();
        let applied = apply_blob(OCI_GZIP, &blob[..], tmp.path(), &WhiteoutMode::Delete).unwrap();
        assert_eq!(applied.diff_id.to_string(), sha256(&tar));
        assert_eq!(lstat(tmp.path().join("big")).len(), 3_000_000);
    }
}

#[test]
fn trailing_bytes_after_the_tar_end_are_drained_into_the_digest() {
    let mut tar = Tar::entries([file("f", "data")]);
    tar.extend_from_slice(b"trailing garbage that is not a tar");
    tar.extend(vec![0u8; 10_000]);
    for blob in [tar.clone(), gzip(&tar)] {
        let tmp = TempDir::new().unwrap();
        let applied = apply_blob(OCI_GZIP, &blob[..], tmp.path(), &WhiteoutMode::Delete).unwrap();
        assert_eq!(applied.diff_id.to_string(), sha256(&tar));
        assert_eq!(applied.size, tar.len() as u64);
        assert_eq!(fs::read(tmp.path().join("f")).unwrap(), b"data");
    }
    // A tar without end-of-archive blocks is fine too.
    let no_end = Tar::default().add(file("g", "x")).0;
    let tmp = TempDir::new().unwrap();
    let applied = apply(&no_end, tmp.path()).unwrap();
    assert_eq!(applied.diff_id.to_string(), sha256(&no_end));
}

#[test]
fn empty_blobs_are_empty_layers_and_unknown_media_types_unsupported() {
    let tmp = TempDir::new().unwrap();
    let applied = apply_blob(OCI, &b""[..], tmp.path(), &WhiteoutMode::Delete).unwrap();
    assert_eq!(applied.size, 0);
    assert_eq!(applied.diff_id.to_string(), sha256(b""));
    for mt in [
        "application/octet-stream",
        "application/vnd.oci.image.layer.v1.tar+encrypted",
    ] {
        let err = apply_blob(mt, &b""[..], tmp.path(), &WhiteoutMode::Delete).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{mt}: {err}");
        assert_eq!(err.kind(), ErrorKind::NotImplemented);
    }
}

#[test]
fn truncated_or_corrupt_compressed_streams_fail_cleanly() {
    let tar = sample_layer();
    let gz = gzip(&tar);
    let zs = zstd(&tar);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("gzip cut in half", gz[..gz.len() / 2].to_vec()),
        ("gzip without its trailer", gz[..gz.len() - 4].to_vec()),
        ("zstd cut in half", zs[..zs.len() / 2].to_vec()),
        ("corrupt gzip", {
            let mut c = gz.clone();
            for b in &mut c[100..200] {
                *b ^= 0x55;
            }
            c
        }),
    ];
    for (what, blob) in cases {
        let tmp = TempDir::new().unwrap();
        let err =
            apply_blob(OCI_GZIP, &blob[..], tmp.path(), &WhiteoutMode::Delete).expect_err(what);
        assert!(
            matches!(err, Error::InvalidArchive(_)),
            "{what}: unexpected error {err:?}"
        );
    }
}

/// An error a blob reader carries in its `io::Error` (a content store's digest check) comes
/// back as itself.
#[test]
fn reader_errors_carrying_a_rootfs_error_come_back_out() {
    struct Failing;
    impl std::io::Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                Error::DigestMismatch {
                    what: "blob".into(),
                    expected: "a".into(),
                    actual: "b".into(),
                },
            ))
        }
    }
    let tmp = TempDir::new().unwrap();
    let err = apply_blob(OCI_GZIP, Failing, tmp.path(), &WhiteoutMode::Delete).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// The applier for mounts.

#[test]
fn apply_to_mounts_writes_into_an_upperdir_a_bind_source_or_a_temporary_mount() {
    let tmp = TempDir::new().unwrap();
    let tar = Tar::entries([file("f", "content"), whiteout(".wh.gone")]);
    let blob = gzip(&tar);

    // A fake overlay mount with only an upperdir (parallel unpack): overlay whiteouts.
    let upper = mkdir(tmp.path().join("upper"));
    let fake = Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options: vec![format!("upperdir={}", upper.display())],
    };
    let applied = apply_to_mounts(OCI_GZIP, &blob[..], &[fake]).unwrap();
    assert_eq!(applied.diff_id.to_string(), sha256(&tar));
    assert_eq!(fs::read(upper.join("f")).unwrap(), b"content");
    assert!(lstat(upper.join("gone")).file_type().is_char_device());

    // A rw bind mount: written into its source, whiteouts delete.
    let source = mkdir(tmp.path().join("bind"));
    fs::write(source.join("gone"), "x").unwrap();
    let bind = Mount {
        kind: "bind".into(),
        source: source.display().to_string(),
        options: vec!["rw".into(), "rbind".into()],
    };
    apply_to_mounts(OCI_GZIP, &blob[..], &[bind]).unwrap();
    assert_eq!(fs::read(source.join("f")).unwrap(), b"content");
    assert!(!exists(source.join("gone")));

    // Anything else is mounted on a temporary directory that is removed afterwards.
    let lower = mkdir(tmp.path().join("lower"));
    let upper2 = mkdir(tmp.path().join("upper2"));
    let work = mkdir(tmp.path().join("work"));
    fs::write(lower.join("gone"), "x").unwrap();
    let before = temp_mount_dirs();
    let two = vec![
        Mount {
            kind: "tmpfs".into(),
            source: "tmpfs".into(),
            options: vec![],
        },
        Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                "volatile".into(),
                format!("workdir={}", work.display()),
                format!("upperdir={}", upper2.display()),
                format!("lowerdir={}", lower.display()),
            ],
        },
    ];
    let applied = apply_to_mounts(OCI_GZIP, &blob[..], &two).unwrap();
    assert_eq!(applied.diff_id.to_string(), sha256(&tar));
    assert_eq!(fs::read(upper2.join("f")).unwrap(), b"content");
    // Through a mounted overlay the whiteout is overlay's own.
    assert!(lstat(upper2.join("gone")).file_type().is_char_device());
    assert_eq!(temp_mount_dirs(), before, "temporary mount point removed");

    // A failed apply through a temporary mount unmounts and removes it too.
    let bad = Tar::entries([link("x", b'Z', "")]);
    let err = apply_to_mounts(OCI, &bad[..], &two).unwrap_err();
    assert!(matches!(err, Error::InvalidArchive(_)), "{err:?}");
    assert_eq!(temp_mount_dirs(), before);
}

fn temp_mount_dirs() -> Vec<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty() && Path::new(d).is_dir())
        .map_or_else(std::env::temp_dir, PathBuf::from);
    let prefix = format!("strata-apply-{}-", std::process::id());
    let mut out: Vec<PathBuf> = fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// Hostile archives: each fails cleanly or resolves inside the root; nothing outside changes.

#[test]
fn dotdot_and_absolute_names_stay_inside_the_root() {
    let sb = Sandbox::new();
    let tar = Tar::entries([
        file("../outside/sentinel", "pwned"),
        file("../../../../../../etc/strata-escape", "pwned"),
        file(format!("/{}", sb.sentinel_abs()), "pwned"),
        dir("a/../../outside/"),
    ]);
    sb.apply(&tar, &WhiteoutMode::Delete).unwrap();
    assert_eq!(
        fs::read(sb.root.join("outside/sentinel")).unwrap(),
        b"pwned"
    );
    assert_eq!(
        fs::read(sb.root.join("etc/strata-escape")).unwrap(),
        b"pwned"
    );
    assert!(!exists("/etc/strata-escape"));
    let rerooted = sb.root.join(sb.sentinel_abs().trim_start_matches('/'));
    assert_eq!(fs::read(rerooted).unwrap(), b"pwned");
}

#[test]
fn symlinked_parents_are_followed_inside_the_root_only() {
    let sb = Sandbox::new();
    let tar = Tar::entries([
        symlink_entry("abs", sb.outside_abs()),
        file("abs/sentinel", "pwned"),
        symlink_entry("up", "../../../.."),
        file("up/outside/sentinel", "pwned"),
        symlink_entry("l1", ".."),
        symlink_entry("l2", "l1/../l1/.."),
        file("l2/l1/chained", "pwned"),
        dir("sub/"),
        symlink_entry("sub/rel", "../../outside"),
        file("sub/rel/sentinel", "pwned"),
        symlink_entry("dangling", "/nowhere/deep"),
        file("dangling/file", "created at the target, inside"),
    ]);
    sb.apply(&tar, &WhiteoutMode::Delete).unwrap();
    let inside = sb.root.join(sb.outside_abs().trim_start_matches('/'));
    assert_eq!(fs::read(inside.join("sentinel")).unwrap(), b"pwned");
    assert_eq!(
        fs::read(sb.root.join("outside/sentinel")).unwrap(),
        b"pwned"
    );
    assert_eq!(fs::read(sb.root.join("chained")).unwrap(), b"pwned");
    assert_eq!(
        fs::read(sb.root.join("nowhere/deep/file")).unwrap(),
        b"created at the target, inside"
    );
}

#[test]
fn a_file_entry_replaces_a_symlink_instead_of_writing_through_it() {
    let sb = Sandbox::new();
    let tar = Tar::entries([
        symlink_entry("x", sb.sentinel_abs()),
        file("x", "pwned").mode(0o777),
        symlink_entry("y", "../outside/sentinel"),
        file("y", "pwned"),
        symlink_entry("d", sb.outside_abs()),
        dir("d/").mode(0o777).owner(1, 1),
        symlink_entry("n", sb.sentinel_abs()),
        E::new("n", b'6'),
        symlink_entry("s", sb.sentinel_abs()),
        symlink_entry("s", "elsewhere"),
    ]);
    sb.apply(&tar, &WhiteoutMode::Delete).unwrap();
    for f in ["x", "y"] {
        assert!(lstat(sb.root.join(f)).is_file());
        assert_eq!(fs::read(sb.root.join(f)).unwrap(), b"pwned");
    }
    assert!(lstat(sb.root.join("d")).is_dir());
    assert!(lstat(sb.root.join("n")).file_type().is_fifo());
    assert_eq!(
        fs::read_link(sb.root.join("s")).unwrap(),
        Path::new("elsewhere")
    );
}

#[test]
fn metadata_of_symlinks_and_links_to_symlinks_never_reaches_the_target() {
    let sb = Sandbox::new();
    let tar = Tar::default()
        .pax(&[("SCHILY.xattr.user.x", b"1")])
        .add(
            symlink_entry("s", sb.sentinel_abs())
                .owner(9, 9)
                .mode(0o777),
        )
        .pax(&[("SCHILY.xattr.user.x", b"1")])
        .add(hardlink("h", "s").owner(9, 9).mode(0o777))
        .finish();
    // The xattrs may be refused on symlinks (EPERM for user.*): that is ignored.
    sb.apply(&tar, &WhiteoutMode::Delete).unwrap();
    let h = lstat(sb.root.join("h"));
    assert!(h.file_type().is_symlink());
    assert_eq!(h.ino(), lstat(sb.root.join("s")).ino());
    assert_eq!((h.uid(), h.gid()), (9, 9));
}

#[test]
fn hardlinks_to_outside_files_fail() {
    let sb = Sandbox::new();
    let cases = [
        hardlink("h", sb.sentinel_abs()),
        hardlink("h", "../outside/sentinel"),
        hardlink("h", "/etc/passwd"),
    ];
    for case in cases {
        let err = sb
            .apply(&Tar::entries([case]), &WhiteoutMode::Delete)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }
    // Through a symlinked directory: resolved inside the root, where nothing is.
    let tar = Tar::entries([
        symlink_entry("s", sb.outside_abs()),
        hardlink("h", "s/sentinel"),
    ]);
    let err = sb.apply(&tar, &WhiteoutMode::Delete).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // A link to the root, or to a directory, fails too.
    assert_invalid(
        sb.apply(&Tar::entries([hardlink("h", "/")]), &WhiteoutMode::Delete),
        "root",
    );
    let err = sb
        .apply(&Tar::entries([hardlink("h", "..")]), &WhiteoutMode::Delete)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArchive(_)), "{err}");
    let err = sb
        .apply(
            &Tar::entries([dir("dd/"), hardlink("h", "dd")]),
            &WhiteoutMode::Delete,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(!exists(sb.root.join("h")));
    // A link to a symlink links the symlink itself.
    let tar = Tar::entries([symlink_entry("s2", sb.sentinel_abs()), hardlink("h2", "s2")]);
    sb.apply(&tar, &WhiteoutMode::Delete).unwrap();
    assert!(lstat(sb.root.join("h2")).file_type().is_symlink());
}

#[test]
fn whiteouts_must_name_a_sibling_and_cannot_delete_outside() {
    let sb = Sandbox::new();
    for bad in [".wh...", "sub/.wh..", ".wh.", "sub/../.wh.."] {
        for mode in [WhiteoutMode::Delete, overlay_mode(&[])] {
            assert_invalid(sb.apply(&Tar::entries([whiteout(bad)]), &mode), "whiteout");
        }
    }
    // Through a symlinked directory or `..`: resolved inside the root.
    let tar = Tar::entries([
        symlink_entry("s", sb.outside_abs()),
        whiteout("s/.wh.sentinel"),
        whiteout("../.wh.outside"),
        whiteout("../outside/.wh.sentinel"),
        whiteout("s/.wh..wh..opq"),
    ]);
    sb.apply(&tar, &WhiteoutMode::Delete).unwrap();
    let tar = Tar::entries([
        symlink_entry("t", sb.outside_abs()),
        whiteout("t/.wh.sentinel"),
        whiteout("t/.wh..wh..opq"),
    ]);
    sb.apply(&tar, &overlay_mode(&[])).unwrap();
    let inside = sb.root.join(sb.outside_abs().trim_start_matches('/'));
    assert!(lstat(inside.join("sentinel")).file_type().is_char_device());
    assert_eq!(xattr(&inside, "trusted.overlay.opaque").unwrap(), b"y");
    // Whiteouts of the symlinks themselves remove the links, not their targets.
    let tar = Tar::entries([whiteout(".wh.s"), whiteout(".wh.t")]);
    sb.apply(&tar, &WhiteoutMode::Delete).unwrap();
    assert!(!exists(sb.root.join("s")) && !exists(sb.root.join("t")));
}

#[test]
fn symlink_loops_and_non_directory_parents_fail() {
    let sb = Sandbox::new();
    let err = sb
        .apply(
            &Tar::entries([symlink_entry("loop", "loop"), file("loop/x", "x")]),
            &WhiteoutMode::Delete,
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArchive(ref m) if m.contains("symlinks")),
        "{err}"
    );
    let err = sb
        .apply(
            &Tar::entries([
                symlink_entry("a", "b/x"),
                symlink_entry("b", "a/y"),
                file("a/z", "x"),
            ]),
            &WhiteoutMode::Delete,
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArchive(_)), "{err}");
    let err = sb
        .apply(
            &Tar::entries([file("f", "x"), file("f/child", "x")]),
            &WhiteoutMode::Delete,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[test]
fn bombs_and_malformed_headers_fail_cleanly() {
    let sb = Sandbox::new();
    // A file claiming a terabyte with a few bytes behind it.
    let tar = Tar::default().add(file("big", "tiny").size(1 << 40)).0;
    assert_invalid(sb.apply(&tar, &WhiteoutMode::Delete), "big");
    // Extension headers above the cap are refused before they are read.
    for kind in [b'L', b'K', b'x', b'g'] {
        let mut huge = E::new("././@LongLink", kind);
        huge.data = vec![b'a'; 100];
        let tar = Tar::default().add(huge.clone().size(1 << 40)).0;
        assert_invalid(sb.apply(&tar, &WhiteoutMode::Delete), "limit");
        let tar = Tar::default()
            .add(huge.size(2 << 20))
            .add(file("f", "x"))
            .finish();
        assert_invalid(sb.apply(&tar, &WhiteoutMode::Delete), "limit");
    }
    // A long name just under the cap is fine.
    let mut long = E::new("././@LongLink", b'L');
    long.data = format!("{}/f", "d/".repeat(1000)).into_bytes();
    let tar = Tar::default().add(long).add(file("short", "x")).finish();
    sb.apply(&tar, &WhiteoutMode::Delete).unwrap();
    assert!(exists(sb.root.join(format!("{}/f", "d/".repeat(1000)))));

    // Truncated inside a header, an extension, or data.
    let full = Tar::entries([file("f", vec![7u8; 5000])]);
    for cut in [100, 512 + 100, 1000] {
        assert_invalid(sb.apply(&full[..cut], &WhiteoutMode::Delete), "");
    }
    // Checksum, garbage, unknown and sparse types, a malformed PAX record.
    let mut bad_sum = Tar::entries([file("f", "x")]);
    bad_sum[0] ^= 1;
    assert_invalid(sb.apply(&bad_sum, &WhiteoutMode::Delete), "checksum");
    assert_invalid(sb.apply(&[0xAB; 4096], &WhiteoutMode::Delete), "");
    assert_invalid(
        sb.apply(&Tar::entries([E::new("odd", b'Z')]), &WhiteoutMode::Delete),
        "unhandled",
    );
    assert_invalid(
        sb.apply(&Tar::entries([E::new("cont", b'7')]), &WhiteoutMode::Delete),
        "unhandled",
    );
    let err = sb
        .apply(
            &Tar::entries([E::new("sparse", b'S')]),
            &WhiteoutMode::Delete,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    let mut pax = E::new("PaxHeaders/x", b'x');
    pax.data = b"999 path=x\n".to_vec();
    let tar = Tar::default().add(pax).add(file("f", "x")).finish();
    assert_invalid(sb.apply(&tar, &WhiteoutMode::Delete), "PAX");
    // Device numbers and owners beyond 32 bits.
    let tar = Tar::default()
        .pax(&[("uid", b"99999999999")])
        .add(file("f", "x"))
        .finish();
    assert_invalid(sb.apply(&tar, &WhiteoutMode::Delete), "owner");
    let mut dev = header(&E::new("dev", b'3'), 0);
    dev[329..337].copy_from_slice(&[0x80, 0, 0, 1, 0, 0, 0, 0]);
    set_checksum(&mut dev);
    let mut tar = dev.to_vec();
    tar.extend_from_slice(&[0; 1024]);
    assert_invalid(sb.apply(&tar, &WhiteoutMode::Delete), "device");
    // A NUL byte smuggled into a PAX path.
    let tar = Tar::default()
        .pax(&[("path", b"a\0/../../x")])
        .add(file("f", "x"))
        .finish();
    assert_invalid(sb.apply(&tar, &WhiteoutMode::Delete), "NUL");
    // Endless zero-size headers are only as long as the input.
    let many: Vec<E> = (0..2000).map(|i| dir(format!("d{}/", i % 3))).collect();
    sb.apply(&Tar::entries(many), &WhiteoutMode::Delete)
        .unwrap();
}

#[test]
fn reserved_xattrs_from_the_archive_are_ignored_in_overlay_mode() {
    let sb = Sandbox::new();
    let tar = Tar::default()
        .pax(&[
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
            ("SCHILY.xattr.user.overlay.opaque", b"y"),
            ("SCHILY.xattr.user.ok", b"fine"),
        ])
        .add(dir("d/"))
        .finish();
    sb.apply(&tar, &overlay_mode(&[])).unwrap();
    let d = sb.root.join("d");
    assert!(xattr(&d, "trusted.overlay.opaque").is_none());
    assert!(xattr(&d, "trusted.overlay.redirect").is_none());
    assert!(xattr(&d, "user.overlay.opaque").is_none());
    assert_eq!(xattr(&d, "user.ok").unwrap(), b"fine");
}

#[test]
fn deep_trees_reopen_closed_directories_and_stop_at_the_depth_limit() {
    let sb = Sandbox::new();
    // 100 levels deep, then a symlink climbing 60 of them back (past the open window).
    let deep = "a/".repeat(100);
    let mut long = E::new("././@LongLink", b'L');
    long.data = format!("{deep}up").into_bytes();
    let mut target = E::new("././@LongLink", b'K');
    target.data = "../".repeat(60).into_bytes();
    let mut through = E::new("././@LongLink", b'L');
    through.data = format!("{deep}up/x").into_bytes();
    let tar = Tar::default()
        .add(long)
        .add(target)
        .add(symlink_entry("placeholder", "placeholder"))
        .add(through)
        .add(file("placeholder2", "landed"))
        .finish();
    sb.apply(&tar, &WhiteoutMode::Delete).unwrap();
    let landed = sb.root.join(format!("{}x", "a/".repeat(40)));
    assert_eq!(fs::read(landed).unwrap(), b"landed");

    let mut too_deep = E::new("././@LongLink", b'L');
    too_deep.data = format!("{}f", "d/".repeat(1100)).into_bytes();
    let tar = Tar::default()
        .add(too_deep)
        .add(file("placeholder", "x"))
        .finish();
    assert_invalid(sb.apply(&tar, &WhiteoutMode::Delete), "deep");
}
