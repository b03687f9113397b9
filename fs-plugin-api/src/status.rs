//! Progress reports of mounted layers: a plugin that fetches a layer lazily writes a
//! [`LayerStatus`] beside the mountpoint, and `strata ls` shows it.
//!
//! The file is `<parent of the mountpoint>/remote-status.json` (for the overlay snapshotter:
//! `<root>/snapshots/<id>/remote-status.json`), replaced atomically on every write.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// File name of a layer's status, in the directory holding its mountpoint.
pub const STATUS_FILE: &str = "remote-status.json";

/// How far a lazily mounted layer has been fetched.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerStatus {
    /// The plugin serving the layer (`http`).
    pub plugin: String,
    /// Where the layer comes from (an image reference).
    #[serde(default)]
    pub reference: String,
    /// The layer's digest.
    pub layer: String,
    /// `lazy` while parts are only remote, `complete` once every byte is local.
    pub state: String,
    /// Bytes received from the remote so far.
    pub bytes_fetched: u64,
    /// Bytes of the layer held locally.
    pub bytes_cached: u64,
    /// Bytes of the whole layer.
    pub bytes_total: u64,
    /// `bytes_cached` as a percentage of `bytes_total`.
    pub percent_cached: f64,
}

/// Where the status of the layer mounted at `mountpoint` lives.
pub fn status_path(mountpoint: &Path) -> PathBuf {
    mountpoint
        .parent()
        .unwrap_or(Path::new("/"))
        .join(STATUS_FILE)
}

/// Writes `status` for the layer at `mountpoint` (temp file + rename: readers never see half).
pub fn write_status(mountpoint: &Path, status: &LayerStatus) -> io::Result<()> {
    let path = status_path(mountpoint);
    // Unique per writer: several threads (or processes) may report at once.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("json.{}.{n}.tmp", std::process::id()));
    let json = serde_json::to_vec_pretty(status).map_err(io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, &path)
}

/// Removes the status of the layer at `mountpoint` (no status: nothing to do).
pub fn remove_status(mountpoint: &Path) -> io::Result<()> {
    match std::fs::remove_file(status_path(mountpoint)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The status of the layer at `mountpoint`, if its plugin reports one.
pub fn read_status(mountpoint: &Path) -> Option<LayerStatus> {
    let bytes = std::fs::read(status_path(mountpoint)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_status_reads_back_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("fs");
        assert_eq!(read_status(&mp), None);
        let s = LayerStatus {
            plugin: "http".into(),
            layer: "sha256:ab".into(),
            state: "lazy".into(),
            bytes_total: 10,
            bytes_cached: 5,
            percent_cached: 50.0,
            ..Default::default()
        };
        write_status(&mp, &s).unwrap();
        assert_eq!(read_status(&mp), Some(s));
        assert!(dir.path().join(STATUS_FILE).is_file());
        remove_status(&mp).unwrap();
        remove_status(&mp).unwrap();
        assert_eq!(read_status(&mp), None);
    }
}
