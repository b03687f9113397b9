//! The registry client against a real registry (Debian's `docker-registry`), directly and
//! through the fault proxy: manifests, range reads, merging, registries that ignore `Range`,
//! outages, redirects, token and basic auth, mirrors.
//!
//! Run with `cargo test -p rootfs --features testing --test registry`.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use oci_spec::image::{Digest, ImageManifest, MediaType};
use rootfs::Error;
use rootfs::content::{ContentStore, error_from_io};
use rootfs::registry::{HostOptions, Reference, Registry, RegistryOptions};
use rootfs::testing::{FaultProxy, Mode, ProxyAuth, TestRegistry};
use serde_json::json;
use snapshot_core::ErrorKind;
use snapshot_core::identity::sha256_digest;
use tempfile::TempDir;

const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

/// A pushed test image: its layer's bytes and digest, its manifest digest.
struct Image {
    _dir: TempDir,
    layout: PathBuf,
    layer: Vec<u8>,
    layer_digest: Digest,
    manifest_digest: Digest,
}

/// Deterministic bytes that do not compress.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An OCI layout with one uncompressed-gzip layer (~600 KiB of noise in a tar) whose
/// descriptor carries a stargz TOC annotation, tagged `v1`.
fn build_image() -> Image {
    let dir = TempDir::new().unwrap();
    let layout = dir.path().join("layout");
    let store = ContentStore::create(&layout).unwrap();
    let data = noise(600 << 10, 7);
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "data.bin", data.as_slice())
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let diff_id = sha256_digest(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(&tar).unwrap();
    let layer = gz.finish().unwrap();
    let layer_desc = store.write_blob(MediaType::ImageLayerGzip, &layer).unwrap();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
    });
    let config_desc = store
        .write_blob(
            MediaType::ImageConfig,
            &serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
    let mut layer_json = serde_json::to_value(&layer_desc).unwrap();
    layer_json["annotations"] = json!({TOC_ANNOTATION: sha256_digest(b"toc").to_string()});
    let manifest: ImageManifest = serde_json::from_value(json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_json],
    }))
    .unwrap();
    let desc = store.add_image(&manifest, Some("v1")).unwrap();
    Image {
        layer_digest: layer_desc.digest().clone(),
        manifest_digest: desc.digest().clone(),
        layer,
        layout,
        _dir: dir,
    }
}

/// A registry with the test image pushed as `test/app:v1`.
fn registry_with_image() -> (TestRegistry, Image) {
    let reg = TestRegistry::start().unwrap();
    let img = build_image();
    reg.push(&img.layout, "v1", "test/app:v1").unwrap();
    (reg, img)
}

/// Options with plain HTTP for `hosts`, few fast retries and an empty docker config.
fn opts(hosts: &[&str], config: &Path) -> RegistryOptions {
    let mut o = RegistryOptions {
        docker_config: Some(config.to_path_buf()),
        retries: 1,
        timeout_secs: 10,
        ..Default::default()
    };
    for h in hosts {
        o.hosts.insert(
            h.to_string(),
            HostOptions {
                plain_http: true,
                ..Default::default()
            },
        );
    }
    o
}

fn docker_config(dir: &Path, entries: &[(&str, &str, &str)]) -> PathBuf {
    let mut auths = serde_json::Map::new();
    for (host, user, pass) in entries {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        auths.insert(host.to_string(), json!({"auth": auth}));
    }
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec(&json!({"auths": auths})).unwrap()).unwrap();
    path
}

fn reference(host: &str) -> Reference {
    Reference::parse(&format!("{host}/test/app:v1")).unwrap()
}

#[test]
fn manifests_by_tag_and_by_digest_keep_their_annotations() {
    let (reg, img) = registry_with_image();
    let tmp = TempDir::new().unwrap();
    let client = Registry::new(opts(&[&reg.host()], &docker_config(tmp.path(), &[]))).unwrap();
    let r = reference(&reg.host());
    let m = client.manifest(&r).unwrap();
    assert_eq!(
        m.digest, img.manifest_digest,
        "skopeo must preserve digests"
    );
    assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");
    assert!(!m.is_index());
    let parsed: ImageManifest = serde_json::from_slice(&m.bytes).unwrap();
    let layer = &parsed.layers()[0];
    assert_eq!(*layer.digest(), img.layer_digest);
    assert!(
        layer
            .annotations()
            .as_ref()
            .is_some_and(|a| a.contains_key(TOC_ANNOTATION)),
        "layer annotations must survive the push: {layer:?}"
    );

    let by_digest = client
        .manifest(&r.with_digest(img.manifest_digest.clone()))
        .unwrap();
    assert_eq!(by_digest, m);

    let missing_tag = Reference::parse(&format!("{}/test/app:nope", reg.host())).unwrap();
    let e = client.manifest(&missing_tag).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let missing_repo = Reference::parse(&format!("{}/test/other:v1", reg.host())).unwrap();
    assert_eq!(
        client.manifest(&missing_repo).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let e = client
        .manifest(&r.with_digest(sha256_digest(b"not a manifest")))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn range_reads_return_the_blob_bytes_and_merge_near_ranges() {
    let (reg, img) = registry_with_image();
    let tmp = TempDir::new().unwrap();
    let client = Registry::new(opts(&[&reg.host()], &docker_config(tmp.path(), &[]))).unwrap();
    let r = reference(&reg.host());
    let size = img.layer.len() as u64;
    let blob = client.blob(&r, &img.layer_digest, Some(size)).unwrap();
    assert_eq!(blob.size(), size);
    assert!(!blob.is_spooled(), "docker-registry honours Range");
    blob.check().unwrap();

    for (off, len) in [
        (0u64, 1usize),
        (0, 512),
        (1000, 4096),
        (size - 51, 51),
        (size - 1, 1),
    ] {
        let mut buf = vec![0; len];
        blob.read_at(off, &mut buf).unwrap();
        assert_eq!(
            buf,
            img.layer[off as usize..off as usize + len],
            "at {off}+{len}"
        );
    }
    let mut buf = vec![0; 10];
    let e = blob.read_at(size - 5, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");

    // Ten small reads within 64 KiB: one request merged, ten separately.
    let ranges: Vec<(u64, u64)> = (0..10).map(|i| (10_000 + i * 3000, 500)).collect();
    let before = client.stats();
    let parts = blob.read_ranges(&ranges).unwrap();
    let merged = client.stats().requests - before.requests;
    for (&(off, len), part) in ranges.iter().zip(&parts) {
        assert_eq!(part[..], img.layer[off as usize..(off + len) as usize]);
    }
    let before = client.stats();
    for &(off, len) in &ranges {
        let mut b = vec![0; len as usize];
        blob.read_at(off, &mut b).unwrap();
    }
    let separate = client.stats().requests - before.requests;
    assert_eq!(merged, 1, "near ranges must be merged into one request");
    assert_eq!(separate, 10);

    // Far-apart ranges (in parallel), out of order, with an empty one.
    let ranges = [(size - 100, 100), (0, 100), (300_000, 0), (200_000, 7)];
    let before = client.stats();
    let parts = blob.read_ranges(&ranges).unwrap();
    for (&(off, len), part) in ranges.iter().zip(&parts) {
        assert_eq!(part[..], img.layer[off as usize..(off + len) as usize]);
    }
    assert_eq!(client.stats().requests - before.requests, 3);
    assert!(client.stats().bytes_received > 0);

    // Whole-blob streams are verified.
    let mut all = Vec::new();
    client
        .fetch_blob(&r, &img.layer_digest)
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all, img.layer);

    // Wrong size and missing blobs.
    let e = client
        .blob(&r, &img.layer_digest, Some(size + 1))
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    let absent = sha256_digest(b"absent");
    assert_eq!(
        client.blob(&r, &absent, None).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        client.fetch_blob(&r, &absent).err().unwrap().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn a_blob_opened_with_its_tail_reads_its_end_without_more_requests() {
    let (reg, img) = registry_with_image();
    let tmp = TempDir::new().unwrap();
    let client = Registry::new(opts(&[&reg.host()], &docker_config(tmp.path(), &[]))).unwrap();
    let r = reference(&reg.host());
    let size = img.layer.len() as u64;
    let tail = 1000u64.min(size);
    let before = client.stats();
    let blob = client
        .blob_with_tail(&r, &img.layer_digest, Some(size), tail)
        .unwrap();
    assert_eq!(blob.size(), size);
    assert_eq!(client.stats().requests - before.requests, 1, "one probe");
    let before = client.stats();
    for (off, len) in [(size - tail, tail as usize), (size - 51, 51), (size - 1, 1)] {
        let mut buf = vec![0; len];
        blob.read_at(off, &mut buf).unwrap();
        assert_eq!(buf, img.layer[off as usize..], "at {off}+{len}");
    }
    assert_eq!(
        client.stats().requests,
        before.requests,
        "served from the tail"
    );
    // Before the tail: a range request.
    let mut buf = vec![0; 10];
    blob.read_at(size - tail - 5, &mut buf).unwrap();
    assert_eq!(
        buf,
        img.layer[(size - tail - 5) as usize..(size - tail + 5) as usize]
    );
    assert_eq!(client.stats().requests, before.requests + 1);
    // A server without suffix ranges: the blob opens with a one-byte probe instead.
    let proxy = FaultProxy::start(reg.addr()).unwrap();
    proxy.set_mode(Mode::NoSuffixRange);
    let via = Registry::new(opts(&[&proxy.host()], &docker_config(tmp.path(), &[]))).unwrap();
    let rp = reference(&proxy.host());
    let b = via
        .blob_with_tail(&rp, &img.layer_digest, Some(size), tail)
        .unwrap();
    assert!(!b.is_spooled());
    let mut end = vec![0; 51];
    b.read_at(size - 51, &mut end).unwrap();
    assert_eq!(end, img.layer[(size - 51) as usize..]);
    assert_eq!(proxy.requests(), 3, "suffix probe, one-byte probe, read");
    // A tail larger than the blob is the whole blob.
    let whole = client
        .blob_with_tail(&r, &img.layer_digest, None, size + 10)
        .unwrap();
    let mut all = vec![0; size as usize];
    whole.read_at(0, &mut all).unwrap();
    assert_eq!(all, img.layer);
}

#[test]
fn a_registry_ignoring_range_is_read_from_one_download() {
    let (reg, img) = registry_with_image();
    let proxy = FaultProxy::start(reg.addr()).unwrap();
    proxy.set_mode(Mode::StripRange);
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let mut o = opts(&[&proxy.host()], &docker_config(tmp.path(), &[]));
    o.spool_dir = Some(spool.clone());
    let client = Registry::new(o).unwrap();
    let r = reference(&proxy.host());
    let size = img.layer.len() as u64;
    let blob = client.blob(&r, &img.layer_digest, Some(size)).unwrap();
    assert!(blob.is_spooled());
    assert_eq!(blob.size(), size);
    // Unlinked: nothing visible in the spool directory.
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    let after_open = proxy.body_bytes();
    assert_eq!(after_open, size, "the probe downloads the blob once");

    let mut buf = vec![0; 4096];
    blob.read_at(12_345, &mut buf).unwrap();
    assert_eq!(buf, img.layer[12_345..12_345 + 4096]);
    let parts = blob.read_ranges(&[(0, 10), (size - 10, 10)]).unwrap();
    assert_eq!(parts[0], img.layer[..10]);
    assert_eq!(parts[1], img.layer[size as usize - 10..]);
    blob.check().unwrap();
    assert_eq!(
        proxy.body_bytes(),
        after_open,
        "reads are served from the spool"
    );

    // A corrupted whole-blob answer is refused at open.
    proxy.set_mode(Mode::StripRange);
    let flipping = FaultProxy::start(proxy.addr()).unwrap();
    flipping.set_mode(Mode::FlipBytes(1000..1001));
    let client2 =
        Registry::new(opts(&[&flipping.host()], &docker_config(tmp.path(), &[]))).unwrap();
    let e = client2
        .blob(&reference(&flipping.host()), &img.layer_digest, None)
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
}

#[test]
fn corrupted_streams_fail_verification() {
    let (reg, img) = registry_with_image();
    let proxy = FaultProxy::start(reg.addr()).unwrap();
    proxy.set_mode(Mode::FlipBytes(0..u64::MAX));
    let tmp = TempDir::new().unwrap();
    let client = Registry::new(opts(&[&proxy.host()], &docker_config(tmp.path(), &[]))).unwrap();
    let r = reference(&proxy.host());
    let mut all = Vec::new();
    let e = client
        .fetch_blob(&r, &img.layer_digest)
        .unwrap()
        .read_to_end(&mut all)
        .unwrap_err();
    let e = error_from_io(e, "read");
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");

    // Range reads return what was served (verification is the caller's, per chunk); the proxy
    // flips exactly the configured blob positions.
    proxy.set_mode(Mode::FlipBytes(100..102));
    let blob = client.blob(&r, &img.layer_digest, None).unwrap();
    let mut buf = vec![0; 8];
    blob.read_at(98, &mut buf).unwrap();
    let want: Vec<u8> = img.layer[98..106]
        .iter()
        .enumerate()
        .map(|(i, b)| if i == 2 || i == 3 { b ^ 0xff } else { *b })
        .collect();
    assert_eq!(buf, want);
}

#[test]
fn a_stopped_registry_is_unavailable_and_recovers_on_restart() {
    let (mut reg, img) = registry_with_image();
    let tmp = TempDir::new().unwrap();
    let client = Registry::new(opts(&[&reg.host()], &docker_config(tmp.path(), &[]))).unwrap();
    let r = reference(&reg.host());
    let blob = client.blob(&r, &img.layer_digest, None).unwrap();
    blob.check().unwrap();

    reg.stop();
    let started = Instant::now();
    let e = blob.check().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let mut buf = vec![0; 16];
    let e = blob.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded retries"
    );

    reg.restart().unwrap();
    blob.check().unwrap();
    blob.read_at(100, &mut buf).unwrap();
    assert_eq!(buf, img.layer[100..116]);
}

#[test]
fn a_proxy_that_is_down_or_slow() {
    let (reg, img) = registry_with_image();
    let proxy = FaultProxy::start(reg.addr()).unwrap();
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&[&proxy.host()], &docker_config(tmp.path(), &[]));
    o.timeout_secs = 1;
    o.retries = 0;
    let client = Registry::new(o).unwrap();
    let r = reference(&proxy.host());
    let blob = client.blob(&r, &img.layer_digest, None).unwrap();

    proxy.set_mode(Mode::Down);
    assert_eq!(blob.check().unwrap_err().kind(), ErrorKind::Unavailable);

    proxy.set_mode(Mode::Delay(Duration::from_millis(300)));
    let t = Instant::now();
    let mut buf = vec![0; 32];
    blob.read_at(0, &mut buf).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(buf, img.layer[..32]);

    proxy.set_mode(Mode::Delay(Duration::from_secs(3)));
    let t = Instant::now();
    let e = blob.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the timeout bounds the wait"
    );

    proxy.set_mode(Mode::Pass);
    blob.check().unwrap();
}

#[test]
fn bearer_tokens_are_fetched_cached_and_not_sent_to_redirect_targets() {
    let (reg, img) = registry_with_image();
    // client -> front (token auth, redirects blobs to `back`) ; back -> registry.
    let back = FaultProxy::start(reg.addr()).unwrap();
    let front = FaultProxy::start(back.addr()).unwrap();
    front.set_auth(ProxyAuth::Bearer {
        token: "t0ken".into(),
        credentials: Some(("alice".into(), "pw".into())),
    });
    let tmp = TempDir::new().unwrap();
    let config = docker_config(tmp.path(), &[(&front.host(), "alice", "pw")]);
    let client = Registry::new(opts(&[&front.host()], &config)).unwrap();
    let r = reference(&front.host());

    let m = client.manifest(&r).unwrap();
    assert_eq!(m.digest, img.manifest_digest);
    assert_eq!(front.token_requests(), 1);
    client.manifest(&r).unwrap();
    assert_eq!(front.token_requests(), 1, "the token is cached");

    front.set_redirect_blobs(true);
    let blob = client.blob(&r, &img.layer_digest, None).unwrap();
    let mut buf = vec![0; 64];
    blob.read_at(500, &mut buf).unwrap();
    assert_eq!(buf, img.layer[500..564]);
    assert!(
        back.requests() >= 2,
        "blob requests were redirected to the back proxy"
    );
    assert_eq!(
        back.requests_with_authorization(),
        0,
        "Authorization must not follow a redirect to another host"
    );
    assert!(front.requests_with_authorization() >= 2);

    // Without credentials the token endpoint refuses: a permission error.
    let empty = TempDir::new().unwrap();
    let anon = Registry::new(opts(&[&front.host()], &docker_config(empty.path(), &[]))).unwrap();
    let e = anon.manifest(&r).unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
}

#[test]
fn basic_auth_against_a_registry_with_htpasswd() {
    let reg = TestRegistry::start_with_basic_auth("bob", "s3cret").unwrap();
    let img = build_image();
    reg.push(&img.layout, "v1", "test/app:v1").unwrap();
    let tmp = TempDir::new().unwrap();
    let config = docker_config(tmp.path(), &[(&reg.host(), "bob", "s3cret")]);
    let client = Registry::new(opts(&[&reg.host()], &config)).unwrap();
    let r = reference(&reg.host());
    assert_eq!(client.manifest(&r).unwrap().digest, img.manifest_digest);
    let blob = client.blob(&r, &img.layer_digest, None).unwrap();
    let mut buf = vec![0; 10];
    blob.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, img.layer[..10]);

    // HTTPS against a plain-HTTP registry: a clear, unretried error.
    let mut o = opts(&[], &config);
    o.retries = 3; // retried, it would take at least 100 + 200 + 400 ms
    let tls = Registry::new(o).unwrap();
    let t = Instant::now();
    let e = tls.manifest(&r).unwrap_err();
    assert!(e.to_string().contains("plain_http"), "{e}");
    assert!(t.elapsed() < Duration::from_millis(600), "not retried");

    let empty = TempDir::new().unwrap();
    let anon = Registry::new(opts(&[&reg.host()], &docker_config(empty.path(), &[]))).unwrap();
    let e = anon.manifest(&r).unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    let wrong = TempDir::new().unwrap();
    let bad = Registry::new(opts(
        &[&reg.host()],
        &docker_config(wrong.path(), &[(&reg.host(), "bob", "wrong")]),
    ))
    .unwrap();
    let e = bad.manifest(&r).unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
}

#[test]
fn mirrors_are_tried_in_order_before_the_host() {
    let (reg, img) = registry_with_image();
    let dead = FaultProxy::start(reg.addr()).unwrap();
    dead.set_mode(Mode::Down);
    let tmp = TempDir::new().unwrap();
    let mut o = opts(
        &[&dead.host(), &reg.host()],
        &docker_config(tmp.path(), &[]),
    );
    o.retries = 0;
    o.hosts.insert(
        "registry.invalid".into(),
        HostOptions {
            plain_http: true,
            mirrors: vec![dead.host(), reg.host()],
            ..Default::default()
        },
    );
    let client = Registry::new(o).unwrap();
    let r = Reference::parse("registry.invalid/test/app:v1").unwrap();
    let m = client.manifest(&r).unwrap();
    assert_eq!(m.digest, img.manifest_digest);
    assert!(
        dead.requests() == 0,
        "a down proxy closes before reading requests"
    );

    // Not found on every mirror and on the (unresolvable) host: an error, not a hang.
    let missing = Reference::parse("registry.invalid/test/app:nope").unwrap();
    assert!(client.manifest(&missing).is_err());
}

#[test]
fn transient_errors_are_retried_and_in_flight_requests_bounded() {
    let (reg, img) = registry_with_image();
    let proxy = FaultProxy::start(reg.addr()).unwrap();
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&[&proxy.host()], &docker_config(tmp.path(), &[]));
    o.retries = 3;
    o.max_in_flight = 1;
    let client = Registry::new(o).unwrap();
    let r = reference(&proxy.host());

    // Two 503s, then success: three requests, no error.
    proxy.fail_next(2, 503);
    proxy.reset_counters();
    assert_eq!(client.manifest(&r).unwrap().digest, img.manifest_digest);
    assert_eq!(proxy.requests(), 3);

    // Always 500: retries exhausted, Unavailable, 1 + retries requests.
    proxy.set_mode(Mode::Status(500));
    proxy.reset_counters();
    let e = client.manifest(&r).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(proxy.requests(), 4);
    // A 400 is not retried.
    proxy.set_mode(Mode::Status(400));
    proxy.reset_counters();
    assert!(client.manifest(&r).is_err());
    assert_eq!(proxy.requests(), 1);

    // One request in flight at a time: four parallel reads of a slow proxy take four delays.
    proxy.set_mode(Mode::Pass);
    let blob = client.blob(&r, &img.layer_digest, None).unwrap();
    proxy.set_mode(Mode::Delay(Duration::from_millis(200)));
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let blob = blob.clone();
            let layer = &img.layer;
            s.spawn(move || {
                let mut b = vec![0; 100];
                blob.read_at(i * 100_000, &mut b).unwrap();
                assert_eq!(
                    b,
                    layer[(i * 100_000) as usize..(i * 100_000 + 100) as usize]
                );
            });
        }
    });
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "requests ran concurrently beyond max_in_flight: {:?}",
        t.elapsed()
    );
}

#[test]
fn clients_and_blobs_are_send_and_sync() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Registry>();
    check::<rootfs::registry::Blob>();
}

#[test]
fn whole_blob_streams_resume_after_lost_connections() {
    let (reg, img) = registry_with_image();
    let proxy = FaultProxy::start(reg.addr()).unwrap();
    let tmp = TempDir::new().unwrap();
    let client = Registry::new(opts(&[&proxy.host()], &docker_config(tmp.path(), &[]))).unwrap();
    let r = reference(&proxy.host());
    proxy.set_mode(Mode::CutAfter(250_000));
    let mut all = Vec::new();
    client
        .fetch_blob(&r, &img.layer_digest)
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all, img.layer);
    assert_eq!(proxy.requests(), 3, "two resumes with Range");

    // No progress at all: the stream fails after the retries.
    proxy.set_mode(Mode::CutAfter(0));
    let mut stream = client.fetch_blob(&r, &img.layer_digest).unwrap();
    assert!(stream.read_to_end(&mut Vec::new()).is_err());
}

#[test]
fn https_registries_need_a_valid_certificate_or_insecure_skip_verify() {
    let reg = TestRegistry::start_tls().unwrap();
    let img = build_image();
    reg.push(&img.layout, "v1", "test/app:v1").unwrap();
    let tmp = TempDir::new().unwrap();
    let config = docker_config(tmp.path(), &[]);
    let r = reference(&reg.host());

    let mut o = opts(&[], &config);
    o.retries = 0;
    let strict = Registry::new(o.clone()).unwrap();
    let e = strict.manifest(&r).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let text = e.to_string().to_lowercase();
    assert!(text.contains("cert") || text.contains("tls"), "{e}");

    o.hosts.insert(
        reg.host(),
        HostOptions {
            insecure_skip_verify: true,
            ..Default::default()
        },
    );
    let lax = Registry::new(o).unwrap();
    assert_eq!(lax.manifest(&r).unwrap().digest, img.manifest_digest);
    let blob = lax.blob(&r, &img.layer_digest, None).unwrap();
    let mut buf = vec![0; 100];
    blob.read_at(1000, &mut buf).unwrap();
    assert_eq!(buf, img.layer[1000..1100]);

    // Plain HTTP against a TLS server fails too, clearly.
    let plain = Registry::new(opts(&[&reg.host()], &config)).unwrap();
    assert!(plain.manifest(&r).is_err());
}
