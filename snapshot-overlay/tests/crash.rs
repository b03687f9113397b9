//! Crash consistency: a worker process doing prepare/commit/view/remove is killed with SIGKILL
//! at arbitrary points, again and again; after each kill the store must open, be consistent with
//! the directories, and cleanup must remove every orphan.
//!
//! Runs without the libtest harness: the same binary is the worker when given `--worker <root>`.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use snapshot_core::{CommitOpts, Info, Kind, Labels, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

const ROUNDS: usize = 25;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--worker") {
        worker(Path::new(&args[pos + 1]));
        return;
    }
    // libtest-style listing support so `cargo test -- --list` keeps working.
    if args.iter().any(|a| a == "--list") {
        println!("killed_mid_operation_leaves_a_consistent_store: test");
        return;
    }
    killed_mid_operation_leaves_a_consistent_store();
    println!("test killed_mid_operation_leaves_a_consistent_store ... ok");
}

/// Endless random mutations: prepare (on a random committed parent), write a file, commit,
/// view, remove.
fn worker(root: &Path) {
    let sn = OverlaySnapshotter::open(root, Options::default()).expect("worker: open");
    let pid = std::process::id();
    let mut n: u64 = 0;
    loop {
        n += 1;
        let mut committed = Vec::new();
        sn.walk(&["kind==committed"], &mut |i| {
            committed.push(i.name.clone());
            Ok(())
        })
        .expect("worker: walk");
        let parent = if committed.is_empty() || n.is_multiple_of(5) {
            String::new()
        } else {
            committed[(n as usize * 7919) % committed.len()].clone()
        };
        let key = format!("w{pid}-{n}");
        let mounts = sn
            .prepare(&key, &parent, &Labels::new())
            .expect("worker: prepare");
        let upper = mounts[0]
            .option("upperdir")
            .map(str::to_string)
            .unwrap_or_else(|| mounts[0].source.clone());
        std::fs::write(Path::new(&upper).join(format!("f{n}")), vec![1u8; 4096])
            .expect("worker: write");
        match n % 4 {
            0 => sn.remove(&key).expect("worker: remove active"),
            _ => sn
                .commit(&format!("c{pid}-{n}"), &key, &CommitOpts::default())
                .expect("worker: commit"),
        }
        if n.is_multiple_of(3) && !committed.is_empty() {
            let victim = &committed[(n as usize) % committed.len()];
            // May fail with FailedPrecondition when it has children: that is fine.
            let _ = sn.remove(victim);
            let view = format!("v{pid}-{n}");
            if sn.view(&view, &committed[0], &Labels::new()).is_ok() {
                sn.remove(&view).expect("worker: remove view");
            }
        }
    }
}

fn killed_mid_operation_leaves_a_consistent_store() {
    let dir = tempfile::Builder::new()
        .prefix("strata-crash-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let root = dir.path();
    let exe = std::env::current_exe().expect("current exe");
    let mut total_snapshots_seen = 0;
    let mut total_orphans = 0;
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["--worker", &root.display().to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn worker");
        // Vary the kill point so it lands in different phases of different operations.
        std::thread::sleep(Duration::from_millis(150 + (round as u64 * 37) % 200));
        child.kill().expect("SIGKILL worker");
        let status = child.wait().expect("wait worker");
        assert!(
            !status.success(),
            "round {round}: the worker must have been killed, not exited ({status})"
        );
        let (snapshots, orphans) = check_consistent(root, round);
        total_snapshots_seen = snapshots;
        total_orphans += orphans;
    }
    assert!(
        total_snapshots_seen > 0,
        "the workers never committed anything; the test exercised nothing"
    );
    // Kills land inside transactions often enough (about one round in four here) that a run
    // without a single orphan means the kills never hit mid-operation.
    assert!(
        total_orphans > 0,
        "no kill left an orphan directory: the test did not crash mid-operation"
    );
}

/// Opens the store, checks metadata against directories, runs cleanup, checks no orphan is left
/// and that the store still works. Returns the number of snapshots.
fn check_consistent(root: &Path, round: usize) -> (usize, usize) {
    let sn = OverlaySnapshotter::open(root, Options::default())
        .unwrap_or_else(|e| panic!("round {round}: store does not open after a crash: {e}"));
    let mut infos: HashMap<String, Info> = HashMap::new();
    sn.walk(&[], &mut |i| {
        infos.insert(i.name.clone(), i.clone());
        Ok(())
    })
    .unwrap_or_else(|e| panic!("round {round}: walk: {e}"));
    for info in infos.values() {
        if !info.parent.is_empty() {
            let p = infos.get(&info.parent).unwrap_or_else(|| {
                panic!(
                    "round {round}: {} has a missing parent {}",
                    info.name, info.parent
                )
            });
            assert_eq!(
                p.kind,
                Kind::Committed,
                "round {round}: parent of {} is not committed",
                info.name
            );
        }
        if info.kind != Kind::Committed {
            // Every active/view has its directory: mounts name it.
            let m = sn
                .mounts(&info.name)
                .unwrap_or_else(|e| panic!("round {round}: mounts {}: {e}", info.name));
            let src = m[0]
                .option("upperdir")
                .map(str::to_string)
                .unwrap_or_else(|| m[0].source.clone());
            assert!(
                Path::new(&src).is_dir(),
                "round {round}: {} has no directory {src}",
                info.name
            );
        }
        // Committed snapshots: stat + usage must work (usage reads only metadata).
        sn.usage(&info.name)
            .unwrap_or_else(|e| panic!("round {round}: usage {}: {e}", info.name));
    }
    let before = std::fs::read_dir(root.join("snapshots"))
        .expect("read snapshots")
        .count();
    let orphans = before.saturating_sub(infos.len());
    eprintln!(
        "round {round}: {} snapshots, {orphans} orphan directories before cleanup",
        infos.len()
    );
    sn.cleanup()
        .unwrap_or_else(|e| panic!("round {round}: cleanup: {e}"));
    let dirs: Vec<String> = std::fs::read_dir(root.join("snapshots"))
        .expect("read snapshots")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        dirs.len(),
        infos.len(),
        "round {round}: after cleanup every directory belongs to a snapshot and vice versa: dirs {dirs:?}"
    );
    for d in &dirs {
        assert!(
            root.join("snapshots").join(d).join("fs").is_dir(),
            "round {round}: snapshot dir {d} has no fs"
        );
    }
    // Still usable.
    let key = format!("check-{round}");
    sn.prepare(&key, "", &Labels::new())
        .unwrap_or_else(|e| panic!("round {round}: prepare after crash: {e}"));
    sn.remove(&key)
        .unwrap_or_else(|e| panic!("round {round}: remove after crash: {e}"));
    sn.close().expect("close");
    (infos.len(), orphans)
}
