//! The layer's byte pipeline: tar bytes are hashed (the diff ID) on the caller's thread and
//! handed in 1 MiB chunks to a compressor thread, which compresses them into a
//! [`BlobWriter`] (which hashes and writes the blob). Walking, reading files and building the tar
//! thus overlap with compression; buffers are recycled.

use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread::JoinHandle;

use flate2::write::GzEncoder;
use sha2::{Digest as _, Sha256};
use snapshot_core::identity::{Digest, digest_from_hasher};

use super::{Compression, GZIP_LEVEL, ZSTD_LEVEL};
use crate::content::{BlobWriter, error_from_io};
use crate::{Error, Result};

/// Bytes per chunk handed to the compressor.
const CHUNK: usize = 1 << 20;
/// Chunks in flight between the two threads.
const IN_FLIGHT: usize = 4;

/// Where the tar goes: a `Write` whose bytes end up compressed in a blob.
pub(crate) struct Pipeline {
    buf: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    free: Receiver<Vec<u8>>,
    /// The diff ID hasher; `None` when the blob is the tar itself (its digest is the diff ID).
    hasher: Option<Sha256>,
    thread: Option<JoinHandle<io::Result<BlobWriter>>>,
}

impl Pipeline {
    /// Starts the compressor thread writing into `blob`.
    pub(crate) fn new(blob: BlobWriter, compression: Compression) -> Result<Pipeline> {
        let (tx, rx) = sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (free_tx, free) = sync_channel::<Vec<u8>>(IN_FLIGHT + 2);
        let thread = std::thread::Builder::new()
            .name("strata-diff-compress".into())
            .spawn(move || compress(blob, compression, rx, free_tx))
            .map_err(|e| Error::io("start the layer compression thread", e))?;
        Ok(Pipeline {
            buf: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            free,
            hasher: (compression != Compression::None).then(Sha256::new),
            thread: Some(thread),
        })
    }

    /// Hands the current chunk to the compressor.
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = match self.free.try_recv() {
            Ok(mut b) => {
                b.clear();
                b
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => Vec::with_capacity(CHUNK),
        };
        let chunk = std::mem::replace(&mut self.buf, next);
        let sent = match &self.tx {
            Some(tx) => tx.send(chunk).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The compressor stopped: its error says why.
            Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("the layer compression thread stopped early")))
        }
    }

    /// Waits for the compressor thread and returns what it returned.
    fn join(&mut self) -> io::Result<BlobWriter> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the layer compression thread panicked"))),
            None => Err(io::Error::other("the layer compression thread is gone")),
        }
    }

    /// Flushes the last chunk, ends compression and returns the blob writer (not yet
    /// committed) and the diff ID (`None`: the blob's own digest).
    pub(crate) fn finish(mut self) -> Result<(BlobWriter, Option<Digest>)> {
        let fail = |e: io::Error| error_from_io(e, "compress the layer");
        self.send().map_err(fail)?;
        let blob = self.join().map_err(fail)?;
        Ok((blob, self.hasher.take().map(digest_from_hasher)))
    }
}

impl Write for Pipeline {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(h) = self.hasher.as_mut() {
            h.update(data);
        }
        let mut rest = data;
        while !rest.is_empty() {
            let room = CHUNK - self.buf.len();
            let n = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buf.len() == CHUNK {
                self.send()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks go out when full or at the end: flushing early would only shrink them.
        Ok(())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // On an error path: stop the compressor and wait, so that the unfinished blob is
        // removed before the error reaches the caller.
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

/// The compressor thread: chunks in, compressed blob out.
fn compress(
    blob: BlobWriter,
    compression: Compression,
    chunks: Receiver<Vec<u8>>,
    free: SyncSender<Vec<u8>>,
) -> io::Result<BlobWriter> {
    enum Encoder {
        Plain(BlobWriter),
        Gzip(GzEncoder<BlobWriter>),
        Zstd(zstd::Encoder<'static, BlobWriter>),
    }
    let mut enc = match compression {
        Compression::None => Encoder::Plain(blob),
        Compression::Gzip => {
            Encoder::Gzip(GzEncoder::new(blob, flate2::Compression::new(GZIP_LEVEL)))
        }
        Compression::Zstd => Encoder::Zstd(zstd::Encoder::new(blob, ZSTD_LEVEL)?),
    };
    for chunk in chunks {
        match &mut enc {
            Encoder::Plain(w) => w.write_all(&chunk)?,
            Encoder::Gzip(w) => w.write_all(&chunk)?,
            Encoder::Zstd(w) => w.write_all(&chunk)?,
        }
        // The producer may have enough buffers already: then this one is dropped.
        let _ = free.try_send(chunk);
    }
    match enc {
        Encoder::Plain(w) => Ok(w),
        Encoder::Gzip(w) => w.finish(),
        Encoder::Zstd(w) => w.finish(),
    }
}
