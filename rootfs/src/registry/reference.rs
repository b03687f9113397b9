//! Image references: `[registry/]repository[:tag][@digest]`, with Docker Hub's defaults.

use std::fmt;

use oci_spec::image::Digest;

use crate::{Error, Result};

/// Docker Hub's name in references and in docker config files.
pub const DOCKER_HUB: &str = "docker.io";
/// Docker Hub's API host.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference, e.g. `127.0.0.1:5000/library/busybox:1.0` or
/// `ghcr.io/org/app@sha256:…`.
///
/// References without a registry (`busybox`, `org/app:1`) are Docker Hub's: `registry` is
/// `docker.io` (the name docker config files and [`super::RegistryOptions::hosts`] use; requests
/// go to [`Reference::api_host`], `registry-1.docker.io`) and one-component repositories get
/// the `library/` prefix. A reference with neither tag nor digest gets the tag `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]` of the registry (`docker.io` for Docker Hub).
    pub registry: String,
    /// The repository path, e.g. `library/busybox`.
    pub repository: String,
    /// The tag, if any.
    pub tag: Option<String>,
    /// The manifest digest, if any (it wins over the tag when fetching).
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses a reference; see [`Reference`] for the defaults. Fails with
    /// [`Error::InvalidArgument`] on malformed input.
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |why: &str| Error::InvalidArgument(format!("image reference {s:?}: {why}"));
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let digest: Digest = d
                    .parse()
                    .map_err(|e| bad(&format!("invalid digest {d:?}: {e}")))?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        // A ':' after the last '/' starts the tag.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(bad(&format!("invalid tag {t:?}")));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | DOCKER_HUB_API => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if !valid_host(&registry) {
            return Err(bad(&format!("invalid registry {registry:?}")));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !valid_repository(&repository) {
            return Err(bad(&format!(
                "invalid repository {repository:?} (lowercase letters, digits, and . _ - \
                 between them, in /-separated components)"
            )));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (`host[:port]`) requests go to: [`DOCKER_HUB_API`] for Docker Hub, else
    /// `registry`.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the registry's manifest endpoint for: the digest if set, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same repository with another digest (and no tag), e.g. a manifest picked from an
    /// index.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Reference::parse(s)
    }
}

fn valid_tag(t: &str) -> bool {
    let mut chars = t.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    first_ok
        && t.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(']') || host.ends_with(']') => (host, Some(port)),
        _ => (h, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    host_ok && port_ok
}

fn valid_repository(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && r.split('/').all(|component| {
            let bytes = component.as_bytes();
            let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            !bytes.is_empty()
                && bytes.first().is_some_and(alnum)
                && bytes.last().is_some_and(alnum)
                && bytes
                    .iter()
                    .all(|b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_hosts_ports_tags_and_digests() {
        let r = Reference::parse("127.0.0.1:5000/library/busybox:1.0").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("1.0"));
        assert_eq!(r.digest, None);
        assert_eq!(r.to_string(), "127.0.0.1:5000/library/busybox:1.0");

        let r = Reference::parse(&format!("localhost/a/b@{D}")).unwrap();
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().map(|d| d.to_string()).as_deref(), Some(D));
        assert_eq!(r.manifest_reference(), D);

        let r = Reference::parse(&format!("reg.io:443/x:v2@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), format!("reg.io:443/x:v2@{D}"));
    }

    #[test]
    fn docker_hub_defaults() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = Reference::parse("org/app:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "org/app")
        );
        let r = Reference::parse("docker.io/busybox:1").unwrap();
        assert_eq!(r.repository, "library/busybox");
    }

    #[test]
    fn rejects_malformed_references() {
        for bad in [
            "",
            "Reg.io/UPPER:1",
            "reg.io/a//b",
            "reg.io/a:",
            "reg.io/a:-x",
            "reg.io/a@sha256:xyz",
            "reg.io:99999/a",
            "reg.io/a-",
        ] {
            let e = Reference::parse(bad).unwrap_err();
            assert_eq!(
                e.kind(),
                snapshot_core::ErrorKind::InvalidArgument,
                "{bad}: {e}"
            );
        }
    }
}
