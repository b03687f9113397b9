//! Reading an eStargz blob by random access: footer, TOC, and chunks.

use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};
use snapshot_core::identity::{Digest, digest_from_hasher, sha256_digest};

use super::TOC_NAME;
use super::footer::{FOOTER_SIZE, parse_footer};
use super::index::Chunk;
use super::toc::Toc;
use crate::{Error, Result};

/// Largest compressed TOC accepted (hostile layers cannot make us allocate more).
pub const MAX_TOC_COMPRESSED: u64 = 256 << 20;
/// Largest uncompressed TOC JSON accepted.
pub const MAX_TOC_JSON: u64 = 1 << 30;

/// Random access to a blob: a local file, a registry blob, a cache.
pub trait ReadAt: Send + Sync {
    /// The blob's size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (exactly, or an error).
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        FileExt::read_exact_at(self, buf, offset)
            .map_err(|e| Error::io(format!("read blob at {offset}"), e))
    }
}

/// A TOC as read from a blob.
#[derive(Debug, Clone)]
pub struct OpenedToc {
    /// The parsed TOC.
    pub toc: Toc,
    /// Digest of the TOC JSON (what the `containerd.io/snapshot/stargz/toc.digest`
    /// annotation names).
    pub toc_digest: Digest,
    /// Offset in the blob of the gzip member holding the TOC (where payloads end).
    pub toc_offset: u64,
}

/// Reads footer and TOC of an eStargz blob. A blob that is not eStargz fails with
/// [`Error::InvalidArchive`] saying so; the TOC digest is returned, not checked (see
/// [`verify_toc_digest`]).
pub fn read_toc(blob: &dyn ReadAt) -> Result<OpenedToc> {
    let size = blob.size();
    let tail_len = size.min(FOOTER_SIZE);
    let mut tail = vec![0u8; tail_len as usize];
    blob.read_exact_at(size - tail_len, &mut tail)?;
    let (toc_offset, footer_size) = parse_footer(&tail)?;
    let toc_end = size - footer_size;
    if toc_offset >= toc_end {
        return Err(Error::InvalidArchive(format!(
            "eStargz footer points past the blob: TOC offset {toc_offset}, blob size {size}"
        )));
    }
    if toc_end - toc_offset > MAX_TOC_COMPRESSED {
        return Err(Error::InvalidArchive(format!(
            "eStargz TOC too large: {} bytes compressed",
            toc_end - toc_offset
        )));
    }
    let mut member = vec![0u8; (toc_end - toc_offset) as usize];
    blob.read_exact_at(toc_offset, &mut member)?;
    let json = toc_json(&member)?;
    let toc_digest = sha256_digest(&json);
    let toc: Toc = serde_json::from_slice(&json)
        .map_err(|e| Error::InvalidArchive(format!("eStargz TOC is not valid JSON: {e}")))?;
    Ok(OpenedToc {
        toc,
        toc_digest,
        toc_offset,
    })
}

/// Fails unless `actual` is the TOC digest the image's manifest promised.
pub fn verify_toc_digest(expected: &str, actual: &Digest) -> Result<()> {
    if expected != actual.to_string() {
        return Err(Error::DigestMismatch {
            what: "eStargz TOC (invalid stargz layer)".into(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// The JSON of the `stargz.index.json` tar entry inside the TOC's gzip member.
fn toc_json(member: &[u8]) -> Result<Vec<u8>> {
    let bad = |what: String| Error::InvalidArchive(format!("eStargz TOC: {what}"));
    let decoder = flate2::read::GzDecoder::new(member).take(MAX_TOC_JSON + 64 * 1024);
    let mut archive = tar::Archive::new(decoder);
    let mut entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar stream: {e}")))?;
    let mut entry = match entries.next() {
        Some(Ok(entry)) => entry,
        Some(Err(e)) => return Err(bad(format!("not a tar stream: {e}"))),
        None => return Err(bad("empty".into())),
    };
    let path = entry
        .path()
        .map_err(|e| bad(format!("bad entry name: {e}")))?
        .to_string_lossy()
        .into_owned();
    if path.trim_start_matches("./") != TOC_NAME {
        return Err(bad(format!("first entry is {path:?}, not {TOC_NAME}")));
    }
    let len = entry.size();
    if len > MAX_TOC_JSON {
        return Err(bad(format!("{len} bytes of JSON is too large")));
    }
    let mut json = Vec::with_capacity(len as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("cannot decompress: {e}")))?;
    Ok(json)
}

/// The bytes of `chunk` from its gzip member (the blob bytes
/// `[chunk.blob_offset, chunk.blob_offset + chunk.blob_len)`), verified against its digest when
/// it has one. A digest mismatch is an error: wrong bytes are never returned.
pub fn decompress_chunk(member: &[u8], chunk: &Chunk) -> Result<Vec<u8>> {
    let mut decoder = flate2::read::GzDecoder::new(member);
    let corrupt = |e: io::Error| {
        Error::InvalidArchive(format!(
            "eStargz chunk at blob offset {}: {e}",
            chunk.blob_offset
        ))
    };
    io::copy(
        &mut (&mut decoder).take(chunk.inner_offset),
        &mut io::sink(),
    )
    .map_err(corrupt)?;
    let mut data = vec![0u8; chunk.size as usize];
    decoder.read_exact(&mut data).map_err(corrupt)?;
    verify_chunk(&data, chunk)?;
    Ok(data)
}

/// Checks a chunk's uncompressed bytes against its digest (no digest: nothing to check).
pub fn verify_chunk(data: &[u8], chunk: &Chunk) -> Result<()> {
    let Some(expected) = &chunk.digest else {
        return Ok(());
    };
    let actual = digest_from_hasher(Sha256::new_with_prefix(data));
    if &actual != expected {
        return Err(Error::DigestMismatch {
            what: format!("eStargz chunk at blob offset {}", chunk.blob_offset),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}
