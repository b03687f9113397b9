//! The overlay upperdir differ: walks only an overlay upper directory (or a committed layer
//! directory, which has the same form) and reads the lower layers only to look up the paths it
//! meets there.
//!
//! * a character device 0/0 is a whiteout: a deletion if the path exists below, else nothing;
//! * a directory whose `trusted.overlay.opaque` or `user.overlay.opaque` is `y` hides what is
//!   below: if the lowers have a directory there, an opaque marker `.wh..wh..opq` follows the
//!   directory and everything under it is an addition;
//! * anything else is compared with the lowers' version of the path exactly as the walking
//!   differ compares (see [`same_file`]), so both differs report the same change set;
//! * `overlay.redirect` (renamed directories), `overlay.metacopy` (metadata-only copy-up) and
//!   `overlay.whiteout` (xattr whiteouts) are not supported: the walk stops with
//!   [`Error::Unsupported`] so that the caller can fall back to the walking differ.
//!
//! The lowers are given as directories, nearest first, in overlay's own form (whiteouts and
//! opaque directories inside them are honoured while looking up), as the overlay snapshotter
//! stores its layers.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::changes::same_file;
use super::fsutil::{self, At, DirFd, Entry, Loc, Meta};
use super::tar_writer::{ChangeKind, ChangeWriter};
use crate::{Error, Result};

const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];

/// Reports the changes an overlay upper directory holds relative to `lowers` into `out`.
pub(crate) fn walk<W: Write>(
    upper: &Path,
    lowers: &[PathBuf],
    out: &mut ChangeWriter<W>,
) -> Result<()> {
    for l in lowers {
        match fsutil::lstat(l)? {
            Some(m) if m.is_dir() => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "overlay diff: lower {} is not a directory",
                    l.display()
                )));
            }
        }
    }
    let upper_dir = DirFd::open(upper)?;
    let base = Base {
        dirs: lowers.to_vec(),
    };
    let mut w = Walk {
        upper_root: upper,
        out,
        rel: Vec::new(),
    };
    w.dir(&upper_dir, Some(&base))
}

/// One directory of the lowers' merged view: the layer directories that contribute to it,
/// nearest first.
#[derive(Debug)]
struct Base {
    dirs: Vec<PathBuf>,
}

/// An entry of the lowers' merged view.
struct Found {
    meta: Meta,
    path: PathBuf,
    /// Which of the contributing directories holds it.
    layer: usize,
}

impl Base {
    /// `name` as the merged lowers show it.
    fn lookup(&self, name: &[u8]) -> Result<Option<Found>> {
        for (layer, d) in self.dirs.iter().enumerate() {
            let path = fsutil::join(d, name);
            match fsutil::lstat(&path)? {
                None => continue,
                Some(m) if m.is_whiteout() => return Ok(None),
                Some(meta) => return Ok(Some(Found { meta, path, layer })),
            }
        }
        Ok(None)
    }

    /// The merged view of the subdirectory `found` (a directory found by [`Base::lookup`]).
    fn child(&self, name: &[u8], found: &Found) -> Result<Base> {
        let mut dirs = Vec::new();
        for d in &self.dirs[found.layer..] {
            let path = fsutil::join(d, name);
            match fsutil::lstat(&path)? {
                None => continue,
                Some(m) if !m.is_dir() => break, // a whiteout or a non-directory hides the rest
                Some(_) => {
                    let opaque = is_opaque(&path)?;
                    dirs.push(path);
                    if opaque {
                        break;
                    }
                }
            }
        }
        Ok(Base { dirs })
    }
}

struct Walk<'a, W: Write> {
    upper_root: &'a Path,
    out: &'a mut ChangeWriter<W>,
    rel: Vec<u8>,
}

impl<W: Write> Walk<'_, W> {
    /// Walks one upper directory; `base` is the lowers' view of it (`None`: nothing below).
    fn dir(&mut self, upper: &DirFd, base: Option<&Base>) -> Result<()> {
        let entries = upper.entries(&fsutil::join(self.upper_root, &self.rel))?;
        for e in &entries {
            let mark = self.rel.len();
            if !self.rel.is_empty() {
                self.rel.push(b'/');
            }
            self.rel.extend_from_slice(e.name_bytes());
            let r = self.entry(upper, e, base);
            self.rel.truncate(mark);
            r?;
        }
        Ok(())
    }

    fn entry(&mut self, upper: &DirFd, e: &Entry, base: Option<&Base>) -> Result<()> {
        let path = fsutil::join(self.upper_root, &self.rel);
        let at = At {
            dir: upper,
            name: &e.name,
            path: &path,
        };
        let opaque = check_xattrs(&at, &e.meta)?;
        let found = match base {
            Some(b) => b.lookup(e.name_bytes())?,
            None => None,
        };
        if e.meta.is_whiteout() {
            if found.is_some() {
                self.out.change(ChangeKind::Delete, &self.rel, None, None)?;
            }
            return Ok(());
        }
        let kind = match &found {
            None => Some(ChangeKind::Add),
            Some(f) if !same_file(&f.meta, &Loc::Path(&f.path), &e.meta, &Loc::At(at))? => {
                Some(ChangeKind::Modify)
            }
            Some(_) if e.meta.is_linked() => Some(ChangeKind::Unmodified),
            Some(_) => None,
        };
        if let Some(kind) = kind {
            self.out.change(kind, &self.rel, Some(&e.meta), Some(at))?;
        }
        if !e.meta.is_dir() {
            return Ok(());
        }
        let child_base = match (&found, base) {
            (Some(f), Some(b)) if f.meta.is_dir() => {
                if opaque {
                    self.out.opaque(&self.rel)?;
                    None
                } else {
                    Some(b.child(e.name_bytes(), f)?)
                }
            }
            _ => None,
        };
        let child = upper.open_child(&e.name, &path)?;
        self.dir(&child, child_base.as_ref())
    }
}

/// Refuses overlay features this differ cannot read; returns whether a directory is opaque.
fn check_xattrs(at: &At<'_>, meta: &Meta) -> Result<bool> {
    if meta.is_symlink() {
        // Overlay keeps no xattrs of its own on upper symlinks that matter here.
        return Ok(false);
    }
    let mut opaque = false;
    for name in at.xattr_names()? {
        let Some(key) = name
            .strip_prefix(b"trusted.overlay.")
            .or_else(|| name.strip_prefix(b"user.overlay."))
        else {
            continue;
        };
        match key {
            b"redirect" | b"metacopy" | b"whiteout" => {
                return Err(Error::Unsupported(format!(
                    "overlay diff of {} (it has overlay xattr {}; use the walking differ)",
                    at.path.display(),
                    String::from_utf8_lossy(&name)
                )));
            }
            b"opaque" if meta.is_dir() => {
                let full = String::from_utf8_lossy(&name).into_owned();
                opaque |= at.xattr(&full)?.as_deref() == Some(b"y".as_slice());
            }
            _ => {}
        }
    }
    Ok(opaque)
}

/// Whether a lower directory is opaque.
fn is_opaque(path: &Path) -> Result<bool> {
    for x in OPAQUE_XATTRS {
        if fsutil::get_xattr(path, x)?.as_deref() == Some(b"y".as_slice()) {
            return Ok(true);
        }
    }
    Ok(false)
}
