//! The on-disk cache: verified chunks (`<cache_dir>/chunks/<key>`) and the TOCs of layers
//! (`<cache_dir>/toc/<layer hex>`).
//!
//! Chunks are content-addressed by their digest (the hex of `chunkDigest`), so the mounts of one
//! layer (and layers sharing files) share them, and they survive restarts. A chunk is verified
//! against its digest the first time this process reads it from disk; a file that does not match
//! is deleted and counts as a miss. The cache is bounded: beyond `max_bytes` the least recently
//! used chunks are evicted (recency survives a restart through the files' modification times).
//! Files are written atomically (temporary file, then rename).
//!
//! A TOC is kept as the raw tail of its blob (from the TOC's gzip member to the end, footer
//! included) behind a one-line header with the blob's size, so reopening it goes through the
//! same reader and TOC-digest check as a fresh fetch, without the network.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use rootfs::estargz::{Chunk, ReadAt};
use snapshot_core::identity::Digest;

/// Header line of a cached TOC file.
const TOC_MAGIC: &str = "strata-http-toc v1";

/// The cache key of `chunk` of layer `layer`: its digest's hex, or (without a digest) a name
/// scoped to the layer and the chunk's position.
pub fn chunk_key(layer: &Digest, chunk: &Chunk) -> String {
    match &chunk.digest {
        Some(d) => d.digest().to_string(),
        None => format!(
            "{}-{}-{}-{}",
            layer.digest(),
            chunk.blob_offset,
            chunk.inner_offset,
            chunk.size
        ),
    }
}

#[derive(Debug)]
struct Entry {
    size: u64,
    last_used: u64,
    /// Checked against its digest by this process (or written by it).
    verified: bool,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    total: u64,
    tick: u64,
}

/// The chunk and TOC cache of one plugin instance.
#[derive(Debug)]
pub struct ChunkCache {
    chunks: PathBuf,
    tocs: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Temporary file names.
    seq: AtomicU64,
}

impl ChunkCache {
    /// Opens (creating) the cache in `dir`, indexing the chunks already there.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<ChunkCache> {
        let chunks = dir.join("chunks");
        let tocs = dir.join("toc");
        fs::create_dir_all(&chunks)?;
        fs::create_dir_all(&tocs)?;
        let mut found = Vec::new();
        for entry in fs::read_dir(&chunks)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if name.ends_with(".tmp") || !meta.is_file() {
                // Left by a crash in the middle of a write.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((mtime, name, meta.len()));
        }
        found.sort();
        let mut state = State::default();
        for (_, name, size) in found {
            state.tick += 1;
            state.total += size;
            state.entries.insert(
                name,
                Entry {
                    size,
                    last_used: state.tick,
                    verified: false,
                },
            );
        }
        let cache = ChunkCache {
            chunks,
            tocs,
            max_bytes,
            state: Mutex::new(state),
            seq: AtomicU64::new(0),
        };
        cache.evict(None);
        Ok(cache)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether chunk `key` is in the cache (not verified).
    pub fn contains(&self, key: &str) -> bool {
        self.state().entries.contains_key(key)
    }

    /// Bytes of chunks held.
    pub fn total_bytes(&self) -> u64 {
        self.state().total
    }

    fn forget(&self, key: &str) {
        let mut state = self.state();
        if let Some(e) = state.entries.remove(key) {
            state.total -= e.size;
        }
        let _ = fs::remove_file(self.chunks.join(key));
    }

    /// `len` bytes at `offset` of the cached chunk `key` (of `chunk`'s size and digest), or
    /// `None` when it is not cached or its file is damaged (then it is dropped).
    pub fn read(&self, key: &str, chunk: &Chunk, offset: u64, len: usize) -> Option<Vec<u8>> {
        let verified = {
            let mut state = self.state();
            state.tick += 1;
            let tick = state.tick;
            let e = state.entries.get_mut(key)?;
            e.last_used = tick;
            e.verified
        };
        let path = self.chunks.join(key);
        if verified {
            let file = fs::File::open(&path).ok()?;
            let mut buf = vec![0u8; len];
            match FileExt::read_exact_at(&file, &mut buf, offset) {
                Ok(()) => return Some(buf),
                Err(e) => {
                    tracing::warn!(key, error = %e, "cached chunk unreadable; dropping it");
                    self.forget(key);
                    return None;
                }
            }
        }
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(key, error = %e, "cached chunk unreadable; dropping it");
                }
                self.forget(key);
                return None;
            }
        };
        if data.len() as u64 != chunk.size || !matches_digest(&data, chunk) {
            tracing::warn!(key, "cached chunk does not match its digest; dropping it");
            self.forget(key);
            return None;
        }
        if let Some(e) = self.state().entries.get_mut(key) {
            e.verified = true;
        }
        let start = usize::try_from(offset).ok()?;
        data.get(start..start.checked_add(len)?).map(<[u8]>::to_vec)
    }

    /// Stores the verified bytes of chunk `key`, then evicts beyond the bound.
    pub fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        if self.contains(key) {
            return Ok(());
        }
        let path = self.chunks.join(key);
        write_atomically(&path, &self.temp_name(&path), &[data])?;
        {
            let mut state = self.state();
            state.tick += 1;
            let tick = state.tick;
            let size = data.len() as u64;
            if let Some(old) = state.entries.insert(
                key.to_string(),
                Entry {
                    size,
                    last_used: tick,
                    verified: true,
                },
            ) {
                state.total -= old.size;
            }
            state.total += size;
        }
        self.evict(Some(key));
        Ok(())
    }

    /// Evicts least recently used chunks until the total fits (never `keep`).
    fn evict(&self, keep: Option<&str>) {
        let mut victims = Vec::new();
        {
            let mut state = self.state();
            if state.total <= self.max_bytes {
                return;
            }
            let mut order: Vec<(u64, String, u64)> = state
                .entries
                .iter()
                .filter(|(k, _)| Some(k.as_str()) != keep)
                .map(|(k, e)| (e.last_used, k.clone(), e.size))
                .collect();
            order.sort();
            for (_, key, size) in order {
                if state.total <= self.max_bytes {
                    break;
                }
                state.entries.remove(&key);
                state.total -= size;
                victims.push(key);
            }
        }
        for key in victims {
            tracing::debug!(key, "evicting cached chunk");
            let _ = fs::remove_file(self.chunks.join(key));
        }
    }

    fn temp_name(&self, path: &Path) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{}.{n}.tmp", std::process::id()));
        PathBuf::from(name)
    }

    fn toc_path(&self, layer: &Digest) -> PathBuf {
        self.tocs.join(layer.digest())
    }

    /// The cached tail of layer `layer`'s blob (TOC member and footer), if any.
    pub fn load_toc(&self, layer: &Digest) -> Option<BlobTail> {
        let path = self.toc_path(layer);
        let data = fs::read(&path).ok()?;
        let parsed = BlobTail::parse(&data);
        if parsed.is_none() {
            tracing::warn!(path = %path.display(), "cached TOC is malformed; dropping it");
            let _ = fs::remove_file(&path);
        }
        parsed
    }

    /// Drops the cached TOC of `layer` (it did not verify).
    pub fn drop_toc(&self, layer: &Digest) {
        let _ = fs::remove_file(self.toc_path(layer));
    }

    /// Caches the tail of layer `layer`'s blob.
    pub fn store_toc(&self, layer: &Digest, tail: &BlobTail) -> io::Result<()> {
        let path = self.toc_path(layer);
        let header = format!("{TOC_MAGIC} {}\n", tail.blob_size);
        write_atomically(
            &path,
            &self.temp_name(&path),
            &[header.as_bytes(), &tail.bytes],
        )
    }
}

fn matches_digest(data: &[u8], chunk: &Chunk) -> bool {
    rootfs::estargz::verify_chunk(data, chunk).is_ok()
}

fn write_atomically(path: &Path, tmp: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let result = (|| {
        let mut f = fs::File::create(tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        // No fsync: a file torn by a crash fails its digest check when read and is fetched
        // again; the cache is never the only copy.
        fs::rename(tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// The end of a blob: the bytes from `offset` to the end, standing in for the whole blob when
/// reading the TOC (reads before `offset` fail).
#[derive(Debug, Clone)]
pub struct BlobTail {
    /// Size of the whole blob.
    pub blob_size: u64,
    /// The last bytes of the blob.
    pub bytes: Vec<u8>,
}

impl BlobTail {
    /// Offset in the blob of the first byte held.
    pub fn offset(&self) -> u64 {
        self.blob_size - self.bytes.len() as u64
    }

    fn parse(data: &[u8]) -> Option<BlobTail> {
        let nl = data.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&data[..nl]).ok()?;
        let size: u64 = header.strip_prefix(TOC_MAGIC)?.trim().parse().ok()?;
        let bytes = data[nl + 1..].to_vec();
        (bytes.len() as u64 <= size).then_some(BlobTail {
            blob_size: size,
            bytes,
        })
    }
}

impl ReadAt for BlobTail {
    fn size(&self) -> u64 {
        self.blob_size
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> rootfs::Result<()> {
        let start = offset.checked_sub(self.offset());
        let src = start
            .and_then(|s| usize::try_from(s).ok())
            .and_then(|s| self.bytes.get(s..s.checked_add(buf.len())?));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(rootfs::Error::InvalidArchive(format!(
                "cached TOC: bytes {offset}+{} are not in the cached tail",
                buf.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest as _, Sha256};

    fn chunk_of(data: &[u8]) -> Chunk {
        let hex: String = Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Chunk {
            file_offset: 0,
            size: data.len() as u64,
            blob_offset: 0,
            blob_len: 0,
            inner_offset: 0,
            digest: Some(format!("sha256:{hex}").parse().unwrap()),
        }
    }

    fn layer() -> Digest {
        format!("sha256:{}", "a".repeat(64)).parse().unwrap()
    }

    #[test]
    fn chunks_are_keyed_by_digest_or_by_layer_and_position() {
        let c = chunk_of(b"x");
        assert_eq!(chunk_key(&layer(), &c), c.digest.as_ref().unwrap().digest());
        let mut c = c;
        c.digest = None;
        c.blob_offset = 7;
        assert_eq!(chunk_key(&layer(), &c), format!("{}-7-0-1", "a".repeat(64)));
    }

    #[test]
    fn stored_chunks_read_back_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"hello chunk".to_vec();
        let c = chunk_of(&data);
        let key = chunk_key(&layer(), &c);
        {
            let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
            assert!(cache.read(&key, &c, 0, 5).is_none());
            cache.put(&key, &data).unwrap();
            assert_eq!(cache.read(&key, &c, 6, 5).unwrap(), b"chunk");
        }
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.contains(&key));
        assert_eq!(cache.total_bytes(), data.len() as u64);
        assert_eq!(cache.read(&key, &c, 0, 5).unwrap(), b"hello");
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("chunks"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary files: {leftovers:?}");
    }

    #[test]
    fn a_corrupt_cached_chunk_is_dropped_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"good bytes".to_vec();
        let c = chunk_of(&data);
        let key = chunk_key(&layer(), &c);
        ChunkCache::open(dir.path(), 1 << 20)
            .unwrap()
            .put(&key, &data)
            .unwrap();
        fs::write(dir.path().join("chunks").join(&key), b"evil bytes").unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.read(&key, &c, 0, 4).is_none());
        assert!(!cache.contains(&key));
        assert!(!dir.path().join("chunks").join(&key).exists());
        // A truncated one too.
        cache.put(&key, &data).unwrap();
        let cache2 = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        fs::write(dir.path().join("chunks").join(&key), b"good").unwrap();
        assert!(cache2.read(&key, &c, 0, 4).is_none());
    }

    #[test]
    fn the_bound_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 3000).unwrap();
        let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
        let chunks: Vec<Chunk> = blobs.iter().map(|b| chunk_of(b)).collect();
        let keys: Vec<String> = chunks.iter().map(|c| chunk_key(&layer(), c)).collect();
        for (k, b) in keys.iter().zip(&blobs) {
            cache.put(k, b).unwrap();
        }
        assert_eq!(cache.total_bytes(), 3000);
        // Use the first: the second is now the least recently used.
        assert!(cache.read(&keys[0], &chunks[0], 0, 1).is_some());
        let fourth = vec![9u8; 1000];
        let k4 = chunk_key(&layer(), &chunk_of(&fourth));
        cache.put(&k4, &fourth).unwrap();
        assert_eq!(cache.total_bytes(), 3000);
        assert!(cache.contains(&keys[0]));
        assert!(!cache.contains(&keys[1]));
        assert!(!dir.path().join("chunks").join(&keys[1]).exists());
        assert!(cache.contains(&keys[2]) && cache.contains(&k4));
        // Reopening with a smaller bound evicts down to it.
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 1500).unwrap();
        assert!(cache.total_bytes() <= 1500);
        assert_eq!(fs::read_dir(dir.path().join("chunks")).unwrap().count(), 1);
    }

    #[test]
    fn toc_tails_round_trip_and_serve_only_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.load_toc(&layer()).is_none());
        let tail = BlobTail {
            blob_size: 100,
            bytes: (90..100).collect(),
        };
        cache.store_toc(&layer(), &tail).unwrap();
        let back = cache.load_toc(&layer()).unwrap();
        assert_eq!((back.blob_size, back.offset()), (100, 90));
        let mut buf = [0u8; 3];
        back.read_exact_at(95, &mut buf).unwrap();
        assert_eq!(buf, [95, 96, 97]);
        assert!(back.read_exact_at(89, &mut buf).is_err());
        assert!(back.read_exact_at(98, &mut buf).is_err());
        fs::write(dir.path().join("toc").join("a".repeat(64)), b"garbage").unwrap();
        assert!(cache.load_toc(&layer()).is_none());
    }
}
