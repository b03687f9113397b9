//! `strata pull`: fetch an image from an OCI registry into the content store at
//! `<root>/content` (digest-verified), record it under its reference, and unpack it.
//!
//! [`fetch_image`] asks a per-layer hook ([`LayerPlan`]) whether to fetch each layer blob, so a
//! lazy pull can skip the layers a remote file system will serve.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use oci_spec::image::{Arch, Descriptor, Digest, ImageIndex, ImageManifest, Os};
use rootfs::applier::{ContentApplier, ProgressFn};
use rootfs::content::{ContentStore, error_from_io};
use rootfs::registry::{Reference, Registry, RegistryOptions};
use rootfs::{Applier, UnpackOpts, Unpacker};
use snapshot_core::Mount;
use snapshot_core::Snapshotter;

use crate::commands::{MountOpts, Settings, mount_image, open_snapshotter, require_root, unpack};
use crate::image_ref::ImageRef;
use crate::progress::Progress;

/// Options of `strata pull`.
#[derive(Debug, Clone, Default)]
pub struct PullOpts {
    /// Talk plain HTTP to the image's registry.
    pub plain_http: bool,
    /// Client options (hosts, mirrors, docker config, ...); `plain_http` is added on top.
    pub registry: RegistryOptions,
    /// Leave eStargz layers in the registry for the configured backing file system to mount
    /// (fetching a layer only if it cannot be mounted).
    pub lazy: bool,
}

/// What to do with one layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPlan {
    /// Download it into the content store (unless it is there already).
    Fetch,
    /// Leave it in the registry (e.g. a remote file system will serve it).
    Skip,
}

/// An image whose manifest and config are in the content store.
#[derive(Debug)]
pub struct Fetched {
    /// The image manifest (for the host platform, when the reference named an index).
    pub manifest: ImageManifest,
    /// Its digest as the registry serves it.
    pub manifest_digest: Digest,
    /// What the hook decided for each layer, in manifest order.
    pub plans: Vec<LayerPlan>,
}

/// The content store of a state directory.
pub fn content_dir(root: &Path) -> PathBuf {
    root.join("content")
}

/// `strata pull`: fetch everything, record the image as `<reference>` in `<root>/content`,
/// unpack it and print its chain ID; then mount it if asked.
pub fn run(
    settings: &Settings,
    reference: &str,
    opts: &PullOpts,
    mount: Option<&MountOpts>,
) -> Result<()> {
    if mount.is_some() {
        require_root()?;
    }
    if opts.lazy && !settings.has_filesystem() {
        bail!(
            "--lazy needs a backing file system that mounts registry layers: \
             name one in the config ([filesystem] plugin = \"http\")"
        );
    }
    let r = Reference::parse(reference)?;
    let registry = Registry::new(registry_options(&r, opts)).context("registry client")?;
    let content = content_dir(&settings.root);
    let store = ContentStore::create(&content)
        .with_context(|| format!("open content store {}", content.display()))?;
    let progress = Progress::new();
    let fetched = fetch_image(
        &registry,
        &r,
        &store,
        &progress.callback(),
        &mut |_, desc| {
            Ok(if opts.lazy && is_lazy_layer(desc) {
                LayerPlan::Skip
            } else {
                LayerPlan::Fetch
            })
        },
    )?;
    let name = r.to_string();
    let added = if opts.lazy {
        store.add_lazy_image(&fetched.manifest, Some(&name))
    } else {
        store.add_image(&fetched.manifest, Some(&name))
    };
    added.with_context(|| format!("record {name} in {}", content.display()))?;
    let stats = registry.stats();
    let skipped = fetched
        .plans
        .iter()
        .filter(|p| **p == LayerPlan::Skip)
        .count();
    eprintln!(
        "pulled {name} (manifest {}, {skipped} layers left remote): {} bytes in {} requests; \
         image {}@{}",
        fetched.manifest_digest,
        stats.bytes_received,
        stats.requests,
        content.display(),
        fetched.manifest_digest
    );
    let sn = open_snapshotter(settings)?;
    let chain = if opts.lazy {
        unpack_lazily(&sn, &registry, &r, &content, &name, &progress)?
    } else {
        let image = ImageRef {
            layout: content,
            reference: Some(name),
        };
        unpack(&sn, &image, settings.has_filesystem())?
    };
    println!("{chain}");
    if let Some(m) = mount {
        mount_image(&sn, &chain, m)?;
    }
    sn.close()?;
    Ok(())
}

/// Whether a layer can be mounted lazily: eStargz with its TOC digest in the manifest.
fn is_lazy_layer(desc: &Descriptor) -> bool {
    desc.annotations()
        .as_ref()
        .is_some_and(|a| a.contains_key(rootfs::estargz::TOC_DIGEST_ANNOTATION))
}

/// Unpacks image `name` of `content` layer by layer, asking the backing file system to mount
/// each layer from the registry (the image reference travels as a label); a layer it cannot
/// mount is fetched and unpacked.
fn unpack_lazily(
    sn: &dyn Snapshotter,
    registry: &Registry,
    r: &Reference,
    content: &Path,
    name: &str,
    progress: &Arc<Progress>,
) -> Result<Digest> {
    let store = ContentStore::open(content)?;
    let mut image = store.resolve(Some(name))?;
    let neighbours = layers_label(&image.layers);
    for layer in &mut image.layers {
        let mut annotations = layer.blob.annotations().clone().unwrap_or_default();
        annotations.insert(fs_plugin_api::LABEL_IMAGE_REF.to_string(), name.to_string());
        annotations.insert(LABEL_LAYERS.to_string(), neighbours.clone());
        layer.blob.set_annotations(Some(annotations));
    }
    let applier = FetchingApplier {
        registry,
        r,
        store: ContentStore::open(content)?,
        progress: progress.callback(),
        inner: ContentApplier::new(store).with_progress(progress.callback()),
    };
    // Remote layers need their parent in place: one layer at a time, bottom first.
    let chain = Unpacker::new()
        .apply_layers(&image.layers, sn, &applier, &UnpackOpts { max_parallel: 1 })
        .context("unpack")?;
    Ok(chain)
}

/// stargz's label with the image's layer digests: the plugin fetches the other layers' TOCs
/// while the first one mounts.
const LABEL_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";

/// The comma-separated layer digests, as many as fit in one label (containerd's size limit).
fn layers_label(layers: &[rootfs::Layer]) -> String {
    let room = snapshot_core::MAX_LABEL_SIZE - LABEL_LAYERS.len();
    let mut out = String::new();
    for l in layers {
        let d = l.blob.digest().to_string();
        if out.len() + d.len() + 1 > room {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&d);
    }
    out
}

/// Downloads a layer blob into the content store when asked to apply it (a layer the backing
/// file system could not mount), then applies it.
struct FetchingApplier<'a> {
    registry: &'a Registry,
    r: &'a Reference,
    store: ContentStore,
    progress: Arc<ProgressFn>,
    inner: ContentApplier,
}

impl Applier for FetchingApplier<'_> {
    fn apply(&self, blob: &Descriptor, mounts: &[Mount]) -> rootfs::Result<Descriptor> {
        fetch_blob(
            self.registry,
            self.r,
            &self.store,
            blob,
            Some(&self.progress),
        )
        .map_err(|e| {
            rootfs::Error::io(
                format!("fetch layer {}", blob.digest()),
                io::Error::other(format!("{e:#}")),
            )
        })?;
        self.inner.apply(blob, mounts)
    }
}

/// `opts.registry` with `plain_http` set for `r`'s registry when asked.
fn registry_options(r: &Reference, opts: &PullOpts) -> RegistryOptions {
    let mut o = opts.registry.clone();
    if opts.plain_http {
        o.hosts.entry(r.registry.clone()).or_default().plain_http = true;
    }
    o
}

/// Fetches `r`'s manifest (following an index to the host platform's), its config and — as
/// `plan` decides per layer (index, descriptor) — its layer blobs into `store`, verifying every
/// digest. The manifest's own bytes are stored too (so its registry digest resolves).
pub fn fetch_image(
    registry: &Registry,
    r: &Reference,
    store: &ContentStore,
    progress: &Arc<ProgressFn>,
    plan: &mut dyn FnMut(usize, &Descriptor) -> Result<LayerPlan>,
) -> Result<Fetched> {
    let mut m = registry
        .manifest(r)
        .with_context(|| format!("fetch manifest of {r}"))?;
    if m.is_index() {
        let index: ImageIndex = serde_json::from_slice(&m.bytes)
            .with_context(|| format!("{r}: invalid image index"))?;
        let digest = pick_platform(&index).ok_or_else(|| {
            anyhow!(
                "{r}: the image index has no manifest for {}/{}",
                Os::default(),
                Arch::default()
            )
        })?;
        m = registry
            .manifest(&r.with_digest(digest.clone()))
            .with_context(|| format!("fetch manifest {digest} of {r}"))?;
        if m.is_index() {
            bail!("{r}: nested image indexes are not supported");
        }
    }
    let manifest: ImageManifest = serde_json::from_slice(&m.bytes)
        .with_context(|| format!("{r}: invalid image manifest ({})", m.media_type))?;
    store_bytes(store, &m.bytes, &m.digest)?;
    fetch_blob(registry, r, store, manifest.config(), None)
        .with_context(|| format!("fetch config of {r}"))?;
    let mut plans = Vec::with_capacity(manifest.layers().len());
    for (i, layer) in manifest.layers().iter().enumerate() {
        let p = plan(i, layer)?;
        if p == LayerPlan::Fetch {
            fetch_blob(registry, r, store, layer, Some(progress))
                .with_context(|| format!("fetch layer {i} ({}) of {r}", layer.digest()))?;
        }
        plans.push(p);
    }
    Ok(Fetched {
        manifest,
        manifest_digest: m.digest,
        plans,
    })
}

/// The manifest of `index` for this host (linux/<arch>).
fn pick_platform(index: &ImageIndex) -> Option<&Digest> {
    let (os, arch) = (Os::default(), Arch::default());
    index
        .manifests()
        .iter()
        .find(|d| {
            d.platform()
                .as_ref()
                .is_some_and(|p| *p.os() == os && *p.architecture() == arch)
        })
        .map(|d| d.digest())
}

fn store_bytes(store: &ContentStore, bytes: &[u8], digest: &Digest) -> Result<()> {
    if store.contains(digest)? {
        return Ok(());
    }
    let mut w = store.writer()?;
    io::Write::write_all(&mut w, bytes).context("write a blob")?;
    w.commit(Some(digest))?;
    Ok(())
}

/// Downloads `desc` into `store` unless it is there, verified against its digest and size.
fn fetch_blob(
    registry: &Registry,
    r: &Reference,
    store: &ContentStore,
    desc: &Descriptor,
    progress: Option<&Arc<ProgressFn>>,
) -> Result<()> {
    if store.contains(desc.digest())? {
        tracing::debug!(digest = %desc.digest(), "blob already in the content store");
        if let Some(p) = progress {
            p(desc, desc.size());
        }
        return Ok(());
    }
    let stream = registry.fetch_blob(r, desc.digest())?;
    let mut reader = ProgressReader {
        inner: stream,
        desc,
        progress,
        read: 0,
        reported: 0,
    };
    let mut w = store.writer()?;
    io::copy(&mut reader, &mut w).map_err(|e| error_from_io(e, "download"))?;
    if w.written() != desc.size() {
        bail!(
            "blob {}: the manifest says {} bytes, the registry sent {}",
            desc.digest(),
            desc.size(),
            w.written()
        );
    }
    w.commit(Some(desc.digest()))?;
    if let Some(p) = progress
        && reader.reported < desc.size()
    {
        p(desc, desc.size());
    }
    Ok(())
}

/// Reports download progress every 1 MiB.
struct ProgressReader<'a> {
    inner: Box<dyn Read + Send>,
    desc: &'a Descriptor,
    progress: Option<&'a Arc<ProgressFn>>,
    read: u64,
    reported: u64,
}

impl Read for ProgressReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if let Some(p) = self.progress
            && (self.read - self.reported >= 1 << 20 || (n == 0 && self.read > self.reported))
            && self.read < self.desc.size()
        {
            p(self.desc, self.read);
            self.reported = self.read;
        }
        Ok(n)
    }
}
