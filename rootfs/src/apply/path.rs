//! Chroot-like resolution of entry names inside the root (continuity's `RootPath`), on file
//! descriptors.
//!
//! Names are cleaned lexically first (`..` clamped at the root, as Go's `filepath.Clean` then
//! `RootPath` do). The parent part is then walked one component at a time from the root's
//! descriptor with `O_NOFOLLOW`: a symlink met on the way is read and its target walked in its
//! place, absolute targets from the root and `..` never above it, at most [`MAX_HOPS`] links.
//! Each step is relative to the directory reached by the one before, so no later step can be
//! redirected outside the root; the base name is never followed (callers use `*at` calls on the
//! resolved directory). Directories nest at most [`MAX_DEPTH`] deep (so removing a tree never
//! recurses without bound) and only the deepest [`FD_WINDOW`] of them stay open: a shallower
//! one is reopened by its symlink-free path when `..` climbs back to it.
//!
//! The descriptors of the last walk are kept: the next entry in the same directory (the usual
//! case) costs no system call. This stays valid because the kept chain is always the parent
//! chain of the entry being applied, and entries only ever replace or remove what is *below*
//! their parent.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags, chmodat, chownat,
    fgetxattr, flistxattr, fstat, lsetxattr, mkdirat, openat, openat2, readlinkat, utimensat,
};
use rustix::io::Errno;

use super::{invalid, reserved_xattr, sys};
use crate::{Error, Result};

/// Most symlinks followed to resolve one name (continuity's limit).
pub(crate) const MAX_HOPS: usize = 255;
/// Deepest directory nesting an entry may need.
pub(crate) const MAX_DEPTH: usize = 1024;
/// Directories of the current chain kept open.
const FD_WINDOW: usize = 32;

/// The components of an entry name after Go's `filepath.Clean`, with `..` clamped at the
/// root: plain names only. Empty for the root itself.
pub(crate) fn clean(name: &[u8]) -> Vec<&OsStr> {
    let mut out: Vec<&OsStr> = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    out
}

/// What to do with a missing directory on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// Create it (mode 0755, or with the owner, mode, times and xattrs of the first lower that
    /// has it as a directory).
    Create,
    /// Report that the path does not exist.
    Fail,
}

/// Resolves parent directories inside a root; see the module documentation.
pub(crate) struct Resolver {
    root: OwnedFd,
    root_path: PathBuf,
    lowers: Vec<OwnedFd>,
    /// Directories from the root (exclusive) down to the current one; only the last
    /// [`FD_WINDOW`] are open, and the last always is.
    stack: Vec<Option<OwnedFd>>,
    /// Path of the current directory relative to the root, without symlinks.
    rel: PathBuf,
    /// Name components that lead to `stack[..raw.len()]` without any symlink.
    raw: Vec<OsString>,
    /// Directories created with a lower's metadata, and that lower's times.
    created: Vec<(PathBuf, Timestamps)>,
    /// Whether directories created without a lower to copy from are listed in `implicit`.
    record_implicit: bool,
    /// Directories created as parents only, while the lowers were unknown (parallel unpack).
    implicit: Vec<PathBuf>,
}

const DIR_FLAGS: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Resolver {
    /// Opens `root` (and the `lowers`, nearest first, whose metadata missing parents copy).
    pub(crate) fn new(root: &Path, lowers: &[PathBuf]) -> Result<Resolver> {
        let open = |p: &Path| {
            rustix::fs::open(
                p,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| sys(format!("open {}", p.display()), e))
        };
        Ok(Resolver {
            root: open(root)?,
            root_path: root.to_path_buf(),
            lowers: lowers.iter().map(|l| open(l)).collect::<Result<_>>()?,
            stack: Vec::new(),
            rel: PathBuf::new(),
            raw: Vec::new(),
            created: Vec::new(),
            record_implicit: false,
            implicit: Vec::new(),
        })
    }

    /// Lists the parent directories created with default metadata because no lowers were
    /// given (see [`Resolver::take_implicit`]).
    pub(crate) fn record_implicit(&mut self) {
        self.record_implicit = true;
    }

    /// The directories listed since [`Resolver::record_implicit`], relative to the root.
    pub(crate) fn take_implicit(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.implicit)
    }

    /// `rel` was given its metadata by an entry of its own: it is no longer implicit.
    pub(crate) fn claim(&mut self, rel: &Path) {
        if self.record_implicit {
            self.implicit.retain(|p| p != rel);
        }
    }

    /// The directory the last successful [`Resolver::resolve`] reached.
    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        match self.stack.last() {
            Some(Some(fd)) => fd.as_fd(),
            // `truncate` reopens the last directory, so this is only the root.
            _ => self.root.as_fd(),
        }
    }

    /// [`Resolver::dir`]'s path relative to the root.
    pub(crate) fn rel(&self) -> &Path {
        &self.rel
    }

    /// The full path of `name` in [`Resolver::dir`], for the calls that only take paths
    /// (xattrs). It holds no symlink up to `name` itself.
    pub(crate) fn path_of(&self, name: &OsStr) -> PathBuf {
        self.root_path.join(&self.rel).join(name)
    }

    /// The full path of [`Resolver::dir`].
    pub(crate) fn dir_path(&self) -> PathBuf {
        self.root_path.join(&self.rel)
    }

    /// Directories created with a lower's metadata and their times, to be set again at the end.
    pub(crate) fn take_created(&mut self) -> Vec<(PathBuf, Timestamps)> {
        std::mem::take(&mut self.created)
    }

    /// Walks `comps` (from [`clean`]) as directories from the root. Returns false if a
    /// component is missing and `missing` is [`Missing::Fail`].
    pub(crate) fn resolve(&mut self, comps: &[&OsStr], missing: Missing) -> Result<bool> {
        let keep = self
            .raw
            .iter()
            .zip(comps)
            .take_while(|(a, b)| a.as_os_str() == **b)
            .count();
        self.truncate(keep)?;
        let mut next = keep;
        // Components of symlink targets still to walk, last first.
        let mut pending: Vec<OsString> = Vec::new();
        let mut hops = 0;
        loop {
            let (c, pure) = match pending.pop() {
                Some(c) => (c, false),
                None if next < comps.len() => {
                    next += 1;
                    (comps[next - 1].to_os_string(), hops == 0)
                }
                None => return Ok(true),
            };
            if c == ".." {
                let depth = self.stack.len().saturating_sub(1);
                self.truncate(depth)?;
                continue;
            }
            if self.stack.len() >= MAX_DEPTH {
                return Err(invalid(format!(
                    "directories nested more than {MAX_DEPTH} deep at {}",
                    self.rel.display()
                )));
            }
            let opened = openat(self.dir(), &c, DIR_FLAGS, Mode::empty());
            match opened {
                Ok(fd) => self.push(c, fd, pure),
                Err(Errno::NOENT) if missing == Missing::Fail => return Ok(false),
                Err(Errno::NOENT) => {
                    let fd = self.create(&c)?;
                    self.push(c, fd, pure);
                }
                Err(Errno::NOTDIR | Errno::LOOP) => {
                    let target = match readlinkat(self.dir(), &c, Vec::new()) {
                        Ok(t) => t,
                        Err(Errno::INVAL) => {
                            let what = self.rel.join(&c);
                            return Err(Error::io(
                                format!("resolve {}: not a directory", what.display()),
                                Errno::NOTDIR.into(),
                            ));
                        }
                        Err(e) => {
                            return Err(sys(
                                format!("readlink {}", self.rel.join(&c).display()),
                                e,
                            ));
                        }
                    };
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(invalid(format!(
                            "more than {MAX_HOPS} symlinks resolving {}",
                            self.rel.join(&c).display()
                        )));
                    }
                    let target = target.as_bytes();
                    if target.starts_with(b"/") {
                        self.truncate(0)?;
                    }
                    for part in target.rsplit(|&b| b == b'/') {
                        if !part.is_empty() && part != b"." {
                            pending.push(OsString::from_vec(part.to_vec()));
                        }
                    }
                    if pending.len() > MAX_DEPTH * 4 {
                        return Err(invalid(format!(
                            "symlinks expand to too many components resolving {}",
                            self.rel.join(&c).display()
                        )));
                    }
                }
                Err(e) => return Err(sys(format!("open {}", self.rel.join(&c).display()), e)),
            }
        }
    }

    fn push(&mut self, name: OsString, fd: OwnedFd, pure: bool) {
        self.rel.push(&name);
        self.stack.push(Some(fd));
        if let Some(old) = self.stack.len().checked_sub(FD_WINDOW + 1) {
            self.stack[old] = None;
        }
        if pure && self.raw.len() + 1 == self.stack.len() {
            self.raw.push(name);
        }
    }

    /// Climbs back to `depth` levels below the root, reopening that directory if it was closed.
    fn truncate(&mut self, depth: usize) -> Result<()> {
        while self.stack.len() > depth {
            self.stack.pop();
            self.rel.pop();
        }
        self.raw.truncate(depth);
        if let Some(top @ None) = self.stack.last_mut() {
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            let fd = openat2(&self.root, &self.rel, DIR_FLAGS, Mode::empty(), resolve)
                .map_err(|e| sys(format!("reopen {}", self.rel.display()), e))?;
            *top = Some(fd);
        }
        Ok(())
    }

    /// Creates the missing directory `name` in the current directory and opens it.
    fn create(&mut self, name: &OsStr) -> Result<OwnedFd> {
        let rel = self.rel.join(name);
        let ctx = || format!("create parent directory {}", rel.display());
        let dir = self.dir();
        match mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => {
                // Explicitly, whatever the umask.
                chmodat(dir, name, Mode::from_raw_mode(0o755), AtFlags::empty())
                    .map_err(|e| sys(ctx(), e))?;
                if let Some(times) = self.copy_from_lowers(&rel, name)? {
                    self.created.push((rel.clone(), times));
                } else if self.record_implicit {
                    self.implicit.push(rel.clone());
                }
            }
            Err(Errno::EXIST) => {}
            Err(e) => return Err(sys(ctx(), e)),
        }
        openat(self.dir(), name, DIR_FLAGS, Mode::empty()).map_err(|e| sys(ctx(), e))
    }

    /// Gives the new directory `name` (at `rel`) the owner, mode, times and xattrs of the first
    /// lower holding `rel`, if that is a directory (containerd's `mkparent` with parents).
    pub(crate) fn copy_from_lowers(&self, rel: &Path, name: &OsStr) -> Result<Option<Timestamps>> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        for lower in &self.lowers {
            let fd = match openat2(lower, rel, flags, Mode::empty(), resolve) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => continue,
                // Not a directory in this lower: it hides the lowers below.
                Err(Errno::NOTDIR | Errno::LOOP) => return Ok(None),
                Err(e) => return Err(sys(format!("open lower {}", rel.display()), e)),
            };
            let ctx = |what: &str| format!("{what} {} from a lower", rel.display());
            let st = fstat(&fd).map_err(|e| sys(ctx("stat"), e))?;
            let dir = self.dir();
            chownat(
                dir,
                name,
                Some(rustix::fs::Uid::from_raw(st.st_uid)),
                Some(rustix::fs::Gid::from_raw(st.st_gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| sys(ctx("chown"), e))?;
            chmodat(
                dir,
                name,
                Mode::from_raw_mode(st.st_mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(|e| sys(ctx("chmod"), e))?;
            self.copy_xattrs(&fd, &self.path_of(name))
                .map_err(|e| sys(ctx("copy xattrs of"), e))?;
            let times = Timestamps {
                last_access: Timespec {
                    tv_sec: st.st_atime as i64,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: Timespec {
                    tv_sec: st.st_mtime as i64,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            };
            utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| sys(ctx("set times of"), e))?;
            return Ok(Some(times));
        }
        Ok(None)
    }

    /// Copies the xattrs of `from` to `to`, except the reserved ones.
    fn copy_xattrs(&self, from: &OwnedFd, to: &Path) -> rustix::io::Result<()> {
        let mut names = vec![0u8; 64 * 1024];
        let len = match flistxattr(from, &mut names[..]) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut value = vec![0u8; 64 * 1024];
        for name in names[..len].split(|&b| b == 0) {
            if name.is_empty() || reserved_xattr(name) {
                continue;
            }
            let name = OsStr::from_bytes(name);
            let n = match fgetxattr(from, name, &mut value[..]) {
                Ok(n) => n,
                Err(Errno::NODATA | Errno::NOTSUP) => continue,
                Err(e) => return Err(e),
            };
            match lsetxattr(to, name, &value[..n], XattrFlags::empty()) {
                Ok(()) | Err(Errno::NOTSUP) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &str) -> Vec<&str> {
        clean(n.as_bytes())
            .into_iter()
            .map(|c| c.to_str().unwrap_or("?"))
            .collect()
    }

    #[test]
    fn clean_clamps_at_the_root() {
        assert_eq!(names("a/b/../c/"), ["a", "c"]);
        assert_eq!(names("../../etc/x"), ["etc", "x"]);
        assert_eq!(names("/abs//./x"), ["abs", "x"]);
        assert_eq!(names("a/../../.."), Vec::<&str>::new());
        assert_eq!(names("./"), Vec::<&str>::new());
        assert_eq!(names("..."), ["..."]);
    }
}
