//! Layer media types and decompression by magic bytes (containerd's `DiffCompression` and
//! `compression.DecompressStream`).

use std::io::{self, BufReader, Cursor, Read};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, channel, sync_channel};

use super::stream::read_error;
use crate::{Error, Result};

const DOCKER_TYPES: [&str; 5] = [
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];
const OCI_TYPES: [&str; 2] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
];
/// Input buffer of the decompressors.
const INPUT_BUFFER: usize = 256 * 1024;
/// Decompressed bytes handed over from the decompressing thread at a time.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the decompressing thread and the applying one.
const CHUNKS_IN_FLIGHT: usize = 8;

/// Accepts the layer media types this applier can read: the Docker layer types without
/// suffixes and the OCI ones with no suffix, `+gzip` or `+zstd`.
pub(crate) fn check_media_type(media_type: &str) -> Result<()> {
    let mut parts = media_type.split('+');
    let base = parts.next().unwrap_or_default();
    let mut suffixes = parts;
    let known = if DOCKER_TYPES.contains(&base) {
        suffixes.next().is_none()
    } else {
        OCI_TYPES.contains(&base) && suffixes.all(|s| s == "gzip" || s == "zstd")
    };
    if known {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "layer media type {media_type:?}"
        )))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Gzip,
    Zstd,
    None,
}

fn detect(magic: &[u8]) -> Compression {
    if magic.starts_with(&[0x1f, 0x8b, 0x08]) {
        return Compression::Gzip;
    }
    if let Ok(m) = <[u8; 4]>::try_from(magic) {
        let m = u32::from_le_bytes(m);
        if m == 0xFD2F_B528 || m & 0xFFFF_FFF0 == 0x184D_2A50 {
            return Compression::Zstd;
        }
    }
    Compression::None
}

/// The decompressed stream of `blob`, by its magic bytes.
pub(crate) fn decompress<'a>(mut blob: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match blob.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(e)),
        }
    }
    let compression = detect(&magic[..n]);
    tracing::debug!(?compression, "layer stream");
    let input = Cursor::new(magic).take(n as u64).chain(blob);
    Ok(match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(
            BufReader::with_capacity(INPUT_BUFFER, input),
        )),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(INPUT_BUFFER, input))
                .map_err(|e| Error::io("start zstd decoder", e))?,
        ),
        Compression::None => Box::new(input),
    })
}

/// Runs `apply` on the decompressed stream of `blob` (as [`decompress`]) while another thread
/// reads and decompresses it: reading the blob (and verifying its digest), decompressing, and
/// hashing and writing the entries overlap. At most [`CHUNKS_IN_FLIGHT`] chunks of [`CHUNK`]
/// bytes wait between the two. When `apply` returns early the decompressing thread stops at its
/// next chunk. Errors of the blob or the decoder reach `apply` as `io::Error`s (a
/// [`crate::Error`] inside one comes back out through [`read_error`]); a panic of the
/// decompressing thread is an error.
pub(crate) fn with_decompressed<R: Read + Send, T>(
    blob: R,
    apply: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<T> {
    let (chunks, received) = sync_channel::<io::Result<Vec<u8>>>(CHUNKS_IN_FLIGHT);
    let (recycle, recycled) = channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let producer = scope.spawn(move || produce(blob, &chunks, &recycled));
        let mut reader = ChunkReader {
            chunks: received,
            recycle,
            current: Vec::new(),
            pos: 0,
            failed: false,
        };
        let result = apply(&mut reader);
        // Unblocks the producer if `apply` stopped reading early.
        drop(reader);
        match producer.join() {
            Ok(()) => result,
            Err(_) => Err(invalid_archive("the decompressing thread panicked")),
        }
    })
}

fn invalid_archive(msg: &str) -> Error {
    Error::InvalidArchive(msg.into())
}

/// The decompressing thread: sends the decompressed stream in chunks until its end (then drops
/// the sender) or an error (sent), or until the receiver is gone.
fn produce<R: Read>(
    blob: R,
    chunks: &SyncSender<io::Result<Vec<u8>>>,
    recycled: &Receiver<Vec<u8>>,
) {
    let mut input = match decompress(blob) {
        Ok(input) => input,
        Err(e) => {
            let _ = chunks.send(Err(io::Error::other(e)));
            return;
        }
    };
    loop {
        let mut buf = match recycled.try_recv() {
            Ok(b) => b,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => Vec::with_capacity(CHUNK),
        };
        buf.resize(CHUNK, 0);
        let mut filled = 0;
        while filled < CHUNK {
            match input.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    buf.truncate(filled);
                    if filled > 0 && chunks.send(Ok(buf)).is_err() {
                        return;
                    }
                    let _ = chunks.send(Err(e));
                    return;
                }
            }
        }
        if filled == 0 {
            return;
        }
        buf.truncate(filled);
        if chunks.send(Ok(buf)).is_err() {
            return;
        }
    }
}

/// The applying side: reads the chunks in order; the end of the stream is the producer's end.
struct ChunkReader {
    chunks: Receiver<io::Result<Vec<u8>>>,
    recycle: Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    failed: bool,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::other("the layer stream failed earlier"));
        }
        while self.pos == self.current.len() {
            match self.chunks.recv() {
                Ok(Ok(next)) => {
                    let done = std::mem::replace(&mut self.current, next);
                    self.pos = 0;
                    if done.capacity() > 0 {
                        let _ = self.recycle.send(done);
                    }
                }
                Ok(Err(e)) => {
                    self.failed = true;
                    return Err(e);
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        for ok in [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.diff.tar",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.diff.tar.zstd",
        ] {
            assert!(check_media_type(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "application/octet-stream",
            "application/vnd.oci.image.layer.v1.tar+encrypted",
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "application/vnd.docker.image.rootfs.diff.tar.gzip+zstd",
            "application/vnd.oci.image.config.v1+json",
        ] {
            assert!(
                matches!(check_media_type(bad), Err(Error::Unsupported(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn threaded_decompression_hands_over_the_whole_stream_in_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &data).unwrap_or_default();
        let blob = gz.finish().unwrap_or_default();
        let out = with_decompressed(&blob[..], |r| {
            let mut out = Vec::new();
            r.read_to_end(&mut out).map_err(|e| Error::io("read", e))?;
            Ok(out)
        });
        assert!(out.is_ok_and(|o| o == data));
    }

    #[test]
    fn an_early_return_stops_the_decompressing_thread() {
        // An endless plain stream: returning must not wait for its end.
        let out = with_decompressed(io::repeat(0), |r| {
            let mut buf = [1u8; 10];
            r.read_exact(&mut buf).map_err(|e| Error::io("read", e))?;
            Ok(buf)
        });
        assert!(out.is_ok_and(|b| b == [0; 10]));
    }

    #[test]
    fn errors_of_the_blob_reach_the_applying_side_after_the_data_before_them() {
        struct Failing(u64);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other(Error::InvalidArgument("boom".into())));
                }
                let n = buf.len().min(self.0 as usize);
                buf[..n].fill(b'a');
                self.0 -= n as u64;
                Ok(n)
            }
        }
        let out = with_decompressed(Failing(1_000_000), |r| {
            let mut got = Vec::new();
            let e = r.read_to_end(&mut got).map_err(read_error);
            Ok((got.len(), e))
        });
        match out {
            Ok((n, Err(Error::InvalidArgument(msg)))) => {
                assert_eq!((n, msg.as_str()), (1_000_000, "boom"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn magic() {
        assert_eq!(detect(&[0x1f, 0x8b, 0x08, 0]), Compression::Gzip);
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(detect(&[0x5a, 0x2a, 0x4d, 0x18]), Compression::Zstd);
        assert_eq!(detect(&[0x50, 0x2a, 0x4d, 0x18]), Compression::Zstd);
        assert_eq!(detect(&[0x1f, 0x8b]), Compression::None);
        assert_eq!(detect(b"abcd"), Compression::None);
        assert_eq!(detect(b""), Compression::None);
    }
}
