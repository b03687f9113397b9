//! A real NFS server for tests: Debian's `nfs-ganesha` (VFS backend) on 127.0.0.1, exporting one
//! directory over NFSv3, with the `rpcbind` it needs to start (see `shared/docs/TESTING.md`).
//!
//! Every process started here is stopped (and waited for: PID 1 does not reap) when its guard is
//! dropped, also when a test fails; every wait is bounded. A missing program is a failure naming
//! the package, never a skip.
//!
//! The export's NFS path is the directory's own path (`Pseudo = Path`), so the plugin option
//! `export` names the directory on both sides.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// How long the server may take to answer after start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// rpcbind, shared by every server of this process.
struct Rpcbind {
    /// None when an rpcbind this process did not start was already running.
    child: Option<Child>,
}

static RPCBIND: Mutex<Weak<Rpcbind>> = Mutex::new(Weak::new());

/// Held while a server starts or stops, so that a server starting on the ports of one that is
/// stopping waits for it to be gone.
static LIFECYCLE: Mutex<()> = Mutex::new(());

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn require_program(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install Debian's {package} (`cargo xtask test` installs it)"
    );
}

impl Rpcbind {
    fn get() -> Arc<Rpcbind> {
        let mut slot = RPCBIND.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = slot.upgrade() {
            return r;
        }
        let r = if port_open(111) {
            Arc::new(Rpcbind { child: None })
        } else {
            require_program("/usr/sbin/rpcbind", "rpcbind");
            let child = Command::new("/usr/sbin/rpcbind")
                .arg("-f")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start rpcbind -f");
            let mut r = Rpcbind { child: Some(child) };
            let start = Instant::now();
            while !port_open(111) {
                if let Some(status) = r.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                    r.child = None;
                    panic!("rpcbind exited at start: {status}");
                }
                assert!(
                    start.elapsed() < START_TIMEOUT,
                    "rpcbind does not listen on port 111"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Arc::new(r)
        };
        *slot = Arc::downgrade(&r);
        r
    }
}

impl Drop for Rpcbind {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            stop_child(child, "rpcbind");
        }
    }
}

/// SIGTERM, bounded wait, then SIGKILL and wait.
fn stop_child(child: &mut Child, what: &str) {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGCONT);
    let _ = kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < STOP_TIMEOUT {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{what} did not stop within {STOP_TIMEOUT:?}: killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Two TCP ports on 127.0.0.1 that nothing listens on (as of now).
pub fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// A running nfs-ganesha exporting one directory on 127.0.0.1.
pub struct NfsServer {
    /// The exported directory (also its NFS export path).
    pub export: PathBuf,
    /// The NFS service port.
    pub nfs_port: u16,
    /// The MOUNT service port.
    pub mount_port: u16,
    /// Config, log and pid file.
    state: tempfile::TempDir,
    ganesha: Option<Child>,
    paused: bool,
    _rpcbind: Arc<Rpcbind>,
}

impl NfsServer {
    /// Starts a server exporting `export` (read-only, root not squashed) on the given ports.
    pub fn start(export: &Path, nfs_port: u16, mount_port: u16) -> NfsServer {
        require_program("/usr/bin/ganesha.nfsd", "nfs-ganesha");
        require_program(
            "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so",
            "nfs-ganesha-vfs",
        );
        let export = export.canonicalize().unwrap();
        let state = tempfile::Builder::new()
            .prefix("strata-ganesha-")
            .tempdir()
            .unwrap();
        let config = format!(
            r#"NFS_CORE_PARAM {{
    Bind_Addr = 127.0.0.1; NFS_Port = {nfs_port}; MNT_Port = {mount_port};
    Protocols = 3, 4; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false;
    mount_path_pseudo = true;
}}
NFSv4 {{ Graceless = true; Only_Numeric_Owners = true; }}
EXPORT {{
    Export_Id = 1; Path = "{path}"; Pseudo = "{path}";
    Access_Type = RO; Squash = No_Root_Squash; SecType = sys; Transports = TCP;
    Attr_Expiration_Time = 0; MaxRead = 1048576;
    CLIENT {{ Clients = 127.0.0.1; }}
    FSAL {{ Name = VFS; }}
}}
"#,
            path = export.display()
        );
        std::fs::write(state.path().join("ganesha.conf"), config).unwrap();
        let mut server = NfsServer {
            export,
            nfs_port,
            mount_port,
            state,
            ganesha: None,
            paused: false,
            _rpcbind: Rpcbind::get(),
        };
        server.spawn();
        server
    }

    /// Starts a server exporting `export` on free ports.
    pub fn start_on_free_ports(export: &Path) -> NfsServer {
        let (nfs, mount) = free_ports();
        NfsServer::start(export, nfs, mount)
    }

    fn spawn(&mut self) {
        let _lifecycle = LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
        assert!(self.ganesha.is_none(), "ganesha is already running");
        let s = self.state.path();
        let child = Command::new("/usr/bin/ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(s.join("ganesha.conf"))
            .arg("-L")
            .arg(s.join("ganesha.log"))
            .arg("-p")
            .arg(s.join("ganesha.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ganesha.nfsd");
        self.ganesha = Some(child);
        let start = Instant::now();
        while !(port_open(self.nfs_port) && port_open(self.mount_port)) {
            if let Some(status) = self.ganesha.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.ganesha = None;
                panic!(
                    "ganesha.nfsd exited at start ({status}); its log:\n{}",
                    self.log_tail()
                );
            }
            if start.elapsed() > START_TIMEOUT {
                let log = self.log_tail();
                if let Some(mut child) = self.ganesha.take() {
                    stop_child(&mut child, "ganesha.nfsd");
                }
                panic!("ganesha.nfsd does not answer within {START_TIMEOUT:?}; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.state.path().join("ganesha.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops the server (SIGTERM, bounded wait, SIGKILL).
    pub fn stop(&mut self) {
        let _lifecycle = LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = self.ganesha.take() {
            stop_child(&mut child, "ganesha.nfsd");
        }
        self.paused = false;
    }

    /// Starts the server again, on the same ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&mut self) {
        if let Some(child) = &self.ganesha {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGSTOP).unwrap();
            self.paused = true;
        }
    }

    /// Lets a paused server run again.
    pub fn resume(&mut self) {
        if let Some(child) = &self.ganesha {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT).unwrap();
        }
        self.paused = false;
    }

    /// The plugin options naming this server.
    pub fn options(&self, timeout_ms: u64) -> serde_json::Value {
        serde_json::json!({
            "server": "127.0.0.1",
            "export": self.export.to_str().unwrap(),
            "mount_port": self.mount_port,
            "nfs_port": self.nfs_port,
            "store_layout": "sha256-dirs",
            "nfs_version": 3,
            "timeout_ms": timeout_ms,
        })
    }
}

impl Drop for NfsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server for `export` on the given ports shared by everyone in this process who asks for the
/// same (the conformance suite's tests run in parallel); it stops when the last user drops it.
pub fn shared_server(export: &Path, nfs_port: u16, mount_port: u16) -> Arc<NfsServer> {
    static SHARED: Mutex<Weak<NfsServer>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.upgrade() {
        assert_eq!(
            (s.nfs_port, s.mount_port),
            (nfs_port, mount_port),
            "one shared NFS server per process"
        );
        return s;
    }
    let s = Arc::new(NfsServer::start(export, nfs_port, mount_port));
    *slot = Arc::downgrade(&s);
    s
}
