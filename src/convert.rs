//! `strata convert --estargz`: rewrites an image of an OCI layout with eStargz layers (lazily
//! pullable by stargz-snapshotter and strata's http plugin) into another OCI layout.
//!
//! Every layer is converted by [`rootfs::estargz::convert_layer`]; the new layer descriptors
//! have media type `application/vnd.oci.image.layer.v1.tar+gzip` and the annotations
//! `containerd.io/snapshot/stargz/toc.digest` and `io.containers.estargz.uncompressed-size`;
//! the config (every other field kept as it was) gets the new diff IDs; the manifest is an OCI
//! manifest tagged like the source (or with the tag given to `--out DIR:TAG`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use oci_spec::image::{ANNOTATION_REF_NAME, Descriptor, ImageManifest, MediaType};
use rootfs::content::ContentStore;
use rootfs::estargz::{
    DEFAULT_CHUNK_SIZE, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, WriterOptions,
    convert_layer,
};

use crate::image_ref::ImageRef;

/// Arguments of `strata convert`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Convert the layers to eStargz (the only conversion there is; required).
    #[arg(long)]
    pub estargz: bool,
    /// The source image: `<oci-layout-dir>[:tag|@sha256:…]`.
    pub image: String,
    /// The output OCI layout directory (created if missing), optionally `:tag`.
    #[arg(long)]
    pub out: String,
    /// Files larger than this are split into chunks of this many bytes.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
    /// A file to put first in its layer, before `.prefetch.landmark` (prefetched when the layer
    /// is mounted lazily). Repeatable; order is kept.
    #[arg(long, value_name = "PATH")]
    pub prioritize: Vec<String>,
    /// A file listing prioritised files, one path per line (`#` starts a comment line); they
    /// come after those given with `--prioritize`.
    #[arg(long, value_name = "FILE")]
    pub prioritize_list: Option<PathBuf>,
    /// Gzip compression level (0-9).
    #[arg(long, default_value_t = 6)]
    pub compression_level: u32,
}

fn short(d: &str) -> &str {
    let hex = d.split_once(':').map_or(d, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

/// Runs `strata convert`; prints the new manifest's digest.
pub fn run(args: &ConvertArgs) -> Result<()> {
    if !args.estargz {
        bail!("nothing to convert to: pass --estargz");
    }
    let mut prioritized = args.prioritize.clone();
    if let Some(list) = &args.prioritize_list {
        let text = std::fs::read_to_string(list)
            .with_context(|| format!("read prioritized files list {}", list.display()))?;
        prioritized.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    let opts = WriterOptions {
        chunk_size: args.chunk_size,
        prioritized_files: prioritized,
        compression_level: args.compression_level,
    };
    let source = ImageRef::parse(&args.image);
    let store = ContentStore::open(&source.layout)
        .with_context(|| format!("open image layout {}", source.layout.display()))?;
    let img = store
        .resolve(source.reference.as_deref())
        .with_context(|| format!("resolve image in {}", source.layout.display()))?;
    let out = ImageRef::parse(&args.out);
    let out_store = ContentStore::create(&out.layout)
        .with_context(|| format!("open output layout {}", out.layout.display()))?;

    let mut layers = Vec::with_capacity(img.layers.len());
    let mut diff_ids = Vec::with_capacity(img.layers.len());
    for layer in &img.layers {
        let started = Instant::now();
        let src = &layer.blob;
        let reader = store
            .open_blob(src)
            .with_context(|| format!("open layer {}", src.digest()))?;
        let mut writer = out_store.writer()?;
        let converted = convert_layer(reader, &mut writer, &opts)
            .with_context(|| format!("convert layer {}", src.digest()))?;
        if converted.source_diff_id != *layer.diff.digest() {
            bail!(
                "layer {}: its uncompressed digest is {}, the image config says {}",
                src.digest(),
                converted.source_diff_id,
                layer.diff.digest()
            );
        }
        let (digest, size) = writer
            .commit(Some(&converted.digest))
            .with_context(|| format!("store the eStargz blob of layer {}", src.digest()))?;
        let mut annotations: HashMap<String, String> =
            src.annotations().clone().unwrap_or_default();
        annotations.insert(
            TOC_DIGEST_ANNOTATION.to_string(),
            converted.toc_digest.to_string(),
        );
        annotations.insert(
            UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
            converted.uncompressed_size.to_string(),
        );
        let mut desc = Descriptor::new(MediaType::ImageLayerGzip, size, digest.clone());
        desc.set_annotations(Some(annotations));
        layers.push(desc);
        diff_ids.push(converted.diff_id.to_string());
        let secs = started.elapsed().as_secs_f64().max(1e-6);
        eprintln!(
            "layer {} -> {}: {} -> {} bytes in {:.2}s ({:.1} MB/s)",
            short(src.digest().as_ref()),
            short(digest.as_ref()),
            src.size(),
            size,
            secs,
            src.size() as f64 / secs / 1e6
        );
    }

    // The config as JSON, so that fields this program does not model are kept.
    let mut config: serde_json::Value = store
        .read_json(img.manifest.config())
        .context("read the image config")?;
    let Some(rootfs) = config.get_mut("rootfs").and_then(|r| r.as_object_mut()) else {
        bail!("the image config has no rootfs");
    };
    rootfs.insert("diff_ids".into(), serde_json::json!(diff_ids));
    let config_bytes = serde_json::to_vec(&config).context("encode the image config")?;
    let config_desc = out_store.write_blob(MediaType::ImageConfig, &config_bytes)?;

    let mut manifest: ImageManifest = img.manifest.clone();
    manifest.set_media_type(Some(MediaType::ImageManifest));
    manifest.set_config(config_desc);
    manifest.set_layers(layers);
    let tag = out
        .reference
        .clone()
        .or_else(|| source_tag(&store, &source));
    let desc = out_store
        .add_image(&manifest, tag.as_deref())
        .with_context(|| format!("add the image to {}", out.layout.display()))?;
    println!("{}", desc.digest());
    Ok(())
}

/// The source's tag: the one named, or the ref name of the layout's only image.
fn source_tag(store: &ContentStore, source: &ImageRef) -> Option<String> {
    match &source.reference {
        Some(r) if !r.starts_with("sha256:") => Some(r.clone()),
        Some(_) => None,
        None => {
            let index = store.index().ok()?;
            match index.manifests().as_slice() {
                [one] => one
                    .annotations()
                    .as_ref()?
                    .get(ANNOTATION_REF_NAME)
                    .cloned(),
                _ => None,
            }
        }
    }
}
