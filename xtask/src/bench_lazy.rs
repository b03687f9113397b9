//! `cargo xtask bench lazy`: time to first read and bytes fetched for an image in a local
//! registry, (a) full pull + unpack vs (b) lazy pull of its eStargz form through the http
//! plugin. Both talk to docker-registry through a counting proxy on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rootfs::testing::{FaultProxy, TestRegistry};

use crate::bench_nfs::drop_caches;
use crate::bench_unpack::{Comp, TAG, build_strata, cache_dir, ensure_image, target_dir};

/// Runs the benchmark.
pub fn bench_lazy() -> Result<()> {
    crate::require_root()?;
    crate::ensure_packages(&[("docker-registry", "docker-registry"), ("skopeo", "skopeo")])?;
    let strata = build_strata()?;
    crate::run(
        &crate::cargo(),
        &["build", "--release", "-p", "strata-plugin-http", "--lib"],
    )?;
    let work = tempfile::Builder::new()
        .prefix("strata-bench-lazy-")
        .tempdir_in("/var/tmp")
        .context("work dir")?;
    let w = |name: &str| work.path().join(name);
    let plugins = w("plugins");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(
        target_dir().join("release/libstrata_plugin_http.so"),
        plugins.join("libstrata_plugin_http.so"),
    )
    .context("install the http plugin")?;

    let image = ensure_image(&cache_dir()?, "os", Comp::Gzip)?;
    let file = small_file(&image.layout)?;
    eprintln!("xtask: converting the image to eStargz ...");
    let src = format!("{}:{TAG}", image.layout.display());
    let est = w("estargz");
    run_ok(Command::new(&strata).args([
        "convert",
        "--estargz",
        &src,
        "--out",
        est.to_str().context("path")?,
    ]))?;
    let registry = TestRegistry::start()?;
    registry.push(&image.layout, TAG, "bench/full:v1")?;
    registry.push(&est, TAG, "bench/lazy:v1")?;
    let proxy = FaultProxy::start(registry.addr())?;
    let est_size = dir_size(&est.join("blobs"))?;

    // (a) Full pull + unpack, then mount and read the file.
    drop_caches()?;
    proxy.reset_counters();
    let start = Instant::now();
    let full_root = w("root-full");
    let out = run_ok(Command::new(&strata).args([
        "--root",
        full_root.to_str().context("path")?,
        "pull",
        "--plain-http",
        &format!("{}/bench/full:v1", proxy.host()),
    ]))?;
    let full_pull_time = start.elapsed();
    let image_ref = content_image(&full_root, &out)?;
    let target = w("rootfs-full");
    std::fs::create_dir_all(&target)?;
    run_ok(Command::new(&strata).args([
        "--root",
        full_root.to_str().context("path")?,
        "mount",
        &image_ref,
        target.to_str().context("path")?,
    ]))?;
    let bytes = std::fs::read(target.join(&file)).context("read the file (full)")?;
    let full_time = start.elapsed();
    let full_bytes = proxy.body_bytes();
    run_ok(Command::new(&strata).args([
        "--root",
        full_root.to_str().context("path")?,
        "umount",
        target.to_str().context("path")?,
    ]))?;

    // (b) Lazy pull, then mount (serving FUSE layers in the foreground) and read the file.
    drop_caches()?;
    proxy.reset_counters();
    let lazy_root = w("root-lazy");
    let config = w("lazy.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\nplugins_dir = {:?}\n[filesystem]\nplugin = \"http\"\n\
             [filesystem.options]\ncache_dir = {:?}\nbackground_fetch = false\n\
             [filesystem.options.registry.hosts.\"{}\"]\nplain_http = true\n",
            lazy_root,
            plugins,
            w("cache"),
            proxy.host()
        ),
    )?;
    let cfg = config.to_str().context("path")?;
    let start = Instant::now();
    let out = run_ok(Command::new(&strata).args([
        "--config",
        cfg,
        "pull",
        "--lazy",
        "--plain-http",
        &format!("{}/bench/lazy:v1", proxy.host()),
    ]))?;
    let lazy_pull_time = start.elapsed();
    let image_ref = content_image(&lazy_root, &out)?;
    let target = w("rootfs-lazy");
    std::fs::create_dir_all(&target)?;
    let mut mount = Killed(
        Command::new(&strata)
            .args(["--config", cfg, "mount", "--foreground", &image_ref])
            .arg(&target)
            .stdout(Stdio::null())
            .spawn()
            .context("start strata mount --foreground")?,
    );
    let lazy_bytes_read = loop {
        if let Ok(b) = std::fs::read(target.join(&file)) {
            break b;
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!(
                "the lazy rootfs did not show {} within 300 s",
                file.display()
            );
        }
        if let Some(status) = mount.0.try_wait()? {
            bail!("strata mount --foreground exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let lazy_time = start.elapsed();
    let lazy_bytes = proxy.body_bytes();
    if lazy_bytes_read != bytes {
        bail!(
            "{} differs between the full and the lazy rootfs",
            file.display()
        );
    }
    mount.stop();

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "\nbench lazy: OS image, {:.0} MiB gzip ({:.0} MiB eStargz), {:.0} MiB uncompressed; first read of /{} ({} bytes)\n",
        mib(image.compressed),
        mib(est_size),
        mib(image.uncompressed),
        file.display(),
        bytes.len()
    );
    println!(
        "{:<34} {:>16} {:>20}",
        "", "time to read", "fetched from registry"
    );
    println!(
        "{:<34} {:>14.2} s {:>16.1} MiB",
        "(a) full pull + unpack + mount",
        full_time.as_secs_f64(),
        mib(full_bytes)
    );
    println!(
        "{:<34} {:>14.2} s {:>16.1} MiB",
        "(b) lazy pull + mount (eStargz)",
        lazy_time.as_secs_f64(),
        mib(lazy_bytes)
    );
    println!(
        "\n(pull alone: full {:.2} s, lazy {:.2} s; the rest is mount and first read)",
        full_pull_time.as_secs_f64(),
        lazy_pull_time.as_secs_f64()
    );
    println!(
        "\nlazy / full: time {:.3} (target < 0.1), bytes {:.2}% of the eStargz image (target < 5%)",
        lazy_time.as_secs_f64() / full_time.as_secs_f64(),
        100.0 * lazy_bytes as f64 / est_size as f64
    );
    Ok(())
}

/// A small regular file of the image's first layer (relative path).
fn small_file(layout: &Path) -> Result<PathBuf> {
    let tars = layout.parent().context("layout dir")?.join("tars");
    let first = tars.join("layer-0.tar");
    let f = std::fs::File::open(&first).with_context(|| format!("open {}", first.display()))?;
    let mut archive = tar::Archive::new(f);
    for entry in archive.entries()? {
        let entry = entry?;
        let size = entry.header().size()?;
        if entry.header().entry_type().is_file() && (1024..=65536).contains(&size) {
            return Ok(entry.path()?.into_owned());
        }
    }
    bail!("no small file in {}", first.display())
}

/// `<root>/content@<manifest digest>` from `strata pull`'s output.
fn content_image(root: &Path, out: &std::process::Output) -> Result<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let digest = stderr
        .split_whitespace()
        .find_map(|w| w.rsplit_once('@').map(|(_, d)| d.to_string()))
        .filter(|d| d.starts_with("sha256:"))
        .with_context(|| format!("strata pull did not name the image: {stderr}"))?;
    Ok(format!("{}@{digest}", root.join("content").display()))
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in walk(dir)? {
        total += entry.metadata()?.len();
    }
    Ok(total)
}

fn walk(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(walk(&entry.path())?);
        } else {
            out.push(entry);
        }
    }
    Ok(out)
}

fn run_ok(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A child stopped with SIGTERM (then killed) when dropped.
struct Killed(Child);

impl Killed {
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.stop();
    }
}
