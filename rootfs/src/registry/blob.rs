//! Random access to a registry blob by HTTP `Range` requests (or a spooled copy).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use oci_spec::image::{Digest, DigestAlgorithm};
use sha2::{Digest as _, Sha256};
use snapshot_core::identity::digest_from_hasher;
use tracing::{debug, warn};

use super::{Failure, Method, Reference, Registry, blob_req, header, transient_io};
use crate::{Error, Result};

/// Ranges closer than this are fetched by one request ([`Blob::read_ranges`]).
pub const MERGE_GAP: u64 = 64 << 10;
/// A merged request is not grown beyond this many bytes.
pub const MAX_MERGED: u64 = 16 << 20;

/// A blob opened for random access ([`Registry::blob`]). Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Blob {
    inner: Arc<BlobInner>,
}

struct BlobInner {
    registry: Registry,
    reference: Reference,
    digest: Digest,
    size: u64,
    /// The whole blob, when the registry ignores `Range`.
    spool: Option<File>,
    /// The blob's last bytes, read by the opening probe: (their offset, the bytes).
    tail: Option<(u64, Vec<u8>)>,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("reference", &self.inner.reference.to_string())
            .field("digest", &self.inner.digest.to_string())
            .field("size", &self.inner.size)
            .field("spooled", &self.inner.spool.is_some())
            .finish()
    }
}

/// What the opening probe found out.
enum Probe {
    /// `206`: the registry serves ranges; the blob's size, and its tail when one was asked for.
    Ranged(u64, Option<(u64, Vec<u8>)>),
    /// `416` to a suffix range: ask again with a one-byte range.
    NoSuffix,
    /// `200`: the whole blob, spooled; its size.
    Spooled(File, u64),
}

impl Blob {
    /// Opens a blob with a probe request: `bytes=0-0`, or with `tail > 0` a suffix range
    /// `bytes=-<tail>` whose bytes are kept and serve later reads of the blob's end (where an
    /// eStargz layer keeps its footer and TOC) without another request.
    pub(super) fn open(
        registry: Registry,
        r: &Reference,
        digest: &Digest,
        size: Option<u64>,
        tail: u64,
    ) -> Result<Blob> {
        let range = if tail > 0 {
            format!("bytes=-{tail}")
        } else {
            "bytes=0-0".to_string()
        };
        let mut req = blob_req(r, digest, Method::Get, vec![("Range", range.clone())]);
        req.allow_416 = true;
        let spool_dir = registry
            .options()
            .spool_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let probe = registry.execute(r, &req, &mut |resp, _permit| {
            let status = resp.status().as_u16();
            match status {
                206 | 416 => {
                    let content_range = header(&resp, "content-range").unwrap_or_default();
                    let total = parse_total(&content_range).ok_or_else(|| {
                        Failure::Fatal(Error::io(
                            req.what.clone(),
                            io::Error::other(format!(
                                "HTTP {status} with Content-Range {content_range:?}"
                            )),
                        ))
                    })?;
                    if status == 416 && total != 0 {
                        if tail > 0 {
                            // A server without suffix ranges: probe the plain way below.
                            return Ok(Probe::NoSuffix);
                        }
                        return Err(Failure::Fatal(Error::io(
                            req.what.clone(),
                            io::Error::other(format!("{range:?} not satisfiable ({content_range})")),
                        )));
                    }
                    let mut body = Vec::new();
                    registry
                        .body_reader(resp)
                        .take(tail.max(1))
                        .read_to_end(&mut body)
                        .map_err(|e| transient_io(&req.what, e))?;
                    let kept = match parse_span(&content_range) {
                        Some((start, end))
                            if tail > 0 && status == 206 && end + 1 == total
                                && end + 1 - start == body.len() as u64 =>
                        {
                            Some((start, body))
                        }
                        _ => None,
                    };
                    Ok(Probe::Ranged(total, kept))
                }
                _ => {
                    warn!(what = %req.what, status, "the registry ignores Range: spooling the whole blob once");
                    let file = tempfile::tempfile_in(&spool_dir).map_err(|e| {
                        Failure::Fatal(Error::io(
                            format!("create a spool file in {}", spool_dir.display()),
                            e,
                        ))
                    })?;
                    let mut hashing = HashingWriter {
                        file: io::BufWriter::with_capacity(256 << 10, file),
                        hasher: Sha256::new(),
                        written: 0,
                    };
                    io::copy(&mut registry.body_reader(resp), &mut hashing)
                        .map_err(|e| transient_io(&req.what, e))?;
                    let HashingWriter {
                        file,
                        hasher,
                        written,
                    } = hashing;
                    let file = file.into_inner().map_err(|e| {
                        Failure::Fatal(Error::io(
                            format!("write a spool file for {}", req.what),
                            e.into_error(),
                        ))
                    })?;
                    if *digest.algorithm() == DigestAlgorithm::Sha256 {
                        let actual = digest_from_hasher(hasher);
                        if actual != *digest {
                            return Err(Failure::Fatal(Error::DigestMismatch {
                                what: req.what.clone(),
                                expected: digest.to_string(),
                                actual: actual.to_string(),
                            }));
                        }
                    }
                    Ok(Probe::Spooled(file, written))
                }
            }
        })?;
        let (total, spool, tail) = match probe {
            Probe::NoSuffix => return Blob::open(registry, r, digest, size, 0),
            Probe::Ranged(t, tail) => (t, None, tail),
            Probe::Spooled(f, t) => (t, Some(f), None),
        };
        if let Some(expected) = size
            && expected != total
        {
            return Err(Error::DigestMismatch {
                what: format!("size of {}", req.what),
                expected: expected.to_string(),
                actual: total.to_string(),
            });
        }
        debug!(what = %req.what, size = total, spooled = spool.is_some(), "opened blob");
        Ok(Blob {
            inner: Arc::new(BlobInner {
                registry,
                reference: r.clone(),
                digest: digest.clone(),
                size: total,
                spool,
                tail,
            }),
        })
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.inner.digest
    }

    /// Whether the registry ignored `Range` and the blob is served from a local spooled copy.
    pub fn is_spooled(&self) -> bool {
        self.inner.spool.is_some()
    }

    /// Fills `buf` with the bytes at `offset`: exactly `buf.len()` of them or an error
    /// ([`Error::InvalidArgument`] past the end, [`Error::Unavailable`] when the registry cannot
    /// be reached after retries).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_bounds(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(file) = &self.inner.spool {
            return file
                .read_exact_at(buf, offset)
                .map_err(|e| Error::io(format!("read the spooled blob {}", self.inner.digest), e));
        }
        if let Some((start, bytes)) = &self.inner.tail
            && offset >= *start
        {
            let from = (offset - start) as usize;
            buf.copy_from_slice(&bytes[from..from + buf.len()]);
            return Ok(());
        }
        let end = offset + buf.len() as u64 - 1;
        let r = &self.inner.reference;
        let registry = &self.inner.registry;
        let req = blob_req(
            r,
            &self.inner.digest,
            Method::Get,
            vec![("Range", format!("bytes={offset}-{end}"))],
        );
        registry.execute(r, &req, &mut |resp, _permit| {
            let status = resp.status().as_u16();
            let content_range = header(&resp, "content-range").unwrap_or_default();
            let mut body = registry.body_reader(resp);
            if status == 206 {
                if parse_span(&content_range) != Some((offset, end)) {
                    return Err(Failure::Fatal(Error::io(
                        req.what.clone(),
                        io::Error::other(format!(
                            "asked for bytes {offset}-{end}, got Content-Range {content_range:?}"
                        )),
                    )));
                }
            } else {
                warn!(what = %req.what, status, offset, "range ignored on a read: skipping to the offset");
                io::copy(&mut (&mut body).take(offset), &mut io::sink())
                    .map_err(|e| transient_io(&req.what, e))?;
            }
            body.read_exact(buf)
                .map_err(|e| transient_io(&req.what, e))?;
            Ok(())
        })
        .map_err(|e| {
            debug!(what = %req.what, offset, len = buf.len(), error = %e, "range read failed");
            e
        })
    }

    /// Reads several ranges (offset, length): ranges less than [`MERGE_GAP`] apart are fetched
    /// by one request (up to [`MAX_MERGED`] bytes each), separate requests run in parallel
    /// (within the client's in-flight bound). The result has one buffer per range, in order.
    pub fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        for &(off, len) in ranges {
            self.check_bounds(off, len)?;
        }
        let groups = merge_ranges(ranges);
        let mut fetched: Vec<Result<Vec<u8>>> = Vec::with_capacity(groups.len());
        let workers = self
            .inner
            .registry
            .options()
            .max_in_flight
            .clamp(1, groups.len().max(1));
        if groups.len() <= 1 || workers == 1 || self.is_spooled() {
            for g in &groups {
                fetched.push(self.fetch_group(g));
            }
        } else {
            let slots: Vec<std::sync::Mutex<Option<Result<Vec<u8>>>>> =
                groups.iter().map(|_| std::sync::Mutex::new(None)).collect();
            let next = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..workers {
                    s.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(g) = groups.get(i) else { break };
                            let r = self.fetch_group(g);
                            *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                        }
                    });
                }
            });
            for slot in slots {
                let r = slot
                    .into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or_else(|| Err(Error::InvalidArgument("range group not read".into())));
                fetched.push(r);
            }
        }
        let mut out = vec![Vec::new(); ranges.len()];
        for (g, data) in groups.iter().zip(fetched) {
            let data = data?;
            for &i in &g.members {
                let (off, len) = ranges[i];
                let start = (off - g.start) as usize;
                out[i] = data[start..start + len as usize].to_vec();
            }
        }
        Ok(out)
    }

    /// A cheap reachability check: a `HEAD` of the blob (nothing at all for a spooled blob).
    /// Fails with [`Error::Unavailable`] when the registry cannot be reached.
    pub fn check(&self) -> Result<()> {
        if self.is_spooled() {
            return Ok(());
        }
        let r = &self.inner.reference;
        let req = blob_req(r, &self.inner.digest, Method::Head, vec![]);
        self.inner
            .registry
            .execute(r, &req, &mut |_resp, _permit| Ok(()))
    }

    fn fetch_group(&self, g: &Group) -> Result<Vec<u8>> {
        let len = usize::try_from(g.end - g.start)
            .map_err(|_| Error::InvalidArgument("range too large".into()))?;
        let mut buf = vec![0; len];
        self.read_at(g.start, &mut buf)?;
        Ok(buf)
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "read of {len} bytes at {offset} past the end of blob {} ({} bytes)",
                self.inner.digest, self.inner.size
            ))),
        }
    }
}

/// Ranges fetched by one request: `[start, end)` and the indexes of the ranges in it.
#[derive(Debug, PartialEq, Eq)]
struct Group {
    start: u64,
    end: u64,
    members: Vec<usize>,
}

fn merge_ranges(ranges: &[(u64, u64)]) -> Vec<Group> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i]);
    let mut groups: Vec<Group> = Vec::new();
    for i in order {
        let (off, len) = ranges[i];
        let end = off + len;
        if let Some(g) = groups.last_mut()
            && off <= g.end.saturating_add(MERGE_GAP)
            && end.max(g.end) - g.start <= MAX_MERGED.max(g.end - g.start)
        {
            g.end = g.end.max(end);
            g.members.push(i);
            continue;
        }
        groups.push(Group {
            start: off,
            end,
            members: vec![i],
        });
    }
    groups
}

/// `bytes 10-20/1234` → (10, 20).
fn parse_span(content_range: &str) -> Option<(u64, u64)> {
    let rest = content_range.trim().strip_prefix("bytes ")?;
    let (span, _) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// `bytes 0-0/1234` or `bytes */1234` → 1234.
fn parse_total(content_range: &str) -> Option<u64> {
    let (_, total) = content_range.trim().rsplit_once('/')?;
    total.trim().parse().ok()
}

struct HashingWriter<W: Write> {
    file: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_near_ranges_and_keeps_far_ones_apart() {
        let ranges = [(100, 10), (0, 10), (20, 5), (1 << 20, 4), (105, 20)];
        let groups = merge_ranges(&ranges);
        assert_eq!(
            groups,
            vec![
                Group {
                    start: 0,
                    end: 125,
                    members: vec![1, 2, 0, 4]
                },
                Group {
                    start: 1 << 20,
                    end: (1 << 20) + 4,
                    members: vec![3]
                },
            ]
        );
        assert!(merge_ranges(&[]).is_empty());
    }

    #[test]
    fn merged_groups_stay_bounded() {
        let ranges: Vec<(u64, u64)> = (0..40).map(|i| (i * (1 << 20), 1 << 20)).collect();
        let groups = merge_ranges(&ranges);
        assert!(groups.len() >= 2);
        assert!(groups.iter().all(|g| g.end - g.start <= MAX_MERGED));
    }

    #[test]
    fn parses_content_range_totals() {
        assert_eq!(parse_total("bytes 0-0/1234"), Some(1234));
        assert_eq!(parse_total("bytes */0"), Some(0));
        assert_eq!(parse_total("bytes 0-0/*"), None);
        assert_eq!(parse_total(""), None);
        assert_eq!(parse_span("bytes 10-20/1234"), Some((10, 20)));
        assert_eq!(parse_span("bytes */1234"), None);
    }
}
