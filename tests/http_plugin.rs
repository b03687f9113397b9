//! `strata` with the `http` backing file system, against a real docker-registry on 127.0.0.1:
//! an image converted to eStargz (by `strata convert` and by stargz's `ctr-remote`) is pulled
//! lazily (`strata pull --lazy`: no layer blob is downloaded), served by
//! `strata mount --foreground` through FUSE, and reads exactly like a normal unpack of the
//! original image; `strata ls` tells how far each lazy layer is fetched.
//!
//! Run by `cargo xtask test-plugins`, which builds and installs the plugins into
//! `STRATA_PLUGINS_DIR` (it is `test = false`, so a plain `cargo test` does not pick it up).
#![allow(clippy::unwrap_used)] // tests may unwrap

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rootfs::testing::TestRegistry;
use support::layers::{assert_same_tree, build_image};
use support::{Daemon, mounts_under, strata_run, unmount_all_under, wait_until};

fn plugins_dir() -> String {
    std::env::var("STRATA_PLUGINS_DIR").expect(
        "STRATA_PLUGINS_DIR must name the installed plugins: run `cargo xtask test-plugins`",
    )
}

/// A temp dir with the test image (tag `t`), a registry, and a config for the http plugin.
struct Setup {
    tmp: tempfile::TempDir,
    registry: TestRegistry,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        build_image(&tmp.path().join("image"));
        let registry = TestRegistry::start().unwrap();
        Setup { tmp, registry }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// A config for state dir `root`, the http plugin talking plain HTTP to the registry.
    fn config(&self, root: &str) -> String {
        let path = self.path(&format!("{root}.toml"));
        std::fs::write(
            &path,
            format!(
                "root = {:?}\nplugins_dir = {:?}\n[filesystem]\nplugin = \"http\"\n\
                 [filesystem.options]\ncache_dir = {:?}\nbackground_fetch = false\n\
                 [filesystem.options.registry.hosts.\"{}\"]\nplain_http = true\n",
                self.arg(root),
                plugins_dir(),
                self.arg(&format!("{root}-cache")),
                self.registry.host(),
            ),
        )
        .unwrap();
        path.display().to_string()
    }

    /// Reference mount of the original image, unpacked normally.
    fn plain_mount(&self) -> (PathBuf, support::MountGuard) {
        let plain = self.path("rootfs-plain");
        std::fs::create_dir(&plain).unwrap();
        let guard = support::MountGuard(plain.clone());
        strata_run(&[
            "--root",
            &self.arg("root-plain"),
            "mount",
            &format!("{}:t", self.arg("image")),
            plain.to_str().unwrap(),
            "--name",
            "plain",
        ]);
        (plain, guard)
    }
}

/// Pulls `reference` lazily with `cfg`; returns the content-store image of the pull.
fn pull_lazy(cfg: &str, root: &Path, reference: &str) -> String {
    let (_, stderr) = strata_run(&["--config", cfg, "pull", "--lazy", "--plain-http", reference]);
    pulled_image(root, &stderr)
}

fn lazy_lines(ls: &str) -> usize {
    ls.lines()
        .filter(|l| l.contains(" lazy ") || l.contains(" complete ") || l.contains(" remote "))
        .count()
}

/// How the lazily pulled image gets mounted.
#[derive(Clone, Copy)]
enum Serve {
    /// `strata pull --lazy`, then `strata mount --foreground` (a second process).
    MountForeground,
    /// `strata pull --lazy --mount` (one process).
    PullMount,
}

/// The `<root>/content@<digest>` image a `strata pull` names in its output.
fn pulled_image(root: &Path, output: &str) -> String {
    let digest = output
        .split_whitespace()
        .find_map(|w| w.rsplit_once('@').map(|(_, d)| d.to_string()))
        .filter(|d| d.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("pull names the image digest: {output}"));
    format!("{}@{digest}", root.join("content").display())
}

/// Lazy pull + foreground mount of `reference`; checks the tree against a normal unpack.
fn pulled_lazily_reads_like_a_normal_unpack(s: &Setup, root: &str, reference: &str, how: Serve) {
    let cfg = s.config(root);
    let target = s.path(&format!("{root}-rootfs"));
    std::fs::create_dir(&target).unwrap();
    let log = s.path(&format!("{root}.log"));
    let mut cmd = Command::new(support::strata_bin());
    cmd.args(["--config", &cfg]);
    let mut pulled = None;
    match how {
        Serve::MountForeground => {
            let image = pull_lazy(&cfg, &s.path(root), reference);
            cmd.args(["mount", "--foreground", &image]).arg(&target);
            pulled = Some(image);
        }
        Serve::PullMount => {
            cmd.args(["pull", "--lazy", "--plain-http", "--mount"])
                .arg(&target)
                .arg(reference);
        }
    }
    cmd.args(["--name", "lazy"]);
    let daemon = Daemon::spawn("strata (serving)", &mut cmd, &log);
    wait_until(
        "the lazy rootfs is mounted",
        Duration::from_secs(60),
        || target.join("usr").exists(),
    );
    let image = pulled.unwrap_or_else(|| pulled_image(&s.path(root), &daemon.log()));
    // The content store holds the manifest and config, no layer blob.
    let blobs = s.path(root).join("content/blobs/sha256");
    let (_, digest) = image.rsplit_once('@').unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blobs.join(digest.trim_start_matches("sha256:"))).unwrap(),
    )
    .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for layer in layers {
        let hex = layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        assert!(!blobs.join(hex).exists(), "layer {hex} was downloaded");
    }
    let (ls, _) = strata_run(&["--config", &cfg, "ls"]);
    assert_eq!(lazy_lines(&ls), 3, "every layer is remote: {ls}");
    assert!(ls.contains(" lazy "), "lazy layers report progress: {ls}");

    let (plain, _guard) = s.plain_mount();
    assert_same_tree(&target, &plain, true);
    assert!(!target.join("etc/motd").exists(), "whiteout applies");
    assert!(
        !target.join("var/cache/stale").exists(),
        "opaque dir applies"
    );

    let status = daemon.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "mount exits cleanly on SIGTERM"
    );
    assert!(
        !target.join("usr").exists(),
        "the rootfs is unmounted on exit"
    );
    assert_eq!(
        mounts_under(&s.path(root)),
        Vec::<PathBuf>::new(),
        "no FUSE layer is left mounted"
    );
    unmount_all_under(&s.path(root));
}

#[test]
fn an_image_converted_by_strata_is_pulled_lazily_and_reads_like_a_normal_unpack() {
    let s = Setup::new();
    strata_run(&[
        "convert",
        "--estargz",
        &format!("{}:t", s.arg("image")),
        "--out",
        &s.arg("estargz"),
    ]);
    s.registry
        .push(&s.path("estargz"), "t", "strata/estargz:v1")
        .unwrap();
    let reference = format!("{}/strata/estargz:v1", s.registry.host());
    pulled_lazily_reads_like_a_normal_unpack(&s, "root-lazy", &reference, Serve::PullMount);
}

#[test]
fn a_plain_gzip_image_falls_back_to_a_full_pull() {
    let s = Setup::new();
    s.registry
        .push(&s.path("image"), "t", "plain/img:v1")
        .unwrap();
    let cfg = s.config("root");
    let reference = format!("{}/plain/img:v1", s.registry.host());
    let (chain, _) = strata_run(&[
        "--config",
        &cfg,
        "pull",
        "--lazy",
        "--plain-http",
        &reference,
    ]);
    let (ls, _) = strata_run(&["--config", &cfg, "ls"]);
    assert!(ls.contains(chain.trim()), "{ls}");
    assert_eq!(
        lazy_lines(&ls),
        0,
        "layers without a TOC are unpacked: {ls}"
    );
    assert_eq!(mounts_under(&s.path("root")), Vec::<PathBuf>::new());
}

#[test]
fn an_image_converted_by_ctr_remote_is_pulled_lazily_and_reads_like_a_normal_unpack() {
    let s = Setup::new();
    let work = s.path("ctr-remote");
    std::fs::create_dir_all(&work).unwrap();
    let layout = support::ctr_remote::convert(&s.path("image"), "t", 1_000_000, &work);
    // ctr-remote's export names the image `example.com/esgz:t`; skopeo wants a tag in the layout.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap_or("t")
        .to_string();
    s.registry.push(&layout, &tag, "stargz/esgz:v1").unwrap();
    let reference = format!("{}/stargz/esgz:v1", s.registry.host());
    pulled_lazily_reads_like_a_normal_unpack(&s, "root-ctr", &reference, Serve::MountForeground);
}

/// containerd (Debian's 1.6) with `strata serve` as proxy snapshotter: stargz's `ctr-remote
/// rpull` pulls an eStargz image through containerd's unpacker, strata's http plugin mounts its
/// layers from the registry (stargz labels), and a container runs on them.
#[test]
fn containerd_rpull_runs_a_container_on_lazily_mounted_layers() {
    use support::containerd::{CgroupGuard, Containerd, become_subreaper, is_static_elf};
    use support::oci::{Entry, write_archive};
    support::require_commands(
        &[
            "containerd",
            "ctr",
            "ctr-remote",
            "runc",
            "containerd-shim-runc-v2",
        ],
        "apt-get install containerd runc stargz-snapshotter",
    );
    assert!(
        is_static_elf(Path::new("/bin/busybox")),
        "expected a static /bin/busybox: apt-get install busybox-static"
    );
    become_subreaper();
    let s = Setup::new();
    let dir = s.tmp.path();
    let layers = vec![
        vec![
            Entry::Dir("bin", 0o755),
            Entry::File("bin/busybox", std::fs::read("/bin/busybox").unwrap(), 0o755),
            Entry::Symlink("bin/sh", "busybox"),
            Entry::Symlink("bin/cat", "busybox"),
            Entry::Dir("proc", 0o555),
            Entry::Dir("sys", 0o555),
            Entry::Dir("dev", 0o755),
            Entry::Dir("tmp", 0o1777),
        ],
        vec![Entry::File("lazy.txt", b"served lazily\n".to_vec(), 0o644)],
    ];
    let archive = dir.join("image.tar");
    write_archive(&archive, "example.com/lazy:v1", &layers, &["/bin/sh"]);
    let layout = dir.join("layout");
    std::fs::create_dir(&layout).unwrap();
    support::run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-xf")
            .arg(&archive),
        Duration::from_secs(60),
    );
    strata_run(&[
        "convert",
        "--estargz",
        layout.to_str().unwrap(),
        "--out",
        &format!("{}:v1", s.arg("est")),
    ]);
    s.registry
        .push(&s.path("est"), "v1", "lazy/e2e:v1")
        .unwrap();
    let reference = format!("{}/lazy/e2e:v1", s.registry.host());

    let cfg = s.config("root-serve");
    let sock = dir.join("strata.sock");
    let serve = support::start_strata(
        &s.path("root-serve"),
        &sock,
        &dir.join("serve.log"),
        &["--config", &cfg],
    );
    let containerd = Containerd::start(&dir.join("containerd"), &sock);
    support::run_ok(
        Command::new("ctr-remote")
            .arg("--address")
            .arg(containerd.socket())
            .args(["--namespace", support::containerd::NAMESPACE])
            .args(["images", "rpull", "--plain-http", "--snapshotter", "strata"])
            .arg(&reference),
        Duration::from_secs(120),
    );
    let (ls, _) = strata_run(&["--root", &s.arg("root-serve"), "--config", &cfg, "ls"]);
    assert_eq!(lazy_lines(&ls), 2, "both layers are remote: {ls}");

    let cgroup = CgroupGuard(format!("strata-lazy-{}", std::process::id()));
    let out = containerd.ctr_ok(&[
        "run",
        "--snapshotter",
        "strata",
        "--rm",
        "--runc-root",
        dir.join("runc").to_str().unwrap(),
        "--cgroup",
        &format!("/{}/lazy-run", cgroup.0),
        &reference,
        "lazy-run",
        "cat",
        "/lazy.txt",
    ]);
    assert_eq!(out, "served lazily\n", "the container reads the lazy layer");
    assert!(containerd.stop(), "containerd stops on SIGTERM");
    let status = serve.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "strata serve exits 0: {status:?}"
    );
    unmount_all_under(&s.path("root-serve"));
}
