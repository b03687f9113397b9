//! `init_rootfs`: a container's root filesystem on top of an image (SEMANTICS.md §5.2).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use snapshot_core::{CommitOpts, ErrorKind, Labels, Mount, Snapshotter};

use crate::mount::MountGuard;
use crate::{Error, Result};

/// Directories every Linux container expects (created 0755 in the init layer).
const INIT_DIRS: &[&str] = &["dev", "dev/pts", "dev/shm", "proc", "sys", "etc"];
/// Empty files the runtime bind-mounts over (created 0644 in the init layer).
const INIT_FILES: &[&str] = &[
    "dev/console",
    "etc/resolv.conf",
    "etc/hosts",
    "etc/hostname",
];

/// The name of the init layer of `parent`.
pub fn init_layer_name(parent: &str) -> String {
    format!("{parent} linux-init")
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(context, e)
}

/// Creates the init entries in a mounted root, owned like the root; entries that already exist
/// with the right type and owner are left alone.
fn write_init_layer(root: &Path) -> Result<()> {
    let md = std::fs::metadata(root).map_err(io(format!("stat {}", root.display())))?;
    let (uid, gid) = (md.uid(), md.gid());
    let owned = |p: &Path, want_dir: bool| -> Result<bool> {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() == want_dir && (m.is_file() || m.is_dir()) => {
                Ok(m.uid() == uid && m.gid() == gid)
            }
            Ok(m) => {
                // Wrong type: replace it.
                let removed = if m.is_dir() {
                    std::fs::remove_dir_all(p)
                } else {
                    std::fs::remove_file(p)
                };
                removed.map_err(io(format!("remove {}", p.display())))?;
                Ok(false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("stat {}", p.display()), e)),
        }
    };
    for d in INIT_DIRS {
        let p = root.join(d);
        if owned(&p, true)? {
            continue;
        }
        if !p.exists() {
            std::fs::create_dir(&p).map_err(io(format!("mkdir {}", p.display())))?;
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("chmod {}", p.display())))?;
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .map_err(io(format!("chown {}", p.display())))?;
    }
    for f in INIT_FILES {
        let p = root.join(f);
        if owned(&p, false)? {
            continue;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io(format!("create {}", p.display())))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
            .map_err(io(format!("chmod {}", p.display())))?;
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .map_err(io(format!("chown {}", p.display())))?;
    }
    let mtab = root.join("etc/mtab");
    if std::fs::symlink_metadata(&mtab).is_err() {
        std::os::unix::fs::symlink("/proc/mounts", &mtab)
            .map_err(io(format!("symlink {}", mtab.display())))?;
        std::os::unix::fs::lchown(&mtab, Some(uid), Some(gid))
            .map_err(io(format!("chown {}", mtab.display())))?;
    }
    Ok(())
}

/// Makes (or reuses) the init layer over `parent` and returns its name.
fn ensure_init_layer(sn: &dyn Snapshotter, parent: &str) -> Result<String> {
    let name = init_layer_name(parent);
    match sn.stat(&name) {
        Ok(_) => return Ok(name),
        Err(e) if e.is(ErrorKind::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    let key = format!("{name} {}", crate::unpack::unique_key_suffix());
    let mounts = sn.prepare(&key, parent, &Labels::new())?;
    let result = (|| {
        let target = tempfile::Builder::new()
            .prefix("strata-init-")
            .tempdir()
            .map_err(io("create temp mountpoint".into()))?;
        let guard = MountGuard::mount(&mounts, target.path())?;
        write_init_layer(target.path())?;
        guard.unmount()?;
        match sn.commit(&name, &key, &CommitOpts::default()) {
            Err(e) if e.is(ErrorKind::AlreadyExists) => Err(Error::Snapshot(e)),
            other => other.map_err(Error::Snapshot),
        }
    })();
    match result {
        Ok(()) => Ok(name),
        Err(e) => {
            let _ = sn.remove(&key);
            // Lost a race with another init of the same parent: use theirs.
            if matches!(&e, Error::Snapshot(s) if s.is(ErrorKind::AlreadyExists)) {
                return Ok(name);
            }
            Err(e)
        }
    }
}

/// Creates snapshot `name` for a container over the image chain `parent`: an active (rw) or,
/// with `readonly`, a view snapshot on top of `parent`'s init layer. Returns its mounts. Fails
/// with AlreadyExists if `name` exists.
pub fn init_rootfs(
    name: &str,
    parent: &str,
    readonly: bool,
    sn: &dyn Snapshotter,
) -> Result<Vec<Mount>> {
    match sn.stat(name) {
        Ok(_) => {
            return Err(Error::Snapshot(snapshot_core::Error::AlreadyExists(
                format!("rootfs {name:?}"),
            )));
        }
        Err(e) if e.is(ErrorKind::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    let init = ensure_init_layer(sn, parent)?;
    let mounts = if readonly {
        sn.view(name, &init, &Labels::new())?
    } else {
        sn.prepare(name, &init, &Labels::new())?
    };
    Ok(mounts)
}
