//! Layers -> snapshots: `apply_layers` / `apply_layer` (SEMANTICS.md §5.1, §5.3, §5.4).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use snapshot_core::identity::{Digest, chain_id, chain_ids, parse_digest};
use snapshot_core::{
    CommitOpts, ErrorKind, LABEL_LAYER_DIGEST, LABEL_TARGET_REF, Labels, Mount, Snapshotter,
    is_inherited_label,
};

use crate::{Applier, Error, Layer, Result};

/// Label with a layer's uncompressed digest, set on extraction snapshots (containerd 2.x).
pub const LABEL_DIFF_ID: &str = "containerd.io/snapshot/diff-id";
/// Label with the chain ID of the layers below, set for every layer but the first.
pub const LABEL_PARENT_CHAIN_ID: &str = "containerd.io/snapshot/parent-chain-id";

/// How many times a Prepare that collides with an existing key is retried with a new key.
const PREPARE_ATTEMPTS: usize = 3;

/// Options of [`Unpacker::apply_layers`].
#[derive(Debug, Clone)]
pub struct UnpackOpts {
    /// Layers fetched, decompressed and written at once when the snapshotter can rebase
    /// (capability `rebase`); 1 unpacks strictly in order. Remote (target-label) preparation is
    /// only attempted in ordered mode, because it needs each layer's parent at Prepare time.
    pub max_parallel: usize,
}

impl Default for UnpackOpts {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        UnpackOpts {
            max_parallel: cores.clamp(1, 4),
        }
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// The layer was written into a new snapshot.
    Unpacked,
    /// A snapshot with its chain ID already existed (or a remote snapshotter provided it).
    AlreadyPresent,
}

/// Unpacks layers into snapshots. One per process is enough: concurrent requests for the same
/// chain ID share one unpack (the second waits, then finds the snapshot).
#[derive(Default)]
pub struct Unpacker {
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// A suffix unique within this host for temporary snapshot keys.
pub(crate) fn unique_key_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos}-{:x}{n:x}", std::process::id())
}

/// containerd's extraction key: `extract-<nanos>-<unique> <chainID>`.
fn extract_key(chain: &Digest) -> String {
    format!("extract-{} {chain}", unique_key_suffix())
}

/// The diff ID of a layer, parsed from its `diff` descriptor.
fn diff_id(layer: &Layer) -> Result<Digest> {
    Ok(parse_digest(layer.diff.digest().as_ref())?)
}

/// Labels of an extraction snapshot: the layer's inheritable annotations, the target chain ID and
/// the diff IDs (containerd 2.x unpacker).
fn extract_labels(
    layer: &Layer,
    chain: &Digest,
    parent: Option<&Digest>,
    target: bool,
) -> Result<Labels> {
    let mut labels = Labels::new();
    for ann in [layer.blob.annotations(), layer.diff.annotations()]
        .into_iter()
        .flatten()
    {
        for (k, v) in ann {
            if is_inherited_label(k) {
                labels.insert(k.clone(), v.clone());
            }
        }
    }
    if target {
        labels.insert(LABEL_TARGET_REF.into(), chain.to_string());
    }
    labels.insert(LABEL_LAYER_DIGEST.into(), layer.blob.digest().to_string());
    labels.insert(LABEL_DIFF_ID.into(), diff_id(layer)?.to_string());
    if let Some(p) = parent {
        labels.insert(LABEL_PARENT_CHAIN_ID.into(), p.to_string());
    }
    Ok(labels)
}

fn exists(sn: &dyn Snapshotter, name: &str) -> Result<bool> {
    match sn.stat(name) {
        Ok(_) => Ok(true),
        Err(e) if e.is(ErrorKind::NotFound) => Ok(false),
        Err(e) => Err(Error::Snapshot(
            e.context(format!("failed to stat snapshot {name}")),
        )),
    }
}

/// Removes an extraction snapshot after a failure, logging (not returning) errors.
fn discard(sn: &dyn Snapshotter, key: &str) {
    if let Err(e) = sn.remove(key)
        && !e.is(ErrorKind::NotFound)
    {
        tracing::warn!(key, error = %e, "failed to remove extraction snapshot");
    }
}

/// For parallel unpack a parentless snapshot's bind mount becomes an overlay-style mount
/// carrying `upperdir=`, so the applier writes whiteouts in overlay form (containerd #13115).
fn as_upperdir_mount(mounts: Vec<Mount>) -> Vec<Mount> {
    match mounts.as_slice() {
        [m] if m.kind == "bind" && !m.is_readonly() => vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![format!("upperdir={}", m.source)],
        }],
        _ => mounts,
    }
}

/// Applies `layer` to `mounts`, checking the diff ID.
fn apply_checked(applier: &dyn Applier, layer: &Layer, mounts: &[Mount]) -> Result<()> {
    let expected = diff_id(layer)?;
    let applied = applier
        .apply(&layer.blob, mounts)
        .map_err(|e| with_context(e, format!("failed to extract layer {expected}")))?;
    if applied.digest().as_ref() != expected.as_ref() {
        return Err(Error::DigestMismatch {
            what: format!("diff ID of layer {}", layer.blob.digest()),
            expected: expected.to_string(),
            actual: applied.digest().to_string(),
        });
    }
    Ok(())
}

fn with_context(e: Error, context: String) -> Error {
    match e {
        Error::Snapshot(s) => Error::Snapshot(s.context(context)),
        Error::Io { context: c, source } => Error::Io {
            context: format!("{context}: {c}"),
            source,
        },
        other => other,
    }
}

impl Unpacker {
    /// A new unpacker.
    pub fn new() -> Unpacker {
        Unpacker::default()
    }

    fn chain_lock(&self, chain: &Digest) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(chain.to_string()).or_default().clone()
    }

    /// Applies `layers` (bottom first) and returns the chain ID of the whole stack. Existing chain
    /// snapshots are reused; a snapshotter that can rebase gets several layers written at once.
    pub fn apply_layers(
        &self,
        layers: &[Layer],
        sn: &dyn Snapshotter,
        applier: &dyn Applier,
        opts: &UnpackOpts,
    ) -> Result<Digest> {
        let diff_ids = layers.iter().map(diff_id).collect::<Result<Vec<_>>>()?;
        let chains = chain_ids(&diff_ids);
        let Some(top) = chains.last() else {
            return Err(Error::InvalidArgument(
                "an image needs at least one layer".into(),
            ));
        };
        if exists(sn, top.as_ref())? {
            return Ok(top.clone());
        }
        let rebase = sn.capabilities().iter().any(|c| c == "rebase");
        if rebase && opts.max_parallel > 1 && layers.len() > 1 {
            self.apply_parallel(layers, &chains, sn, applier, opts.max_parallel)?;
        } else {
            for (i, layer) in layers.iter().enumerate() {
                let parent = i.checked_sub(1).map(|p| &chains[p]);
                self.apply_layer(layer, parent, sn, applier)?;
            }
        }
        Ok(top.clone())
    }

    /// Applies one layer on top of the chain `parent` (None for the bottom layer): returns
    /// whether it was unpacked or already present. The extraction snapshot carries the target
    /// label, so a remote snapshotter may provide the layer instead (answering AlreadyExists).
    pub fn apply_layer(
        &self,
        layer: &Layer,
        parent: Option<&Digest>,
        sn: &dyn Snapshotter,
        applier: &dyn Applier,
    ) -> Result<LayerOutcome> {
        let chain = chain_id(parent, &diff_id(layer)?);
        let lock = self.chain_lock(&chain);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        if exists(sn, chain.as_ref())? {
            return Ok(LayerOutcome::AlreadyPresent);
        }
        let parent_name = parent.map(|p| p.to_string()).unwrap_or_default();
        let labels = extract_labels(layer, &chain, parent, true)?;
        let mut prepared = None;
        for _ in 0..PREPARE_ATTEMPTS {
            let key = extract_key(&chain);
            match sn.prepare(&key, &parent_name, &labels) {
                Ok(mounts) => {
                    prepared = Some((key, mounts));
                    break;
                }
                // The remote-snapshot protocol: the target exists now, nothing to fetch.
                Err(e) if e.is(ErrorKind::AlreadyExists) => {
                    if exists(sn, chain.as_ref())? {
                        return Ok(LayerOutcome::AlreadyPresent);
                    }
                }
                Err(e) => {
                    return Err(Error::Snapshot(
                        e.context(format!("failed to prepare extraction snapshot {key:?}")),
                    ));
                }
            }
        }
        let Some((key, mounts)) = prepared else {
            return Err(Error::Snapshot(snapshot_core::Error::AlreadyExists(
                format!("extraction snapshot for {chain} after {PREPARE_ATTEMPTS} attempts"),
            )));
        };
        let result = apply_checked(applier, layer, &mounts).and_then(|()| {
            let opts = CommitOpts {
                labels: labels.clone(),
                parent: None,
            };
            sn.commit(chain.as_ref(), &key, &opts)
                .map_err(Error::Snapshot)
        });
        match result {
            Ok(()) => Ok(LayerOutcome::Unpacked),
            // Another process committed the same chain first: theirs is as good as ours.
            Err(Error::Snapshot(e)) if e.is(ErrorKind::AlreadyExists) => {
                discard(sn, &key);
                Ok(LayerOutcome::AlreadyPresent)
            }
            Err(e) => {
                discard(sn, &key);
                Err(e)
            }
        }
    }

    /// Parallel unpack: every missing layer is prepared without a parent and written
    /// concurrently, then the layers are committed bottom-up with their parent ("rebase").
    fn apply_parallel(
        &self,
        layers: &[Layer],
        chains: &[Digest],
        sn: &dyn Snapshotter,
        applier: &dyn Applier,
        max_parallel: usize,
    ) -> Result<()> {
        // Skip the prefix of layers that already exist.
        let mut first_missing = 0;
        for (i, chain) in chains.iter().enumerate().rev() {
            if exists(sn, chain.as_ref())? {
                first_missing = i + 1;
                break;
            }
        }
        let todo: Vec<usize> = (first_missing..layers.len()).collect();
        let locks: Vec<_> = todo.iter().map(|&i| self.chain_lock(&chains[i])).collect();
        let _held: Vec<_> = locks
            .iter()
            .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();

        // Prepare all, parentless.
        let mut staged: Vec<(usize, String, Labels, Vec<Mount>)> = Vec::new();
        let cleanup = |staged: &[(usize, String, Labels, Vec<Mount>)]| {
            for (_, key, _, mounts) in staged {
                if let Some(upper) = upperdir(mounts) {
                    crate::apply::forget_parents(&upper);
                }
                discard(sn, key);
            }
        };
        for &i in &todo {
            let parent = i.checked_sub(1).map(|p| &chains[p]);
            let labels = extract_labels(&layers[i], &chains[i], parent, false)?;
            let key = extract_key(&chains[i]);
            match sn.prepare(&key, "", &labels) {
                Ok(m) => staged.push((i, key, labels, as_upperdir_mount(m))),
                Err(e) => {
                    cleanup(&staged);
                    return Err(Error::Snapshot(
                        e.context(format!("failed to prepare extraction snapshot {key:?}")),
                    ));
                }
            }
        }

        // Apply concurrently, at most `max_parallel` at a time.
        let next = AtomicU64::new(0);
        let failures: Mutex<Vec<Error>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..max_parallel.min(staged.len()) {
                s.spawn(|| {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some((i, _, _, mounts)) = staged.get(n) else {
                            break;
                        };
                        if let Err(e) = apply_checked(applier, &layers[*i], mounts) {
                            failures.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                            break;
                        }
                        if !failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .is_empty()
                        {
                            break;
                        }
                    }
                });
            }
        });
        if let Some(e) = failures
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .next()
        {
            cleanup(&staged);
            return Err(e);
        }
        if let Err(e) = settle_parents(sn, chains, first_missing, &staged) {
            cleanup(&staged);
            return Err(e);
        }

        // Commit in order, each onto the previous chain.
        for (n, (i, key, labels, _)) in staged.iter().enumerate() {
            let opts = CommitOpts {
                labels: labels.clone(),
                parent: i.checked_sub(1).map(|p| chains[p].to_string()),
            };
            match sn.commit(chains[*i].as_ref(), key, &opts) {
                Ok(()) => {}
                Err(e) if e.is(ErrorKind::AlreadyExists) => discard(sn, key),
                Err(e) => {
                    cleanup(&staged[n..]);
                    return Err(Error::Snapshot(
                        e.context(format!("failed to commit snapshot {}", chains[*i])),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The `upperdir=` of a staged layer's mounts.
fn upperdir(mounts: &[Mount]) -> Option<PathBuf> {
    match mounts {
        [m] => m.option("upperdir").map(PathBuf::from),
        _ => None,
    }
}

/// Parallel unpack: parents that a layer created without knowing its lowers get their
/// metadata from the layers below now that all are written (see `apply::settle_parents`).
fn settle_parents(
    sn: &dyn Snapshotter,
    chains: &[Digest],
    first_missing: usize,
    staged: &[(usize, String, Labels, Vec<Mount>)],
) -> Result<()> {
    let uppers: Vec<Option<PathBuf>> = staged.iter().map(|(_, _, _, m)| upperdir(m)).collect();
    if !uppers
        .iter()
        .flatten()
        .any(|u| crate::apply::unsettled_parents(u))
    {
        return Ok(());
    }
    // The committed layers below the first staged one, nearest first.
    let mut below = Vec::new();
    let mut view = None;
    if let Some(parent) = first_missing.checked_sub(1).map(|p| &chains[p]) {
        let key = format!("settle-view-{} {parent}", unique_key_suffix());
        let mounts = sn
            .view(&key, parent.as_ref(), &Labels::new())
            .map_err(|e| Error::Snapshot(e.context(format!("failed to view {parent}"))))?;
        view = Some(key);
        match crate::apply::layer_dirs(&mounts) {
            Some(dirs) => below = dirs,
            None => tracing::warn!(
                ?mounts,
                "cannot read the layers below a parallel unpack: parents keep default metadata"
            ),
        }
    }
    let mut result = Ok(());
    for (n, upper) in uppers.iter().enumerate() {
        let Some(upper) = upper else { continue };
        let lowers: Vec<PathBuf> = uppers[..n]
            .iter()
            .rev()
            .flatten()
            .cloned()
            .chain(below.iter().cloned())
            .collect();
        result = crate::apply::settle_parents(upper, &lowers);
        if result.is_err() {
            break;
        }
    }
    if let Some(key) = view {
        discard(sn, &key);
    }
    result
}

/// [`Unpacker::apply_layers`] with a fresh unpacker and default options.
pub fn apply_layers(
    layers: &[Layer],
    sn: &dyn Snapshotter,
    applier: &dyn Applier,
) -> Result<Digest> {
    Unpacker::new().apply_layers(layers, sn, applier, &UnpackOpts::default())
}

/// [`Unpacker::apply_layer`] with a fresh unpacker.
pub fn apply_layer(
    layer: &Layer,
    parent: Option<&Digest>,
    sn: &dyn Snapshotter,
    applier: &dyn Applier,
) -> Result<LayerOutcome> {
    Unpacker::new().apply_layer(layer, parent, sn, applier)
}
