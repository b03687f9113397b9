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
use support::{Daemon, mounts_under, unmount_all_under, wait_until};

fn strata(args: &[&str]) -> (String, String) {
    let out = Command::new(support::strata_bin())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

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
        strata(&[
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
    let (_, stderr) = strata(&["--config", cfg, "pull", "--lazy", "--plain-http", reference]);
    let digest = stderr
        .split_whitespace()
        .find_map(|w| w.rsplit_once('@').map(|(_, d)| d.to_string()))
        .filter(|d| d.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("pull names the image digest: {stderr}"));
    format!("{}@{digest}", root.join("content").display())
}

fn lazy_lines(ls: &str) -> usize {
    ls.lines()
        .filter(|l| l.contains(" lazy ") || l.contains(" complete ") || l.contains(" remote "))
        .count()
}

/// Lazy pull + foreground mount of `reference`; checks the tree against a normal unpack.
fn pulled_lazily_reads_like_a_normal_unpack(s: &Setup, root: &str, reference: &str) {
    let cfg = s.config(root);
    let image = pull_lazy(&cfg, &s.path(root), reference);
    let blobs = std::fs::read_dir(s.path(root).join("content/blobs/sha256"))
        .unwrap()
        .count();
    // The manifest as served, as recorded in the index (re-encoded), and the config.
    assert_eq!(blobs, 3, "a lazy pull stores manifests and config only");
    let (ls, _) = strata(&["--config", &cfg, "ls"]);
    assert_eq!(lazy_lines(&ls), 3, "every layer is remote: {ls}");

    let target = s.path(&format!("{root}-rootfs"));
    std::fs::create_dir(&target).unwrap();
    let mut mount = Command::new(support::strata_bin());
    mount.args([
        "--config",
        &cfg,
        "mount",
        "--foreground",
        &image,
        target.to_str().unwrap(),
        "--name",
        "lazy",
    ]);
    let daemon = Daemon::spawn("strata mount", &mut mount, &s.path(&format!("{root}.log")));
    wait_until(
        "the lazy rootfs is mounted",
        Duration::from_secs(60),
        || target.join("usr").exists(),
    );
    let (ls, _) = strata(&["--config", &cfg, "ls"]);
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
    strata(&[
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
    pulled_lazily_reads_like_a_normal_unpack(&s, "root-lazy", &reference);
}

#[test]
fn a_plain_gzip_image_falls_back_to_a_full_pull() {
    let s = Setup::new();
    s.registry
        .push(&s.path("image"), "t", "plain/img:v1")
        .unwrap();
    let cfg = s.config("root");
    let reference = format!("{}/plain/img:v1", s.registry.host());
    let (chain, _) = strata(&[
        "--config",
        &cfg,
        "pull",
        "--lazy",
        "--plain-http",
        &reference,
    ]);
    let (ls, _) = strata(&["--config", &cfg, "ls"]);
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
    pulled_lazily_reads_like_a_normal_unpack(&s, "root-ctr", &reference);
}
