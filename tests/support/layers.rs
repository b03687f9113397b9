//! A test image with everything a layer can hold (three layers: gzip, zstd, plain; hard links,
//! devices, xattrs, whiteouts, an opaque directory) and a comparison of mounted trees.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use oci_spec::image::{
    ConfigBuilder, DescriptorBuilder, ImageConfigurationBuilder, ImageManifestBuilder, MediaType,
    RootFsBuilder,
};
use rootfs::content::ContentStore;
use sha2::Digest as _;

/// Deterministic bytes that do not compress to nothing.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
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

pub struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    pub fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }

    pub fn header(kind: tar::EntryType, mode: u32, owner: (u64, u64)) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(IMAGE_MTIME);
        h.set_size(0);
        h
    }

    pub fn xattrs(&mut self, xattrs: &[(&str, &[u8])]) {
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

    pub fn dir(&mut self, path: &str, mode: u32, owner: (u64, u64)) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, owner);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8], mode: u32, owner: (u64, u64)) -> &mut Self {
        self.file_x(path, data, mode, owner, &[])
    }

    pub fn file_x(
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
    pub fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let (mode, owner) = match (kind, target) {
            (tar::EntryType::Link, "usr/bin/tool") => (0o755, (1000, 1000)),
            (tar::EntryType::Link, "app/hello.txt") => (0o640, (0, 33)),
            _ => (0o777, (0, 0)),
        };
        let mut h = Self::header(kind, mode, owner);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn device(
        &mut self,
        kind: tar::EntryType,
        path: &str,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = Self::header(kind, 0o666, (0, 0));
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// `security.capability` for cap_net_bind_service, permitted and effective (v2).
pub const CAPABILITY: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// Writes a three-layer image (gzip, zstd, plain) into the OCI layout at `dir`, tag `t`.
pub fn build_image(dir: &Path) {
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
pub const IMAGE_MTIME: u64 = 1_700_000_000;

/// Everything observable about one path (times other than mtime aside).
#[derive(Debug, PartialEq, Eq)]
pub struct Observed {
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

pub fn xattrs_of(path: &Path, skip_overlay: bool) -> BTreeMap<String, Vec<u8>> {
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
pub mod xattr {
    use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

    pub fn c(path: &Path) -> CString {
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
pub fn observe(
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

pub fn assert_same_tree(actual: &Path, expected: &Path, skip_overlay_xattrs: bool) {
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
