//! End to end with the real containerd (Debian's 1.6) and `ctr`: a private containerd with
//! `strata serve` as its proxy snapshotter imports a multi-layer image built offline, and the
//! snapshots, mounts, commits, removes and a container run all go through strata. Needs root,
//! overlayfs, `containerd`, `ctr`, `runc` and a static busybox (`cargo xtask test` installs
//! them); it fails, never skips, when they are missing.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::containerd::{CgroupGuard, Containerd, become_subreaper, is_static_elf};
use support::oci::{Entry, chain_ids, write_archive};
use support::{MountGuard, require_commands, run_ok, start_strata};

const IMAGE: &str = "docker.io/library/strata-e2e:latest";
const BUSYBOX: &str = "/bin/busybox";

/// busybox (static) with its applets in the bottom layer, files to keep and to delete; a middle
/// layer deleting a lower file and a lower directory's content; a top layer with one file.
fn layers() -> Vec<Vec<Entry>> {
    let busybox = std::fs::read(BUSYBOX).unwrap();
    let mut bottom = vec![
        Entry::Dir("bin", 0o755),
        Entry::File("bin/busybox", busybox, 0o755),
        Entry::Dir("etc", 0o755),
        Entry::File("etc/kept.txt", b"kept\n".to_vec(), 0o644),
        Entry::File("etc/deleted.txt", b"deleted\n".to_vec(), 0o644),
        Entry::Dir("data", 0o755),
        Entry::File("data/old.txt", b"old\n".to_vec(), 0o644),
        Entry::Dir("tmp", 0o1777),
        Entry::Dir("proc", 0o555),
        Entry::Dir("sys", 0o555),
        Entry::Dir("dev", 0o755),
    ];
    for applet in ["sh", "cat", "ls", "echo"] {
        bottom.push(Entry::Symlink(
            match applet {
                "sh" => "bin/sh",
                "cat" => "bin/cat",
                "ls" => "bin/ls",
                _ => "bin/echo",
            },
            "busybox",
        ));
    }
    let middle = vec![
        Entry::Dir("etc", 0o755),
        Entry::Whiteout("etc/deleted.txt"),
        Entry::File("etc/middle.txt", b"middle\n".to_vec(), 0o644),
        Entry::Dir("data", 0o755),
        Entry::Whiteout("data/old.txt"),
    ];
    let top = vec![Entry::File(
        "top.txt",
        b"from the top layer\n".to_vec(),
        0o644,
    )];
    vec![bottom, middle, top]
}

/// `ctr snapshots info` as JSON.
fn snapshot_info(c: &Containerd, key: &str) -> Value {
    let out = c.ctr_ok(&["snapshots", "--snapshotter", "strata", "info", key]);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("expected JSON from info {key}: {e}: {out}"))
}

/// `ctr snapshots ls`: key -> (parent, kind).
fn snapshot_list(c: &Containerd) -> BTreeMap<String, (String, String)> {
    let out = c.ctr_ok(&["snapshots", "--snapshotter", "strata", "ls"]);
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols.as_slice() {
                [key, kind] => Some((key.to_string(), (String::new(), kind.to_string()))),
                [key, parent, kind] => {
                    Some((key.to_string(), (parent.to_string(), kind.to_string())))
                }
                _ => None,
            }
        })
        .collect()
}

/// Mounts snapshot `key` on `target` with the command `ctr snapshots mounts` prints.
fn mount_with_ctr(c: &Containerd, key: &str, target: &Path) -> MountGuard {
    std::fs::create_dir_all(target).unwrap();
    let target_s = target.to_str().unwrap();
    let cmdline = c.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "mounts",
        target_s,
        key,
    ]);
    assert!(
        cmdline.starts_with("mount "),
        "expected a mount command from `ctr snapshots mounts`, got {cmdline:?}"
    );
    let guard = MountGuard(target.to_path_buf());
    run_ok(
        Command::new("sh").arg("-c").arg(cmdline.trim()),
        Duration::from_secs(30),
    );
    guard
}

#[test]
fn containerd_imports_mounts_commits_and_runs_through_strata() {
    require_commands(
        &["containerd", "ctr", "runc", "containerd-shim-runc-v2"],
        "apt-get install containerd runc",
    );
    assert!(
        is_static_elf(Path::new(BUSYBOX)),
        "expected a static {BUSYBOX}: install it with `apt-get install busybox-static` (`cargo xtask test` does)"
    );
    become_subreaper();

    let tmp = tempfile::Builder::new()
        .prefix("strata-e2e-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let strata_sock = dir.join("strata.sock");
    let strata = start_strata(
        &dir.join("strata"),
        &strata_sock,
        &dir.join("strata.log"),
        &[],
    );
    let containerd = Containerd::start(&dir.join("containerd"), &strata_sock);

    // Import (and unpack) the image into strata.
    let archive = dir.join("image.tar");
    let diff_ids = write_archive(&archive, IMAGE, &layers(), &["/bin/sh"]);
    let chain = chain_ids(&diff_ids);
    let out = containerd.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        "strata",
        archive.to_str().unwrap(),
    ]);
    eprintln!("import: {out}");
    let images = containerd.ctr_ok(&["images", "ls", "-q"]);
    assert!(
        images.lines().any(|l| l.trim() == IMAGE),
        "expected {IMAGE} among the images, got {images:?}"
    );

    // The chain of committed snapshots, each on its parent.
    let list = snapshot_list(&containerd);
    for (i, id) in chain.iter().enumerate() {
        let Some((parent, kind)) = list.get(id) else {
            panic!("expected snapshot {id} (layer {i}) in `ctr snapshots ls`, got {list:?}");
        };
        assert_eq!(kind, "Committed", "expected {id} to be committed");
        let want_parent = if i == 0 { "" } else { chain[i - 1].as_str() };
        assert_eq!(parent, want_parent, "expected {id}'s parent");
    }
    let top = chain.last().unwrap().as_str();
    let info = snapshot_info(&containerd, top);
    assert_eq!(info["Kind"], "Committed", "info of {top}: {info}");

    // strata itself sees containerd's namespaced keys (`<ns>/<seq>/<key>`): opaque to it.
    let direct = run_ok(
        Command::new("ctr")
            .arg("--address")
            .arg(&strata_sock)
            .args(["snapshots", "--snapshotter", "strata", "ls"]),
        Duration::from_secs(60),
    );
    assert!(
        direct.lines().any(
            |l| l.starts_with(&format!("{}/", support::containerd::NAMESPACE)) && l.contains(top)
        ),
        "expected strata's own listing to hold the namespaced key of {top}, got {direct}"
    );

    // A container snapshot: mount it, check the layers' files, write one.
    containerd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "prepare",
        "e2e-rw",
        top,
    ]);
    let rw = dir.join("mnt-rw");
    {
        let _mounted = mount_with_ctr(&containerd, "e2e-rw", &rw);
        let read = |p: &str| std::fs::read_to_string(rw.join(p));
        assert_eq!(read("top.txt").unwrap(), "from the top layer\n");
        assert_eq!(read("etc/kept.txt").unwrap(), "kept\n");
        assert_eq!(read("etc/middle.txt").unwrap(), "middle\n");
        assert!(
            !rw.join("etc/deleted.txt").exists(),
            "expected the whiteout of the middle layer to hide etc/deleted.txt"
        );
        assert!(
            !rw.join("data/old.txt").exists(),
            "expected data/old.txt deleted"
        );
        assert!(rw.join("bin/busybox").is_file(), "expected bin/busybox");
        std::fs::write(rw.join("new.txt"), "written in the container snapshot\n").unwrap();
        std::fs::remove_file(rw.join("etc/kept.txt")).unwrap();
    }
    assert!(
        support::mounts_under(&rw).is_empty(),
        "expected {rw:?} unmounted"
    );

    // Commit it, look at the result through a view, then remove both.
    containerd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "commit",
        "e2e-committed",
        "e2e-rw",
    ]);
    let list = snapshot_list(&containerd);
    assert_eq!(
        list.get("e2e-committed"),
        Some(&(top.to_owned(), "Committed".to_owned())),
        "expected e2e-committed on {top}, got {list:?}"
    );
    assert!(
        !list.contains_key("e2e-rw"),
        "expected e2e-rw gone after commit"
    );
    containerd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "view",
        "e2e-view",
        "e2e-committed",
    ]);
    let view = dir.join("mnt-view");
    {
        let _mounted = mount_with_ctr(&containerd, "e2e-view", &view);
        assert_eq!(
            std::fs::read_to_string(view.join("new.txt")).unwrap(),
            "written in the container snapshot\n"
        );
        assert!(
            !view.join("etc/kept.txt").exists(),
            "expected the delete committed"
        );
        assert_eq!(
            std::fs::read_to_string(view.join("top.txt")).unwrap(),
            "from the top layer\n"
        );
    }
    let busy = containerd.ctr_run(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "rm",
        "e2e-committed",
    ]);
    assert!(
        !busy.status.success(),
        "expected removing a snapshot with a child view to fail, got {busy:?}"
    );
    containerd.ctr_ok(&["snapshots", "--snapshotter", "strata", "rm", "e2e-view"]);
    containerd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "rm",
        "e2e-committed",
    ]);
    let list = snapshot_list(&containerd);
    assert!(
        !list.contains_key("e2e-view") && !list.contains_key("e2e-committed"),
        "expected the removed snapshots gone, got {list:?}"
    );

    // A container on the image, rootfs from strata.
    let runc_root = dir.join("runc");
    let cgroup = CgroupGuard(format!("strata-e2e-{}", std::process::id()));
    let cgroup_path = format!("/{}/e2e-run", cgroup.0);
    let out = containerd.ctr_ok(&[
        "run",
        "--snapshotter",
        "strata",
        "--rm",
        "--runc-root",
        runc_root.to_str().unwrap(),
        "--cgroup",
        &cgroup_path,
        IMAGE,
        "e2e-run",
        "sh",
        "-c",
        "cat /top.txt /etc/middle.txt; ls /etc",
    ]);
    assert!(
        out.starts_with("from the top layer\nmiddle\n"),
        "expected the container to read the layers' files, got {out:?}"
    );
    assert!(
        out.contains("kept.txt") && !out.contains("deleted.txt"),
        "expected /etc to hold kept.txt but not deleted.txt, got {out:?}"
    );
    // `--rm` removed the container and its snapshot (containerd's GC removes the backend one).
    let containers = containerd.ctr_ok(&["containers", "ls", "-q"]);
    assert!(
        containers.trim().is_empty(),
        "expected no containers left, got {containers:?}"
    );

    // Everything stops cleanly: containerd, then strata on SIGTERM (exit 0, socket removed).
    assert!(containerd.stop(), "expected containerd to stop on SIGTERM");
    let status = strata.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "expected strata serve to exit 0 on SIGTERM, got {status:?}"
    );
    assert!(
        !strata_sock.exists(),
        "expected strata serve to remove its socket"
    );
}
