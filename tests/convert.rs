//! eStargz conversion, both ways against stargz-snapshotter's own tools:
//!
//! * `strata convert --estargz` of a layer-rich image: every layer read back through strata's
//!   eStargz reader equals the source layer, annotations and config are right, and `strata
//!   mount` of the converted image shows the same tree as the source's (minus the TOC and
//!   landmark files).
//! * Images converted by `ctr-remote image convert --estargz` (in a private containerd) read
//!   through strata's reader exactly like their source layers; and stargz's own TOC parser
//!   (`ctr-remote image get-toc-digest`) accepts strata's layers and finds the TOC digests
//!   strata annotated.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use oci_spec::image::{Descriptor, ImageConfiguration, MediaType};
use rootfs::content::ContentStore;
use rootfs::estargz::{
    Index, IndexOptions, NO_PREFETCH_LANDMARK, NodeId, NodeKind, PREFETCH_LANDMARK, ROOT, ReadAt,
    TOC_DIGEST_ANNOTATION, TOC_NAME, UNCOMPRESSED_SIZE_ANNOTATION, decompress_chunk, read_toc,
    verify_toc_digest,
};
use sha2::Digest as _;
use support::containerd::{Containerd, become_subreaper};
use support::ctr_remote::archive_layout;
use support::layers::{assert_same_tree, build_image};
use support::{require_commands, run_ok};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn strata(args: &[&str]) -> String {
    run_ok(Command::new(support::strata_bin()).args(args), RUN_TIMEOUT)
}

/// The decompressed tar of a layer blob (gzip, zstd or plain).
fn layer_tar(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    if data.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&data[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::decode_all(&data[..]).unwrap()
    } else {
        data
    }
}

fn blob_path(store: &ContentStore, desc: &Descriptor) -> PathBuf {
    store.blob_path(desc.digest()).unwrap()
}

fn clean(name: &str) -> String {
    name.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Every path of an index (landmarks and the TOC are never in it).
fn index_paths(index: &Index) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<(String, NodeId)> = vec![(String::new(), ROOT)];
    while let Some((path, id)) = stack.pop() {
        for (name, &child) in &index.node(id).children {
            let p = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}/{name}")
            };
            out.insert(p.clone());
            if index.node(child).kind == NodeKind::Dir {
                stack.push((p, child));
            }
        }
    }
    out
}

/// Asserts that the eStargz blob at `blob` (with the TOC digest `toc_digest` from its
/// descriptor), read through strata's reader, holds exactly the entries of the layer tar
/// `original`: kinds, modes, owners, sizes, contents (every chunk decompressed and verified),
/// link targets, hard links, devices, xattrs, whiteouts and opaque directories.
fn assert_layer_reads_as(blob: &Path, toc_digest: &str, original: &[u8]) {
    let file = File::open(blob).unwrap();
    let opened = read_toc(&file).unwrap();
    verify_toc_digest(toc_digest, &opened.toc_digest).unwrap();
    let index = Index::build(&opened.toc, opened.toc_offset, &IndexOptions::default()).unwrap();
    let content = |id: NodeId| {
        let mut out = Vec::new();
        for c in &index.node(id).chunks {
            let mut member = vec![0u8; c.blob_len as usize];
            file.read_exact_at(c.blob_offset, &mut member).unwrap();
            out.extend(decompress_chunk(&member, c).unwrap());
        }
        out
    };
    let mut expected_paths = BTreeSet::new();
    let mut archive = tar::Archive::new(original);
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let path = clean(&e.path().unwrap().to_string_lossy());
        let h = e.header().clone();
        let (dir, base) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        if base == ".wh..wh..opq" {
            let id = index.resolve(dir).unwrap();
            assert_eq!(
                index
                    .node(id)
                    .xattrs
                    .get("trusted.overlay.opaque")
                    .map(Vec::as_slice),
                Some(&b"y"[..]),
                "{path}"
            );
            continue;
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            let target = if dir.is_empty() {
                hidden.to_string()
            } else {
                format!("{dir}/{hidden}")
            };
            let n = index.node(index.resolve(&target).unwrap());
            assert_eq!((n.kind, n.rdev), (NodeKind::Char, (0, 0)), "{path}");
            expected_paths.insert(target);
            continue;
        }
        expected_paths.insert(path.clone());
        let id = index
            .resolve(&path)
            .unwrap_or_else(|| panic!("{path} missing from the eStargz layer"));
        let n = index.node(id);
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        match h.entry_type() {
            tar::EntryType::Link => {
                let target = clean(&e.link_name().unwrap().unwrap().to_string_lossy());
                assert_eq!(Some(id), index.resolve(&target), "{path}: hard link");
                continue;
            }
            tar::EntryType::Directory => assert_eq!(n.kind, NodeKind::Dir, "{path}"),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                assert_eq!(n.kind, NodeKind::Reg, "{path}");
                assert_eq!(n.size, data.len() as u64, "{path}");
                assert!(content(id) == data, "{path}: content differs");
            }
            tar::EntryType::Symlink => {
                assert_eq!(n.kind, NodeKind::Symlink, "{path}");
                let target = e.link_name().unwrap().unwrap();
                assert_eq!(n.link_target, target.to_string_lossy(), "{path}");
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let kind = if h.entry_type() == tar::EntryType::Char {
                    NodeKind::Char
                } else {
                    NodeKind::Block
                };
                assert_eq!(n.kind, kind, "{path}");
                let dev = (
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap(),
                );
                assert_eq!(n.rdev, dev, "{path}");
            }
            tar::EntryType::Fifo => assert_eq!(n.kind, NodeKind::Fifo, "{path}"),
            other => panic!("{path}: unexpected entry type {other:?}"),
        }
        assert_eq!(n.mode, h.mode().unwrap() & 0o7777, "{path}: mode");
        assert_eq!(
            (u64::from(n.uid), u64::from(n.gid)),
            (h.uid().unwrap(), h.gid().unwrap()),
            "{path}: owner"
        );
        for (k, v) in &xattrs {
            assert_eq!(n.xattrs.get(k), Some(v), "{path}: xattr {k}");
        }
    }
    // Parents without entries of their own are implicit directories.
    for p in expected_paths.clone() {
        let mut p = p.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            expected_paths.insert(parent.to_string());
            p = parent;
        }
    }
    assert_eq!(
        index_paths(&index),
        expected_paths,
        "paths of {}",
        blob.display()
    );
}

/// The layers of `image` in `layout` with their diff IDs and (source) config.
fn resolve(layout: &Path, reference: Option<&str>) -> (ContentStore, rootfs::content::Image) {
    let store = ContentStore::open(layout).unwrap();
    let img = store.resolve(reference).unwrap();
    (store, img)
}

/// Unmounts a `strata mount` when dropped.
struct Mounted {
    root: PathBuf,
    target: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new(support::strata_bin())
            .arg("--root")
            .arg(&self.root)
            .arg("umount")
            .arg(&self.target)
            .output();
        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mount(root: &Path, image: &str, target: &Path, rw: bool) -> Mounted {
    std::fs::create_dir_all(target).unwrap();
    let mut args = vec![
        "--root",
        root.to_str().unwrap(),
        "mount",
        image,
        target.to_str().unwrap(),
    ];
    if rw {
        args.push("--rw");
    }
    strata(&args);
    Mounted {
        root: root.to_path_buf(),
        target: target.to_path_buf(),
    }
}

#[test]
fn strata_convert_gives_estargz_layers_with_the_same_files() {
    let tmp = tempfile::Builder::new()
        .prefix("strata-convert-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let src = dir.join("src");
    build_image(&src);
    let out = dir.join("out");
    let list = dir.join("prioritized.txt");
    std::fs::write(&list, "# first the shell\nusr/bin/sh\n\n").unwrap();
    let digest = strata(&[
        "convert",
        "--estargz",
        &format!("{}:t", src.display()),
        "--out",
        out.to_str().unwrap(),
        "--chunk-size",
        "1000000",
        "--prioritize",
        "app/hello.txt",
        "--prioritize-list",
        list.to_str().unwrap(),
    ]);
    let (src_store, src_img) = resolve(&src, Some("t"));
    let (out_store, out_img) = resolve(&out, Some("t"));
    assert_eq!(out_img.manifest_digest.to_string(), digest.trim());
    assert_eq!(out_img.layers.len(), src_img.layers.len());
    let config: ImageConfiguration = out_store.read_json(out_img.manifest.config()).unwrap();
    assert_eq!(config.os(), src_img.config.os());
    assert_eq!(config.config(), src_img.config.config());
    for (i, (s, o)) in src_img.layers.iter().zip(&out_img.layers).enumerate() {
        assert_eq!(o.blob.media_type(), &MediaType::ImageLayerGzip);
        let annotations = o.blob.annotations().clone().unwrap();
        let blob = blob_path(&out_store, &o.blob);
        let tar = layer_tar(&blob);
        assert_eq!(
            annotations[UNCOMPRESSED_SIZE_ANNOTATION],
            tar.len().to_string(),
            "layer {i}"
        );
        assert_eq!(
            o.diff.digest().to_string(),
            format!("sha256:{:x}", sha2::Sha256::digest(&tar)),
            "layer {i}: the config's diff ID is the eStargz tar's"
        );
        let original = layer_tar(&blob_path(&src_store, &s.blob));
        assert_layer_reads_as(&blob, &annotations[TOC_DIGEST_ANNOTATION], &original);
        // Prioritized files lead their layers.
        let opened = read_toc(&File::open(&blob).unwrap()).unwrap();
        let names: Vec<&str> = opened.toc.entries.iter().map(|e| e.name.as_str()).collect();
        match i {
            0 => assert_eq!(
                names[..4],
                ["usr/", "usr/bin/", "usr/bin/sh", PREFETCH_LANDMARK]
            ),
            1 => assert_eq!(names[..3], ["app/", "app/hello.txt", PREFETCH_LANDMARK]),
            _ => assert_eq!(names[0], PREFETCH_LANDMARK),
        }
    }

    // Unpacked and mounted, the converted image is the source image plus the TOC and landmark
    // files at its root (removed here through a writable mount).
    let (m_src, m_out) = (dir.join("m-src"), dir.join("m-out"));
    let _a = mount(
        &dir.join("root-src"),
        &format!("{}:t", src.display()),
        &m_src,
        false,
    );
    let _b = mount(
        &dir.join("root-out"),
        &format!("{}:t", out.display()),
        &m_out,
        true,
    );
    for name in [TOC_NAME, PREFETCH_LANDMARK] {
        std::fs::remove_file(m_out.join(name)).unwrap();
    }
    assert!(!m_out.join(NO_PREFETCH_LANDMARK).exists());
    assert_same_tree(&m_out, &m_src, true);
}

#[test]
fn convert_without_estargz_or_with_a_bad_source_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(support::strata_bin())
        .args(["convert", "/nonexistent", "--out"])
        .arg(tmp.path().join("o"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--estargz"));
    let out = Command::new(support::strata_bin())
        .args(["convert", "--estargz", "/nonexistent", "--out"])
        .arg(tmp.path().join("o"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an OCI image layout"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Tars an OCI layout directory into an archive `ctr images import` takes.
#[test]
fn stargz_tools_and_strata_read_each_others_estargz() {
    require_commands(
        &["containerd", "ctr", "ctr-remote", "tar"],
        "apt-get install containerd stargz-snapshotter tar",
    );
    become_subreaper();
    let tmp = tempfile::Builder::new()
        .prefix("strata-convert-ctr-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let src = dir.join("src");
    build_image(&src);
    // ctr-remote converts the source; strata's reader must see the source layers.
    let esgz = support::ctr_remote::convert(&src, "t", 1_000_000, &dir.join("ctr-remote"));
    let (src_store, src_img) = resolve(&src, Some("t"));
    let (esgz_store, esgz_img) = resolve(&esgz, None);
    assert_eq!(esgz_img.layers.len(), src_img.layers.len());
    let mut reference_tocs = Vec::new();
    for (s, o) in src_img.layers.iter().zip(&esgz_img.layers) {
        let annotations = o.blob.annotations().clone().unwrap();
        let blob = blob_path(&esgz_store, &o.blob);
        let original = layer_tar(&blob_path(&src_store, &s.blob));
        assert_layer_reads_as(&blob, &annotations[TOC_DIGEST_ANNOTATION], &original);
        reference_tocs.push(read_toc(&File::open(&blob).unwrap()).unwrap().toc);
    }

    // Nothing serves this socket: only the content store is used.
    let containerd = Containerd::start(&dir.join("containerd"), &dir.join("unused.sock"));
    let remote = |args: &[&str]| {
        run_ok(
            Command::new("ctr-remote")
                .arg("--address")
                .arg(containerd.socket())
                .args(["--namespace", support::containerd::NAMESPACE])
                .args(args),
            RUN_TIMEOUT,
        )
    };

    // strata converts the source; stargz's TOC parser must accept the layers and find the
    // digests strata annotated.
    let out = dir.join("out");
    strata(&[
        "convert",
        "--estargz",
        &format!("{}:t", src.display()),
        "--out",
        out.to_str().unwrap(),
        "--chunk-size",
        "1000000",
        "--compression-level",
        "1",
    ]);
    let archive = dir.join("out.tar");
    archive_layout(&out, &archive);
    containerd.ctr_ok(&[
        "images",
        "import",
        "--no-unpack",
        "--base-name",
        "example.com/strata",
        archive.to_str().unwrap(),
    ]);
    let (out_store, out_img) = resolve(&out, Some("t"));
    for (i, layer) in out_img.layers.iter().enumerate() {
        let annotations = layer.blob.annotations().clone().unwrap();
        let digest = remote(&["images", "get-toc-digest", layer.blob.digest().as_ref()]);
        assert_eq!(
            digest.trim(),
            annotations[TOC_DIGEST_ANNOTATION],
            "layer {i}: stargz's TOC digest"
        );
        // Same TOC as stargz's converter writes, entry for entry (offsets and the
        // compression aside).
        let ours = read_toc(&File::open(blob_path(&out_store, &layer.blob)).unwrap())
            .unwrap()
            .toc;
        let strip = |toc: &rootfs::estargz::Toc| {
            toc.entries
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    e.offset = 0;
                    e.user_name.clear();
                    e.group_name.clear();
                    e
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (strip(&ours), strip(&reference_tocs[i]));
        assert_eq!(a.len(), b.len(), "layer {i}: TOC lengths");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y, "layer {i}");
        }
    }
    drop(containerd);
}

#[test]
fn convert_refuses_a_layer_whose_diff_id_is_not_the_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_image(&src);
    let (store, img) = resolve(&src, Some("t"));
    let mut config: serde_json::Value = store.read_json(img.manifest.config()).unwrap();
    config["rootfs"]["diff_ids"][1] = serde_json::json!(format!("sha256:{}", "0".repeat(64)));
    let config_desc = store
        .write_blob(
            MediaType::ImageConfig,
            &serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
    let mut manifest = img.manifest.clone();
    manifest.set_config(config_desc);
    store.add_image(&manifest, Some("bad")).unwrap();
    let out = Command::new(support::strata_bin())
        .args(["convert", "--estargz"])
        .arg(format!("{}:bad", src.display()))
        .arg("--out")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the image config says"), "{stderr}");
}
