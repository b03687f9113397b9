//! `cargo xtask bench lazy`: time to first read and bytes fetched for an image in a local
//! registry, (a) full pull + unpack vs (b) lazy pull of its eStargz form through the http
//! plugin. Both talk to docker-registry through a counting proxy on 127.0.0.1. Three rounds
//! (`STRATA_BENCH_RUNS`), each with fresh state and a dropped page cache; the ratio is of the
//! medians.

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

    // STRATA_BENCH_LOG=<level> shows the lazy path's logs (with timestamps) on stderr.
    let log = std::env::var("STRATA_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let runs: usize = match std::env::var("STRATA_BENCH_RUNS") {
        Ok(n) => n.parse().context("STRATA_BENCH_RUNS: a number")?,
        Err(_) => 3,
    };
    let bench = Bench {
        strata: &strata,
        proxy: &proxy,
        file: &file,
        plugins: &plugins,
        log: &log,
    };
    let mut full = Vec::new();
    let mut lazy = Vec::new();
    for round in 0..runs.max(1) {
        let a = bench.full(&w(&format!("full-{round}")))?;
        let b = bench.lazy(&w(&format!("lazy-{round}")))?;
        if a.content != b.content {
            bail!(
                "{} differs between the full and the lazy rootfs",
                file.display()
            );
        }
        full.push(a);
        lazy.push(b);
    }

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "\nbench lazy: OS image, {:.0} MiB gzip ({:.0} MiB eStargz), {:.0} MiB uncompressed; first read of /{} ({} bytes); {} rounds, page cache dropped before each path\n",
        mib(image.compressed),
        mib(est_size),
        mib(image.uncompressed),
        file.display(),
        full[0].content.len(),
        full.len()
    );
    println!(
        "{:<7} {:>22} {:>22} {:>12} {:>12}",
        "round", "(a) full pull+mount", "(b) lazy pull+mount", "time ratio", "bytes"
    );
    for (i, (a, b)) in full.iter().zip(&lazy).enumerate() {
        println!(
            "{:<7} {:>8.2} s {:>7.1} MiB {:>8.2} s {:>7.1} MiB {:>12.3} {:>11.2}%",
            i + 1,
            a.time.as_secs_f64(),
            mib(a.fetched),
            b.time.as_secs_f64(),
            mib(b.fetched),
            b.time.as_secs_f64() / a.time.as_secs_f64(),
            100.0 * b.fetched as f64 / est_size as f64
        );
    }
    let median = |v: &[Sample], f: fn(&Sample) -> Duration| {
        let mut t: Vec<Duration> = v.iter().map(f).collect();
        t.sort();
        t[t.len() / 2]
    };
    let (a, b) = (median(&full, |s| s.time), median(&lazy, |s| s.time));
    println!(
        "\nmedian time to first read: (a) {:.2} s (pull {:.2} s), (b) {:.2} s (pull {:.2} s)",
        a.as_secs_f64(),
        median(&full, |s| s.pulled).as_secs_f64(),
        b.as_secs_f64(),
        median(&lazy, |s| s.pulled).as_secs_f64(),
    );
    let fetched = lazy.iter().map(|s| s.fetched).max().unwrap_or(0);
    println!(
        "lazy / full: time {:.3} (target < 0.1), bytes at most {:.2}% of the eStargz image (target < 5%)",
        b.as_secs_f64() / a.as_secs_f64(),
        100.0 * fetched as f64 / est_size as f64
    );
    Ok(())
}

/// What one path measured.
struct Sample {
    /// From start to the file read.
    time: Duration,
    /// From start to the end of the pull (the chain ID printed).
    pulled: Duration,
    /// Body bytes from the registry.
    fetched: u64,
    /// The file's bytes.
    content: Vec<u8>,
}

struct Bench<'a> {
    strata: &'a Path,
    proxy: &'a FaultProxy,
    file: &'a Path,
    plugins: &'a Path,
    log: &'a str,
}

impl Bench<'_> {
    /// (a) Full pull + unpack + mount (one `strata pull --mount`), then read the file.
    fn full(&self, dir: &Path) -> Result<Sample> {
        let (root, target) = (dir.join("root"), dir.join("rootfs"));
        std::fs::create_dir_all(&target)?;
        drop_caches()?;
        self.proxy.reset_counters();
        let start = Instant::now();
        let mut cmd = Command::new(self.strata);
        cmd.arg("--root")
            .arg(&root)
            .args(["pull", "--plain-http", "--name", "bench", "--mount"])
            .arg(&target)
            .arg(format!("{}/bench/full:v1", self.proxy.host()));
        let (mut child, pulled) = start_until_mounted(&mut cmd, "bench")?;
        let content = std::fs::read(target.join(self.file)).context("read the file (full)")?;
        let time = start.elapsed();
        let fetched = self.proxy.body_bytes();
        child.stop();
        run_ok(
            Command::new(self.strata)
                .arg("--root")
                .arg(&root)
                .arg("umount")
                .arg(&target),
        )?;
        Ok(Sample {
            time,
            pulled,
            fetched,
            content,
        })
    }

    /// (b) Lazy pull + mount, served by the same process (`strata pull --lazy --mount`), then
    /// read the file.
    fn lazy(&self, dir: &Path) -> Result<Sample> {
        let (root, target) = (dir.join("root"), dir.join("rootfs"));
        std::fs::create_dir_all(&target)?;
        let config = dir.join("lazy.toml");
        std::fs::write(
            &config,
            format!(
                "root = {:?}\nplugins_dir = {:?}\n[filesystem]\nplugin = \"http\"\n\
                 [filesystem.options]\ncache_dir = {:?}\nbackground_fetch = false\n\
                 [filesystem.options.registry.hosts.\"{}\"]\nplain_http = true\n",
                root,
                self.plugins,
                dir.join("cache"),
                self.proxy.host()
            ),
        )?;
        drop_caches()?;
        self.proxy.reset_counters();
        let start = Instant::now();
        let mut cmd = Command::new(self.strata);
        cmd.args(["--log-level", self.log, "--config"])
            .arg(&config)
            .args([
                "pull",
                "--lazy",
                "--plain-http",
                "--name",
                "bench",
                "--mount",
            ])
            .arg(&target)
            .arg(format!("{}/bench/lazy:v1", self.proxy.host()));
        let (mut child, pulled) = start_until_mounted(&mut cmd, "bench")?;
        let content = std::fs::read(target.join(self.file)).context("read the file (lazy)")?;
        let time = start.elapsed();
        let fetched = self.proxy.body_bytes();
        child.stop();
        Ok(Sample {
            time,
            pulled,
            fetched,
            content,
        })
    }
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

/// Starts `strata pull … --mount`, waits until it prints the mounted snapshot's `name`; returns
/// the child (stopped when dropped) and when its pull ended (it prints the chain ID first).
fn start_until_mounted(cmd: &mut Command, name: &str) -> Result<(Killed, Duration)> {
    use std::io::BufRead;
    let start = Instant::now();
    let mut child = Killed(
        cmd.stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {cmd:?}"))?,
    );
    let stdout = child.0.stdout.take().context("stdout")?;
    let mut pulled = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("read strata's output")?;
        pulled.get_or_insert_with(|| start.elapsed());
        if line == name {
            return Ok((child, pulled.unwrap_or_default()));
        }
    }
    let status = child.0.wait()?;
    bail!("{cmd:?} ended ({status}) before mounting")
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
