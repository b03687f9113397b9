//! Image references on the command line: `<oci-layout-dir>[:tag|@sha256:…]`.

use std::path::PathBuf;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The OCI image-layout directory.
    pub layout: PathBuf,
    /// A tag or a manifest digest; None picks the layout's only image.
    pub reference: Option<String>,
}

impl ImageRef {
    /// Parses `dir`, `dir:tag` or `dir@sha256:…`. A `:` followed by something containing `/`
    /// belongs to the path.
    pub fn parse(s: &str) -> ImageRef {
        if let Some((dir, digest)) = s.rsplit_once('@') {
            return ImageRef {
                layout: dir.into(),
                reference: Some(digest.to_string()),
            };
        }
        match s.rsplit_once(':') {
            Some((dir, tag)) if !tag.is_empty() && !tag.contains('/') && !dir.is_empty() => {
                ImageRef {
                    layout: dir.into(),
                    reference: Some(tag.to_string()),
                }
            }
            _ => ImageRef {
                layout: s.into(),
                reference: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tags_digests_and_plain_paths() {
        assert_eq!(ImageRef::parse("/x/img").reference, None);
        let r = ImageRef::parse("/x/img:v1");
        assert_eq!(
            (r.layout, r.reference.as_deref()),
            ("/x/img".into(), Some("v1"))
        );
        let r = ImageRef::parse("img@sha256:abc");
        assert_eq!(
            (r.layout, r.reference.as_deref()),
            ("img".into(), Some("sha256:abc"))
        );
        assert_eq!(ImageRef::parse("/a:b/c").layout, PathBuf::from("/a:b/c"));
    }
}
