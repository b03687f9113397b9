//! The FUSE file system serving one layer from the NFS server: read-only, in overlay form.
//!
//! A layer never changes once published, so everything learned from the server is kept for the
//! life of the mount: attributes and handles of every inode seen, whole directory listings
//! (fetched with one READDIRPLUS pass, then lookups, negative ones included, are answered
//! locally), symlink targets. The kernel is told the same (long entry and attribute timeouts,
//! `FOPEN_KEEP_CACHE` for files and directories), so file data read once stays in its page cache
//! and a second read does not cross the network. Extended attributes come from the layer's
//! metadata index.
//!
//! Kernel requests that need the server run as tasks on the plugin's runtime, so slow calls do
//! not hold up the FUSE threads; each is bounded by the client's timeout and abandoned (EIO) as
//! soon as the mount is being unmounted.

use std::{
    collections::HashMap,
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyXattr, Request,
};
use nfs3_client::nfs3_types::nfs3::{fattr3, ftype3, nfs_fh3, nfstime3};
use tokio::sync::{OnceCell, watch};

use crate::{
    client::{Client, NfsError},
    index::{LayerIndex, Xattrs},
};

/// How long the kernel may keep entries and attributes: the layer is immutable.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Readahead the kernel may do (and so the size of most reads it sends): one NFS READ.
const MAX_READAHEAD: u32 = crate::client::MAX_READ;

/// An inode of the layer.
struct Node {
    fh: nfs_fh3,
    attr: FileAttr,
    /// The inode of the directory it was first seen in (itself for the root).
    parent: u64,
    xattrs: Option<Xattrs>,
    /// The path it was first seen at, relative to the layer root (for the index).
    path: Vec<u8>,
    listing: OnceCell<Arc<Listing>>,
    link: OnceCell<Vec<u8>>,
}

/// A directory's entries, `.` and `..` aside.
struct Listing {
    entries: Vec<(Vec<u8>, u64, FileType)>,
    by_name: HashMap<Vec<u8>, usize>,
}

#[derive(Default)]
struct Nodes {
    /// Node `ino` is at index `ino - 1`.
    by_ino: Vec<Arc<Node>>,
    /// NFS file id -> inode: hard links are one inode.
    by_fileid: HashMap<u64, u64>,
}

/// What the FUSE threads and the runtime's tasks share.
pub struct Shared {
    client: Arc<Client>,
    runtime: tokio::runtime::Handle,
    index: LayerIndex,
    nodes: RwLock<Nodes>,
    cancel: watch::Sender<bool>,
}

impl Shared {
    /// The state of a mount of the layer whose root directory is `root` (handle, attributes).
    pub fn new(
        client: Arc<Client>,
        runtime: tokio::runtime::Handle,
        index: LayerIndex,
        root: (nfs_fh3, fattr3),
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            client,
            runtime,
            index,
            nodes: RwLock::new(Nodes::default()),
            cancel: watch::channel(false).0,
        });
        let ino = shared.insert(root.0, &root.1, Vec::new(), 1);
        debug_assert_eq!(ino, u64::from(INodeNo::ROOT));
        shared
    }

    /// Abandons every call in flight and every later one (they fail with EIO).
    pub fn cancel(&self) {
        self.cancel.send_replace(true);
    }

    fn node(&self, ino: INodeNo) -> Option<Arc<Node>> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        let index = usize::try_from(ino.0).ok()?.checked_sub(1)?;
        nodes.by_ino.get(index).cloned()
    }

    /// The inode of the object with attributes `attr` (seen at `path`), creating it if new.
    fn insert(&self, fh: nfs_fh3, attr: &fattr3, path: Vec<u8>, parent: u64) -> u64 {
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&ino) = nodes.by_fileid.get(&attr.fileid) {
            return ino;
        }
        let ino = nodes.by_ino.len() as u64 + 1;
        let xattrs = self.index.xattrs(&path);
        nodes.by_ino.push(Arc::new(Node {
            fh,
            attr: file_attr(ino, attr),
            parent: if ino == 1 { 1 } else { parent },
            xattrs,
            path,
            listing: OnceCell::new(),
            link: OnceCell::new(),
        }));
        nodes.by_fileid.insert(attr.fileid, ino);
        ino
    }

    /// Runs `call` unless or until the mount is being unmounted.
    async fn guarded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, NfsError>>,
    ) -> Result<T, NfsError> {
        let mut cancelled = self.cancel.subscribe();
        if *cancelled.borrow() {
            return Err(NfsError::Cancelled { op });
        }
        tokio::select! {
            r = call => r,
            _ = cancelled.wait_for(|c| *c) => Err(NfsError::Cancelled { op }),
        }
    }

    /// The listing of directory `dir`, fetched once.
    async fn listing(&self, dir: &Node, dir_ino: u64) -> Result<Arc<Listing>, NfsError> {
        dir.listing
            .get_or_try_init(|| async {
                let raw = self
                    .guarded("readdir", self.client.readdir_all(&dir.fh))
                    .await?;
                let mut entries = Vec::with_capacity(raw.len());
                for e in raw {
                    let (fh, attr) = match (e.handle, e.attr) {
                        (Some(fh), Some(attr)) => (fh, attr),
                        _ => {
                            self.guarded("lookup", self.client.lookup(&dir.fh, &e.name))
                                .await?
                        }
                    };
                    let mut path = dir.path.clone();
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(&e.name);
                    let kind = file_type(attr.type_);
                    let ino = self.insert(fh, &attr, path, dir_ino);
                    entries.push((e.name, ino, kind));
                }
                let by_name = entries
                    .iter()
                    .enumerate()
                    .map(|(i, (name, _, _))| (name.clone(), i))
                    .collect();
                Ok(Arc::new(Listing { entries, by_name }))
            })
            .await
            .cloned()
    }
}

/// The FUSE side of a mount.
pub struct LayerFs {
    shared: Arc<Shared>,
}

impl LayerFs {
    /// The file system over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        LayerFs { shared }
    }

    /// Runs `task` on the runtime (it replies itself).
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.shared.runtime.spawn(task);
    }
}

fn errno(e: &NfsError) -> Errno {
    Errno::from_i32(e.errno())
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger readahead means fewer, larger NFS reads; the kernel caps it to what it allows.
        if let Err(max) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.shared.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        if dir.attr.kind != FileType::Directory {
            return reply.error(Errno::ENOTDIR);
        }
        let shared = self.shared.clone();
        let name = name.as_bytes().to_vec();
        self.spawn(async move {
            match shared.listing(&dir, parent.0).await {
                Ok(listing) => match listing.by_name.get(&name) {
                    Some(&i) => {
                        let ino = listing.entries[i].1;
                        match shared.node(INodeNo(ino)) {
                            Some(node) => reply.entry(&TTL, &node.attr, Generation(0)),
                            None => reply.error(Errno::EIO),
                        }
                    }
                    // A negative entry the kernel may cache: the layer never gains files.
                    None => reply.entry(&TTL, &negative_attr(), Generation(0)),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "lookup failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.shared.node(ino) {
            Some(node) => reply.attr(&TTL, &node.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let Some(node) = self.shared.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if node.attr.kind != FileType::Symlink {
            return reply.error(Errno::EINVAL);
        }
        let shared = self.shared.clone();
        self.spawn(async move {
            let target = node
                .link
                .get_or_try_init(|| shared.guarded("readlink", shared.client.readlink(&node.fh)))
                .await;
            match target {
                Ok(t) => reply.data(t),
                Err(e) => {
                    tracing::warn!(error = %e, "readlink failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Read-only: nothing to flush (fuser's default answers ENOSYS with a warning).
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(node) = self.shared.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if node.attr.kind == FileType::Directory {
            return reply.error(Errno::EISDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some(node) = self.shared.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if offset >= node.attr.size {
            return reply.data(&[]);
        }
        let len = (node.attr.size - offset).min(u64::from(size)) as usize;
        let shared = self.shared.clone();
        self.spawn(async move {
            let read = shared.client.read_exact(&node.fh, offset, len);
            match shared.guarded("read", read).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::warn!(error = %e, "read failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.shared.node(ino) {
            Some(node) if node.attr.kind == FileType::Directory => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.shared.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let shared = self.shared.clone();
        self.spawn(async move {
            let listing = match shared.listing(&dir, ino.0).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "readdir failed");
                    return reply.error(errno(&e));
                }
            };
            // Offsets: 1 is after ".", 2 after "..", 3 + i after entry i.
            let dots = [
                (b".".as_slice(), ino.0, FileType::Directory),
                (b"..".as_slice(), dir.parent, FileType::Directory),
            ];
            let all = dots.into_iter().chain(
                listing
                    .entries
                    .iter()
                    .map(|(name, ino, kind)| (name.as_slice(), *ino, *kind)),
            );
            for (i, (name, ino, kind)) in all.enumerate().skip(offset as usize) {
                if reply.add(INodeNo(ino), i as u64 + 1, kind, OsStr::from_bytes(name)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(node) = self.shared.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let value = node
            .xattrs
            .as_ref()
            .and_then(|x| x.iter().find(|(n, _)| n == name.as_bytes()))
            .map(|(_, v)| v.as_slice());
        match value {
            None => reply.error(Errno::NO_XATTR),
            Some(v) => xattr_reply(reply, size, v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(node) = self.shared.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for (name, _) in node.xattrs.iter().flat_map(|x| x.iter()) {
            names.extend_from_slice(name);
            names.push(0);
        }
        xattr_reply(reply, size, &names);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (`default_permissions`).
        match self.shared.node(ino) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }
}

/// The getxattr/listxattr protocol: size 0 asks for the length; too small a buffer is ERANGE.
fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    let Ok(len) = u32::try_from(value.len()) else {
        return reply.error(Errno::E2BIG);
    };
    if size == 0 {
        reply.size(len)
    } else if size < len {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}

fn file_type(t: ftype3) -> FileType {
    match t {
        ftype3::NF3REG => FileType::RegularFile,
        ftype3::NF3DIR => FileType::Directory,
        ftype3::NF3BLK => FileType::BlockDevice,
        ftype3::NF3CHR => FileType::CharDevice,
        ftype3::NF3LNK => FileType::Symlink,
        ftype3::NF3SOCK => FileType::Socket,
        ftype3::NF3FIFO => FileType::NamedPipe,
    }
}

fn time(t: nfstime3) -> SystemTime {
    UNIX_EPOCH + Duration::new(u64::from(t.seconds), t.nseconds.min(999_999_999))
}

/// The kernel's encoding of a device number in `fuse_attr.rdev` (`new_encode_dev`).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// The FUSE attributes of inode `ino` from its NFS attributes.
pub fn file_attr(ino: u64, a: &fattr3) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.used.div_ceil(512),
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.mtime),
        kind: file_type(a.type_),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: encode_dev(a.rdev.specdata1, a.rdev.specdata2),
        blksize: 4096,
        flags: 0,
    }
}

/// A negative entry (inode 0): "no such name", cacheable by the kernel.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nfs3_client::nfs3_types::nfs3::specdata3;

    #[test]
    fn device_numbers_use_the_kernels_encoding() {
        assert_eq!(encode_dev(0, 0), 0);
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0x1234), 0x0120_0834);
    }

    #[test]
    fn nfs_attributes_become_fuse_attributes() {
        let a = fattr3 {
            type_: ftype3::NF3CHR,
            mode: 0o104755,
            nlink: 2,
            uid: 1000,
            gid: 100,
            size: 1000,
            used: 4096,
            rdev: specdata3 {
                specdata1: 0,
                specdata2: 0,
            },
            fsid: 1,
            fileid: 42,
            atime: nfstime3 {
                seconds: 1,
                nseconds: 5,
            },
            mtime: nfstime3 {
                seconds: 1_700_000_000,
                nseconds: 0,
            },
            ctime: nfstime3 {
                seconds: 3,
                nseconds: 0,
            },
        };
        let f = file_attr(7, &a);
        assert_eq!(f.ino, INodeNo(7));
        assert_eq!(f.kind, FileType::CharDevice);
        assert_eq!(f.perm, 0o4755);
        assert_eq!((f.uid, f.gid, f.nlink, f.rdev), (1000, 100, 2, 0));
        assert_eq!(f.blocks, 8);
        assert_eq!(f.mtime, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert_eq!(f.atime, UNIX_EPOCH + Duration::new(1, 5));
    }
}
