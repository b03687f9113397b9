//! The `strata` program end to end: demo image, unpack, mount, diff, ls, usage, rm, umount, and
//! clear one-line errors. Runs the built binary as root with real mounts.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::process::{Command, Output};

fn strata(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = strata(root, args);
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(root: &Path, args: &[&str]) -> String {
    let out = strata(root, args);
    assert!(!out.status.success(), "strata {args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("strata: ")).collect();
    assert_eq!(lines.len(), 1, "exactly one clear error line: {err}");
    lines[0].to_string()
}

/// Builds the demo image into `dir` (and runs the demo once, which must pass).
fn demo_image(root: &Path, dir: &Path) -> String {
    let out = ok(root, &["demo", "--image", dir.to_str().unwrap()]);
    assert!(out.contains("ok: layers stack, whiteouts delete"), "{out}");
    format!("{}:demo", dir.display())
}

#[test]
fn unpack_mount_diff_and_clean_up() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let image = demo_image(&root, &tmp.path().join("image"));

    let chain = ok(&root, &["unpack", &image]);
    assert!(
        chain.trim().starts_with("sha256:"),
        "prints the chain ID: {chain}"
    );
    let again = ok(&root, &["unpack", &image]);
    assert_eq!(chain, again, "unpacking twice gives the same chain");

    let target = tmp.path().join("rootfs");
    std::fs::create_dir(&target).unwrap();
    ok(
        &root,
        &[
            "mount",
            &image,
            target.to_str().unwrap(),
            "--rw",
            "--name",
            "c1",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(target.join("top.txt")).unwrap(),
        "hello from the top layer\n"
    );
    assert!(!target.join("etc/motd").exists(), "whited-out file is gone");
    std::fs::write(target.join("new.txt"), "container change\n").unwrap();
    std::fs::remove_file(target.join("app/hello.txt")).unwrap();

    let ls = ok(&root, &["ls"]);
    assert!(ls.contains("c1") && ls.contains(chain.trim()), "{ls}");
    let usage = ok(&root, &["usage", "c1"]);
    assert!(
        usage.starts_with("size=") && !usage.contains("size=0 "),
        "{usage}"
    );

    let out = tmp.path().join("diff-out");
    let desc = ok(
        &root,
        &[
            "diff",
            "c1",
            "--out",
            out.to_str().unwrap(),
            "--compression",
            "zstd",
        ],
    );
    let desc: serde_json::Value = serde_json::from_str(&desc).unwrap();
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let digest = desc["digest"].as_str().unwrap();
    let blob = out
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let bytes = std::fs::read(&blob).unwrap();
    assert_eq!(bytes.len() as u64, desc["size"].as_u64().unwrap());
    let tar = zstd::decode_all(bytes.as_slice()).unwrap();
    let mut names: Vec<String> = tar::Archive::new(tar.as_slice())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    names.sort();
    assert!(names.contains(&"new.txt".to_string()), "{names:?}");
    assert!(
        names.contains(&"app/.wh.hello.txt".to_string()),
        "deletion as a whiteout: {names:?}"
    );

    ok(
        &root,
        &["umount", target.to_str().unwrap(), "--rm", "--name", "c1"],
    );
    assert!(!target.join("top.txt").exists(), "unmounted");
    let ls = ok(&root, &["ls"]);
    assert!(
        !ls.contains(" c1 ") && !ls.lines().any(|l| l.starts_with("c1 ")),
        "{ls}"
    );
}

#[test]
fn errors_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let line = fails(&root, &["unpack", "/nonexistent/layout"]);
    assert!(line.contains("/nonexistent/layout"), "{line}");
    let line = fails(&root, &["rm", "no-such-snapshot"]);
    assert!(line.contains("not found"), "{line}");
    let line = fails(&root, &["usage", "no-such-snapshot"]);
    assert!(line.contains("not found"), "{line}");
    // A config naming a plugin that is not there: the command that needs it says so.
    let config = tmp.path().join("strata.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\nplugins_dir = {:?}\n[filesystem]\nplugin = \"nope\"\n",
            root,
            tmp.path()
        ),
    )
    .unwrap();
    let line = fails(&root, &["--config", config.to_str().unwrap(), "ls"]);
    assert!(
        line.contains("load the backing file system plugin") && line.contains("nope"),
        "{line}"
    );
}

#[test]
fn two_processes_unpacking_the_same_image_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let image = demo_image(&tmp.path().join("scratch-root"), &tmp.path().join("image"));
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--root")
            .arg(&root)
            .args(["unpack", &image])
            .output()
            .unwrap()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        let b = s.spawn(spawn);
        (a.join().unwrap(), b.join().unwrap())
    });
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(a.stdout, b.stdout);
    let ls = ok(&root, &["ls"]);
    let committed = ls.lines().filter(|l| l.contains("Committed")).count();
    assert_eq!(
        committed, 3,
        "one snapshot per chain ID, no leftovers: {ls}"
    );
    assert_eq!(
        ls.lines().count(),
        4,
        "header + 3 layers, no extraction snapshots: {ls}"
    );
}
