//! The file tree of an eStargz layer, built from its TOC, in overlay form.
//!
//! Whiteouts (`.wh.<name>`) become character devices 0/0 and opaque markers (`.wh..wh..opq`)
//! become the opaque xattr on their directory, so a filesystem serving this tree is directly
//! usable as an overlay lower layer. Landmark files are hidden.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use snapshot_core::identity::{Digest, parse_digest};

use super::toc::{EntryType, Toc, TocEntry};
use super::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME};
use crate::{Error, Result};

/// Index of a node in [`Index::nodes`]; the root is [`ROOT`].
pub type NodeId = usize;
/// The root directory.
pub const ROOT: NodeId = 0;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Directory.
    Dir,
    /// Regular file.
    Reg,
    /// Symbolic link.
    Symlink,
    /// Character device (also an overlay whiteout: 0/0).
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

/// A piece of a regular file stored in its own part of a gzip member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk inside the file.
    pub file_offset: u64,
    /// Uncompressed size of the chunk.
    pub size: u64,
    /// Offset in the blob of the gzip member holding the chunk.
    pub blob_offset: u64,
    /// Compressed length of that member (up to the next member).
    pub blob_len: u64,
    /// Offset of the chunk inside the uncompressed member.
    pub inner_offset: u64,
    /// Digest of the chunk's bytes, when the TOC gives one.
    pub digest: Option<Digest>,
}

/// A file, directory, link or device of the layer.
#[derive(Debug, Clone)]
pub struct Node {
    /// What it is.
    pub kind: NodeKind,
    /// Permission bits, with setuid/setgid/sticky (no type bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size of a regular file, length of a symlink target.
    pub size: u64,
    /// Modification time.
    pub mtime: SystemTime,
    /// Device numbers (major, minor).
    pub rdev: (u32, u32),
    /// Target of a symlink.
    pub link_target: String,
    /// Extended attributes (including the overlay opaque marker).
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Entries of a directory, by name.
    pub children: BTreeMap<String, NodeId>,
    /// The directory holding this node (the root is its own parent).
    pub parent: NodeId,
    /// Number of names (hard links) of a non-directory; subdirectories + 2 for a directory.
    pub nlink: u32,
    /// The chunks of a regular file, ordered by `file_offset`.
    pub chunks: Vec<Chunk>,
}

/// How whiteouts are presented.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Xattrs set to `y` on opaque directories (`trusted.overlay.opaque`, and
    /// `user.overlay.opaque` for rootless overlay).
    pub opaque_xattrs: Vec<String>,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            opaque_xattrs: vec!["trusted.overlay.opaque".into()],
        }
    }
}

/// The tree of a layer.
#[derive(Debug, Clone)]
pub struct Index {
    /// All nodes; [`ROOT`] first.
    pub nodes: Vec<Node>,
    /// End of the prioritised files: `Some(offset)` of `.prefetch.landmark`, `Some(0)` with
    /// `.no.prefetch.landmark`, `None` when the layer has no landmark.
    pub prefetch_end: Option<u64>,
}

impl Index {
    /// Builds the tree from `toc` (whose member starts at `toc_offset`). Hostile names (`..`,
    /// links to directories, chunks without a file) fail with [`Error::InvalidArchive`].
    pub fn build(toc: &Toc, toc_offset: u64, opts: &IndexOptions) -> Result<Index> {
        let mut b = Builder {
            nodes: vec![dir_node(ROOT)],
            member_ends: member_ends(toc, toc_offset),
            toc_offset,
            prefetch_end: None,
            last_file: None,
            opts,
        };
        for entry in &toc.entries {
            b.add(entry)?;
        }
        b.finish_nlinks();
        Ok(Index {
            nodes: b.nodes,
            prefetch_end: b.prefetch_end,
        })
    }

    /// The node `id`.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: NodeId, name: &str) -> Option<NodeId> {
        self.nodes.get(parent)?.children.get(name).copied()
    }

    /// The node at `path` (`a/b/c`, relative to the root).
    pub fn resolve(&self, path: &str) -> Option<NodeId> {
        path.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .try_fold(ROOT, |id, name| self.lookup(id, name))
    }

    /// Sum of the chunk sizes of every regular file (each hard-linked file once).
    pub fn payload_size(&self) -> u64 {
        self.nodes
            .iter()
            .flat_map(|n| &n.chunks)
            .map(|c| c.size)
            .sum()
    }
}

struct Builder<'a> {
    nodes: Vec<Node>,
    /// Sorted distinct payload member offsets, ending with the TOC offset.
    member_ends: Vec<u64>,
    toc_offset: u64,
    prefetch_end: Option<u64>,
    /// The regular file that `chunk` entries extend.
    last_file: Option<(String, NodeId)>,
    opts: &'a IndexOptions,
}

impl Builder<'_> {
    fn add(&mut self, e: &TocEntry) -> Result<()> {
        let name = clean_name(&e.name)?;
        if e.kind == EntryType::Chunk {
            return self.add_chunk(&name, e);
        }
        self.last_file = None;
        if name.is_empty() {
            if e.kind == EntryType::Dir {
                apply_attrs(&mut self.nodes[ROOT], e);
            }
            return Ok(());
        }
        if name == TOC_NAME {
            return Ok(());
        }
        if name == PREFETCH_LANDMARK {
            self.prefetch_end = Some(e.offset);
            return Ok(());
        }
        if name == NO_PREFETCH_LANDMARK {
            self.prefetch_end = Some(0);
            return Ok(());
        }
        let (dir, base) = match name.rsplit_once('/') {
            Some((dir, base)) => (self.mkdir_all(dir)?, base),
            None => (ROOT, name.as_str()),
        };
        if base == ".wh..wh..opq" {
            for key in &self.opts.opaque_xattrs {
                self.nodes[dir].xattrs.insert(key.clone(), b"y".to_vec());
            }
            return Ok(());
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            let mut n = leaf(NodeKind::Char, dir);
            apply_attrs(&mut n, e);
            n.rdev = (0, 0);
            n.mode = 0;
            self.insert(dir, hidden, n);
            return Ok(());
        }
        match e.kind {
            EntryType::Dir => {
                let id = match self.nodes[dir].children.get(base) {
                    Some(&id) if self.nodes[id].kind == NodeKind::Dir => id,
                    _ => self.insert(dir, base, dir_node(dir)),
                };
                let keep = std::mem::take(&mut self.nodes[id].xattrs);
                apply_attrs(&mut self.nodes[id], e);
                // An opaque marker may come before the directory's own entry.
                for key in &self.opts.opaque_xattrs {
                    if keep.contains_key(key) {
                        self.nodes[id].xattrs.insert(key.clone(), b"y".to_vec());
                    }
                }
            }
            EntryType::Hardlink => {
                let target = clean_name(&e.link_name)?;
                let id = self.resolve_existing(&target).ok_or_else(|| {
                    Error::InvalidArchive(format!(
                        "eStargz TOC: hard link {name:?} to missing {target:?}"
                    ))
                })?;
                if self.nodes[id].kind == NodeKind::Dir {
                    return Err(Error::InvalidArchive(format!(
                        "eStargz TOC: hard link {name:?} to directory {target:?}"
                    )));
                }
                self.nodes[dir].children.insert(base.to_string(), id);
            }
            kind => {
                let node_kind = match kind {
                    EntryType::Reg => NodeKind::Reg,
                    EntryType::Symlink => NodeKind::Symlink,
                    EntryType::Char => NodeKind::Char,
                    EntryType::Block => NodeKind::Block,
                    _ => NodeKind::Fifo,
                };
                let mut n = leaf(node_kind, dir);
                apply_attrs(&mut n, e);
                if node_kind == NodeKind::Symlink {
                    n.link_target = e.link_name.clone();
                    n.size = e.link_name.len() as u64;
                }
                let is_file = node_kind == NodeKind::Reg;
                let id = self.insert(dir, base, n);
                if is_file {
                    self.nodes[id].size = e.size;
                    self.last_file = Some((name.clone(), id));
                    if e.size > 0 {
                        self.push_chunk(id, e)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn add_chunk(&mut self, name: &str, e: &TocEntry) -> Result<()> {
        match &self.last_file {
            Some((file, id)) if file == name => {
                let id = *id;
                self.push_chunk(id, e)
            }
            _ => Err(Error::InvalidArchive(format!(
                "eStargz TOC: chunk of {name:?} does not follow its file"
            ))),
        }
    }

    fn push_chunk(&mut self, id: NodeId, e: &TocEntry) -> Result<()> {
        let file_size = self.nodes[id].size;
        let end = if e.chunk_size > 0 {
            e.chunk_offset.saturating_add(e.chunk_size)
        } else {
            file_size
        };
        let bad = |what: &str| {
            Error::InvalidArchive(format!("eStargz TOC: chunk of {:?} {what}", e.name))
        };
        let expected_start = self.nodes[id]
            .chunks
            .last()
            .map_or(0, |c| c.file_offset + c.size);
        if e.chunk_offset != expected_start || end > file_size || end <= e.chunk_offset {
            return Err(bad("is out of order or out of the file"));
        }
        if e.offset >= self.toc_offset {
            return Err(bad("points past the payloads"));
        }
        let next = self.member_ends.partition_point(|&o| o <= e.offset);
        let blob_len = self
            .member_ends
            .get(next)
            .copied()
            .unwrap_or(self.toc_offset)
            - e.offset;
        let digest = if !e.chunk_digest.is_empty() {
            Some(parse_digest(&e.chunk_digest).map_err(|_| bad("has a bad chunkDigest"))?)
        } else if e.kind == EntryType::Reg && end == file_size && !e.digest.is_empty() {
            Some(parse_digest(&e.digest).map_err(|_| bad("has a bad digest"))?)
        } else {
            None
        };
        self.nodes[id].chunks.push(Chunk {
            file_offset: e.chunk_offset,
            size: end - e.chunk_offset,
            blob_offset: e.offset,
            blob_len,
            inner_offset: e.inner_offset,
            digest,
        });
        Ok(())
    }

    fn insert(&mut self, dir: NodeId, name: &str, node: Node) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(node);
        self.nodes[dir].children.insert(name.to_string(), id);
        id
    }

    fn mkdir_all(&mut self, path: &str) -> Result<NodeId> {
        let mut id = ROOT;
        for name in path.split('/') {
            id = match self.nodes[id].children.get(name) {
                Some(&child) if self.nodes[child].kind == NodeKind::Dir => child,
                _ => self.insert(id, name, dir_node(id)),
            };
        }
        Ok(id)
    }

    fn resolve_existing(&self, path: &str) -> Option<NodeId> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT, |id, name| self.nodes[id].children.get(name).copied())
    }

    fn finish_nlinks(&mut self) {
        let mut counts = vec![0u32; self.nodes.len()];
        for n in &self.nodes {
            for &child in n.children.values() {
                counts[child] += 1;
            }
        }
        for (id, n) in self.nodes.iter_mut().enumerate() {
            n.nlink = if n.kind == NodeKind::Dir {
                2
            } else {
                counts[id].max(1)
            };
        }
        let subdirs: Vec<(NodeId, u32)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(id, n)| {
                let dirs = n
                    .children
                    .values()
                    .filter(|&&c| self.nodes[c].kind == NodeKind::Dir)
                    .count();
                (id, dirs as u32)
            })
            .collect();
        for (id, dirs) in subdirs {
            if self.nodes[id].kind == NodeKind::Dir {
                self.nodes[id].nlink += dirs;
            }
        }
    }
}

/// `name` without `./`, leading or trailing `/`; `..` components are refused.
fn clean_name(name: &str) -> Result<String> {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(Error::InvalidArchive(format!(
            "eStargz TOC: entry name {name:?} leaves the layer"
        )));
    }
    Ok(parts.join("/"))
}

fn member_ends(toc: &Toc, toc_offset: u64) -> Vec<u64> {
    let mut ends: Vec<u64> = toc
        .entries
        .iter()
        .map(|e| e.offset)
        .filter(|&o| o > 0 && o < toc_offset)
        .collect();
    ends.push(toc_offset);
    ends.sort_unstable();
    ends.dedup();
    ends
}

fn dir_node(parent: NodeId) -> Node {
    let mut n = leaf(NodeKind::Dir, parent);
    n.mode = 0o755;
    n
}

fn leaf(kind: NodeKind, parent: NodeId) -> Node {
    Node {
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: SystemTime::UNIX_EPOCH,
        rdev: (0, 0),
        link_target: String::new(),
        xattrs: BTreeMap::new(),
        children: BTreeMap::new(),
        parent,
        nlink: 1,
        chunks: Vec::new(),
    }
}

fn apply_attrs(n: &mut Node, e: &TocEntry) {
    n.mode = (e.mode & 0o7777) as u32;
    n.uid = e.uid as u32;
    n.gid = e.gid as u32;
    n.rdev = (e.dev_major as u32, e.dev_minor as u32);
    n.xattrs = e.xattrs.clone();
    n.mtime = e
        .mod_time
        .as_deref()
        .and_then(parse_time)
        .unwrap_or(SystemTime::UNIX_EPOCH);
}

fn parse_time(s: &str) -> Option<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Some(t);
    }
    // With a numeric zone offset: `2006-01-02T15:04:05+07:00`.
    let (base, sign, zone) = match s.rfind(['+', '-']) {
        Some(i) if i > 10 => (&s[..i], &s[i..i + 1], &s[i + 1..]),
        _ => return None,
    };
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let (h, m) = zone.split_once(':')?;
    let offset = Duration::from_secs(h.parse::<u64>().ok()? * 3600 + m.parse::<u64>().ok()? * 60);
    if sign == "+" {
        t.checked_sub(offset)
    } else {
        t.checked_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, kind: EntryType) -> TocEntry {
        TocEntry::new(name, kind)
    }

    fn reg(name: &str, size: u64, offset: u64) -> TocEntry {
        let mut e = entry(name, EntryType::Reg);
        e.size = size;
        e.offset = offset;
        e.mode = 0o644;
        e
    }

    #[test]
    fn builds_tree_with_implicit_dirs_links_whiteouts_and_chunks() {
        let mut big = reg("a/b/big", 10, 100);
        big.chunk_size = 4;
        big.chunk_digest = format!("sha256:{}", "0".repeat(64));
        let mut c2 = entry("a/b/big", EntryType::Chunk);
        c2.offset = 200;
        c2.chunk_offset = 4;
        c2.chunk_size = 4;
        let mut c3 = entry("a/b/big", EntryType::Chunk);
        c3.offset = 300;
        c3.inner_offset = 7;
        c3.chunk_offset = 8;
        let mut link = entry("a/link", EntryType::Hardlink);
        link.link_name = "a/b/big".into();
        let mut sym = entry("./s", EntryType::Symlink);
        sym.link_name = "a/b".into();
        let mut landmark = reg(PREFETCH_LANDMARK, 1, 350);
        landmark.mode = 0o644;
        let toc = Toc {
            version: 1,
            entries: vec![
                entry("./", EntryType::Dir),
                big,
                c2,
                c3,
                link,
                sym,
                reg("a/.wh.gone", 0, 0),
                reg("a/.wh..wh..opq", 0, 0),
                entry("a/", EntryType::Dir),
                landmark,
            ],
        };
        let ix = Index::build(&toc, 400, &IndexOptions::default()).unwrap();
        let big = ix.resolve("a/b/big").unwrap();
        assert_eq!(ix.resolve("a/link"), Some(big));
        assert_eq!(ix.node(big).nlink, 2);
        let chunks = &ix.node(big).chunks;
        assert_eq!(chunks.len(), 3);
        assert_eq!(
            (chunks[0].file_offset, chunks[0].size, chunks[0].blob_len),
            (0, 4, 100)
        );
        assert!(chunks[0].digest.is_some());
        assert_eq!(
            (
                chunks[2].file_offset,
                chunks[2].size,
                chunks[2].inner_offset
            ),
            (8, 2, 7)
        );
        assert_eq!(chunks[2].blob_len, 50, "ends at the landmark's member");
        let gone = ix.resolve("a/gone").unwrap();
        assert_eq!(
            (ix.node(gone).kind, ix.node(gone).rdev),
            (NodeKind::Char, (0, 0))
        );
        let a = ix.resolve("a").unwrap();
        assert_eq!(ix.node(a).xattrs["trusted.overlay.opaque"], b"y");
        assert_eq!(ix.node(ix.resolve("s").unwrap()).link_target, "a/b");
        assert_eq!(ix.resolve(PREFETCH_LANDMARK), None);
        assert_eq!(ix.prefetch_end, Some(350));
        assert_eq!(ix.node(ROOT).nlink, 3);
    }

    #[test]
    fn refuses_hostile_entries() {
        for entries in [
            vec![reg("../x", 1, 10)],
            vec![entry("d", EntryType::Dir), {
                let mut l = entry("l", EntryType::Hardlink);
                l.link_name = "d".into();
                l
            }],
            vec![{
                let mut c = entry("x", EntryType::Chunk);
                c.offset = 5;
                c
            }],
            vec![reg("x", 10, 500)],
        ] {
            let toc = Toc {
                version: 1,
                entries,
            };
            let e = Index::build(&toc, 400, &IndexOptions::default()).unwrap_err();
            assert!(matches!(e, Error::InvalidArchive(_)), "{e}");
        }
    }

    #[test]
    fn parses_times_with_zones() {
        let utc = parse_time("2020-01-01T00:00:00Z").unwrap();
        assert_eq!(parse_time("2020-01-01T01:00:00+01:00"), Some(utc));
        assert_eq!(parse_time("2019-12-31T23:00:00-01:00"), Some(utc));
    }
}
