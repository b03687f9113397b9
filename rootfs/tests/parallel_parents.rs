//! A parallel unpack writes every layer before any is committed, so a layer's missing parent
//! directories cannot copy their metadata from the layers below while it is written; they must
//! end up as an unpack in order leaves them (containerd's `mkparent` with the lowers).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use oci_spec::image::{ImageManifest, MediaType};
use rootfs::applier::ContentApplier;
use rootfs::content::ContentStore;
use rootfs::mount::MountGuard;
use rootfs::{UnpackOpts, Unpacker};
use serde_json::json;
use snapshot_core::identity::sha256_digest;
use snapshot_core::{Labels, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

/// One tar entry: (name, kind, mode, uid and gid, mtime, an xattr).
type Entry<'a> = (
    &'a str,
    tar::EntryType,
    u32,
    u64,
    u64,
    Option<(&'a str, &'a [u8])>,
);

/// A tar of `entries`.
fn layer(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, mode, uid, mtime, xattr) in entries {
        if let Some((k, v)) = xattr {
            b.append_pax_extensions([(format!("SCHILY.xattr.{k}").as_str(), *v)])
                .unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(*uid);
        h.set_gid(*uid);
        h.set_mtime(*mtime);
        h.set_size(0);
        b.append_data(&mut h, name, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap()
}

fn image(store: &ContentStore) {
    use tar::EntryType::{Directory, Regular};
    let private = Some(("user.private", &b"yes"[..]));
    let layers = [
        layer(&[
            ("home/", Directory, 0o711, 0, 1000, None),
            ("home/u/", Directory, 0o700, 1000, 2000, private),
            ("home/u/a/", Directory, 0o750, 1000, 3000, None),
            ("home/u/gone", Regular, 0o600, 1000, 4000, None),
            ("srv/", Directory, 0o700, 5, 5000, None),
        ]),
        // Only files and a whiteout under those directories; and a directory that replaces
        // what the layer created as a parent first (its own entry wins).
        layer(&[
            ("home/u/a/new", Regular, 0o644, 0, 6000, None),
            ("home/u/.wh.gone", Regular, 0o600, 0, 6000, None),
            ("srv/x/y", Regular, 0o644, 0, 6000, None),
            ("srv/x/", Directory, 0o701, 7, 7000, None),
        ]),
        layer(&[("home/u/a/newer", Regular, 0o644, 0, 8000, None)]),
    ];
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in &layers {
        descs.push(store.write_blob(MediaType::ImageLayer, l).unwrap());
        diff_ids.push(sha256_digest(l).to_string());
    }
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = store
        .write_blob(
            MediaType::ImageConfig,
            &serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
    let manifest: ImageManifest = serde_json::from_value(json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": descs,
    }))
    .unwrap();
    store.add_image(&manifest, Some("t")).unwrap();
}

/// (mode, uid, mtime, user.private) of each directory, after unpacking with `max_parallel`.
fn unpack(
    dir: &Path,
    store: &ContentStore,
    max_parallel: usize,
) -> Vec<(String, u32, u32, i64, bool)> {
    let img = store.resolve(Some("t")).unwrap();
    let sn = OverlaySnapshotter::open(&dir.join(format!("sn-{max_parallel}")), Options::default())
        .unwrap();
    let chain = Unpacker::new()
        .apply_layers(
            &img.layers,
            &sn,
            &ContentApplier::new(store.clone()),
            &UnpackOpts { max_parallel },
        )
        .unwrap();
    let mounts = sn.view("v", chain.as_ref(), &Labels::new()).unwrap();
    let target = dir.join(format!("view-{max_parallel}"));
    std::fs::create_dir_all(&target).unwrap();
    let guard = MountGuard::mount(&mounts, &target).unwrap();
    let out = ["home", "home/u", "home/u/a", "srv", "srv/x"]
        .iter()
        .map(|d| {
            let p = target.join(d);
            let md = std::fs::symlink_metadata(&p).unwrap();
            let private = rustix::fs::lgetxattr(&p, "user.private", &mut [0u8; 16]).is_ok();
            (
                d.to_string(),
                md.mode() & 0o7777,
                md.uid(),
                md.mtime(),
                private,
            )
        })
        .collect::<Vec<_>>();
    assert!(!target.join("home/u/gone").exists());
    assert!(target.join("home/u/a/newer").exists());
    guard.unmount().unwrap();
    sn.remove("v").unwrap();
    out
}

#[test]
fn parallel_unpack_gives_implicit_parents_the_metadata_of_the_layers_below() {
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::create(&dir.path().join("image")).unwrap();
    image(&store);
    let ordered = unpack(dir.path(), &store, 1);
    let expected = vec![
        ("home".to_string(), 0o711, 0, 1000, false),
        ("home/u".to_string(), 0o700, 1000, 2000, true),
        ("home/u/a".to_string(), 0o750, 1000, 3000, false),
        ("srv".to_string(), 0o700, 5, 5000, false),
        ("srv/x".to_string(), 0o701, 7, 7000, false),
    ];
    assert_eq!(ordered, expected, "unpack in order");
    assert_eq!(unpack(dir.path(), &store, 4), expected, "parallel unpack");
}
