//! The snapshot labels naming a remote layer, and their resolution.
//!
//! Three spellings are understood, per layer field the first one present wins:
//!
//! | field | strata | CRI | stargz |
//! |---|---|---|---|
//! | image reference | [`LABEL_STRATA_IMAGE_REF`] | [`LABEL_CRI_IMAGE_REF`] | [`LABEL_STARGZ_REFERENCE`] |
//! | layer digest | [`LABEL_LAYER_DIGEST`] | [`LABEL_CRI_LAYER_DIGEST`] | [`LABEL_STARGZ_DIGEST`] |
//! | image layers | — | [`LABEL_CRI_IMAGE_LAYERS`] | [`LABEL_STARGZ_LAYERS`] |
//!
//! plus [`LABEL_TOC_DIGEST`] (the digest of the layer's TOC JSON, from the manifest's layer
//! annotation), [`LABEL_STARGZ_SKIP_VERIFY`] and [`LABEL_STARGZ_PREFETCH`].

use fs_plugin_api::model::{Error, Labels, Result};
use rootfs::registry::Reference;
use snapshot_core::identity::Digest;

pub use fs_plugin_api::{LABEL_CRI_LAYER_DIGEST, LABEL_LAYER_DIGEST, LABEL_STARGZ_DIGEST};

/// strata's label with the image reference the layer belongs to (`host/repo:tag` or `@digest`).
pub const LABEL_STRATA_IMAGE_REF: &str = fs_plugin_api::LABEL_IMAGE_REF;
/// The CRI plugin's label with the image reference.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// stargz-snapshotter's label with the image reference.
pub const LABEL_STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// The CRI plugin's label with the image's layer digests (comma-separated).
pub const LABEL_CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// stargz-snapshotter's label with the image's layer digests (comma-separated).
pub const LABEL_STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
/// The digest of the layer's TOC JSON (the manifest's layer annotation, forwarded as a label).
pub const LABEL_TOC_DIGEST: &str = rootfs::estargz::TOC_DIGEST_ANNOTATION;
/// Present: the layer may be mounted without TOC digest (if the plugin allows it).
pub const LABEL_STARGZ_SKIP_VERIFY: &str = "containerd.io/snapshot/remote/stargz.skipverify";
/// Bytes to prefetch at mount time (overrides the plugin's `prefetch_bytes`).
pub const LABEL_STARGZ_PREFETCH: &str = "containerd.io/snapshot/remote/stargz.prefetch";

/// A layer as its labels name it.
#[derive(Debug, Clone)]
pub struct LayerSource {
    /// The image it belongs to (its repository is where the blob is fetched from).
    pub reference: Reference,
    /// The layer (blob) digest.
    pub digest: Digest,
    /// The TOC digest the manifest promises, if given.
    pub toc_digest: Option<Digest>,
    /// The skipverify label is present.
    pub skip_verify: bool,
    /// The prefetch size the labels ask for.
    pub prefetch: Option<u64>,
    /// The image's layer digests, when given (informational).
    pub image_layers: Vec<String>,
}

fn first<'a>(labels: &'a Labels, keys: &[&'static str]) -> Option<(&'static str, &'a str)> {
    keys.iter()
        .find_map(|&k| labels.get(k).map(|v| (k, v.as_str())))
}

fn parse_digest(what: &str, s: &str) -> Result<Digest> {
    let invalid = || Error::InvalidArgument(format!("{what} {s:?}: expected sha256:<64 hex>"));
    let d: Digest = s.parse().map_err(|_| invalid())?;
    if d.algorithm().as_ref() != "sha256" || d.digest().len() != 64 {
        return Err(invalid());
    }
    Ok(d)
}

impl LayerSource {
    /// Resolves the layer `labels` name; labels naming none (or malformed ones) are an invalid
    /// argument.
    pub fn from_labels(labels: &Labels) -> Result<LayerSource> {
        let digest = fs_plugin_api::layer_digest(labels).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no layer digest in the labels (expected {LABEL_LAYER_DIGEST}, \
                 {LABEL_CRI_LAYER_DIGEST} or {LABEL_STARGZ_DIGEST})"
            ))
        })?;
        let digest = parse_digest("layer digest", digest)?;
        let (ref_key, reference) = first(
            labels,
            &[
                LABEL_STRATA_IMAGE_REF,
                LABEL_CRI_IMAGE_REF,
                LABEL_STARGZ_REFERENCE,
            ],
        )
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer {digest}: no image reference in the labels (expected \
                 {LABEL_STRATA_IMAGE_REF}, {LABEL_CRI_IMAGE_REF} or {LABEL_STARGZ_REFERENCE})"
            ))
        })?;
        let reference = Reference::parse(reference)
            .map_err(|e| Error::InvalidArgument(format!("label {ref_key}: {e}")))?;
        let toc_digest = labels
            .get(LABEL_TOC_DIGEST)
            .map(|d| parse_digest(&format!("label {LABEL_TOC_DIGEST}"), d))
            .transpose()?;
        let prefetch = labels
            .get(LABEL_STARGZ_PREFETCH)
            .map(|p| {
                p.trim().parse::<u64>().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "label {LABEL_STARGZ_PREFETCH} {p:?}: expected a number of bytes"
                    ))
                })
            })
            .transpose()?;
        let image_layers = first(labels, &[LABEL_CRI_IMAGE_LAYERS, LABEL_STARGZ_LAYERS])
            .map(|(_, v)| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(LayerSource {
            reference,
            digest,
            toc_digest,
            skip_verify: labels.contains_key(LABEL_STARGZ_SKIP_VERIFY),
            prefetch,
            image_layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fs_plugin_api::model::ErrorKind;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const T: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stargz_labels_name_a_layer() {
        let s = LayerSource::from_labels(&labels(&[
            (LABEL_STARGZ_REFERENCE, "127.0.0.1:5000/app:1"),
            (LABEL_STARGZ_DIGEST, D1),
            (LABEL_TOC_DIGEST, T),
            (LABEL_STARGZ_LAYERS, &format!("{D1},{D2}")),
            (LABEL_STARGZ_PREFETCH, "4096"),
        ]))
        .unwrap();
        assert_eq!(s.reference.registry, "127.0.0.1:5000");
        assert_eq!(s.reference.repository, "app");
        assert_eq!(s.digest.to_string(), D1);
        assert_eq!(s.toc_digest.unwrap().to_string(), T);
        assert_eq!(s.prefetch, Some(4096));
        assert_eq!(s.image_layers, [D1, D2]);
        assert!(!s.skip_verify);
    }

    #[test]
    fn cri_labels_win_over_stargz_and_strata_over_both() {
        let mut l = labels(&[
            (LABEL_STARGZ_REFERENCE, "127.0.0.1:5000/stargz:1"),
            (LABEL_STARGZ_DIGEST, D1),
            (LABEL_CRI_IMAGE_REF, "127.0.0.1:5000/cri:1"),
            (LABEL_CRI_LAYER_DIGEST, D2),
            (LABEL_STARGZ_SKIP_VERIFY, "true"),
        ]);
        let s = LayerSource::from_labels(&l).unwrap();
        assert_eq!(
            (s.reference.repository.as_str(), s.digest.to_string()),
            ("cri", D2.to_string())
        );
        assert!(s.skip_verify);
        l.insert(
            LABEL_STRATA_IMAGE_REF.into(),
            "127.0.0.1:5000/strata:1".into(),
        );
        l.insert(LABEL_LAYER_DIGEST.into(), D1.into());
        let s = LayerSource::from_labels(&l).unwrap();
        assert_eq!(
            (s.reference.repository.as_str(), s.digest.to_string()),
            ("strata", D1.to_string())
        );
    }

    #[test]
    fn missing_or_malformed_labels_are_invalid_arguments() {
        for (l, says) in [
            (labels(&[]), "no layer digest"),
            (labels(&[(LABEL_STARGZ_DIGEST, D1)]), "no image reference"),
            (
                labels(&[
                    (LABEL_STARGZ_DIGEST, "sha256:abc"),
                    (LABEL_STARGZ_REFERENCE, "a/b:1"),
                ]),
                "layer digest",
            ),
            (
                labels(&[(LABEL_STARGZ_DIGEST, D1), (LABEL_STARGZ_REFERENCE, "A B")]),
                LABEL_STARGZ_REFERENCE,
            ),
            (
                labels(&[
                    (LABEL_STARGZ_DIGEST, D1),
                    (LABEL_STARGZ_REFERENCE, "a/b:1"),
                    (LABEL_TOC_DIGEST, "nope"),
                ]),
                LABEL_TOC_DIGEST,
            ),
            (
                labels(&[
                    (LABEL_STARGZ_DIGEST, D1),
                    (LABEL_STARGZ_REFERENCE, "a/b:1"),
                    (LABEL_STARGZ_PREFETCH, "lots"),
                ]),
                LABEL_STARGZ_PREFETCH,
            ),
        ] {
            let e = LayerSource::from_labels(&l).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            assert!(e.to_string().contains(says), "{says}: {e}");
        }
    }
}
