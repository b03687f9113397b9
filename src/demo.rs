//! `strata demo`: builds a small three-layer image offline (from files on this machine), unpacks
//! it, mounts a container root filesystem and shows that layers stack and whiteouts delete.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use oci_spec::image::{
    ConfigBuilder, DescriptorBuilder, ImageConfigurationBuilder, ImageManifestBuilder, MediaType,
    RootFsBuilder,
};
use rootfs::content::ContentStore;
use rootfs::mount::MountGuard;
use snapshot_core::Snapshotter;
use snapshot_core::identity::sha256_digest;

use crate::commands::{Settings, open_snapshotter, unpack};
use crate::image_ref::ImageRef;

/// One file of a demo layer.
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
}

/// Builds an uncompressed layer tar from `entries`.
fn layer_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir(path) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty())?;
            }
            Entry::File(path, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// Stores `tar` compressed as `media_type`; returns (blob descriptor, diff ID).
fn store_layer(
    store: &ContentStore,
    tar: &[u8],
    media_type: MediaType,
) -> Result<(oci_spec::image::Descriptor, String)> {
    let diff_id = sha256_digest(tar);
    let data = match media_type {
        MediaType::ImageLayerGzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(tar)?;
            gz.finish()?
        }
        MediaType::ImageLayerZstd => zstd::encode_all(tar, 3)?,
        _ => tar.to_vec(),
    };
    let mut w = store.writer()?;
    w.write_all(&data)?;
    let (digest, size) = w.commit(None)?;
    let desc = DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest)
        .size(size)
        .build()?;
    Ok((desc, diff_id.to_string()))
}

/// Writes the demo image into the OCI layout at `dir` with tag `demo`.
pub fn build_demo_image(dir: &Path) -> Result<()> {
    let store = ContentStore::create(dir)?;
    let os_release =
        std::fs::read("/etc/os-release").unwrap_or_else(|_| b"NAME=unknown\n".to_vec());
    let layers = [
        (
            layer_tar(&[
                Entry::Dir("etc/"),
                Entry::File("etc/os-release", &os_release),
                Entry::File("etc/motd", b"this file is deleted by layer 2\n"),
                Entry::Dir("var/"),
                Entry::Dir("var/cache/"),
                Entry::File("var/cache/stale", b"hidden by layer 3's opaque directory\n"),
            ])?,
            MediaType::ImageLayerGzip,
        ),
        (
            layer_tar(&[
                Entry::File("etc/.wh.motd", b""),
                Entry::Dir("app/"),
                Entry::File("app/hello.txt", b"hello from layer 2\n"),
            ])?,
            MediaType::ImageLayerZstd,
        ),
        (
            layer_tar(&[
                Entry::Dir("var/cache/"),
                Entry::File("var/cache/.wh..wh..opq", b""),
                Entry::File("var/cache/fresh", b"written by layer 3\n"),
                Entry::File("top.txt", b"hello from the top layer\n"),
            ])?,
            MediaType::ImageLayer,
        ),
    ];
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, mt) in &layers {
        let (d, id) = store_layer(&store, tar, mt.clone())?;
        descs.push(d);
        diff_ids.push(id);
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(oci_spec::image::Arch::Amd64)
        .os(oci_spec::image::Os::Linux)
        .config(
            ConfigBuilder::default()
                .cmd(vec!["/bin/sh".to_string()])
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids)
                .build()?,
        )
        .build()?;
    let config_json = serde_json::to_vec(&config)?;
    let mut w = store.writer()?;
    w.write_all(&config_json)?;
    let (digest, size) = w.commit(None)?;
    let config_desc = DescriptorBuilder::default()
        .media_type(MediaType::ImageConfig)
        .digest(digest)
        .size(size)
        .build()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(descs)
        .build()?;
    store.add_image(&manifest, Some("demo"))?;
    Ok(())
}

/// The demo: build, unpack, mount, show, unmount.
pub fn run(settings: &Settings, keep_image: Option<&Path>) -> Result<()> {
    let work = tempfile::Builder::new().prefix("strata-demo-").tempdir()?;
    let layout = keep_image.map_or_else(|| work.path().join("image"), Path::to_path_buf);
    build_demo_image(&layout).context("build the demo image")?;
    println!(
        "built a 3-layer demo image (gzip, zstd, plain tar) in {}",
        layout.display()
    );

    let sn = open_snapshotter(settings)?;
    let image = ImageRef {
        layout: layout.clone(),
        reference: Some("demo".into()),
    };
    let chain = unpack(&sn, &image, settings.has_filesystem())?;
    println!(
        "unpacked into {}: chain ID {chain}",
        settings.root.display()
    );

    let name = format!("demo-{}", std::process::id());
    let mounts = rootfs::init_rootfs(&name, chain.as_ref(), false, &sn)?;
    let target = work.path().join("rootfs");
    std::fs::create_dir(&target)?;
    let guard = MountGuard::mount(&mounts, &target)?;
    println!("mounted a writable root filesystem at {}", target.display());

    let top = std::fs::read_to_string(target.join("top.txt")).context("read top.txt")?;
    let hello =
        std::fs::read_to_string(target.join("app/hello.txt")).context("read app/hello.txt")?;
    print!("  top.txt: {top}  app/hello.txt: {hello}");
    let motd_gone = !target.join("etc/motd").exists();
    let stale_gone = !target.join("var/cache/stale").exists();
    println!(
        "  etc/motd (whited out by layer 2): {}",
        if motd_gone { "gone" } else { "STILL THERE" }
    );
    println!(
        "  var/cache/stale (opaque dir in layer 3): {}",
        if stale_gone { "gone" } else { "STILL THERE" }
    );
    let mut listing: Vec<String> = std::fs::read_dir(&target)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    listing.sort();
    println!("  / = {}", listing.join(" "));

    guard.unmount()?;
    sn.remove(&name)?;
    sn.close()?;
    ensure!(
        top == "hello from the top layer\n",
        "top.txt has the wrong content: {top:?}"
    );
    if !(motd_gone && stale_gone) {
        bail!("whiteouts were not applied");
    }
    println!(
        "ok: layers stack, whiteouts delete; `strata --root {} ls` lists the snapshots",
        settings.root.display()
    );
    Ok(())
}
