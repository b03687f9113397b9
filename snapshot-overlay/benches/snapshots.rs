//! `cargo xtask bench snapshots`: prepare+commit, stat and walk over 10,000 snapshots of the
//! overlay snapshotter on a disk-backed temp dir. Prints ops/s and walk times.

use std::time::Instant;

use snapshot_core::{CommitOpts, Labels, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

const CHAINS: usize = 100;
const DEPTH: usize = 100;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::Builder::new()
        .prefix("strata-bench-")
        .tempdir_in("/var/tmp")?;
    let sn = OverlaySnapshotter::open(dir.path(), Options::default())?;
    let total = CHAINS * DEPTH;

    let start = Instant::now();
    for c in 0..CHAINS {
        let mut parent = String::new();
        for d in 0..DEPTH {
            let key = format!("extract-{c}-{d}");
            let name = format!("layer-{c}-{d}");
            sn.prepare(&key, &parent, &Labels::new())?;
            let mut opts = CommitOpts::default();
            opts.labels.insert("chain".into(), c.to_string());
            sn.commit(&name, &key, &opts)?;
            parent = name;
        }
    }
    let elapsed = start.elapsed();
    println!(
        "prepare+commit: {total} snapshots in {:.2}s = {:.0} pairs/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );

    let start = Instant::now();
    for c in 0..CHAINS {
        for d in 0..DEPTH {
            sn.stat(&format!("layer-{c}-{d}"))?;
        }
    }
    let elapsed = start.elapsed();
    println!("stat: {:.0} ops/s", total as f64 / elapsed.as_secs_f64());

    let start = Instant::now();
    let mut n = 0;
    sn.walk(&[], &mut |_| {
        n += 1;
        Ok(())
    })?;
    println!(
        "walk (all {n}): {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );

    let start = Instant::now();
    let mut m = 0;
    sn.walk(&["labels.chain==7,kind==committed"], &mut |_| {
        m += 1;
        Ok(())
    })?;
    println!(
        "walk (filter, {m} match): {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );

    let start = Instant::now();
    for c in 0..CHAINS {
        sn.view(
            &format!("view-{c}"),
            &format!("layer-{c}-{}", DEPTH - 1),
            &Labels::new(),
        )?;
        sn.mounts(&format!("view-{c}"))?;
    }
    println!(
        "view+mounts on a {DEPTH}-layer chain: {:.0} ops/s",
        CHAINS as f64 / start.elapsed().as_secs_f64()
    );
    sn.close()?;
    Ok(())
}
