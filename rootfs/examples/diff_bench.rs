//! The program behind `cargo xtask bench diff` (run it through that: it builds the image and
//! this program in release mode).
//!
//! `diff_bench <oci-layout> <work-dir> <runs> <warm|cold>`: unpacks the image (tag `t`) into an
//! overlay snapshotter under `<work-dir>`, makes 100 changes in an active snapshot on it
//! (40 files modified, 40 added, 20 deleted), then times the two differs on the same snapshot:
//!
//! * overlay differ: `rootfs::diff` of the active snapshot (reads only its upperdir), and
//!   `diff_overlay_upper` alone;
//! * walking differ: `diff_dirs` over a mounted view of the image and the container's mount.
//!
//! Best of `<runs>`, page cache warm or dropped before every run (`cold`). Both layers must
//! carry the same file changes (checked, not timed).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rootfs::content::ContentStore;
use rootfs::diff::{Compression, DiffOutput, diff_dirs, diff_overlay_upper};
use rootfs::mount::MountGuard;
use rootfs::{UnpackOpts, Unpacker};
use snapshot_core::{Labels, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("diff_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [layout, work, runs, cache] = args.as_slice() else {
        return Err("usage: diff_bench <oci-layout> <work-dir> <runs> <warm|cold>".into());
    };
    let runs: usize = runs.parse()?;
    let cold = cache == "cold";
    let work = PathBuf::from(work);
    std::fs::create_dir_all(&work)?;

    let image_store = ContentStore::open(Path::new(layout))?;
    let image = image_store.resolve(Some("t"))?;
    let sn = OverlaySnapshotter::open(&work.join("snapshots"), Options::default())?;
    let t = Instant::now();
    let chain = Unpacker::new().apply_layers(
        &image.layers,
        &sn,
        &rootfs::applier::ContentApplier::new(image_store),
        &UnpackOpts::default(),
    )?;
    eprintln!("diff_bench: image unpacked in {:.1?}", t.elapsed());

    let lower_dir = work.join("lower");
    let merged_dir = work.join("merged");
    std::fs::create_dir_all(&lower_dir)?;
    std::fs::create_dir_all(&merged_dir)?;
    let lower = MountGuard::mount(
        &sn.view("image-view", chain.as_ref(), &Labels::new())?,
        &lower_dir,
    )?;
    let container_mounts = sn.prepare("container", chain.as_ref(), &Labels::new())?;
    let merged = MountGuard::mount(&container_mounts, &merged_dir)?;

    // 100 changes spread over the tree.
    let mut files = Vec::new();
    let mut dirs = 0usize;
    walk(&lower_dir, &lower_dir, &mut files, &mut dirs)?;
    if files.len() < 1000 {
        return Err(format!("the image has only {} files", files.len()).into());
    }
    let step = files.len() / 60;
    let picked: Vec<&PathBuf> = files.iter().step_by(step).take(60).collect();
    let (modified, deleted) = picked.split_at(40);
    for rel in modified {
        let p = merged_dir.join(rel);
        let mut data = std::fs::read(&p)?;
        data.extend_from_slice(b"\nchanged by diff_bench\n");
        std::fs::write(&p, data)?;
    }
    for rel in deleted {
        std::fs::remove_file(merged_dir.join(rel))?;
    }
    for (i, rel) in modified.iter().enumerate() {
        let parent = rel.parent().unwrap_or(Path::new(""));
        std::fs::write(
            merged_dir
                .join(parent)
                .join(format!("added-by-diff-bench-{i}")),
            format!("new file {i}\n"),
        )?;
    }
    rustix::fs::sync();

    let out = ContentStore::create(&work.join("out"))?;
    let upperdir = PathBuf::from(
        container_mounts
            .first()
            .and_then(|m| m.option("upperdir"))
            .ok_or("the container's mount has no upperdir")?,
    );
    let lowers: Vec<PathBuf> = container_mounts
        .first()
        .and_then(|m| m.option("lowerdir"))
        .map(|l| l.split(':').map(PathBuf::from).collect())
        .unwrap_or_default();

    let mut best = [Duration::MAX; 3];
    let mut outputs: [Option<DiffOutput>; 3] = [None, None, None];
    for run in 0..runs {
        for k in 0..3 {
            let i = (k + run) % 3;
            if cold {
                rustix::fs::sync();
                std::fs::write("/proc/sys/vm/drop_caches", "3\n")?;
            }
            let t = Instant::now();
            let o = match i {
                0 => rootfs::diff("container", &sn, &out, Compression::Gzip)?,
                1 => diff_overlay_upper(&upperdir, &lowers, Compression::Gzip, &out)?,
                _ => diff_dirs(&lower_dir, &merged_dir, Compression::Gzip, &out)?,
            };
            let e = t.elapsed();
            best[i] = best[i].min(e);
            outputs[i] = Some(o);
        }
    }
    let names = |o: &Option<DiffOutput>| -> Res<BTreeSet<String>> {
        let o = o.as_ref().ok_or("no output")?;
        entry_names(&out, o)
    };
    let (via_diff, overlay, walking) = (
        names(&outputs[0])?,
        names(&outputs[1])?,
        names(&outputs[2])?,
    );
    let files_only = |s: &BTreeSet<String>| -> BTreeSet<String> {
        s.iter().filter(|n| !n.ends_with('/')).cloned().collect()
    };
    let same = files_only(&overlay) == files_only(&walking) && via_diff == overlay;

    lower.unmount()?;
    merged.unmount()?;
    let cache = if cold {
        "page cache dropped before every run"
    } else {
        "page cache warm"
    };
    println!(
        "bench diff: 100 changes (40 files modified, 40 added, 20 deleted) in an active snapshot over \
         the OS image ({} files, {dirs} directories, {} layers); gzip; best of {runs}, {cache}:",
        files.len(),
        image.layers.len()
    );
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "  overlay differ: rootfs::diff of the active snapshot  {:>9.4} s  ({} entries)",
        s(best[0]),
        via_diff.len()
    );
    println!(
        "  overlay differ: diff_overlay_upper alone            {:>9.4} s  ({} entries)",
        s(best[1]),
        overlay.len()
    );
    println!(
        "  walking differ: diff_dirs(image view, container)    {:>9.4} s  ({} entries)",
        s(best[2]),
        walking.len()
    );
    println!(
        "  ratio walking / overlay (rootfs::diff)              {:>9.1}x",
        s(best[2]) / s(best[0])
    );
    println!(
        "  same file changes in both layers: {}",
        if same { "yes" } else { "NO" }
    );
    if !same {
        let only_o: Vec<_> = files_only(&overlay)
            .difference(&files_only(&walking))
            .cloned()
            .collect();
        let only_w: Vec<_> = files_only(&walking)
            .difference(&files_only(&overlay))
            .cloned()
            .collect();
        return Err(format!(
            "the differs disagree: only overlay {only_o:?}, only walking {only_w:?}"
        )
        .into());
    }
    Ok(())
}

/// Regular files and symlinks under `dir` (relative to `root`), sorted, and the number of
/// directories.
fn walk(root: &Path, dir: &Path, files: &mut Vec<PathBuf>, dirs: &mut usize) -> Res<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let ft = e.file_type()?;
        if ft.is_dir() {
            *dirs += 1;
            walk(root, &e.path(), files, dirs)?;
        } else if ft.is_file() {
            files.push(e.path().strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// The entry names of a gzip layer blob.
fn entry_names(store: &ContentStore, out: &DiffOutput) -> Res<BTreeSet<String>> {
    let mut data = Vec::new();
    store.open_blob(&out.blob)?.read_to_end(&mut data)?;
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(&data[..]));
    let mut names = BTreeSet::new();
    for e in archive.entries()? {
        let e = e?;
        names.insert(String::from_utf8_lossy(&e.path_bytes()).into_owned());
    }
    Ok(names)
}
