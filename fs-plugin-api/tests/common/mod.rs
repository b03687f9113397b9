//! Helpers shared by the plugin test suites (each suite uses a subset).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, umount2};

/// The directory named by the environment variable `var`, which `cargo xtask test-plugins` sets.
/// Panics (never skips) when it is missing.
pub fn env_dir(var: &str) -> PathBuf {
    let Some(value) = std::env::var_os(var) else {
        panic!(
            "{var} is not set: these tests need built plugins; run them with `cargo xtask test-plugins`"
        );
    };
    let dir = PathBuf::from(value);
    assert!(dir.is_dir(), "{var}={} is not a directory", dir.display());
    dir
}

/// The mount points of this process's mount namespace (from `/proc/self/mountinfo`).
pub fn mount_points() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// True if something is mounted at `path`.
pub fn is_mount_point(path: &Path) -> bool {
    let path = path.canonicalize().unwrap();
    mount_points().contains(&path)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Detaches whatever is still mounted at its path when dropped, so a failing test leaves no mount.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        while self.0.exists() && is_mount_point(&self.0) {
            if umount2(&self.0, MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

/// An empty directory under `parent` to mount on, with a guard for it.
pub fn mountpoint(parent: &Path, name: &str) -> (PathBuf, MountGuard) {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    (dir.clone(), MountGuard(dir))
}

/// True if `dir` has no entries.
pub fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}
