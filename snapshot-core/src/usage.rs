//! Disk usage of a directory tree, as containerd computes it for snapshots.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::{Error, Result, Usage};

/// Walks `root` (itself included, symlinks not followed) and counts each distinct inode once:
/// `inodes` distinct inodes, `size` = sum of allocated bytes (`st_blocks * 512`). Hard links are
/// counted once.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("disk usage: stat {}", path.display()), e))?;
        if seen.insert((md.dev(), md.ino())) {
            usage.inodes += 1;
            usage.size += (md.blocks() * 512) as i64;
        }
        if md.is_dir() {
            let entries = std::fs::read_dir(&path)
                .map_err(|e| Error::io(format!("disk usage: read {}", path.display()), e))?;
            for entry in entries {
                let entry = entry
                    .map_err(|e| Error::io(format!("disk usage: read {}", path.display()), e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_are_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000]).unwrap();
        let before = disk_usage(dir.path()).unwrap();
        assert_eq!(before.inodes, 2);
        assert!(before.size >= 10_000, "{before:?}");
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        assert_eq!(disk_usage(dir.path()).unwrap(), before);
    }

    #[test]
    fn missing_root_is_an_io_error() {
        let e = disk_usage(Path::new("/nonexistent/strata")).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unknown);
    }
}
