//! `cargo xtask bench serve`: `ctr images import` (with unpack) of a realistic OS image into a
//! private containerd 1.6, with `strata serve` as proxy snapshotter vs containerd's built-in
//! overlayfs snapshotter, in the same run, interleaved, printed as a ratio.
//!
//! The image (a few hundred MB, gzip) is made offline from this machine's `/usr`: several layers
//! of its files plus a top layer that deletes and rewrites some of them, written once to
//! `target/bench-serve/os-image.tar` and reused. Content is imported once without unpacking
//! (untimed, kept by its own namespace), so each timed import measures the unpack through the
//! snapshotter, not the ingest of blobs. Every timed import starts cold (sync, page cache
//! dropped), which removes an order effect seen otherwise (the run after a GC was slower).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

const IMAGE: &str = "docker.io/library/strata-bench-os:latest";
/// Layers made from those files (plus one top layer of changes).
const BASE_LAYERS: usize = 6;
/// Timed imports per snapshotter (even: each snapshotter goes first equally often).
const ROUNDS: usize = 6;
/// Bound on one `ctr` call.
const CTR_TIMEOUT: Duration = Duration::from_secs(900);

/// Runs the benchmark.
pub fn bench_serve() -> Result<()> {
    super::require_root()?;
    super::require_kernel_features()?;
    super::ensure_packages(&[("containerd", "containerd"), ("runc", "runc")])?;
    let cargo = super::cargo();
    super::run(
        &cargo,
        &["build", "--release", "-p", "strata", "--bin", "strata"],
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::workspace_root().join("target"));
    let strata = target.join("release/strata");
    let cache = target.join("bench-serve");
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let archive = cache.join("os-image.tar");
    if !archive.exists() {
        eprintln!("xtask: building the OS image from /usr (once) ...");
        let t = Instant::now();
        build_os_image(&archive)?;
        eprintln!("xtask: image built in {:.1?}", t.elapsed());
    }
    let size = std::fs::metadata(&archive)?.len();
    eprintln!(
        "xtask: image {} ({:.0} MiB compressed)",
        archive.display(),
        size as f64 / 1048576.0
    );

    let work = Work::new()?;
    let dir = work.0.clone();
    let strata_sock = dir.join("strata.sock");
    let mut procs = Procs::default();
    procs.start(
        "strata serve",
        Command::new(&strata)
            .arg("--root")
            .arg(dir.join("strata"))
            .args(["--log-level", "warn", "serve", "--address"])
            .arg(&strata_sock),
        &dir.join("strata.log"),
    )?;
    wait_until("strata serve to listen", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&strata_sock).is_ok()
    })?;
    let cd = dir.join("containerd");
    std::fs::create_dir_all(&cd)?;
    std::fs::write(cd.join("config.toml"), containerd_config(&cd, &strata_sock))?;
    procs.start(
        "containerd",
        Command::new("containerd")
            .arg("--config")
            .arg(cd.join("config.toml")),
        &dir.join("containerd.log"),
    )?;
    let sock = cd.join("containerd.sock");
    let ctr = |ns: &str, args: &[&str]| -> Result<Duration> {
        let t = Instant::now();
        let out = run_bounded(
            Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .args(["--namespace", ns])
                .args(args),
            CTR_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "ctr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(t.elapsed())
    };
    wait_until("containerd to answer", Duration::from_secs(60), || {
        ctr("default", &["version"]).is_ok()
    })?;

    let archive_s = archive.to_str().context("archive path is not UTF-8")?;
    ctr(
        "bench-content",
        &["images", "import", "--no-unpack", archive_s],
    )?;
    let mut times: Vec<(&str, Vec<f64>)> = vec![("overlayfs", Vec::new()), ("strata", Vec::new())];
    // CPU seconds of (strata serve, containerd) during each timed import.
    let mut cpu: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(), Default::default()];
    let (strata_pid, containerd_pid) = (procs.pid(0), procs.pid(1));
    for round in 0..ROUNDS {
        // Alternate the order so neither snapshotter always runs first.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for i in order {
            let snapshotter = times[i].0;
            let ns = format!("bench-{snapshotter}-{round}");
            settle();
            let cpu_before = (cpu_seconds(strata_pid), cpu_seconds(containerd_pid));
            let t = ctr(
                &ns,
                &["images", "import", "--snapshotter", snapshotter, archive_s],
            )?;
            cpu[i].0.push(cpu_seconds(strata_pid) - cpu_before.0);
            cpu[i].1.push(cpu_seconds(containerd_pid) - cpu_before.1);
            eprintln!(
                "xtask: round {round}: import+unpack with {snapshotter:<9} {:.2} s",
                t.as_secs_f64()
            );
            times[i].1.push(t.as_secs_f64());
            // Untimed: drop the image and, through containerd's GC, its snapshots.
            ctr(&ns, &["images", "rm", "--sync", IMAGE])?;
        }
    }
    let overlay = median(&times[0].1);
    let strata_t = median(&times[1].1);
    println!(
        "bench serve: ctr images import + unpack of a {:.0} MiB ({} layers) OS image, median of {ROUNDS}:",
        size as f64 / 1048576.0,
        BASE_LAYERS + 1
    );
    println!("  containerd overlayfs snapshotter  {overlay:>7.2} s");
    println!("  strata serve (proxy snapshotter)  {strata_t:>7.2} s");
    println!(
        "  ratio strata / overlayfs          {:>7.2}x",
        strata_t / overlay
    );
    println!(
        "  CPU per import (median): containerd {:.2} s with overlayfs, {:.2} s with strata; strata serve {:.2} s",
        median(&cpu[0].1),
        median(&cpu[1].1),
        median(&cpu[1].0)
    );
    procs.stop_all();
    Ok(())
}

/// User + system CPU seconds of process `pid` so far (0 if unknown).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Starts every import from the same state: the previous one's writes and deletes flushed, the
/// page cache dropped (so the archive and the content store are read cold each time), a pause.
fn settle() {
    let _ = Command::new("sync").status();
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("xtask: cannot drop the page cache: {e}");
    }
    std::thread::sleep(Duration::from_secs(2));
}

/// A temp dir for the run, removed (after unmounting what is left under it) when dropped.
struct Work(PathBuf);

impl Work {
    fn new() -> Result<Work> {
        let dir = std::env::temp_dir().join(format!("strata-bench-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Work(dir))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| Path::new(p).starts_with(&self.0))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Started daemons, stopped (SIGTERM, then SIGKILL after 20 s) in reverse order, always waited.
#[derive(Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    /// Process id of the `n`th started process (0 if none).
    fn pid(&self, n: usize) -> u32 {
        self.0.get(n).map_or(0, |(_, c)| c.id())
    }

    fn start(&mut self, name: &str, cmd: &mut Command, log: &Path) -> Result<()> {
        let file = File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        self.0.push((name.to_owned(), child));
        Ok(())
    }

    fn stop_all(&mut self) {
        while let Some((name, mut child)) = self.0.pop() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("xtask: {name} did not stop on SIGTERM; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<std::process::Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {shown}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private containerd (TESTING.md) with strata as the proxy snapshotter `strata`; the built-in
/// overlayfs snapshotter stays enabled as the peer.
fn containerd_config(dir: &Path, strata_socket: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[proxy_plugins.strata]
  type = "snapshot"
  address = "{s}"
"#,
        s = strata_socket.display()
    )
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes an OCI archive of about 400 MB of `/usr` files in [`BASE_LAYERS`]
/// layers plus a top layer that deletes every 50th file and rewrites every 50th other one.
fn build_os_image(out: &Path) -> Result<()> {
    // A mix like a distribution's: binaries, libraries, headers and many small data files.
    let mut files = Vec::new();
    let mut total = 0u64;
    for (top, budget) in [
        ("/usr/bin", 60 << 20),
        ("/usr/sbin", 10 << 20),
        ("/usr/libexec", 20 << 20),
        ("/usr/include", 60 << 20),
        ("/usr/share", 130 << 20),
        ("/usr/lib", 120 << 20),
    ] {
        let mut taken = 0u64;
        crate::bench_unpack::collect(Path::new(top), budget, &mut files, &mut taken)?;
        total += taken;
    }
    let per_layer = total / BASE_LAYERS as u64 + 1;
    let mut layers: Vec<Vec<PathBuf>> = vec![Vec::new(); BASE_LAYERS];
    let mut acc = 0u64;
    for (path, size) in &files {
        let i = ((acc / per_layer) as usize).min(BASE_LAYERS - 1);
        layers[i].push(path.clone());
        acc += size;
    }

    let blobs_dir = out.with_extension("blobs");
    std::fs::create_dir_all(&blobs_dir)?;
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, paths) in layers.iter().enumerate() {
        eprintln!(
            "xtask: layer {} of {}: {} entries",
            i + 1,
            BASE_LAYERS + 1,
            paths.len()
        );
        let (digest, size, diff_id) = write_layer(&blobs_dir, |b| {
            let mut dirs = std::collections::BTreeSet::new();
            for p in paths {
                for a in p.ancestors().skip(1) {
                    if a != Path::new("/") && dirs.insert(a.to_path_buf()) {
                        b.append_path_with_name(a, a.strip_prefix("/")?)?;
                    }
                }
                b.append_path_with_name(p, p.strip_prefix("/")?)?;
            }
            Ok(())
        })?;
        descs.push((digest, size));
        diff_ids.push(diff_id);
    }
    // Top layer: what an `apt-get remove` / config edit on top of a base image looks like.
    let regular: Vec<&PathBuf> = files
        .iter()
        .filter(|(_, s)| *s > 0)
        .map(|(p, _)| p)
        .collect();
    let (digest, size, diff_id) = write_layer(&blobs_dir, |b| {
        for (n, p) in regular.iter().enumerate() {
            let rel = p.strip_prefix("/")?;
            if n % 50 == 0 {
                let name = rel.file_name().context("no file name")?.to_string_lossy();
                let wh = rel.with_file_name(format!(".wh.{name}"));
                let mut h = tar::Header::new_ustar();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(0);
                h.set_mode(0o644);
                b.append_data(&mut h, wh, std::io::empty())?;
            } else if n % 50 == 25 {
                let data = format!("rewritten {}\n", p.display());
                let mut h = tar::Header::new_ustar();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, rel, data.as_bytes())?;
            }
        }
        Ok(())
    })?;
    descs.push((digest, size));
    diff_ids.push(diff_id);

    let config = serde_json::to_vec(&json!({
        "architecture": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a },
        "os": "linux",
        "config": { "Cmd": ["/usr/bin/bash"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))?;
    let config_hex = sha256_hex(&config);
    std::fs::write(blobs_dir.join(&config_hex), &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_hex}"),
            "size": config.len(),
        },
        "layers": descs.iter().map(|(d, s)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{d}"),
            "size": s,
        })).collect::<Vec<_>>(),
    }))?;
    let manifest_hex = sha256_hex(&manifest);
    std::fs::write(blobs_dir.join(&manifest_hex), &manifest)?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_hex}"),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    }))?;

    let partial = out.with_extension("partial");
    let mut b = tar::Builder::new(BufWriter::new(File::create(&partial)?));
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for entry in std::fs::read_dir(&blobs_dir)? {
        let entry = entry?;
        let name = format!("blobs/sha256/{}", entry.file_name().to_string_lossy());
        b.append_path_with_name(entry.path(), name)?;
    }
    b.into_inner()?.flush()?;
    std::fs::rename(&partial, out)?;
    std::fs::remove_dir_all(&blobs_dir)?;
    Ok(())
}

/// Writes one gzip layer blob built by `fill` into `dir`; returns (digest hex, size, diff ID).
fn write_layer(
    dir: &Path,
    fill: impl FnOnce(&mut tar::Builder<HashingWriter<GzEncoder<HashingWriter<File>>>>) -> Result<()>,
) -> Result<(String, u64, String)> {
    let tmp = dir.join("layer.partial");
    let gz = GzEncoder::new(
        HashingWriter::new(File::create(&tmp)?),
        Compression::default(),
    );
    let mut b = tar::Builder::new(HashingWriter::new(gz));
    b.follow_symlinks(false);
    fill(&mut b)?;
    let uncompressed = b.into_inner()?;
    let diff_id = format!("sha256:{}", uncompressed.hex());
    let compressed = uncompressed.inner.finish()?;
    let (digest, size) = (compressed.hex(), compressed.len);
    std::fs::rename(&tmp, dir.join(&digest))?;
    Ok((digest, size, diff_id))
}

/// A writer that hashes and counts what passes through.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    fn hex(&self) -> String {
        self.hash
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
