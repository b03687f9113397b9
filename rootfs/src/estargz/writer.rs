//! Writing eStargz layers: [`convert_layer`] turns an ordinary layer (plain, gzip or zstd tar)
//! into an eStargz blob, laid out as stargz-snapshotter's writer lays it out:
//!
//! * tar headers go into the gzip member that is open (the one before a file's payload);
//! * each non-empty regular file's payload starts a new member, and every `chunk_size` bytes
//!   of it start another (`chunk` TOC entries for the second and later chunks); the payload's
//!   tar padding and the following headers stay in the member of its last chunk;
//! * the TOC (`stargz.index.json`, tab-indented JSON) is the last tar entry, in a member of its
//!   own together with the tar's end-of-archive blocks, followed by the 51-byte footer.
//!
//! Every regular file gets `digest`, every chunk `chunkDigest`; `innerOffset` is always 0.
//! Headers are re-written from the parsed source headers (as stargz's non-lossless writer
//! does): names, links, modes, owners, times (sub-second ones and atimes through PAX), device
//! numbers and `SCHILY.xattr.*` records are kept; owner and group names are not. An existing
//! TOC or landmark in the source is dropped.
//!
//! Without prioritised files the layer is streamed (`.no.prefetch.landmark` first); with them
//! the source's payloads are spooled to an anonymous temporary file so that the prioritised
//! entries (with their parent directories and hard-link targets) can be written first, then
//! `.prefetch.landmark`, then the rest in source order. As in stargz, a later entry of the
//! same name replaces an earlier one in that mode.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::time::{Duration, UNIX_EPOCH};

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use sha2::{Digest as _, Sha256};
use snapshot_core::identity::{Digest, digest_from_hasher, sha256_digest};

use super::footer::footer;
use super::toc::{EntryType, Toc, TocEntry};
use super::{DEFAULT_CHUNK_SIZE, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME};
use crate::apply::{TarHeader, TarKind, TarStream, TarTime, decompress};
use crate::{Error, Result};

const BLOCK: usize = 512;
/// Content of a landmark file.
const LANDMARK_CONTENT: u8 = 0x0f;

/// How [`convert_layer`] lays out the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterOptions {
    /// Files larger than this are split into chunks of this size (default
    /// [`DEFAULT_CHUNK_SIZE`]); must not be 0.
    pub chunk_size: u64,
    /// Paths written first, in this order (with their parent directories and hard-link
    /// targets), followed by `.prefetch.landmark`. Empty: `.no.prefetch.landmark` comes first.
    /// Names missing from the layer are skipped.
    pub prioritized_files: Vec<String>,
    /// Gzip level, 0 to 9 (default 6).
    pub compression_level: u32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            prioritized_files: Vec::new(),
            compression_level: 6,
        }
    }
}

/// What [`convert_layer`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// Digest of the eStargz blob (the layer descriptor's digest).
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed eStargz tar (the layer's diff ID; not the source's).
    pub diff_id: Digest,
    /// Digest of the TOC JSON (the `containerd.io/snapshot/stargz/toc.digest` annotation).
    pub toc_digest: Digest,
    /// Size of the uncompressed tar (the `io.containers.estargz.uncompressed-size`
    /// annotation).
    pub uncompressed_size: u64,
    /// Digest of the source layer's uncompressed stream (its diff ID, to check against the
    /// image config).
    pub source_diff_id: Digest,
}

/// Converts the layer `src` (plain, gzip or zstd tar, detected by magic bytes) into an eStargz
/// blob written to `dst`. A malformed source fails with [`Error::InvalidArchive`]; sparse
/// files are [`Error::Unsupported`].
pub fn convert_layer(src: impl Read, dst: impl Write, opts: &WriterOptions) -> Result<Converted> {
    if opts.chunk_size == 0 {
        return Err(Error::InvalidArgument(
            "eStargz chunk size must not be 0".into(),
        ));
    }
    if opts.compression_level > 9 {
        return Err(Error::InvalidArgument(format!(
            "gzip compression level {} is not in 0..=9",
            opts.compression_level
        )));
    }
    let mut stream = TarStream::new(decompress(src)?);
    let mut out = LayerWriter::new(dst, opts);
    if opts.prioritized_files.is_empty() {
        out.landmark(NO_PREFETCH_LANDMARK)?;
        while let Some(h) = stream.next()? {
            if is_reserved(&h) {
                tracing::debug!(name = %h.display_name(), "existing eStargz entry dropped");
                continue;
            }
            let size = stream.data_left();
            let name = h.display_name();
            out.entry(&h, size, |payload| stream.copy_data(payload, &name))?;
        }
    } else {
        let spool = Spool::read(&mut stream)?;
        let (first, rest) = spool.order(&opts.prioritized_files);
        tracing::debug!(prioritized = first.len(), "eStargz prioritized entries");
        for i in first {
            spool.write_entry(i, &mut out)?;
        }
        out.landmark(PREFETCH_LANDMARK)?;
        for i in rest {
            spool.write_entry(i, &mut out)?;
        }
    }
    let (source_diff_id, _) = stream.finish()?;
    let mut converted = out.finish()?;
    converted.source_diff_id = source_diff_id;
    Ok(converted)
}

/// Entries of the source that the converter writes itself.
fn is_reserved(h: &TarHeader) -> bool {
    let name = clean(&String::from_utf8_lossy(&h.name));
    name == TOC_NAME || name == PREFETCH_LANDMARK || name == NO_PREFETCH_LANDMARK
}

/// `name` without `./`, leading, trailing or doubled `/`.
fn clean(name: &str) -> String {
    name.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Counts and hashes the compressed bytes.
struct Counter<W> {
    inner: W,
    written: u64,
    hasher: Sha256,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Between gzip members, inside one, or after a failed close.
enum State<W: Write> {
    Idle(Counter<W>),
    Open(Box<GzEncoder<Counter<W>>>),
    Broken,
}

/// The blob being written: gzip members of the uncompressed tar, and the TOC entries so far.
struct LayerWriter<W: Write> {
    state: State<W>,
    level: Compression,
    chunk_size: u64,
    diff: Sha256,
    uncompressed: u64,
    entries: Vec<TocEntry>,
}

fn write_error(e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        if let Some(Ok(inner)) = e.into_inner().map(|i| i.downcast::<Error>()) {
            return *inner;
        }
        return Error::InvalidArchive("eStargz payload".into());
    }
    Error::io("write eStargz blob", e)
}

impl<W: Write> LayerWriter<W> {
    fn new(dst: W, opts: &WriterOptions) -> Self {
        LayerWriter {
            state: State::Idle(Counter {
                inner: dst,
                written: 0,
                hasher: Sha256::new(),
            }),
            level: Compression::new(opts.compression_level),
            chunk_size: opts.chunk_size,
            diff: Sha256::new(),
            uncompressed: 0,
            entries: Vec::new(),
        }
    }

    /// Starts a gzip member unless one is open.
    fn open(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.state, State::Broken) {
            State::Idle(c) => {
                self.state = State::Open(Box::new(
                    GzBuilder::new().operating_system(255).write(c, self.level),
                ));
                Ok(())
            }
            State::Open(g) => {
                self.state = State::Open(g);
                Ok(())
            }
            State::Broken => Err(broken()),
        }
    }

    /// Ends the open gzip member, if any.
    fn close(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.state, State::Broken) {
            State::Open(g) => {
                self.state = State::Idle(g.finish().map_err(write_error)?);
                Ok(())
            }
            State::Idle(c) => {
                self.state = State::Idle(c);
                Ok(())
            }
            State::Broken => Err(broken()),
        }
    }

    /// Compressed bytes written so far (exact between members).
    fn offset(&self) -> u64 {
        match &self.state {
            State::Idle(c) => c.written,
            State::Open(g) => g.get_ref().written,
            State::Broken => 0,
        }
    }

    /// Appends bytes of the uncompressed tar, in the open member (opening one if needed).
    fn write_tar(&mut self, data: &[u8]) -> Result<()> {
        self.open()?;
        let State::Open(g) = &mut self.state else {
            return Err(broken());
        };
        g.write_all(data).map_err(write_error)?;
        self.diff.update(data);
        self.uncompressed += data.len() as u64;
        Ok(())
    }

    /// Writes one entry: its header blocks, then (regular files) its payload in chunks, each
    /// chunk starting a member. `payload` must write exactly `size` bytes into the sink.
    fn entry(
        &mut self,
        h: &TarHeader,
        size: u64,
        payload: impl FnOnce(&mut Payload<'_, W>) -> Result<()>,
    ) -> Result<()> {
        let entry = toc_entry(h, size);
        self.write_tar(&header_blocks(h, size)?)?;
        if h.kind != TarKind::File {
            self.entries.push(entry);
            return Ok(());
        }
        let reg_index = self.entries.len();
        if size == 0 {
            let mut entry = entry;
            entry.digest = sha256_digest(b"").to_string();
            self.entries.push(entry);
            return Ok(());
        }
        let mut sink = Payload {
            out: self,
            size,
            written: 0,
            chunk_left: 0,
            next: Some(entry),
            current: None,
            file_hash: Sha256::new(),
            chunk_hash: Sha256::new(),
        };
        payload(&mut sink)?;
        if sink.written != size {
            return Err(Error::InvalidArchive(format!(
                "{}: payload has {} of its {size} bytes",
                h.display_name(),
                sink.written
            )));
        }
        let digest = digest_from_hasher(std::mem::take(&mut sink.file_hash));
        if let Some(reg) = self.entries.get_mut(reg_index) {
            reg.digest = digest.to_string();
        }
        self.write_tar(&vec![0u8; padding(size)])
    }

    fn landmark(&mut self, name: &str) -> Result<()> {
        let h = TarHeader {
            kind: TarKind::File,
            name: name.as_bytes().to_vec(),
            link: Vec::new(),
            mode: 0, // as stargz writes it
            uid: 0,
            gid: 0,
            mtime: TarTime::default(),
            atime: None,
            major: 0,
            minor: 0,
            xattrs: Vec::new(),
        };
        self.entry(&h, 1, |p| {
            p.write_all(&[LANDMARK_CONTENT])
                .map_err(|e| Error::io("write landmark", e))
        })
    }

    /// Writes the TOC member and the footer.
    fn finish(mut self) -> Result<Converted> {
        self.close()?;
        let toc_offset = self.offset();
        let toc = Toc {
            version: 1,
            entries: std::mem::take(&mut self.entries),
        };
        let mut json = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut ser = serde_json::Serializer::with_formatter(&mut json, formatter);
        serde::Serialize::serialize(&toc, &mut ser)
            .map_err(|e| Error::InvalidArchive(format!("cannot encode the eStargz TOC: {e}")))?;
        let toc_digest = sha256_digest(&json);
        let h = TarHeader {
            kind: TarKind::File,
            name: TOC_NAME.as_bytes().to_vec(),
            link: Vec::new(),
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: TarTime::default(),
            atime: None,
            major: 0,
            minor: 0,
            xattrs: Vec::new(),
        };
        self.write_tar(&header_blocks(&h, json.len() as u64)?)?;
        self.write_tar(&json)?;
        self.write_tar(&vec![0u8; padding(json.len() as u64)])?;
        self.write_tar(&[0u8; 2 * BLOCK])?;
        self.close()?;
        let State::Idle(mut c) = std::mem::replace(&mut self.state, State::Broken) else {
            return Err(broken());
        };
        c.write_all(&footer(toc_offset)).map_err(write_error)?;
        c.flush().map_err(write_error)?;
        Ok(Converted {
            digest: digest_from_hasher(c.hasher),
            size: c.written,
            diff_id: digest_from_hasher(self.diff),
            toc_digest,
            uncompressed_size: self.uncompressed,
            // Filled in by convert_layer.
            source_diff_id: sha256_digest(b""),
        })
    }
}

fn broken() -> Error {
    Error::io(
        "write eStargz blob",
        io::Error::other("an earlier write of the blob failed"),
    )
}

/// The payload of a regular file being written: splits it into chunks, each in a member of its
/// own, and records a TOC entry per chunk.
struct Payload<'a, W: Write> {
    out: &'a mut LayerWriter<W>,
    size: u64,
    written: u64,
    chunk_left: u64,
    /// The entry of the next chunk (the file's own entry for the first one).
    next: Option<TocEntry>,
    /// The entry of the chunk being written.
    current: Option<TocEntry>,
    file_hash: Sha256,
    chunk_hash: Sha256,
}

impl<W: Write> Payload<'_, W> {
    fn start_chunk(&mut self) -> Result<()> {
        self.out.close()?;
        let mut e = self
            .next
            .take()
            .unwrap_or_else(|| TocEntry::new(String::new(), EntryType::Chunk));
        let remain = self.size - self.written;
        let len = remain.min(self.out.chunk_size);
        e.offset = self.out.offset();
        e.chunk_offset = self.written;
        // As stargz: the last chunk's size is 0 ("up to the end") unless it is a full chunk.
        e.chunk_size = if remain < self.out.chunk_size { 0 } else { len };
        self.next = Some(TocEntry::new(e.name.clone(), EntryType::Chunk));
        self.current = Some(e);
        self.chunk_left = len;
        self.out.open()
    }

    fn end_chunk(&mut self) {
        if let Some(mut e) = self.current.take() {
            e.chunk_digest = digest_from_hasher(std::mem::take(&mut self.chunk_hash)).to_string();
            self.out.entries.push(e);
        }
    }
}

impl<W: Write> Write for Payload<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            if self.written == self.size {
                return Err(io::Error::other(Error::InvalidArchive(
                    "payload longer than its header says".into(),
                )));
            }
            if self.chunk_left == 0 {
                self.start_chunk().map_err(io::Error::other)?;
            }
            let n = (buf.len() - done).min(usize::try_from(self.chunk_left).unwrap_or(usize::MAX));
            let data = &buf[done..done + n];
            self.out.write_tar(data).map_err(io::Error::other)?;
            self.file_hash.update(data);
            self.chunk_hash.update(data);
            self.written += n as u64;
            self.chunk_left -= n as u64;
            done += n;
            if self.chunk_left == 0 {
                self.end_chunk();
            }
        }
        Ok(done)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The TOC entry of a header (offsets and digests are filled in while writing).
fn toc_entry(h: &TarHeader, size: u64) -> TocEntry {
    let kind = match h.kind {
        TarKind::File => EntryType::Reg,
        TarKind::Hardlink => EntryType::Hardlink,
        TarKind::Symlink => EntryType::Symlink,
        TarKind::Char => EntryType::Char,
        TarKind::Block => EntryType::Block,
        TarKind::Dir => EntryType::Dir,
        TarKind::Fifo => EntryType::Fifo,
    };
    let mut e = TocEntry::new(String::from_utf8_lossy(&h.name).into_owned(), kind);
    e.mode = u64::from(h.mode);
    e.uid = h.uid;
    e.gid = h.gid;
    e.mod_time = modtime(h.mtime);
    match kind {
        EntryType::Reg => e.size = size,
        EntryType::Hardlink | EntryType::Symlink => {
            e.link_name = String::from_utf8_lossy(&h.link).into_owned();
        }
        EntryType::Char | EntryType::Block => {
            e.dev_major = h.major;
            e.dev_minor = h.minor;
        }
        _ => {}
    }
    let mut xattrs = BTreeMap::new();
    for (k, v) in &h.xattrs {
        xattrs.insert(String::from_utf8_lossy(k).into_owned(), v.clone());
    }
    e.xattrs = xattrs;
    e
}

/// RFC 3339 in UTC rounded to the second, as stargz writes it; none for the epoch, times
/// before it and times past year 9999.
fn modtime(t: TarTime) -> Option<String> {
    let sec = t.sec.checked_add(i64::from(t.nsec >= 500_000_000))?;
    if sec <= 0 || sec >= 253_402_300_800 {
        return None;
    }
    let at = UNIX_EPOCH + Duration::from_secs(sec as u64);
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// Writes `v` as a NUL-terminated octal field; false when it does not fit.
fn put_octal(field: &mut [u8], v: u64) -> bool {
    let digits = field.len() - 1;
    let text = format!("{v:0digits$o}");
    if text.len() > digits {
        return false;
    }
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
    true
}

/// One PAX record `<len> <key>=<value>\n`.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let base = key.len() + value.len() + 3;
    let mut total = base + 1;
    loop {
        let t = base + total.to_string().len();
        if t == total {
            break;
        }
        total = t;
    }
    out.extend_from_slice(total.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn pax_time(t: TarTime) -> Vec<u8> {
    if t.nsec == 0 || t.sec < 0 {
        t.sec.to_string().into_bytes()
    } else {
        format!("{}.{:09}", t.sec, t.nsec).into_bytes()
    }
}

/// A ustar header block with its checksum.
fn ustar_block(
    name: &[u8],
    typeflag: u8,
    fill: impl FnOnce(&mut [u8; BLOCK]) -> Result<()>,
) -> Result<[u8; BLOCK]> {
    let mut b = [0u8; BLOCK];
    let n = name.len().min(100);
    b[..n].copy_from_slice(&name[..n]);
    b[156] = typeflag;
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    for field in [100..108, 108..116, 116..124, 329..337, 337..345] {
        put_octal(&mut b[field], 0);
    }
    put_octal(&mut b[124..136], 0);
    put_octal(&mut b[136..148], 0);
    fill(&mut b)?;
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&c| u32::from(c)).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(b)
}

/// The header blocks of an entry: a PAX extended header when a field does not fit ustar (long
/// names, big ids or sizes, sub-second or negative times, atime, xattrs), then the ustar
/// header.
fn header_blocks(h: &TarHeader, size: u64) -> Result<Vec<u8>> {
    let mut pax = Vec::new();
    let typeflag = match h.kind {
        TarKind::File => b'0',
        TarKind::Hardlink => b'1',
        TarKind::Symlink => b'2',
        TarKind::Char => b'3',
        TarKind::Block => b'4',
        TarKind::Dir => b'5',
        TarKind::Fifo => b'6',
    };
    if h.name.len() > 100 {
        pax_record(&mut pax, b"path", &h.name);
    }
    if h.link.len() > 100 {
        pax_record(&mut pax, b"linkpath", &h.link);
    }
    let main = ustar_block(&h.name, typeflag, |b| {
        let n = h.link.len().min(100);
        b[157..157 + n].copy_from_slice(&h.link[..n]);
        put_octal(&mut b[100..108], u64::from(h.mode));
        if !put_octal(&mut b[108..116], h.uid) {
            pax_record(&mut pax, b"uid", h.uid.to_string().as_bytes());
        }
        if !put_octal(&mut b[116..124], h.gid) {
            pax_record(&mut pax, b"gid", h.gid.to_string().as_bytes());
        }
        if !put_octal(&mut b[124..136], size) {
            pax_record(&mut pax, b"size", size.to_string().as_bytes());
        }
        let sec_fits = u64::try_from(h.mtime.sec).is_ok_and(|s| put_octal(&mut b[136..148], s));
        if !sec_fits || h.mtime.nsec != 0 {
            pax_record(&mut pax, b"mtime", &pax_time(h.mtime));
        }
        if let Some(atime) = h.atime {
            pax_record(&mut pax, b"atime", &pax_time(atime));
        }
        if !put_octal(&mut b[329..337], h.major) || !put_octal(&mut b[337..345], h.minor) {
            return Err(Error::InvalidArchive(format!(
                "{}: device number {}:{} too large",
                h.display_name(),
                h.major,
                h.minor
            )));
        }
        for (k, v) in &h.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        Ok(())
    })?;
    let mut out = Vec::with_capacity(3 * BLOCK + pax.len());
    if !pax.is_empty() {
        let base = h.name.rsplit(|&c| c == b'/').find(|c| !c.is_empty());
        let mut name = b"PaxHeaders/".to_vec();
        name.extend_from_slice(base.unwrap_or(b"x"));
        let ext = ustar_block(&name, b'x', |b| {
            put_octal(&mut b[100..108], 0o644);
            put_octal(&mut b[124..136], pax.len() as u64);
            Ok(())
        })?;
        out.extend_from_slice(&ext);
        out.extend_from_slice(&pax);
        out.resize(out.len() + padding(pax.len() as u64), 0);
    }
    out.extend_from_slice(&main);
    Ok(out)
}

/// An entry of a spooled source: its header and where its payload is in the spool file.
struct Spooled {
    header: TarHeader,
    size: u64,
    offset: u64,
}

/// The source layer with its payloads in a temporary file, for writing entries in any order.
struct Spool {
    file: File,
    /// Entries in source order; `None` where a later entry of the same name replaced it.
    entries: Vec<Option<Spooled>>,
    /// Clean name -> position of its (last) entry.
    index: HashMap<String, usize>,
}

impl Spool {
    fn read<R: Read>(stream: &mut TarStream<R>) -> Result<Spool> {
        let file = tempfile::tempfile().map_err(|e| Error::io("create spool file", e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut entries: Vec<Option<Spooled>> = Vec::new();
        let mut index = HashMap::new();
        let mut offset = 0u64;
        while let Some(header) = stream.next()? {
            if is_reserved(&header) {
                continue;
            }
            let size = stream.data_left();
            let name = header.display_name();
            stream.copy_data(&mut w, &name)?;
            if let Some(old) = index.insert(clean(&name), entries.len()) {
                entries[old] = None;
            }
            entries.push(Some(Spooled {
                header,
                size,
                offset,
            }));
            offset += size;
        }
        let file = w
            .into_inner()
            .map_err(|e| Error::io("write spool file", e.into_error()))?;
        Ok(Spool {
            file,
            entries,
            index,
        })
    }

    /// Positions of the prioritised entries (parents and link targets first), then of the
    /// others in source order.
    fn order(&self, prioritized: &[String]) -> (Vec<usize>, Vec<usize>) {
        let mut picked = HashSet::new();
        let mut first = Vec::new();
        for name in prioritized {
            let name = clean(name);
            if !self.index.contains_key(&name) {
                tracing::debug!(%name, "prioritized file not in this layer");
                continue;
            }
            self.pick(&name, &mut picked, &mut first);
        }
        let taken: HashSet<usize> = first.iter().copied().collect();
        let rest = (0..self.entries.len())
            .filter(|i| self.entries[*i].is_some() && !taken.contains(i))
            .collect();
        (first, rest)
    }

    fn pick(&self, name: &str, picked: &mut HashSet<String>, order: &mut Vec<usize>) {
        if !picked.insert(name.to_string()) {
            return;
        }
        if !name.is_empty() {
            let parent = name.rsplit_once('/').map_or("", |(p, _)| p);
            self.pick(parent, picked, order);
        }
        let Some(&i) = self.index.get(name) else {
            return;
        };
        if let Some(Some(e)) = self.entries.get(i)
            && e.header.kind == TarKind::Hardlink
        {
            let target = clean(&String::from_utf8_lossy(&e.header.link));
            self.pick(&target, picked, order);
        }
        order.push(i);
    }

    fn write_entry<W: Write>(&self, i: usize, out: &mut LayerWriter<W>) -> Result<()> {
        let Some(Some(e)) = self.entries.get(i) else {
            return Ok(());
        };
        out.entry(&e.header, e.size, |sink| {
            let mut f = &self.file;
            f.seek(SeekFrom::Start(e.offset))
                .map_err(|err| Error::io("read spool file", err))?;
            io::copy(&mut f.take(e.size), sink).map_err(|err| {
                if err.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                    write_error(err)
                } else {
                    Error::io("copy from spool file", err)
                }
            })?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Index, IndexOptions, ReadAt, decompress_chunk, read_toc};
    use super::*;

    struct Mem(Vec<u8>);

    impl ReadAt for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let start = offset as usize;
            buf.copy_from_slice(&self.0[start..start + buf.len()]);
            Ok(())
        }
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_600_000_000);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn read_back(blob: &[u8], path: &str) -> Vec<u8> {
        let mem = Mem(blob.to_vec());
        let opened = read_toc(&mem).unwrap();
        let index = Index::build(&opened.toc, opened.toc_offset, &IndexOptions::default()).unwrap();
        let node = index.node(index.resolve(path).unwrap());
        let mut out = Vec::new();
        for c in &node.chunks {
            let start = c.blob_offset as usize;
            out.extend(decompress_chunk(&blob[start..start + c.blob_len as usize], c).unwrap());
        }
        out
    }

    #[test]
    fn chunks_members_and_digests() {
        let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let src = tar_of(&[("a", b"hello"), ("big", &big), ("empty", b"")]);
        let opts = WriterOptions {
            chunk_size: 4096,
            ..WriterOptions::default()
        };
        let mut blob = Vec::new();
        let c = convert_layer(&src[..], &mut blob, &opts).unwrap();
        assert_eq!(c.size, blob.len() as u64);
        assert_eq!(c.digest, sha256_digest(&blob));
        let opened = read_toc(&Mem(blob.clone())).unwrap();
        assert_eq!(opened.toc_digest, c.toc_digest);
        let names: Vec<(&str, EntryType)> = opened
            .toc
            .entries
            .iter()
            .map(|e| (e.name.as_str(), e.kind))
            .collect();
        assert_eq!(
            names,
            [
                (NO_PREFETCH_LANDMARK, EntryType::Reg),
                ("a", EntryType::Reg),
                ("big", EntryType::Reg),
                ("big", EntryType::Chunk),
                ("big", EntryType::Chunk),
                ("empty", EntryType::Reg),
            ]
        );
        let e = &opened.toc.entries;
        assert_eq!((e[2].chunk_offset, e[2].chunk_size), (0, 4096));
        assert_eq!((e[3].chunk_offset, e[3].chunk_size), (4096, 4096));
        assert_eq!((e[4].chunk_offset, e[4].chunk_size), (8192, 0));
        assert_eq!(e[2].digest, sha256_digest(&big).to_string());
        assert_eq!(e[5].digest, sha256_digest(b"").to_string());
        for entry in &e[..5] {
            assert!(!entry.chunk_digest.is_empty());
            // Every payload starts a gzip member.
            assert_eq!(
                &blob[entry.offset as usize..entry.offset as usize + 2],
                [0x1f, 0x8b]
            );
        }
        assert_eq!(read_back(&blob, "big"), big);
        assert_eq!(read_back(&blob, "a"), b"hello");
        // The whole blob is one gzip tar whose digest is the diff ID.
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(sha256_digest(&tar), c.diff_id);
        assert_eq!(tar.len() as u64, c.uncompressed_size);
        assert_eq!(c.source_diff_id, sha256_digest(&src));
    }

    #[test]
    fn prioritized_files_come_first_with_their_parents() {
        let mut b = tar::Builder::new(Vec::new());
        for dir in ["d/", "d/e/"] {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_cksum();
            b.append_data(&mut h, dir, io::empty()).unwrap();
        }
        for (name, data) in [("x", b"1"), ("d/e/f", b"2"), ("y", b"3")] {
            let mut h = tar::Header::new_ustar();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        let src = b.into_inner().unwrap();
        let opts = WriterOptions {
            prioritized_files: vec!["/d/e/f".into(), "missing".into(), "y".into()],
            ..WriterOptions::default()
        };
        let mut blob = Vec::new();
        convert_layer(&src[..], &mut blob, &opts).unwrap();
        let opened = read_toc(&Mem(blob.clone())).unwrap();
        let names: Vec<&str> = opened.toc.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["d/", "d/e/", "d/e/f", "y", PREFETCH_LANDMARK, "x"]);
        let index = Index::build(&opened.toc, opened.toc_offset, &IndexOptions::default()).unwrap();
        assert_eq!(index.prefetch_end, Some(opened.toc.entries[4].offset));
        assert_eq!(read_back(&blob, "d/e/f"), b"2");
        assert_eq!(read_back(&blob, "x"), b"1");
    }

    #[test]
    fn long_names_and_big_ids_go_through_pax() {
        let long = format!("{}/file", "n".repeat(150));
        let h = TarHeader {
            kind: TarKind::File,
            name: long.clone().into_bytes(),
            link: Vec::new(),
            mode: 0o4755,
            uid: 1 << 30,
            gid: 5,
            mtime: TarTime {
                sec: 1_600_000_000,
                nsec: 5,
            },
            atime: None,
            major: 0,
            minor: 0,
            xattrs: vec![(b"user.k".to_vec(), b"v\n\0x".to_vec())],
        };
        let blocks = header_blocks(&h, 3).unwrap();
        let mut data = blocks;
        data.extend_from_slice(b"abc");
        data.resize(data.len() + padding(3) + 1024, 0);
        let mut stream = TarStream::new(&data[..]);
        let back = stream.next().unwrap().unwrap();
        assert_eq!(back, h);
        assert_eq!(stream.data_left(), 3);
        let mut body = Vec::new();
        stream.copy_data(&mut body, "x").unwrap();
        assert_eq!(body, b"abc");
        assert!(stream.next().unwrap().is_none());
        // Other readers see the same (the tar crate cannot read the xattr's newline).
        let mut plain = h.clone();
        plain.xattrs.clear();
        let mut data = header_blocks(&plain, 0).unwrap();
        data.resize(data.len() + 1024, 0);
        let mut a = tar::Archive::new(&data[..]);
        let e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str().unwrap(), long);
        assert_eq!(e.header().uid().unwrap(), 1 << 30);
        assert_eq!(e.header().mode().unwrap(), 0o4755);
    }

    #[test]
    fn bad_input_is_an_invalid_archive() {
        let mut garbage = vec![b'x'; 1024];
        garbage[0] = b'a';
        let e = convert_layer(&garbage[..], io::sink(), &WriterOptions::default()).unwrap_err();
        assert!(matches!(e, Error::InvalidArchive(_)), "{e}");
        let mut src = tar_of(&[("a", &[7u8; 2000])]);
        src.truncate(1200);
        let e = convert_layer(&src[..], io::sink(), &WriterOptions::default()).unwrap_err();
        assert!(
            e.to_string().contains("invalid archive") || matches!(e, Error::Io { .. }),
            "{e}"
        );
        let opts = WriterOptions {
            chunk_size: 0,
            ..WriterOptions::default()
        };
        assert!(matches!(
            convert_layer(&[][..], io::sink(), &opts),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn modtimes() {
        assert_eq!(modtime(TarTime { sec: 0, nsec: 0 }), None);
        assert_eq!(
            modtime(TarTime {
                sec: 1_600_000_000,
                nsec: 600_000_000
            })
            .as_deref(),
            Some("2020-09-13T12:26:41Z")
        );
    }
}
