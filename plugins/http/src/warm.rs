//! Reading an image's other layers ahead of their mounts: when one layer mounts, the layers
//! label names the rest of the image; their footers and TOCs are fetched and their trees built
//! a few at a time in the background (as stargz resolves neighbour layers), so that their
//! mounts, which come one after another, find them ready. Nothing read ahead is trusted: the
//! mount verifies the TOC digest against its own label.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rootfs::{
    estargz::IndexOptions,
    registry::{Reference, Registry},
};
use snapshot_core::identity::Digest;

use crate::{
    cache::ChunkCache,
    layer::{self, Resolved},
};

/// Layers read at once.
const WORKERS: usize = 3;
/// How long a layer read ahead waits for its mount before it is dropped.
const KEEP: Duration = Duration::from_secs(300);

/// Where one layer read ahead stands.
enum Slot {
    /// Scheduled, not started: a mount that comes first reads the layer itself.
    Queued,
    /// Being read: a mount waits for it.
    Running,
    /// Read, waiting for its mount (since when).
    Ready(Box<Resolved>, Instant),
}

/// The layers read ahead of their mounts, by image reference and digest.
pub struct Warmer {
    registry: Registry,
    cache: Arc<ChunkCache>,
    index_options: IndexOptions,
    slots: Mutex<HashMap<String, Slot>>,
    changed: Condvar,
    /// Layers ever scheduled (each is read ahead once).
    scheduled: Mutex<HashSet<String>>,
}

fn key(reference: &Reference, digest: &Digest) -> String {
    format!("{reference}@{digest}")
}

impl Warmer {
    /// A warmer reading through `registry` into `cache`.
    pub fn new(registry: Registry, cache: Arc<ChunkCache>, index_options: IndexOptions) -> Self {
        Warmer {
            registry,
            cache,
            index_options,
            slots: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            scheduled: Mutex::new(HashSet::new()),
        }
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts reading `layers` of `reference` (its layers label) in the background, but for
    /// `mounting` and those read ahead before.
    pub fn schedule(self: &Arc<Self>, reference: &Reference, mounting: &Digest, layers: &[String]) {
        let todo: Vec<(String, Digest)> = {
            let mut scheduled = self.scheduled.lock().unwrap_or_else(|e| e.into_inner());
            scheduled.insert(key(reference, mounting));
            layers
                .iter()
                .filter_map(|d| d.parse::<Digest>().ok())
                .map(|d| (key(reference, &d), d))
                .filter(|(k, _)| scheduled.insert(k.clone()))
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        {
            let mut slots = self.slots();
            slots.retain(|_, s| !matches!(s, Slot::Ready(_, at) if at.elapsed() > KEEP));
            for (k, _) in &todo {
                slots.insert(k.clone(), Slot::Queued);
            }
        }
        let keys: Vec<String> = todo.iter().map(|(k, _)| k.clone()).collect();
        let (warmer, reference) = (self.clone(), reference.clone());
        let spawned = std::thread::Builder::new()
            .name("strata-http-warm".into())
            .spawn(move || {
                let next = AtomicUsize::new(0);
                std::thread::scope(|scope| {
                    for _ in 0..todo.len().min(WORKERS) {
                        scope.spawn(|| {
                            while let Some((k, d)) = todo.get(next.fetch_add(1, Ordering::Relaxed))
                            {
                                warmer.read(&reference, k, d);
                            }
                        });
                    }
                });
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "cannot start reading neighbour layers ahead");
            let mut slots = self.slots();
            for k in &keys {
                slots.remove(k);
            }
        }
    }

    /// Reads one layer unless its mount took it over.
    fn read(&self, reference: &Reference, k: &str, digest: &Digest) {
        match self.slots().get_mut(k) {
            Some(slot @ Slot::Queued) => *slot = Slot::Running,
            _ => return,
        }
        let read = layer::read_layer(
            &self.registry,
            &self.cache,
            reference,
            digest,
            &self.index_options,
        );
        let mut slots = self.slots();
        match read {
            Ok(r) => {
                slots.insert(k.to_string(), Slot::Ready(Box::new(r), Instant::now()));
            }
            Err(e) => {
                tracing::debug!(layer = %digest, error = %e, "cannot read a neighbour layer ahead");
                slots.remove(k);
            }
        }
        self.changed.notify_all();
    }

    /// Layer `digest` of `reference` as read ahead (waiting up to `timeout` if it is being
    /// read), or `None`: the mount reads it itself.
    pub fn take(
        &self,
        reference: &Reference,
        digest: &Digest,
        timeout: Duration,
    ) -> Option<Resolved> {
        let k = key(reference, digest);
        let deadline = Instant::now() + timeout;
        let mut slots = self.slots();
        loop {
            match slots.get(&k) {
                None => return None,
                Some(Slot::Queued) => {
                    slots.remove(&k);
                    return None;
                }
                Some(Slot::Ready(..)) => {
                    return match slots.remove(&k) {
                        Some(Slot::Ready(r, _)) => Some(*r),
                        _ => None,
                    };
                }
                Some(Slot::Running) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    slots = self
                        .changed
                        .wait_timeout(slots, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}
