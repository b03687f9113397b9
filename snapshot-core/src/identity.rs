//! Content identities: digests and containerd's chain IDs.

use sha2::{Digest as _, Sha256};

pub use oci_spec::image::Digest;

use crate::{Error, Result};

/// Parses a digest (`algorithm:hex`), rejecting malformed input with InvalidArgument.
pub fn parse_digest(s: &str) -> Result<Digest> {
    s.parse::<Digest>()
        .map_err(|e| Error::InvalidArgument(format!("invalid digest {s:?}: {e}")))
}

/// The `sha256:<hex>` digest of `data`.
pub fn sha256_digest(data: &[u8]) -> Digest {
    digest_from_hasher(Sha256::new_with_prefix(data))
}

/// Finishes a SHA-256 hasher into a typed digest.
pub fn digest_from_hasher(hasher: Sha256) -> Digest {
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // A sha256 hex string always forms a valid digest.
    Digest::try_from(format!("sha256:{hex}")).expect("sha256 hex is a valid digest")
}

/// The chain ID of a layer stacked on `parent` (the chain ID of the layers below it, if any):
/// `ChainID(L0) = DiffID(L0)`, `ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))`.
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => diff_id.clone(),
        Some(p) => sha256_digest(format!("{p} {diff_id}").as_bytes()),
    }
}

/// The chain IDs of every prefix of `diff_ids`, bottom layer first.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = chain_id(out.last(), d);
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        parse_digest(s).unwrap()
    }

    #[test]
    fn chain_id_matches_containerd_definition() {
        // Values from the OCI image spec's chain ID example
        // (image-spec config.md: ChainID(A|B) = sha256(ChainID(A) + " " + DiffID(B))).
        let a = d("sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4");
        let b = d("sha256:f3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4");
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        let expected = sha256_digest(format!("{a} {b}").as_bytes());
        assert_eq!(ids[1], expected);
        assert_eq!(chain_id(Some(&ids[0]), &b), expected);
    }

    #[test]
    fn known_sha256() {
        assert_eq!(
            sha256_digest(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn malformed_digests_are_invalid_argument() {
        for bad in ["", "sha256", "sha256:xyz", "sha256:ABC", "nocolon"] {
            let e = parse_digest(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
        }
    }
}
