//! The eStargz format end to end: layers with every entry type are converted by
//! `estargz::convert_layer`, then read back through `read_toc` / `Index` / `decompress_chunk`,
//! listed and extracted by GNU tar, and applied by the layer applier; each way must give back
//! the original layer (plus the TOC and landmark files for tools that do not know eStargz).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use rootfs::Error;
use rootfs::apply::{WhiteoutMode, apply_blob};
use rootfs::estargz::{
    EntryType, Index, IndexOptions, NO_PREFETCH_LANDMARK, NodeKind, PREFETCH_LANDMARK, TOC_NAME,
    WriterOptions, convert_layer, decompress_chunk, read_toc, verify_toc_digest,
};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

const MTIME: u64 = 1_650_000_000;
/// A version 2 file capability: effective, permitted `cap_net_bind_service`.
const CAP_NET_BIND_SERVICE: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const LONG_DIR: &str =
    "a-directory-with-a-name-long-enough-that-the-paths-below-it-need-more-than-one-hundred-bytes";

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
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

fn header(kind: tar::EntryType, mode: u32, owner: (u64, u64)) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(owner.0);
    h.set_gid(owner.1);
    h.set_mtime(MTIME);
    h.set_size(0);
    h
}

/// A layer with every entry type, chunked and empty files, hard links, whiteouts, an opaque
/// directory, xattrs and sub-second times in PAX records, long names and links.
fn rich_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| {
        let mut h = header(tar::EntryType::Directory, mode, (0, 0));
        b.append_data(&mut h, path, std::io::empty()).unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32, owner| {
        let mut h = header(tar::EntryType::Regular, mode, owner);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    dir(&mut b, "bin/", 0o755);
    file(
        &mut b,
        "bin/tool",
        &pseudo_random(10_000, 1),
        0o4755,
        (0, 0),
    );
    file(&mut b, "bin/empty", b"", 0o600, (1000, 1001));
    file(&mut b, "bin/exact", &pseudo_random(2048, 2), 0o644, (0, 0));
    dir(&mut b, "etc/", 0o750);
    b.append_pax_extensions([
        ("SCHILY.xattr.user.comment", &b"hello xattr"[..]),
        (
            "SCHILY.xattr.security.capability",
            &CAP_NET_BIND_SERVICE[..],
        ),
        ("mtime", &b"1650000000.25"[..]),
    ])
    .unwrap();
    file(&mut b, "etc/conf", b"key=value\n", 0o640, (0, 42));
    let mut h = header(tar::EntryType::Link, 0o640, (0, 42));
    b.append_link(&mut h, "etc/conf-link", "etc/conf").unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777, (0, 0));
    b.append_link(&mut h, "etc/sym", "../bin/tool").unwrap();
    let mut h = header(tar::EntryType::Char, 0o620, (0, 5));
    h.set_device_major(4).unwrap();
    h.set_device_minor(64).unwrap();
    b.append_data(&mut h, "etc/tty", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Block, 0o660, (0, 6));
    h.set_device_major(7).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "etc/loop", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Fifo, 0o644, (0, 0));
    b.append_data(&mut h, "etc/fifo", std::io::empty()).unwrap();
    file(&mut b, "etc/.wh.removed", b"", 0o644, (0, 0));
    dir(&mut b, "opaque/", 0o755);
    file(&mut b, "opaque/.wh..wh..opq", b"", 0o644, (0, 0));
    file(&mut b, "opaque/kept", b"kept", 0o644, (0, 0));
    dir(&mut b, &format!("{LONG_DIR}/"), 0o755);
    let long_file = format!("{LONG_DIR}/file-with-long-path");
    file(&mut b, &long_file, &pseudo_random(3000, 3), 0o644, (0, 0));
    let mut h = header(tar::EntryType::Symlink, 0o777, (0, 0));
    b.append_link(&mut h, "long-link", format!("/{long_file}"))
        .unwrap();
    let mut h = header(tar::EntryType::Link, 0o644, (0, 0));
    b.append_link(&mut h, "hard-to-long", &long_file).unwrap();
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// What a tar reader sees of one entry.
#[derive(Debug, PartialEq)]
struct Listed {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    dev: (Option<u32>, Option<u32>),
    /// PAX records other than names and sizes.
    pax: BTreeMap<String, Vec<u8>>,
    data: Vec<u8>,
}

fn list(tar_bytes: &[u8]) -> Vec<(String, Listed)> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let h = e.header().clone();
        let mut pax = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                let key = x.key().unwrap().to_string();
                let value = x.value_bytes().to_vec();
                match key.as_str() {
                    "path" | "linkpath" | "size" => {}
                    // `1.25` and `1.250000000` are the same time.
                    "mtime" | "atime" => {
                        let v = String::from_utf8(value).unwrap();
                        let v = if v.contains('.') {
                            v.trim_end_matches('0').trim_end_matches('.').to_string()
                        } else {
                            v
                        };
                        pax.insert(key, v.into_bytes());
                    }
                    _ => {
                        pax.insert(key, value);
                    }
                }
            }
        }
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let kind = match h.entry_type() {
            tar::EntryType::Continuous => tar::EntryType::Regular,
            k => k,
        };
        out.push((
            path,
            Listed {
                kind,
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                link,
                dev: if matches!(h.entry_type(), tar::EntryType::Char | tar::EntryType::Block) {
                    (
                        h.device_major().ok().flatten(),
                        h.device_minor().ok().flatten(),
                    )
                } else {
                    (None, None)
                },
                pax,
                data,
            },
        ));
    }
    out
}

fn convert(src: &[u8], opts: &WriterOptions) -> (Vec<u8>, rootfs::estargz::Converted) {
    let mut blob = Vec::new();
    let converted = convert_layer(src, &mut blob, opts).unwrap();
    (blob, converted)
}

fn small_chunks() -> WriterOptions {
    WriterOptions {
        chunk_size: 1024,
        ..WriterOptions::default()
    }
}

#[test]
fn the_tar_inside_is_the_original_plus_toc_and_landmark() {
    let src = rich_layer();
    let (blob, converted) = convert(&src, &small_chunks());
    let tar = gunzip(&blob);
    assert_eq!(converted.diff_id.to_string(), sha256(&tar));
    assert_eq!(converted.uncompressed_size, tar.len() as u64);
    assert_eq!(converted.digest.to_string(), sha256(&blob));
    assert_eq!(converted.size, blob.len() as u64);
    let mut got = list(&tar);
    let (first, _) = got.remove(0);
    assert_eq!(first, NO_PREFETCH_LANDMARK);
    let (last, toc) = got.pop().unwrap();
    assert_eq!(last, TOC_NAME);
    assert_eq!(
        sha256(&toc.data),
        converted.toc_digest.to_string(),
        "the TOC digest is that of the JSON in the tar"
    );
    let want = list(&src);
    assert_eq!(got.len(), want.len());
    for ((gp, g), (wp, w)) in got.iter().zip(&want) {
        assert_eq!(gp, wp);
        assert_eq!(g, w, "{gp}");
    }
}

#[test]
fn the_reader_gives_back_every_file() {
    let src = rich_layer();
    let (blob, converted) = convert(&src, &small_chunks());
    let file = tempfile::tempfile().unwrap();
    (&file).write_all(&blob).unwrap();
    let opened = read_toc(&file).unwrap();
    verify_toc_digest(converted.toc_digest.as_ref(), &opened.toc_digest).unwrap();
    assert!(verify_toc_digest("sha256:00", &opened.toc_digest).is_err());
    // Payload entries point at gzip members; chunk entries follow their file.
    let entries = &opened.toc.entries;
    let tool: Vec<_> = entries.iter().filter(|e| e.name == "bin/tool").collect();
    assert_eq!(tool.len(), 10, "10000 bytes in 1024-byte chunks");
    assert_eq!(tool[0].kind, EntryType::Reg);
    assert!(tool[1..].iter().all(|e| e.kind == EntryType::Chunk));
    for e in entries.iter().filter(|e| e.offset > 0) {
        assert_eq!(
            &blob[e.offset as usize..e.offset as usize + 3],
            [0x1f, 0x8b, 8]
        );
        assert!(!e.chunk_digest.is_empty());
        assert_eq!(e.inner_offset, 0);
    }
    let index = Index::build(&opened.toc, opened.toc_offset, &IndexOptions::default()).unwrap();
    assert_eq!(index.prefetch_end, Some(0));
    let content = |path: &str| {
        let node = index.node(index.resolve(path).unwrap());
        let mut out = Vec::new();
        for c in &node.chunks {
            let start = c.blob_offset as usize;
            out.extend(decompress_chunk(&blob[start..start + c.blob_len as usize], c).unwrap());
        }
        assert_eq!(out.len() as u64, node.size);
        out
    };
    for (path, entry) in list(&src) {
        if entry.kind != tar::EntryType::Regular || path.contains(".wh.") {
            continue;
        }
        assert_eq!(content(&path), entry.data, "{path}");
    }
    assert_eq!(
        content("hard-to-long"),
        content(&format!("{LONG_DIR}/file-with-long-path"))
    );
    let conf = index.node(index.resolve("etc/conf").unwrap());
    assert_eq!(conf.nlink, 2);
    assert_eq!((conf.mode, conf.uid, conf.gid), (0o640, 0, 42));
    assert_eq!(conf.xattrs["user.comment"], b"hello xattr");
    assert_eq!(conf.xattrs["security.capability"], CAP_NET_BIND_SERVICE);
    let tool = index.node(index.resolve("bin/tool").unwrap());
    assert_eq!(tool.mode, 0o4755);
    assert_eq!(
        tool.mtime,
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(MTIME)
    );
    let tty = index.node(index.resolve("etc/tty").unwrap());
    assert_eq!((tty.kind, tty.rdev), (NodeKind::Char, (4, 64)));
    let removed = index.node(index.resolve("etc/removed").unwrap());
    assert_eq!((removed.kind, removed.rdev), (NodeKind::Char, (0, 0)));
    let opaque = index.node(index.resolve("opaque").unwrap());
    assert_eq!(opaque.xattrs["trusted.overlay.opaque"], b"y");
    let sym = index.node(index.resolve("etc/sym").unwrap());
    assert_eq!(sym.link_target, "../bin/tool");
    assert!(index.resolve(NO_PREFETCH_LANDMARK).is_none());
    assert!(index.resolve(TOC_NAME).is_none());
}

/// A tree as seen on disk, for comparing extractions.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for path in names {
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(&path).unwrap();
            let ft = md.file_type();
            let what = if ft.is_dir() {
                walk(root, &path, out);
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else if ft.is_file() {
                format!(
                    "file {} nlink {}",
                    sha256(&fs::read(&path).unwrap()),
                    md.nlink()
                )
            } else if ft.is_char_device() || ft.is_block_device() {
                format!("dev {:x}", md.rdev())
            } else {
                "other".to_string()
            };
            let mode = if ft.is_symlink() { 0 } else { md.mode() };
            out.insert(
                rel,
                format!(
                    "{what} mode {mode:o} {}:{} mtime {}",
                    md.uid(),
                    md.gid(),
                    if ft.is_dir() { 0 } else { md.mtime() }
                ),
            );
        }
    }
    walk(root, root, &mut out);
    out
}

fn require(cmd: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .unwrap()
        .status
        .success();
    assert!(found, "{cmd} is missing: apt-get install -y {package}");
}

#[test]
fn gnu_tar_reads_the_blob_like_the_original() {
    require("tar", "tar");
    let src = rich_layer();
    let (blob, _) = convert(&src, &small_chunks());
    let dir = TempDir::new().unwrap();
    let (a, b) = (dir.path().join("orig"), dir.path().join("esgz"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(dir.path().join("orig.tar"), &src).unwrap();
    fs::write(dir.path().join("layer.tar.gz"), &blob).unwrap();
    let tar = |args: &[&str], cwd: &Path| {
        let out = Command::new("tar")
            .args(args)
            .current_dir(cwd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tar {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listing = tar(&["-tzvf", "../layer.tar.gz"], &b);
    assert!(
        listing.contains(TOC_NAME) && listing.contains(NO_PREFETCH_LANDMARK),
        "{listing}"
    );
    tar(&["--numeric-owner", "-xf", "../orig.tar"], &a);
    tar(&["--numeric-owner", "-xzf", "../layer.tar.gz"], &b);
    assert_eq!(fs::read(b.join(NO_PREFETCH_LANDMARK)).unwrap(), [0x0f]);
    fs::remove_file(b.join(NO_PREFETCH_LANDMARK)).unwrap();
    fs::remove_file(b.join(TOC_NAME)).unwrap();
    assert_eq!(snapshot(&b), snapshot(&a));
}

#[test]
fn the_applier_accepts_it_from_any_source_compression() {
    let src = rich_layer();
    let dir = TempDir::new().unwrap();
    let want_root = dir.path().join("want");
    fs::create_dir_all(&want_root).unwrap();
    apply_blob(
        "application/vnd.oci.image.layer.v1.tar",
        &src[..],
        &want_root,
        &WhiteoutMode::Delete,
    )
    .unwrap();
    let want = snapshot(&want_root);
    let zstd = zstd::encode_all(&src[..], 3).unwrap();
    for (i, source) in [src.clone(), gzip(&src), zstd].iter().enumerate() {
        let (blob, converted) = convert(source, &small_chunks());
        let root = dir.path().join(format!("got{i}"));
        fs::create_dir_all(&root).unwrap();
        let applied = apply_blob(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &blob[..],
            &root,
            &WhiteoutMode::Delete,
        )
        .unwrap();
        assert_eq!(applied.diff_id, converted.diff_id);
        assert_eq!(applied.size, converted.uncompressed_size);
        fs::remove_file(root.join(NO_PREFETCH_LANDMARK)).unwrap();
        fs::remove_file(root.join(TOC_NAME)).unwrap();
        assert_eq!(snapshot(&root), want, "source {i}");
        // Converting is deterministic.
        assert_eq!(convert(source, &small_chunks()).1, converted);
    }
}

#[test]
fn prioritized_files_then_landmark_then_the_rest() {
    let src = rich_layer();
    let opts = WriterOptions {
        chunk_size: 1024,
        prioritized_files: vec!["etc/conf-link".into(), "./bin/tool".into(), "nope".into()],
        ..WriterOptions::default()
    };
    let (blob, converted) = convert(&src, &opts);
    let tar = gunzip(&blob);
    let names: Vec<String> = list(&tar).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        &names[..6],
        [
            "etc/",
            "etc/conf",
            "etc/conf-link",
            "bin/",
            "bin/tool",
            PREFETCH_LANDMARK
        ]
    );
    assert_eq!(names.len(), list(&src).len() + 2);
    let file = tempfile::tempfile().unwrap();
    (&file).write_all(&blob).unwrap();
    let opened = read_toc(&file).unwrap();
    assert_eq!(opened.toc_digest, converted.toc_digest);
    let index = Index::build(&opened.toc, opened.toc_offset, &IndexOptions::default()).unwrap();
    let landmark = opened
        .toc
        .entries
        .iter()
        .find(|e| e.name == PREFETCH_LANDMARK)
        .unwrap();
    assert_eq!(index.prefetch_end, Some(landmark.offset));
    let tool_end = opened
        .toc
        .entries
        .iter()
        .filter(|e| e.name == "bin/tool")
        .map(|e| e.offset)
        .max()
        .unwrap();
    assert!(tool_end < landmark.offset);
    // Same tree when applied.
    let dir = TempDir::new().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let mode = WhiteoutMode::Delete;
    apply_blob(
        "application/vnd.oci.image.layer.v1.tar",
        &src[..],
        &a,
        &mode,
    )
    .unwrap();
    apply_blob(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &blob[..],
        &b,
        &mode,
    )
    .unwrap();
    fs::remove_file(b.join(PREFETCH_LANDMARK)).unwrap();
    fs::remove_file(b.join(TOC_NAME)).unwrap();
    assert_eq!(snapshot(&b), snapshot(&a));
}

#[test]
fn converting_an_estargz_layer_again_replaces_its_toc_and_landmark() {
    let (blob, _) = convert(&rich_layer(), &small_chunks());
    let (again, _) = convert(&blob, &WriterOptions::default());
    let names: Vec<String> = list(&gunzip(&again)).into_iter().map(|(p, _)| p).collect();
    assert_eq!(names.iter().filter(|n| *n == TOC_NAME).count(), 1);
    assert_eq!(
        names.iter().filter(|n| *n == NO_PREFETCH_LANDMARK).count(),
        1
    );
}

#[test]
fn an_empty_layer_converts() {
    let (blob, converted) = convert(&[], &WriterOptions::default());
    let file = tempfile::tempfile().unwrap();
    (&file).write_all(&blob).unwrap();
    let opened = read_toc(&file).unwrap();
    assert_eq!(opened.toc_digest, converted.toc_digest);
    assert_eq!(opened.toc.entries.len(), 1);
}

#[test]
fn bad_input_fails_clearly() {
    let src = rich_layer();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", pseudo_random(4096, 9)),
        // Inside the payload of bin/tool (after the headers of bin/ and bin/tool).
        ("truncated tar", src[..1024 + 5000].to_vec()),
        ("truncated gzip", {
            let g = gzip(&src);
            g[..g.len() / 2].to_vec()
        }),
        ("corrupt gzip", {
            let mut g = gzip(&src);
            let n = g.len();
            for b in &mut g[20..n - 20] {
                *b ^= 0x5a;
            }
            g
        }),
    ];
    for (what, data) in cases {
        let e = convert_layer(&data[..], std::io::sink(), &WriterOptions::default()).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArchive(_)),
            "{what}: {e:?} should be an invalid archive"
        );
    }
}
