//! eStargz images made by stargz's own converter, `ctr-remote image convert --estargz`, in a
//! private containerd (only its content store is used).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::containerd::{Containerd, NAMESPACE, become_subreaper};
use super::{require_commands, run_ok};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Tars an OCI layout into an OCI archive (what `ctr images import` takes).
pub fn archive_layout(layout: &Path, archive: &Path) {
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(layout)
            .arg("-cf")
            .arg(archive)
            .args(["oci-layout", "index.json", "blobs"]),
        RUN_TIMEOUT,
    );
}

/// Converts image `tag` of the OCI layout `src` with `ctr-remote` (chunks of `chunk_size`);
/// returns the OCI layout of the result (its only image), made under `work`.
pub fn convert(src: &Path, tag: &str, chunk_size: u64, work: &Path) -> PathBuf {
    require_commands(
        &["containerd", "ctr", "ctr-remote", "tar"],
        "apt-get install containerd stargz-snapshotter tar",
    );
    become_subreaper();
    std::fs::create_dir_all(work).unwrap_or_else(|e| panic!("create {}: {e}", work.display()));
    // Nothing serves this socket: only the content store is used.
    let containerd = Containerd::start(&work.join("containerd"), &work.join("unused.sock"));
    let archive = work.join("src.tar");
    archive_layout(src, &archive);
    let source = format!("example.com/src:{tag}");
    containerd.ctr_ok(&[
        "images",
        "import",
        "--no-unpack",
        "--base-name",
        "example.com/src",
        archive.to_str().unwrap_or_default(),
    ]);
    run_ok(
        Command::new("ctr-remote")
            .arg("--address")
            .arg(containerd.socket())
            .args(["--namespace", NAMESPACE])
            .args(["images", "convert", "--estargz", "--oci"])
            .args(["--estargz-chunk-size", &chunk_size.to_string()])
            .args([&source, "example.com/esgz:t"]),
        RUN_TIMEOUT,
    );
    let exported = work.join("esgz.tar");
    containerd.ctr_ok(&[
        "images",
        "export",
        exported.to_str().unwrap_or_default(),
        "example.com/esgz:t",
    ]);
    let out = work.join("esgz");
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("create {}: {e}", out.display()));
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&out)
            .arg("-xf")
            .arg(&exported),
        RUN_TIMEOUT,
    );
    containerd.stop();
    out
}
