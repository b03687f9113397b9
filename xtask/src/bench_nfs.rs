//! `cargo xtask bench nfs`: reading a whole realistic layer through the `nfs` plugin (a real
//! nfs-ganesha on 127.0.0.1, the plugin loaded through the real loader, release build) vs reading
//! the same files from local disk, cold (page cache dropped, server side included) and a second
//! time (cached), in the same run, interleaved, printed as figures and ratios.
//!
//! The layer (a few hundred MB) is made offline from this machine's `/usr`: its files copied
//! into a layer store (`<store>/sha256/<hex>/` with its metadata index), written once to
//! `target/bench-nfs/store` and reused.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

#[path = "../../fs-plugin-api/tests/common/nfs_server.rs"]
mod nfs_server;

/// Bytes of file data copied into the layer.
const LAYER_BYTES: u64 = 300 << 20;
/// Largest single file taken from /usr.
const MAX_FILE: u64 = 16 << 20;
/// Timed rounds (each reads the layer four ways).
const ROUNDS: usize = 3;
/// The layer's (made-up) digest.
const HEX: &str = "b5e7c3a0d1f2e4b6a8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f0a2b4c6d8e0f2a4";

/// Runs the benchmark.
pub fn bench_nfs() -> Result<()> {
    super::require_root()?;
    super::ensure_packages(&[
        ("ganesha.nfsd", "nfs-ganesha"),
        (
            "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so",
            "nfs-ganesha-vfs",
        ),
        ("rpcbind", "rpcbind"),
    ])?;
    let cargo = super::cargo();
    super::run(
        &cargo,
        &["build", "--release", "--lib", "-p", "strata-plugin-nfs"],
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::workspace_root().join("target"));
    let cache = target.join("bench-nfs");
    let store = cache.join("store");
    let layer = store.join("sha256").join(HEX);
    if !layer.is_dir() {
        eprintln!("xtask: building the layer from /usr (once) ...");
        build_layer(&store, &layer)?;
    }
    let (files, bytes) = tree_size(&layer)?;
    eprintln!(
        "xtask: layer {}: {files} files, {:.0} MiB",
        layer.display(),
        bytes as f64 / 1048576.0
    );

    let plugins = cache.join("plugins");
    fs::create_dir_all(&plugins)?;
    fs::copy(
        target.join("release/libstrata_plugin_nfs.so"),
        plugins.join("libstrata_plugin_nfs.so"),
    )
    .context("install the nfs plugin")?;

    let server = nfs_server::NfsServer::start_on_free_ports(&store);
    let registry = fs_plugin_api::PluginRegistry::scan(&plugins)?;
    let fs = registry.load("nfs", &server.options(10_000))?;
    let mountpoint = tempfile::tempdir()?;
    let labels: fs_plugin_api::model::Labels = [(
        fs_plugin_api::LABEL_LAYER_DIGEST.to_owned(),
        format!("sha256:{HEX}"),
    )]
    .into_iter()
    .collect();
    fs.mount(mountpoint.path(), &labels)
        .context("mount the layer through the plugin")?;
    let result = measure(&layer, mountpoint.path(), files, bytes);
    let unmounted = fs.unmount(mountpoint.path());
    drop(fs);
    drop(server);
    result?;
    unmounted.context("unmount")?;
    Ok(())
}

fn measure(local: &Path, nfs: &Path, files: u64, bytes: u64) -> Result<()> {
    let mut times: [Vec<Duration>; 4] = Default::default();
    let names = [
        "local, cold",
        "nfs plugin, cold",
        "local, cached",
        "nfs plugin, cached (2nd read)",
    ];
    for round in 0..ROUNDS {
        // Alternate which side goes first.
        let order: [(usize, &Path); 2] = if round % 2 == 0 {
            [(0, local), (1, nfs)]
        } else {
            [(1, nfs), (0, local)]
        };
        for (i, dir) in order {
            drop_caches()?;
            times[i].push(read_tree(dir, files, bytes)?);
            times[i + 2].push(read_tree(dir, files, bytes)?);
        }
        eprintln!("xtask: round {} of {ROUNDS} done", round + 1);
    }
    let median = |v: &Vec<Duration>| {
        let mut v = v.clone();
        v.sort();
        v[v.len() / 2]
    };
    let mb = bytes as f64 / 1e6;
    println!(
        "\nreading a whole layer: {files} files, {mb:.0} MB (median of {ROUNDS} rounds, single reader)"
    );
    let med: Vec<Duration> = times.iter().map(median).collect();
    for (name, t) in names.iter().zip(&med) {
        println!(
            "  {name:<32} {:>8.3} s  {:>8.0} MB/s",
            t.as_secs_f64(),
            mb / t.as_secs_f64()
        );
    }
    println!(
        "  nfs / local, cold:    {:.2}x the time",
        med[1].as_secs_f64() / med[0].as_secs_f64()
    );
    println!(
        "  nfs / local, cached:  {:.2}x the time",
        med[3].as_secs_f64() / med[2].as_secs_f64()
    );
    println!(
        "  nfs cold / nfs cached: {:.1}x faster the second time",
        med[1].as_secs_f64() / med[3].as_secs_f64()
    );
    Ok(())
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches` (server side and FUSE page cache included).
pub fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache")
}

/// Reads every file under `dir` completely; checks the totals; returns the time taken.
fn read_tree(dir: &Path, files: u64, bytes: u64) -> Result<Duration> {
    let start = Instant::now();
    let (mut n, mut total) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                let mut f = fs::File::open(entry.path())
                    .with_context(|| format!("open {}", entry.path().display()))?;
                loop {
                    let r = f
                        .read(&mut buf)
                        .with_context(|| format!("read {}", entry.path().display()))?;
                    if r == 0 {
                        break;
                    }
                    total += r as u64;
                }
                n += 1;
            }
        }
    }
    if (n, total) != (files, bytes) {
        bail!(
            "{}: read {n} files, {total} bytes; expected {files}, {bytes}",
            dir.display()
        );
    }
    Ok(start.elapsed())
}

/// Files and bytes of regular files under `dir`.
fn tree_size(dir: &Path) -> Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let m = entry.metadata()?;
            if m.is_dir() {
                stack.push(entry.path());
            } else if m.is_file() {
                files += 1;
                bytes += m.len();
            }
        }
    }
    Ok((files, bytes))
}

/// Copies files from /usr (directories first-come, up to [`LAYER_BYTES`]) into `layer`, writes
/// the metadata index (no xattrs: copies carry none) and publishes the layer by rename.
fn build_layer(store: &Path, layer: &Path) -> Result<()> {
    let tmp = store.join("sha256").join(format!(".tmp-{HEX}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    let mut copied = 0u64;
    let mut stack = vec![PathBuf::from("/usr")];
    'walk: while let Some(d) = stack.pop() {
        let mut entries: Vec<fs::DirEntry> = match fs::read_dir(&d) {
            Ok(rd) => rd.filter_map(|e| e.ok()).collect(),
            Err(_) => continue,
        };
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Ok(m) = fs::symlink_metadata(entry.path()) else {
                continue;
            };
            let rel = entry.path().strip_prefix("/").map(Path::to_path_buf)?;
            let dest = tmp.join(&rel);
            if m.is_dir() {
                fs::create_dir_all(&dest)?;
                stack.push(entry.path());
            } else if m.is_file() && m.len() <= MAX_FILE {
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent)?;
                }
                if fs::copy(entry.path(), &dest).is_ok() {
                    copied += m.len();
                }
                if copied >= LAYER_BYTES {
                    break 'walk;
                }
            }
        }
    }
    let index_dir = store.join(".strata-meta/sha256");
    fs::create_dir_all(&index_dir)?;
    fs::write(
        index_dir.join(format!("{HEX}.json")),
        format!("{{\"version\":1,\"digest\":\"sha256:{HEX}\",\"entries\":[]}}"),
    )?;
    fs::rename(&tmp, layer).with_context(|| format!("publish {}", layer.display()))?;
    Ok(())
}
