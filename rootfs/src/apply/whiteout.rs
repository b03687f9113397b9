//! OCI whiteouts: deleting (plain directories) or converting to overlay's form (upperdirs),
//! and removing trees without following symlinks.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, Dir, FileType, Gid, Mode, OFlags, Uid, XattrFlags, chownat, lsetxattr, mknodat,
    openat, statat, unlinkat,
};
use rustix::io::Errno;

use super::entry::Unpacker;
use super::stream::Header;
use super::{WhiteoutMode, invalid, sys};
use crate::Result;

/// Prefix of whiteout entries.
pub(super) const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// What follows [`WHITEOUT_PREFIX`] in an opaque directory marker (`.wh..wh..opq`).
const OPAQUE: &[u8] = b".wh..opq";

impl Unpacker<'_> {
    /// Handles the whiteout entry `.wh.<target>` in the resolved parent directory.
    pub(super) fn whiteout(&mut self, hdr: &Header, target: &[u8]) -> Result<()> {
        let name = hdr.display_name();
        if target == OPAQUE {
            return self.opaque(&name);
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(invalid(format!("invalid whiteout name {name}")));
        }
        let target = OsStr::from_bytes(target);
        let dir = self.paths.dir();
        remove_all_at(dir, target).map_err(|e| sys(format!("whiteout {name}"), e))?;
        if let WhiteoutMode::Overlay { .. } = self.mode {
            let ctx = || format!("overlay whiteout {name}");
            mknodat(dir, target, FileType::CharacterDevice, Mode::empty(), 0)
                .map_err(|e| sys(ctx(), e))?;
            let uid = u32::try_from(hdr.uid).map_err(|_| invalid(format!("owner of {name}")))?;
            let gid = u32::try_from(hdr.gid).map_err(|_| invalid(format!("owner of {name}")))?;
            chownat(
                dir,
                target,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| sys(ctx(), e))?;
        }
        Ok(())
    }

    fn opaque(&mut self, name: &str) -> Result<()> {
        let ctx = || format!("opaque directory {name}");
        match self.mode {
            WhiteoutMode::Delete => {
                clear_opaque(self.paths.dir(), self.paths.rel(), &self.unpacked)
                    .map_err(|e| sys(ctx(), e))
            }
            WhiteoutMode::Overlay { opaque_xattr, .. } => {
                let dir = self.paths.dir_path();
                lsetxattr(&dir, opaque_xattr.as_str(), b"y", XattrFlags::empty())
                    .map_err(|e| sys(ctx(), e))
            }
        }
    }
}

/// Removes every child of `dir` (at `rel`) that this layer did not write, recursing into the
/// directories it did write (containerd's walk).
fn clear_opaque(
    dir: BorrowedFd<'_>,
    rel: &Path,
    keep: &HashSet<PathBuf>,
) -> rustix::io::Result<()> {
    for (name, file_type) in children(dir)? {
        let path = rel.join(&name);
        if !keep.contains(&path) {
            remove_all_at(dir, &name)?;
            continue;
        }
        let is_dir = match file_type {
            FileType::Unknown => statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)?,
            t => t == FileType::Directory,
        };
        if is_dir {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let child = openat(dir, &name, flags, Mode::empty())?;
            clear_opaque(child.as_fd(), &path, keep)?;
        }
    }
    Ok(())
}

/// Removes `name` in `dir` and, if it is a directory, everything in it; symlinks are removed,
/// never followed. A missing `name` is fine.
pub(super) fn remove_all_at(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    match unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e),
    }
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let child = openat(dir, name, flags, Mode::empty())?;
    for (entry, _) in children(child.as_fd())? {
        remove_all_at(child.as_fd(), &entry)?;
    }
    drop(child);
    match unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The entries of `dir` (an `O_PATH` descriptor is fine) other than `.` and `..`.
fn children(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<(OsString, FileType)>> {
    let fd = openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in Dir::new(fd)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push((OsStr::from_bytes(name).to_os_string(), entry.file_type()));
        }
    }
    Ok(out)
}
