//! A fault-injecting HTTP/1.1 proxy on loopback, in front of a registry.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tracing::{debug, warn};

use crate::{Error, Result};

/// Socket timeouts of the proxy's connections.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request or response head accepted.
const MAX_HEAD: usize = 64 << 10;

/// What the proxy does to the traffic; switchable at any time with [`FaultProxy::set_mode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Forward unchanged.
    Pass,
    /// Drop the `Range` header of requests, so the registry answers 200 with whole blobs.
    StripRange,
    /// Invert the bytes of blob GET response bodies whose position in the blob (from the
    /// response's `Content-Range`, else 0) is in this range; `0..u64::MAX` corrupts all.
    FlipBytes(Range<u64>),
    /// Wait this long before forwarding each request.
    Delay(Duration),
    /// Close every connection as soon as it is accepted (a registry that is down).
    Down,
    /// Answer every request with this HTTP status (e.g. 503) and an empty body.
    Status(u16),
    /// Close blob GET responses after this many body bytes (a connection lost mid-stream).
    CutAfter(u64),
    /// Answer `416` to suffix ranges (`Range: bytes=-N`), like servers without them.
    NoSuffixRange,
}

/// Authentication the proxy demands itself (in front of an open registry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyAuth {
    /// None: requests go through as they are.
    None,
    /// Registry token auth: requests without `Authorization: Bearer <token>` get a 401 with a
    /// Bearer challenge whose realm is the proxy's own `/token`, which hands out `token` (to
    /// anyone, or only with these basic credentials).
    Bearer {
        /// The token handed out and required.
        token: String,
        /// Credentials `/token` requires (basic auth), if any.
        credentials: Option<(String, String)>,
    },
    /// HTTP basic auth with these credentials.
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
}

struct State {
    upstream: SocketAddr,
    addr: SocketAddr,
    mode: Mutex<Mode>,
    auth: Mutex<ProxyAuth>,
    redirect_blobs: AtomicBool,
    fail_next: Mutex<(u64, u16)>,
    stop: AtomicBool,
    body_bytes: AtomicU64,
    requests: AtomicU64,
    with_authorization: AtomicU64,
    token_requests: AtomicU64,
}

/// A loopback HTTP proxy in front of `upstream` (one request per connection, `Connection:
/// close` both ways; chunked upstream bodies are forwarded de-chunked) with run-time
/// switchable faults ([`Mode`]), optional auth ([`ProxyAuth`]), optional redirects of blob
/// requests to the upstream itself, and counters. Stopped on drop.
pub struct FaultProxy {
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`, in [`Mode::Pass`].
    pub fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind the fault proxy", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("fault proxy address", e))?;
        let state = Arc::new(State {
            upstream,
            addr,
            mode: Mutex::new(Mode::Pass),
            auth: Mutex::new(ProxyAuth::None),
            redirect_blobs: AtomicBool::new(false),
            fail_next: Mutex::new((0, 0)),
            stop: AtomicBool::new(false),
            body_bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            with_authorization: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
        });
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || accept_loop(listener, st))
            .map_err(|e| Error::io("spawn the fault proxy", e))?;
        debug!(%addr, %upstream, "fault proxy started");
        Ok(FaultProxy {
            state,
            thread: Some(thread),
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// `127.0.0.1:<port>` as a reference's registry part.
    pub fn host(&self) -> String {
        self.state.addr.to_string()
    }

    /// Switches the fault mode (applies to requests that arrive from now on).
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// The current fault mode.
    pub fn mode(&self) -> Mode {
        self.state
            .mode
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Switches the authentication the proxy demands.
    pub fn set_auth(&self, auth: ProxyAuth) {
        *self.state.auth.lock().unwrap_or_else(|p| p.into_inner()) = auth;
    }

    /// Answer blob GET/HEAD requests with `307` to the same path on the upstream itself (as
    /// registries redirect to storage).
    pub fn set_redirect_blobs(&self, on: bool) {
        self.state.redirect_blobs.store(on, Ordering::SeqCst);
    }

    /// Answers the next `count` requests (after authentication) with HTTP `status`, then goes
    /// back to the current mode: a transient failure.
    pub fn fail_next(&self, count: u64, status: u16) {
        *self
            .state
            .fail_next
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (count, status);
    }

    /// Response body bytes forwarded to clients so far.
    pub fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    /// Requests received so far (`/token` ones included).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests (other than to `/token`) that carried an `Authorization` header.
    pub fn requests_with_authorization(&self) -> u64 {
        self.state.with_authorization.load(Ordering::SeqCst)
    }

    /// Requests to the `/token` endpoint.
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// Sets all counters to zero.
    pub fn reset_counters(&self) {
        for c in [
            &self.state.body_bytes,
            &self.state.requests,
            &self.state.with_authorization,
            &self.state.token_requests,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.state.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, state: Arc<State>) {
    for conn in listener.incoming() {
        if state.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "fault proxy accept");
                continue;
            }
        };
        let mode = state.mode.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if mode == Mode::Down {
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        let st = state.clone();
        let spawned = std::thread::Builder::new()
            .name("fault-proxy-conn".into())
            .spawn(move || {
                if let Err(e) = handle(stream, &st) {
                    debug!(error = %e, "fault proxy connection");
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "fault proxy: spawn a connection thread");
        }
    }
}

/// A parsed request or response head.
struct Head {
    /// The request line or status line.
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            if lines.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in a head",
            ));
        }
        total += n;
        if total > MAX_HEAD {
            return Err(io::Error::other("head too large"));
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let mut it = lines.into_iter();
    let first = it.next().unwrap_or_default();
    let headers = it
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Ok(Some(Head { first, headers }))
}

fn respond(client: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let _ = client.write_all(out.as_bytes());
    let _ = client.write_all(body);
    let _ = client.flush();
    let _ = client.shutdown(Shutdown::Write);
}

/// `/v2/<repo>/(manifests|blobs|tags)/…` → `<repo>`.
fn repository_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
        .map(|i| &rest[..i])
}

fn handle(client: TcpStream, state: &State) -> io::Result<()> {
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    let Some(req) = read_head(&mut reader)? else {
        return Ok(());
    };
    state.requests.fetch_add(1, Ordering::SeqCst);
    let mut parts = req.first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let path = target.split('?').next().unwrap_or("").to_string();
    let is_token = path == "/token";
    if is_token {
        state.token_requests.fetch_add(1, Ordering::SeqCst);
    } else if req.get("authorization").is_some() {
        state.with_authorization.fetch_add(1, Ordering::SeqCst);
    }
    let mut req_body = Vec::new();
    if let Some(len) = req
        .get("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        (&mut reader).take(len).read_to_end(&mut req_body)?;
    }

    // Authentication in front of the upstream.
    let auth = state.auth.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match &auth {
        ProxyAuth::None => {}
        ProxyAuth::Bearer { token, credentials } => {
            if is_token {
                let allowed = match credentials {
                    None => true,
                    Some((u, p)) => {
                        req.get("authorization")
                            == Some(
                                format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))).as_str(),
                            )
                    }
                };
                if allowed {
                    let body = format!("{{\"token\":\"{token}\",\"expires_in\":300}}");
                    respond(
                        &mut client,
                        "200 OK",
                        &[("Content-Type", "application/json".into())],
                        body.as_bytes(),
                    );
                } else {
                    respond(
                        &mut client,
                        "401 Unauthorized",
                        &[(
                            "WWW-Authenticate",
                            "Basic realm=\"fault-proxy-token\"".into(),
                        )],
                        b"{}",
                    );
                }
                return Ok(());
            }
            if req.get("authorization") != Some(format!("Bearer {token}").as_str()) {
                let mut challenge = format!(
                    "Bearer realm=\"http://{}/token\",service=\"fault-proxy\"",
                    state.addr
                );
                if let Some(repo) = repository_of(&path) {
                    challenge.push_str(&format!(",scope=\"repository:{repo}:pull\""));
                }
                respond(
                    &mut client,
                    "401 Unauthorized",
                    &[
                        ("WWW-Authenticate", challenge),
                        ("Content-Type", "application/json".into()),
                    ],
                    b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
                );
                return Ok(());
            }
        }
        ProxyAuth::Basic { username, password } => {
            let want = format!(
                "Basic {}",
                STANDARD.encode(format!("{username}:{password}"))
            );
            if req.get("authorization") != Some(want.as_str()) {
                respond(
                    &mut client,
                    "401 Unauthorized",
                    &[("WWW-Authenticate", "Basic realm=\"fault-proxy\"".into())],
                    b"{}",
                );
                return Ok(());
            }
        }
    }

    let mode = state.mode.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let failing = {
        let mut f = state.fail_next.lock().unwrap_or_else(|p| p.into_inner());
        if f.0 > 0 {
            f.0 -= 1;
            Some(f.1)
        } else {
            None
        }
    };
    if let Some(status) = failing.or(match mode {
        Mode::Status(s) => Some(s),
        _ => None,
    }) {
        respond(&mut client, &format!("{status} Injected"), &[], b"");
        return Ok(());
    }
    if mode == Mode::NoSuffixRange
        && req
            .get("range")
            .is_some_and(|r| r.trim().starts_with("bytes=-"))
    {
        respond(
            &mut client,
            "416 Range Not Satisfiable",
            &[("Content-Range", "bytes */1".into())],
            b"",
        );
        return Ok(());
    }
    match &mode {
        Mode::Down => {
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        Mode::Delay(d) => std::thread::sleep(*d),
        _ => {}
    }
    let is_blob = path.contains("/blobs/sha256:");
    if is_blob
        && (method == "GET" || method == "HEAD")
        && state.redirect_blobs.load(Ordering::SeqCst)
    {
        respond(
            &mut client,
            "307 Temporary Redirect",
            &[("Location", format!("http://{}{target}", state.upstream))],
            b"",
        );
        return Ok(());
    }

    let mut upstream = match TcpStream::connect_timeout(&state.upstream, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            respond(
                &mut client,
                "502 Bad Gateway",
                &[],
                format!("upstream: {e}").as_bytes(),
            );
            return Ok(());
        }
    };
    upstream.set_read_timeout(Some(IO_TIMEOUT))?;
    upstream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut out = format!("{}\r\n", req.first);
    for (k, v) in &req.headers {
        let drop = ["connection", "keep-alive", "proxy-connection", "te", "upgrade"]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h))
            || (mode == Mode::StripRange && k.eq_ignore_ascii_case("range"))
            // The proxy's own credentials are not the upstream's.
            || (auth != ProxyAuth::None && k.eq_ignore_ascii_case("authorization"));
        if !drop {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    upstream.write_all(out.as_bytes())?;
    upstream.write_all(&req_body)?;
    upstream.flush()?;

    let mut up = BufReader::with_capacity(64 << 10, upstream);
    let Some(resp) = read_head(&mut up)? else {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "upstream closed without a response",
        ));
    };
    let status: u16 = resp
        .first
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = resp
        .get("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let no_body =
        method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
    let mut head = format!("{}\r\n", resp.first);
    for (k, v) in &resp.headers {
        let drop = ["connection", "keep-alive", "transfer-encoding"]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h));
        if !drop {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    client.write_all(head.as_bytes())?;
    if !no_body {
        let flip = match (&mode, is_blob && method == "GET") {
            (Mode::FlipBytes(r), true) => Some(r.clone()),
            _ => None,
        };
        let start = if status == 206 {
            resp.get("content-range")
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        } else {
            0
        };
        let cut = match (&mode, is_blob && method == "GET") {
            (Mode::CutAfter(n), true) => Some(*n),
            _ => None,
        };
        let mut sink = BodySink {
            client: &mut client,
            flip,
            pos: start,
            counter: &state.body_bytes,
            left: cut,
        };
        if chunked {
            copy_chunked(&mut up, &mut sink)?;
        } else if let Some(len) = resp
            .get("content-length")
            .and_then(|v| v.parse::<u64>().ok())
        {
            copy_n(&mut up, &mut sink, Some(len))?;
        } else {
            copy_n(&mut up, &mut sink, None)?;
        }
    }
    client.flush()?;
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}

/// Where response bodies go: the client, after faults, counted.
struct BodySink<'a> {
    client: &'a mut TcpStream,
    flip: Option<Range<u64>>,
    pos: u64,
    counter: &'a AtomicU64,
    /// Bytes still allowed through before the connection is cut.
    left: Option<u64>,
}

impl BodySink<'_> {
    fn send(&mut self, data: &mut [u8]) -> io::Result<()> {
        if let Some(r) = &self.flip {
            for (i, b) in data.iter_mut().enumerate() {
                if r.contains(&(self.pos + i as u64)) {
                    *b ^= 0xff;
                }
            }
        }
        let mut data = data;
        if let Some(left) = self.left.as_mut() {
            let n = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            data = &mut data[..n];
            *left -= n as u64;
        }
        self.client.write_all(data)?;
        self.pos += data.len() as u64;
        self.counter.fetch_add(data.len() as u64, Ordering::SeqCst);
        if self.left == Some(0) {
            let _ = self.client.shutdown(Shutdown::Both);
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "cut by the fault proxy",
            ));
        }
        Ok(())
    }
}

fn copy_n(r: &mut impl Read, sink: &mut BodySink<'_>, len: Option<u64>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut left = len;
    loop {
        let want = match left {
            Some(0) => return Ok(()),
            Some(n) => buf.len().min(usize::try_from(n).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return match left {
                None => Ok(()),
                Some(_) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream body ended early",
                )),
            };
        }
        sink.send(&mut buf[..n])?;
        if let Some(l) = left.as_mut() {
            *l -= n as u64;
        }
    }
}

fn copy_chunked(r: &mut impl BufRead, sink: &mut BodySink<'_>) -> io::Result<()> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "chunked body ended early",
            ));
        }
        let size_hex = line.trim().split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_hex, 16)
            .map_err(|_| io::Error::other(format!("bad chunk size {size_hex:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut t = String::new();
                if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        copy_n(r, sink, Some(size))?;
        let mut crlf = String::new();
        r.read_line(&mut crlf)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_from_paths() {
        assert_eq!(repository_of("/v2/a/b/manifests/v1"), Some("a/b"));
        assert_eq!(repository_of("/v2/x/blobs/sha256:00"), Some("x"));
        assert_eq!(repository_of("/v2/"), None);
    }

    #[test]
    fn heads_parse() {
        let mut r =
            io::Cursor::new(b"GET / HTTP/1.1\r\nHost: a\r\nRange: bytes=0-0\r\n\r\nrest".to_vec());
        let h = read_head(&mut r).unwrap().unwrap();
        assert_eq!(h.first, "GET / HTTP/1.1");
        assert_eq!(h.get("range"), Some("bytes=0-0"));
        assert_eq!(h.get("HOST"), Some("a"));
    }
}
