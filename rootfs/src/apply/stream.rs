//! Reading a tar stream header by header, as Go's `archive/tar` reads it (v7, ustar, PAX, GNU
//! and star headers), while hashing and counting every byte of the stream.
//!
//! Headers are parsed here rather than by the `tar` crate: extension records (GNU long names,
//! PAX headers) are refused before they are read when larger than [`MAX_SPECIAL`] (the crate
//! would read them whole), PAX values may hold any byte (xattr values do; the crate splits
//! records at newlines), empty numeric fields count as 0, and header-only entries (links,
//! devices, directories) carry no data whatever their size field says, all as in Go.

use std::io::{self, BufRead, BufReader, Read, Write};

use sha2::{Digest as _, Sha256};
use snapshot_core::identity::{Digest, digest_from_hasher};

use super::invalid;
use crate::{Error, Result};

/// Size of a tar block.
const BLOCK: u64 = 512;
/// Largest GNU long name, long link or PAX extension accepted (Go's `maxSpecialFileSize`).
pub(crate) const MAX_SPECIAL: u64 = 1 << 20;
/// Read buffer: data is copied into files in chunks of up to this size.
const BUFFER: usize = 1 << 20;

/// The kinds of entries that are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

/// A point in time as a tar header gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Time {
    pub(crate) sec: i64,
    pub(crate) nsec: u32,
}

/// One entry's header with its PAX and GNU extensions merged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) kind: Kind,
    pub(crate) name: Vec<u8>,
    pub(crate) link: Vec<u8>,
    pub(crate) mode: u32,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    pub(crate) mtime: Time,
    pub(crate) atime: Option<Time>,
    pub(crate) major: u64,
    pub(crate) minor: u64,
    /// `SCHILY.xattr.*` records, in stream order (a later duplicate wins).
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Header {
    /// The name for messages.
    pub(crate) fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Hashes and counts what passes through.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A tar stream being read: yields headers; the current entry's data can be copied out.
pub(crate) struct TarStream<R> {
    inner: BufReader<Hashing<R>>,
    /// Data bytes of the current entry not yet read.
    data_left: u64,
    /// Padding after the current entry's data.
    pad_left: u64,
}

/// Turns an error of the (decompressed) input into ours: a [`crate::Error`] carried inside the
/// `io::Error` (e.g. a content reader's digest mismatch) comes back out; decoder errors make the
/// archive invalid; system errors stay I/O errors.
pub(crate) fn read_error(e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        if let Some(Ok(inner)) = e.into_inner().map(|i| i.downcast::<Error>()) {
            return *inner;
        }
        return invalid("corrupt layer stream");
    }
    if e.raw_os_error().is_some() {
        return Error::io("read layer stream", e);
    }
    invalid(format!("corrupt layer stream: {e}"))
}

impl<R: Read> TarStream<R> {
    pub(crate) fn new(inner: R) -> TarStream<R> {
        let hashing = Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        };
        TarStream {
            inner: BufReader::with_capacity(BUFFER, hashing),
            data_left: 0,
            pad_left: 0,
        }
    }

    /// The next entry's header, or `None` at the end of the archive.
    pub(crate) fn next(&mut self) -> Result<Option<Header>> {
        self.skip(self.data_left)?;
        self.data_left = 0;
        let pad = std::mem::take(&mut self.pad_left);
        if !self.skip_padding(pad)? {
            // Like Go's reader: a stream that ends inside the padding after the last entry's
            // data ends the archive (umoci's `insert` writes such layers).
            return Ok(None);
        }
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        loop {
            let mut block = [0u8; BLOCK as usize];
            if !self.read_block(&mut block)? {
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                // End of archive: a second zero block or the end of the stream.
                let mut second = [0u8; BLOCK as usize];
                if self.read_block(&mut second)? && second.iter().any(|&b| b != 0) {
                    return Err(invalid("tar header after an end-of-archive block"));
                }
                return Ok(None);
            }
            let raw = RawHeader::parse(&block)?;
            match raw.typeflag {
                b'L' | b'K' | b'x' | b'g' => {
                    let data = self.read_special(raw.size, raw.typeflag)?;
                    match raw.typeflag {
                        b'L' => long_name = Some(cstr(&data).to_vec()),
                        b'K' => long_link = Some(cstr(&data).to_vec()),
                        b'x' => pax = parse_pax(&data)?,
                        _ => {
                            // A global header is ignored (as containerd does) and ends
                            // whatever extensions came before it (as Go's reader does).
                            parse_pax(&data)?;
                            tracing::debug!("PAX global extended header ignored");
                            long_name = None;
                            long_link = None;
                            pax.clear();
                        }
                    }
                }
                _ => return self.finish_header(raw, long_name, long_link, pax).map(Some),
            }
        }
    }

    fn finish_header(
        &mut self,
        raw: RawHeader,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Header> {
        let RawHeader {
            typeflag,
            mut name,
            mut link,
            mode,
            mut uid,
            mut gid,
            mut size,
            mut mtime,
            mut atime,
            major,
            minor,
        } = raw;
        let mut xattrs = Vec::new();
        for (key, value) in pax {
            let bad = || {
                invalid(format!(
                    "invalid PAX record {}",
                    String::from_utf8_lossy(&key)
                ))
            };
            match key.as_slice() {
                b"path" => name = value,
                b"linkpath" => link = value,
                b"size" => size = parse_decimal(&value).ok_or_else(bad)?,
                b"uid" => uid = parse_decimal(&value).ok_or_else(bad)?,
                b"gid" => gid = parse_decimal(&value).ok_or_else(bad)?,
                b"mtime" => mtime = parse_pax_time(&value).ok_or_else(bad)?,
                b"atime" => atime = Some(parse_pax_time(&value).ok_or_else(bad)?),
                k if k.starts_with(b"GNU.sparse.") => {
                    return Err(Error::Unsupported("sparse files in layers".into()));
                }
                k => {
                    if let Some(attr) = k.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.push((attr.to_vec(), value));
                    }
                }
            }
        }
        if let Some(n) = long_name {
            name = n;
        }
        if let Some(l) = long_link {
            link = l;
        }
        if name.contains(&0) || link.contains(&0) {
            return Err(invalid("NUL byte in an entry name"));
        }
        let kind = match typeflag {
            b'0' => Kind::File,
            0 if name.ends_with(b"/") => Kind::Dir,
            0 => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            b'S' => return Err(Error::Unsupported("sparse files in layers".into())),
            t => {
                return Err(invalid(format!(
                    "unhandled tar header type {t} ({:?}) for {}",
                    t as char,
                    String::from_utf8_lossy(&name)
                )));
            }
        };
        // Like Go's reader: header-only entries have no data, whatever their size says.
        if kind != Kind::File {
            size = 0;
        }
        self.data_left = size;
        self.pad_left = padding(size);
        Ok(Header {
            kind,
            name,
            link,
            mode,
            uid,
            gid,
            mtime,
            atime,
            major,
            minor,
            xattrs,
        })
    }

    /// Data bytes of the current entry (after [`TarStream::next`]) not read yet.
    pub(crate) fn data_left(&self) -> u64 {
        self.data_left
    }

    /// Copies the current entry's data into `out`.
    pub(crate) fn copy_data(&mut self, out: &mut impl Write, name: &str) -> Result<()> {
        while self.data_left > 0 {
            let chunk = self.inner.fill_buf().map_err(read_error)?;
            if chunk.is_empty() {
                return Err(invalid(format!(
                    "stream ends {} bytes before the end of {name}",
                    self.data_left
                )));
            }
            let n = chunk
                .len()
                .min(usize::try_from(self.data_left).unwrap_or(usize::MAX));
            out.write_all(&chunk[..n])
                .map_err(|e| Error::io(format!("write {name}"), e))?;
            self.inner.consume(n);
            self.data_left -= n as u64;
        }
        Ok(())
    }

    /// Drains the stream to its end and returns the digest and size of everything read.
    pub(crate) fn finish(mut self) -> Result<(Digest, u64)> {
        loop {
            let n = self.inner.fill_buf().map_err(read_error)?.len();
            if n == 0 {
                break;
            }
            self.inner.consume(n);
        }
        let hashing = self.inner.into_inner();
        Ok((digest_from_hasher(hashing.hasher), hashing.count))
    }

    /// Reads one block; false at a clean end of stream.
    fn read_block(&mut self, block: &mut [u8; BLOCK as usize]) -> Result<bool> {
        let mut filled = 0;
        while filled < block.len() {
            let chunk = self.inner.fill_buf().map_err(read_error)?;
            if chunk.is_empty() {
                if filled == 0 {
                    return Ok(false);
                }
                return Err(invalid("stream ends inside a tar header"));
            }
            let n = chunk.len().min(block.len() - filled);
            block[filled..filled + n].copy_from_slice(&chunk[..n]);
            self.inner.consume(n);
            filled += n;
        }
        Ok(true)
    }

    /// Reads the data of an extension header, refusing oversized ones before reading them.
    fn read_special(&mut self, size: u64, typeflag: u8) -> Result<Vec<u8>> {
        if size > MAX_SPECIAL {
            return Err(invalid(format!(
                "{size}-byte extension header (type {:?}) exceeds the {MAX_SPECIAL}-byte limit",
                typeflag as char
            )));
        }
        let mut data = Vec::with_capacity(size as usize);
        (&mut self.inner)
            .take(size)
            .read_to_end(&mut data)
            .map_err(read_error)?;
        if (data.len() as u64) < size {
            return Err(invalid("stream ends inside an extension header"));
        }
        self.skip(padding(size))?;
        Ok(data)
    }

    /// Skips up to `n` bytes of padding; false if the stream ended first.
    fn skip_padding(&mut self, mut n: u64) -> Result<bool> {
        while n > 0 {
            let chunk = self.inner.fill_buf().map_err(read_error)?;
            if chunk.is_empty() {
                return Ok(false);
            }
            let k = chunk.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.inner.consume(k);
            n -= k as u64;
        }
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let chunk = self.inner.fill_buf().map_err(read_error)?;
            if chunk.is_empty() {
                return Err(invalid("stream ends inside an entry"));
            }
            let k = chunk.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.inner.consume(k);
            n -= k as u64;
        }
        Ok(())
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// The fields of one 512-byte header block.
struct RawHeader {
    typeflag: u8,
    name: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: Time,
    atime: Option<Time>,
    major: u64,
    minor: u64,
}

impl RawHeader {
    fn parse(b: &[u8; BLOCK as usize]) -> Result<RawHeader> {
        let bad = |field: &str| invalid(format!("invalid tar header: bad {field} field"));
        let given = parse_octal(&b[148..156]).ok_or_else(|| bad("checksum"))?;
        let (mut unsigned, mut signed) = (0i64, 0i64);
        for (i, &c) in b.iter().enumerate() {
            let c = if (148..156).contains(&i) { b' ' } else { c };
            unsigned += i64::from(c);
            signed += i64::from(c as i8);
        }
        if given != unsigned && given != signed {
            return Err(invalid("invalid tar header: checksum mismatch"));
        }
        let magic = &b[257..263];
        let version = &b[263..265];
        let (ustar, gnu, star) = (
            magic == b"ustar\0",
            magic == b"ustar " && version == b" \0",
            magic == b"ustar\0" && &b[508..512] == b"tar\0",
        );
        let num = |range: std::ops::Range<usize>, field: &str| {
            parse_numeric(&b[range]).ok_or_else(|| bad(field))
        };
        let unsigned_num = |range: std::ops::Range<usize>, field: &str| {
            num(range, field).and_then(|v| u64::try_from(v).map_err(|_| bad(field)))
        };
        let mut name = cstr(&b[0..100]).to_vec();
        let mut atime = None;
        if star {
            prefix_name(&mut name, cstr(&b[345..476]));
            atime = nonzero_time(&b[476..488]);
        } else if ustar {
            prefix_name(&mut name, cstr(&b[345..500]));
        } else if gnu {
            atime = nonzero_time(&b[345..357]);
        }
        let (major, minor) = if ustar || gnu {
            (
                unsigned_num(329..337, "devmajor")?,
                unsigned_num(337..345, "devminor")?,
            )
        } else {
            (0, 0)
        };
        Ok(RawHeader {
            typeflag: b[156],
            name,
            link: cstr(&b[157..257]).to_vec(),
            mode: (unsigned_num(100..108, "mode")? & 0o7777) as u32,
            uid: unsigned_num(108..116, "uid")?,
            gid: unsigned_num(116..124, "gid")?,
            size: unsigned_num(124..136, "size")?,
            mtime: Time {
                sec: num(136..148, "mtime")?,
                nsec: 0,
            },
            atime,
            major,
            minor,
        })
    }
}

fn prefix_name(name: &mut Vec<u8>, prefix: &[u8]) {
    if !prefix.is_empty() {
        let mut full = prefix.to_vec();
        full.push(b'/');
        full.append(name);
        *name = full;
    }
}

fn nonzero_time(field: &[u8]) -> Option<Time> {
    if field[0] == 0 {
        return None;
    }
    parse_numeric(field).map(|sec| Time { sec, nsec: 0 })
}

/// The bytes up to the first NUL.
fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// A numeric header field: base-256 when the high bit is set, else octal (Go's `parseNumeric`).
fn parse_numeric(b: &[u8]) -> Option<i64> {
    let first = *b.first()?;
    if first & 0x80 == 0 {
        return parse_octal(b);
    }
    let inv = if first & 0x40 != 0 { 0xff } else { 0 };
    let mut x: u64 = 0;
    for (i, &c) in b.iter().enumerate() {
        let mut c = c ^ inv;
        if i == 0 {
            c &= 0x7f;
        }
        if x >> 56 != 0 {
            return None;
        }
        x = (x << 8) | u64::from(c);
    }
    if x >> 63 != 0 {
        return None;
    }
    let x = x as i64;
    Some(if inv == 0xff { !x } else { x })
}

/// An octal field; spaces and NULs around it are ignored and an empty field is 0.
fn parse_octal(b: &[u8]) -> Option<i64> {
    let trim = |c: &u8| *c == b' ' || *c == 0;
    let start = b.iter().position(|c| !trim(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !trim(c)).map_or(start, |i| i + 1);
    let digits = cstr(&b[start..end]);
    if digits.is_empty() {
        return Some(0);
    }
    let text = std::str::from_utf8(digits).ok()?;
    u64::from_str_radix(text, 8)
        .ok()
        .and_then(|v| i64::try_from(v).ok())
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A PAX time `[-]seconds[.fraction]`.
fn parse_pax_time(b: &[u8]) -> Option<Time> {
    let (negative, b) = match b.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, b),
    };
    let (secs, frac) = match b.iter().position(|&c| c == b'.') {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &b[..0]),
    };
    let sec = i64::try_from(parse_decimal(secs)?).ok()?;
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut nsec = 0u32;
    for i in 0..9 {
        nsec = nsec * 10 + frac.get(i).map_or(0, |d| u32::from(d - b'0'));
    }
    if !negative {
        return Some(Time { sec, nsec });
    }
    Some(if nsec == 0 {
        Time { sec: -sec, nsec: 0 }
    } else {
        Time {
            sec: -sec - 1,
            nsec: 1_000_000_000 - nsec,
        }
    })
}

/// PAX records `"<len> <key>=<value>\n"`; values may hold any byte.
fn parse_pax(mut data: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let bad = || invalid("malformed PAX extended header");
    let mut out = Vec::new();
    while !data.is_empty() {
        let space = data.iter().position(|&c| c == b' ').ok_or_else(bad)?;
        let len =
            usize::try_from(parse_decimal(&data[..space]).ok_or_else(bad)?).map_err(|_| bad())?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &data[space + 1..len - 1];
        let eq = record.iter().position(|&c| c == b'=').ok_or_else(bad)?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        if key.is_empty() || key.contains(&0) {
            return Err(bad());
        }
        out.push((key.to_vec(), value.to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn numeric_fields_like_go() {
        assert_eq!(parse_octal(b"0000644\0"), Some(0o644));
        assert_eq!(parse_octal(b"  644 \0"), Some(0o644));
        assert_eq!(parse_octal(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_octal(b"12\0junk"), Some(0o12));
        assert_eq!(parse_octal(b"9"), None);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 0x05;
        big[10] = 0x01;
        assert_eq!(parse_numeric(&big), Some(0x105));
        assert_eq!(parse_numeric(&[0xff; 8]), Some(-1));
    }

    #[test]
    fn pax_records_keep_binary_values() {
        let rec = b"29 SCHILY.xattr.user.a=x\ny\0z\n12 path=a/b\n";
        let parsed = parse_pax(rec).unwrap();
        assert_eq!(parsed[0].0, b"SCHILY.xattr.user.a");
        assert_eq!(parsed[0].1, b"x\ny\0z");
        assert_eq!(parsed[1], (b"path".to_vec(), b"a/b".to_vec()));
        assert!(parse_pax(b"99 path=a\n").is_err());
        assert!(parse_pax(b"8 =abcd\n").is_err());
    }

    /// One file entry `f` holding `data`, without padding or end-of-archive blocks.
    fn unterminated(data: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path("f").unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn a_stream_ending_in_the_last_padding_ends_the_archive_like_go() {
        let tar = unterminated(b"c\n");
        let mut s = TarStream::new(&tar[..]);
        let h = s.next().unwrap().unwrap();
        assert_eq!(h.name, b"f");
        let mut out = Vec::new();
        s.copy_data(&mut out, "f").unwrap();
        assert_eq!(out, b"c\n");
        assert!(s.next().unwrap().is_none());
        let (_, size) = s.finish().unwrap();
        assert_eq!(size, tar.len() as u64);

        // Skipped rather than read, the data must still be whole.
        let mut s = TarStream::new(&tar[..]);
        s.next().unwrap().unwrap();
        assert!(s.next().unwrap().is_none());
        let mut s = TarStream::new(&tar[..tar.len() - 1]);
        s.next().unwrap().unwrap();
        assert!(s.next().is_err(), "data cut short is an error");
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"12.5"),
            Some(Time {
                sec: 12,
                nsec: 500_000_000
            })
        );
        assert_eq!(
            parse_pax_time(b"-1.25"),
            Some(Time {
                sec: -2,
                nsec: 750_000_000
            })
        );
        assert_eq!(
            parse_pax_time(b"1.1234567899"),
            Some(Time {
                sec: 1,
                nsec: 123_456_789
            })
        );
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
