//! The mount system calls, and what their errors mean to callers.

use std::path::Path;

use fs_plugin_api::model::{Error, Result};
use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags, mount, umount2},
};

/// Bind-mounts `source` at `target` and makes that mount read-only; nothing stays mounted on
/// failure.
pub fn bind_mount_read_only(source: &Path, target: &Path) -> Result<()> {
    let context = || format!("bind mount {} at {}", source.display(), target.display());
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| match e {
        Errno::ENOENT => Error::NotFound(format!("{}: {e}", context())),
        e => Error::io(context(), e.into()),
    })?;
    // A bind mount takes the source's flags; read-only needs a second, remounting call.
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        return Err(Error::io(
            format!("remount {} read-only", target.display()),
            e.into(),
        ));
    }
    Ok(())
}

/// Unmounts `target`, detaching it lazily if it is busy.
pub fn unmount(target: &Path) -> Result<()> {
    let context = || format!("unmount {}", target.display());
    match umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => {
            umount2(target, MntFlags::MNT_DETACH).map_err(|e| Error::io(context(), e.into()))
        }
        Err(e @ (Errno::EINVAL | Errno::ENOENT)) => Err(Error::NotFound(format!(
            "{}: nothing mounted there ({e})",
            context()
        ))),
        Err(e) => Err(Error::io(context(), e.into())),
    }
}
