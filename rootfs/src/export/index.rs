//! The per-layer metadata index of a layer store: what a remote reader of the store cannot see
//! through its file protocol, written by `strata export` and served by the `nfs` plugin.
//!
//! NFSv3 carries modes, owners, times, sizes, link counts, file ids (so hard links) and device
//! numbers (so 0/0 whiteouts), but no extended attributes: overlay's opaque-directory marker
//! (`trusted.overlay.opaque`), file capabilities (`security.capability`), ACLs and `user.*`
//! attributes would be lost. The index lists every path of the layer that has extended
//! attributes, with their names and values.
//!
//! It lives at `<store>/.strata-meta/<algorithm>/<hex>.json`, beside the layer rather than in it:
//! a file inside the layer directory would show in every mount of the layer (the `local` plugin's
//! bind mount would serve it as part of the root filesystem), and files next to the layer
//! directories in `<store>/<algorithm>/` would mix non-layers into the digest-named layout that
//! plugins list. It is published (atomically) before the layer directory is renamed into place,
//! so a layer visible under its digest always has its index.
//!
//! Format (JSON, version 1):
//!
//! ```json
//! { "version": 1, "digest": "sha256:…",
//!   "entries": [ { "path": "var/cache", "xattrs": { "trusted.overlay.opaque": "79" } } ] }
//! ```
//!
//! `path` is relative to the layer root (`""` for the root itself); a path that is not UTF-8 is
//! given as `path_hex` (its bytes in lowercase hex) instead. Attribute values are lowercase hex.
//! Entries are sorted by path bytes. Readers must reject other versions.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use snapshot_core::identity::Digest;

use crate::{Error, Result};

/// The directory, directly under a store, that holds the indexes.
pub const INDEX_DIR: &str = ".strata-meta";

/// The index format version this module writes and reads.
pub const VERSION: u32 = 1;

/// Where the index of layer `digest` lives in the store at `store`.
pub fn index_path(store: &Path, digest: &Digest) -> PathBuf {
    store
        .join(INDEX_DIR)
        .join(digest.algorithm().as_ref())
        .join(format!("{}.json", digest.digest()))
}

/// A layer's metadata index (see the module docs for the format).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerIndex {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// The layer's digest, filled by [`LayerIndex::publish`].
    #[serde(default)]
    pub digest: String,
    /// Paths with extended attributes, sorted by path bytes.
    pub entries: Vec<IndexEntry>,
}

/// The extended attributes of one path of a layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    /// The path relative to the layer root, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The path's bytes in hex, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    /// Attribute name -> value (hex).
    pub xattrs: BTreeMap<String, String>,
}

impl IndexEntry {
    /// The entry's path bytes, relative to the layer root.
    pub fn path_bytes(&self) -> Result<Vec<u8>> {
        match (&self.path, &self.path_hex) {
            (Some(p), None) => Ok(p.as_bytes().to_vec()),
            (None, Some(h)) => from_hex(h),
            _ => Err(Error::InvalidArgument(
                "layer index entry: exactly one of path and path_hex".into(),
            )),
        }
    }
}

impl LayerIndex {
    /// Reads the extended attributes of every path under the layer directory `layer`.
    pub fn scan(layer: &Path) -> Result<Self> {
        let mut entries = Vec::new();
        scan_dir(layer, &mut Vec::new(), &mut entries)?;
        entries.sort_by(|a: &(Vec<u8>, _), b| a.0.cmp(&b.0));
        let entries = entries
            .into_iter()
            .map(|(path, xattrs)| match String::from_utf8(path) {
                Ok(p) => IndexEntry {
                    path: Some(p),
                    path_hex: None,
                    xattrs,
                },
                Err(e) => IndexEntry {
                    path: None,
                    path_hex: Some(to_hex(e.as_bytes())),
                    xattrs,
                },
            })
            .collect();
        Ok(LayerIndex {
            version: VERSION,
            digest: String::new(),
            entries,
        })
    }

    /// Writes the index of layer `digest` into the store atomically (temp file, fsync, rename).
    pub fn publish(mut self, store: &Path, digest: &Digest) -> Result<()> {
        self.digest = digest.to_string();
        let path = index_path(store, digest);
        let dir = path
            .parent()
            .ok_or_else(|| Error::InvalidArgument(format!("bad index path {}", path.display())))?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let json = serde_json::to_vec_pretty(&self)
            .map_err(|e| Error::io("encode layer index", std::io::Error::other(e)))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".tmp-{}-", digest.digest()))
            .tempfile_in(dir)
            .map_err(|e| Error::io(format!("create temp file in {}", dir.display()), e))?;
        tmp.write_all(&json)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| Error::io(format!("write {}", tmp.path().display()), e))?;
        // Readable by the store's readers (tempfile creates 0600).
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .map_err(|e| Error::io(format!("chmod {}", tmp.path().display()), e))?;
        tmp.persist(&path)
            .map_err(|e| Error::io(format!("publish {}", path.display()), e.error))?;
        Ok(())
    }

    /// Reads the index at `path` (any version is rejected but [`VERSION`]).
    pub fn read(path: &Path) -> Result<Self> {
        let data =
            std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        let index: LayerIndex = serde_json::from_slice(&data)
            .map_err(|e| Error::InvalidArgument(format!("layer index {}: {e}", path.display())))?;
        if index.version != VERSION {
            return Err(Error::InvalidArgument(format!(
                "layer index {}: version {} (this strata reads version {VERSION})",
                path.display(),
                index.version
            )));
        }
        Ok(index)
    }
}

type Xattrs = BTreeMap<String, String>;

/// Appends `(path, xattrs)` for `dir/rel` and everything under it that has extended attributes.
fn scan_dir(root: &Path, rel: &mut Vec<u8>, out: &mut Vec<(Vec<u8>, Xattrs)>) -> Result<()> {
    let path = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(rel))
    };
    let xattrs = read_xattrs(&path)?;
    if !xattrs.is_empty() {
        out.push((rel.clone(), xattrs));
    }
    let meta = std::fs::symlink_metadata(&path)
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    if !meta.is_dir() {
        return Ok(());
    }
    let entries =
        std::fs::read_dir(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(entry.file_name().as_bytes());
        scan_dir(root, rel, out)?;
        rel.truncate(len);
    }
    Ok(())
}

/// The extended attributes of `path` (not following a symlink), values in hex.
fn read_xattrs(path: &Path) -> Result<Xattrs> {
    let context = |what: &str| format!("{what} {}", path.display());
    let mut xattrs = Xattrs::new();
    let size = match rustix::fs::llistxattr_query(path) {
        Ok(n) => n,
        // A file system without xattrs has none to keep.
        Err(rustix::io::Errno::OPNOTSUPP) => return Ok(xattrs),
        Err(e) => return Err(Error::io(context("list xattrs of"), e.into())),
    };
    if size == 0 {
        return Ok(xattrs);
    }
    let mut names = vec![0u8; size];
    let n = rustix::fs::llistxattr(path, &mut names[..])
        .map_err(|e| Error::io(context("list xattrs of"), e.into()))?;
    names.truncate(n);
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name_str = std::str::from_utf8(name).map_err(|_| {
            Error::InvalidArgument(format!(
                "{}: xattr name {:?} is not UTF-8",
                path.display(),
                String::from_utf8_lossy(name)
            ))
        })?;
        let len = rustix::fs::lgetxattr_query(path, name)
            .map_err(|e| Error::io(context(&format!("read xattr {name_str} of")), e.into()))?;
        let mut value = vec![0u8; len];
        let n = rustix::fs::lgetxattr(path, name, &mut value[..])
            .map_err(|e| Error::io(context(&format!("read xattr {name_str} of")), e.into()))?;
        value.truncate(n);
        xattrs.insert(name_str.to_owned(), to_hex(&value));
    }
    Ok(xattrs)
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// The bytes of hex string `s`.
pub fn from_hex(s: &str) -> Result<Vec<u8>> {
    let invalid = || Error::InvalidArgument(format!("layer index: bad hex {s:?}"));
    if !s.len().is_multiple_of(2) {
        return Err(invalid());
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(invalid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xff, b'y'];
        assert_eq!(to_hex(&bytes), "00017f80ff79");
        assert_eq!(from_hex(&to_hex(&bytes)).unwrap(), bytes);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }

    #[test]
    fn scan_lists_paths_with_xattrs_and_publish_writes_beside_the_layer() {
        let store = tempfile::tempdir().unwrap();
        let layer = store.path().join("layer");
        std::fs::create_dir_all(layer.join("d/e")).unwrap();
        std::fs::write(layer.join("d/e/f"), "x").unwrap();
        std::fs::write(layer.join("plain"), "x").unwrap();
        rustix::fs::setxattr(
            layer.join("d"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        rustix::fs::setxattr(
            layer.join("d/e/f"),
            "user.k",
            b"\x00\xff",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let index = LayerIndex::scan(&layer).unwrap();
        let paths: Vec<_> = index
            .entries
            .iter()
            .map(|e| e.path.clone().unwrap())
            .collect();
        assert_eq!(paths, ["d", "d/e/f"]);
        assert_eq!(index.entries[0].xattrs["trusted.overlay.opaque"], "79");
        assert_eq!(index.entries[1].xattrs["user.k"], "00ff");

        let digest: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        index.clone().publish(store.path(), &digest).unwrap();
        let path = index_path(store.path(), &digest);
        assert!(path.starts_with(store.path().join(".strata-meta/sha256")));
        let read = LayerIndex::read(&path).unwrap();
        assert_eq!(read.entries, index.entries);
        assert_eq!(read.digest, digest.to_string());
    }
}
