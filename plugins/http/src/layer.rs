//! One mounted layer: resolving it (TOC from the cache or the registry, verified), reading its
//! files chunk by chunk (cache first, then the registry, single-flight, verified), prefetch and
//! background fetch, and its status file.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use fs_plugin_api::{
    model::{Error, Result},
    status::{LayerStatus, remove_status, write_status},
};
use rootfs::{
    estargz::{Chunk, Index, IndexOptions, NodeId, OpenedToc, ReadAt, read_toc},
    registry::{Blob, Reference, Registry},
};

use snapshot_core::identity::Digest;

use crate::{
    cache::{BlobTail, ChunkCache, chunk_key},
    fetch::{self, Batch},
    labels::LayerSource,
};

/// Bytes of a layer's end fetched with the request that opens it: the footer and, for most
/// layers, the whole TOC come in one round trip.
const TOC_TAIL: u64 = 256 << 10;
/// How often the status file is rewritten while fetching.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Compressed bytes asked for by one prefetch or background request.
const BATCH_BYTES: u64 = 8 << 20;
/// Longest pause between background attempts while the registry fails.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// A rootfs error as a plugin error of the same kind, with context.
pub fn error(context: impl std::fmt::Display, e: rootfs::Error) -> Error {
    Error::from_kind(e.kind(), format!("{context}: {e}"))
}

/// What resolving a layer found.
pub struct Resolved {
    /// The file tree.
    pub index: Index,
    /// Digest of the TOC JSON (for [`verify_toc`]).
    pub toc_digest: Digest,
    /// The blob, if it was opened (not when the TOC came from the cache), and when the
    /// registry answered that open.
    pub blob: Option<(Blob, Instant)>,
    /// The blob's size.
    pub blob_size: u64,
}

/// A [`ReadAt`] over a registry blob that keeps what it read (the tail, to cache the TOC).
struct Recording<'a> {
    blob: &'a Blob,
    pieces: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl ReadAt for Recording<'_> {
    fn size(&self) -> u64 {
        self.blob.size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> rootfs::Result<()> {
        self.blob.read_at(offset, buf)?;
        self.pieces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((offset, buf.to_vec()));
        Ok(())
    }
}

impl Recording<'_> {
    /// The bytes from `from` to the end of the blob, if the reads covered all of them.
    fn tail(self, from: u64) -> Option<BlobTail> {
        let size = self.blob.size();
        let len = usize::try_from(size.checked_sub(from)?).ok()?;
        let mut bytes = vec![0u8; len];
        let mut covered = vec![false; len];
        for (off, data) in self.pieces.into_inner().unwrap_or_else(|e| e.into_inner()) {
            for (i, b) in data.into_iter().enumerate() {
                let Some(pos) = (off + i as u64).checked_sub(from) else {
                    continue;
                };
                let pos = pos as usize;
                if pos < len {
                    bytes[pos] = b;
                    covered[pos] = true;
                }
            }
        }
        covered.iter().all(|&c| c).then_some(BlobTail {
            blob_size: size,
            bytes,
        })
    }
}

/// Fails unless the TOC (of digest `toc_digest`) is verified as the labels and options require.
pub fn verify_toc(
    source: &LayerSource,
    toc_digest: &Digest,
    allow_no_verification: bool,
) -> Result<()> {
    match &source.toc_digest {
        Some(expected) => rootfs::estargz::verify_toc_digest(expected.as_ref(), toc_digest)
            .map_err(|e| error(format!("layer {}", source.digest), e)),
        None if source.skip_verify && allow_no_verification => {
            tracing::warn!(layer = %source.digest, "mounting a layer without TOC verification (skipverify)");
            Ok(())
        }
        None => Err(Error::FailedPrecondition(format!(
            "layer {}: digest of TOC JSON must be passed (label {})",
            source.digest,
            crate::labels::LABEL_TOC_DIGEST
        ))),
    }
}

/// Finds layer `source`: its TOC from the cache when there (no network), else footer and TOC
/// from the registry (a layer that is not eStargz fails after reading the footer); the TOC is
/// verified and its tree built.
pub fn resolve(
    registry: &Registry,
    cache: &ChunkCache,
    source: &LayerSource,
    allow_no_verification: bool,
    index_options: &IndexOptions,
) -> Result<Resolved> {
    let resolved = read_layer(
        registry,
        cache,
        &source.reference,
        &source.digest,
        index_options,
    )?;
    verify_toc(source, &resolved.toc_digest, allow_no_verification)?;
    Ok(resolved)
}

/// Reads layer `digest` of `reference`, unverified: its TOC from the cache when there (no
/// network), else footer and TOC from the registry (then cached); builds its tree.
pub fn read_layer(
    registry: &Registry,
    cache: &ChunkCache,
    reference: &Reference,
    digest: &Digest,
    index_options: &IndexOptions,
) -> Result<Resolved> {
    let what = format!("layer {digest} of {reference}");
    let build = |opened: &OpenedToc| {
        Index::build(&opened.toc, opened.toc_offset, index_options).map_err(|e| error(&what, e))
    };
    if let Some(tail) = cache.load_toc(digest) {
        match read_toc(&tail) {
            Ok(toc) => {
                tracing::debug!(layer = %digest, "TOC from the cache");
                return Ok(Resolved {
                    index: build(&toc)?,
                    toc_digest: toc.toc_digest,
                    blob: None,
                    blob_size: tail.blob_size,
                });
            }
            Err(e) => {
                tracing::warn!(layer = %digest, error = %e, "cached TOC unreadable; fetching it again");
                cache.drop_toc(digest);
            }
        }
    }
    let blob = registry
        .blob_with_tail(reference, digest, None, TOC_TAIL)
        .map_err(|e| error(&what, e))?;
    let answered = Instant::now();
    let recording = Recording {
        blob: &blob,
        pieces: Mutex::new(Vec::new()),
    };
    let opened = read_toc(&recording).map_err(|e| match e {
        rootfs::Error::InvalidArchive(m) => Error::FailedPrecondition(format!(
            "{what}: {m} (the layer must be eStargz to be mounted lazily)"
        )),
        e => error(&what, e),
    })?;
    let index = build(&opened)?;
    if let Some(tail) = recording.tail(opened.toc_offset)
        && let Err(e) = cache.store_toc(digest, &tail)
    {
        tracing::warn!(layer = %digest, error = %e, "cannot cache the TOC");
    }
    Ok(Resolved {
        index,
        toc_digest: opened.toc_digest,
        blob_size: blob.size(),
        blob: Some((blob, answered)),
    })
}

/// [`resolve`] bounded by `deadline` (the work goes on in the background past it, and is
/// dropped).
pub fn resolve_within(
    deadline: Instant,
    registry: Registry,
    cache: Arc<ChunkCache>,
    source: LayerSource,
    allow_no_verification: bool,
    index_options: IndexOptions,
) -> Result<Resolved> {
    let (tx, rx) = mpsc::channel();
    let digest = source.digest.clone();
    std::thread::Builder::new()
        .name("strata-http-resolve".into())
        .spawn(move || {
            let r = resolve(
                &registry,
                &cache,
                &source,
                allow_no_verification,
                &index_options,
            );
            let _ = tx.send(r);
        })
        .map_err(|e| Error::io("start a resolver thread", e))?;
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(r) => r,
        Err(_) => Err(Error::Unavailable(format!(
            "layer {digest}: failed to resolve layer (timeout: resolve_timeout_secs)"
        ))),
    }
}

/// A fetch of one chunk that other readers wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<std::result::Result<Arc<Vec<u8>>, String>>>,
    done: Condvar,
}

impl Flight {
    fn complete(&self, r: std::result::Result<Arc<Vec<u8>>, String>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.done.notify_all();
    }

    fn wait(&self) -> std::result::Result<Arc<Vec<u8>>, String> {
        let mut guard = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = guard.as_ref() {
                return r.clone();
            }
            guard = self.done.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Why a read failed (the FUSE side answers EIO).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The mount is going away.
    #[error("the layer is being unmounted")]
    Cancelled,
    /// A chunk could not be fetched or did not verify.
    #[error("{0}")]
    Fetch(String),
}

/// Per-layer counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Compressed bytes received from the registry for this layer.
    pub bytes_fetched: AtomicU64,
}

/// Settings of a layer that come from the plugin's options and labels.
#[derive(Debug, Clone)]
pub struct LayerSettings {
    /// Bytes to prefetch without landmark.
    pub prefetch_bytes: u64,
    /// Fetch the whole layer in the background.
    pub background_fetch: bool,
    /// How long an answer of the registry for this blob stands as a passed Check.
    pub check_interval: Duration,
    /// How long a Check waits for the mount-time prefetch (stargz's `prefetch_timeout_sec`).
    pub prefetch_timeout: Duration,
}

/// A flag that is raised once; waiters wake up.
#[derive(Default)]
struct Signal {
    raised: Mutex<bool>,
    changed: Condvar,
}

impl Signal {
    fn raise(&self) {
        *self.raised.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
    }

    /// Whether it was raised within `timeout`.
    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.raised.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |raised| !*raised)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// A mounted layer.
pub struct Layer {
    /// Where it comes from.
    pub source: LayerSource,
    /// Its files.
    pub index: Index,
    /// Size of its blob.
    pub blob_size: u64,
    registry: Registry,
    blob: Mutex<Option<Blob>>,
    /// When the registry last served this blob (an open, a Check, a fetch).
    answered: Mutex<Option<Instant>>,
    /// Raised when the mount-time prefetch has been tried (done or failed).
    prefetch_tried: Signal,
    cache: Arc<ChunkCache>,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    /// Every distinct chunk of the layer, by blob offset.
    chunks: Vec<Chunk>,
    payload_total: u64,
    /// Counters.
    pub counters: Counters,
    reads_in_flight: AtomicUsize,
    cancelled: AtomicBool,
    /// The mountpoint (its parent holds the status file); `None` once the status is removed.
    status_at: Mutex<Option<PathBuf>>,
    settings: LayerSettings,
}

/// Counts a FUSE read for as long as it runs (background fetch pauses meanwhile).
pub struct ReadGuard<'a>(&'a Layer);

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.0.reads_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Layer {
    /// The layer `resolved` found, mounted at `mountpoint`.
    pub fn new(
        source: LayerSource,
        resolved: Resolved,
        registry: Registry,
        cache: Arc<ChunkCache>,
        mountpoint: &Path,
        settings: LayerSettings,
    ) -> Arc<Layer> {
        let mut chunks: Vec<Chunk> = resolved
            .index
            .nodes
            .iter()
            .flat_map(|n| n.chunks.iter().cloned())
            .collect();
        chunks.sort_by_key(|c| (c.blob_offset, c.inner_offset));
        chunks.dedup_by_key(|c| (c.blob_offset, c.inner_offset));
        let payload_total = chunks.iter().map(|c| c.size).sum();
        let (blob, answered) = resolved.blob.unzip();
        Arc::new(Layer {
            source,
            index: resolved.index,
            blob_size: resolved.blob_size,
            registry,
            blob: Mutex::new(blob),
            answered: Mutex::new(answered),
            prefetch_tried: Signal::default(),
            cache,
            flights: Mutex::new(HashMap::new()),
            chunks,
            payload_total,
            counters: Counters::default(),
            reads_in_flight: AtomicUsize::new(0),
            cancelled: AtomicBool::new(false),
            status_at: Mutex::new(Some(mountpoint.to_path_buf())),
            settings,
        })
    }

    /// Marks a FUSE read in flight until the guard is dropped.
    pub fn begin_read(&self) -> ReadGuard<'_> {
        self.reads_in_flight.fetch_add(1, Ordering::SeqCst);
        ReadGuard(self)
    }

    /// Stops background work and later reads; removes the status file.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let mut at = self.status_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mountpoint) = at.take()
            && let Err(e) = remove_status(&mountpoint)
        {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot remove the status file");
        }
    }

    /// Whether [`Layer::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// The blob, opened now if needed.
    fn blob(&self) -> rootfs::Result<Blob> {
        let mut blob = self.blob.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = blob.as_ref() {
            return Ok(b.clone());
        }
        let b = self.registry.blob(
            &self.source.reference,
            &self.source.digest,
            Some(self.blob_size),
        )?;
        *blob = Some(b.clone());
        self.mark_answered();
        Ok(b)
    }

    /// Records that the registry just served the blob.
    fn mark_answered(&self) {
        *self.answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Whether the registry served the blob within the check interval.
    fn answered_recently(&self) -> bool {
        self.answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < self.settings.check_interval)
    }

    fn key(&self, chunk: &Chunk) -> String {
        chunk_key(&self.source.digest, chunk)
    }

    /// Payload bytes (uncompressed) held in the cache, and of the whole layer.
    pub fn cached_bytes(&self) -> (u64, u64) {
        let cached = self
            .chunks
            .iter()
            .filter(|c| self.cache.contains(&self.key(c)))
            .map(|c| c.size)
            .sum();
        (cached, self.payload_total)
    }

    /// Whether every chunk is in the cache.
    pub fn fully_cached(&self) -> bool {
        self.chunks
            .iter()
            .all(|c| self.cache.contains(&self.key(c)))
    }

    /// Checks the layer is available, then waits (bounded, as stargz does) for the mount-time
    /// prefetch, so that what it brings is local when the container starts.
    pub fn check(&self) -> Result<()> {
        self.check_registry()?;
        if !self.prefetch_tried.wait(self.settings.prefetch_timeout) {
            tracing::debug!(layer = %self.source.digest, "Check did not wait for the prefetch to end (prefetch_timeout_secs)");
        }
        Ok(())
    }

    /// Marks the mount-time prefetch as over (Checks stop waiting for it).
    pub fn end_prefetch(&self) {
        self.prefetch_tried.raise();
    }

    /// Checks the registry still serves the blob (or every chunk is local). An answer of the
    /// registry younger than the check interval counts, as in stargz (`valid_interval`).
    fn check_registry(&self) -> Result<()> {
        // The cheap test first: fully_cached looks up every chunk of the layer.
        if self.answered_recently() || self.fully_cached() {
            return Ok(());
        }
        let unavailable = |e: rootfs::Error| {
            Error::Unavailable(format!(
                "layer {} of {}: registry: {e}",
                self.source.digest, self.source.reference
            ))
        };
        let opened = self
            .blob
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        let blob = self.blob().map_err(unavailable)?;
        if opened {
            // Opening it just now was answered by the registry: that is the check.
            return Ok(());
        }
        match blob.check() {
            Ok(()) => {
                self.mark_answered();
                Ok(())
            }
            Err(e) => {
                // Open it afresh next time (a registry that came back, a new connection).
                *self.blob.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Err(unavailable(e))
            }
        }
    }

    /// Whether every chunk holding bytes `[offset, offset + size)` of `node` is cached.
    pub fn range_cached(&self, node: NodeId, offset: u64, size: u32) -> bool {
        let Some(n) = self.index.nodes.get(node) else {
            return true;
        };
        let end = n.size.min(offset + u64::from(size));
        let first = n
            .chunks
            .partition_point(|c| c.file_offset + c.size <= offset);
        n.chunks[first..]
            .iter()
            .take_while(|c| c.file_offset < end)
            .all(|c| self.cache.contains(&self.key(c)))
    }

    /// `size` bytes at `offset` of regular file `node` (fewer at its end).
    pub fn read(
        &self,
        node: NodeId,
        offset: u64,
        size: u32,
    ) -> std::result::Result<Vec<u8>, ReadError> {
        let Some(n) = self.index.nodes.get(node) else {
            return Ok(Vec::new());
        };
        if offset >= n.size {
            return Ok(Vec::new());
        }
        let end = n.size.min(offset + u64::from(size));
        let first = n
            .chunks
            .partition_point(|c| c.file_offset + c.size <= offset);
        let wanted: Vec<&Chunk> = n.chunks[first..]
            .iter()
            .take_while(|c| c.file_offset < end)
            .collect();
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut parts: Vec<Option<Vec<u8>>> = Vec::with_capacity(wanted.len());
        let mut missing = Vec::new();
        for c in &wanted {
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = end.min(c.file_offset + c.size) - c.file_offset;
            let part = self.cache.read(&self.key(c), c, from, (to - from) as usize);
            if part.is_none() {
                missing.push((*c).clone());
            }
            parts.push(part);
        }
        let fetched = if missing.is_empty() {
            HashMap::new()
        } else {
            self.ensure(&missing)?
        };
        for (c, part) in wanted.iter().zip(parts) {
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = end.min(c.file_offset + c.size) - c.file_offset;
            match part {
                Some(p) => out.extend_from_slice(&p),
                None => {
                    let data = fetched
                        .get(&self.key(c))
                        .ok_or_else(|| ReadError::Fetch("chunk not fetched".into()))?;
                    out.extend_from_slice(&data[from as usize..to as usize]);
                }
            }
        }
        Ok(out)
    }

    /// Fetches `chunks` (not in the cache) with merged ranged requests, verifies and caches
    /// them; a chunk another thread is already fetching is waited for, not fetched twice.
    fn ensure(
        &self,
        chunks: &[Chunk],
    ) -> std::result::Result<HashMap<String, Arc<Vec<u8>>>, ReadError> {
        if self.is_cancelled() {
            return Err(ReadError::Cancelled);
        }
        let mut mine: Vec<(String, Chunk, Arc<Flight>)> = Vec::new();
        let mut theirs: Vec<(String, Arc<Flight>)> = Vec::new();
        {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            for c in chunks {
                let key = self.key(c);
                if mine.iter().any(|(k, _, _)| *k == key) || theirs.iter().any(|(k, _)| *k == key) {
                    continue;
                }
                match flights.get(&key) {
                    Some(f) => theirs.push((key, f.clone())),
                    None => {
                        let f = Arc::new(Flight::default());
                        flights.insert(key.clone(), f.clone());
                        mine.push((key, c.clone(), f));
                    }
                }
            }
        }
        let mut out = HashMap::new();
        if !mine.is_empty() {
            // Waiters must always be woken, even if fetching panics.
            let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.fetch(mine.iter().map(|(_, c, _)| c))
            }))
            .unwrap_or_else(|_| {
                mine.iter()
                    .map(|_| Err("fetching the chunk panicked".to_string()))
                    .collect()
            });
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            for ((key, _, flight), r) in mine.into_iter().zip(results) {
                flights.remove(&key);
                flight.complete(r.clone());
                theirs.push((key, flight));
            }
        }
        for (key, flight) in theirs {
            let data = flight.wait().map_err(ReadError::Fetch)?;
            out.insert(key, data);
        }
        Ok(out)
    }

    /// Fetches, verifies and caches `chunks`: one result per chunk.
    fn fetch<'a>(
        &self,
        chunks: impl Iterator<Item = &'a Chunk>,
    ) -> Vec<std::result::Result<Arc<Vec<u8>>, String>> {
        let chunks: Vec<&Chunk> = chunks.collect();
        let ranges: Vec<(u64, u64)> = chunks.iter().map(|c| (c.blob_offset, c.blob_len)).collect();
        let what = format!("layer {} of {}", self.source.digest, self.source.reference);
        let members = self.blob().and_then(|b| b.read_ranges(&ranges));
        let members = match members {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(layer = %self.source.digest, error = %e, "fetching chunks failed");
                let msg = format!("{what}: {e}");
                return chunks.iter().map(|_| Err(msg.clone())).collect();
            }
        };
        self.mark_answered();
        let fetched: u64 = ranges.iter().map(|r| r.1).sum();
        self.counters
            .bytes_fetched
            .fetch_add(fetched, Ordering::Relaxed);
        chunks
            .iter()
            .zip(members)
            .map(|(c, member)| match rootfs::estargz::decompress_chunk(&member, c) {
                Ok(data) => {
                    if let Err(e) = self.cache.put(&self.key(c), &data) {
                        tracing::warn!(error = %e, "cannot cache a chunk");
                    }
                    Ok(Arc::new(data))
                }
                Err(e) => {
                    tracing::error!(layer = %self.source.digest, error = %e, "chunk failed verification");
                    Err(format!("{what}: {e}"))
                }
            })
            .collect()
    }

    /// The layer's status now.
    pub fn status(&self) -> LayerStatus {
        let (cached, total) = self.cached_bytes();
        LayerStatus {
            plugin: "http".into(),
            reference: self.source.reference.to_string(),
            layer: self.source.digest.to_string(),
            state: if cached >= total { "complete" } else { "lazy" }.into(),
            bytes_fetched: self.counters.bytes_fetched.load(Ordering::Relaxed),
            bytes_cached: cached,
            bytes_total: total,
            percent_cached: if total == 0 {
                100.0
            } else {
                (cached as f64 * 100.0 / total as f64 * 10.0).round() / 10.0
            },
        }
    }

    /// Writes the status file (unless the layer is being unmounted).
    pub fn write_status(&self) -> LayerStatus {
        let status = self.status();
        let at = self.status_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mountpoint) = at.as_ref()
            && let Err(e) = write_status(mountpoint, &status)
        {
            tracing::debug!(mountpoint = %mountpoint.display(), error = %e, "cannot write the status file");
        }
        status
    }

    /// The chunks the prefetch covers, not yet cached.
    fn prefetch_chunks(&self) -> Vec<Chunk> {
        let end = fetch::prefetch_end(
            self.index.prefetch_end,
            self.source.prefetch.unwrap_or(self.settings.prefetch_bytes),
            self.blob_size,
        );
        self.chunks
            .iter()
            .filter(|c| c.blob_offset < end && !self.cache.contains(&self.key(c)))
            .cloned()
            .collect()
    }

    fn uncached_chunks(&self) -> Vec<Chunk> {
        self.chunks
            .iter()
            .filter(|c| !self.cache.contains(&self.key(c)))
            .cloned()
            .collect()
    }

    /// Sleeps `d` in small steps; false if the layer was cancelled meanwhile.
    fn pause(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.is_cancelled() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        !self.is_cancelled()
    }

    /// Fetches `batches` of `chunks`; background batches wait while FUSE reads are in flight.
    /// False if cancelled or a batch failed.
    fn fetch_batches(
        &self,
        chunks: &[Chunk],
        batches: &[Batch],
        low_priority: bool,
        last_status: &mut Instant,
    ) -> bool {
        for batch in batches {
            if low_priority {
                while self.reads_in_flight.load(Ordering::SeqCst) > 0 {
                    if !self.pause(Duration::from_millis(50)) {
                        return false;
                    }
                }
            }
            if self.is_cancelled() {
                return false;
            }
            let todo: Vec<Chunk> = chunks[batch.clone()]
                .iter()
                .filter(|c| !self.cache.contains(&self.key(c)))
                .cloned()
                .collect();
            if !todo.is_empty()
                && let Err(e) = self.ensure(&todo)
            {
                tracing::debug!(layer = %self.source.digest, error = %e, "prefetch/background batch failed");
                return false;
            }
            if last_status.elapsed() >= STATUS_EVERY {
                self.write_status();
                *last_status = Instant::now();
            }
        }
        true
    }

    /// The layer's worker: prefetch, then (if enabled) background fetch of the rest, retrying
    /// while the registry fails; keeps the status file current until cancelled.
    pub fn run_worker(self: Arc<Self>) {
        let mut last_status = Instant::now();
        let mut pause = Duration::from_millis(500);
        let mut prefetched = false;
        loop {
            if self.is_cancelled() {
                self.end_prefetch();
                return;
            }
            if !prefetched {
                let chunks = self.prefetch_chunks();
                let batches = fetch::batches(&chunks, BATCH_BYTES);
                let started = Instant::now();
                if self.fetch_batches(&chunks, &batches, false, &mut last_status) {
                    prefetched = true;
                    tracing::debug!(layer = %self.source.digest, chunks = chunks.len(), elapsed = ?started.elapsed(), "prefetch done");
                }
                if !chunks.is_empty() {
                    self.write_status();
                }
                // Done or failed (errors are only logged): Checks stop waiting.
                self.end_prefetch();
            }
            if prefetched && self.settings.background_fetch {
                let chunks = self.uncached_chunks();
                let batches = fetch::batches(&chunks, BATCH_BYTES);
                if self.fetch_batches(&chunks, &batches, true, &mut last_status) {
                    let s = self.write_status();
                    if s.state == "complete" {
                        tracing::info!(layer = %self.source.digest, bytes_fetched = s.bytes_fetched, "layer fully cached");
                    } else {
                        // Every chunk was fetched once, but the cache bound evicted some: do not
                        // fetch the layer over and over.
                        tracing::warn!(
                            layer = %self.source.digest,
                            bytes_cached = s.bytes_cached,
                            bytes_total = s.bytes_total,
                            "background fetch done, but the layer does not fit in the cache (cache_max_bytes)"
                        );
                    }
                    break;
                }
            } else if prefetched {
                break;
            }
            self.write_status();
            last_status = Instant::now();
            if !self.pause(pause) {
                return;
            }
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
        // Reads keep fetching: keep the status current.
        let mut last = self.write_status();
        while self.pause(STATUS_EVERY) {
            if last.state == "complete" {
                // Only eviction could change it now; check now and then.
                if !self.pause(STATUS_EVERY * 9) {
                    return;
                }
            }
            let s = self.status();
            if s != last {
                last = self.write_status();
            }
        }
    }
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("digest", &self.source.digest.to_string())
            .field("reference", &self.source.reference.to_string())
            .finish()
    }
}
