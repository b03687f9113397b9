//! `cargo xtask bench diff`: the cost of turning 100 changed files into a layer over the OS
//! image of `bench unpack`, with the overlay differ (reads only the container's upperdir) and
//! with the walking differ (compares the image's tree with the container's), in the same run.
//! The work is done by the release program `rootfs/examples/diff_bench.rs`; best of
//! `STRATA_BENCH_RUNS` (default 3), page cache warm, or dropped before every run with
//! `STRATA_BENCH_COLD=1`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench_unpack::{Comp, PACKAGES, cache_dir, ensure_image, target_dir};

/// Runs the benchmark.
pub fn bench_diff() -> Result<()> {
    super::require_root()?;
    super::require_kernel_features()?;
    super::ensure_packages(PACKAGES)?;
    let runs = std::env::var("STRATA_BENCH_RUNS").unwrap_or_else(|_| "3".into());
    let cold = std::env::var_os("STRATA_BENCH_COLD").is_some_and(|v| v == "1");
    super::run(
        &super::cargo(),
        &[
            "build",
            "--release",
            "-p",
            "rootfs",
            "--example",
            "diff_bench",
        ],
    )?;
    let bin = target_dir().join("release/examples/diff_bench");
    let cache = cache_dir()?;
    let image = ensure_image(&cache, "os", Comp::Gzip)?;
    let work = cache.join("diff-work");
    let _cleanup = Cleanup(&work);
    let status = Command::new(&bin)
        .arg(&image.layout)
        .arg(&work)
        .arg(&runs)
        .arg(if cold { "cold" } else { "warm" })
        .status()
        .with_context(|| format!("run {}", bin.display()))?;
    if !status.success() {
        bail!("{} failed: {status}", bin.display());
    }
    Ok(())
}

/// Unmounts what is left under the work directory and removes it.
struct Cleanup<'a>(&'a Path);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| Path::new(p).starts_with(self.0))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = std::fs::remove_dir_all(self.0);
    }
}
