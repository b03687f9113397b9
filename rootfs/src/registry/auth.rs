//! Registry authentication: docker config credentials and `WWW-Authenticate` challenges.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use tracing::{debug, warn};

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
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

/// The credentials a docker config gives: its `auths`, and its credential helpers
/// (`credHelpers` per host, else `credsStore`), asked once per host when a registry first wants
/// credentials. A helper's answer comes first; a helper that knows nothing of the host, fails
/// or is missing (logged) leaves the `auths` entry, if any.
#[derive(Debug, Default)]
pub struct DockerCredentials {
    auths: HashMap<String, Credentials>,
    helpers: HashMap<String, String>,
    store: Option<String>,
    /// Where helper programs are looked up (`$PATH`).
    search_path: Vec<PathBuf>,
    /// Helper answers by host.
    asked: Mutex<HashMap<String, Option<Credentials>>>,
}

impl DockerCredentials {
    /// Reads the docker config at `path`.
    pub fn load(path: &Path) -> Result<DockerCredentials> {
        let config = read_config(path)?;
        let helpers = config
            .cred_helpers
            .iter()
            .map(|(k, v)| (host_of_key(k), v.clone()))
            .collect();
        let store = config.creds_store.clone().filter(|s| !s.is_empty());
        Ok(DockerCredentials {
            auths: auths_of(config, path)?,
            helpers,
            store,
            search_path: std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
            asked: Mutex::new(HashMap::new()),
        })
    }

    /// The credentials for registry `host` (`host[:port]`), if any.
    pub fn get(&self, host: &str) -> Option<Credentials> {
        if let Some(helper) = self.helpers.get(host).or(self.store.as_ref()) {
            let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
            let answer = asked
                .entry(host.to_string())
                .or_insert_with(|| {
                    let server = server_url(host);
                    let search = &self.search_path;
                    match super::credential_helper::get(helper, &server, search, HELPER_TIMEOUT) {
                        Ok(c) => {
                            debug!(%host, %helper, found = c.is_some(), "asked a credential helper");
                            c
                        }
                        Err(e) => {
                            warn!(%host, %helper, error = %e, "credential helper failed");
                            None
                        }
                    }
                })
                .clone();
            if answer.is_some() {
                return answer;
            }
        }
        self.auths.get(host).cloned()
    }
}

/// How long a credential helper may take.
const HELPER_TIMEOUT: std::time::Duration = super::credential_helper::TIMEOUT;

/// What docker passes a credential helper for `host`: Docker Hub's historic URL, else the host.
fn server_url(host: &str) -> String {
    if is_docker_hub(host) {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    }
}

fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "index.docker.io" | "docker.io" | "registry-1.docker.io"
    )
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

fn read_config(path: &Path) -> Result<DockerConfig> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("read docker config {}", path.display()), e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidArgument(format!("docker config {}: {e}", path.display())))
}

/// Reads the `auths` of a docker config file: host (`host[:port]`) → credentials. Entries keyed
/// by a URL (`https://index.docker.io/v1/`) are keyed by its host; Docker Hub's entries are
/// also filed under `docker.io` and `registry-1.docker.io`. Credential helpers are not run
/// (see [`DockerCredentials`]).
pub fn load_docker_config(path: &Path) -> Result<HashMap<String, Credentials>> {
    auths_of(read_config(path)?, path)
}

fn auths_of(config: DockerConfig, path: &Path) -> Result<HashMap<String, Credentials>> {
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
        if is_docker_hub(&host) {
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

    #[test]
    fn credential_helpers_come_first_per_host_then_the_store_then_auths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = STANDARD.encode("file:pw");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"a.io":{{"auth":"{auth}"}},"c.io":{{"auth":"{auth}"}}}},
                "credHelpers":{{"a.io":"per-host"}},"credsStore":"store"}}"#
            ),
        )
        .unwrap();
        let answer = |user: &str| {
            format!(
                r#"read -r s; case "$s" in c.io) echo "credentials not found in native keychain"; exit 1;; esac
printf '{{"Username":"{user}-%s","Secret":"x"}}' "$s""#
            )
        };
        let per_host = super::super::credential_helper::tests::helper("per-host", &answer("h"));
        let store = super::super::credential_helper::tests::helper("store", &answer("s"));
        let mut creds = DockerCredentials::load(&path).unwrap();
        creds.search_path = vec![per_host.path().into(), store.path().into()];
        let user = |creds: &DockerCredentials, host: &str| creds.get(host).map(|c| c.username);
        assert_eq!(
            user(&creds, "a.io").as_deref(),
            Some("h-a.io"),
            "credHelpers wins"
        );
        assert_eq!(
            user(&creds, "b.io").as_deref(),
            Some("s-b.io"),
            "then credsStore"
        );
        assert_eq!(user(&creds, "c.io").as_deref(), Some("file"), "then auths");
        assert_eq!(
            user(&creds, "docker.io").as_deref(),
            Some("s-https://index.docker.io/v1/"),
            "Docker Hub is asked by its historic URL"
        );
        // A missing helper is logged; auths still apply.
        creds.search_path = vec![];
        creds.asked = Mutex::new(HashMap::new());
        assert_eq!(user(&creds, "a.io").as_deref(), Some("file"));
        assert_eq!(user(&creds, "b.io"), None);
    }
}
