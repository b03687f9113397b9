//! Tests with real parts: a real `docker-registry` on 127.0.0.1 (rootfs's `TestRegistry`),
//! eStargz layers made by `rootfs::estargz::convert_layer`, real FUSE mounts, and a
//! fault-injecting proxy (`FaultProxy`) for corrupted, slow and missing registries. They need
//! root, `/dev/fuse` and Debian's `docker-registry`; without them they fail saying so.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::TcpStream,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use fs_plugin_api::{Plugin, model::ErrorKind, status::LayerStatus};
use rootfs::{
    estargz::{WriterOptions, convert_layer},
    registry::HostOptions,
    testing::{FaultProxy, Mode, TestRegistry},
};
use sha2::{Digest as _, Sha256};

use crate::{HttpFs, Options, labels::*, sys};

const REPO: &str = "strata/layers";

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// One HTTP/1.1 exchange (`Connection: close`): status, headers (lower-case names), body.
fn http(
    host: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, BTreeMap<String, String>, Vec<u8>) {
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\
         Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, raw[end + 4..].to_vec())
}

/// Uploads `blob` into repository [`REPO`] of the registry at `host`; returns its digest.
fn push_blob(host: &str, blob: &[u8]) -> String {
    let digest = sha256(blob);
    let (status, headers, body) = http(host, "POST", &format!("/v2/{REPO}/blobs/uploads/"), b"");
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let location = &headers["location"];
    let path = match location.find("/v2/") {
        Some(i) => &location[i..],
        None => location.as_str(),
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let (status, _, body) = http(host, "PUT", &format!("{path}{sep}digest={digest}"), blob);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    digest
}

/// One tar entry of a test layer.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, (u64, u64), Vec<u8>),
    FileX(&'a str, Vec<u8>, &'a [(&'a str, &'a [u8])]),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str, u32, u32),
    Fifo(&'a str),
}

fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body_len = 1 + k.len() + 1 + v.len() + 1;
        let mut len = body_len + 1;
        while len != body_len + len.to_string().len() {
            len = body_len + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        let (path, data): (&str, &[u8]) = match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                (p, &[])
            }
            E::File(p, mode, (uid, gid), data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(data.len() as u64);
                (p, data)
            }
            E::FileX(p, data, xattrs) => {
                let records: Vec<(String, &[u8])> = xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                    .collect();
                let records: Vec<(&str, &[u8])> =
                    records.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                let ext = pax(&records);
                let mut ph = tar::Header::new_ustar();
                ph.set_entry_type(tar::EntryType::XHeader);
                ph.set_path("PaxHeaders/x").unwrap();
                ph.set_size(ext.len() as u64);
                ph.set_mode(0o644);
                ph.set_cksum();
                b.append(&ph, ext.as_slice()).unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                (p, data)
            }
            E::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(target).unwrap();
                (p, &[])
            }
            E::Hardlink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_link_name(target).unwrap();
                (p, &[])
            }
            E::Char(p, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                (p, &[])
            }
            E::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o600);
                (p, &[])
            }
        };
        h.set_path(path).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Pseudo-random bytes (compress badly, so chunks have real sizes).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A layer with every kind of entry, big files in several 64 KiB chunks.
fn rich_layer() -> Vec<u8> {
    tar_of(&[
        E::Dir("etc", 0o755),
        E::File(
            "etc/hosts",
            0o644,
            (0, 0),
            b"127.0.0.1 localhost\n".to_vec(),
        ),
        E::Dir("bin", 0o755),
        E::File("bin/tool", 0o4755, (1000, 100), noise(5000, 1)),
        E::Hardlink("bin/tool2", "bin/tool"),
        E::File("big.bin", 0o600, (0, 0), noise(300_000, 2)),
        E::File("empty", 0o644, (0, 0), Vec::new()),
        E::Symlink("link", "etc/hosts"),
        E::Dir("dev", 0o755),
        E::Char("dev/null", 1, 3),
        E::Fifo("fifo"),
        E::FileX("x.txt", b"with xattrs\n".to_vec(), &[("user.note", b"hi")]),
        E::File(".wh.gone", 0o644, (0, 0), Vec::new()),
        E::Dir("opq", 0o755),
        E::File("opq/.wh..wh..opq", 0o644, (0, 0), Vec::new()),
        E::File("opq/kept", 0o644, (0, 0), b"kept\n".to_vec()),
    ])
}

/// An eStargz layer pushed to a registry: its labels, blob and TOC digest.
struct Pushed {
    blob: Vec<u8>,
    digest: String,
    toc_digest: String,
}

fn push_estargz(host: &str, tar: &[u8]) -> Pushed {
    let mut blob = Vec::new();
    let opts = WriterOptions {
        chunk_size: 64 << 10,
        ..Default::default()
    };
    let converted = convert_layer(tar, &mut blob, &opts).unwrap();
    let digest = push_blob(host, &blob);
    assert_eq!(digest, converted.digest.to_string());
    Pushed {
        blob,
        digest,
        toc_digest: converted.toc_digest.to_string(),
    }
}

fn stargz_labels(
    host: &str,
    digest: &str,
    toc_digest: Option<&str>,
) -> fs_plugin_api::model::Labels {
    let mut l = fs_plugin_api::model::Labels::new();
    l.insert(
        LABEL_STARGZ_REFERENCE.into(),
        format!("{host}/{REPO}:latest"),
    );
    l.insert(LABEL_STARGZ_DIGEST.into(), digest.into());
    if let Some(t) = toc_digest {
        l.insert(LABEL_TOC_DIGEST.into(), t.into());
    }
    l
}

impl Pushed {
    fn labels(&self, host: &str) -> fs_plugin_api::model::Labels {
        stargz_labels(host, &self.digest, Some(&self.toc_digest))
    }
}

fn start_registry() -> TestRegistry {
    TestRegistry::start().unwrap_or_else(|e| {
        panic!("cannot start docker-registry ({e}); install Debian package docker-registry")
    })
}

/// The rich layer pushed to a new registry, reached through a fault proxy: the registry (keep
/// it alive), the proxy, the layer and the proxy's host.
fn proxied_rich_layer() -> (TestRegistry, FaultProxy, Pushed, String) {
    let registry = start_registry();
    let proxy = FaultProxy::start(registry.addr()).unwrap();
    let layer = push_estargz(&registry.host(), &rich_layer());
    let host = proxy.host();
    (registry, proxy, layer, host)
}

fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "these tests need /dev/fuse (FUSE) and root"
    );
}

/// A plugin talking plain HTTP to `hosts`, caching in `cache`.
fn plugin(cache: &Path, hosts: &[&str], tweak: impl FnOnce(&mut Options)) -> HttpFs {
    require_fuse();
    let mut o = Options {
        cache_dir: cache.to_path_buf(),
        prefetch_bytes: 0,
        background_fetch: false,
        resolve_timeout_secs: 20,
        ..Default::default()
    };
    for h in hosts {
        o.registry.hosts.insert(
            (*h).to_string(),
            HostOptions {
                plain_http: true,
                ..Default::default()
            },
        );
    }
    o.registry.timeout_secs = 5;
    o.registry.retries = 1;
    tweak(&mut o);
    HttpFs::new(o).unwrap()
}

/// `<scratch>/snapshots/1/fs`, created: the layout the overlay snapshotter gives a plugin.
fn mountpoint(scratch: &Path, name: &str) -> PathBuf {
    let mnt = scratch.join(name).join("fs");
    fs::create_dir_all(&mnt).unwrap();
    mnt
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

fn status_of(mnt: &Path) -> Option<LayerStatus> {
    fs_plugin_api::status::read_status(mnt)
}

#[test]
fn a_mounted_layer_reads_like_the_original() {
    let registry = start_registry();
    let host = registry.host();
    let layer = push_estargz(&host, &rich_layer());
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |_| {});
    let mnt = mountpoint(scratch.path(), "snap");
    fs_.mount(&mnt, &layer.labels(&host)).unwrap();
    assert!(sys::is_mount_point(&mnt));

    let st = status_of(&mnt).expect("status file at mount");
    assert_eq!(
        (st.plugin.as_str(), st.layer.as_str()),
        ("http", layer.digest.as_str())
    );
    assert_eq!(st.state, "lazy");
    assert_eq!(st.bytes_total, 20 + 5000 + 300_000 + 12 + 5);

    assert_eq!(
        fs::read(mnt.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(fs::read(mnt.join("big.bin")).unwrap(), noise(300_000, 2));
    assert_eq!(fs::read(mnt.join("bin/tool")).unwrap(), noise(5000, 1));
    assert_eq!(fs::read(mnt.join("empty")).unwrap(), b"");
    assert_eq!(fs::read(mnt.join("opq/kept")).unwrap(), b"kept\n");

    let tool = fs::metadata(mnt.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!((tool.uid(), tool.gid(), tool.nlink()), (1000, 100, 2));
    assert_eq!(tool.mtime(), 1_700_000_000);
    let tool2 = fs::metadata(mnt.join("bin/tool2")).unwrap();
    assert_eq!(tool.ino(), tool2.ino(), "hard links share an inode");
    assert_eq!(
        fs::metadata(mnt.join("big.bin")).unwrap().mode() & 0o7777,
        0o600
    );
    assert_eq!(
        fs::read_link(mnt.join("link")).unwrap(),
        PathBuf::from("etc/hosts")
    );
    let null = fs::symlink_metadata(mnt.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert!(
        fs::symlink_metadata(mnt.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(
        xattr(&mnt.join("x.txt"), "user.note").as_deref(),
        Some(&b"hi"[..])
    );
    assert_eq!(fs::read(mnt.join("x.txt")).unwrap(), b"with xattrs\n");
    // Whiteouts and opaque directories in overlay form.
    let gone = fs::symlink_metadata(mnt.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
    assert_eq!(
        xattr(&mnt.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    let mut names: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "big.bin", "bin", "dev", "empty", "etc", "fifo", "gone", "link", "opq", "x.txt"
        ]
    );
    assert!(!mnt.join(".wh.gone").exists());
    assert!(!mnt.join(".no.prefetch.landmark").exists());
    // Read-only.
    assert!(fs::write(mnt.join("new"), b"x").is_err());

    fs_.check(&mnt, &layer.labels(&host)).unwrap();
    // The status file follows (about once a second).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = status_of(&mnt).unwrap();
        if st.bytes_cached == st.bytes_total {
            assert_eq!(st.state, "complete");
            assert!(st.bytes_fetched > 0 && st.bytes_fetched <= layer.blob.len() as u64);
            assert_eq!(st.percent_cached, 100.0);
            break;
        }
        assert!(Instant::now() < deadline, "status never complete: {st:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    fs_.unmount(&mnt).unwrap();
    assert!(!sys::is_mount_point(&mnt));
    assert!(status_of(&mnt).is_none(), "status removed on unmount");
    let e = fs_.unmount(&mnt).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn a_corrupted_chunk_is_an_io_error_never_wrong_bytes() {
    let (_registry, proxy, layer, host) = proxied_rich_layer();
    let scratch = tempfile::tempdir().unwrap();
    let cache = scratch.path().join("cache");
    let fs_ = plugin(&cache, &[&host], |_| {});
    let mnt = mountpoint(scratch.path(), "snap");
    fs_.mount(&mnt, &layer.labels(&host)).unwrap();
    proxy.set_mode(Mode::FlipBytes(0..u64::MAX));
    for file in ["etc/hosts", "big.bin"] {
        let e = fs::read(mnt.join(file)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_eio()), "{file}: {e}");
    }
    assert_eq!(
        fs::read_dir(cache.join("chunks")).unwrap().count(),
        0,
        "nothing unverified is cached"
    );
    // Not sticky: the same reads succeed once the registry serves the right bytes.
    proxy.set_mode(Mode::Pass);
    assert_eq!(
        fs::read(mnt.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(fs::read(mnt.join("big.bin")).unwrap(), noise(300_000, 2));
    fs_.unmount(&mnt).unwrap();
}

fn libc_eio() -> i32 {
    nix::errno::Errno::EIO as i32
}

#[test]
fn unverifiable_or_wrongly_verified_layers_are_refused() {
    let registry = start_registry();
    let host = registry.host();
    let layer = push_estargz(&host, &rich_layer());
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |_| {});
    let mnt = mountpoint(scratch.path(), "snap");
    let wrong = sha256(b"not the toc");
    let e = fs_
        .mount(&mnt, &stargz_labels(&host, &layer.digest, Some(&wrong)))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("invalid stargz layer"), "{e}");
    assert!(!sys::is_mount_point(&mnt));
    let mut no_toc = stargz_labels(&host, &layer.digest, None);
    let e = fs_.mount(&mnt, &no_toc).unwrap_err();
    assert!(
        e.to_string().contains("digest of TOC JSON must be passed"),
        "{e}"
    );
    // skipverify is honoured only when the options allow it.
    no_toc.insert(LABEL_STARGZ_SKIP_VERIFY.into(), "true".into());
    assert!(fs_.mount(&mnt, &no_toc).is_err());
    assert!(!sys::is_mount_point(&mnt));
    let lax = plugin(&scratch.path().join("cache2"), &[&host], |o| {
        o.allow_no_verification = true
    });
    lax.mount(&mnt, &no_toc).unwrap();
    assert_eq!(
        fs::read(mnt.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    lax.unmount(&mnt).unwrap();
}

#[test]
fn a_layer_that_is_not_estargz_fails_fast_and_clearly() {
    let registry = start_registry();
    let proxy = FaultProxy::start(registry.addr()).unwrap();
    let plain = tar_of(&[E::File("a", 0o644, (0, 0), noise(100_000, 3))]);
    let digest = push_blob(&registry.host(), &plain);
    let host = proxy.host();
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |_| {});
    let mnt = mountpoint(scratch.path(), "snap");
    proxy.reset_counters();
    let start = Instant::now();
    let e = fs_
        .mount(&mnt, &stargz_labels(&host, &digest, Some(&sha256(b"x"))))
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("not an eStargz layer"), "{e}");
    // One request: the opening probe brings the blob's tail (at most 256 KiB) with the footer.
    assert_eq!(proxy.requests(), 1);
    assert!(
        proxy.body_bytes() <= (256 << 10) + 1024,
        "{} bytes",
        proxy.body_bytes()
    );
    assert!(!sys::is_mount_point(&mnt));
    // An unknown layer is NotFound.
    let e = fs_
        .mount(
            &mnt,
            &stargz_labels(&host, &sha256(b"nothing"), Some(&sha256(b"x"))),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn check_follows_the_registry_and_recovers() {
    let mut registry = start_registry();
    let host = registry.host();
    let layer = push_estargz(&host, &rich_layer());
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |o| {
        o.check_interval_secs = 0
    });
    let mnt = mountpoint(scratch.path(), "snap");
    let labels = layer.labels(&host);
    fs_.mount(&mnt, &labels).unwrap();
    fs_.check(&mnt, &labels).unwrap();
    registry.stop();
    let e = fs_.check(&mnt, &labels).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    // Reads of what is not cached fail cleanly meanwhile.
    let e = fs::read(mnt.join("big.bin")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_eio()), "{e}");
    registry.restart().unwrap();
    fs_.check(&mnt, &labels).unwrap();
    assert_eq!(fs::read(mnt.join("big.bin")).unwrap(), noise(300_000, 2));
    fs_.unmount(&mnt).unwrap();
    let e = fs_.check(&mnt, &labels).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}

#[test]
fn an_answer_within_the_check_interval_stands_for_a_check() {
    let (_registry, proxy, layer, host) = proxied_rich_layer();
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |o| {
        o.check_interval_secs = 2
    });
    let mnt = mountpoint(scratch.path(), "snap");
    let labels = layer.labels(&host);
    fs_.mount(&mnt, &labels).unwrap();
    // Mounting opened the blob just now: Checks pass without asking the registry, which is
    // gone (asking it would fail, as below).
    proxy.set_mode(Mode::Down);
    fs_.check(&mnt, &labels).unwrap();
    fs_.check(&mnt, &labels).unwrap();
    // Once the interval is over, Check asks the registry again: it is gone.
    std::thread::sleep(Duration::from_millis(2100));
    let e = fs_.check(&mnt, &labels).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    proxy.set_mode(Mode::Pass);
    fs_.check(&mnt, &labels).unwrap();
    fs_.unmount(&mnt).unwrap();
}

#[test]
fn unmount_with_a_read_waiting_for_a_slow_registry_is_bounded() {
    let (_registry, proxy, layer, host) = proxied_rich_layer();
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |o| {
        o.registry.timeout_secs = 60;
    });
    let mnt = mountpoint(scratch.path(), "snap");
    fs_.mount(&mnt, &layer.labels(&host)).unwrap();
    proxy.set_mode(Mode::Delay(Duration::from_secs(30)));
    let file = mnt.join("big.bin");
    let reader = std::thread::spawn(move || fs::read(file));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!reader.is_finished(), "the read waits for the registry");
    let start = Instant::now();
    fs_.unmount(&mnt).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert!(
        reader.join().unwrap().is_err(),
        "the read fails, returns nothing"
    );
    assert!(!sys::is_mount_point(&mnt));
    proxy.set_mode(Mode::Pass);
}

#[test]
fn background_fetch_makes_the_layer_local_and_the_cache_survives_a_restart() {
    let mut registry = start_registry();
    let host = registry.host();
    let layer = push_estargz(&host, &rich_layer());
    let scratch = tempfile::tempdir().unwrap();
    let cache = scratch.path().join("cache");
    let labels = layer.labels(&host);
    let mnt = mountpoint(scratch.path(), "snap");
    {
        let fs_ = plugin(&cache, &[&host], |o| o.background_fetch = true);
        fs_.mount(&mnt, &labels).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = status_of(&mnt).unwrap();
            if st.state == "complete" {
                assert!(st.bytes_fetched <= layer.blob.len() as u64, "{st:?}");
                break;
            }
            assert!(Instant::now() < deadline, "never complete: {st:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        fs_.unmount(&mnt).unwrap();
    }
    // A new plugin instance (a restart) with the registry gone: TOC and chunks come from disk.
    registry.stop();
    let fs_ = plugin(&cache, &[&host], |_| {});
    fs_.mount(&mnt, &labels).unwrap();
    fs_.check(&mnt, &labels).unwrap();
    assert_eq!(fs::read(mnt.join("big.bin")).unwrap(), noise(300_000, 2));
    assert_eq!(fs::read(mnt.join("bin/tool2")).unwrap(), noise(5000, 1));
    assert_eq!(status_of(&mnt).unwrap().state, "complete");
    fs_.unmount(&mnt).unwrap();
    // A tampered cached chunk is not served: it is dropped (and the registry is gone: EIO).
    let chunks: Vec<PathBuf> = fs::read_dir(cache.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for c in &chunks {
        let mut data = fs::read(c).unwrap();
        data[0] ^= 0xff;
        fs::write(c, data).unwrap();
    }
    let fs_ = plugin(&cache, &[&host], |_| {});
    fs_.mount(&mnt, &labels).unwrap();
    let e = fs::read(mnt.join("big.bin")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_eio()), "{e}");
    fs_.unmount(&mnt).unwrap();
}

#[test]
fn concurrent_readers_fetch_each_chunk_once() {
    let (_registry, proxy, layer, host) = proxied_rich_layer();
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |_| {});
    let mnt = mountpoint(scratch.path(), "snap");
    fs_.mount(&mnt, &layer.labels(&host)).unwrap();
    proxy.set_mode(Mode::Delay(Duration::from_millis(300)));
    proxy.reset_counters();
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| assert_eq!(fs::read(mnt.join("big.bin")).unwrap(), noise(300_000, 2)));
        }
    });
    let fetched = proxy.body_bytes();
    assert!(
        fetched <= layer.blob.len() as u64,
        "{fetched} bytes fetched for a {} byte blob",
        layer.blob.len()
    );
    proxy.set_mode(Mode::Pass);
    fs_.unmount(&mnt).unwrap();
}

#[test]
fn one_read_fetches_its_adjacent_chunks_with_one_request() {
    let (_registry, proxy, layer, host) = proxied_rich_layer();
    let scratch = tempfile::tempdir().unwrap();
    let cache = std::sync::Arc::new(
        crate::cache::ChunkCache::open(&scratch.path().join("cache"), 1 << 30).unwrap(),
    );
    let fs_ = plugin(&scratch.path().join("unused"), &[&host], |_| {});
    let source = crate::labels::LayerSource::from_labels(&layer.labels(&host)).unwrap();
    let resolved =
        crate::layer::resolve(&fs_.registry, &cache, &source, false, &Default::default()).unwrap();
    let big = resolved.index.resolve("big.bin").unwrap();
    assert_eq!(resolved.index.node(big).chunks.len(), 5);
    let l = crate::layer::Layer::new(
        source,
        resolved,
        fs_.registry.clone(),
        cache,
        &scratch.path().join("snap/fs"),
        crate::layer::LayerSettings {
            prefetch_bytes: 0,
            background_fetch: false,
            check_interval: Duration::ZERO,
            prefetch_timeout: Duration::ZERO,
        },
    );
    proxy.reset_counters();
    assert_eq!(l.read(big, 0, 300_000).unwrap(), noise(300_000, 2));
    assert_eq!(
        proxy.requests(),
        1,
        "five adjacent chunks, one ranged request"
    );
    // Now cached: no request at all, any range.
    assert_eq!(
        l.read(big, 70_000, 100).unwrap(),
        noise(300_000, 2)[70_000..70_100]
    );
    assert_eq!(proxy.requests(), 1);
    l.cancel();
}

#[test]
fn landmarked_files_are_prefetched_at_mount() {
    let registry = start_registry();
    let host = registry.host();
    let mut blob = Vec::new();
    let opts = WriterOptions {
        chunk_size: 64 << 10,
        prioritized_files: vec!["bin/tool".into()],
        ..Default::default()
    };
    let converted = convert_layer(rich_layer().as_slice(), &mut blob, &opts).unwrap();
    let digest = push_blob(&host, &blob);
    let labels = stargz_labels(&host, &digest, Some(converted.toc_digest.as_ref()));
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |_| {});
    let mnt = mountpoint(scratch.path(), "snap");
    fs_.mount(&mnt, &labels).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status_of(&mnt).unwrap();
        if st.bytes_cached >= 5000 {
            assert_eq!(st.bytes_cached, 5000, "only the prioritised file: {st:?}");
            assert_eq!(st.state, "lazy");
            break;
        }
        assert!(Instant::now() < deadline, "prefetch never done: {st:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    fs_.unmount(&mnt).unwrap();
}

#[test]
fn check_waits_for_the_mount_time_prefetch_within_its_bound() {
    let registry = start_registry();
    let proxy = FaultProxy::start(registry.addr()).unwrap();
    // A layer whose prioritised file (5000 bytes) is prefetched at mount.
    let mut blob = Vec::new();
    let opts = WriterOptions {
        chunk_size: 64 << 10,
        prioritized_files: vec!["bin/tool".into()],
        ..Default::default()
    };
    let converted = convert_layer(rich_layer().as_slice(), &mut blob, &opts).unwrap();
    let digest = push_blob(&registry.host(), &blob);
    let host = proxy.host();
    let labels = stargz_labels(&host, &digest, Some(converted.toc_digest.as_ref()));
    let scratch = tempfile::tempdir().unwrap();
    let mnt = mountpoint(scratch.path(), "snap");
    // Through a registry that takes 1 s per request, Check returns once the prefetch is done.
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |o| {
        o.prefetch_timeout_secs = 30;
    });
    proxy.set_mode(Mode::Delay(Duration::from_secs(1)));
    fs_.mount(&mnt, &labels).unwrap();
    let start = Instant::now();
    fs_.check(&mnt, &labels).unwrap();
    let st = status_of(&mnt).unwrap();
    assert_eq!(
        st.bytes_cached, 5000,
        "Check returned before the prefetch: {st:?}"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    fs_.unmount(&mnt).unwrap();

    // Bounded: a Check waits no longer than prefetch_timeout_secs.
    let fs_ = plugin(&scratch.path().join("cache2"), &[&host], |o| {
        o.prefetch_timeout_secs = 1;
        o.registry.timeout_secs = 60;
    });
    proxy.set_mode(Mode::Delay(Duration::from_secs(5)));
    fs_.mount(&mnt, &labels).unwrap();
    let start = Instant::now();
    fs_.check(&mnt, &labels).unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert_eq!(status_of(&mnt).unwrap().bytes_cached, 0);
    proxy.set_mode(Mode::Pass);
    fs_.unmount(&mnt).unwrap();
}

#[test]
fn resolving_a_layer_is_bounded_by_the_resolve_timeout() {
    let (_registry, proxy, layer, host) = proxied_rich_layer();
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |o| {
        o.resolve_timeout_secs = 1;
    });
    let mnt = mountpoint(scratch.path(), "snap");
    proxy.set_mode(Mode::Delay(Duration::from_secs(4)));
    let start = Instant::now();
    let e = fs_.mount(&mnt, &layer.labels(&host)).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(
        e.to_string().contains("failed to resolve layer (timeout"),
        "{e}"
    );
    assert!(!sys::is_mount_point(&mnt));
    proxy.set_mode(Mode::Pass);
}

#[test]
fn a_registry_that_ignores_range_still_serves_the_layer() {
    let (_registry, proxy, layer, host) = proxied_rich_layer();
    proxy.set_mode(Mode::StripRange);
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |_| {});
    let mnt = mountpoint(scratch.path(), "snap");
    fs_.mount(&mnt, &layer.labels(&host)).unwrap();
    assert_eq!(fs::read(mnt.join("big.bin")).unwrap(), noise(300_000, 2));
    assert_eq!(
        fs::read(mnt.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    fs_.unmount(&mnt).unwrap();
}

/// An image of two eStargz layers pushed through `host`: `a` (the rich layer) and `b` (one
/// entry), and a function giving a layer's labels with the image's layers label.
fn two_layer_image(
    host: &str,
    b_entry: E,
) -> (
    Pushed,
    Pushed,
    impl Fn(&Pushed) -> fs_plugin_api::model::Labels,
) {
    let a = push_estargz(host, &rich_layer());
    let b = push_estargz(host, &tar_of(&[b_entry]));
    let layers = format!("{},{}", a.digest, b.digest);
    let host = host.to_string();
    let with_layers = move |p: &Pushed| {
        let mut l = stargz_labels(&host, &p.digest, Some(&p.toc_digest));
        l.insert(LABEL_STARGZ_LAYERS.into(), layers.clone());
        l
    };
    (a, b, with_layers)
}

#[test]
fn mounting_a_layer_fetches_its_neighbours_tocs_ahead() {
    let registry = start_registry();
    let proxy = FaultProxy::start(registry.addr()).unwrap();
    let host = proxy.host();
    let (a, b, with_layers) = two_layer_image(
        &host,
        E::File("b.txt", 0o644, (0, 0), b"layer b\n".to_vec()),
    );
    let scratch = tempfile::tempdir().unwrap();
    let cache = scratch.path().join("cache");
    let fs_ = plugin(&cache, &[&host], |_| {});
    let mnt_a = mountpoint(scratch.path(), "a");
    fs_.mount(&mnt_a, &with_layers(&a)).unwrap();
    let b_toc = cache
        .join("toc")
        .join(b.digest.trim_start_matches("sha256:"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b_toc.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(b_toc.exists(), "b's TOC is fetched while a mounts");
    proxy.reset_counters();
    let mnt_b = mountpoint(scratch.path(), "b");
    // What was read ahead is verified by the mount, against its own label.
    let mut wrong = with_layers(&b);
    wrong.insert(LABEL_TOC_DIGEST.into(), sha256(b"another TOC"));
    let e = fs_.mount(&mnt_b, &wrong).unwrap_err();
    assert!(e.to_string().contains("invalid stargz layer"), "{e}");
    assert!(!sys::is_mount_point(&mnt_b));
    fs_.mount(&mnt_b, &with_layers(&b)).unwrap();
    assert_eq!(proxy.requests(), 0, "b mounts from its cached TOC");
    assert_eq!(fs::read(mnt_b.join("b.txt")).unwrap(), b"layer b\n");
    fs_.unmount(&mnt_b).unwrap();
    fs_.unmount(&mnt_a).unwrap();
}

#[test]
fn a_layer_read_ahead_mounts_without_a_request_and_reads_through_its_open_blob() {
    let registry = start_registry();
    let proxy = FaultProxy::start(registry.addr()).unwrap();
    let host = proxy.host();
    let (a, b, with_layers) =
        two_layer_image(&host, E::File("b.bin", 0o644, (0, 0), noise(600_000, 3)));
    let scratch = tempfile::tempdir().unwrap();
    let fs_ = plugin(&scratch.path().join("cache"), &[&host], |_| {});
    let mnt_a = mountpoint(scratch.path(), "a");
    proxy.reset_counters();
    fs_.mount(&mnt_a, &with_layers(&a)).unwrap();
    // Mount b at once: it takes over or waits for the read ahead, never reads b twice.
    let mnt_b = mountpoint(scratch.path(), "b");
    fs_.mount(&mnt_b, &with_layers(&b)).unwrap();
    let after_mounts = proxy.requests();
    assert!(
        after_mounts <= 2,
        "one request per layer (footer and TOC together): {after_mounts}"
    );
    let mut first = [0u8; 1];
    std::io::Read::read_exact(
        &mut fs::File::open(mnt_b.join("b.bin")).unwrap(),
        &mut first,
    )
    .unwrap();
    assert_eq!(first[0], noise(1, 3)[0]);
    assert_eq!(
        proxy.requests() - after_mounts,
        1,
        "the first read is one chunk request: the blob is open already"
    );
    fs_.unmount(&mnt_b).unwrap();
    fs_.unmount(&mnt_a).unwrap();
}
