//! File system helpers for the differs: sorted directory listings through directory fds,
//! compact stat records, xattrs, link targets and content comparison.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::{Error, Result};

/// The xattr carried into layers (as containerd does).
pub(crate) const CAPABILITY_XATTR: &str = "security.capability";

/// What the differs need of a stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub nlink: u64,
    pub dev: u64,
    pub ino: u64,
}

impl Meta {
    fn from_stat(st: &rustix::fs::Stat) -> Meta {
        Meta {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: st.st_mtime,
            mtime_nsec: u32::try_from(st.st_mtime_nsec).unwrap_or(0),
            #[allow(clippy::useless_conversion)] // c_ulong on some targets
            nlink: u64::from(st.st_nlink),
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }

    pub fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == FileType::Directory
    }

    pub fn is_symlink(&self) -> bool {
        self.file_type() == FileType::Symlink
    }

    pub fn is_regular(&self) -> bool {
        self.file_type() == FileType::RegularFile
    }

    /// An overlay whiteout: a character device 0/0.
    pub fn is_whiteout(&self) -> bool {
        self.file_type() == FileType::CharacterDevice && self.rdev == 0
    }

    /// A non-directory with other names (a hard-link group).
    pub fn is_linked(&self) -> bool {
        !self.is_dir() && self.nlink > 1
    }
}

/// One directory entry with its (not followed) stat.
#[derive(Debug)]
pub(crate) struct Entry {
    pub name: CString,
    pub meta: Meta,
}

impl Entry {
    pub fn name_bytes(&self) -> &[u8] {
        self.name.to_bytes()
    }
}

/// An open directory.
#[derive(Debug)]
pub(crate) struct DirFd {
    fd: OwnedFd,
}

impl DirFd {
    /// Opens a directory by path (symlinks in the final component are not followed).
    pub fn open(path: &Path) -> Result<DirFd> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(format!("open directory {}", path.display()), e.into()))?;
        Ok(DirFd { fd })
    }

    /// Opens the subdirectory `name`; `path` is its full path, for messages.
    pub fn open_child(&self, name: &CString, path: &Path) -> Result<DirFd> {
        let fd = rustix::fs::openat(
            &self.fd,
            name.as_c_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(format!("open directory {}", path.display()), e.into()))?;
        Ok(DirFd { fd })
    }

    /// The entries (without `.` and `..`), sorted by name bytes, each with its lstat.
    pub fn entries(&self, path: &Path) -> Result<Vec<Entry>> {
        let err = |what: &str, e: Errno| Error::io(format!("{what} {}", path.display()), e.into());
        let mut dir = Dir::read_from(&self.fd).map_err(|e| err("read directory", e))?;
        let mut out = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| err("read directory", e))?;
            let name = entry.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let st = match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                // Removed while we were reading: not there.
                Err(Errno::NOENT) => continue,
                Err(e) => {
                    return Err(Error::io(
                        format!("stat {}", path.join(OsStr::from_bytes(bytes)).display()),
                        e.into(),
                    ));
                }
            };
            out.push(Entry {
                name: name.to_owned(),
                meta: Meta::from_stat(&st),
            });
        }
        out.sort_unstable_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Ok(out)
    }
}

impl AsFd for DirFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An entry named relative to an open directory: reads through it never follow a symlink
/// that a concurrent writer puts in place of a parent directory.
#[derive(Clone, Copy)]
pub(crate) struct At<'a> {
    pub dir: &'a DirFd,
    pub name: &'a CStr,
    /// The full path, for messages (and for xattrs when /proc is not mounted).
    pub path: &'a Path,
}

impl At<'_> {
    /// Opens the (regular) file for reading, not following a symlink.
    pub fn open_file(&self) -> Result<File> {
        rustix::fs::openat(
            &self.dir.fd,
            self.name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map(File::from)
        .map_err(|e| Error::io(format!("open {}", self.path.display()), e.into()))
    }

    /// The target of the symlink.
    pub fn read_link(&self) -> Result<Vec<u8>> {
        rustix::fs::readlinkat(&self.dir.fd, self.name, Vec::new())
            .map(CString::into_bytes)
            .map_err(|e| Error::io(format!("readlink {}", self.path.display()), e.into()))
    }

    /// A path that names the entry through the directory fd (`/proc/self/fd/N/name`), for the
    /// xattr calls, which have no `*at` form; the full path when /proc is not mounted.
    fn xattr_path(&self) -> PathBuf {
        static PROC_FD: OnceLock<bool> = OnceLock::new();
        if *PROC_FD.get_or_init(|| Path::new("/proc/self/fd").is_dir()) {
            let mut p = PathBuf::from(format!("/proc/self/fd/{}", self.dir.fd.as_raw_fd()));
            p.push(OsStr::from_bytes(self.name.to_bytes()));
            p
        } else {
            self.path.to_path_buf()
        }
    }

    /// An xattr of the entry (not following a symlink); `None` if absent.
    pub fn xattr(&self, name: &str) -> Result<Option<Vec<u8>>> {
        get_xattr(&self.xattr_path(), name).map_err(|e| self.rename(e))
    }

    /// The names of the entry's xattrs.
    pub fn xattr_names(&self) -> Result<Vec<Vec<u8>>> {
        list_xattrs(&self.xattr_path()).map_err(|e| self.rename(e))
    }

    /// Puts the real path in an error about the /proc path.
    fn rename(&self, e: Error) -> Error {
        match e {
            Error::Io { context, source } => Error::Io {
                context: format!("{context} ({})", self.path.display()),
                source,
            },
            other => other,
        }
    }
}

/// Where an entry is: an open directory and a name, or (when no directory is at hand) a path.
#[derive(Clone, Copy)]
pub(crate) enum Loc<'a> {
    At(At<'a>),
    Path(&'a Path),
}

impl Loc<'_> {
    pub fn path(&self) -> &Path {
        match self {
            Loc::At(a) => a.path,
            Loc::Path(p) => p,
        }
    }

    pub fn open_file(&self) -> Result<File> {
        match self {
            Loc::At(a) => a.open_file(),
            Loc::Path(p) => std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(p)
                .map_err(|e| Error::io(format!("open {}", p.display()), e)),
        }
    }

    pub fn read_link(&self) -> Result<Vec<u8>> {
        match self {
            Loc::At(a) => a.read_link(),
            Loc::Path(p) => read_link(p),
        }
    }

    pub fn xattr(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Loc::At(a) => a.xattr(name),
            Loc::Path(p) => get_xattr(p, name),
        }
    }
}

/// lstat by path; `None` if it does not exist (or a parent is not a directory).
pub(crate) fn lstat(path: &Path) -> Result<Option<Meta>> {
    match rustix::fs::lstat(path) {
        Ok(st) => Ok(Some(Meta::from_stat(&st))),
        Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
        Err(e) => Err(Error::io(format!("stat {}", path.display()), e.into())),
    }
}

/// `root/rel` where `rel` is a relative path in bytes (may be empty).
pub(crate) fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// Reads an xattr without following symlinks; `None` if absent or unsupported there.
pub(crate) fn get_xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(Errno::NODATA | Errno::OPNOTSUPP) => Ok(None),
        Err(Errno::RANGE) => {
            // Larger than expected: ask for the size, then read it.
            let len = rustix::fs::lgetxattr_query(path, name)
                .map_err(|e| Error::io(format!("getxattr {name} {}", path.display()), e.into()))?;
            let mut big = vec![0u8; len];
            let n = rustix::fs::lgetxattr(path, name, &mut big[..])
                .map_err(|e| Error::io(format!("getxattr {name} {}", path.display()), e.into()))?;
            big.truncate(n);
            Ok(Some(big))
        }
        Err(e) => Err(Error::io(
            format!("getxattr {name} {}", path.display()),
            e.into(),
        )),
    }
}

/// The names of all xattrs of `path` (not following symlinks).
pub(crate) fn list_xattrs(path: &Path) -> Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => break n,
            Err(Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Err(Errno::RANGE) => {
                let len = rustix::fs::llistxattr_query(path)
                    .map_err(|e| Error::io(format!("listxattr {}", path.display()), e.into()))?;
                buf = vec![0u8; len.max(buf.len() * 2)];
            }
            Err(e) => return Err(Error::io(format!("listxattr {}", path.display()), e.into())),
        }
    };
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// The target of a symlink.
pub(crate) fn read_link(path: &Path) -> Result<Vec<u8>> {
    std::fs::read_link(path)
        .map(|t| t.into_os_string().into_vec())
        .map_err(|e| Error::io(format!("readlink {}", path.display()), e))
}

/// Whether two files have the same bytes (their sizes are known to be equal).
pub(crate) fn same_content(a: &Loc<'_>, b: &Loc<'_>) -> Result<bool> {
    const CHUNK: usize = 64 * 1024;
    let (mut fa, mut fb) = (a.open_file()?, b.open_file()?);
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    loop {
        let na = read_full(&mut fa, &mut ba)
            .map_err(|e| Error::io(format!("read {}", a.path().display()), e))?;
        let nb = read_full(&mut fb, &mut bb)
            .map_err(|e| Error::io(format!("read {}", b.path().display()), e))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na < CHUNK {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
