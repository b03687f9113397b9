//! A small NFSv3 client for one server, on top of `nfs3_client`: a pool of TCP connections
//! (`nfs3_client` has one request in flight per connection), AUTH_UNIX credentials, and an upper
//! bound on every call, connecting included, so that a dead or hung server turns into an error
//! within the configured timeout and never into a hang.

use std::{
    io,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nfs3_client::{
    MountClient, MountError, Nfs3Client, RpcError,
    nfs3_types::{
        mount::{dirpath, mountstat3},
        nfs3::{
            GETATTR3args, LOOKUP3args, Nfs3Option, Nfs3Result, READ3args, READDIRPLUS3args,
            READLINK3args, cookieverf3, diropargs3, fattr3, filename3, nfs_fh3, nfsstat3,
        },
        rpc::{auth_unix, opaque_auth},
        xdr_codec::Opaque,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Semaphore, SemaphorePermit},
};

use crate::options::Settings;

/// Largest READ this client asks for (ganesha's default `MaxRead` is 1 MiB, and so is ours).
pub const MAX_READ: u32 = 1 << 20;

/// Connections kept open to the server at most (one request in flight on each).
const MAX_CONNECTIONS: usize = 8;

/// Why an NFS call failed.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach the NFS server at {addr}: {source}")]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server did not answer in time.
    #[error("{op}: no answer from the NFS server within {timeout:?}")]
    Timeout {
        /// The call.
        op: &'static str,
        /// The configured bound.
        timeout: Duration,
    },
    /// The server answered with an NFS error status.
    #[error("{op}: {status}")]
    Status {
        /// The call.
        op: &'static str,
        /// The status.
        status: nfsstat3,
    },
    /// The MOUNT service refused the export.
    #[error("mount {export}: {status:?}")]
    MountDenied {
        /// The export asked for.
        export: String,
        /// The MOUNT status.
        status: mountstat3,
    },
    /// An RPC-level failure (protocol, authentication, decoding).
    #[error("{op}: RPC error: {message}")]
    Rpc {
        /// The call.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The server did not answer a call in time a moment ago: calls fail at once for one
    /// timeout's length (the kernel retries a failed page read; each retry would wait again).
    #[error("{op}: the NFS server did not answer within {timeout:?} {ago:?} ago; failing at once")]
    Unresponsive {
        /// The call.
        op: &'static str,
        /// The configured bound.
        timeout: Duration,
        /// How long ago the last call timed out.
        ago: Duration,
    },
    /// The call was abandoned because its file system is being unmounted.
    #[error("{op}: abandoned, the layer is being unmounted")]
    Cancelled {
        /// The call.
        op: &'static str,
    },
}

impl NfsError {
    /// The errno a file system operation reports for this error: the NFS status where it has
    /// a meaning for a read-only file system, EIO for everything about the server or transport.
    pub fn errno(&self) -> i32 {
        match self {
            NfsError::Status { status, .. } => match status {
                nfsstat3::NFS3ERR_NOENT => libc_errno::ENOENT,
                nfsstat3::NFS3ERR_ACCES | nfsstat3::NFS3ERR_PERM => libc_errno::EACCES,
                nfsstat3::NFS3ERR_NOTDIR => libc_errno::ENOTDIR,
                nfsstat3::NFS3ERR_ISDIR => libc_errno::EISDIR,
                nfsstat3::NFS3ERR_INVAL => libc_errno::EINVAL,
                nfsstat3::NFS3ERR_NAMETOOLONG => libc_errno::ENAMETOOLONG,
                _ => libc_errno::EIO,
            },
            _ => libc_errno::EIO,
        }
    }

    /// True if the server answered that the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            NfsError::Status {
                status: nfsstat3::NFS3ERR_NOENT | nfsstat3::NFS3ERR_STALE,
                ..
            } | NfsError::MountDenied {
                status: mountstat3::MNT3ERR_NOENT,
                ..
            }
        )
    }
}

/// The errno values used here (from `nix`, as plain integers for FUSE replies).
pub mod libc_errno {
    use nix::errno::Errno;

    /// No such file or directory.
    pub const ENOENT: i32 = Errno::ENOENT as i32;
    /// Permission denied.
    pub const EACCES: i32 = Errno::EACCES as i32;
    /// Not a directory.
    pub const ENOTDIR: i32 = Errno::ENOTDIR as i32;
    /// Is a directory.
    pub const EISDIR: i32 = Errno::EISDIR as i32;
    /// Invalid argument.
    pub const EINVAL: i32 = Errno::EINVAL as i32;
    /// File name too long.
    pub const ENAMETOOLONG: i32 = Errno::ENAMETOOLONG as i32;
    /// I/O error.
    pub const EIO: i32 = Errno::EIO as i32;
}

/// A TCP stream as `nfs3_client` reads and writes it. Unlike a plain wrapper, a read of zero
/// bytes (the server closed the connection) is an error: `nfs3_client` loops on short reads,
/// and would spin forever on a closed connection.
pub struct Io(TcpStream);

impl nfs3_client::io::AsyncRead for Io {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf).await?;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        Ok(n)
    }
}

impl nfs3_client::io::AsyncWrite for Io {
    async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).await
    }
}

/// One connection to the NFS service.
pub type Conn = Nfs3Client<Io>;

/// An entry of a directory listing (READDIRPLUS), `.` and `..` left out.
#[derive(Debug)]
pub struct DirEntry {
    /// The name.
    pub name: Vec<u8>,
    /// Its attributes, when the server sent them.
    pub attr: Option<fattr3>,
    /// Its handle, when the server sent it.
    pub handle: Option<nfs_fh3>,
}

/// A connection taken from the pool for one call.
pub struct Lease<'a> {
    conn: Conn,
    reused: bool,
    _permit: SemaphorePermit<'a>,
}

impl Lease<'_> {
    /// The connection.
    pub fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

/// What to do after a call on a leased connection.
pub enum Next<R> {
    /// Return this.
    Done(Result<R, NfsError>),
    /// The (reused) connection was dead: try once more on a fresh one.
    Retry,
}

/// Runs `$call` (an expression using `$conn: &mut Conn`) on a pooled connection, retrying once
/// on a fresh connection if a reused one turns out dead; bounded by the client's timeout.
macro_rules! rpc {
    ($client:expr, $op:expr, |$conn:ident| $call:expr) => {
        $client.bounded($op, async {
            let mut fresh = false;
            loop {
                let mut lease = $client.checkout(fresh).await?;
                let result = {
                    let $conn = lease.conn();
                    $call.await
                };
                match $client.checkin($op, lease, result) {
                    $crate::client::Next::Done(r) => break r,
                    $crate::client::Next::Retry => fresh = true,
                }
            }
        })
    };
}

/// An NFSv3 client of one server and export.
pub struct Client {
    settings: Settings,
    credential: opaque_auth<'static>,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    /// When a call last timed out (cleared by any answer).
    hung_since: Mutex<Option<Instant>>,
}

impl Client {
    /// A client for the server and export of `settings`; connects lazily.
    pub fn new(settings: Settings) -> Self {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(0);
        let credential = opaque_auth::auth_unix(&auth_unix {
            stamp,
            machinename: Opaque::owned(b"strata".to_vec()),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            gids: Vec::new(),
        });
        Client {
            settings,
            credential,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(MAX_CONNECTIONS),
            hung_since: Mutex::new(None),
        }
    }

    /// The settings this client was made with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Runs `call` with the client's timeout.
    pub async fn bounded<R>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<R, NfsError>>,
    ) -> Result<R, NfsError> {
        let timeout = self.settings.timeout;
        if let Some(since) = *self.hung_lock() {
            let ago = since.elapsed();
            if ago < timeout {
                return Err(NfsError::Unresponsive { op, timeout, ago });
            }
        }
        match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                *self.hung_lock() = Some(Instant::now());
                Err(NfsError::Timeout { op, timeout })
            }
            Ok(r) => {
                if !matches!(
                    r,
                    Err(NfsError::Unreachable { .. } | NfsError::Cancelled { .. })
                ) {
                    *self.hung_lock() = None;
                }
                r
            }
        }
    }

    /// Forgets that the server was unresponsive, so that the next call really tries (a probe).
    pub fn reset_unresponsive(&self) {
        *self.hung_lock() = None;
    }

    fn hung_lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.hung_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, NfsError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| NfsError::Unreachable { addr, source })?;
        stream
            .set_nodelay(true)
            .map_err(|source| NfsError::Unreachable { addr, source })?;
        Ok(stream)
    }

    /// Takes an idle connection (unless `fresh`) or opens a new one.
    pub async fn checkout(&self, fresh: bool) -> Result<Lease<'_>, NfsError> {
        let permit = self.permits.acquire().await.map_err(|_| NfsError::Rpc {
            op: "connect",
            message: "the client is closed".into(),
        })?;
        if !fresh && let Some(conn) = self.idle_lock().pop() {
            return Ok(Lease {
                conn,
                reused: true,
                _permit: permit,
            });
        }
        let stream = self.connect(self.settings.nfs_addr).await?;
        Ok(Lease {
            conn: Nfs3Client::new_with_auth(
                Io(stream),
                self.credential.clone(),
                opaque_auth::default(),
            ),
            reused: false,
            _permit: permit,
        })
    }

    /// Returns the connection to the pool if it is still usable, and says what to do next.
    pub fn checkin<R>(
        &self,
        op: &'static str,
        lease: Lease<'_>,
        result: Result<R, RpcError>,
    ) -> Next<R> {
        match result {
            Ok(r) => {
                self.idle_lock().push(lease.conn);
                Next::Done(Ok(r))
            }
            Err(e) if e.is_connection_reusable() => {
                self.idle_lock().push(lease.conn);
                Next::Done(Err(NfsError::Rpc {
                    op,
                    message: e.to_string(),
                }))
            }
            Err(e) => {
                // The transport is dead; the other idle connections most likely too (the
                // server restarted or went away).
                self.idle_lock().clear();
                if lease.reused {
                    tracing::debug!(op, error = %e, "NFS connection lost; reconnecting");
                    return Next::Retry;
                }
                let source = match e {
                    RpcError::Io(e) => e,
                    other => io::Error::other(other.to_string()),
                };
                Next::Done(Err(NfsError::Unreachable {
                    addr: self.settings.nfs_addr,
                    source,
                }))
            }
        }
    }

    fn idle_lock(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        // A panic while holding the lock cannot leave the Vec inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the MOUNT service for the export's root handle.
    pub async fn export_root(&self) -> Result<nfs_fh3, NfsError> {
        let addr = self.settings.mount_addr;
        let export = self.settings.export.clone();
        self.bounded("mount", async {
            let stream = self.connect(addr).await?;
            let mut mount = MountClient::new_with_auth(
                Io(stream),
                self.credential.clone(),
                opaque_auth::default(),
            );
            let path = dirpath(Opaque::owned(export.as_bytes().to_vec()));
            match mount.mnt(path).await {
                Ok(ok) => Ok(nfs_fh3 { data: ok.fhandle.0 }),
                Err(MountError::Denied(status)) => Err(NfsError::MountDenied { export, status }),
                Err(MountError::Rpc(RpcError::Io(source))) => {
                    Err(NfsError::Unreachable { addr, source })
                }
                Err(MountError::Rpc(e)) => Err(NfsError::Rpc {
                    op: "mount",
                    message: e.to_string(),
                }),
            }
        })
        .await
    }

    /// GETATTR.
    pub async fn getattr(&self, fh: &nfs_fh3) -> Result<fattr3, NfsError> {
        let args = GETATTR3args { object: fh.clone() };
        match rpc!(self, "getattr", |c| c.getattr(&args)).await? {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((status, _)) => Err(NfsError::Status {
                op: "getattr",
                status,
            }),
        }
    }

    /// LOOKUP of `name` in `dir`: the handle and attributes of the entry.
    pub async fn lookup(&self, dir: &nfs_fh3, name: &[u8]) -> Result<(nfs_fh3, fattr3), NfsError> {
        let args = LOOKUP3args {
            what: diropargs3 {
                dir: dir.clone(),
                name: filename3(Opaque::borrowed(name)),
            },
        };
        let ok = match rpc!(self, "lookup", |c| c.lookup(&args)).await? {
            Nfs3Result::Ok(ok) => ok,
            Nfs3Result::Err((status, _)) => {
                return Err(NfsError::Status {
                    op: "lookup",
                    status,
                });
            }
        };
        let attr = match ok.obj_attributes {
            Nfs3Option::Some(attr) => attr,
            Nfs3Option::None => self.getattr(&ok.object).await?,
        };
        Ok((ok.object, attr))
    }

    /// LOOKUP of each component of `path` (`/`-separated) from `dir`.
    pub async fn lookup_path(
        &self,
        dir: &nfs_fh3,
        path: &[&[u8]],
    ) -> Result<(nfs_fh3, fattr3), NfsError> {
        let mut current = (dir.clone(), self.getattr(dir).await?);
        for name in path {
            current = self.lookup(&current.0, name).await?;
        }
        Ok(current)
    }

    /// The whole listing of directory `dir` (READDIRPLUS until EOF), without `.` and `..`.
    pub async fn readdir_all(&self, dir: &nfs_fh3) -> Result<Vec<DirEntry>, NfsError> {
        let mut entries = Vec::new();
        let mut cookie = 0;
        let mut verifier = cookieverf3::default();
        loop {
            let args = READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf: verifier,
                dircount: 64 * 1024,
                maxcount: MAX_READ,
            };
            let ok = match rpc!(self, "readdirplus", |c| c.readdirplus(&args)).await? {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((status, _)) => {
                    return Err(NfsError::Status {
                        op: "readdirplus",
                        status,
                    });
                }
            };
            verifier = ok.cookieverf;
            let eof = ok.reply.eof;
            let list = ok.reply.entries.into_inner();
            if list.is_empty() && !eof {
                return Err(NfsError::Rpc {
                    op: "readdirplus",
                    message: "empty page before the end of the directory".into(),
                });
            }
            for e in list {
                cookie = e.cookie;
                let name = e.name.0.into_owned();
                if name == b"." || name == b".." {
                    continue;
                }
                entries.push(DirEntry {
                    name,
                    attr: match e.name_attributes {
                        Nfs3Option::Some(a) => Some(a),
                        Nfs3Option::None => None,
                    },
                    handle: match e.name_handle {
                        Nfs3Option::Some(h) => Some(h),
                        Nfs3Option::None => None,
                    },
                });
            }
            if eof {
                return Ok(entries);
            }
        }
    }

    /// READ of up to `count` bytes (at most [`MAX_READ`]) at `offset`: the data and whether it
    /// reaches the end of the file.
    pub async fn read(
        &self,
        fh: &nfs_fh3,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), NfsError> {
        let args = READ3args {
            file: fh.clone(),
            offset,
            count: count.min(MAX_READ),
        };
        match rpc!(self, "read", |c| c.read(&args)).await? {
            Nfs3Result::Ok(ok) => {
                let data = ok.data.into_owned();
                if data.len() != ok.count as usize || data.len() > args.count as usize {
                    return Err(NfsError::Rpc {
                        op: "read",
                        message: format!(
                            "the server sent {} bytes for a count of {} (asked {})",
                            data.len(),
                            ok.count,
                            args.count
                        ),
                    });
                }
                Ok((data, ok.eof))
            }
            Nfs3Result::Err((status, _)) => Err(NfsError::Status { op: "read", status }),
        }
    }

    /// Reads `len` bytes at `offset` (fewer only at the end of the file), in READs of at most
    /// [`MAX_READ`].
    pub async fn read_exact(
        &self,
        fh: &nfs_fh3,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, NfsError> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let want = u32::try_from(len - out.len()).unwrap_or(MAX_READ);
            let (data, eof) = self.read(fh, offset + out.len() as u64, want).await?;
            let empty = data.is_empty();
            out.extend_from_slice(&data);
            if eof || empty {
                break;
            }
        }
        Ok(out)
    }

    /// READLINK.
    pub async fn readlink(&self, fh: &nfs_fh3) -> Result<Vec<u8>, NfsError> {
        let args = READLINK3args {
            symlink: fh.clone(),
        };
        match rpc!(self, "readlink", |c| c.readlink(&args)).await? {
            Nfs3Result::Ok(ok) => Ok(ok.data.0.into_owned()),
            Nfs3Result::Err((status, _)) => Err(NfsError::Status {
                op: "readlink",
                status,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn settings(port: u16, timeout: Duration) -> Settings {
        Settings {
            server_name: "127.0.0.1".into(),
            mount_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            nfs_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            export: "/export".into(),
            timeout,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_closed_port_is_unreachable_at_once() {
        // Bind then drop a listener: nothing listens on that port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(settings(port, Duration::from_secs(5)));
        let start = std::time::Instant::now();
        let e = runtime()
            .block_on(client.getattr(&nfs_fh3::default()))
            .unwrap_err();
        assert!(matches!(e, NfsError::Unreachable { .. }), "{e}");
        assert_eq!(e.errno(), libc_errno::EIO);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = Client::new(settings(port, Duration::from_millis(300)));
        let start = std::time::Instant::now();
        let e = runtime()
            .block_on(client.read(&nfs_fh3::default(), 0, 10))
            .unwrap_err();
        assert!(matches!(e, NfsError::Timeout { op: "read", .. }), "{e}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        drop(listener);
    }

    #[test]
    fn after_a_timeout_calls_fail_at_once_until_a_probe() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = Client::new(settings(port, Duration::from_millis(300)));
        let rt = runtime();
        let e = rt
            .block_on(client.getattr(&nfs_fh3::default()))
            .unwrap_err();
        assert!(matches!(e, NfsError::Timeout { .. }), "{e}");
        let start = std::time::Instant::now();
        let e = rt
            .block_on(client.getattr(&nfs_fh3::default()))
            .unwrap_err();
        assert!(matches!(e, NfsError::Unresponsive { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_millis(100));
        client.reset_unresponsive();
        let e = rt
            .block_on(client.getattr(&nfs_fh3::default()))
            .unwrap_err();
        assert!(
            matches!(e, NfsError::Timeout { .. }),
            "a probe really tries: {e}"
        );
        drop(listener);
    }

    #[test]
    fn a_server_that_hangs_up_is_an_error_not_a_spin() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let closer = std::thread::spawn(move || {
            // Accept the (fresh, so not retried) connection and close it.
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4];
            let _ = std::io::Read::read(&mut s, &mut buf);
        });
        let client = Client::new(settings(port, Duration::from_secs(5)));
        let start = std::time::Instant::now();
        let e = runtime()
            .block_on(client.getattr(&nfs_fh3::default()))
            .unwrap_err();
        assert!(matches!(e, NfsError::Unreachable { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
        let _ = closer.join();
    }

    #[test]
    fn nfs_statuses_map_to_errnos() {
        let e = NfsError::Status {
            op: "lookup",
            status: nfsstat3::NFS3ERR_NOENT,
        };
        assert_eq!(e.errno(), libc_errno::ENOENT);
        assert!(e.is_not_found());
        let e = NfsError::Status {
            op: "read",
            status: nfsstat3::NFS3ERR_IO,
        };
        assert_eq!(e.errno(), libc_errno::EIO);
        assert!(!e.is_not_found());
    }
}
