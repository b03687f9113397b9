//! A small offline OCI image builder: layers from a list of entries, gzip-compressed, written as
//! an OCI layout and tarred into the archive `ctr images import` takes.

use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

/// One entry of a layer tar (paths are relative, without a leading `/`).
pub enum Entry {
    /// A directory with a mode.
    Dir(&'static str, u32),
    /// A regular file with contents and mode.
    File(&'static str, Vec<u8>, u32),
    /// A symbolic link to a target.
    Symlink(&'static str, &'static str),
    /// A whiteout deleting the lower path (`dir/.wh.name`).
    Whiteout(&'static str),
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The chain IDs of a list of diff IDs (`chain(n) = sha256(chain(n-1) + " " + diff(n))`).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The uncompressed tar of `entries`.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    };
    for e in entries {
        match e {
            Entry::Dir(path, mode) => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())
                    .unwrap();
            }
            Entry::File(path, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice()).unwrap();
            }
            Entry::Symlink(path, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target).unwrap();
            }
            Entry::Whiteout(path) => {
                let p = Path::new(path);
                let name = p.file_name().unwrap().to_str().unwrap();
                let wh = p.with_file_name(format!(".wh.{name}"));
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, wh, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// The host's OCI architecture name.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes an OCI archive at `out` with `layers` (bottom first), named `name` (a full reference
/// such as `docker.io/library/x:latest`); returns the layers' diff IDs.
pub fn write_archive(out: &Path, name: &str, layers: &[Vec<Entry>], cmd: &[&str]) -> Vec<String> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_descs = Vec::new();
    for entries in layers {
        let tar = layer_tar(entries);
        diff_ids.push(sha256(&tar));
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(&tar).unwrap();
        let blob = gz.finish().unwrap();
        let digest = sha256(&blob);
        layer_descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": blob.len(),
        }));
        blobs.push((digest, blob));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    let manifest_digest = sha256(&manifest);
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .unwrap();
    blobs.push((config_digest, config));
    blobs.push((manifest_digest, manifest));

    let file = std::fs::File::create(out).unwrap();
    let mut b = tar::Builder::new(file);
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for (digest, data) in &blobs {
        let hex = digest.trim_start_matches("sha256:");
        add(&format!("blobs/sha256/{hex}"), data);
    }
    b.into_inner().unwrap().flush().unwrap();
    diff_ids
}
