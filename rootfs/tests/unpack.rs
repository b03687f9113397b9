//! apply_layers / apply_layer orchestration against the real overlay snapshotter, with a
//! scripted applier (the real tar applier is tested in apply.rs and end to end elsewhere).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use oci_spec::image::{Descriptor, DescriptorBuilder, MediaType};
use rootfs::{Applier, Error, Layer, LayerOutcome, UnpackOpts, Unpacker};
use snapshot_core::identity::{Digest, chain_ids, sha256_digest};
use snapshot_core::{ErrorKind, Kind, Labels, Mount, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

/// Writes one file per layer (`layer-<n>`) and reports a scripted diff ID.
struct ScriptedApplier {
    /// blob digest -> (file name, diff ID to report)
    script: HashMap<String, (String, Digest)>,
    calls: AtomicUsize,
    fail_on: Mutex<Option<String>>,
}

fn writable_dir(mounts: &[Mount]) -> String {
    match mounts[0].option("upperdir") {
        Some(u) => u.to_string(),
        None => mounts[0].source.clone(),
    }
}

impl Applier for ScriptedApplier {
    fn apply(&self, blob: &Descriptor, mounts: &[Mount]) -> rootfs::Result<Descriptor> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_on.lock().unwrap().as_deref() == Some(blob.digest().as_ref()) {
            return Err(Error::InvalidArchive("scripted failure".into()));
        }
        let (file, diff) = &self.script[blob.digest().as_ref()];
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(Path::new(&writable_dir(mounts)).join(file), file).unwrap();
        Ok(desc(MediaType::ImageLayer, diff))
    }
}

fn desc(mt: MediaType, d: &Digest) -> Descriptor {
    DescriptorBuilder::default()
        .media_type(mt)
        .digest(d.clone())
        .size(1u64)
        .build()
        .unwrap()
}

/// `n` layers with distinct blob and diff digests, and an applier scripted for them.
fn image(n: usize) -> (Vec<Layer>, ScriptedApplier) {
    let mut layers = Vec::new();
    let mut script = HashMap::new();
    for i in 0..n {
        let blob = sha256_digest(format!("blob {i}").as_bytes());
        let diff = sha256_digest(format!("diff {i}").as_bytes());
        script.insert(blob.to_string(), (format!("layer-{i}"), diff.clone()));
        layers.push(Layer {
            diff: desc(MediaType::ImageLayer, &diff),
            blob: desc(MediaType::ImageLayerGzip, &blob),
        });
    }
    let applier = ScriptedApplier {
        script,
        calls: AtomicUsize::new(0),
        fail_on: Mutex::new(None),
    };
    (layers, applier)
}

fn diff_ids(layers: &[Layer]) -> Vec<Digest> {
    layers.iter().map(|l| l.diff.digest().clone()).collect()
}

fn names(sn: &dyn Snapshotter) -> Vec<(String, Kind, String)> {
    let mut out = Vec::new();
    sn.walk(&[], &mut |i| {
        out.push((i.name.clone(), i.kind, i.parent.clone()));
        Ok(())
    })
    .unwrap();
    out.sort();
    out
}

fn check_chain(sn: &dyn Snapshotter, layers: &[Layer]) {
    let chains = chain_ids(&diff_ids(layers));
    let mut expected: Vec<(String, Kind, String)> = chains
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let parent = if i == 0 {
                String::new()
            } else {
                chains[i - 1].to_string()
            };
            (c.to_string(), Kind::Committed, parent)
        })
        .collect();
    expected.sort();
    assert_eq!(
        names(sn),
        expected,
        "exactly one committed snapshot per chain ID, with the right parents and no extraction leftovers"
    );
    // Every layer's file is visible in a view of the top.
    let m = sn
        .view(
            "check-view",
            chains.last().unwrap().as_ref(),
            &Labels::new(),
        )
        .unwrap();
    let target = tempfile::tempdir().unwrap();
    let g = rootfs::mount::MountGuard::mount(&m, target.path()).unwrap();
    for i in 0..layers.len() {
        assert!(
            target.path().join(format!("layer-{i}")).exists(),
            "layer-{i} visible"
        );
    }
    g.unmount().unwrap();
    sn.remove("check-view").unwrap();
}

fn sequential() -> UnpackOpts {
    UnpackOpts { max_parallel: 1 }
}

#[test]
fn apply_layers_commits_one_snapshot_per_chain_id_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
    let (layers, applier) = image(3);
    let top = Unpacker::new()
        .apply_layers(&layers, &sn, &applier, &sequential())
        .unwrap();
    assert_eq!(&top, chain_ids(&diff_ids(&layers)).last().unwrap());
    check_chain(&sn, &layers);
    let info = sn.stat(top.as_ref()).unwrap();
    assert_eq!(
        info.labels[rootfs::unpack::LABEL_DIFF_ID],
        layers[2].diff.digest().to_string()
    );
}

#[test]
fn parallel_unpack_gives_the_same_chain() {
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
    assert!(sn.capabilities().contains(&"rebase".to_string()));
    let (layers, applier) = image(5);
    let top = Unpacker::new()
        .apply_layers(&layers, &sn, &applier, &UnpackOpts { max_parallel: 3 })
        .unwrap();
    assert_eq!(&top, chain_ids(&diff_ids(&layers)).last().unwrap());
    assert_eq!(applier.calls.load(Ordering::SeqCst), 5);
    check_chain(&sn, &layers);
}

#[test]
fn existing_chains_are_reused_never_unpacked_twice() {
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
    let (layers, applier) = image(4);
    let unpacker = Unpacker::new();
    unpacker
        .apply_layers(&layers[..2], &sn, &applier, &sequential())
        .unwrap();
    assert_eq!(applier.calls.load(Ordering::SeqCst), 2);
    unpacker
        .apply_layers(&layers, &sn, &applier, &UnpackOpts { max_parallel: 3 })
        .unwrap();
    assert_eq!(
        applier.calls.load(Ordering::SeqCst),
        4,
        "only the two missing layers are unpacked"
    );
    unpacker
        .apply_layers(&layers, &sn, &applier, &sequential())
        .unwrap();
    assert_eq!(applier.calls.load(Ordering::SeqCst), 4);
    let chains = chain_ids(&diff_ids(&layers));
    let out = unpacker
        .apply_layer(&layers[1], Some(&chains[0]), &sn, &applier)
        .unwrap();
    assert_eq!(out, LayerOutcome::AlreadyPresent);
    check_chain(&sn, &layers);
}

#[test]
fn diff_id_mismatch_commits_nothing() {
    for parallel in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
        let (mut layers, applier) = image(3);
        layers[1].diff = desc(
            MediaType::ImageLayer,
            &sha256_digest(b"not what the applier computes"),
        );
        let err = Unpacker::new()
            .apply_layers(
                &layers,
                &sn,
                &applier,
                &UnpackOpts {
                    max_parallel: parallel,
                },
            )
            .unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        let left = names(&sn);
        let chains = chain_ids(&diff_ids(&layers));
        if parallel == 1 {
            assert_eq!(
                left,
                vec![(chains[0].to_string(), Kind::Committed, String::new())],
                "only the good bottom layer"
            );
        } else {
            assert!(
                left.is_empty(),
                "parallel unpack commits nothing when a layer fails: {left:?}"
            );
        }
        sn.cleanup().unwrap();
        let dirs = std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .count();
        assert_eq!(dirs, left.len(), "no stray directory after cleanup");
    }
}

#[test]
fn failed_apply_removes_the_extraction_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
    let (layers, applier) = image(2);
    *applier.fail_on.lock().unwrap() = Some(layers[1].blob.digest().to_string());
    let err = Unpacker::new()
        .apply_layers(&layers, &sn, &applier, &sequential())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(names(&sn).len(), 1, "{:?}", names(&sn));
}

#[test]
fn concurrent_requests_for_the_same_chain_share_one_unpack() {
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
    let (layers, applier) = image(3);
    let unpacker = Unpacker::new();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                unpacker
                    .apply_layers(&layers, &sn, &applier, &sequential())
                    .unwrap()
            });
        }
    });
    assert_eq!(
        applier.calls.load(Ordering::SeqCst),
        3,
        "each layer unpacked once"
    );
    check_chain(&sn, &layers);
}

#[test]
fn two_unpackers_racing_end_with_one_snapshot_per_chain() {
    // Separate Unpackers share no lock: like two processes, one loses the commit race.
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
    let (layers, applier) = image(3);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                Unpacker::new()
                    .apply_layers(&layers, &sn, &applier, &sequential())
                    .unwrap()
            });
        }
    });
    check_chain(&sn, &layers);
    sn.cleanup().unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .count(),
        3
    );
}

#[test]
fn empty_layer_list_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(dir.path(), Options::default()).unwrap();
    let (_, applier) = image(0);
    let err = rootfs::apply_layers(&[], &sn, &applier).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}
