//! `cargo xtask bench unpack`: strata's unpack side by side, in the same run, with
//! `umoci unpack` and with the floor, `pigz -dc | tar -x` / `zstd -dc | tar -x` over the same
//! layers in order, on images generated offline:
//!
//! * `small-files`: one layer of 50,000 text files of 1-8 KiB in 500 directories;
//! * `large-files`: one layer of 4 files of 200 MiB, about 3/4 incompressible;
//! * `os`: about 400 MiB of this machine's `/usr` in 5 layers plus a top layer that deletes
//!   every 50th file and rewrites every 50th other one;
//!
//! each as gzip and as zstd (umoci 0.4 cannot read zstd layers). Images are written once under
//! `target/bench-unpack/` and reused. Each tool gets a fresh output directory per run; the
//! previous run's output is removed and the disk synced before the next run starts. strata makes
//! each layer durable (one `syncfs` per layer) before it commits it, so the peers' times are
//! also shown followed by `sync -f` on their output, the like-for-like figure. Best of
//! `STRATA_BENCH_RUNS` (default 3) with the page cache warm (blobs read just before); with
//! `STRATA_BENCH_COLD=1` every run starts with the page cache dropped instead.
//! `STRATA_BENCH_IMAGES=small-files,large-files,os` picks images.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Bumped when the generated images change, so stale caches are not reused.
const IMAGES_VERSION: &str = "v1";
/// The tag every generated image has.
pub const TAG: &str = "t";

/// Debian packages of the peers: (a command they provide, the package).
pub const PACKAGES: &[(&str, &str)] = &[("umoci", "umoci"), ("pigz", "pigz"), ("zstd", "zstd")];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Comp {
    Gzip,
    Zstd,
}

impl Comp {
    fn name(self) -> &'static str {
        match self {
            Comp::Gzip => "gzip",
            Comp::Zstd => "zstd",
        }
    }

    fn media_type(self) -> &'static str {
        match self {
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// The command that decompresses to stdout.
    fn decompressor(self) -> &'static str {
        match self {
            Comp::Gzip => "pigz -dc",
            Comp::Zstd => "zstd -q -dc",
        }
    }
}

/// A generated OCI layout (tag [`TAG`]).
pub struct Image {
    pub layout: PathBuf,
    /// Layer blobs, bottom first.
    pub blobs: Vec<PathBuf>,
    pub compressed: u64,
    pub uncompressed: u64,
}

/// Runs the benchmark.
pub fn bench_unpack() -> Result<()> {
    super::require_root()?;
    super::require_kernel_features()?;
    super::ensure_packages(PACKAGES)?;
    let runs = runs()?;
    children_cpu()?; // Looks up the clock tick before anything is timed.
    let cold = std::env::var_os("STRATA_BENCH_COLD").is_some_and(|v| v == "1");
    let strata = build_strata()?;
    let cache = cache_dir()?;
    let scratch = Scratch::new(&cache)?;
    let work = scratch.dir.clone();

    let only = std::env::var("STRATA_BENCH_IMAGES").ok();
    let mut rows = Vec::new();
    for name in ["small-files", "large-files", "os"] {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|n| n == name))
        {
            continue;
        }
        for comp in [Comp::Gzip, Comp::Zstd] {
            let image = ensure_image(&cache, name, comp)?;
            eprintln!(
                "xtask: {name} {}: {} layers, {:.0} MiB compressed, {:.0} MiB of tar",
                comp.name(),
                image.blobs.len(),
                mib(image.compressed),
                mib(image.uncompressed)
            );
            let mut tools: Vec<Tool> = vec![Tool::Strata(&strata)];
            if comp == Comp::Gzip {
                tools.push(Tool::Umoci);
            }
            tools.push(Tool::Floor(comp));
            let mut best: Vec<Option<Timing>> = vec![None; tools.len()];
            for run in 0..runs {
                // Rotate the order so that no tool always goes first.
                for k in 0..tools.len() {
                    let i = (k + run) % tools.len();
                    let out = work.join(format!("out-{i}"));
                    prepare_run(&out, &image, cold)?;
                    let t = tools[i].run(&image, &out)?;
                    eprintln!(
                        "xtask:   run {run}: {:<6} {:>7.2} s (+ sync {:.2} s), cpu {:.2} s",
                        tools[i].name(),
                        t.unpack.as_secs_f64(),
                        t.sync.as_secs_f64(),
                        t.cpu.as_secs_f64()
                    );
                    let slot = &mut best[i];
                    match slot {
                        Some(b) => {
                            let cpu = b.cpu.min(t.cpu);
                            if t.unpack < b.unpack {
                                *b = t;
                            }
                            b.cpu = cpu;
                        }
                        None => *slot = Some(t),
                    }
                    remove(&out)?;
                }
            }
            let get = |kind: &str| {
                tools
                    .iter()
                    .position(|t| t.name() == kind)
                    .and_then(|i| best[i].clone())
            };
            rows.push(Row {
                image: name,
                comp,
                compressed: image.compressed,
                uncompressed: image.uncompressed,
                strata: get("strata").context("no strata timing")?,
                umoci: get("umoci"),
                floor: get("tar -x").context("no floor timing")?,
            });
        }
    }
    print_table(&rows, runs, cold, &scratch.what);
    Ok(())
}

/// Where the tools write: by default a fresh ext4 (with a journal, as on most hosts) on a loop
/// device doing direct I/O to a file under `target/`, so that every run starts on the same
/// kind of file system, whatever the host's (this machine's own ext4 has no journal, and
/// without one ext4 skips inodes freed in the last minute at every file creation: the runs
/// after a `rm -rf` of 50,000 files would be several times slower). `STRATA_BENCH_DIR` names a
/// directory to use instead (e.g. a tmpfs).
struct Scratch {
    dir: PathBuf,
    what: String,
    image: Option<PathBuf>,
    loop_device: Option<String>,
    mounted: bool,
}

impl Scratch {
    fn new(cache: &Path) -> Result<Scratch> {
        if let Some(dir) = std::env::var_os("STRATA_BENCH_DIR") {
            let dir = PathBuf::from(dir).join("strata-bench-unpack");
            remove(&dir)?;
            fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            return Ok(Scratch {
                what: format!("{} (STRATA_BENCH_DIR)", dir.display()),
                dir,
                image: None,
                loop_device: None,
                mounted: false,
            });
        }
        let dir = cache.join("scratch");
        if is_mount_point(&dir)? {
            // Left over by an interrupted run.
            let _ = Command::new("umount").arg(&dir).status();
        }
        let image = cache.join("scratch.ext4");
        if image.exists() {
            // Loop devices left over by an interrupted run.
            let image_s = image.to_str().context("scratch path is not UTF-8")?;
            for line in command_output("losetup", &["-j", image_s])?.lines() {
                if let Some(dev) = line.split(':').next() {
                    let _ = Command::new("losetup").args(["-d", dev]).status();
                }
            }
            fs::remove_file(&image).with_context(|| format!("remove {}", image.display()))?;
        }
        let mut scratch = Scratch {
            dir: dir.clone(),
            what: String::new(),
            image: Some(image.clone()),
            loop_device: None,
            mounted: false,
        };
        File::create(&image)
            .and_then(|f| f.set_len(16 << 30))
            .with_context(|| format!("create {}", image.display()))?;
        let image_s = image.to_str().context("scratch path is not UTF-8")?;
        command_output(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                image_s,
            ],
        )?;
        let device = command_output("losetup", &["--find", "--show", "--direct-io=on", image_s])?;
        let device = device.trim().to_string();
        scratch.loop_device = Some(device.clone());
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let dir_s = dir.to_str().context("scratch path is not UTF-8")?;
        command_output("mount", &["-t", "ext4", &device, dir_s])?;
        scratch.mounted = true;
        scratch.what = format!("a fresh 16 GiB ext4 (journal, defaults) on {device} (direct I/O)");
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        if let Some(dev) = &self.loop_device {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        if let Some(image) = &self.image {
            let _ = fs::remove_file(image);
        }
    }
}

fn is_mount_point(dir: &Path) -> Result<bool> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| Path::new(p) == dir))
}

/// Runs a command, failing with its stderr; returns its stdout.
fn command_output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn runs() -> Result<usize> {
    match std::env::var("STRATA_BENCH_RUNS") {
        Ok(v) => {
            let n: usize = v
                .parse()
                .with_context(|| format!("STRATA_BENCH_RUNS={v:?} is not a number"))?;
            if n == 0 {
                bail!("STRATA_BENCH_RUNS must be at least 1");
            }
            Ok(n)
        }
        Err(_) => Ok(3),
    }
}

/// Builds the release `strata` binary and returns its path.
pub fn build_strata() -> Result<PathBuf> {
    super::run(
        &super::cargo(),
        &["build", "--release", "-p", "strata", "--bin", "strata"],
    )?;
    let bin = target_dir().join("release/strata");
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }
    Ok(bin)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::workspace_root().join("target"))
}

pub fn cache_dir() -> Result<PathBuf> {
    let dir = target_dir().join("bench-unpack");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

fn mib(n: u64) -> f64 {
    n as f64 / 1048576.0
}

/// Removes `path` (a tree) if it exists.
fn remove(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("stat {}", path.display())),
    }
}

/// Flushes everything, then warms (reads the blobs) or drops the page cache.
fn prepare_run(out: &Path, image: &Image, cold: bool) -> Result<()> {
    remove(out)?;
    sync_all()?;
    if cold {
        fs::write("/proc/sys/vm/drop_caches", "3\n").context("drop the page cache")?;
    } else {
        let mut buf = vec![0u8; 1 << 20];
        for b in &image.blobs {
            let mut f = File::open(b).with_context(|| format!("open {}", b.display()))?;
            while f
                .read(&mut buf)
                .with_context(|| format!("read {}", b.display()))?
                > 0
            {}
        }
    }
    Ok(())
}

fn sync_all() -> Result<()> {
    let status = Command::new("sync").status().context("run sync")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    Ok(())
}

/// Times `sync -f dir` (syncfs of the file system holding `dir`).
fn time_syncfs(dir: &Path) -> Result<Duration> {
    let t = Instant::now();
    let status = Command::new("sync")
        .arg("-f")
        .arg(dir)
        .status()
        .context("run sync -f")?;
    if !status.success() {
        bail!("sync -f {} failed: {status}", dir.display());
    }
    Ok(t.elapsed())
}

#[derive(Clone, Debug)]
struct Timing {
    unpack: Duration,
    /// A `sync -f` right after (zero for strata, which syncs itself).
    sync: Duration,
    /// CPU time (user + system) of the tool's processes and threads: what the machine's other
    /// load does not change.
    cpu: Duration,
}

/// User + system CPU time of this process's waited-for children (`/proc/self/stat` fields
/// `cutime` and `cstime`).
fn children_cpu() -> Result<Duration> {
    let stat = fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/self/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); cutime and cstime are fields 16 and 17.
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .context("short /proc/self/stat")?
            .parse::<u64>()
            .context("malformed /proc/self/stat")
    };
    let ticks = tick(16)? + tick(17)?;
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let hz = match HZ.get() {
        Some(hz) => *hz,
        None => {
            let hz = command_output("getconf", &["CLK_TCK"])?
                .trim()
                .parse::<u64>()
                .context("getconf CLK_TCK")?;
            *HZ.get_or_init(|| hz)
        }
    };
    Ok(Duration::from_secs_f64(ticks as f64 / hz.max(1) as f64))
}

enum Tool<'a> {
    Strata(&'a Path),
    Umoci,
    Floor(Comp),
}

impl Tool<'_> {
    fn name(&self) -> &'static str {
        match self {
            Tool::Strata(_) => "strata",
            Tool::Umoci => "umoci",
            Tool::Floor(_) => "tar -x",
        }
    }

    /// Unpacks `image` into the fresh `out` and times it (and the sync after it).
    fn run(&self, image: &Image, out: &Path) -> Result<Timing> {
        let layout = image.layout.to_str().context("image path is not UTF-8")?;
        let reference = format!("{layout}:{TAG}");
        let mut cmd = match self {
            Tool::Strata(bin) => {
                let mut c = Command::new(bin);
                c.arg("--root").arg(out).args(["unpack", &reference]);
                c
            }
            Tool::Umoci => {
                let mut c = Command::new("umoci");
                c.args(["unpack", "--image", &reference]).arg(out);
                c
            }
            Tool::Floor(comp) => {
                fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
                let mut script = String::from("set -e -o pipefail\n");
                for b in &image.blobs {
                    script.push_str(&format!(
                        "{} '{}' | tar -xf - -C '{}'\n",
                        comp.decompressor(),
                        b.display(),
                        out.display()
                    ));
                }
                let mut c = Command::new("bash");
                c.arg("-c").arg(script);
                c
            }
        };
        let cpu_before = children_cpu()?;
        let t = Instant::now();
        let output = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("start {}", self.name()))?;
        let unpack = t.elapsed();
        let cpu = children_cpu()?.saturating_sub(cpu_before);
        if !output.status.success() {
            bail!(
                "{} failed on {} ({}): {}",
                self.name(),
                image.layout.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let sync = match self {
            Tool::Strata(_) => Duration::ZERO,
            _ => time_syncfs(out)?,
        };
        Ok(Timing { unpack, sync, cpu })
    }
}

struct Row {
    image: &'static str,
    comp: Comp,
    compressed: u64,
    uncompressed: u64,
    strata: Timing,
    umoci: Option<Timing>,
    floor: Timing,
}

fn print_table(rows: &[Row], runs: usize, cold: bool, target: &str) {
    let cache = if cold {
        "page cache dropped before every run"
    } else {
        "page cache warm (blobs read just before every run)"
    };
    println!("bench unpack: best of {runs} runs, {cache}; output on {target}.");
    println!(
        "strata = `strata --root <fresh> unpack` (release, syncfs per layer); umoci = `umoci unpack`; \
         floor = `pigz -dc`/`zstd -dc` | `tar -x` per layer, in order."
    );
    println!(
        "Peers are shown as `unpack time / with sync -f after`; ratios are strata's time over the peer's \
         (below 1 = strata faster), `plain / with sync`."
    );
    println!(
        "{:<12} {:<5} {:>8} {:>8} {:>8} {:>15} {:>15} {:>13} {:>13}",
        "image",
        "comp",
        "blob MiB",
        "tar MiB",
        "strata s",
        "umoci s",
        "floor s",
        "strata/umoci",
        "strata/floor"
    );
    for r in rows {
        let s = r.strata.unpack.as_secs_f64();
        let pair = |t: &Timing| {
            let a = t.unpack.as_secs_f64();
            (a, a + t.sync.as_secs_f64())
        };
        let (umoci, umoci_ratio) = match &r.umoci {
            Some(t) => {
                let (a, b) = pair(t);
                (
                    format!("{a:.2} / {b:.2}"),
                    format!("{:.2} / {:.2}", s / a, s / b),
                )
            }
            None => ("n/a".to_string(), "n/a".to_string()),
        };
        let (fa, fb) = pair(&r.floor);
        println!(
            "{:<12} {:<5} {:>8.0} {:>8.0} {:>8.2} {:>15} {:>15} {:>13} {:>13}",
            r.image,
            r.comp.name(),
            mib(r.compressed),
            mib(r.uncompressed),
            s,
            umoci,
            format!("{fa:.2} / {fb:.2}"),
            umoci_ratio,
            format!("{:.2} / {:.2}", s / fa, s / fb),
        );
    }
    println!("(umoci 0.4 cannot read zstd layers: n/a.)");
    println!();
    println!(
        "CPU seconds (user + system, all processes and threads; least of the runs): the cost that \
         the machine's other load does not change."
    );
    println!(
        "{:<12} {:<5} {:>8} {:>8} {:>8} {:>13} {:>13}",
        "image", "comp", "strata", "umoci", "floor", "strata/umoci", "strata/floor"
    );
    for r in rows {
        let s = r.strata.cpu.as_secs_f64();
        let f = r.floor.cpu.as_secs_f64();
        let (umoci, umoci_ratio) = match &r.umoci {
            Some(t) => {
                let u = t.cpu.as_secs_f64();
                (format!("{u:.2}"), format!("{:.2}", s / u))
            }
            None => ("n/a".to_string(), "n/a".to_string()),
        };
        println!(
            "{:<12} {:<5} {:>8.2} {:>8} {:>8.2} {:>13} {:>13.2}",
            r.image,
            r.comp.name(),
            s,
            umoci,
            f,
            umoci_ratio,
            s / f
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Image generation.

/// The image `name` compressed with `comp`, generated (once) if missing.
pub fn ensure_image(cache: &Path, name: &str, comp: Comp) -> Result<Image> {
    let dir = cache.join(format!("{name}-{IMAGES_VERSION}"));
    let tars = dir.join("tars");
    let layout = dir.join(comp.name());
    let done = layout.join(".complete");
    if !done.exists() {
        let tar_list = dir.join("tars.complete");
        if !tar_list.exists() {
            remove(&tars)?;
            fs::create_dir_all(&tars).with_context(|| format!("create {}", tars.display()))?;
            eprintln!("xtask: generating the {name} image's layers (once) ...");
            let t = Instant::now();
            match name {
                "small-files" => small_files(&tars)?,
                "large-files" => large_files(&tars)?,
                "os" => os_image(&tars)?,
                other => bail!("unknown image {other}"),
            }
            fs::write(&tar_list, "").context("mark layers complete")?;
            eprintln!("xtask: layers written in {:.1?}", t.elapsed());
        }
        remove(&layout)?;
        eprintln!(
            "xtask: compressing the {name} image with {} (once) ...",
            comp.name()
        );
        write_layout(&tars, &layout, comp)?;
        fs::write(&done, "").context("mark image complete")?;
    }
    read_image(&layout)
}

/// Layer tars in `dir`, bottom first: `layer-0.tar`, `layer-1.tar`, ...
fn layer_tars(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut tars = Vec::new();
    for i in 0.. {
        let p = dir.join(format!("layer-{i}.tar"));
        if !p.exists() {
            break;
        }
        tars.push(p);
    }
    if tars.is_empty() {
        bail!("no layers in {}", dir.display());
    }
    Ok(tars)
}

fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex(&h.finalize()), n))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes an OCI layout at `layout` with the layer tars of `tars` compressed by `comp` (with
/// the `pigz` / `zstd` commands, at their default levels).
fn write_layout(tars: &Path, layout: &Path, comp: Comp) -> Result<()> {
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("create {}", blobs.display()))?;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layer_tars(tars)? {
        let (diff_id, _) = sha256_file(&tar)?;
        let tmp = blobs.join("layer.partial");
        let out = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        let mut cmd = match comp {
            Comp::Gzip => Command::new("pigz"),
            Comp::Zstd => {
                let mut c = Command::new("zstd");
                c.args(["-q", "-T0"]);
                c
            }
        };
        let status = cmd
            .arg("-c")
            .arg(&tar)
            .stdout(out)
            .status()
            .with_context(|| format!("compress {}", tar.display()))?;
        if !status.success() {
            bail!("compressing {} failed: {status}", tar.display());
        }
        let (digest, size) = sha256_file(&tmp)?;
        fs::rename(&tmp, blobs.join(&digest)).context("rename blob")?;
        layers.push(json!({
            "mediaType": comp.media_type(),
            "digest": format!("sha256:{digest}"),
            "size": size,
        }));
        diff_ids.push(format!("sha256:{diff_id}"));
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))?;
    let config_hex = hex(&Sha256::digest(&config));
    fs::write(blobs.join(&config_hex), &config).context("write config")?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_hex}"),
            "size": config.len(),
        },
        "layers": layers,
    }))?;
    let manifest_hex = hex(&Sha256::digest(&manifest));
    fs::write(blobs.join(&manifest_hex), &manifest).context("write manifest")?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_hex}"),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": TAG },
        }],
    }))?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .context("write oci-layout")?;
    fs::write(layout.join("index.json"), index).context("write index.json")?;
    Ok(())
}

/// Reads back what [`write_layout`] wrote.
fn read_image(layout: &Path) -> Result<Image> {
    let read_json = |p: PathBuf| -> Result<serde_json::Value> {
        let data = fs::read(&p).with_context(|| format!("read {}", p.display()))?;
        serde_json::from_slice(&data).with_context(|| format!("parse {}", p.display()))
    };
    let blob = |digest: &serde_json::Value| -> Result<PathBuf> {
        let d = digest.as_str().context("digest is not a string")?;
        let hex = d.strip_prefix("sha256:").context("digest is not sha256")?;
        Ok(layout.join("blobs/sha256").join(hex))
    };
    let index = read_json(layout.join("index.json"))?;
    let manifest = read_json(blob(&index["manifests"][0]["digest"])?)?;
    let config = read_json(blob(&manifest["config"]["digest"])?)?;
    let mut blobs = Vec::new();
    let mut compressed = 0;
    for l in manifest["layers"]
        .as_array()
        .context("manifest has no layers")?
    {
        blobs.push(blob(&l["digest"])?);
        compressed += l["size"].as_u64().context("layer size")?;
    }
    let tars = layout
        .parent()
        .context("layout has no parent")?
        .join("tars");
    let mut uncompressed = 0;
    for t in layer_tars(&tars)? {
        uncompressed += fs::metadata(&t)
            .with_context(|| format!("stat {}", t.display()))?
            .len();
    }
    let diff_ids = config["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len);
    if diff_ids != blobs.len() {
        bail!(
            "{}: {} layers but {diff_ids} diff IDs",
            layout.display(),
            blobs.len()
        );
    }
    Ok(Image {
        layout: layout.to_path_buf(),
        blobs,
        compressed,
        uncompressed,
    })
}

/// A small, fast PRNG (xorshift64*), reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn tar_builder(path: &Path) -> Result<tar::Builder<BufWriter<File>>> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut b = tar::Builder::new(BufWriter::with_capacity(1 << 20, f));
    b.follow_symlinks(false);
    Ok(b)
}

fn finish_tar(b: tar::Builder<BufWriter<File>>) -> Result<()> {
    b.into_inner()
        .context("finish tar")?
        .flush()
        .context("flush tar")
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// One layer of 50,000 text-like files of 1-8 KiB in 500 directories.
fn small_files(dir: &Path) -> Result<()> {
    const WORDS: &[&str] = &[
        "fn", "let", "mut", "struct", "impl", "return", "match", "self", "String", "Vec", "u64",
        "Result", "Ok", "Err", "if", "else", "for", "in", "while", "loop", "pub", "use", "mod",
        "const", "static", "where", "trait", "enum", "{", "}", "(", ")", ";", "=", "==", "->",
        "config", "value", "path", "buffer", "layer", "snapshot", "error", "index", "count",
    ];
    let mut rng = Rng(0x5eed_0001);
    let mut b = tar_builder(&dir.join("layer-0.tar"))?;
    let mut data = Vec::with_capacity(8192);
    for d in 0..500u32 {
        let dname = format!("src/m{:02}/d{d:03}/", d / 50);
        if d.is_multiple_of(50) {
            b.append_data(
                &mut header(tar::EntryType::Directory, 0o755, 0),
                format!("src/m{:02}/", d / 50),
                std::io::empty(),
            )?;
        }
        b.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            &dname,
            std::io::empty(),
        )?;
        for f in 0..100 {
            let size = 1024 + rng.below(7 * 1024 + 1) as usize;
            data.clear();
            while data.len() < size {
                let w = WORDS[rng.below(WORDS.len() as u64) as usize];
                data.extend_from_slice(w.as_bytes());
                data.push(if rng.below(8) == 0 { b'\n' } else { b' ' });
            }
            data.truncate(size);
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o644, size as u64),
                format!("{dname}f{f:03}.rs"),
                &data[..],
            )?;
        }
    }
    finish_tar(b)
}

/// One layer of 4 files of 200 MiB; each 64 KiB block is 3/4 random bytes and 1/4 text.
fn large_files(dir: &Path) -> Result<()> {
    const SIZE: u64 = 200 << 20;
    const BLOCK: usize = 64 << 10;
    let mut rng = Rng(0x5eed_0002);
    let mut b = tar_builder(&dir.join("layer-0.tar"))?;
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o755, 0),
        "data/",
        std::io::empty(),
    )?;
    for i in 0..4 {
        let mut reader = BlockReader {
            rng: Rng(rng.next() | 1),
            left: SIZE,
            block: vec![0u8; BLOCK],
            pos: BLOCK,
        };
        b.append_data(
            &mut header(tar::EntryType::Regular, 0o644, SIZE),
            format!("data/blob-{i}.bin"),
            &mut reader,
        )?;
    }
    finish_tar(b)
}

/// Generates the large files' content on the fly.
struct BlockReader {
    rng: Rng,
    left: u64,
    block: Vec<u8>,
    pos: usize,
}

impl Read for BlockReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        if self.pos == self.block.len() {
            let random = self.block.len() * 3 / 4;
            let (noise, text) = self.block.split_at_mut(random);
            self.rng.fill(noise);
            for (i, c) in text.iter_mut().enumerate() {
                *c = b"the quick brown fox jumps over the lazy dog\n"[i % 44];
            }
            self.pos = 0;
        }
        let n = buf
            .len()
            .min(self.block.len() - self.pos)
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        self.left -= n as u64;
        Ok(n)
    }
}

/// About 400 MiB of `/usr` in 5 layers (by size, in path order) plus a top layer deleting
/// every 50th file and rewriting every 50th other one.
fn os_image(dir: &Path) -> Result<()> {
    const BASE_LAYERS: usize = 5;
    let mut files = Vec::new();
    let mut total = 0u64;
    for (top, budget) in [
        ("/usr/bin", 60u64 << 20),
        ("/usr/sbin", 10 << 20),
        ("/usr/libexec", 20 << 20),
        ("/usr/include", 60 << 20),
        ("/usr/share", 130 << 20),
        ("/usr/lib", 120 << 20),
    ] {
        let mut taken = 0u64;
        collect(Path::new(top), budget, &mut files, &mut taken)?;
        total += taken;
    }
    if files.is_empty() {
        bail!("found no files under /usr");
    }
    let per_layer = total / BASE_LAYERS as u64 + 1;
    let mut layers: Vec<Vec<&Path>> = vec![Vec::new(); BASE_LAYERS];
    let mut acc = 0u64;
    for (path, size) in &files {
        let i = ((acc / per_layer) as usize).min(BASE_LAYERS - 1);
        layers[i].push(path);
        acc += size;
    }
    for (i, paths) in layers.iter().enumerate() {
        let mut b = tar_builder(&dir.join(format!("layer-{i}.tar")))?;
        let mut dirs = std::collections::BTreeSet::new();
        for p in paths {
            for a in p.ancestors().skip(1).collect::<Vec<_>>().into_iter().rev() {
                if a != Path::new("/") && dirs.insert(a.to_path_buf()) {
                    b.append_path_with_name(a, a.strip_prefix("/")?)
                        .with_context(|| format!("add {}", a.display()))?;
                }
            }
            b.append_path_with_name(p, p.strip_prefix("/")?)
                .with_context(|| format!("add {}", p.display()))?;
        }
        finish_tar(b)?;
    }
    let mut b = tar_builder(&dir.join(format!("layer-{BASE_LAYERS}.tar")))?;
    let regular: Vec<&Path> = files
        .iter()
        .filter(|(_, s)| *s > 0)
        .map(|(p, _)| p.as_path())
        .collect();
    for (n, p) in regular.iter().enumerate() {
        let rel = p.strip_prefix("/")?;
        if n.is_multiple_of(50) {
            let name = rel.file_name().context("no file name")?.to_string_lossy();
            let wh = rel.with_file_name(format!(".wh.{name}"));
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o644, 0),
                wh,
                std::io::empty(),
            )?;
        } else if n % 50 == 25 {
            let data = format!("rewritten {}\n", p.display());
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o644, data.len() as u64),
                rel,
                data.as_bytes(),
            )?;
        }
    }
    finish_tar(b)
}

/// Walks `dir` in name order collecting regular files and symlinks with their sizes, until
/// `budget` bytes of files are taken.
pub fn collect(
    dir: &Path,
    budget: u64,
    out: &mut Vec<(PathBuf, u64)>,
    total: &mut u64,
) -> Result<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if *total >= budget {
            return Ok(());
        }
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        let ft = md.file_type();
        if ft.is_dir() {
            collect(&p, budget, out, total)?;
        } else if ft.is_file() {
            if File::open(&p).is_err() {
                continue;
            }
            *total += md.len();
            out.push((p, md.len()));
        } else if ft.is_symlink() {
            out.push((p, 0));
        }
    }
    Ok(())
}
