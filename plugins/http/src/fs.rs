//! The FUSE file system serving one layer's [`Index`](rootfs::estargz::Index): read-only, in
//! overlay form. Inode `n + 1` is node `n` (hard links are one node, so one inode).
//!
//! Metadata is all in memory. File data comes from the layer ([`Layer::read`]): reads whose
//! chunks are all cached are answered on the FUSE thread; the others run on a thread of their
//! own so that a slow registry never holds up the session (or its unmount).

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use rootfs::estargz::{Node, NodeId, NodeKind, ROOT};

use crate::layer::Layer;

/// How long the kernel may keep entries and attributes: the layer is immutable.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Readahead the kernel may do.
const MAX_READAHEAD: u32 = 1 << 20;

/// The FUSE side of a mount.
pub struct LayerFs {
    layer: Arc<Layer>,
}

impl LayerFs {
    /// The file system over `layer`.
    pub fn new(layer: Arc<Layer>) -> Self {
        LayerFs { layer }
    }

    fn node(&self, ino: INodeNo) -> Option<(NodeId, &Node)> {
        let id = usize::try_from(ino.0).ok()?.checked_sub(1)?;
        self.layer.index.nodes.get(id).map(|n| (id, n))
    }
}

fn inode(id: NodeId) -> INodeNo {
    INodeNo(id as u64 + 1)
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Dir => FileType::Directory,
        NodeKind::Reg => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Char => FileType::CharDevice,
        NodeKind::Block => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

/// The kernel's encoding of a device number in `fuse_attr.rdev` (`new_encode_dev`).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// The FUSE attributes of node `id`.
pub fn file_attr(id: NodeId, n: &Node) -> FileAttr {
    FileAttr {
        ino: inode(id),
        size: n.size,
        blocks: n.size.div_ceil(512),
        atime: n.mtime,
        mtime: n.mtime,
        ctime: n.mtime,
        crtime: n.mtime,
        kind: file_type(n.kind),
        perm: (n.mode & 0o7777) as u16,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: encode_dev(n.rdev.0, n.rdev.1),
        blksize: 4096,
        flags: 0,
    }
}

/// A negative entry (inode 0): "no such name", cacheable by the kernel.
fn negative_attr() -> FileAttr {
    let mut a = file_attr(0, &empty_node());
    a.ino = INodeNo(0);
    a
}

fn empty_node() -> Node {
    Node {
        kind: NodeKind::Reg,
        mode: 0,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: SystemTime::UNIX_EPOCH,
        rdev: (0, 0),
        link_target: String::new(),
        xattrs: Default::default(),
        children: Default::default(),
        parent: ROOT,
        nlink: 0,
        chunks: Vec::new(),
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

impl LayerFs {
    /// `.`, `..` and the children of directory `id`, with their readdir offsets.
    fn entries(&self, id: NodeId, n: &Node) -> Vec<(Vec<u8>, NodeId)> {
        let mut all = vec![(b".".to_vec(), id), (b"..".to_vec(), n.parent)];
        all.extend(
            n.children
                .iter()
                .map(|(name, &child)| (name.as_bytes().to_vec(), child)),
        );
        all
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(max);
        }
        // `ls -l` and overlay's lookups get attributes with the listing.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some((_, dir)) = self.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        if dir.kind != NodeKind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        let child = name
            .to_str()
            .and_then(|name| dir.children.get(name).copied());
        match child {
            Some(id) => reply.entry(
                &TTL,
                &file_attr(id, &self.layer.index.nodes[id]),
                Generation(0),
            ),
            // A negative entry the kernel may cache: the layer never gains files.
            None => reply.entry(&TTL, &negative_attr(), Generation(0)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Some((id, n)) => reply.attr(&TTL, &file_attr(id, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino) {
            Some((_, n)) if n.kind == NodeKind::Symlink => reply.data(n.link_target.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
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
        let Some((_, n)) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if n.kind == NodeKind::Dir {
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
        let Some((id, n)) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != NodeKind::Reg {
            return reply.error(Errno::EINVAL);
        }
        if offset >= n.size {
            return reply.data(&[]);
        }
        let layer = self.layer.clone();
        let serve = move || {
            let _guard = layer.begin_read();
            match layer.read(id, offset, size) {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::warn!(layer = %layer.source.digest, node = id, offset, error = %e, "read failed");
                    reply.error(Errno::EIO)
                }
            }
        };
        if self.layer.range_cached(id, offset, size) {
            return serve();
        }
        // Anything that may need the network runs off the FUSE threads.
        let spawned = std::thread::Builder::new()
            .name("strata-http-read".into())
            .spawn(serve);
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a read thread");
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Some((_, n)) if n.kind == NodeKind::Dir => reply.opened(
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
        let Some((id, n)) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != NodeKind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        let nodes = &self.layer.index.nodes;
        for (i, (name, child)) in self
            .entries(id, n)
            .into_iter()
            .enumerate()
            .skip(offset as usize)
        {
            let kind = file_type(nodes[child].kind);
            if reply.add(inode(child), i as u64 + 1, kind, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some((id, n)) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != NodeKind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        let nodes = &self.layer.index.nodes;
        for (i, (name, child)) in self
            .entries(id, n)
            .into_iter()
            .enumerate()
            .skip(offset as usize)
        {
            let attr = file_attr(child, &nodes[child]);
            if reply.add(
                inode(child),
                i as u64 + 1,
                OsStr::from_bytes(&name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some((_, n)) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let value = name.to_str().and_then(|name| n.xattrs.get(name));
        match value {
            None => reply.error(Errno::NO_XATTR),
            Some(v) => xattr_reply(reply, size, v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some((_, n)) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for name in n.xattrs.keys() {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        xattr_reply(reply, size, &names);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (_, total) = self.layer.cached_bytes();
        let files = self.layer.index.nodes.len() as u64;
        reply.statfs(total.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (`default_permissions`).
        match self.node(ino) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_use_the_kernels_encoding() {
        assert_eq!(encode_dev(0, 0), 0);
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0x1234), 0x0120_0834);
    }

    #[test]
    fn nodes_become_attributes() {
        let mut n = empty_node();
        n.kind = NodeKind::Char;
        n.mode = 0o4755;
        n.uid = 1000;
        n.gid = 100;
        n.nlink = 2;
        n.size = 1000;
        n.rdev = (1, 3);
        let a = file_attr(6, &n);
        assert_eq!(a.ino, INodeNo(7));
        assert_eq!(a.kind, FileType::CharDevice);
        assert_eq!((a.perm, a.uid, a.gid, a.nlink), (0o4755, 1000, 100, 2));
        assert_eq!((a.blocks, a.rdev), (2, 0x103));
    }
}
