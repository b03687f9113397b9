//! An OCI registry client (distribution API v2) over blocking HTTP (`ureq`).
//!
//! [`Registry`] fetches manifests ([`Registry::manifest`]), whole blobs
//! ([`Registry::fetch_blob`], verified as they stream) and opens blobs for random access by HTTP
//! `Range` requests ([`Registry::blob`] → [`Blob`]). What it does for every request:
//!
//! - **Endpoints**: a host's mirrors ([`HostOptions::mirrors`]) are tried in order, then the
//!   host itself; `http://` when [`HostOptions::plain_http`], else `https://`.
//! - **Auth**: on `401` with a `Bearer` challenge, a token is fetched from the challenge's realm
//!   (with the docker config's credentials for the host, when it has some: its credential
//!   helper's, else its `auths`) and cached per (host, scope); a `Basic` challenge uses the
//!   docker config's credentials. `401`/`403` after that is
//!   [`Error::PermissionDenied`].
//! - **Redirects** (301/302/303/307/308) are followed, up to 5; `Authorization` is only sent to
//!   the endpoint itself, never to the (storage) host a registry redirects to.
//! - **Retries**: connection errors, timeouts, `429` and `5xx` are retried with exponential
//!   backoff ([`RegistryOptions::retries`]); once they are exhausted the error is
//!   [`Error::Unavailable`]. `404` is [`Error::NotFound`].
//! - **Bounded concurrency**: at most [`RegistryOptions::max_in_flight`] requests of one
//!   [`Registry`] (and its clones) are in flight; one `ureq` agent per registry reuses
//!   connections.
//!
//! ```no_run
//! use rootfs::registry::{Reference, Registry, RegistryOptions, HostOptions};
//! # fn demo() -> rootfs::Result<()> {
//! let mut opts = RegistryOptions::default();
//! opts.hosts.insert("127.0.0.1:5000".into(), HostOptions { plain_http: true, ..Default::default() });
//! let registry = Registry::new(opts)?;
//! let r = Reference::parse("127.0.0.1:5000/library/busybox:1.0")?;
//! let manifest = registry.manifest(&r)?;
//! # let layer_digest = manifest.digest.clone();
//! let blob = registry.blob(&r, &layer_digest, None)?;
//! let mut footer = vec![0; 51];
//! blob.read_at(blob.size() - 51, &mut footer)?;
//! # Ok(())
//! # }
//! ```

pub mod auth;
mod blob;
mod credential_helper;
mod reference;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use oci_spec::image::{Digest, DigestAlgorithm};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use snapshot_core::identity::digest_from_hasher;
use tracing::{debug, warn};
use ureq::Agent;
use ureq::http::{Response, Uri};

pub use blob::{Blob, MAX_MERGED, MERGE_GAP};
pub use reference::{DOCKER_HUB, DOCKER_HUB_API, Reference};

use crate::content::MAX_JSON_SIZE;
use crate::{Error, Result};
use auth::{Challenge, Credentials, DockerCredentials, TokenResponse};

/// OCI image manifest media type.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// How many redirects a request follows.
const MAX_REDIRECTS: usize = 5;
/// First retry delay; doubled on every retry, capped at [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Options of a [`Registry`] client. Deserializes from JSON/TOML with every field optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryOptions {
    /// Per-host options, keyed by `host[:port]` as in references (`docker.io` for Docker Hub);
    /// hosts not listed use [`HostOptions::default`] (HTTPS, no mirrors).
    pub hosts: BTreeMap<String, HostOptions>,
    /// A docker-style `config.json`: `auths`, and credential helpers (`credHelpers`,
    /// `credsStore`: `docker-credential-<name>` on `$PATH`). `None`:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, when present.
    pub docker_config: Option<PathBuf>,
    /// At most this many HTTP requests in flight per client (and its clones). Default 8.
    pub max_in_flight: usize,
    /// Timeout of each HTTP request, in seconds (the whole exchange, body included). Default 30.
    pub timeout_secs: u64,
    /// Retries (with exponential backoff from 100 ms) of transient failures: connection errors,
    /// timeouts, 429 and 5xx. Default 3.
    pub retries: u32,
    /// Where blobs of registries that ignore `Range` are spooled (unlinked temporary files).
    /// `None`: the system temporary directory.
    pub spool_dir: Option<PathBuf>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            hosts: BTreeMap::new(),
            docker_config: None,
            max_in_flight: 8,
            timeout_secs: 30,
            retries: 3,
            spool_dir: None,
        }
    }
}

/// Options for one registry host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostOptions {
    /// Talk plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// Mirrors (`host[:port]`) tried first, in order, before the host itself. A mirror uses its
    /// own entry in [`RegistryOptions::hosts`] if it has one, else this host's `plain_http` and
    /// `insecure_skip_verify`.
    pub mirrors: Vec<String>,
    /// Accept any TLS certificate (HTTPS without verification).
    pub insecure_skip_verify: bool,
}

/// A manifest (or index) as the registry served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Its media type (from `Content-Type`, else from its `mediaType` field).
    pub media_type: String,
    /// The SHA-256 digest of `bytes` (verified against the reference's digest, if any).
    pub digest: Digest,
    /// The raw bytes.
    pub bytes: Vec<u8>,
}

impl Manifest {
    /// Whether this is an image index / manifest list rather than an image manifest.
    pub fn is_index(&self) -> bool {
        self.media_type == MEDIA_TYPE_OCI_INDEX || self.media_type == MEDIA_TYPE_DOCKER_LIST
    }
}

/// Counters of a [`Registry`] client (shared by its clones and its blobs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// HTTP requests sent (token requests and redirect hops included).
    pub requests: u64,
    /// Response body bytes received.
    pub bytes_received: u64,
}

/// An OCI registry client. Cheap to clone (the clones share connections, tokens, the
/// in-flight bound and the counters); `Send + Sync`.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

struct Inner {
    opts: RegistryOptions,
    agent: Agent,
    insecure_agent: Agent,
    credentials: DockerCredentials,
    /// (endpoint host, scope) → `Authorization` header value.
    auth: Mutex<HashMap<(String, String), String>>,
    slots: Arc<Semaphore>,
    requests: AtomicU64,
    bytes: Arc<AtomicU64>,
}

/// Where a request goes: a mirror or the registry host itself.
#[derive(Debug, Clone)]
struct Endpoint {
    host: String,
    plain_http: bool,
    insecure: bool,
}

impl Endpoint {
    fn base(&self) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        format!("{scheme}://{}", self.host)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
}

/// One logical request against a repository.
struct Req {
    method: Method,
    /// `/v2/...`
    path: String,
    headers: Vec<(&'static str, String)>,
    /// The token scope, e.g. `repository:library/busybox:pull`.
    scope: String,
    /// What is fetched, for errors and logs.
    what: String,
    /// Hand 416 (range not satisfiable) to the handler instead of failing.
    allow_416: bool,
}

/// Why an attempt failed: retried or not.
enum Failure {
    Transient(Error),
    Fatal(Error),
}

impl Registry {
    /// A client with `opts`; reads the docker config file now.
    pub fn new(opts: RegistryOptions) -> Result<Registry> {
        if opts.max_in_flight == 0 {
            return Err(Error::InvalidArgument(
                "registry options: max_in_flight must be at least 1".into(),
            ));
        }
        for key in opts.hosts.keys() {
            if key.contains('/') || key.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "registry options: host {key:?} must be host[:port]"
                )));
            }
        }
        let config_path = opts
            .docker_config
            .clone()
            .or_else(auth::default_docker_config);
        let credentials = match &config_path {
            Some(p) => DockerCredentials::load(p)?,
            None => DockerCredentials::default(),
        };
        let timeout = Some(Duration::from_secs(opts.timeout_secs.max(1)));
        let agent = |insecure: bool| -> Agent {
            let tls = ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .disable_verification(insecure)
                .build();
            Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .timeout_global(timeout)
                .proxy(None)
                .tls_config(tls)
                .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
                .build()
                .new_agent()
        };
        Ok(Registry {
            inner: Arc::new(Inner {
                agent: agent(false),
                insecure_agent: agent(true),
                credentials,
                auth: Mutex::new(HashMap::new()),
                slots: Arc::new(Semaphore::new(opts.max_in_flight)),
                requests: AtomicU64::new(0),
                bytes: Arc::new(AtomicU64::new(0)),
                opts,
            }),
        })
    }

    /// The options this client was made with.
    pub fn options(&self) -> &RegistryOptions {
        &self.inner.opts
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        Stats {
            requests: self.inner.requests.load(Ordering::Relaxed),
            bytes_received: self.inner.bytes.load(Ordering::Relaxed),
        }
    }

    /// Fetches the manifest (or index) `r` names: by digest if it has one (then verified), else
    /// by tag. Accepts OCI manifests and indexes and Docker schema 2 manifests and lists.
    pub fn manifest(&self, r: &Reference) -> Result<Manifest> {
        let accept = [
            MEDIA_TYPE_OCI_MANIFEST,
            MEDIA_TYPE_OCI_INDEX,
            MEDIA_TYPE_DOCKER_MANIFEST,
            MEDIA_TYPE_DOCKER_LIST,
        ]
        .join(", ");
        let req = Req {
            method: Method::Get,
            path: format!("/v2/{}/manifests/{}", r.repository, r.manifest_reference()),
            headers: vec![("Accept", accept)],
            scope: pull_scope(r),
            what: format!("manifest {r}"),
            allow_416: false,
        };
        let (content_type, bytes) = self.execute(r, &req, &mut |resp, _permit| {
            let content_type = header(&resp, "content-type");
            let mut bytes = Vec::new();
            self.body_reader(resp)
                .take(MAX_JSON_SIZE + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| transient_io(&req.what, e))?;
            if bytes.len() as u64 > MAX_JSON_SIZE {
                return Err(Failure::Fatal(Error::InvalidArgument(format!(
                    "{}: larger than {MAX_JSON_SIZE} bytes",
                    req.what
                ))));
            }
            Ok((content_type, bytes))
        })?;
        let digest = digest_from_hasher(Sha256::new_with_prefix(&bytes));
        if let Some(expected) = &r.digest {
            if *expected.algorithm() != DigestAlgorithm::Sha256 {
                return Err(Error::Unsupported(format!(
                    "digest algorithm of {expected}"
                )));
            }
            if *expected != digest {
                return Err(Error::DigestMismatch {
                    what: format!("manifest {r}"),
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let media_type = manifest_media_type(content_type.as_deref(), &bytes);
        debug!(reference = %r, %digest, %media_type, size = bytes.len(), "fetched manifest");
        Ok(Manifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// Opens blob `digest` of `r`'s repository for random access. Probes it with a one-byte
    /// range request: a registry that answers `206` serves every later read by range; one that
    /// ignores `Range` and answers `200` has its whole blob spooled (once, digest-verified) into
    /// an unlinked file in [`RegistryOptions::spool_dir`] that serves all reads. `size`, when
    /// given, must be the blob's size ([`Error::DigestMismatch`] otherwise).
    pub fn blob(&self, r: &Reference, digest: &Digest, size: Option<u64>) -> Result<Blob> {
        Blob::open(self.clone(), r, digest, size, 0)
    }

    /// [`Registry::blob`], fetching the blob's last `tail` bytes with the opening request (a
    /// suffix range) so that reads of them need no further request: one round trip gets an
    /// eStargz layer's size, footer and (small) TOC.
    pub fn blob_with_tail(
        &self,
        r: &Reference,
        digest: &Digest,
        size: Option<u64>,
        tail: u64,
    ) -> Result<Blob> {
        Blob::open(self.clone(), r, digest, size, tail)
    }

    /// Streams blob `digest` of `r`'s repository from its start. The stream verifies the blob
    /// as it goes: at its end, a size (against `Content-Length`) or SHA-256 mismatch is an
    /// `io::Error` of kind `InvalidData` carrying [`Error::DigestMismatch`] (see
    /// [`crate::content::error_from_io`]) instead of the end of the stream. The stream holds one
    /// of the client's in-flight slots until dropped. A connection lost mid-stream is resumed
    /// with a `Range` request from where it stopped ([`RegistryOptions::retries`] times without
    /// progress at most).
    pub fn fetch_blob(&self, r: &Reference, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        let req = blob_req(r, digest, Method::Get, vec![]);
        let stream = self.execute(r, &req, &mut |resp, permit| {
            let length = resp.body().content_length();
            Ok(VerifyingReader {
                registry: self.clone(),
                reference: r.clone(),
                body: Some((self.body_reader(resp), permit)),
                hasher: Some(Sha256::new()),
                expected: digest.clone(),
                length,
                read: 0,
                failures: 0,
            })
        })?;
        Ok(Box::new(stream))
    }

    /// The endpoints for `r`: its host's mirrors, then the host.
    fn endpoints(&self, r: &Reference) -> Vec<Endpoint> {
        let hosts = &self.inner.opts.hosts;
        let own = hosts
            .get(&r.registry)
            .or_else(|| hosts.get(r.api_host()))
            .cloned()
            .unwrap_or_default();
        let mut out: Vec<Endpoint> = own
            .mirrors
            .iter()
            .map(|m| {
                let o = hosts.get(m).unwrap_or(&own);
                Endpoint {
                    host: m.clone(),
                    plain_http: o.plain_http,
                    insecure: o.insecure_skip_verify,
                }
            })
            .collect();
        out.push(Endpoint {
            host: r.api_host().to_string(),
            plain_http: own.plain_http,
            insecure: own.insecure_skip_verify,
        });
        out
    }

    /// Runs `req` against each endpoint of `r` in turn until one succeeds; returns the last
    /// failure. `on_ok` gets 2xx responses (and 416 when allowed) with the in-flight slot.
    fn execute<T>(
        &self,
        r: &Reference,
        req: &Req,
        on_ok: &mut dyn FnMut(Response<ureq::Body>, Permit) -> Result<T, Failure>,
    ) -> Result<T> {
        let endpoints = self.endpoints(r);
        let last = endpoints.len() - 1;
        for (i, ep) in endpoints.iter().enumerate() {
            match self.execute_on(ep, req, on_ok) {
                Ok(v) => return Ok(v),
                Err(e) if i < last => {
                    warn!(mirror = %ep.host, what = %req.what, error = %e, "mirror failed, trying the next endpoint");
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::InvalidArgument(format!("{}: no endpoint", req.what)))
    }

    fn execute_on<T>(
        &self,
        ep: &Endpoint,
        req: &Req,
        on_ok: &mut dyn FnMut(Response<ureq::Body>, Permit) -> Result<T, Failure>,
    ) -> Result<T> {
        let retries = self.inner.opts.retries;
        let mut attempt = 0u32;
        let mut authenticated = false;
        loop {
            let permit = Semaphore::acquire(&self.inner.slots);
            let outcome = match self.send(ep, req) {
                Err(f) => Err(f),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match status {
                        200..=299 => on_ok(resp, permit),
                        416 if req.allow_416 => on_ok(resp, permit),
                        401 if !authenticated => {
                            drop(permit);
                            authenticated = true;
                            match self.authenticate(ep, req, &resp) {
                                Ok(()) => continue,
                                Err(f) => Err(f),
                            }
                        }
                        401 | 403 => Err(Failure::Fatal(Error::PermissionDenied(format!(
                            "{} from {}: HTTP {status}{}",
                            req.what,
                            ep.host,
                            if authenticated {
                                " after authenticating"
                            } else {
                                ""
                            }
                        )))),
                        404 => Err(Failure::Fatal(Error::NotFound(format!(
                            "{} at {}",
                            req.what, ep.host
                        )))),
                        429 | 500..=599 => Err(Failure::Transient(Error::Unavailable(format!(
                            "{} from {}: HTTP {status}",
                            req.what, ep.host
                        )))),
                        _ => Err(Failure::Fatal(Error::io(
                            format!("{} from {}", req.what, ep.host),
                            io::Error::other(format!("unexpected HTTP status {status}")),
                        ))),
                    }
                }
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(e)) if attempt >= retries => {
                    return Err(match e {
                        Error::Unavailable(m) => {
                            Error::Unavailable(format!("{m} (after {} attempts)", attempt + 1))
                        }
                        other => Error::Unavailable(format!(
                            "{} from {}: {other} (after {} attempts)",
                            req.what,
                            ep.host,
                            attempt + 1
                        )),
                    });
                }
                Err(Failure::Transient(e)) => {
                    let delay = FIRST_BACKOFF
                        .saturating_mul(1u32 << attempt.min(16))
                        .min(MAX_BACKOFF);
                    debug!(what = %req.what, host = %ep.host, error = %e, ?delay, attempt, "transient failure, retrying");
                    std::thread::sleep(delay);
                    attempt += 1;
                }
            }
        }
    }

    /// Sends `req` to `ep`, following redirects; any status comes back as a response.
    fn send(&self, ep: &Endpoint, req: &Req) -> Result<Response<ureq::Body>, Failure> {
        let base = ep.base();
        let mut url = format!("{base}{}", req.path);
        let agent = if ep.insecure {
            &self.inner.insecure_agent
        } else {
            &self.inner.agent
        };
        let authorization = self.cached_auth(&ep.host, &req.scope);
        for _hop in 0..=MAX_REDIRECTS {
            let uri: Uri = url.parse().map_err(|e| {
                Failure::Fatal(Error::InvalidArgument(format!(
                    "{}: bad URL {url:?}: {e}",
                    req.what
                )))
            })?;
            let same_origin = origin(&uri).as_deref() == Some(base.as_str());
            let mut builder = match req.method {
                Method::Get => agent.get(&uri),
                Method::Head => agent.head(&uri),
            };
            for (k, v) in &req.headers {
                builder = builder.header(*k, v);
            }
            if same_origin && let Some(a) = &authorization {
                builder = builder.header("Authorization", a);
            }
            self.inner.requests.fetch_add(1, Ordering::Relaxed);
            debug!(method = ?req.method, %url, "registry request");
            let resp = builder.call().map_err(|e| classify(&req.what, &uri, e))?;
            let status = resp.status().as_u16();
            debug!(method = ?req.method, %url, status, "registry response");
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let Some(location) = header(&resp, "location") else {
                    return Err(Failure::Fatal(Error::io(
                        format!("{} from {url}", req.what),
                        io::Error::other(format!("HTTP {status} without Location")),
                    )));
                };
                url = resolve_location(&uri, &location);
                debug!(to = %url, "following redirect");
                continue;
            }
            return Ok(resp);
        }
        Err(Failure::Fatal(Error::io(
            req.what.clone(),
            io::Error::other(format!("more than {MAX_REDIRECTS} redirects")),
        )))
    }

    fn cached_auth(&self, host: &str, scope: &str) -> Option<String> {
        let cache = self.inner.auth.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(&(host.to_string(), scope.to_string())).cloned()
    }

    /// Answers a 401: fetches a bearer token or picks basic credentials, and caches the
    /// resulting `Authorization` for (host, scope).
    fn authenticate(
        &self,
        ep: &Endpoint,
        req: &Req,
        resp: &Response<ureq::Body>,
    ) -> Result<(), Failure> {
        let denied = |why: String| {
            Failure::Fatal(Error::PermissionDenied(format!(
                "{} from {}: {why}",
                req.what, ep.host
            )))
        };
        let challenge = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(auth::parse_challenge)
            .ok_or_else(|| denied("HTTP 401 without a Bearer or Basic challenge".into()))?;
        let creds = self.inner.credentials.get(&ep.host);
        let creds = creds.as_ref();
        let value = match challenge {
            Challenge::Basic => match creds {
                Some(c) => c.basic_header(),
                None => {
                    return Err(denied(format!(
                        "the registry wants basic auth and the docker config has no \
                         credentials for {}",
                        ep.host
                    )));
                }
            },
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let token = self.fetch_token(ep, req, &realm, service, scope, creds)?;
                format!("Bearer {token}")
            }
        };
        let mut cache = self.inner.auth.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert((ep.host.clone(), req.scope.clone()), value);
        Ok(())
    }

    fn fetch_token(
        &self,
        ep: &Endpoint,
        req: &Req,
        realm: &str,
        service: Option<String>,
        scope: Option<String>,
        creds: Option<&Credentials>,
    ) -> Result<String, Failure> {
        let agent = if ep.insecure {
            &self.inner.insecure_agent
        } else {
            &self.inner.agent
        };
        let scope = scope.unwrap_or_else(|| req.scope.clone());
        let mut builder = agent.get(realm).query("scope", &scope);
        if let Some(s) = &service {
            builder = builder.query("service", s);
        }
        if let Some(c) = creds {
            builder = builder.header("Authorization", c.basic_header());
        }
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        debug!(%realm, %scope, with_credentials = creds.is_some(), "fetching a registry token");
        let what = format!("token for {scope} from {realm}");
        let uri: Uri = realm
            .parse()
            .map_err(|e| Failure::Fatal(Error::InvalidArgument(format!("bad token realm: {e}"))))?;
        let mut resp = builder.call().map_err(|e| classify(&what, &uri, e))?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(Failure::Fatal(Error::PermissionDenied(format!(
                "{what}: HTTP {status}{}",
                if creds.is_some() {
                    " (with the docker config's credentials)"
                } else {
                    " (no credentials in the docker config)"
                }
            ))));
        }
        if !(200..300).contains(&status) {
            return Err(Failure::Fatal(Error::Unavailable(format!(
                "{what}: HTTP {status}"
            ))));
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| Failure::Fatal(Error::Unavailable(format!("{what}: {e}"))))?;
        self.inner
            .bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            Failure::Fatal(Error::PermissionDenied(format!("{what}: bad answer: {e}")))
        })?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Failure::Fatal(Error::PermissionDenied(format!("{what}: no token"))))
    }

    /// The response body, counted in [`Stats::bytes_received`].
    fn body_reader(&self, resp: Response<ureq::Body>) -> CountingReader<ureq::BodyReader<'static>> {
        CountingReader {
            inner: resp.into_body().into_reader(),
            counter: self.inner.bytes.clone(),
        }
    }
}

fn pull_scope(r: &Reference) -> String {
    format!("repository:{}:pull", r.repository)
}

fn blob_req(
    r: &Reference,
    digest: &Digest,
    method: Method,
    headers: Vec<(&'static str, String)>,
) -> Req {
    Req {
        method,
        path: format!("/v2/{}/blobs/{digest}", r.repository),
        headers,
        scope: pull_scope(r),
        what: format!("blob {digest} of {}/{}", r.registry, r.repository),
        allow_416: false,
    }
}

fn header(resp: &Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `scheme://authority` of a URI.
fn origin(uri: &Uri) -> Option<String> {
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

/// Resolves a `Location` header against the URL it came from.
fn resolve_location(from: &Uri, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let base = origin(from).unwrap_or_default();
    if let Some(rest) = location.strip_prefix("//") {
        let scheme = from.scheme_str().unwrap_or("https");
        return format!("{scheme}://{rest}");
    }
    if location.starts_with('/') {
        return format!("{base}{location}");
    }
    let path = from.path();
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    format!("{base}{dir}/{location}")
}

fn classify(what: &str, uri: &Uri, e: ureq::Error) -> Failure {
    let msg = format!("{what}: {uri}: {e}");
    match e {
        ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::InvalidProxyUrl => {
            Failure::Fatal(Error::InvalidArgument(msg))
        }
        ureq::Error::Tls(_) => Failure::Fatal(Error::Unavailable(msg)),
        // rustls meeting a peer that does not speak TLS.
        _ if msg.contains("InvalidContentType") => Failure::Fatal(Error::Unavailable(format!(
            "{msg} (the server does not speak TLS: a plain-HTTP registry needs plain_http, \
             e.g. `strata pull --plain-http`)"
        ))),
        _ => Failure::Transient(Error::Unavailable(msg)),
    }
}

fn transient_io(what: &str, e: io::Error) -> Failure {
    Failure::Transient(Error::Unavailable(format!("{what}: reading the body: {e}")))
}

/// The media type of a manifest: `Content-Type` unless generic, else its `mediaType` field,
/// else guessed from its shape.
fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> String {
    let ct = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
        .filter(|c| !c.is_empty() && c != "application/json" && c != "text/plain");
    if let Some(ct) = ct {
        return ct;
    }
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(m),
            ..
        }) => m,
        Ok(Probe {
            manifests: Some(_), ..
        }) => MEDIA_TYPE_OCI_INDEX.to_string(),
        _ => MEDIA_TYPE_OCI_MANIFEST.to_string(),
    }
}

/// A counting semaphore bounding requests in flight.
struct Semaphore {
    free: Mutex<usize>,
    freed: Condvar,
}

/// One slot of a [`Semaphore`], given back on drop.
pub(crate) struct Permit {
    sem: Arc<Semaphore>,
}

impl Semaphore {
    fn new(n: usize) -> Semaphore {
        Semaphore {
            free: Mutex::new(n),
            freed: Condvar::new(),
        }
    }

    fn acquire(sem: &Arc<Semaphore>) -> Permit {
        let mut free = sem.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = sem.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Permit { sem: sem.clone() }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut free = self.sem.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.sem.freed.notify_one();
    }
}

/// Counts the bytes read through it.
pub(crate) struct CountingReader<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A whole-blob stream that resumes after lost connections and checks size and digest at
/// its end.
struct VerifyingReader {
    registry: Registry,
    reference: Reference,
    /// The current response body and its in-flight slot (none while reconnecting).
    body: Option<(CountingReader<ureq::BodyReader<'static>>, Permit)>,
    hasher: Option<Sha256>,
    expected: Digest,
    length: Option<u64>,
    read: u64,
    /// Consecutive failures without progress.
    failures: u32,
}

impl VerifyingReader {
    fn mismatch(&self, what: String, expected: String, actual: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            Error::DigestMismatch {
                what,
                expected,
                actual,
            },
        )
    }

    /// Asks for the rest of the blob, from `self.read` on.
    fn resume(&mut self) -> io::Result<()> {
        self.body = None;
        let from = self.read;
        let req = blob_req(
            &self.reference,
            &self.expected,
            Method::Get,
            vec![("Range", format!("bytes={from}-"))],
        );
        let registry = self.registry.clone();
        let body = registry
            .execute(&self.reference, &req, &mut |resp, permit| {
                let status = resp.status().as_u16();
                let content_range = header(&resp, "content-range").unwrap_or_default();
                let mut body = registry.body_reader(resp);
                if status == 206 {
                    let start = content_range
                        .trim()
                        .strip_prefix("bytes ")
                        .and_then(|r| r.split('-').next())
                        .and_then(|n| n.trim().parse::<u64>().ok());
                    if start != Some(from) {
                        return Err(Failure::Fatal(Error::io(
                            req.what.clone(),
                            io::Error::other(format!(
                                "resuming at {from}, got Content-Range {content_range:?}"
                            )),
                        )));
                    }
                } else {
                    io::copy(&mut (&mut body).take(from), &mut io::sink())
                        .map_err(|e| transient_io(&req.what, e))?;
                }
                Ok((body, permit))
            })
            .map_err(io::Error::other)?;
        self.body = Some(body);
        Ok(())
    }

    fn finish(&mut self) -> io::Result<usize> {
        let Some(hasher) = self.hasher.take() else {
            return Ok(0);
        };
        self.body = None;
        if let Some(len) = self.length
            && len != self.read
        {
            return Err(self.mismatch(
                format!("size of blob {}", self.expected),
                len.to_string(),
                self.read.to_string(),
            ));
        }
        if *self.expected.algorithm() == DigestAlgorithm::Sha256 {
            let actual = digest_from_hasher(hasher);
            if actual != self.expected {
                return Err(self.mismatch(
                    format!("blob {}", self.expected),
                    self.expected.to_string(),
                    actual.to_string(),
                ));
            }
        } else {
            warn!(digest = %self.expected, "blob digest algorithm not verifiable here");
        }
        Ok(0)
    }
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.hasher.is_none() {
            return Ok(0);
        }
        loop {
            let result = match self.body.as_mut() {
                Some((body, _)) => body.read(buf),
                None => Err(io::Error::other("reconnecting")),
            };
            let error = match result {
                Ok(n) if n > 0 => {
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&buf[..n]);
                    }
                    self.read += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Ok(_) if self.length.is_none_or(|l| self.read >= l) => return self.finish(),
                Ok(_) => io::Error::new(io::ErrorKind::UnexpectedEof, "body ended early"),
                Err(e) => e,
            };
            if self.failures >= self.registry.inner.opts.retries {
                return Err(error);
            }
            self.failures += 1;
            warn!(digest = %self.expected, at = self.read, error = %error, "blob stream broken, resuming");
            std::thread::sleep(
                FIRST_BACKOFF
                    .saturating_mul(1u32 << self.failures.min(16))
                    .min(MAX_BACKOFF),
            );
            if let Err(e) = self.resume() {
                if e.get_ref().is_some_and(|i| i.is::<Error>()) {
                    // A definitive answer (not found, unavailable after retries, ...).
                    return Err(e);
                }
                debug!(error = %e, "resume failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_deserialize_with_defaults() {
        let o: RegistryOptions = serde_json::from_str(
            r#"{"hosts":{"127.0.0.1:5000":{"plain_http":true,"mirrors":["m:1"]}},"retries":1}"#,
        )
        .unwrap();
        assert_eq!(o.max_in_flight, 8);
        assert_eq!(o.timeout_secs, 30);
        assert_eq!(o.retries, 1);
        let h = &o.hosts["127.0.0.1:5000"];
        assert!(h.plain_http && !h.insecure_skip_verify);
        assert_eq!(h.mirrors, vec!["m:1".to_string()]);
        let d: RegistryOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(d, RegistryOptions::default());
    }

    #[test]
    fn endpoints_are_mirrors_then_host() {
        let mut opts = RegistryOptions {
            docker_config: Some("/nonexistent/config.json".into()),
            ..Default::default()
        };
        opts.hosts.insert(
            "docker.io".into(),
            HostOptions {
                mirrors: vec!["mirror.local:5000".into(), "m2".into()],
                ..Default::default()
            },
        );
        opts.hosts.insert(
            "mirror.local:5000".into(),
            HostOptions {
                plain_http: true,
                ..Default::default()
            },
        );
        // No docker config: new() fails on a missing explicit file.
        assert!(Registry::new(opts.clone()).is_err());
        opts.docker_config = None;
        let reg = Registry::new(opts).unwrap();
        let r = Reference::parse("busybox").unwrap();
        let eps = reg.endpoints(&r);
        let bases: Vec<String> = eps.iter().map(Endpoint::base).collect();
        assert_eq!(
            bases,
            [
                "http://mirror.local:5000",
                "https://m2",
                "https://registry-1.docker.io"
            ]
        );
    }

    #[test]
    fn redirect_locations_resolve() {
        let from: Uri = "http://a:1/v2/x/blobs/sha256:1".parse().unwrap();
        assert_eq!(resolve_location(&from, "http://b/y"), "http://b/y");
        assert_eq!(resolve_location(&from, "/z?q=1"), "http://a:1/z?q=1");
        assert_eq!(resolve_location(&from, "//c/d"), "http://c/d");
        assert_eq!(resolve_location(&from, "e"), "http://a:1/v2/x/blobs/e");
    }

    #[test]
    fn media_types_from_headers_or_bodies() {
        assert_eq!(
            manifest_media_type(Some(&format!("{MEDIA_TYPE_OCI_INDEX}; charset=x")), b"{}"),
            MEDIA_TYPE_OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(
                Some("application/json"),
                format!(r#"{{"mediaType":"{MEDIA_TYPE_DOCKER_LIST}"}}"#).as_bytes()
            ),
            MEDIA_TYPE_DOCKER_LIST
        );
        assert_eq!(
            manifest_media_type(None, br#"{"manifests":[]}"#),
            MEDIA_TYPE_OCI_INDEX
        );
        assert_eq!(manifest_media_type(None, b"{}"), MEDIA_TYPE_OCI_MANIFEST);
    }

    #[test]
    fn semaphore_bounds_permits() {
        let sem = Arc::new(Semaphore::new(2));
        let a = Semaphore::acquire(&sem);
        let _b = Semaphore::acquire(&sem);
        let sem2 = sem.clone();
        let t = std::thread::spawn(move || {
            let _c = Semaphore::acquire(&sem2);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        drop(a);
        t.join().unwrap();
    }
}
