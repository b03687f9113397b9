//! A real OCI registry for tests: Debian's `docker-registry` on 127.0.0.1.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::{Error, Result};

const REGISTRY_BIN: &str = "docker-registry";
/// How long [`TestRegistry::start`] waits for `/v2/` to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `skopeo copy` may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// A `docker-registry serve` process on 127.0.0.1 with its storage in a temporary directory
/// (deletes enabled, access log on, in [`TestRegistry::log`]). Killed and reaped on drop.
pub struct TestRegistry {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<Child>,
    basic_auth: Option<(String, String)>,
    tls: bool,
}

impl TestRegistry {
    /// Starts a registry without authentication on a free port; waits (up to 10 s) until its
    /// `/v2/` answers.
    pub fn start() -> Result<TestRegistry> {
        TestRegistry::start_inner(None, false)
    }

    /// Starts a registry serving HTTPS with a self-signed certificate for 127.0.0.1 (made with
    /// `openssl`), so clients need `insecure_skip_verify`.
    pub fn start_tls() -> Result<TestRegistry> {
        TestRegistry::start_inner(None, true)
    }

    /// Starts a registry that demands HTTP basic auth for `username`/`password` (an htpasswd
    /// file made with `htpasswd -Bbn`, Debian package apache2-utils).
    pub fn start_with_basic_auth(username: &str, password: &str) -> Result<TestRegistry> {
        TestRegistry::start_inner(Some((username.to_string(), password.to_string())), false)
    }

    fn start_inner(basic_auth: Option<(String, String)>, tls: bool) -> Result<TestRegistry> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("create a temporary directory", e))?;
        let port = {
            let l = TcpListener::bind("127.0.0.1:0")
                .map_err(|e| Error::io("bind a free loopback port", e))?;
            l.local_addr()
                .map_err(|e| Error::io("local address of a listener", e))?
                .port()
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).map_err(|e| Error::io("create registry storage", e))?;
        let mut auth = String::new();
        if let Some((user, pass)) = &basic_auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .map_err(|e| {
                    Error::Unavailable(format!(
                        "htpasswd ({e}): install Debian package apache2-utils"
                    ))
                })?;
            if !out.status.success() {
                return Err(Error::InvalidArgument(format!(
                    "htpasswd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, &out.stdout).map_err(|e| Error::io("write htpasswd", e))?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let mut tls_config = String::new();
        if tls {
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            let out = Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args([
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .map_err(|e| {
                    Error::Unavailable(format!("openssl ({e}): install Debian package openssl"))
                })?;
            if !out.status.success() {
                return Err(Error::InvalidArgument(format!(
                    "openssl req failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            tls_config = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
        }
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n{tls_config}\
             {auth}",
            storage.display()
        );
        fs::write(dir.path().join("config.yml"), config)
            .map_err(|e| Error::io("write registry config", e))?;
        let mut reg = TestRegistry {
            dir,
            addr,
            child: None,
            basic_auth,
            tls,
        };
        reg.spawn()?;
        Ok(reg)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| Error::io("open registry log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io("clone registry log", e))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::Unavailable(format!(
                        "{REGISTRY_BIN} not found: install Debian package docker-registry"
                    ))
                } else {
                    Error::io(format!("start {REGISTRY_BIN}"), e)
                }
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(Error::Unavailable(format!(
                    "{REGISTRY_BIN} exited at start ({status}): {}",
                    self.log()
                )));
            }
            if probe_v2(self.addr, self.tls) {
                debug!(addr = %self.addr, "test registry up");
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(Error::Unavailable(format!(
                    "{REGISTRY_BIN} did not answer on {} within {READY_TIMEOUT:?}: {}",
                    self.addr,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                warn!(error = %e, "kill docker-registry");
            }
            let _ = child.wait();
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>` as a reference's registry part.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's storage directory.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The registry's output so far (its access log included).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the registry process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the registry (kills and reaps it); the port and storage stay for
    /// [`TestRegistry::restart`].
    pub fn stop(&mut self) {
        self.kill();
        debug!(addr = %self.addr, "test registry stopped");
    }

    /// Starts the registry again on the same port with the same storage (stopping it first if
    /// it runs).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Pushes image `tag` of the OCI layout `layout` as `<this registry>/<repo_tag>` (e.g.
    /// `test/app:v1`), digests preserved; with the registry's credentials if it has some.
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) -> Result<()> {
        let dest = format!("{}/{repo_tag}", self.host());
        push_inner(layout, tag, &dest, self.basic_auth.as_ref())
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `GET /v2/` at `addr` answers 200 or 401 (any answer at all, for a TLS server
/// spoken to in plain HTTP).
fn probe_v2(addr: SocketAddr, tls: bool) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).is_err() {
        return false;
    }
    let line = String::from_utf8_lossy(&head);
    line.starts_with("HTTP/") && (tls || line.ends_with(" 200") || line.ends_with(" 401"))
}

/// Pushes image `tag` of OCI layout `layout_dir` to `dest` (`127.0.0.1:<port>/<repo>:<tag>`)
/// with `skopeo copy --preserve-digests` over plain HTTP, so blobs, manifests and their
/// annotations arrive unchanged.
pub fn push_oci_layout(layout_dir: &Path, tag: &str, dest: &str) -> Result<()> {
    push_inner(layout_dir, tag, dest, None)
}

fn push_inner(
    layout_dir: &Path,
    tag: &str,
    dest: &str,
    creds: Option<&(String, String)>,
) -> Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "copy",
        "--quiet",
        "--insecure-policy",
        "--dest-tls-verify=false",
        "--preserve-digests",
    ]);
    match creds {
        Some((u, p)) => {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        None => {
            cmd.arg("--dest-no-creds");
        }
    }
    cmd.arg(format!("oci:{}:{tag}", layout_dir.display()))
        .arg(format!("docker://{dest}"));
    let out = run_bounded(&mut cmd, PUSH_TIMEOUT).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::Unavailable("skopeo not found: install Debian package skopeo".into())
        }
        other => other,
    })?;
    if !out.status.success() {
        return Err(Error::InvalidArgument(format!(
            "skopeo copy oci:{}:{tag} docker://{dest} failed ({}): {}",
            layout_dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    debug!(%dest, "pushed OCI layout");
    Ok(())
}

/// Runs `cmd` to completion with its output captured, killing (and reaping) it after `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<std::process::Output> {
    let name = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("start {name}"), e))?;
    // Drain the pipes in threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Unavailable(format!(
                    "{name} did not finish within {limit:?}"
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(Error::io(format!("wait for {name}"), e)),
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}
