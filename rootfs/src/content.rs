//! An OCI image-layout content store: `oci-layout`, `index.json` and `blobs/sha256/<hex>`.
//!
//! Every blob read through [`ContentStore::open_blob`] is verified (size and SHA-256) while it
//! streams; every blob written through [`ContentStore::writer`] is hashed while it is written,
//! fsynced and renamed into place only once complete (and, if asked, only if its digest is the
//! expected one). `index.json` is replaced atomically (temp file, fsync, rename) under an
//! exclusive `flock` on the layout directory.
//!
//! ```no_run
//! use std::path::Path;
//! use rootfs::content::ContentStore;
//! # fn demo() -> rootfs::Result<()> {
//! let store = ContentStore::open(Path::new("/srv/images/debian"))?;
//! let image = store.resolve(Some("bookworm"))?;
//! for layer in &image.layers {
//!     let mut blob = store.open_blob(&layer.blob)?; // verified while read
//!     std::io::copy(&mut blob, &mut std::io::sink())
//!         .map_err(|e| rootfs::content::error_from_io(e, "reading a layer"))?;
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::image::{
    ANNOTATION_REF_NAME, Arch, Descriptor, Digest, DigestAlgorithm, ImageConfiguration, ImageIndex,
    ImageManifest, MediaType, OciLayout, Os, PlatformBuilder,
};
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};
use snapshot_core::identity::digest_from_hasher;
use tracing::{debug, warn};

use crate::{Error, Layer, Result};

/// The name of the layout marker file.
const LAYOUT_FILE: &str = "oci-layout";
/// The name of the top-level index.
const INDEX_FILE: &str = "index.json";
/// Where blobs are written before they are complete (not part of the OCI layout).
const INGEST_DIR: &str = "ingest";
/// The image layout version written by [`ContentStore::create`].
const LAYOUT_VERSION: &str = "1.0.0";
/// The largest JSON blob (index, manifest, config) [`ContentStore::read_json`] accepts.
pub const MAX_JSON_SIZE: u64 = 16 << 20;
/// How many image indexes [`ContentStore::resolve`] follows before giving up.
const MAX_INDEX_DEPTH: usize = 8;
/// Docker's manifest list, treated as an image index.
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker's schema 2 manifest, treated as an image manifest.
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// containerd's image name annotation, matched when no `ref.name` matches.
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// An OCI image layout directory used as a content store.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

/// An image resolved from a content store: its manifest, its config and its layers.
#[derive(Debug, Clone)]
pub struct Image {
    /// The digest of the image manifest.
    pub manifest_digest: Digest,
    /// The image manifest.
    pub manifest: ImageManifest,
    /// The image configuration the manifest refers to.
    pub config: ImageConfiguration,
    /// The layers, bottom first: each manifest layer paired with its diff ID from the config
    /// (`diff` has media type `application/vnd.oci.image.layer.v1.tar`, the diff ID as digest
    /// and size 0, i.e. unknown).
    pub layers: Vec<Layer>,
}

impl ContentStore {
    /// Opens an existing image layout: `dir` must hold an `oci-layout` file with an
    /// `imageLayoutVersion` (1.x).
    pub fn open(dir: &Path) -> Result<Self> {
        let marker = dir.join(LAYOUT_FILE);
        let bytes = match fs::read(&marker) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::InvalidArgument(format!(
                    "{} is not an OCI image layout (it has no {LAYOUT_FILE} file)",
                    dir.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("read {}", marker.display()), e)),
        };
        let layout: OciLayout = serde_json::from_slice(&bytes).map_err(|e| {
            Error::InvalidArgument(format!(
                "{} is not an OCI image layout: bad {LAYOUT_FILE} file: {e}",
                dir.display()
            ))
        })?;
        let version = layout.image_layout_version();
        if !version.starts_with("1.") {
            return Err(Error::Unsupported(format!(
                "OCI image layout version {version:?} in {}",
                dir.display()
            )));
        }
        Ok(ContentStore {
            root: dir.to_path_buf(),
        })
    }

    /// Opens the image layout at `dir`, or initialises an empty one there (creating `dir` if
    /// needed): `blobs/sha256/`, an empty `index.json`, and the `oci-layout` marker last.
    pub fn create(dir: &Path) -> Result<Self> {
        if dir.join(LAYOUT_FILE).exists() {
            return ContentStore::open(dir);
        }
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs)
            .map_err(|e| Error::io(format!("create {}", blobs.display()), e))?;
        let store = ContentStore {
            root: dir.to_path_buf(),
        };
        if !dir.join(INDEX_FILE).exists() {
            let index = empty_index();
            let bytes = serde_json::to_vec(&index)
                .map_err(|e| Error::InvalidArgument(format!("encode index.json: {e}")))?;
            store.replace_file(INDEX_FILE, &bytes)?;
        }
        let marker = format!("{{\"imageLayoutVersion\":\"{LAYOUT_VERSION}\"}}");
        store.replace_file(LAYOUT_FILE, marker.as_bytes())?;
        debug!(dir = %dir.display(), "initialised an OCI image layout");
        Ok(store)
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` is (or would be) stored. Only sha256 is supported.
    pub fn blob_path(&self, digest: &Digest) -> Result<PathBuf> {
        if *digest.algorithm() != DigestAlgorithm::Sha256 {
            return Err(Error::Unsupported(format!("digest algorithm of {digest}")));
        }
        // oci-spec guarantees 64 lowercase hex characters for sha256: no path tricks.
        Ok(self.root.join("blobs").join("sha256").join(digest.digest()))
    }

    /// Whether the blob with `digest` is present (not verified).
    pub fn contains(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest)?;
        match fs::symlink_metadata(&path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
        }
    }

    /// Reads the top-level `index.json`.
    pub fn index(&self) -> Result<ImageIndex> {
        let path = self.root.join(INDEX_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::InvalidArgument(format!(
                    "{} is not an OCI image layout (it has no {INDEX_FILE})",
                    self.root.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_JSON_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        if bytes.len() as u64 > MAX_JSON_SIZE {
            return Err(Error::InvalidArgument(format!(
                "{} is larger than {MAX_JSON_SIZE} bytes",
                path.display()
            )));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::InvalidArgument(format!("invalid {}: {e}", path.display())))
    }

    /// Resolves an image named in `index.json`.
    ///
    /// * `None`: the only manifest in `index.json` (an error if there are none or several);
    /// * `"sha256:…"`: the manifest (or index) with that digest, listed in `index.json` or
    ///   merely present in the store;
    /// * anything else: a tag, matched against the `org.opencontainers.image.ref.name`
    ///   annotation (then against containerd's `io.containerd.image.name`).
    ///
    /// An image index (OCI or Docker manifest list) is followed to the manifest for the host
    /// platform (e.g. linux/amd64).
    pub fn resolve(&self, reference: Option<&str>) -> Result<Image> {
        let index = self.index()?;
        let desc = match reference {
            None => match index.manifests().as_slice() {
                [] => {
                    return Err(Error::NotFound(format!(
                        "an image in {} (its index.json lists none)",
                        self.root.display()
                    )));
                }
                [one] => one.clone(),
                many => {
                    let names: Vec<String> = many.iter().map(describe_entry).collect();
                    return Err(Error::InvalidArgument(format!(
                        "{} holds {} images ({}): name one by tag or digest",
                        self.root.display(),
                        many.len(),
                        names.join(", ")
                    )));
                }
            },
            Some(r) if looks_like_digest(r) => self.by_digest(&index, r)?,
            Some(tag) => self.by_tag(&index, tag)?,
        };
        let (manifest_digest, manifest) = self.manifest_for(desc)?;
        let config: ImageConfiguration = self.read_json(manifest.config())?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(Error::InvalidArgument(format!(
                "image {manifest_digest}: the manifest lists {} layers but the config {} diff IDs",
                manifest.layers().len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::with_capacity(diff_ids.len());
        for (i, (blob, diff_id)) in manifest.layers().iter().zip(diff_ids).enumerate() {
            let diff_id: Digest = diff_id.parse().map_err(|e| {
                Error::InvalidArgument(format!(
                    "image {manifest_digest}: diff ID {i} {diff_id:?} is not a digest: {e}"
                ))
            })?;
            layers.push(Layer {
                diff: Descriptor::new(MediaType::ImageLayer, 0, diff_id),
                blob: blob.clone(),
            });
        }
        Ok(Image {
            manifest_digest,
            manifest,
            config,
            layers,
        })
    }

    /// Opens a blob for reading; the reader verifies its size and digest as it streams.
    ///
    /// Fails with [`Error::NotFound`] if the blob is absent and with
    /// [`Error::DigestMismatch`] if the stored file's size is not `desc.size()`. See
    /// [`BlobReader`] for what happens when the content does not match.
    pub fn open_blob(&self, desc: &Descriptor) -> Result<BlobReader> {
        let path = self.blob_path(desc.digest())?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "blob {} in {}",
                    desc.digest(),
                    self.root.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        if len != desc.size() {
            return Err(Error::DigestMismatch {
                what: format!("size of blob {}", desc.digest()),
                expected: desc.size().to_string(),
                actual: len.to_string(),
            });
        }
        Ok(BlobReader {
            file,
            hasher: Sha256::new(),
            expected: desc.digest().clone(),
            size: desc.size(),
            read: 0,
            state: ReadState::Reading,
        })
    }

    /// Reads and parses a small JSON blob (index, manifest, config), verified; blobs larger than
    /// [`MAX_JSON_SIZE`] are refused.
    pub fn read_json<T: DeserializeOwned>(&self, desc: &Descriptor) -> Result<T> {
        if desc.size() > MAX_JSON_SIZE {
            return Err(Error::InvalidArgument(format!(
                "blob {} is {} bytes, more than the {MAX_JSON_SIZE} allowed for JSON",
                desc.digest(),
                desc.size()
            )));
        }
        let mut reader = self.open_blob(desc)?;
        let mut bytes = Vec::with_capacity(desc.size() as usize);
        reader
            .read_to_end(&mut bytes)
            .map_err(|e| error_from_io(e, format!("read blob {}", desc.digest())))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::InvalidArgument(format!(
                "blob {} ({}) is not the expected JSON: {e}",
                desc.digest(),
                desc.media_type()
            ))
        })
    }

    /// Starts writing a blob: a temporary file under `ingest/`, hashed as it is written.
    pub fn writer(&self) -> Result<BlobWriter> {
        let ingest = self.root.join(INGEST_DIR);
        fs::create_dir_all(&ingest)
            .map_err(|e| Error::io(format!("create {}", ingest.display()), e))?;
        let (temp, file) = create_temp(&ingest, "blob")?;
        Ok(BlobWriter {
            file: Some(BufWriter::with_capacity(256 * 1024, file)),
            temp,
            blobs: self.root.join("blobs").join("sha256"),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Stores `data` as a blob and returns its descriptor with `media_type`.
    pub fn write_blob(&self, media_type: MediaType, data: &[u8]) -> Result<Descriptor> {
        let mut w = self.writer()?;
        w.write_all(data)
            .map_err(|e| Error::io(format!("write {}", w.temp.display()), e))?;
        let (digest, size) = w.commit(None)?;
        Ok(Descriptor::new(media_type, size, digest))
    }

    /// Stores `manifest` as a blob and lists it in `index.json` (tagged `tag` if given; a tag
    /// moves from any manifest that had it). The config and layer blobs must already be in the
    /// store. When the config is an OCI or Docker image config, the index entry gets its
    /// platform. Returns the manifest's descriptor as listed.
    pub fn add_image(&self, manifest: &ImageManifest, tag: Option<&str>) -> Result<Descriptor> {
        self.add(manifest, tag, true)
    }

    /// [`ContentStore::add_image`] for an image whose layers stay in a registry (a lazy pull):
    /// only the config must be in the store.
    pub fn add_lazy_image(
        &self,
        manifest: &ImageManifest,
        tag: Option<&str>,
    ) -> Result<Descriptor> {
        self.add(manifest, tag, false)
    }

    fn add(&self, manifest: &ImageManifest, tag: Option<&str>, layers: bool) -> Result<Descriptor> {
        let layers = if layers {
            manifest.layers().as_slice()
        } else {
            &[]
        };
        for d in std::iter::once(manifest.config()).chain(layers) {
            if !self.contains(d.digest())? {
                return Err(Error::NotFound(format!(
                    "blob {} referenced by the manifest, in {}",
                    d.digest(),
                    self.root.display()
                )));
            }
        }
        if let Some(t) = tag
            && (t.is_empty() || t.contains(['\n', '\0']))
        {
            return Err(Error::InvalidArgument(format!("invalid tag {t:?}")));
        }
        let bytes = serde_json::to_vec(manifest)
            .map_err(|e| Error::InvalidArgument(format!("encode manifest: {e}")))?;
        let media_type = manifest
            .media_type()
            .clone()
            .unwrap_or(MediaType::ImageManifest);
        let mut desc = self.write_blob(media_type, &bytes)?;
        if let Some(t) = tag {
            desc.set_annotations(Some(HashMap::from([(
                ANNOTATION_REF_NAME.to_owned(),
                t.to_owned(),
            )])));
        }
        if let Some(platform) = self.platform_of(manifest) {
            desc.set_platform(Some(platform));
        }
        let added = desc.clone();
        self.update_index(|index| {
            let mut entries = index.manifests().clone();
            entries.retain(|e| {
                let same_tag = tag.is_some() && tag == ref_name(e);
                let duplicate = e.digest() == added.digest() && ref_name(e) == tag;
                !same_tag && !duplicate
            });
            entries.push(added.clone());
            index.set_manifests(entries);
        })?;
        debug!(digest = %desc.digest(), ?tag, "added image to index.json");
        Ok(desc)
    }

    /// The platform of an image config, if `manifest` has one that parses.
    fn platform_of(&self, manifest: &ImageManifest) -> Option<oci_spec::image::Platform> {
        let config = manifest.config();
        let is_image_config = match config.media_type() {
            MediaType::ImageConfig => true,
            MediaType::Other(t) => t == "application/vnd.docker.container.image.v1+json",
            _ => false,
        };
        if !is_image_config {
            return None;
        }
        let c: ImageConfiguration = self.read_json(config).ok()?;
        let mut b = PlatformBuilder::default()
            .os(c.os().clone())
            .architecture(c.architecture().clone());
        if let Some(v) = c.variant() {
            b = b.variant(v.clone());
        }
        b.build().ok()
    }

    /// Finds a manifest (or index) by digest: listed in index.json, or else present as a blob.
    fn by_digest(&self, index: &ImageIndex, reference: &str) -> Result<Descriptor> {
        let digest: Digest = reference
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("invalid digest {reference:?}: {e}")))?;
        if let Some(d) = index.manifests().iter().find(|d| *d.digest() == digest) {
            return Ok(d.clone());
        }
        let path = self.blob_path(&digest)?;
        let len = match fs::metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => {
                return Err(Error::NotFound(format!(
                    "image {digest} in {}",
                    self.root.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "image {digest} in {}",
                    self.root.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("stat {}", path.display()), e)),
        };
        // Not listed: the media type is learnt from the blob itself.
        Ok(Descriptor::new(
            MediaType::Other(String::new()),
            len,
            digest,
        ))
    }

    /// Finds the manifest (or index) tagged `tag`.
    fn by_tag(&self, index: &ImageIndex, tag: &str) -> Result<Descriptor> {
        let mut found: Vec<&Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| ref_name(d) == Some(tag))
            .collect();
        if found.is_empty() {
            found = index
                .manifests()
                .iter()
                .filter(|d| annotation(d, ANNOTATION_CONTAINERD_NAME) == Some(tag))
                .collect();
        }
        match found.as_slice() {
            [] => Err(Error::NotFound(format!(
                "image {tag:?} in {}",
                self.root.display()
            ))),
            [one] => Ok((*one).clone()),
            many => match pick_platform(many.iter().copied()) {
                Some(d) => Ok(d.clone()),
                None => Err(Error::InvalidArgument(format!(
                    "tag {tag:?} names {} manifests in {}, none for {}",
                    many.len(),
                    self.root.display(),
                    host_platform()
                ))),
            },
        }
    }

    /// Follows indexes from `desc` to a manifest for the host platform.
    fn manifest_for(&self, mut desc: Descriptor) -> Result<(Digest, ImageManifest)> {
        for _ in 0..MAX_INDEX_DEPTH {
            match kind_of(desc.media_type()) {
                Kind::Index => {
                    let index: ImageIndex = self.read_json(&desc)?;
                    desc = self.platform_manifest(&desc, &index)?;
                }
                Kind::Manifest => {
                    let manifest: ImageManifest = self.read_json(&desc)?;
                    return Ok((desc.digest().clone(), manifest));
                }
                Kind::Unknown => {
                    // Learn what it is from the document itself.
                    let value: serde_json::Value = self.read_json(&desc)?;
                    let parse_err = |e: serde_json::Error| {
                        Error::InvalidArgument(format!("blob {}: {e}", desc.digest()))
                    };
                    if value.get("manifests").is_some() {
                        let index: ImageIndex = serde_json::from_value(value).map_err(parse_err)?;
                        desc = self.platform_manifest(&desc, &index)?;
                    } else if value.get("layers").is_some() && value.get("config").is_some() {
                        let manifest: ImageManifest =
                            serde_json::from_value(value).map_err(parse_err)?;
                        return Ok((desc.digest().clone(), manifest));
                    } else {
                        return Err(Error::Unsupported(format!(
                            "blob {} of media type {:?} as an image",
                            desc.digest(),
                            desc.media_type().to_string()
                        )));
                    }
                }
            }
        }
        Err(Error::InvalidArgument(format!(
            "image indexes nested deeper than {MAX_INDEX_DEPTH} levels in {}",
            self.root.display()
        )))
    }

    /// The entry of `index` for the host platform.
    fn platform_manifest(&self, desc: &Descriptor, index: &ImageIndex) -> Result<Descriptor> {
        if let Some(d) = pick_platform(index.manifests().iter()) {
            return Ok(d.clone());
        }
        match index.manifests().as_slice() {
            [only] if only.platform().is_none() => Ok(only.clone()),
            _ => Err(Error::NotFound(format!(
                "a manifest for {} in image index {}",
                host_platform(),
                desc.digest()
            ))),
        }
    }

    /// Rewrites index.json through `change`, atomically and under the layout's lock.
    fn update_index(&self, change: impl FnOnce(&mut ImageIndex)) -> Result<()> {
        let dir = File::open(&self.root)
            .map_err(|e| Error::io(format!("open {}", self.root.display()), e))?;
        rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io(format!("lock {}", self.root.display()), e.into()))?;
        let mut index = match self.index() {
            Ok(i) => i,
            Err(_) if !self.root.join(INDEX_FILE).exists() => empty_index(),
            Err(e) => return Err(e),
        };
        change(&mut index);
        let bytes = serde_json::to_vec(&index)
            .map_err(|e| Error::InvalidArgument(format!("encode index.json: {e}")))?;
        self.replace_file(INDEX_FILE, &bytes)
        // The lock goes with `dir`.
    }

    /// Atomically replaces `root/name` with `data` (temp file, fsync, rename, fsync dir).
    fn replace_file(&self, name: &str, data: &[u8]) -> Result<()> {
        let (temp, mut file) = create_temp(&self.root, name)?;
        let result = file
            .write_all(data)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(format!("write {}", temp.display()), e))
            .and_then(|()| {
                let target = self.root.join(name);
                fs::rename(&temp, &target).map_err(|e| {
                    Error::io(
                        format!("rename {} to {}", temp.display(), target.display()),
                        e,
                    )
                })
            });
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result?;
        sync_dir(&self.root)
    }
}

/// Reads a blob, verifying it as it streams.
///
/// Never yields more than the descriptor's size. The read that reaches that size checks the
/// SHA-256 digest first: on a mismatch it fails instead of returning the last bytes. A file that
/// ends early fails too. Failures are `io::Error`s of kind `InvalidData` whose inner error is a
/// [`Error::DigestMismatch`]; [`error_from_io`] gets it back.
#[derive(Debug)]
pub struct BlobReader {
    file: File,
    hasher: Sha256,
    expected: Digest,
    size: u64,
    read: u64,
    state: ReadState,
}

#[derive(Debug, Clone)]
enum ReadState {
    Reading,
    Verified,
    Failed {
        what: String,
        expected: String,
        actual: String,
    },
}

impl BlobReader {
    /// The digest the blob must have.
    pub fn digest(&self) -> &Digest {
        &self.expected
    }

    /// The size the blob must have.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the whole blob has been read and found to match.
    pub fn is_verified(&self) -> bool {
        matches!(self.state, ReadState::Verified)
    }

    fn fail(&mut self, what: String, expected: String, actual: String) -> io::Error {
        self.state = ReadState::Failed {
            what,
            expected,
            actual,
        };
        self.current_error()
    }

    fn current_error(&self) -> io::Error {
        match &self.state {
            ReadState::Failed {
                what,
                expected,
                actual,
            } => io::Error::new(
                io::ErrorKind::InvalidData,
                Error::DigestMismatch {
                    what: what.clone(),
                    expected: expected.clone(),
                    actual: actual.clone(),
                },
            ),
            _ => io::Error::other("blob reader: no error"),
        }
    }

    /// Checks the digest once all `size` bytes are in.
    fn verify(&mut self) -> io::Result<()> {
        let hasher = std::mem::take(&mut self.hasher);
        let actual = digest_from_hasher(hasher);
        if actual == self.expected {
            self.state = ReadState::Verified;
            Ok(())
        } else {
            Err(self.fail(
                format!("blob {}", self.expected),
                self.expected.to_string(),
                actual.to_string(),
            ))
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.state {
            ReadState::Verified => return Ok(0),
            ReadState::Failed { .. } => return Err(self.current_error()),
            ReadState::Reading => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let remaining = self.size - self.read;
        if remaining == 0 {
            self.verify()?;
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = loop {
            match self.file.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Err(self.fail(
                format!("size of blob {}", self.expected),
                self.size.to_string(),
                self.read.to_string(),
            ));
        }
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if self.read == self.size {
            self.verify()?;
        }
        Ok(n)
    }
}

/// Writes a blob into the store: `Write`, then [`BlobWriter::commit`]. Dropped without a commit,
/// the temporary file is removed.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<BufWriter<File>>,
    temp: PathBuf,
    blobs: PathBuf,
    hasher: Sha256,
    written: u64,
}

impl BlobWriter {
    /// How many bytes have been written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Finishes the blob: flush, fsync, and (if its digest is `expected`, when given) rename it
    /// to `blobs/sha256/<hex>`. Returns its digest and size. On a mismatch nothing is stored and
    /// the error is [`Error::DigestMismatch`].
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        let Some(buffered) = self.file.take() else {
            return Err(Error::InvalidArgument(
                "blob writer already finished".into(),
            ));
        };
        let file = buffered
            .into_inner()
            .map_err(|e| Error::io(format!("write {}", self.temp.display()), e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io(format!("fsync {}", self.temp.display()), e))?;
        drop(file);
        let digest = digest_from_hasher(std::mem::take(&mut self.hasher));
        if let Some(expected) = expected
            && *expected != digest
        {
            // Drop removes the temporary file.
            return Err(Error::DigestMismatch {
                what: "blob written to the content store".into(),
                expected: expected.to_string(),
                actual: digest.to_string(),
            });
        }
        fs::create_dir_all(&self.blobs)
            .map_err(|e| Error::io(format!("create {}", self.blobs.display()), e))?;
        let target = self.blobs.join(digest.digest());
        fs::rename(&self.temp, &target).map_err(|e| {
            Error::io(
                format!("rename {} to {}", self.temp.display(), target.display()),
                e,
            )
        })?;
        self.temp = PathBuf::new();
        sync_dir(&self.blobs)?;
        debug!(%digest, size = self.written, "committed blob");
        Ok((digest, self.written))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("blob writer already finished"));
        };
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("blob writer already finished"));
        };
        file.write_all(buf)?;
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.temp.as_os_str().is_empty() {
            return;
        }
        drop(self.file.take());
        if let Err(e) = fs::remove_file(&self.temp)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %self.temp.display(), error = %e, "failed to remove an unfinished blob");
        }
    }
}

/// Turns an `io::Error` from a [`BlobReader`] (or a stream built on one) back into the rootfs
/// error it carries (e.g. [`Error::DigestMismatch`]); any other error becomes [`Error::Io`] with
/// `context`.
pub fn error_from_io(e: io::Error, context: impl Into<String>) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        if let Some(inner) = e.into_inner() {
            match inner.downcast::<Error>() {
                Ok(err) => return *err,
                Err(other) => return Error::io(context, io::Error::other(other)),
            }
        }
        return Error::io(context, io::Error::other("unknown error"));
    }
    Error::io(context, e)
}

enum Kind {
    Index,
    Manifest,
    Unknown,
}

fn kind_of(media_type: &MediaType) -> Kind {
    match media_type {
        MediaType::ImageIndex => Kind::Index,
        MediaType::ImageManifest => Kind::Manifest,
        MediaType::Other(t) if t == DOCKER_MANIFEST_LIST => Kind::Index,
        MediaType::Other(t) if t == DOCKER_MANIFEST => Kind::Manifest,
        _ => Kind::Unknown,
    }
}

fn empty_index() -> ImageIndex {
    let mut index = ImageIndex::default();
    index.set_schema_version(2);
    index.set_media_type(Some(MediaType::ImageIndex));
    index.set_manifests(Vec::new());
    index
}

fn annotation<'a>(d: &'a Descriptor, key: &str) -> Option<&'a str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    annotation(d, ANNOTATION_REF_NAME)
}

/// A short name of an index entry for messages: its tag, else its digest.
fn describe_entry(d: &Descriptor) -> String {
    match ref_name(d) {
        Some(t) => format!("{t:?}"),
        None => d.digest().to_string(),
    }
}

/// Whether a reference is meant as a digest (`algorithm:hex`) rather than a tag.
fn looks_like_digest(reference: &str) -> bool {
    reference
        .split_once(':')
        .is_some_and(|(alg, hex)| !alg.is_empty() && hex.len() >= 32)
}

/// The host platform as OCI names it.
fn host_platform() -> String {
    format!("{}/{}", Os::default(), Arch::default())
}

/// The first descriptor whose platform is the host's.
fn pick_platform<'a>(entries: impl Iterator<Item = &'a Descriptor>) -> Option<&'a Descriptor> {
    let (os, arch) = (Os::default(), Arch::default());
    entries.into_iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == os && *p.architecture() == arch)
    })
}

/// A unique name for temporary files of this process.
fn temp_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(".{prefix}.{}-{n}-{nanos}.tmp", std::process::id())
}

/// Creates a new temporary file in `dir`.
fn create_temp(dir: &Path, prefix: &str) -> Result<(PathBuf, File)> {
    loop {
        let path = dir.join(temp_name(prefix));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(format!("create {}", path.display()), e)),
        }
    }
}

/// fsyncs a directory so that renames into it are durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", dir.display()), e))
}
