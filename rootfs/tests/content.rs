//! The OCI image-layout content store: layouts, verified blob reads and writes, resolving
//! images by tag, digest and through nested indexes.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use oci_spec::image::{Arch, Descriptor, Digest, ImageManifest, MediaType, Os};
use rootfs::Error;
use rootfs::content::{ContentStore, error_from_io};
use serde_json::json;
use snapshot_core::ErrorKind;
use snapshot_core::identity::sha256_digest;
use tempfile::TempDir;

fn blob_file(store: &ContentStore, d: &Digest) -> std::path::PathBuf {
    store.root().join("blobs/sha256").join(d.digest())
}

fn ingest_is_empty(dir: &Path) -> bool {
    match fs::read_dir(dir.join("ingest")) {
        Ok(mut it) => it.next().is_none(),
        Err(_) => true,
    }
}

/// A config with `diff_ids` for `arch`, stored.
fn config(store: &ContentStore, arch: &str, diff_ids: &[Digest]) -> Descriptor {
    let ids: Vec<String> = diff_ids.iter().map(ToString::to_string).collect();
    let c = json!({
        "architecture": arch,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ids},
    });
    store
        .write_blob(MediaType::ImageConfig, &serde_json::to_vec(&c).unwrap())
        .unwrap()
}

/// A manifest for `arch` with `n` made-up layers (blobs stored), not yet in index.json.
fn manifest(store: &ContentStore, arch: &str, n: usize, salt: &str) -> ImageManifest {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for i in 0..n {
        let data = format!("layer {i} of {arch} {salt}");
        layers.push(
            store
                .write_blob(MediaType::ImageLayerGzip, data.as_bytes())
                .unwrap(),
        );
        diff_ids.push(sha256_digest(format!("diff {i} {salt}").as_bytes()));
    }
    let cfg = config(store, arch, &diff_ids);
    let m = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": layers,
    });
    serde_json::from_value(m).unwrap()
}

fn host_arch() -> String {
    Arch::default().to_string()
}

fn other_arch() -> &'static str {
    if host_arch() == "s390x" {
        "amd64"
    } else {
        "s390x"
    }
}

#[test]
fn create_initialises_a_layout_and_open_reads_it() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("layout");
    let store = ContentStore::create(&dir).unwrap();
    let marker: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(marker["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["manifests"], json!([]));
    assert!(dir.join("blobs/sha256").is_dir());
    assert_eq!(store.index().unwrap().manifests().len(), 0);

    // Adding an image, then create() again: nothing is reset.
    let m = manifest(&store, &host_arch(), 1, "a");
    store.add_image(&m, Some("v1")).unwrap();
    let again = ContentStore::create(&dir).unwrap();
    assert_eq!(again.index().unwrap().manifests().len(), 1);
    let opened = ContentStore::open(&dir).unwrap();
    assert_eq!(opened.resolve(Some("v1")).unwrap().manifest, m);
    assert!(ingest_is_empty(&dir));
    // No temporary files are left at the top either.
    let stray: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn a_directory_that_is_not_a_layout_is_refused_clearly() {
    let tmp = TempDir::new().unwrap();
    let e = ContentStore::open(tmp.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("is not an OCI image layout"), "{e}");
    assert!(
        e.to_string().contains(&tmp.path().display().to_string()),
        "{e}"
    );

    fs::write(tmp.path().join("oci-layout"), b"{}").unwrap();
    let e = ContentStore::open(tmp.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("oci-layout"), "{e}");

    let e = ContentStore::open(&tmp.path().join("missing")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");

    fs::write(
        tmp.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"2.0.0"}"#,
    )
    .unwrap();
    let e = ContentStore::open(tmp.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotImplemented, "{e}");
}

#[test]
fn writing_blobs_checks_the_expected_digest() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(tmp.path()).unwrap();
    let data = b"hello, layers".repeat(10_000);
    let expected = sha256_digest(&data);

    let mut w = store.writer().unwrap();
    for chunk in data.chunks(777) {
        w.write_all(chunk).unwrap();
    }
    assert_eq!(w.written(), data.len() as u64);
    let (digest, size) = w.commit(Some(&expected)).unwrap();
    assert_eq!(digest, expected);
    assert_eq!(size, data.len() as u64);
    assert_eq!(fs::read(blob_file(&store, &digest)).unwrap(), data);
    assert!(store.contains(&digest).unwrap());
    assert!(ingest_is_empty(tmp.path()));

    // The wrong digest: an error, nothing stored, no temporary file left.
    let other = b"other content".to_vec();
    let mut w = store.writer().unwrap();
    w.write_all(&other).unwrap();
    let e = w.commit(Some(&expected)).unwrap_err();
    match &e {
        Error::DigestMismatch {
            expected: exp,
            actual,
            ..
        } => {
            assert_eq!(*exp, expected.to_string());
            assert_eq!(*actual, sha256_digest(&other).to_string());
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(!store.contains(&sha256_digest(&other)).unwrap());
    assert_eq!(fs::read(blob_file(&store, &expected)).unwrap(), data);
    assert!(ingest_is_empty(tmp.path()));

    // Abandoned writers leave nothing either.
    let mut w = store.writer().unwrap();
    w.write_all(b"abandoned").unwrap();
    drop(w);
    assert!(ingest_is_empty(tmp.path()));
    assert!(!store.contains(&sha256_digest(b"abandoned")).unwrap());
}

#[test]
fn blobs_are_verified_while_they_stream() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(tmp.path()).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let desc = store.write_blob(MediaType::ImageLayer, &data).unwrap();

    let mut r = store.open_blob(&desc).unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
    assert!(r.is_verified());

    // One flipped byte: reading fails with a digest mismatch that callers can tell apart.
    let path = blob_file(&store, desc.digest());
    let mut corrupt = data.clone();
    corrupt[123_456] ^= 0x40;
    fs::write(&path, &corrupt).unwrap();
    let mut r = store.open_blob(&desc).unwrap();
    let mut got = Vec::new();
    let e = r.read_to_end(&mut got).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(
        got.len() < data.len(),
        "the bad last chunk is not handed out"
    );
    match error_from_io(e, "reading") {
        Error::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, desc.digest().to_string());
            assert_eq!(actual, sha256_digest(&corrupt).to_string());
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    // It keeps failing.
    assert!(r.read(&mut [0u8; 16]).is_err());

    // Truncated: refused at open (the size is known).
    fs::write(&path, &data[..1000]).unwrap();
    let e = store.open_blob(&desc).unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
    // Longer than described: refused too; never more than desc.size() bytes.
    let mut longer = data.clone();
    longer.extend_from_slice(b"trailing");
    fs::write(&path, &longer).unwrap();
    assert!(matches!(
        store.open_blob(&desc).unwrap_err(),
        Error::DigestMismatch { .. }
    ));

    // Truncated while being read.
    fs::write(&path, &data).unwrap();
    let mut r = store.open_blob(&desc).unwrap();
    let mut first = vec![0u8; 4096];
    r.read_exact(&mut first).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(10_000)
        .unwrap();
    let mut rest = Vec::new();
    let e = r.read_to_end(&mut rest).unwrap_err();
    assert!(matches!(
        error_from_io(e, "reading"),
        Error::DigestMismatch { .. }
    ));

    // An empty blob.
    let empty = store.write_blob(MediaType::ImageLayer, b"").unwrap();
    let mut r = store.open_blob(&empty).unwrap();
    assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0);
    assert!(r.is_verified());
}

#[test]
fn missing_blobs_and_images_are_not_found() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(tmp.path()).unwrap();
    let desc = Descriptor::new(MediaType::ImageLayer, 3, sha256_digest(b"abc"));
    let e = store.open_blob(&desc).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains(&desc.digest().to_string()), "{e}");

    let e = store.resolve(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = store.resolve(Some("latest")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = store
        .resolve(Some(sha256_digest(b"nope").as_ref()))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // A manifest whose layers are not in the store cannot be added.
    let mut m = manifest(&store, &host_arch(), 1, "x");
    let mut layers = m.layers().clone();
    layers.push(desc);
    m.set_layers(layers);
    let e = store.add_image(&m, Some("broken")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn read_json_refuses_oversized_blobs() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(tmp.path()).unwrap();
    let desc = Descriptor::new(
        MediaType::ImageConfig,
        rootfs::content::MAX_JSON_SIZE + 1,
        sha256_digest(b"big"),
    );
    let e = store.read_json::<serde_json::Value>(&desc).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let not_json = store
        .write_blob(MediaType::ImageConfig, b"not json")
        .unwrap();
    let e = store.read_json::<serde_json::Value>(&not_json).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

#[test]
fn images_resolve_by_tag_digest_or_as_the_only_one() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(tmp.path()).unwrap();
    let m1 = manifest(&store, &host_arch(), 3, "one");
    let d1 = store.add_image(&m1, Some("v1")).unwrap();
    assert_eq!(d1.media_type(), &MediaType::ImageManifest);
    assert_eq!(
        d1.platform().as_ref().map(|p| p.os().clone()),
        Some(Os::Linux)
    );

    // The only image.
    let img = store.resolve(None).unwrap();
    assert_eq!(img.manifest_digest, *d1.digest());
    assert_eq!(img.manifest, m1);
    assert_eq!(img.layers.len(), 3);
    for (i, l) in img.layers.iter().enumerate() {
        assert_eq!(l.blob, m1.layers()[i]);
        assert_eq!(l.diff.media_type(), &MediaType::ImageLayer);
        assert_eq!(
            l.diff.digest().to_string(),
            img.config.rootfs().diff_ids()[i]
        );
    }

    let m2 = manifest(&store, &host_arch(), 1, "two");
    let d2 = store.add_image(&m2, Some("v2")).unwrap();
    let e = store.resolve(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("\"v1\""), "{e}");
    assert_eq!(store.resolve(Some("v1")).unwrap().manifest, m1);
    assert_eq!(store.resolve(Some("v2")).unwrap().manifest, m2);
    assert_eq!(
        store.resolve(Some(d2.digest().as_ref())).unwrap().manifest,
        m2
    );

    // Moving a tag: v1 now names m2; m1 is no longer listed.
    store.add_image(&m2, Some("v1")).unwrap();
    assert_eq!(store.resolve(Some("v1")).unwrap().manifest, m2);
    assert_eq!(store.index().unwrap().manifests().len(), 2);
    // m1 can still be resolved by digest (its blob is there).
    assert_eq!(
        store.resolve(Some(d1.digest().as_ref())).unwrap().manifest,
        m1
    );
}

#[test]
fn layer_and_diff_id_counts_must_agree() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(tmp.path()).unwrap();
    let mut m = manifest(&store, &host_arch(), 2, "c");
    let cfg = config(&store, &host_arch(), &[sha256_digest(b"only one")]);
    m.set_config(cfg);
    store.add_image(&m, Some("bad")).unwrap();
    let e = store.resolve(Some("bad")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("2 layers"), "{e}");
}

#[test]
fn nested_indexes_lead_to_the_host_platform() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(tmp.path()).unwrap();
    let host = manifest(&store, &host_arch(), 2, "host");
    let other = manifest(&store, other_arch(), 2, "other");
    let desc_of = |m: &ImageManifest, arch: &str| {
        let d = store
            .write_blob(MediaType::ImageManifest, &serde_json::to_vec(m).unwrap())
            .unwrap();
        let mut v = serde_json::to_value(&d).unwrap();
        v["platform"] = json!({"os": "linux", "architecture": arch});
        v
    };
    let inner = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [desc_of(&other, other_arch()), desc_of(&host, &host_arch())],
    });
    let inner = store
        .write_blob(MediaType::ImageIndex, &serde_json::to_vec(&inner).unwrap())
        .unwrap();
    // An index of that index, listed in index.json under a tag.
    let outer = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [inner],
    });
    let outer = store
        .write_blob(MediaType::ImageIndex, &serde_json::to_vec(&outer).unwrap())
        .unwrap();
    let mut top = serde_json::to_value(&outer).unwrap();
    top["annotations"] = json!({"org.opencontainers.image.ref.name": "multi"});
    let index = json!({"schemaVersion": 2, "manifests": [top]});
    fs::write(
        tmp.path().join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();

    let img = store.resolve(Some("multi")).unwrap();
    assert_eq!(img.manifest, host);
    assert_eq!(img.config.architecture().to_string(), host_arch());
    assert_eq!(store.resolve(None).unwrap().manifest, host);
    assert_eq!(
        store
            .resolve(Some(outer.digest().as_ref()))
            .unwrap()
            .manifest,
        host
    );

    // An index without the host platform.
    let only_other = json!({
        "schemaVersion": 2,
        "manifests": [desc_of(&other, other_arch())],
    });
    let only_other = store
        .write_blob(
            MediaType::ImageIndex,
            &serde_json::to_vec(&only_other).unwrap(),
        )
        .unwrap();
    let e = store
        .resolve(Some(only_other.digest().as_ref()))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains(&host_arch()), "{e}");
}

#[test]
fn docker_manifest_lists_are_followed() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(tmp.path()).unwrap();
    let host = manifest(&store, &host_arch(), 1, "docker");
    let mut v = serde_json::to_value(&host).unwrap();
    v["mediaType"] = json!("application/vnd.docker.distribution.manifest.v2+json");
    let m = store
        .write_blob(
            MediaType::Other("application/vnd.docker.distribution.manifest.v2+json".into()),
            &serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
    let mut md = serde_json::to_value(&m).unwrap();
    md["platform"] = json!({"os": "linux", "architecture": host_arch()});
    let list = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [md],
    });
    let list = store
        .write_blob(
            MediaType::Other("application/vnd.docker.distribution.manifest.list.v2+json".into()),
            &serde_json::to_vec(&list).unwrap(),
        )
        .unwrap();
    let mut top = serde_json::to_value(&list).unwrap();
    top["annotations"] = json!({"org.opencontainers.image.ref.name": "d"});
    fs::write(
        tmp.path().join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top]})).unwrap(),
    )
    .unwrap();
    let img = store.resolve(Some("d")).unwrap();
    assert_eq!(img.manifest_digest, *m.digest());
    assert_eq!(img.layers.len(), 1);
}

#[test]
fn concurrent_add_image_keeps_every_entry() {
    let tmp = TempDir::new().unwrap();
    let store = ContentStore::create(tmp.path()).unwrap();
    let manifests: Vec<ImageManifest> = (0..8)
        .map(|i| manifest(&store, &host_arch(), 1, &format!("c{i}")))
        .collect();
    std::thread::scope(|s| {
        for (i, m) in manifests.iter().enumerate() {
            let store = ContentStore::open(tmp.path()).unwrap();
            s.spawn(move || store.add_image(m, Some(&format!("t{i}"))).unwrap());
        }
    });
    assert_eq!(store.index().unwrap().manifests().len(), 8);
    for (i, m) in manifests.iter().enumerate() {
        assert_eq!(store.resolve(Some(&format!("t{i}"))).unwrap().manifest, *m);
    }
}
