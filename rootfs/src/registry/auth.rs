//! Registry authentication: docker config credentials and `WWW-Authenticate` challenges.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use tracing::debug;

use crate::{Error, Result};

/// A user name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password (or token).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic …` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", STANDARD.encode(raw))
    }
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The docker config file used when none is configured: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`, if it exists.
pub fn default_docker_config() -> Option<PathBuf> {
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".docker")
            .join("config.json"),
    };
    path.is_file().then_some(path)
}

/// Reads the `auths` of a docker config file: host (`host[:port]`) → credentials. Entries keyed
/// by a URL (`https://index.docker.io/v1/`) are keyed by its host; Docker Hub's entries are
/// also filed under `docker.io` and `registry-1.docker.io`. Credential helpers are not run.
pub fn load_docker_config(path: &Path) -> Result<HashMap<String, Credentials>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("read docker config {}", path.display()), e))?;
    let config: DockerConfig = serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidArgument(format!("docker config {}: {e}", path.display())))?;
    let mut out = HashMap::new();
    for (key, entry) in config.auths {
        let creds = match (&entry.auth, &entry.username, &entry.password) {
            (Some(a), _, _) if !a.is_empty() => {
                let decoded = STANDARD.decode(a.trim()).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "docker config {}: auth of {key:?} is not base64: {e}",
                        path.display()
                    ))
                })?;
                let text = String::from_utf8(decoded).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "docker config {}: auth of {key:?} is not UTF-8",
                        path.display()
                    ))
                })?;
                let Some((u, p)) = text.split_once(':') else {
                    return Err(Error::InvalidArgument(format!(
                        "docker config {}: auth of {key:?} is not user:password",
                        path.display()
                    )));
                };
                Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            }
            (_, Some(u), Some(p)) => Credentials {
                username: u.clone(),
                password: p.clone(),
            },
            _ => {
                debug!(host = %key, "docker config entry without credentials, ignored");
                continue;
            }
        };
        let host = host_of_key(&key);
        if matches!(
            host.as_str(),
            "index.docker.io" | "docker.io" | "registry-1.docker.io"
        ) {
            for alias in ["docker.io", "registry-1.docker.io", "index.docker.io"] {
                out.insert(alias.to_string(), creds.clone());
            }
        } else {
            out.insert(host, creds);
        }
    }
    Ok(out)
}

/// `https://host:port/v1/` → `host:port`; `host` stays.
fn host_of_key(key: &str) -> String {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Bearer realm=…,service=…,scope=…`: get a token from `realm`.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` parameter, if given.
        service: Option<String>,
        /// The `scope` parameter, if given.
        scope: Option<String>,
    },
    /// `Basic realm=…`: send the credentials with each request.
    Basic,
}

/// Parses the first Bearer or Basic challenge of a `WWW-Authenticate` header value.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, params) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(params);
    let realm = params.get("realm")?.clone();
    Some(Challenge::Bearer {
        realm,
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `a="x, y",b=z` → {a: "x, y", b: z} (keys lowercased).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next().is_none() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    out
}

/// The JSON a token endpoint answers with.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn reads_docker_config_auths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},
                "https://index.docker.io/v1/":{{"username":"bob","password":"pw"}},
                "empty.io":{{}}}},"credsStore":"desktop"}}"#
            ),
        )
        .unwrap();
        let creds = load_docker_config(&path).unwrap();
        assert_eq!(creds["127.0.0.1:5000"].username, "alice");
        assert_eq!(creds["127.0.0.1:5000"].password, "s3cr:et");
        assert_eq!(creds["docker.io"].username, "bob");
        assert_eq!(creds["registry-1.docker.io"].password, "pw");
        assert!(!creds.contains_key("empty.io"));
        assert!(!format!("{:?}", creds["docker.io"]).contains("pw"));
    }
}
