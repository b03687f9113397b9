#![allow(clippy::unwrap_used)]
//! The plugin conformance suite: every plugin under `plugins/` (the fixtures under
//! `plugins/testing` aside) passes it against its real backend.
//!
//! `cargo xtask test-plugins` builds the plugins, installs them into a fresh plugins directory
//! (`STRATA_PLUGINS_DIR`), writes one strata config per plugin naming it with its backend's
//! options (`*.toml` in `STRATA_PLUGIN_CONFIGS`) and runs these tests (`cargo test --test …`; they are `test = false` so a plain `cargo test` does not pick them up). Each
//! test loads every plugin through the real loader from its config. Without those variables the
//! tests fail; they never skip.
//!
//! A new plugin needs a [`Backend`] here (see [`backend_for`]) and its options in
//! `xtask/src/plugins.rs`.

mod common;
#[path = "common/nfs_server.rs"]
mod nfs_server;

use std::{
    collections::BTreeSet,
    fs,
    io::ErrorKind as IoKind,
    path::{Path, PathBuf},
    sync::{
        Arc, Barrier,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use common::{is_empty_dir, is_mount_point, mountpoint};
use fs_plugin_api::{PluginRegistry, config::Config};
use nix::{
    errno::Errno,
    sys::stat::{Mode, SFlag, makedev, mknod},
};
use snapshot_core::{ErrorKind, FileSystem, Labels};

/// One plugin under test: its file system, loaded from its config, and its backend.
struct Case {
    plugin: String,
    fs: Arc<dyn FileSystem>,
    backend: Box<dyn Backend>,
}

/// An entry of a layer, in overlay form.
enum Entry {
    Dir(&'static str),
    File(&'static str, String),
    /// A 0/0 character device: hides the path in lower layers.
    Whiteout(&'static str),
    /// A directory with `trusted.overlay.opaque=y`: hides the lower layers' entries under it.
    OpaqueDir(&'static str),
}

/// A plugin's real backend, as far as the suite drives it.
trait Backend: Send + Sync {
    /// Stores a layer holding `entries` and returns the labels naming it.
    fn add_layer(&self, entries: &[Entry]) -> Labels;
    /// Takes the layer named by `labels` away from the backend (`check` must fail afterwards).
    fn remove_layer(&self, labels: &Labels);
    /// Labels naming a layer the backend does not have.
    fn unknown_layer(&self) -> Labels;
}

/// The backend of the plugin named `plugin`, from the options its config hands it.
fn backend_for(plugin: &str, options: &serde_json::Value) -> Box<dyn Backend> {
    match plugin {
        "local" => Box::new(LocalStore::new(options)),
        "nfs" => Box::new(NfsStore::new(options)),
        "http" => Box::new(HttpRegistry::new(options)),
        other => panic!(
            "no conformance backend for plugin {other:?}: add one to `backend_for` in {}",
            file!()
        ),
    }
}

/// Every installed plugin, loaded through its config.
fn cases() -> Vec<Case> {
    let plugins_dir = common::env_dir("STRATA_PLUGINS_DIR");
    let configs_dir = common::env_dir("STRATA_PLUGIN_CONFIGS");
    let registry = PluginRegistry::scan(&plugins_dir).unwrap();
    assert!(
        registry.rejected().is_empty(),
        "installed plugins were rejected: {:?}",
        registry.rejected()
    );
    let installed: BTreeSet<String> = registry.plugins().map(|p| p.name.clone()).collect();
    assert!(
        !installed.is_empty(),
        "no plugins in {}",
        plugins_dir.display()
    );

    let mut configs: Vec<PathBuf> = fs::read_dir(&configs_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    configs.sort();
    let cases: Vec<Case> = configs
        .iter()
        .map(|path| load_case(path, &plugins_dir))
        .collect();
    let configured: BTreeSet<String> = cases.iter().map(|c| c.plugin.clone()).collect();
    assert_eq!(
        configured,
        installed,
        "every installed plugin needs exactly one config in {}",
        configs_dir.display()
    );
    cases
}

fn load_case(path: &Path, plugins_dir: &Path) -> Case {
    let config = Config::load(path).unwrap();
    assert_eq!(
        config.plugins_dir.canonicalize().unwrap(),
        plugins_dir.canonicalize().unwrap(),
        "{}: plugins_dir",
        path.display()
    );
    let Some(fs_config) = &config.filesystem else {
        panic!("{}: no [filesystem] section", path.display())
    };
    let options = fs_config.options_json().unwrap();
    let fs = config
        .filesystem()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .unwrap();
    Case {
        plugin: fs_config.plugin.clone(),
        backend: backend_for(&fs_config.plugin, &options),
        fs,
    }
}

fn entries(tag: &str) -> Vec<Entry> {
    vec![
        Entry::File("hello.txt", format!("hello from {tag}\n")),
        Entry::Dir("etc"),
        Entry::File("etc/os-release", "ID=strata\n".into()),
    ]
}

fn assert_erofs(result: std::io::Result<impl Sized>, what: &str) {
    match result {
        Ok(_) => panic!("{what}: succeeded on a read-only layer"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(Errno::EROFS as i32), "{what}: {e}"),
    }
}

#[test]
fn mount_shows_the_layers_files_read_only() {
    for case in cases() {
        let scratch = tempfile::tempdir().unwrap();
        let labels = case.backend.add_layer(&entries("mount"));
        let (mnt, _guard) = mountpoint(scratch.path(), "layer");
        case.fs.mount(&mnt, &labels).unwrap();
        let p = &case.plugin;
        assert_eq!(
            fs::read_to_string(mnt.join("hello.txt")).unwrap(),
            "hello from mount\n",
            "{p}"
        );
        assert_eq!(
            fs::read_to_string(mnt.join("etc/os-release")).unwrap(),
            "ID=strata\n",
            "{p}"
        );
        assert_erofs(
            fs::OpenOptions::new()
                .append(true)
                .open(mnt.join("hello.txt")),
            p,
        );
        assert_erofs(fs::write(mnt.join("new.txt"), "x"), p);
        assert_erofs(fs::create_dir(mnt.join("new-dir")), p);
        assert_erofs(fs::remove_file(mnt.join("hello.txt")), p);
        case.fs.unmount(&mnt).unwrap();
    }
}

#[test]
fn check_passes_while_the_backend_is_there_and_fails_once_it_is_gone() {
    for case in cases() {
        let scratch = tempfile::tempdir().unwrap();
        let labels = case.backend.add_layer(&entries("check"));
        let (mnt, _guard) = mountpoint(scratch.path(), "layer");
        case.fs.mount(&mnt, &labels).unwrap();
        case.fs.check(&mnt, &labels).unwrap();
        case.fs.check(&mnt, &labels).unwrap();
        case.backend.remove_layer(&labels);
        let e = case.fs.check(&mnt, &labels).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{}: {e}", case.plugin);
        assert!(
            e.to_string()
                .starts_with(&format!("plugin {}: check ", case.plugin)),
            "{e}"
        );
        // A layer whose backend is gone can still be unmounted.
        case.fs.unmount(&mnt).unwrap();
        assert!(!is_mount_point(&mnt), "{}", case.plugin);
    }
}

#[test]
fn check_fails_once_the_layer_is_unmounted() {
    for case in cases() {
        let scratch = tempfile::tempdir().unwrap();
        let labels = case.backend.add_layer(&entries("check-unmounted"));
        let (mnt, _guard) = mountpoint(scratch.path(), "layer");
        case.fs.mount(&mnt, &labels).unwrap();
        case.fs.unmount(&mnt).unwrap();
        let e = case.fs.check(&mnt, &labels).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{}: {e}", case.plugin);
    }
}

#[test]
fn unmount_removes_the_mount() {
    for case in cases() {
        let scratch = tempfile::tempdir().unwrap();
        let labels = case.backend.add_layer(&entries("unmount"));
        let (mnt, _guard) = mountpoint(scratch.path(), "layer");
        case.fs.mount(&mnt, &labels).unwrap();
        assert!(is_mount_point(&mnt), "{}", case.plugin);
        case.fs.unmount(&mnt).unwrap();
        assert!(!is_mount_point(&mnt), "{}", case.plugin);
        assert!(is_empty_dir(&mnt), "{}", case.plugin);
        // The mountpoint can be used again.
        case.fs.mount(&mnt, &labels).unwrap();
        assert!(mnt.join("hello.txt").exists(), "{}", case.plugin);
        case.fs.unmount(&mnt).unwrap();
    }
}

#[test]
fn an_unknown_layer_is_not_found_and_leaves_no_mount() {
    for case in cases() {
        let scratch = tempfile::tempdir().unwrap();
        let (mnt, _guard) = mountpoint(scratch.path(), "layer");
        let e = case
            .fs
            .mount(&mnt, &case.backend.unknown_layer())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{}: {e}", case.plugin);
        assert!(!is_mount_point(&mnt), "{}", case.plugin);
        assert!(is_empty_dir(&mnt), "{}", case.plugin);
    }
}

#[test]
fn labels_naming_no_layer_are_an_invalid_argument() {
    for case in cases() {
        let scratch = tempfile::tempdir().unwrap();
        let (mnt, _guard) = mountpoint(scratch.path(), "layer");
        let e = case.fs.mount(&mnt, &Labels::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{}: {e}", case.plugin);
        assert!(!is_mount_point(&mnt), "{}", case.plugin);
    }
}

#[test]
fn concurrent_mounts_of_different_layers() {
    const THREADS: usize = 8;
    for case in cases() {
        let scratch = tempfile::tempdir().unwrap();
        let start = Barrier::new(THREADS);
        std::thread::scope(|s| {
            for i in 0..THREADS {
                let (case, scratch, start) = (&case, scratch.path(), &start);
                s.spawn(move || {
                    let tag = format!("thread {i}");
                    let labels = case.backend.add_layer(&entries(&tag));
                    let (mnt, _guard) = mountpoint(scratch, &format!("layer-{i}"));
                    start.wait();
                    case.fs.mount(&mnt, &labels).unwrap();
                    case.fs.check(&mnt, &labels).unwrap();
                    assert_eq!(
                        fs::read_to_string(mnt.join("hello.txt")).unwrap(),
                        format!("hello from {tag}\n"),
                        "{}",
                        case.plugin
                    );
                    case.fs.unmount(&mnt).unwrap();
                    assert!(!is_mount_point(&mnt), "{}", case.plugin);
                });
            }
        });
    }
}

#[test]
fn remote_snapshotter_end_to_end() {
    for case in cases() {
        remote_snapshotter_end_to_end_with(&case);
    }
}

/// Layers mounted by the plugin, stacked the way the remote snapshotter stacks them: an overlay
/// whose lower directories are the plugin's mounts shows the merged files, whiteouts and opaque
/// directories applied.
///
/// Through the remote snapshotter: each layer is prepared with the target-ref label and the
/// plugin's layer labels, so `OverlaySnapshotter` asks the plugin to mount it and answers
/// "already exists"; a view on top is an overlay of the plugin mounts showing the merged files.
fn remote_snapshotter_end_to_end_with(case: &Case) {
    use snapshot_core::{LABEL_REMOTE, LABEL_TARGET_REF, Snapshotter};
    use snapshot_overlay::{Options, OverlaySnapshotter};

    let scratch = tempfile::tempdir().unwrap();
    let lower_labels = case.backend.add_layer(&[
        Entry::File("a.txt", "a from lower\n".into()),
        Entry::File("b.txt", "b from lower\n".into()),
        Entry::Dir("d"),
        Entry::File("d/x", "x from lower\n".into()),
    ]);
    let upper_labels = case.backend.add_layer(&[
        Entry::Whiteout("a.txt"),
        Entry::File("c.txt", "c from upper\n".into()),
        Entry::OpaqueDir("d"),
        Entry::File("d/y", "y from upper\n".into()),
    ]);
    let sn = OverlaySnapshotter::open_with_filesystem(
        &scratch.path().join("root"),
        Options::default(),
        Some(case.fs.clone()),
    )
    .unwrap();
    for (key, parent, target, labels) in [
        ("extract-1", "", "chain-1", &lower_labels),
        ("extract-2", "chain-1", "chain-2", &upper_labels),
    ] {
        let mut labels = labels.clone();
        labels.insert(LABEL_TARGET_REF.into(), target.into());
        let err = sn.prepare(key, parent, &labels).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::AlreadyExists,
            "{}: {err}",
            case.plugin
        );
        let info = sn.stat(target).unwrap();
        assert!(
            info.labels.contains_key(LABEL_REMOTE),
            "{}: {target} is remote",
            case.plugin
        );
    }
    let view = sn.view("view", "chain-2", &Labels::new()).unwrap();
    let (merged, _g) = mountpoint(scratch.path(), "merged");
    let guard = rootfs::mount::MountGuard::mount(&view, &merged).unwrap();

    let mut names: Vec<String> = fs::read_dir(&merged)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["b.txt", "c.txt", "d"], "{}", case.plugin);
    assert_eq!(
        fs::read_to_string(merged.join("b.txt")).unwrap(),
        "b from lower\n"
    );
    assert_eq!(
        fs::read_to_string(merged.join("c.txt")).unwrap(),
        "c from upper\n"
    );
    let d: Vec<String> = fs::read_dir(merged.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(d, ["y"], "{}: opaque directory", case.plugin);
    assert_eq!(
        fs::metadata(merged.join("a.txt")).unwrap_err().kind(),
        IoKind::NotFound
    );
    guard.unmount().unwrap();
    for key in ["view", "chain-2", "chain-1"] {
        sn.remove(key).unwrap();
    }
    let left = fs::read_dir(scratch.path().join("root/snapshots"))
        .unwrap()
        .count();
    assert_eq!(
        left, 0,
        "{}: removing remote snapshots unmounts and deletes them",
        case.plugin
    );
    sn.close().unwrap();
}

/// The `local` plugin's backend: its layer store, `<store>/sha256/<hex>/`.
struct LocalStore {
    store: PathBuf,
}

impl LocalStore {
    fn new(options: &serde_json::Value) -> Self {
        let store = options["store"]
            .as_str()
            .unwrap_or_else(|| panic!("local: options have no \"store\": {options}"));
        Self {
            store: PathBuf::from(store),
        }
    }

    fn layer_dir(&self, labels: &Labels) -> PathBuf {
        let digest = fs_plugin_api::layer_digest(labels).unwrap();
        let (algorithm, hex) = digest.split_once(':').unwrap();
        self.store.join(algorithm).join(hex)
    }
}

/// A digest no other layer of this test run has.
fn unique_digest() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("sha256:{:016x}{:016x}{:032x}", std::process::id(), n, nanos)
}

fn digest_labels(digest: &str) -> Labels {
    [(
        fs_plugin_api::LABEL_LAYER_DIGEST.to_owned(),
        digest.to_owned(),
    )]
    .into_iter()
    .collect()
}

impl Backend for LocalStore {
    fn add_layer(&self, entries: &[Entry]) -> Labels {
        let labels = digest_labels(&unique_digest());
        let root = self.layer_dir(&labels);
        fs::create_dir_all(&root).unwrap();
        for entry in entries {
            match entry {
                Entry::Dir(p) => fs::create_dir_all(root.join(p)).unwrap(),
                Entry::File(p, content) => fs::write(root.join(p), content).unwrap(),
                Entry::Whiteout(p) => {
                    mknod(&root.join(p), SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).unwrap()
                }
                Entry::OpaqueDir(p) => {
                    fs::create_dir_all(root.join(p)).unwrap();
                    rustix::fs::setxattr(
                        root.join(p),
                        "trusted.overlay.opaque",
                        b"y",
                        rustix::fs::XattrFlags::empty(),
                    )
                    .unwrap();
                }
            }
        }
        labels
    }

    fn remove_layer(&self, labels: &Labels) {
        let dir = self.layer_dir(labels);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        fs::rename(&dir, self.store.join(format!("removed-{name}"))).unwrap();
    }

    fn unknown_layer(&self) -> Labels {
        digest_labels(&unique_digest())
    }
}

/// The `nfs` plugin's backend: a layer store (the same layout as `local`'s, plus the metadata
/// index `strata export` writes) exported by a real nfs-ganesha on 127.0.0.1. The options
/// `xtask` wrote name the exported directory (its NFS path is its own path) and the ports; the
/// server is started here, shared by the tests running at the same time.
struct NfsStore {
    local: LocalStore,
    _server: Arc<nfs_server::NfsServer>,
}

impl NfsStore {
    fn new(options: &serde_json::Value) -> Self {
        let export = options["export"]
            .as_str()
            .unwrap_or_else(|| panic!("nfs: options have no \"export\": {options}"));
        let port = |key: &str| {
            options[key]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("nfs: options have no {key:?}: {options}"))
        };
        let server =
            nfs_server::shared_server(Path::new(export), port("nfs_port"), port("mount_port"));
        Self {
            local: LocalStore {
                store: PathBuf::from(export),
            },
            _server: server,
        }
    }
}

impl Backend for NfsStore {
    fn add_layer(&self, entries: &[Entry]) -> Labels {
        let labels = self.local.add_layer(entries);
        let dir = self.local.layer_dir(&labels);
        let digest: snapshot_core::identity::Digest = fs_plugin_api::layer_digest(&labels)
            .unwrap()
            .parse()
            .unwrap();
        rootfs::export::index::LayerIndex::scan(&dir)
            .unwrap()
            .publish(&self.local.store, &digest)
            .unwrap();
        labels
    }

    fn remove_layer(&self, labels: &Labels) {
        self.local.remove_layer(labels);
    }

    fn unknown_layer(&self) -> Labels {
        self.local.unknown_layer()
    }
}

/// The `http` plugin's backend: a real `docker-registry` on the 127.0.0.1 port the options
/// `xtask` wrote name (the only host in `registry.hosts`, plain HTTP), started here and shared
/// by the tests running at the same time. A layer is a tar of the entries converted to eStargz
/// (`rootfs::estargz::convert_layer`), uploaded as a blob of one repository and named by
/// stargz's labels with its TOC digest; removing it deletes the blob from the registry.
struct HttpRegistry {
    server: Arc<RegistryServer>,
}

/// The repository the conformance layers are uploaded to.
const HTTP_REPO: &str = "strata/conformance";

impl HttpRegistry {
    fn new(options: &serde_json::Value) -> Self {
        let hosts = options["registry"]["hosts"]
            .as_object()
            .unwrap_or_else(|| panic!("http: options have no registry.hosts: {options}"));
        assert_eq!(
            hosts.len(),
            1,
            "http: one registry host expected: {options}"
        );
        let host = hosts.keys().next().unwrap().clone();
        Self {
            server: RegistryServer::shared(&host),
        }
    }

    fn labels(&self, digest: &str, toc_digest: &str) -> Labels {
        [
            (
                "containerd.io/snapshot/remote/stargz.reference",
                format!("{}/{HTTP_REPO}:latest", self.server.host),
            ),
            (fs_plugin_api::LABEL_STARGZ_DIGEST, digest.to_owned()),
            (
                rootfs::estargz::TOC_DIGEST_ANNOTATION,
                toc_digest.to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// A tar of `entries` in overlay's image form (whiteouts as `.wh.` files, opaque markers).
fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_path(path).unwrap();
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    for entry in entries {
        match entry {
            Entry::Dir(p) => add(p, tar::EntryType::Directory, 0o755, b""),
            Entry::File(p, content) => add(p, tar::EntryType::Regular, 0o644, content.as_bytes()),
            Entry::Whiteout(p) => {
                let (dir, name) = match p.rsplit_once('/') {
                    Some((dir, name)) => (format!("{dir}/"), name),
                    None => (String::new(), *p),
                };
                add(
                    &format!("{dir}.wh.{name}"),
                    tar::EntryType::Regular,
                    0o644,
                    b"",
                )
            }
            Entry::OpaqueDir(p) => {
                add(p, tar::EntryType::Directory, 0o755, b"");
                add(
                    &format!("{p}/.wh..wh..opq"),
                    tar::EntryType::Regular,
                    0o644,
                    b"",
                );
            }
        }
    }
    b.into_inner().unwrap()
}

impl Backend for HttpRegistry {
    fn add_layer(&self, entries: &[Entry]) -> Labels {
        let mut blob = Vec::new();
        let converted = rootfs::estargz::convert_layer(
            layer_tar(entries).as_slice(),
            &mut blob,
            &rootfs::estargz::WriterOptions::default(),
        )
        .unwrap();
        let digest = converted.digest.to_string();
        self.server.upload(&blob, &digest);
        self.labels(&digest, &converted.toc_digest.to_string())
    }

    fn remove_layer(&self, labels: &Labels) {
        let digest = fs_plugin_api::layer_digest(labels).unwrap();
        let (status, body) =
            self.server
                .http("DELETE", &format!("/v2/{HTTP_REPO}/blobs/{digest}"), b"");
        assert_eq!(status, 202, "DELETE blob {digest}: {body}");
    }

    fn unknown_layer(&self) -> Labels {
        self.labels(&unique_digest(), &unique_digest())
    }
}

/// `docker-registry serve` on a given loopback port, its storage in a temporary directory
/// (deletes enabled). Killed and reaped on drop.
struct RegistryServer {
    host: String,
    child: std::sync::Mutex<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl RegistryServer {
    /// The server of this test process on `host` (`127.0.0.1:<port>`), started if needed.
    fn shared(host: &str) -> Arc<RegistryServer> {
        static SHARED: std::sync::Mutex<std::sync::Weak<RegistryServer>> =
            std::sync::Mutex::new(std::sync::Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.upgrade() {
            assert_eq!(s.host, host, "one shared registry per process");
            return s;
        }
        let s = Arc::new(RegistryServer::start(host));
        *slot = Arc::downgrade(&s);
        s
    }

    fn start(host: &str) -> RegistryServer {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start docker-registry ({e}): install Debian package docker-registry")
            });
        let server = RegistryServer {
            host: host.to_owned(),
            child: std::sync::Mutex::new(child),
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // A registry still starting may accept and then reset a connection.
            if server
                .try_http("GET", "/v2/", b"")
                .is_ok_and(|(status, _)| status == 200)
            {
                return server;
            }
            let exited = server.child.lock().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && std::time::Instant::now() < deadline,
                "docker-registry on {host} did not come up (exit: {exited:?}): {}",
                fs::read_to_string(server._dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// One HTTP/1.1 exchange (`Connection: close`): status and body (headers folded in).
    fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        self.try_http(method, path, body).unwrap()
    }

    /// [`RegistryServer::http`], with I/O errors returned.
    fn try_http(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.host)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\
             Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
            self.host,
            body.len()
        )?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((status, text))
    }

    /// Uploads `blob` (digest `digest`) into [`HTTP_REPO`] (monolithic upload).
    fn upload(&self, blob: &[u8], digest: &str) {
        let (status, response) = self.http("POST", &format!("/v2/{HTTP_REPO}/blobs/uploads/"), b"");
        assert_eq!(status, 202, "start upload: {response}");
        let location = response
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("location")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("upload without Location: {response}"));
        let path = location
            .find("/v2/")
            .map_or(location.as_str(), |i| &location[i..]);
        let sep = if path.contains('?') { '&' } else { '?' };
        let (status, response) = self.http("PUT", &format!("{path}{sep}digest={digest}"), blob);
        assert_eq!(status, 201, "upload blob {digest}: {response}");
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}
