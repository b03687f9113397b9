//! Planning prefetch and background fetches.

use std::ops::Range;

use rootfs::estargz::Chunk;

/// A run of consecutive chunks fetched by one call (index range into the chunk list).
pub type Batch = Range<usize>;

/// Where the prefetch ends in the blob: the landmark's offset (`Some(0)`: nothing), else
/// `prefetch_bytes` capped at the blob's size.
pub fn prefetch_end(landmark: Option<u64>, prefetch_bytes: u64, blob_size: u64) -> u64 {
    match landmark {
        Some(end) => end.min(blob_size),
        None => prefetch_bytes.min(blob_size),
    }
}

/// Splits `chunks` (ordered by blob offset) into runs of about `max_bytes` compressed bytes
/// each (a chunk larger than that is a run of its own). Each run is fetched with ranged
/// requests that [`rootfs::registry::Blob::read_ranges`] merges where the chunks are adjacent.
pub fn batches(chunks: &[Chunk], max_bytes: u64) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        if i > start && bytes + c.blob_len > max_bytes {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += c.blob_len;
    }
    if start < chunks.len() {
        out.push(start..chunks.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(blob_offset: u64, blob_len: u64) -> Chunk {
        Chunk {
            file_offset: 0,
            size: blob_len,
            blob_offset,
            blob_len,
            inner_offset: 0,
            digest: None,
        }
    }

    #[test]
    fn prefetch_follows_the_landmarks_else_the_size() {
        assert_eq!(prefetch_end(Some(0), 100, 1000), 0, ".no.prefetch.landmark");
        assert_eq!(
            prefetch_end(Some(300), 100, 1000),
            300,
            ".prefetch.landmark"
        );
        assert_eq!(prefetch_end(None, 100, 1000), 100);
        assert_eq!(prefetch_end(None, 10_000, 1000), 1000);
        assert_eq!(prefetch_end(None, 0, 1000), 0);
    }

    #[test]
    fn batches_cover_every_chunk_once_within_the_bound() {
        let chunks: Vec<Chunk> = (0..10).map(|i| chunk(i * 100, 100)).collect();
        let b = batches(&chunks, 300);
        assert_eq!(b, [0..3, 3..6, 6..9, 9..10]);
        let big = vec![chunk(0, 50), chunk(50, 1000), chunk(1050, 50)];
        assert_eq!(batches(&big, 300), [0..1, 1..2, 2..3]);
        assert!(batches(&[], 300).is_empty());
        assert_eq!(batches(&chunks, u64::MAX).len(), 1);
        assert_eq!(batches(&chunks, u64::MAX)[0], 0..10);
    }
}
