//! Turns a stream of changes into an OCI layer tar (containerd's `ChangeWriter`).
//!
//! Headers are PAX-format tar headers written by hand: a plain ustar header when every field
//! fits (names split into prefix/name when possible), else a PAX extended header (`path`,
//! `linkpath`, `uid`, `gid`, `size`, `mtime`, `SCHILY.xattr.*` records, sorted by key) before
//! it, as Go's `archive/tar` does for `FormatPAX`. Times are whole seconds; no atime/ctime, no
//! user or group names.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use super::fsutil::{self, At, CAPABILITY_XATTR, Loc, Meta};
use crate::{Error, Result};

const BLOCK: usize = 512;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    /// New in the upper tree.
    Add,
    /// Present in both, different.
    Modify,
    /// Gone from the upper tree.
    Delete,
    /// Present in both and the same, but hard-linked: a changed peer may need it.
    Unmodified,
}

/// The tar entry types written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeFlag {
    Regular,
    HardLink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl TypeFlag {
    fn byte(self) -> u8 {
        match self {
            TypeFlag::Regular => b'0',
            TypeFlag::HardLink => b'1',
            TypeFlag::Symlink => b'2',
            TypeFlag::Char => b'3',
            TypeFlag::Block => b'4',
            TypeFlag::Dir => b'5',
            TypeFlag::Fifo => b'6',
        }
    }
}

/// One header to write.
#[derive(Debug, Clone)]
struct Header {
    name: Vec<u8>,
    flag: TypeFlag,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: i64,
    link: Vec<u8>,
    dev_major: u32,
    dev_minor: u32,
    capability: Option<Vec<u8>>,
}

/// Writes changes of the tree at `source` as a layer tar into `out`.
///
/// Changes must arrive in the differs' order (a directory before its children, siblings sorted
/// by name bytes). Parent directories of every entry are written first if they were not.
pub(crate) struct ChangeWriter<W: Write> {
    out: BufWriter<W>,
    source: PathBuf,
    /// Directories written so far (relative names without a trailing slash).
    added_dirs: HashSet<Vec<u8>>,
    /// Hard-link groups: (dev, ino) -> the name that carries the data.
    inode_src: HashMap<(u64, u64), Vec<u8>>,
    /// Hard-link peers seen unmodified before any changed peer: written as links to it later.
    inode_refs: HashMap<(u64, u64), Vec<Vec<u8>>>,
    /// Entries written (for logs).
    entries: u64,
}

impl<W: Write> ChangeWriter<W> {
    /// A writer reading file data from the tree at `source`.
    pub(crate) fn new(out: W, source: &Path) -> Self {
        ChangeWriter {
            out: BufWriter::with_capacity(256 * 1024, out),
            source: source.to_path_buf(),
            added_dirs: HashSet::new(),
            inode_src: HashMap::new(),
            inode_refs: HashMap::new(),
            entries: 0,
        }
    }

    /// How many entries were written.
    pub(crate) fn entries(&self) -> u64 {
        self.entries
    }

    /// Records one change of the relative path `rel` (no leading or trailing slash); `meta` is
    /// the upper tree's stat (ignored for deletions).
    pub(crate) fn change(
        &mut self,
        kind: ChangeKind,
        rel: &[u8],
        meta: Option<&Meta>,
        at: Option<At<'_>>,
    ) -> Result<()> {
        if kind == ChangeKind::Delete {
            return self.whiteout(rel);
        }
        let Some(meta) = meta else {
            return Err(Error::InvalidArgument(format!(
                "diff: no metadata for {}",
                String::from_utf8_lossy(rel)
            )));
        };
        let flag = match meta.file_type() {
            FileType::Socket => return Ok(()),
            FileType::Directory => {
                if self.added_dirs.contains(rel) {
                    return Ok(());
                }
                TypeFlag::Dir
            }
            FileType::RegularFile => TypeFlag::Regular,
            FileType::Symlink => TypeFlag::Symlink,
            FileType::CharacterDevice => TypeFlag::Char,
            FileType::BlockDevice => TypeFlag::Block,
            FileType::Fifo => TypeFlag::Fifo,
            FileType::Unknown => {
                return Err(Error::Unsupported(format!(
                    "file type of {}",
                    fsutil::join(&self.source, rel).display()
                )));
            }
        };
        let path = fsutil::join(&self.source, rel);
        let loc = match at {
            Some(a) => Loc::At(a),
            None => Loc::Path(&path),
        };
        let mut name = rel.to_vec();
        if flag == TypeFlag::Dir {
            name.push(b'/');
        }
        let (dev_major, dev_minor) = match flag {
            TypeFlag::Char | TypeFlag::Block => {
                (rustix::fs::major(meta.rdev), rustix::fs::minor(meta.rdev))
            }
            _ => (0, 0),
        };
        let mut hdr = Header {
            name,
            flag,
            mode: meta.mode & 0o7777,
            uid: u64::from(meta.uid),
            gid: u64::from(meta.gid),
            size: if flag == TypeFlag::Regular {
                meta.size
            } else {
                0
            },
            mtime: meta.mtime,
            link: Vec::new(),
            dev_major,
            dev_minor,
            capability: None,
        };

        // Hard links: the first changed name carries the data, the others link to it.
        let mut peers = Vec::new();
        if meta.is_linked() {
            let key = (meta.dev, meta.ino);
            if let Some(src) = self.inode_src.get(&key) {
                hdr.flag = TypeFlag::HardLink;
                hdr.link = src.clone();
                hdr.size = 0;
            } else if kind == ChangeKind::Unmodified {
                self.inode_refs.entry(key).or_default().push(hdr.name);
                return Ok(());
            } else {
                self.inode_src.insert(key, hdr.name.clone());
                peers = self.inode_refs.remove(&key).unwrap_or_default();
            }
        } else if kind == ChangeKind::Unmodified {
            return Ok(());
        }

        if hdr.flag == TypeFlag::Symlink {
            hdr.link = loc.read_link()?;
        }
        hdr.capability = loc.xattr(CAPABILITY_XATTR)?.filter(|c| !c.is_empty());
        self.include_parents(&hdr.name)?;
        self.write_header(&hdr)?;
        if hdr.flag == TypeFlag::Regular && hdr.size > 0 {
            self.copy_file(&loc, hdr.size)?;
        }
        if hdr.flag == TypeFlag::Dir {
            self.added_dirs.insert(rel.to_vec());
        }
        if !peers.is_empty() {
            let source = hdr.name.clone();
            for peer in peers {
                hdr.name = peer;
                hdr.flag = TypeFlag::HardLink;
                hdr.link = source.clone();
                hdr.size = 0;
                self.include_parents(&hdr.name)?;
                self.write_header(&hdr)?;
            }
        }
        Ok(())
    }

    /// Writes the opaque marker `rel/.wh..wh..opq` of directory `rel`.
    pub(crate) fn opaque(&mut self, rel: &[u8]) -> Result<()> {
        let mut name = rel.to_vec();
        name.push(b'/');
        name.extend_from_slice(OPAQUE_MARKER);
        self.marker(name)
    }

    /// Writes the whiteout `.wh.<name>` for the deleted `rel`.
    fn whiteout(&mut self, rel: &[u8]) -> Result<()> {
        let (dir, base) = match rel.iter().rposition(|b| *b == b'/') {
            Some(i) => (&rel[..=i], &rel[i + 1..]),
            None => (&rel[..0], rel),
        };
        let mut name = Vec::with_capacity(rel.len() + WHITEOUT_PREFIX.len());
        name.extend_from_slice(dir);
        name.extend_from_slice(WHITEOUT_PREFIX);
        name.extend_from_slice(base);
        self.marker(name)
    }

    /// An empty regular file, mode 0, owned by 0:0, dated 1970-01-01 (containerd 2.x).
    fn marker(&mut self, name: Vec<u8>) -> Result<()> {
        let hdr = Header {
            name,
            flag: TypeFlag::Regular,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            capability: None,
        };
        self.include_parents(&hdr.name)?;
        self.write_header(&hdr)
    }

    /// Writes the parent directory of `name` (from the source tree) if it was not written yet.
    fn include_parents(&mut self, name: &[u8]) -> Result<()> {
        let trimmed = name.strip_suffix(b"/").unwrap_or(name);
        let Some(i) = trimmed.iter().rposition(|b| *b == b'/') else {
            return Ok(()); // directly under the root
        };
        let parent = &trimmed[..i];
        if self.added_dirs.contains(parent) {
            return Ok(());
        }
        let path = fsutil::join(&self.source, parent);
        let Some(meta) = fsutil::lstat(&path)? else {
            return Err(Error::io(
                format!("stat {}", path.display()),
                io::Error::from(io::ErrorKind::NotFound),
            ));
        };
        if !meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "diff: parent {} is not a directory",
                path.display()
            )));
        }
        let parent = parent.to_vec();
        self.change(ChangeKind::Modify, &parent, Some(&meta), None)
    }

    fn write_header(&mut self, hdr: &Header) -> Result<()> {
        let mut blocks = Vec::with_capacity(3 * BLOCK);
        encode_header(hdr, &mut blocks)?;
        self.out
            .write_all(&blocks)
            .map_err(|e| write_error(e, "write layer tar"))?;
        self.entries += 1;
        Ok(())
    }

    /// Copies exactly `size` bytes of the file at `loc`, then the block padding.
    fn copy_file(&mut self, loc: &Loc<'_>, size: u64) -> Result<()> {
        let path = loc.path();
        let file = loc.open_file()?;
        let copied = copy_exact(&file, size, &mut self.out)
            .map_err(|e| write_error(e, &format!("copy {} into the layer", path.display())))?;
        if copied != size {
            return Err(Error::io(
                format!(
                    "copy {}: the file changed while diffing ({size} bytes expected, {copied} read)",
                    path.display()
                ),
                io::Error::from(io::ErrorKind::UnexpectedEof),
            ));
        }
        let pad = padding(size);
        if pad > 0 {
            self.out
                .write_all(&[0u8; BLOCK][..pad])
                .map_err(|e| write_error(e, "write layer tar"))?;
        }
        Ok(())
    }

    /// Writes the end-of-archive blocks and returns the inner writer, flushed.
    pub(crate) fn finish(mut self) -> Result<W> {
        self.out
            .write_all(&[0u8; 2 * BLOCK])
            .map_err(|e| write_error(e, "write layer tar"))?;
        self.out
            .into_inner()
            .map_err(|e| write_error(e.into_error(), "write layer tar"))
    }
}

/// Copies up to `size` bytes of `file` into `out`; returns how many.
fn copy_exact<W: Write>(file: &File, size: u64, out: &mut W) -> io::Result<u64> {
    io::copy(&mut file.take(size), out)
}

/// Keeps the rootfs error inside an `io::Error` (e.g. from the content store), else adds context.
fn write_error(e: io::Error, context: &str) -> Error {
    crate::content::error_from_io(e, context)
}

fn padding(size: u64) -> usize {
    let rem = (size % BLOCK as u64) as usize;
    if rem == 0 { 0 } else { BLOCK - rem }
}

/// Encodes `hdr` (and a PAX extended header before it when needed) into `out`.
fn encode_header(hdr: &Header, out: &mut Vec<u8>) -> Result<()> {
    let mut pax: Vec<(&[u8], Vec<u8>)> = Vec::new();
    let (name_field, prefix_field): (&[u8], &[u8]) = if hdr.name.len() <= 100 && hdr.name.is_ascii()
    {
        (&hdr.name, b"")
    } else if let Some((prefix, name)) = split_ustar(&hdr.name) {
        (name, prefix)
    } else {
        pax.push((b"path", hdr.name.clone()));
        (&hdr.name, b"")
    };
    if hdr.link.len() > 100 || !hdr.link.is_ascii() {
        pax.push((b"linkpath", hdr.link.clone()));
    }
    const MAX_ID: u64 = 0o7777777;
    const MAX_SIZE: u64 = 0o77777777777;
    if hdr.uid > MAX_ID {
        pax.push((b"uid", hdr.uid.to_string().into_bytes()));
    }
    if hdr.gid > MAX_ID {
        pax.push((b"gid", hdr.gid.to_string().into_bytes()));
    }
    if hdr.size > MAX_SIZE {
        pax.push((b"size", hdr.size.to_string().into_bytes()));
    }
    let mtime_fits = (0..=MAX_SIZE as i64).contains(&hdr.mtime);
    if !mtime_fits {
        pax.push((b"mtime", hdr.mtime.to_string().into_bytes()));
    }
    let xattr_key;
    if let Some(cap) = &hdr.capability {
        xattr_key = format!("SCHILY.xattr.{CAPABILITY_XATTR}");
        pax.push((xattr_key.as_bytes(), cap.clone()));
    }
    if u64::from(hdr.dev_major) > MAX_ID || u64::from(hdr.dev_minor) > MAX_ID {
        return Err(Error::Unsupported(format!(
            "device number {}:{} of {} in a tar header",
            hdr.dev_major,
            hdr.dev_minor,
            String::from_utf8_lossy(&hdr.name)
        )));
    }

    if !pax.is_empty() {
        pax.sort_by(|a, b| a.0.cmp(b.0));
        let mut data = Vec::new();
        for (k, v) in &pax {
            pax_record(&mut data, k, v);
        }
        let pax_name = pax_header_name(&hdr.name);
        let mut block = [0u8; BLOCK];
        put_str(&mut block[0..100], &pax_name);
        put_octal(&mut block[100..108], 0);
        put_octal(&mut block[108..116], 0);
        put_octal(&mut block[116..124], 0);
        put_octal(&mut block[124..136], data.len() as u64);
        put_octal(&mut block[136..148], 0);
        block[156] = b'x';
        block[257..263].copy_from_slice(b"ustar\0");
        block[263..265].copy_from_slice(b"00");
        put_octal(&mut block[329..337], 0);
        put_octal(&mut block[337..345], 0);
        set_checksum(&mut block);
        out.extend_from_slice(&block);
        out.extend_from_slice(&data);
        out.resize(out.len() + padding(data.len() as u64), 0);
    }

    let mut block = [0u8; BLOCK];
    put_str(&mut block[0..100], &ascii_prefix(name_field, 100));
    put_octal(&mut block[100..108], u64::from(hdr.mode));
    put_octal(
        &mut block[108..116],
        if hdr.uid > MAX_ID { 0 } else { hdr.uid },
    );
    put_octal(
        &mut block[116..124],
        if hdr.gid > MAX_ID { 0 } else { hdr.gid },
    );
    put_octal(
        &mut block[124..136],
        if hdr.size > MAX_SIZE { 0 } else { hdr.size },
    );
    put_octal(
        &mut block[136..148],
        if mtime_fits { hdr.mtime as u64 } else { 0 },
    );
    block[156] = hdr.flag.byte();
    put_str(&mut block[157..257], &ascii_prefix(&hdr.link, 100));
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    put_octal(&mut block[329..337], u64::from(hdr.dev_major));
    put_octal(&mut block[337..345], u64::from(hdr.dev_minor));
    put_str(&mut block[345..500], prefix_field);
    set_checksum(&mut block);
    out.extend_from_slice(&block);
    Ok(())
}

/// Splits a long ASCII name into ustar prefix (≤155) and name (≤100) at a slash.
fn split_ustar(name: &[u8]) -> Option<(&[u8], &[u8])> {
    if name.len() <= 100 || !name.is_ascii() {
        return None;
    }
    // A trailing slash (directories) stays with the name part.
    let body = name.strip_suffix(b"/").unwrap_or(name);
    let limit = body.len().min(156);
    let i = body[..limit].iter().rposition(|b| *b == b'/')?;
    let (prefix, rest) = (&name[..i], &name[i + 1..]);
    if i == 0 || prefix.len() > 155 || rest.is_empty() || rest.len() > 100 {
        return None;
    }
    Some((prefix, rest))
}

/// The name of a PAX extended header for `name`: `dir/PaxHeaders.0/base`, ASCII, ≤100 bytes.
fn pax_header_name(name: &[u8]) -> Vec<u8> {
    let trimmed = name.strip_suffix(b"/").unwrap_or(name);
    let (dir, base) = match trimmed.iter().rposition(|b| *b == b'/') {
        Some(i) => (&trimmed[..=i], &trimmed[i + 1..]),
        None => (&trimmed[..0], trimmed),
    };
    let mut out = dir.to_vec();
    out.extend_from_slice(b"PaxHeaders.0/");
    out.extend_from_slice(base);
    let mut out = ascii_prefix(&out, 100);
    while out.last() == Some(&b'/') {
        out.pop();
    }
    out
}

/// The ASCII bytes of `s` (others dropped), at most `max` of them.
fn ascii_prefix(s: &[u8], max: usize) -> Vec<u8> {
    s.iter().copied().filter(u8::is_ascii).take(max).collect()
}

/// Appends one PAX record `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // space, '=', newline
    let mut len = rest + 1;
    while len != rest + decimal_digits(len) {
        len = rest + decimal_digits(len);
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn decimal_digits(n: usize) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

fn put_str(field: &mut [u8], s: &[u8]) {
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s[..n]);
}

/// Zero-padded octal filling all but the last byte of `field`, then NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    let bytes = s.as_bytes();
    let start = bytes.len().saturating_sub(digits);
    field[..digits].copy_from_slice(&bytes[start..]);
    field[digits] = 0;
}

fn set_checksum(block: &mut [u8; BLOCK]) {
    block[148..156].fill(b' ');
    let sum: u64 = block.iter().map(|b| u64::from(*b)).sum();
    let s = format!("{sum:06o}");
    block[148..154].copy_from_slice(&s.as_bytes()[s.len() - 6..]);
    block[154] = 0;
    block[155] = b' ';
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        for (k, v) in [
            ("path", "a".repeat(5)),
            ("path", "b".repeat(90)),
            ("x", "y".repeat(993)),
        ] {
            let mut out = Vec::new();
            pax_record(&mut out, k.as_bytes(), v.as_bytes());
            let s = String::from_utf8(out.clone()).unwrap();
            let (n, _) = s.split_once(' ').unwrap();
            assert_eq!(n.parse::<usize>().unwrap(), out.len(), "{s:?}");
        }
    }

    #[test]
    fn long_names_split_or_go_to_pax() {
        let dir = "d".repeat(120);
        let name = format!("{dir}/file");
        let (p, n) = split_ustar(name.as_bytes()).unwrap();
        assert_eq!(p, dir.as_bytes());
        assert_eq!(n, b"file");
        assert!(split_ustar("x".repeat(200).as_bytes()).is_none());
        assert!(split_ustar(b"short").is_none());
    }
}
