//! Applying file changes to a tree and comparing two trees, the way continuity's `fstest` does
//! for containerd's suite: same set of paths and, per path, equal mode (type and permission bits,
//! setuid/setgid/sticky included), uid and gid; for regular files equal size, content and
//! hard-link group; for symlinks equal target; for devices equal device number. The roots
//! themselves, extended attributes and timestamps are not compared.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One change to a directory tree. Paths are relative to the tree's root (a leading `/` is
/// ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Creates or truncates a regular file with `content`, then sets its permissions to `mode`.
    CreateFile {
        /// Path of the file.
        path: String,
        /// Its content.
        content: Vec<u8>,
        /// Its permission bits.
        mode: u32,
    },
    /// Creates a directory (and missing parents), then sets its permissions to `mode`.
    CreateDir {
        /// Path of the directory.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Removes a path and everything beneath it; a missing path is not an error.
    RemoveAll(String),
    /// Changes the owner (following symlinks, like `chown(2)`).
    Chown {
        /// Path to change.
        path: String,
        /// New owner.
        uid: u32,
        /// New group.
        gid: u32,
    },
    /// Renames `from` to `to`.
    Rename {
        /// Existing path.
        from: String,
        /// New path.
        to: String,
    },
    /// Creates the hard link `link` to the existing file `target`.
    Link {
        /// Existing file.
        target: String,
        /// New link.
        link: String,
    },
    /// Creates the symbolic link `link` pointing at `target` (stored verbatim).
    Symlink {
        /// Link target.
        target: String,
        /// New link.
        link: String,
    },
}

/// [`Change::CreateFile`].
pub fn create_file(path: &str, content: impl AsRef<[u8]>, mode: u32) -> Change {
    let (path, content) = (path.to_owned(), content.as_ref().to_vec());
    Change::CreateFile {
        path,
        content,
        mode,
    }
}

/// [`Change::CreateDir`].
pub fn create_dir(path: &str, mode: u32) -> Change {
    Change::CreateDir {
        path: path.to_owned(),
        mode,
    }
}

/// [`Change::RemoveAll`].
pub fn remove_all(path: &str) -> Change {
    Change::RemoveAll(path.to_owned())
}

/// [`Change::Chown`].
pub fn chown(path: &str, uid: u32, gid: u32) -> Change {
    Change::Chown {
        path: path.to_owned(),
        uid,
        gid,
    }
}

/// [`Change::Rename`].
pub fn rename(from: &str, to: &str) -> Change {
    Change::Rename {
        from: from.to_owned(),
        to: to.to_owned(),
    }
}

/// [`Change::Link`].
pub fn link(target: &str, link: &str) -> Change {
    Change::Link {
        target: target.to_owned(),
        link: link.to_owned(),
    }
}

/// [`Change::Symlink`].
pub fn symlink(target: &str, link: &str) -> Change {
    Change::Symlink {
        target: target.to_owned(),
        link: link.to_owned(),
    }
}

fn at(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Applies one change under `root`, returning the raw I/O error (errno intact) on failure.
pub fn apply_one(root: &Path, change: &Change) -> io::Result<()> {
    match change {
        Change::CreateFile {
            path,
            content,
            mode,
        } => {
            let p = at(root, path);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(*mode)
                .open(&p)?;
            f.write_all(content)?;
            drop(f);
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode))
        }
        Change::CreateDir { path, mode } => {
            let p = at(root, path);
            fs::create_dir_all(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode))
        }
        Change::RemoveAll(path) => {
            let p = at(root, path);
            match fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() => fs::remove_dir_all(&p),
                Ok(_) => fs::remove_file(&p),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        }
        Change::Chown { path, uid, gid } => {
            std::os::unix::fs::chown(at(root, path), Some(*uid), Some(*gid))
        }
        Change::Rename { from, to } => fs::rename(at(root, from), at(root, to)),
        Change::Link { target, link } => fs::hard_link(at(root, target), at(root, link)),
        Change::Symlink { target, link } => std::os::unix::fs::symlink(target, at(root, link)),
    }
}

/// Applies `changes` in order under `root`; the error names the change and the root.
pub fn apply(root: &Path, changes: &[Change]) -> io::Result<()> {
    for change in changes {
        apply_one(root, change).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("apply {change:?} under {}: {e}", root.display()),
            )
        })?;
    }
    Ok(())
}

/// What is compared of one path (or one group of hard links).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// First path of the hard-link group, `/`-rooted.
    path: String,
    mode: u32,
    uid: u32,
    gid: u32,
    kind: Detail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Detail {
    File {
        size: u64,
        sha256: [u8; 32],
        links: Vec<String>,
    },
    Symlink(PathBuf),
    Device(u64),
    Other,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} mode {:o} uid {} gid {}",
            self.path, self.mode, self.uid, self.gid
        )?;
        match &self.kind {
            Detail::File {
                size,
                sha256,
                links,
            } => {
                let short: String = sha256[..4].iter().map(|b| format!("{b:02x}")).collect();
                write!(f, " size {size} sha256 {short}… links {links:?}")
            }
            Detail::Symlink(target) => write!(f, " -> {}", target.display()),
            Detail::Device(rdev) => write!(f, " rdev {rdev:#x}"),
            Detail::Other => Ok(()),
        }
    }
}

/// Walks `root` (not following symlinks) into entries sorted by path, hard links grouped.
fn manifest(root: &Path) -> io::Result<Vec<Entry>> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut inodes: HashMap<(u64, u64), usize> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        for dirent in fs::read_dir(&dir)? {
            let dirent = dirent?;
            let name = dirent.file_name().to_string_lossy().into_owned();
            let (full, rel) = (dirent.path(), format!("{rel_dir}/{name}"));
            let md = fs::symlink_metadata(&full)?;
            let ft = md.file_type();
            let kind = if ft.is_file() {
                if md.nlink() > 1 {
                    if let Some(&i) = inodes.get(&(md.dev(), md.ino())) {
                        if let Detail::File { links, .. } = &mut entries[i].kind {
                            links.push(rel);
                        }
                        continue;
                    }
                    inodes.insert((md.dev(), md.ino()), entries.len());
                }
                let sha256 = Sha256::digest(fs::read(&full)?).into();
                Detail::File {
                    size: md.size(),
                    sha256,
                    links: vec![rel.clone()],
                }
            } else if ft.is_symlink() {
                Detail::Symlink(fs::read_link(&full)?)
            } else if ft.is_char_device() || ft.is_block_device() {
                Detail::Device(md.rdev())
            } else {
                if ft.is_dir() {
                    stack.push((full, rel.clone()));
                }
                Detail::Other
            };
            let (mode, uid, gid) = (md.mode(), md.uid(), md.gid());
            entries.push(Entry {
                path: rel,
                mode,
                uid,
                gid,
                kind,
            });
        }
    }
    for e in &mut entries {
        if let Detail::File { links, .. } = &mut e.kind {
            links.sort();
            e.path = links[0].clone();
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Compares the trees under `expected` and `actual`; the error lists every difference
/// (`- only expected`, `+ only actual`, `~ expected => actual`).
pub fn check_directory_equal(expected: &Path, actual: &Path) -> Result<(), String> {
    let walk =
        |root: &Path| manifest(root).map_err(|e| format!("failed to walk {}: {e}", root.display()));
    let (want, got) = (walk(expected)?, walk(actual)?);
    let mut diff = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < want.len() || j < got.len() {
        match (want.get(i), got.get(j)) {
            (Some(w), Some(g)) if w.path == g.path => {
                if w != g {
                    diff.push(format!("~ {w}\n    => {g}"));
                }
                i += 1;
                j += 1;
            }
            (Some(w), Some(g)) if w.path < g.path => {
                diff.push(format!("- {w}"));
                i += 1;
            }
            (Some(w), None) => {
                diff.push(format!("- {w}"));
                i += 1;
            }
            (_, Some(g)) => {
                diff.push(format!("+ {g}"));
                j += 1;
            }
            (None, None) => unreachable!("loop condition"),
        }
    }
    if diff.is_empty() {
        return Ok(());
    }
    Err(format!(
        "expected {} to equal {} (- only expected, + only actual, ~ differs):\n{}",
        actual.display(),
        expected.display(),
        diff.join("\n")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(changes: &[Change]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("expected a temp dir");
        apply(dir.path(), changes).expect("expected the changes to apply");
        dir
    }

    fn base() -> Vec<Change> {
        vec![
            create_dir("/a", 0o755),
            create_file("/a/f", "hello", 0o644),
            link("/a/f", "/a/g"),
            symlink("f", "/a/s"),
        ]
    }

    #[test]
    fn identical_trees_are_equal() {
        let (x, y) = (tree(&base()), tree(&base()));
        assert_eq!(check_directory_equal(x.path(), y.path()), Ok(()));
    }

    #[test]
    fn each_compared_property_is_a_difference() {
        let cases: Vec<(&str, Change)> = vec![
            ("content", create_file("/a/f", "HELLO", 0o644)),
            (
                "mode",
                Change::CreateDir {
                    path: "/a".into(),
                    mode: 0o700,
                },
            ),
            ("setuid", create_file("/a/f", "hello", 0o4644)),
            ("extra path", create_file("/extra", "", 0o644)),
            ("missing path", remove_all("/a/s")),
            ("hard-link group", remove_all("/a/g")),
            ("symlink target", remove_all("/a/s")),
        ];
        let x = tree(&base());
        for (what, change) in cases {
            let mut changes = base();
            changes.push(change.clone());
            if what == "symlink target" {
                changes.push(symlink("elsewhere", "/a/s"));
            }
            if what == "hard-link group" {
                changes.push(create_file("/a/g", "hello", 0o644));
            }
            let y = tree(&changes);
            let res = check_directory_equal(x.path(), y.path());
            assert!(
                res.is_err(),
                "expected a difference in {what} after {change:?}"
            );
        }
    }

    #[test]
    fn ownership_is_compared_when_chown_is_permitted() {
        let x = tree(&base());
        let y = tree(&base());
        let target = y.path().join("a/f");
        let md = fs::metadata(&target).expect("expected a/f");
        let other = if md.uid() == 0 { 1 } else { 0 };
        if std::os::unix::fs::chown(&target, Some(other), None).is_ok() {
            let res = check_directory_equal(x.path(), y.path());
            assert!(res.is_err(), "expected an owner difference to be reported");
        }
    }

    #[test]
    fn remove_all_of_a_missing_path_is_ok() {
        let x = tree(&[]);
        assert!(apply(x.path(), &[remove_all("/nothing/here")]).is_ok());
    }
}
