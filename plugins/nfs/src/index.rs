//! The layer's metadata index, read from the store next to the layer: the extended attributes
//! NFSv3 cannot carry (overlay's opaque markers, `security.capability`, `user.*`, ACLs).
//!
//! Written by `strata export` (`rootfs::export::index`, which documents the format) at
//! `<store>/.strata-meta/<algorithm>/<hex>.json`. This reader mirrors that format so that the
//! plugin depends on `fs-plugin-api` only; `tests/nfs_plugin.rs` checks both ends agree.

use std::{collections::HashMap, sync::Arc};

use serde::Deserialize;

/// The directory of the indexes, directly under the store.
pub const INDEX_DIR: &[u8] = b".strata-meta";

/// The format version this reader understands.
const VERSION: u32 = 1;

/// The extended attributes of one inode: (name, value) pairs, sorted by name.
pub type Xattrs = Arc<Vec<(Vec<u8>, Vec<u8>)>>;

/// A layer's extended attributes, by path relative to the layer root (`b""` for the root).
#[derive(Debug, Default)]
pub struct LayerIndex {
    by_path: HashMap<Vec<u8>, Xattrs>,
}

#[derive(Deserialize)]
struct File {
    version: u32,
    #[serde(default)]
    digest: String,
    entries: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    path_hex: Option<String>,
    xattrs: std::collections::BTreeMap<String, String>,
}

impl LayerIndex {
    /// Parses the index of layer `digest` (the digest it names must match).
    pub fn parse(data: &[u8], digest: &str) -> Result<Self, String> {
        let file: File = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        if file.version != VERSION {
            return Err(format!(
                "format version {} (this plugin reads version {VERSION})",
                file.version
            ));
        }
        if file.digest != digest {
            return Err(format!(
                "it describes layer {:?}, not {digest}",
                file.digest
            ));
        }
        let mut by_path = HashMap::new();
        for entry in file.entries {
            let path = match (entry.path, entry.path_hex) {
                (Some(p), None) => p.into_bytes(),
                (None, Some(h)) => from_hex(&h)?,
                _ => return Err("an entry needs exactly one of path and path_hex".into()),
            };
            let mut xattrs = Vec::with_capacity(entry.xattrs.len());
            for (name, value) in entry.xattrs {
                xattrs.push((name.into_bytes(), from_hex(&value)?));
            }
            by_path.insert(path, Arc::new(xattrs));
        }
        Ok(LayerIndex { by_path })
    }

    /// The extended attributes of the inode at `path`, if it has any.
    pub fn xattrs(&self, path: &[u8]) -> Option<Xattrs> {
        self.by_path.get(path).cloned()
    }

    /// How many paths have extended attributes.
    pub fn len(&self) -> usize {
        self.by_path.len()
    }
}

fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("bad hex {s:?}"));
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("bad hex {s:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_utf8_and_hex_paths_with_hex_values() {
        let json = br#"{"version":1,"digest":"sha256:ab","entries":[
            {"path":"","xattrs":{"user.root":"01"}},
            {"path":"var/cache","xattrs":{"trusted.overlay.opaque":"79"}},
            {"path_hex":"ff2f61","xattrs":{"security.capability":"0000000200"}}]}"#;
        let index = LayerIndex::parse(json, "sha256:ab").unwrap();
        assert_eq!(index.len(), 3);
        assert_eq!(
            *index.xattrs(b"var/cache").unwrap(),
            vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())]
        );
        assert_eq!(index.xattrs(b"").unwrap()[0].1, vec![1]);
        assert_eq!(
            index.xattrs(b"\xff/a").unwrap()[0].0,
            b"security.capability"
        );
        assert!(index.xattrs(b"other").is_none());
    }

    #[test]
    fn another_version_or_layer_or_bad_hex_is_refused() {
        for (json, says) in [
            (
                r#"{"version":2,"digest":"sha256:ab","entries":[]}"#,
                "version 2",
            ),
            (
                r#"{"version":1,"digest":"sha256:cd","entries":[]}"#,
                "sha256:cd",
            ),
            (
                r#"{"version":1,"digest":"sha256:ab","entries":[{"path":"a","xattrs":{"user.x":"7"}}]}"#,
                "bad hex",
            ),
            (
                r#"{"version":1,"digest":"sha256:ab","entries":[{"xattrs":{}}]}"#,
                "exactly one",
            ),
        ] {
            let e = LayerIndex::parse(json.as_bytes(), "sha256:ab").unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
    }
}
