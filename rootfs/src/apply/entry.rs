//! Creating each entry (containerd's `createTarFile`): by type, then owner, xattrs, mode and
//! times, all with `*at` calls on the resolved parent directory and the unfollowed base name.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags, chmodat, chownat,
    fchmod, fchown, fsetxattr, futimens, linkat, lsetxattr, makedev, mkdirat, mknodat, openat,
    statat, symlinkat, utimensat,
};
use rustix::io::Errno;

use super::path::{Missing, Resolver, clean};
use super::stream::{Header, Kind, TarStream, Time};
use super::whiteout::{WHITEOUT_PREFIX, remove_all_at};
use super::{WhiteoutMode, in_user_namespace, invalid, reserved_xattr, sys};
use crate::{Error, Result};

/// Latest time kept; later ones (and any before 1970) become the epoch, as in containerd.
const MAX_SECONDS: i64 = i64::MAX / 1_000_000_000;

/// Applies entries one by one into a root.
pub(crate) struct Unpacker<'a> {
    pub(super) paths: Resolver,
    pub(super) mode: &'a WhiteoutMode,
    /// Directories whose times are set once every entry is in.
    dir_times: Vec<(PathBuf, Timestamps)>,
    /// Paths (relative to the root) written by this layer and their parents: an opaque marker
    /// keeps them ([`WhiteoutMode::Delete`] only).
    pub(super) unpacked: HashSet<PathBuf>,
    skip_devices: bool,
}

/// Where xattrs are set: an open file or a path whose last component is not followed.
enum Target<'p> {
    Fd(BorrowedFd<'p>),
    Path(&'p Path),
}

impl<'a> Unpacker<'a> {
    pub(crate) fn new(root: &Path, mode: &'a WhiteoutMode) -> Result<Unpacker<'a>> {
        let lowers: &[PathBuf] = match mode {
            WhiteoutMode::Delete => &[],
            WhiteoutMode::Overlay { lowers, .. } => lowers,
        };
        let mut paths = Resolver::new(root, lowers)?;
        if matches!(mode, WhiteoutMode::Overlay { lowers, .. } if lowers.is_empty()) {
            // A parallel unpack's layer: its lowers are written at the same time, so parents
            // get their metadata later (`super::parents`).
            paths.record_implicit();
        }
        Ok(Unpacker {
            paths,
            mode,
            dir_times: Vec::new(),
            unpacked: HashSet::new(),
            skip_devices: in_user_namespace(),
        })
    }

    /// Applies one entry; a regular file's data is read from `stream`.
    pub(crate) fn entry<R: Read>(&mut self, hdr: &Header, stream: &mut TarStream<R>) -> Result<()> {
        let comps = clean(&hdr.name);
        let Some((&base, parent)) = comps.split_last() else {
            tracing::debug!(name = %hdr.display_name(), "entry ignored: resolves to the root");
            return Ok(());
        };
        if matches!(hdr.kind, Kind::Char | Kind::Block) && self.skip_devices {
            tracing::warn!(name = %hdr.display_name(), "device ignored in a user namespace");
            return Ok(());
        }
        self.paths.resolve(parent, Missing::Create)?;
        if let Some(target) = base.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(hdr, target);
        }
        let rel = self.paths.rel().join(base);
        match hdr.kind {
            Kind::File => self.file(hdr, base, stream)?,
            Kind::Dir => {
                self.dir(hdr, base)?;
                self.paths.claim(&rel);
                self.dir_times.push((rel.clone(), timestamps(hdr)));
            }
            Kind::Hardlink => self.hardlink(hdr, base)?,
            Kind::Symlink => {
                let dir = self.paths.dir();
                let target = OsStr::from_bytes(&hdr.link);
                replacing(dir, base, || symlinkat(target, dir, base))
                    .map_err(|e| sys(format!("symlink {}", hdr.display_name()), e))?;
                self.metadata(dir, base, &self.paths.path_of(base), hdr, false)?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => self.node(hdr, base)?,
        }
        if *self.mode == WhiteoutMode::Delete {
            // Parents count as this layer's too, even when no entry of their own made them.
            let mut parent = rel.parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                if self.unpacked.contains(p) {
                    break;
                }
                self.unpacked.insert(p.to_path_buf());
                parent = p.parent();
            }
            self.unpacked.insert(rel);
        }
        Ok(())
    }

    /// Sets the times of directories now that nothing will be created in them any more.
    /// Returns the parents created with default metadata for want of lowers (relative paths).
    pub(crate) fn finish(mut self) -> Result<Vec<PathBuf>> {
        let mut all = self.paths.take_created();
        all.append(&mut self.dir_times);
        for (rel, times) in all {
            let comps: Vec<&OsStr> = rel.iter().collect();
            let Some((&base, parent)) = comps.split_last() else {
                continue;
            };
            if !self.paths.resolve(parent, Missing::Fail)? {
                continue;
            }
            match utimensat(self.paths.dir(), base, &times, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(sys(format!("set times of {}", rel.display()), e)),
            }
        }
        Ok(self.paths.take_implicit())
    }

    fn file<R: Read>(&self, hdr: &Header, base: &OsStr, stream: &mut TarStream<R>) -> Result<()> {
        let name = hdr.display_name();
        let dir = self.paths.dir();
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = replacing(dir, base, || {
            openat(dir, base, flags, Mode::from_raw_mode(0o600))
        })
        .map_err(|e| sys(format!("create {name}"), e))?;
        let mut file = File::from(fd);
        stream.copy_data(&mut file, &name)?;
        let (uid, gid) = owner(hdr)?;
        fchown(&file, Some(uid), Some(gid)).map_err(|e| sys(format!("chown {name}"), e))?;
        self.xattrs(Target::Fd(file.as_fd()), hdr)?;
        fchmod(&file, Mode::from_raw_mode(hdr.mode))
            .map_err(|e| sys(format!("chmod {name}"), e))?;
        futimens(&file, &timestamps(hdr)).map_err(|e| sys(format!("set times of {name}"), e))
    }

    fn dir(&self, hdr: &Header, base: &OsStr) -> Result<()> {
        let ctx = || format!("mkdir {}", hdr.display_name());
        let dir = self.paths.dir();
        let mode = Mode::from_raw_mode(hdr.mode);
        match mkdirat(dir, base, mode) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let st = statat(dir, base, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| sys(ctx(), e))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                    remove_all_at(dir, base).map_err(|e| sys(ctx(), e))?;
                    mkdirat(dir, base, mode).map_err(|e| sys(ctx(), e))?;
                }
                // Directory over directory: only the metadata is merged.
            }
            Err(e) => return Err(sys(ctx(), e)),
        }
        self.metadata(dir, base, &self.paths.path_of(base), hdr, true)
    }

    fn node(&self, hdr: &Header, base: &OsStr) -> Result<()> {
        let name = hdr.display_name();
        let file_type = match hdr.kind {
            Kind::Char => FileType::CharacterDevice,
            Kind::Block => FileType::BlockDevice,
            _ => FileType::Fifo,
        };
        let number = |n: u64| {
            u32::try_from(n).map_err(|_| invalid(format!("device number {n} of {name} too large")))
        };
        let dev = makedev(number(hdr.major)?, number(hdr.minor)?);
        let dir = self.paths.dir();
        let mode = Mode::from_raw_mode(hdr.mode);
        replacing(dir, base, || mknodat(dir, base, file_type, mode, dev))
            .map_err(|e| sys(format!("mknod {name}"), e))?;
        self.metadata(dir, base, &self.paths.path_of(base), hdr, true)
    }

    fn hardlink(&mut self, hdr: &Header, base: &OsStr) -> Result<()> {
        let ctx = || {
            format!(
                "hardlink {} -> {}",
                hdr.display_name(),
                String::from_utf8_lossy(&hdr.link)
            )
        };
        let dir = self
            .paths
            .dir()
            .try_clone_to_owned()
            .map_err(|e| Error::io(ctx(), e))?;
        let path = self.paths.path_of(base);
        let target = clean(&hdr.link);
        let Some((&target_base, target_parent)) = target.split_last() else {
            return Err(invalid(format!("{}: target is the root", ctx())));
        };
        if !self.paths.resolve(target_parent, Missing::Fail)? {
            let ctx = format!("{} (target resolved inside the root)", ctx());
            return Err(Error::io(ctx, Errno::NOENT.into()));
        }
        let target_dir = self.paths.dir();
        match linkat(target_dir, target_base, &dir, base, AtFlags::empty()) {
            Ok(()) => {}
            Err(Errno::EXIST) if same_file(target_dir, target_base, dir.as_fd(), base) => {}
            Err(Errno::EXIST) => {
                remove_all_at(dir.as_fd(), base).map_err(|e| sys(ctx(), e))?;
                linkat(target_dir, target_base, &dir, base, AtFlags::empty())
                    .map_err(|e| sys(ctx(), e))?;
            }
            Err(e) => return Err(sys(ctx(), e)),
        }
        // Never chmod through a link to a symlink.
        let st = statat(&dir, base, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| sys(ctx(), e))?;
        let chmod = FileType::from_raw_mode(st.st_mode) != FileType::Symlink;
        self.metadata(dir.as_fd(), base, &path, hdr, chmod)
    }

    /// Owner, xattrs, mode (after the owner: chown clears setuid) and, except for directories,
    /// times of the entry `base` in `dir` (whose full path is `path`).
    fn metadata(
        &self,
        dir: BorrowedFd<'_>,
        base: &OsStr,
        path: &Path,
        hdr: &Header,
        chmod: bool,
    ) -> Result<()> {
        let name = hdr.display_name();
        let (uid, gid) = owner(hdr)?;
        chownat(dir, base, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| sys(format!("chown {name}"), e))?;
        self.xattrs(Target::Path(path), hdr)?;
        if chmod {
            // `base` was just created as a non-symlink, so following it is safe.
            chmodat(dir, base, Mode::from_raw_mode(hdr.mode), AtFlags::empty())
                .map_err(|e| sys(format!("chmod {name}"), e))?;
        }
        if hdr.kind != Kind::Dir {
            utimensat(dir, base, &timestamps(hdr), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| sys(format!("set times of {name}"), e))?;
        }
        Ok(())
    }

    /// The entry's `SCHILY.xattr.*` records: reserved names are refused, and filesystems or
    /// file types that cannot hold an xattr are warned about, as containerd does.
    fn xattrs(&self, target: Target<'_>, hdr: &Header) -> Result<()> {
        for (key, value) in &hdr.xattrs {
            let attr = OsStr::from_bytes(key);
            if reserved_xattr(key) {
                tracing::warn!(name = %hdr.display_name(), xattr = %attr.display(), "reserved xattr in archive ignored");
                continue;
            }
            let set = match target {
                Target::Fd(fd) => fsetxattr(fd, attr, value, XattrFlags::empty()),
                Target::Path(p) => lsetxattr(p, attr, value, XattrFlags::empty()),
            };
            match set {
                Ok(()) => {}
                Err(Errno::PERM)
                    if key.starts_with(b"user.") && !matches!(hdr.kind, Kind::File | Kind::Dir) =>
                {
                    tracing::warn!(name = %hdr.display_name(), xattr = %attr.display(), "xattr not supported on this file type, ignored");
                }
                Err(Errno::NOTSUP) => {
                    tracing::warn!(name = %hdr.display_name(), xattr = %attr.display(), "xattr not supported, ignored");
                }
                Err(e) => {
                    return Err(sys(
                        format!("set xattr {} on {}", attr.display(), hdr.display_name()),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Runs `create`; if something is in the way, removes it and runs `create` once more.
fn replacing<T>(
    dir: BorrowedFd<'_>,
    base: &OsStr,
    mut create: impl FnMut() -> rustix::io::Result<T>,
) -> rustix::io::Result<T> {
    match create() {
        Err(Errno::EXIST) => {
            remove_all_at(dir, base)?;
            create()
        }
        other => other,
    }
}

fn same_file(a_dir: BorrowedFd<'_>, a: &OsStr, b_dir: BorrowedFd<'_>, b: &OsStr) -> bool {
    match (
        statat(a_dir, a, AtFlags::SYMLINK_NOFOLLOW),
        statat(b_dir, b, AtFlags::SYMLINK_NOFOLLOW),
    ) {
        (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
        _ => false,
    }
}

fn owner(hdr: &Header) -> Result<(Uid, Gid)> {
    let id = |n: u64| {
        u32::try_from(n)
            .map_err(|_| invalid(format!("owner {n} of {} out of range", hdr.display_name())))
    };
    Ok((Uid::from_raw(id(hdr.uid)?), Gid::from_raw(id(hdr.gid)?)))
}

/// The header's times: access = the later of atime and mtime, as containerd sets them.
pub(super) fn timestamps(hdr: &Header) -> Timestamps {
    let atime = hdr.atime.map_or(hdr.mtime, |a| a.max(hdr.mtime));
    Timestamps {
        last_access: bounded(atime),
        last_modification: bounded(hdr.mtime),
    }
}

fn bounded(t: Time) -> Timespec {
    if t.sec < 0 || t.sec > MAX_SECONDS {
        return Timespec::default();
    }
    Timespec {
        tv_sec: t.sec,
        tv_nsec: t.nsec.into(),
    }
}
