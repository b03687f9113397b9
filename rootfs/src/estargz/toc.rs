//! The table of contents (`stargz.index.json`): the JSON model shared by reader and writer.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// The TOC document: `{"version": 1, "entries": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Toc {
    /// Format version (1).
    pub version: u32,
    /// Every tar entry of the layer in archive order (chunks of large files as `chunk` entries).
    pub entries: Vec<TocEntry>,
}

/// The type of a TOC entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    /// A directory.
    Dir,
    /// A regular file (its first chunk).
    Reg,
    /// A symbolic link.
    Symlink,
    /// A hard link to `link_name`.
    Hardlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// The second or a later chunk of the preceding regular file.
    Chunk,
}

/// One entry of the TOC, with the field names of stargz's `TOCEntry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    /// Path inside the layer, without a leading `/` or `./`.
    pub name: String,
    /// Entry type.
    #[serde(rename = "type")]
    pub kind: EntryType,
    /// Size of a regular file (whole file, also when chunked).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Modification time, RFC 3339.
    #[serde(default, rename = "modtime", skip_serializing_if = "Option::is_none")]
    pub mod_time: Option<String>,
    /// Target of a symlink or hard link.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    /// Permission and type bits as in the tar header (`mode`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: u64,
    /// Owner.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u64,
    /// Group.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u64,
    /// Owner name (informational).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    /// Group name (informational).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    /// Device major number.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_major: u64,
    /// Device minor number.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_minor: u64,
    /// Extended attributes, values base64 in JSON (Go's `[]byte`).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "xattrs_b64"
    )]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Digest of the whole regular file (`sha256:...`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Offset in the blob of the gzip member holding this entry's payload.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// Offset of the payload inside the uncompressed gzip member.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
    /// Offset of this chunk inside the file.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    /// Size of this chunk; 0 means "up to the end of the file".
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    /// Digest of this chunk's uncompressed bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
}

impl TocEntry {
    /// An entry of `kind` named `name` with every other field empty.
    pub fn new(name: impl Into<String>, kind: EntryType) -> Self {
        TocEntry {
            name: name.into(),
            kind,
            size: 0,
            mod_time: None,
            link_name: String::new(),
            mode: 0,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: String::new(),
            offset: 0,
            inner_offset: 0,
            chunk_offset: 0,
            chunk_size: 0,
            chunk_digest: String::new(),
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

mod xattrs_b64 {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        map: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let encoded: BTreeMap<&str, String> = map
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect();
        encoded.serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let encoded = Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default();
        encoded
            .into_iter()
            .map(|(k, v)| {
                base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .map(|v| (k, v))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stargz_field_names() {
        let json = r#"{"version":1,"entries":[
            {"name":"bin/","type":"dir","modtime":"2020-01-01T00:00:00Z","mode":493},
            {"name":"bin/sh","type":"reg","size":5,"mode":493,"uid":1,"gid":2,
             "xattrs":{"user.a":"aGk="},"digest":"sha256:x","offset":60,"innerOffset":512,
             "chunkDigest":"sha256:y"},
            {"name":"bin/sh","type":"chunk","offset":90,"chunkOffset":3,"chunkSize":2}]}"#;
        let toc: Toc = serde_json::from_str(json).unwrap();
        assert_eq!(toc.entries.len(), 3);
        let sh = &toc.entries[1];
        assert_eq!(sh.kind, EntryType::Reg);
        assert_eq!(sh.xattrs["user.a"], b"hi");
        assert_eq!(sh.inner_offset, 512);
        assert_eq!(toc.entries[2].kind, EntryType::Chunk);
        assert_eq!(toc.entries[2].chunk_offset, 3);
        let back: Toc = serde_json::from_str(&serde_json::to_string(&toc).unwrap()).unwrap();
        assert_eq!(back, toc);
    }
}
