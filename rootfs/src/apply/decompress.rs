//! Layer media types and decompression by magic bytes (containerd's `DiffCompression` and
//! `compression.DecompressStream`).

use std::io::{self, BufReader, Cursor, Read};

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
