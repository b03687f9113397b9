//! The walking comparison (continuity's double-walk `Changes`): both trees are read directory
//! by directory in the same order (a directory before its children, siblings sorted by name
//! bytes) and merged.
//!
//! * a name only below is a deletion (nothing is reported under a deleted directory);
//! * a name only above is an addition, with everything under it;
//! * a name in both is compared by [`same_file`]: different -> modification; same but
//!   hard-linked -> "unmodified" (a changed peer may still need it as a link); same -> nothing.
//!   Directories present in both are descended into whatever their own comparison said.

use std::io::Write;
use std::path::Path;

use super::fsutil::{self, At, CAPABILITY_XATTR, DirFd, Entry, Loc, Meta};
use super::tar_writer::{ChangeKind, ChangeWriter};
use crate::Result;

/// Reports every change from `lower` (`None`: an empty tree) to `upper` into `out`.
pub(crate) fn walk<W: Write>(
    lower: Option<&Path>,
    upper: &Path,
    out: &mut ChangeWriter<W>,
) -> Result<()> {
    let upper_dir = DirFd::open(upper)?;
    let lower_dir = lower.map(DirFd::open).transpose()?;
    let mut w = Walk {
        lower_root: lower,
        upper_root: upper,
        out,
        rel: Vec::new(),
    };
    w.dir(lower_dir.as_ref(), &upper_dir)
}

struct Walk<'a, W: Write> {
    lower_root: Option<&'a Path>,
    upper_root: &'a Path,
    out: &'a mut ChangeWriter<W>,
    /// The current path relative to both roots, `/`-separated, no leading slash.
    rel: Vec<u8>,
}

impl<W: Write> Walk<'_, W> {
    fn dir(&mut self, lower: Option<&DirFd>, upper: &DirFd) -> Result<()> {
        let upper_entries = upper.entries(&fsutil::join(self.upper_root, &self.rel))?;
        let lower_entries = match (lower, self.lower_root) {
            (Some(d), Some(root)) => d.entries(&fsutil::join(root, &self.rel))?,
            _ => Vec::new(),
        };
        let (mut i, mut j) = (0, 0);
        while i < lower_entries.len() || j < upper_entries.len() {
            let order = match (lower_entries.get(i), upper_entries.get(j)) {
                (Some(l), Some(u)) => l.name_bytes().cmp(u.name_bytes()),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    let mark = self.push(lower_entries[i].name_bytes());
                    let r = self.out.change(ChangeKind::Delete, &self.rel, None, None);
                    self.rel.truncate(mark);
                    r?;
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    self.added(upper, &upper_entries[j])?;
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    self.both(lower, upper, &lower_entries[i], &upper_entries[j])?;
                    i += 1;
                    j += 1;
                }
            }
        }
        Ok(())
    }

    /// `u` exists only above: it and everything under it are additions.
    fn added(&mut self, upper: &DirFd, u: &Entry) -> Result<()> {
        let mark = self.push(u.name_bytes());
        let r = (|| {
            let path = fsutil::join(self.upper_root, &self.rel);
            let at = At {
                dir: upper,
                name: &u.name,
                path: &path,
            };
            self.out
                .change(ChangeKind::Add, &self.rel, Some(&u.meta), Some(at))?;
            if u.meta.is_dir() {
                let child = upper.open_child(&u.name, &path)?;
                self.dir(None, &child)?;
            }
            Ok(())
        })();
        self.rel.truncate(mark);
        r
    }

    /// The same name on both sides.
    fn both(&mut self, lower: Option<&DirFd>, upper: &DirFd, l: &Entry, u: &Entry) -> Result<()> {
        let mark = self.push(u.name_bytes());
        let r = (|| {
            let upper_path = fsutil::join(self.upper_root, &self.rel);
            let lower_path = fsutil::join(self.lower_root.unwrap_or(Path::new("/")), &self.rel);
            let u_at = At {
                dir: upper,
                name: &u.name,
                path: &upper_path,
            };
            let l_loc = match lower {
                Some(d) => Loc::At(At {
                    dir: d,
                    name: &l.name,
                    path: &lower_path,
                }),
                None => Loc::Path(&lower_path),
            };
            let kind = if !same_file(&l.meta, &l_loc, &u.meta, &Loc::At(u_at))? {
                Some(ChangeKind::Modify)
            } else if u.meta.is_linked() {
                Some(ChangeKind::Unmodified)
            } else {
                None
            };
            if let Some(kind) = kind {
                self.out
                    .change(kind, &self.rel, Some(&u.meta), Some(u_at))?;
            }
            if u.meta.is_dir() {
                let child_upper = upper.open_child(&u.name, &upper_path)?;
                let child_lower = match lower {
                    Some(d) if l.meta.is_dir() => Some(d.open_child(&l.name, &lower_path)?),
                    _ => None,
                };
                self.dir(child_lower.as_ref(), &child_upper)?;
            }
            Ok(())
        })();
        self.rel.truncate(mark);
        r
    }

    /// Appends `/name` to the current path; returns the length to truncate back to.
    fn push(&mut self, name: &[u8]) -> usize {
        let mark = self.rel.len();
        if !self.rel.is_empty() {
            self.rel.push(b'/');
        }
        self.rel.extend_from_slice(name);
        mark
    }
}

/// continuity's `sameFile`: the same inode, or equal type, permissions, owner, device number
/// and capability xattr, and, for non-directories, equal size and mtime seconds; when both
/// mtimes have zero nanoseconds (times truncated by an archive) the content (or symlink target)
/// decides, otherwise the nanoseconds must match.
///
/// The checks run cheapest first; the answer is the same as in continuity's order.
pub(crate) fn same_file(l: &Meta, l_loc: &Loc<'_>, u: &Meta, u_loc: &Loc<'_>) -> Result<bool> {
    if l.dev == u.dev && l.ino == u.ino {
        return Ok(true);
    }
    if l.mode != u.mode || l.uid != u.uid || l.gid != u.gid || l.rdev != u.rdev {
        return Ok(false);
    }
    let dir = u.is_dir();
    if !dir {
        if l.size != u.size || l.mtime != u.mtime {
            return Ok(false);
        }
        let truncated = l.mtime_nsec == 0 && u.mtime_nsec == 0;
        if !truncated && l.mtime_nsec != u.mtime_nsec {
            return Ok(false);
        }
    }
    if l_loc.xattr(CAPABILITY_XATTR)? != u_loc.xattr(CAPABILITY_XATTR)? {
        return Ok(false);
    }
    if !dir && l.mtime_nsec == 0 && u.mtime_nsec == 0 {
        if u.is_symlink() {
            return Ok(l_loc.read_link()? == u_loc.read_link()?);
        }
        if u.is_regular() && u.size > 0 {
            return fsutil::same_content(l_loc, u_loc);
        }
    }
    Ok(true)
}
