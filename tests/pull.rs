//! `strata pull` against a real registry (Debian's `docker-registry`, started by the test): the
//! demo image is pushed with skopeo, pulled, unpacked, listed and mounted; a missing tag fails
//! with one clear line.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rootfs::testing::TestRegistry;
use support::{MountGuard, Output, run_bounded};

const LIMIT: Duration = Duration::from_secs(120);

fn strata(root: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(support::strata_bin());
    cmd.arg("--root").arg(root).args(args);
    run_bounded(&mut cmd, LIMIT)
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = strata(root, args);
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}",
        out.stderr
    );
    out.stdout
}

/// The demo image in an OCI layout at `dir` (tag `demo`) and its manifest digest.
fn demo_layout(dir: &Path) -> String {
    let scratch = tempfile::tempdir().unwrap();
    ok(scratch.path(), &["demo", "--image", dir.to_str().unwrap()]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "demo")
        .unwrap();
    entry["digest"].as_str().unwrap().to_string()
}

#[test]
fn pull_fetches_unpacks_and_mounts_an_image() {
    support::require_commands(
        &["docker-registry", "skopeo"],
        "apt-get install -y docker-registry skopeo",
    );
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let manifest_digest = demo_layout(&layout);
    let registry = TestRegistry::start().unwrap();
    registry.push(&layout, "demo", "test/demo:v1").unwrap();

    let root = tmp.path().join("root");
    let reference = format!("{}/test/demo:v1", registry.host());
    let out = strata(&root, &["pull", "--plain-http", &reference]);
    assert!(out.status.success(), "pull failed: {}", out.stderr);
    let chain = out.stdout.trim().to_string();
    assert!(chain.starts_with("sha256:"), "prints the chain ID: {chain}");
    assert!(
        out.stderr.contains(&manifest_digest),
        "reports the manifest digest: {}",
        out.stderr
    );
    // Every blob is in the content store, verified.
    let content = root.join("content");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(content.join("blobs/sha256").join(&manifest_digest[7..])).unwrap(),
    )
    .unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap();
        assert!(content.join("blobs/sha256").join(&d[7..]).is_file(), "{d}");
    }

    let ls = ok(&root, &["ls"]);
    assert!(ls.contains(&chain), "ls shows the chain: {ls}");
    assert_eq!(
        ls.lines()
            .filter(|l| l.to_lowercase().contains("committed"))
            .count(),
        3,
        "three committed layers: {ls}"
    );

    // Pulling again reuses blobs and snapshots.
    let again = ok(&root, &["pull", "--plain-http", &reference]);
    assert_eq!(again.trim(), chain);

    let target = tmp.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let _cleanup = MountGuard(target.clone());
    let image = format!("{}@{manifest_digest}", content.display());
    ok(&root, &["mount", &image, target.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(target.join("top.txt")).unwrap(),
        "hello from the top layer\n"
    );
    assert_eq!(
        std::fs::read_to_string(target.join("app/hello.txt")).unwrap(),
        "hello from layer 2\n"
    );
    assert!(!target.join("etc/motd").exists(), "whiteouts applied");
    ok(&root, &["umount", "--rm", target.to_str().unwrap()]);

    // `pull --mount`: pull (nothing new to fetch) and mount in one go; no backing file system,
    // so the mount outlives the command.
    let out = ok(
        &root,
        &[
            "pull",
            "--plain-http",
            "--mount",
            target.to_str().unwrap(),
            "--name",
            "c1",
            &reference,
        ],
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), [chain.as_str(), "c1"]);
    assert_eq!(
        std::fs::read_to_string(target.join("top.txt")).unwrap(),
        "hello from the top layer\n"
    );
    ok(
        &root,
        &["umount", "--rm", "--name", "c1", target.to_str().unwrap()],
    );
    assert!(!target.join("top.txt").exists());
}

#[test]
fn pulling_a_missing_tag_fails_with_one_clear_line() {
    support::require_commands(
        &["docker-registry", "skopeo"],
        "apt-get install -y docker-registry skopeo",
    );
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start().unwrap();
    let root = tmp.path().join("root");
    let reference = format!("{}/test/none:v1", registry.host());
    let out = strata(&root, &["pull", "--plain-http", &reference]);
    assert!(!out.status.success());
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("strata: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {}", out.stderr);
    assert!(
        lines[0].contains("not found") && lines[0].contains("test/none:v1"),
        "{}",
        lines[0]
    );

    let out = strata(&root, &["pull", "--plain-http", "127.0.0.1:1/Bad//ref"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("invalid"), "{}", out.stderr);
}

#[test]
fn pull_from_a_registry_with_auth_takes_credentials_from_a_credential_helper() {
    use std::os::unix::fs::PermissionsExt;
    support::require_commands(
        &["docker-registry", "skopeo", "htpasswd"],
        "apt-get install -y docker-registry skopeo apache2-utils",
    );
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    demo_layout(&layout);
    let registry = TestRegistry::start_with_basic_auth("alice", "s3cret").unwrap();
    registry.push(&layout, "demo", "test/demo:v1").unwrap();
    let host = registry.host();
    // A docker config naming a credential store, and the store's helper on PATH (it knows the
    // registry only; what it is given and asked is checked).
    let docker = tmp.path().join("docker");
    std::fs::create_dir(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        r#"{"credsStore":"strata-test"}"#,
    )
    .unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let helper = bin.join("docker-credential-strata-test");
    std::fs::write(
        &helper,
        format!(
            r#"#!/bin/sh
[ "$1" = get ] || exit 2
read -r server
[ "$server" = "{host}" ] || {{ echo "credentials not found in native keychain"; exit 1; }}
printf '{{"ServerURL":"%s","Username":"alice","Secret":"%s"}}' "$server" "$(cat {secret})"
"#,
            secret = tmp.path().join("secret").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let pull = |root: &str| {
        let mut cmd = Command::new(support::strata_bin());
        cmd.arg("--root")
            .arg(tmp.path().join(root))
            .args(["pull", "--plain-http", &format!("{host}/test/demo:v1")])
            .env("DOCKER_CONFIG", &docker)
            .env("PATH", &path);
        run_bounded(&mut cmd, LIMIT)
    };
    std::fs::write(tmp.path().join("secret"), "wrong").unwrap();
    let out = pull("root-denied");
    assert!(!out.status.success(), "wrong credentials are refused");
    assert!(
        out.stderr.contains("denied") || out.stderr.contains("401"),
        "{}",
        out.stderr
    );
    std::fs::write(tmp.path().join("secret"), "s3cret").unwrap();
    let out = pull("root");
    assert!(out.status.success(), "pull failed: {}", out.stderr);
    assert!(out.stdout.trim().starts_with("sha256:"), "{}", out.stdout);
}
