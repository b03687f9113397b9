//! `strata serve` as a process and its shutdown: the socket (stale, in use, removed on exit),
//! SIGTERM with calls in flight, state and orphan cleanup across a restart. Needs root.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod grpc;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grpc::GrpcSnapshotter;
use snapshot_core::{CommitOpts, ErrorKind, Info, Labels, Mount, Result, Snapshotter, Usage};
use snapshot_overlay::{Options, OverlaySnapshotter};
use support::{run_bounded, start_strata, strata_bin};

fn labels() -> Labels {
    Labels::new()
}

fn snapshot_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn serve_replaces_a_stale_socket_and_removes_it_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("strata.sock");
    // A socket file nobody listens on, as a killed server leaves it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());

    let server = start_strata(
        &tmp.path().join("root"),
        &sock,
        &tmp.path().join("log"),
        &[],
    );
    let sn = GrpcSnapshotter::connect(&sock, "strata").unwrap();
    sn.prepare("a", "", &labels()).unwrap();
    sn.commit("b", "a", &CommitOpts::default()).unwrap();
    assert_eq!(sn.stat("b").unwrap().parent, "");
    drop(sn);

    let status = server.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "expected exit 0 on SIGTERM, got {status:?}"
    );
    assert!(!sock.exists(), "expected the socket removed on exit");
}

#[test]
fn serve_refuses_an_address_in_use_or_not_a_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, "not a socket").unwrap();
    for (address, want) in [(&sock, "in use"), (&file, "not a socket")] {
        let out = run_bounded(
            Command::new(strata_bin())
                .arg("--root")
                .arg(tmp.path().join("root"))
                .args(["serve", "--address"])
                .arg(address),
            Duration::from_secs(30),
        );
        assert!(
            !out.status.success() && out.stderr.contains(want),
            "expected serve on {address:?} to fail with {want:?}, got {out:?}"
        );
    }
    assert!(
        file.is_file(),
        "expected serve to leave a non-socket file alone"
    );
}

#[test]
fn restart_keeps_snapshots_and_cleans_up_what_remove_left() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, sock, log) = (
        tmp.path().join("root"),
        tmp.path().join("s.sock"),
        tmp.path().join("log"),
    );
    let server = start_strata(&root, &sock, &log, &["--async-remove"]);
    let sn = GrpcSnapshotter::connect(&sock, "strata").unwrap();
    sn.prepare("base-a", "", &labels()).unwrap();
    sn.commit("base", "base-a", &CommitOpts::default()).unwrap();
    sn.prepare("gone-a", "base", &labels()).unwrap();
    let before = snapshot_dirs(&root);
    sn.remove("gone-a").unwrap();
    drop(sn);
    assert!(server.stop().is_some_and(|s| s.success()));
    // Asynchronous remove left the directory; so did a "crash" with an orphan.
    assert_eq!(
        snapshot_dirs(&root),
        before,
        "expected remove to leave the dir"
    );
    std::fs::create_dir_all(root.join("snapshots/orphan/fs")).unwrap();

    let server = start_strata(&root, &sock, &log, &[]);
    let sn = GrpcSnapshotter::connect(&sock, "strata").unwrap();
    let mut names = Vec::new();
    sn.walk(&[], &mut |i| {
        names.push(i.name.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(
        names,
        ["base"],
        "expected only the committed snapshot after restart"
    );
    assert_eq!(
        snapshot_dirs(&root).len(),
        1,
        "expected cleanup at start to reclaim the removed and orphaned dirs, got {:?}",
        snapshot_dirs(&root)
    );
    drop(sn);
    assert!(server.stop().is_some_and(|s| s.success()));
}

#[test]
fn sigterm_during_calls_exits_cleanly_and_keeps_every_acknowledged_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, sock, log) = (
        tmp.path().join("root"),
        tmp.path().join("s.sock"),
        tmp.path().join("log"),
    );
    let server = start_strata(&root, &sock, &log, &[]);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..3)
        .map(|t| {
            let (sock, acked) = (sock.clone(), acked.clone());
            std::thread::spawn(move || {
                let sn = GrpcSnapshotter::connect(&sock, "strata").unwrap();
                for i in 0..100_000 {
                    let key = format!("t{t}-{i}");
                    match sn.prepare(&key, "", &labels()) {
                        Ok(_) => acked.lock().unwrap().push(key),
                        Err(e) => return e.kind(),
                    }
                }
                panic!("expected the server to stop answering");
            })
        })
        .collect();
    support::wait_until("some calls", Duration::from_secs(30), || {
        acked.lock().unwrap().len() > 50
    });
    let status = server.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "expected exit 0 after SIGTERM under load, got {status:?}"
    );
    for c in clients {
        // The server stopped answering: the connection is refused (or cut), never a
        // snapshot-level error.
        let kind = c.join().unwrap();
        assert!(
            matches!(kind, ErrorKind::Unavailable | ErrorKind::Unknown),
            "expected the stopped server to be unavailable, got {kind}"
        );
    }

    let server = start_strata(&root, &sock, &log, &[]);
    let sn = GrpcSnapshotter::connect(&sock, "strata").unwrap();
    for key in acked.lock().unwrap().iter() {
        sn.stat(key)
            .unwrap_or_else(|e| panic!("expected acknowledged {key} after restart: {e}"));
    }
    drop(sn);
    assert!(server.stop().is_some_and(|s| s.success()));
}

/// A snapshotter whose `prepare` takes a while, recording when calls and `close` happen.
struct Slow {
    inner: OverlaySnapshotter,
    events: Arc<Mutex<Vec<&'static str>>>,
    closed: AtomicBool,
}

impl Snapshotter for Slow {
    fn stat(&self, key: &str) -> Result<Info> {
        self.inner.stat(key)
    }
    fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info> {
        self.inner.update(info, fieldpaths)
    }
    fn usage(&self, key: &str) -> Result<Usage> {
        self.inner.usage(key)
    }
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.inner.mounts(key)
    }
    fn prepare(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>> {
        self.events.lock().unwrap().push("prepare started");
        std::thread::sleep(Duration::from_millis(800));
        let r = self.inner.prepare(key, parent, labels);
        assert!(
            !self.closed.load(Ordering::SeqCst),
            "prepare ran after close"
        );
        self.events.lock().unwrap().push("prepare done");
        r
    }
    fn view(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>> {
        self.inner.view(key, parent, labels)
    }
    fn commit(&self, name: &str, key: &str, opts: &CommitOpts) -> Result<()> {
        self.inner.commit(name, key, opts)
    }
    fn remove(&self, key: &str) -> Result<()> {
        self.inner.remove(key)
    }
    fn walk(&self, filters: &[&str], f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()> {
        self.inner.walk(filters, f)
    }
    fn cleanup(&self) -> Result<()> {
        self.inner.cleanup()
    }
    fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::SeqCst);
        self.events.lock().unwrap().push("close");
        self.inner.close()
    }
}

#[test]
fn shutdown_waits_for_the_call_in_flight_then_closes_the_snapshotter() {
    let tmp = tempfile::tempdir().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let slow = Slow {
        inner: OverlaySnapshotter::open(&tmp.path().join("root"), Options::default()).unwrap(),
        events: events.clone(),
        closed: AtomicBool::new(false),
    };
    let client = grpc::serve_in_process(Arc::new(slow), &tmp.path().join("s.sock")).unwrap();
    let client = Arc::new(client);
    let caller = {
        let client = client.clone();
        std::thread::spawn(move || client.prepare("k", "", &Labels::new()).map(|_| ()))
    };
    support::wait_until("the call to start", Duration::from_secs(10), || {
        !events.lock().unwrap().is_empty()
    });
    // Shut the server down (the client's close hook) while prepare sleeps.
    let closer = {
        let client = client.clone();
        std::thread::spawn(move || client.close())
    };
    let mut closer = Some(closer);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while closer.as_ref().is_some_and(|c| !c.is_finished()) {
        assert!(
            std::time::Instant::now() < deadline,
            "expected shutdown within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    closer.take().unwrap().join().unwrap().unwrap();
    caller.join().unwrap().unwrap();
    assert_eq!(
        *events.lock().unwrap(),
        ["prepare started", "prepare done", "close"],
        "expected the call in flight to finish before the snapshotter closed"
    );
}

#[test]
fn list_streams_every_snapshot_in_batches_and_keeps_error_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(&tmp.path().join("root"), Options::default()).unwrap();
    let client = grpc::serve_in_process(Arc::new(sn), &tmp.path().join("s.sock")).unwrap();
    for i in 0..250 {
        client
            .prepare(&format!("k{i:03}"), "", &Labels::new())
            .unwrap();
    }
    let mut n = 0;
    client
        .walk(&[], &mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(n, 250, "expected every snapshot across batches of 100");
    let err = client.walk(&["name=="], &mut |_| Ok(())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let err = client.stat("missing").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    client.close().unwrap();
}
