//! Performing a snapshot's [`Mount`]s at a target directory and unmounting them (containerd's
//! `mount.All` and `mount.UnmountAll`; Linux only).
//!
//! Options are split into `MS_*` flags and filesystem data as containerd's `parseMountOptions`
//! does. An overlay whose options exceed mount(2)'s one-page data limit (SEMANTICS §3.8) is made
//! with the new mount API, one `lowerdir+` per layer (kernel >= 6.8, no page limit); when the
//! kernel rejects that, containerd's compaction is used: lowerdirs relative to their common parent
//! directory, mounted from a thread whose working directory is that parent.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
use snapshot_core::Mount;
use tracing::{debug, warn};

use crate::{Error, Result};

/// Performs `mounts` in order at `target` (containerd's `mount.All`).
///
/// Later mounts stack on earlier ones. If one fails, the mounts this call already made are
/// unmounted again before the error is returned.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    mount_all_with(mounts, target, LongOverlay::Auto)
}

/// How an overlay whose options do not fit mount(2)'s one-page data limit is mounted.
///
/// Not a stable interface: it exists so that tests can exercise each path.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LongOverlay {
    /// `lowerdir+` through the new mount API; compaction if the kernel rejects it.
    #[default]
    Auto,
    /// Only the new mount API with `lowerdir+` (fails on kernels without it).
    LowerdirPlus,
    /// Only containerd's lowerdir compaction.
    Compact,
}

/// [`mount_all`] with a chosen way of mounting long overlays.
#[doc(hidden)]
pub fn mount_all_with(mounts: &[Mount], target: &Path, long: LongOverlay) -> Result<()> {
    perform_all(mounts, target, long).map(|_| ())
}

/// Unmounts everything stacked at `target`, newest first, until nothing is left.
///
/// A busy mount is detached lazily (`MNT_DETACH`). Fails with [`Error::NotMounted`] when nothing
/// is mounted at `target`. Like containerd's `UnmountAll`, this also removes mounts at `target`
/// that were there before ours; [`MountGuard`] undoes only its own.
pub fn unmount(target: &Path) -> Result<()> {
    let mut removed = 0usize;
    loop {
        match umount_once(target) {
            Ok(()) => removed += 1,
            Err(Errno::EINVAL) if removed > 0 => {
                debug!(target = %target.display(), removed, "unmounted");
                return Ok(());
            }
            Err(Errno::EINVAL) => return Err(Error::NotMounted(target.to_path_buf())),
            Err(e) => {
                return Err(Error::Unmount {
                    target: target.to_path_buf(),
                    source: e.into(),
                });
            }
        }
    }
}

/// Mounts that are unmounted again when the guard is dropped.
///
/// Dropping only logs unmount failures (`tracing::warn!`); call [`MountGuard::unmount`] to see
/// them.
#[derive(Debug)]
#[must_use = "dropping the guard unmounts at once"]
pub struct MountGuard {
    target: PathBuf,
    /// Mounts this guard stacked at `target` (remounts add none).
    stacked: usize,
    armed: bool,
}

impl MountGuard {
    /// Performs `mounts` at `target` as [`mount_all`] does and guards the result.
    pub fn mount(mounts: &[Mount], target: &Path) -> Result<MountGuard> {
        MountGuard::mount_with(mounts, target, LongOverlay::Auto)
    }

    /// [`MountGuard::mount`] with a chosen way of mounting long overlays.
    #[doc(hidden)]
    pub fn mount_with(mounts: &[Mount], target: &Path, long: LongOverlay) -> Result<MountGuard> {
        let stacked = perform_all(mounts, target, long)?;
        Ok(MountGuard {
            target: target.to_path_buf(),
            stacked,
            armed: true,
        })
    }

    /// The directory the mounts are at.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, returning any error.
    pub fn unmount(mut self) -> Result<()> {
        self.armed = false;
        unmount_stacked(&self.target, self.stacked)
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = unmount_stacked(&self.target, self.stacked) {
            warn!(target = %self.target.display(), error = %e, "failed to unmount");
        }
    }
}

/// Mount options split for mount(2), as containerd's `parseMountOptions` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedOptions {
    /// `MS_*` flags other than propagation.
    pub(crate) flags: MsFlags,
    /// A propagation change (`MS_SHARED`, ... maybe with `MS_REC`), made by a second call.
    pub(crate) propagation: MsFlags,
    /// Options for the filesystem itself, in order.
    pub(crate) data: Vec<String>,
}

/// containerd's table of flag options: name, whether it clears the flag, the flag.
const FLAG_OPTIONS: &[(&str, bool, MsFlags)] = &[
    ("async", true, MsFlags::MS_SYNCHRONOUS),
    ("atime", true, MsFlags::MS_NOATIME),
    ("bind", false, MsFlags::MS_BIND),
    ("dev", true, MsFlags::MS_NODEV),
    ("diratime", true, MsFlags::MS_NODIRATIME),
    ("dirsync", false, MsFlags::MS_DIRSYNC),
    ("exec", true, MsFlags::MS_NOEXEC),
    ("mand", false, MsFlags::MS_MANDLOCK),
    ("noatime", false, MsFlags::MS_NOATIME),
    ("nodev", false, MsFlags::MS_NODEV),
    ("nodiratime", false, MsFlags::MS_NODIRATIME),
    ("noexec", false, MsFlags::MS_NOEXEC),
    ("nomand", true, MsFlags::MS_MANDLOCK),
    ("norelatime", true, MsFlags::MS_RELATIME),
    ("nostrictatime", true, MsFlags::MS_STRICTATIME),
    ("nosuid", false, MsFlags::MS_NOSUID),
    ("rbind", false, MsFlags::MS_BIND.union(MsFlags::MS_REC)),
    ("relatime", false, MsFlags::MS_RELATIME),
    ("remount", false, MsFlags::MS_REMOUNT),
    ("ro", false, MsFlags::MS_RDONLY),
    ("rw", true, MsFlags::MS_RDONLY),
    ("strictatime", false, MsFlags::MS_STRICTATIME),
    ("suid", true, MsFlags::MS_NOSUID),
    ("sync", false, MsFlags::MS_SYNCHRONOUS),
];

/// Propagation options (containerd applies the flags but has no names for them).
const PROPAGATION_OPTIONS: &[(&str, MsFlags)] = &[
    ("shared", MsFlags::MS_SHARED),
    ("rshared", MsFlags::MS_SHARED.union(MsFlags::MS_REC)),
    ("private", MsFlags::MS_PRIVATE),
    ("rprivate", MsFlags::MS_PRIVATE.union(MsFlags::MS_REC)),
    ("slave", MsFlags::MS_SLAVE),
    ("rslave", MsFlags::MS_SLAVE.union(MsFlags::MS_REC)),
    ("unbindable", MsFlags::MS_UNBINDABLE),
    ("runbindable", MsFlags::MS_UNBINDABLE.union(MsFlags::MS_REC)),
];

/// Splits fstab-style options into flags and data; later options win (`ro,rw` is read-write).
///
/// `defaults` is dropped. Options containerd handles that are not implemented yet (`loop`,
/// `uidmap=`, `gidmap=`) are refused rather than silently ignored.
pub(crate) fn parse_options(options: &[String]) -> Result<ParsedOptions> {
    let mut parsed = ParsedOptions {
        flags: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
    };
    for o in options {
        if o == "defaults" {
            continue;
        }
        if let Some(&(_, clear, flag)) = FLAG_OPTIONS.iter().find(|(name, ..)| name == o) {
            parsed.flags.set(flag, !clear);
        } else if let Some(&(_, flag)) = PROPAGATION_OPTIONS.iter().find(|(name, _)| name == o) {
            parsed.propagation = flag;
        } else if o == "loop" || o.starts_with("uidmap=") || o.starts_with("gidmap=") {
            return Err(Error::Unsupported(format!("mount option {o:?}")));
        } else {
            parsed.data.push(o.clone());
        }
    }
    Ok(parsed)
}

/// Performs all mounts; returns how many it stacked at `target`.
fn perform_all(mounts: &[Mount], target: &Path, long: LongOverlay) -> Result<usize> {
    let mut stacked = 0;
    for m in mounts {
        match mount_one(m, target, long) {
            Ok(added) => stacked += usize::from(added),
            Err(e) => {
                if let Err(u) = unmount_stacked(target, stacked) {
                    warn!(target = %target.display(), error = %u, "failed to undo mounts after a failed mount");
                }
                return Err(e);
            }
        }
    }
    Ok(stacked)
}

/// Performs one mount (containerd's `Mount.Mount`); returns whether it stacked a new mount.
fn mount_one(m: &Mount, target: &Path, long: LongOverlay) -> Result<bool> {
    if m.kind.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "mount at {}: empty mount type",
            target.display()
        )));
    }
    if m.kind.starts_with("fuse.") || m.kind.starts_with("fuse3.") {
        return Err(Error::Unsupported(format!("mount type {}", m.kind)));
    }
    let mut opts = parse_options(&m.options)?;
    if m.kind == "bind" {
        // mount(2) knows no filesystem type "bind"; the type means the flag.
        opts.flags |= MsFlags::MS_BIND;
    }
    let creates = !opts.flags.contains(MsFlags::MS_REMOUNT);
    // A remount without data changes only flags, which the calls below do.
    if creates || !opts.data.is_empty() {
        if m.kind == "overlay" {
            mount_overlay(m, target, &opts, long)?;
        } else {
            mount_data(m, target, opts.flags, &opts.data, None)?;
        }
    }
    let finish = || -> Result<()> {
        let failed = |what: &str, source: io::Error| Error::Mount {
            target: target.to_path_buf(),
            kind: m.kind.clone(),
            detail: what.to_owned(),
            source,
        };
        if !opts.propagation.is_empty() {
            sys_mount(None, target, None, opts.propagation, None)
                .map_err(|e| failed("changing propagation", e))?;
        }
        let bind_ro = MsFlags::MS_BIND | MsFlags::MS_RDONLY;
        if opts.flags.contains(bind_ro) {
            // A new bind mount ignores MS_RDONLY: remount it to make it read-only.
            sys_mount(None, target, None, opts.flags | MsFlags::MS_REMOUNT, None)
                .map_err(|e| failed("remounting read-only", e))?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        if creates && let Err(u) = umount_once(target) {
            warn!(target = %target.display(), error = %u, "failed to undo a mount");
        }
        return Err(e);
    }
    Ok(creates)
}

/// Mounts an overlay, choosing how when its options do not fit one page.
fn mount_overlay(m: &Mount, target: &Path, opts: &ParsedOptions, long: LongOverlay) -> Result<()> {
    let remount = opts.flags.contains(MsFlags::MS_REMOUNT);
    if !remount && !opts.data.iter().any(|o| o.starts_with("lowerdir=")) {
        return Err(Error::InvalidArgument(format!(
            "overlay mount at {}: no lowerdir option",
            target.display()
        )));
    }
    if remount || fits_one_page(&m.options) {
        return mount_data(m, target, opts.flags, &opts.data, None);
    }
    match long {
        LongOverlay::Compact => mount_compacted(m, target, opts, ""),
        LongOverlay::LowerdirPlus => match mount_lowerdir_plus(m, target, opts) {
            Ok(()) => Ok(()),
            Err(NewApiFailure::Failed(e)) => Err(e),
            Err(NewApiFailure::Rejected { step, source, log }) => Err(Error::Mount {
                target: target.to_path_buf(),
                kind: m.kind.clone(),
                detail: describe(&step, &log, None),
                source,
            }),
        },
        LongOverlay::Auto => match mount_lowerdir_plus(m, target, opts) {
            Ok(()) => Ok(()),
            Err(NewApiFailure::Failed(e)) => Err(e),
            Err(NewApiFailure::Rejected { step, source, log }) => {
                let why = describe(&step, &log, Some(&source));
                debug!(target = %target.display(), %why, "new mount API refused, compacting lowerdir");
                let detail = format!("{why}; retried with compacted lowerdir");
                mount_compacted(m, target, opts, &detail)
            }
        },
    }
}

/// containerd's rule: plain mount(2) while the options total less than a page minus 512 bytes.
pub(crate) fn fits_one_page(options: &[String]) -> bool {
    options.iter().map(String::len).sum::<usize>() < page_size().saturating_sub(512)
}

/// Why the new mount API did not get to mount.
enum NewApiFailure {
    /// The kernel refused the configuration in a way an older kernel would (e.g. an unknown
    /// `lowerdir+`); another way may work.
    Rejected {
        step: String,
        source: io::Error,
        log: Vec<String>,
    },
    /// A real failure (a missing directory, a refused mount); another way would fail too.
    Failed(Error),
}

/// `step: kernel messages`, or `step: errno` when the kernel said nothing and `errno` is given.
fn describe(step: &str, log: &[String], errno: Option<&io::Error>) -> String {
    match (log.is_empty(), errno) {
        (false, _) => format!("{step}: {}", log.join("; ")),
        (true, Some(e)) => format!("{step}: {e}"),
        (true, None) => step.to_owned(),
    }
}

/// Mounts an overlay through fsopen/fsconfig/fsmount/move_mount, one `lowerdir+` per layer.
fn mount_lowerdir_plus(
    m: &Mount,
    target: &Path,
    opts: &ParsedOptions,
) -> std::result::Result<(), NewApiFailure> {
    let Some((attrs, sb_flags)) = new_api_flags(opts.flags) else {
        return Err(NewApiFailure::Rejected {
            step: format!("mount flags {:?} have no new-API form", opts.flags),
            source: io::Error::from(Errno::EINVAL),
            log: Vec::new(),
        });
    };
    let fs = rustix::mount::fsopen(m.kind.as_str(), FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| {
        let source = io::Error::from(e);
        if matches!(e, rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) {
            NewApiFailure::Rejected {
                step: "fsopen".to_owned(),
                source,
                log: Vec::new(),
            }
        } else {
            NewApiFailure::Failed(Error::Mount {
                target: target.to_path_buf(),
                kind: m.kind.clone(),
                detail: "fsopen".to_owned(),
                source,
            })
        }
    })?;
    // Errors while configuring: those an older kernel gives for `lowerdir+` may be overcome
    // another way; the kernel's own message (read from the context fd) says what went wrong.
    let config_err = |step: String, e: rustix::io::Errno| {
        let log = kernel_log(&fs);
        if matches!(
            e,
            rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP
        ) {
            NewApiFailure::Rejected {
                step,
                source: e.into(),
                log,
            }
        } else {
            NewApiFailure::Failed(Error::Mount {
                target: target.to_path_buf(),
                kind: m.kind.clone(),
                detail: describe(&step, &log, None),
                source: e.into(),
            })
        }
    };
    let set_string = |key: &str, value: &str| {
        rustix::mount::fsconfig_set_string(&fs, key, value)
            .map_err(|e| config_err(format!("fsconfig {key}={value}"), e))
    };
    let set_flag = |key: &str| {
        rustix::mount::fsconfig_set_flag(&fs, key)
            .map_err(|e| config_err(format!("fsconfig {key}"), e))
    };

    set_string("source", &m.source)?;
    for flag in sb_flags {
        set_flag(flag)?;
    }
    for o in &opts.data {
        match o.split_once('=') {
            Some(("lowerdir", dirs)) => {
                for dir in dirs.split(':') {
                    if dir.is_empty() {
                        return Err(NewApiFailure::Failed(Error::InvalidArgument(format!(
                            "overlay mount at {}: empty lowerdir in {o:?} (data-only layers are not supported)",
                            target.display()
                        ))));
                    }
                    set_string("lowerdir+", dir)?;
                }
            }
            Some((key, value)) => set_string(key, value)?,
            None => set_flag(o)?,
        }
    }
    rustix::mount::fsconfig_create(&fs).map_err(|e| config_err("fsconfig create".to_owned(), e))?;

    let failed = |step: &str, e: rustix::io::Errno| {
        NewApiFailure::Failed(Error::Mount {
            target: target.to_path_buf(),
            kind: m.kind.clone(),
            detail: describe(step, &kernel_log(&fs), None),
            source: e.into(),
        })
    };
    let mnt = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(|e| failed("fsmount", e))?;
    rustix::mount::move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| failed("move_mount", e))?;
    Ok(())
}

/// The new mount API's split of `MS_*` flags: mount attributes and superblock flags. `None` for
/// flags it has no equivalent for (bind, remount, recursive).
pub(crate) fn new_api_flags(flags: MsFlags) -> Option<(MountAttrFlags, Vec<&'static str>)> {
    if flags.intersects(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_REC | MsFlags::MS_MOVE)
    {
        return None;
    }
    let mut attrs = MountAttrFlags::empty();
    for (ms, attr) in [
        (MsFlags::MS_RDONLY, MountAttrFlags::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, MountAttrFlags::MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, MountAttrFlags::MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, MountAttrFlags::MOUNT_ATTR_NOEXEC),
        (
            MsFlags::MS_NODIRATIME,
            MountAttrFlags::MOUNT_ATTR_NODIRATIME,
        ),
    ] {
        if flags.contains(ms) {
            attrs |= attr;
        }
    }
    // The atime mode is one value of a field, relatime being the default.
    if flags.contains(MsFlags::MS_NOATIME) {
        attrs |= MountAttrFlags::MOUNT_ATTR_NOATIME;
    } else if flags.contains(MsFlags::MS_STRICTATIME) {
        attrs |= MountAttrFlags::MOUNT_ATTR_STRICTATIME;
    }
    // mount(2) applies these to the superblock; fsconfig takes them by name.
    let mut sb = Vec::new();
    for (ms, name) in [
        (MsFlags::MS_RDONLY, "ro"),
        (MsFlags::MS_SYNCHRONOUS, "sync"),
        (MsFlags::MS_DIRSYNC, "dirsync"),
        (MsFlags::MS_MANDLOCK, "mand"),
        (MsFlags::MS_LAZYTIME, "lazytime"),
    ] {
        if flags.contains(ms) {
            sb.push(name);
        }
    }
    Some((attrs, sb))
}

/// The messages the kernel left on a filesystem context fd (`e overlay: ...`), level dropped.
fn kernel_log(fs: &OwnedFd) -> Vec<String> {
    let mut lines = Vec::new();
    let mut buf = [0u8; 1024];
    // Each read returns one message; ENODATA once the log is empty.
    while lines.len() < 16 {
        match rustix::io::read(fs, &mut buf) {
            Ok(n) if n > 0 => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let text = text.trim_end();
                let text = ["e ", "w ", "i "]
                    .iter()
                    .find_map(|p| text.strip_prefix(p))
                    .unwrap_or(text);
                lines.push(text.to_owned());
            }
            _ => break,
        }
    }
    lines
}

/// An overlay's data with lowerdirs relative to their common parent directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Compacted {
    /// The directory the mount must be made from.
    pub(crate) dir: String,
    /// The data, the rewritten `lowerdir=` last.
    pub(crate) data: Vec<String>,
}

/// containerd's `compactLowerdirOption` on filesystem data: `None` when it does not apply (no or
/// one lowerdir, no common parent other than `/` or `.`).
pub(crate) fn compact_lowerdir(data: &[String]) -> Option<Compacted> {
    const KEY: &str = "lowerdir=";
    let idx = data.iter().position(|o| o.starts_with(KEY))?;
    let dirs: Vec<&str> = data[idx][KEY.len()..].split(':').collect();
    if dirs.len() < 2 {
        return None;
    }
    let common = common_parent(&dirs)?;
    let relative = dirs
        .iter()
        .map(|d| {
            d.strip_prefix(common)
                .map(|r| r.trim_start_matches('/'))
                .filter(|r| !r.is_empty())
        })
        .collect::<Option<Vec<_>>>()?;
    let mut compacted = data.to_vec();
    compacted.remove(idx);
    compacted.push(format!("{KEY}{}", relative.join(":")));
    Some(Compacted {
        dir: common.to_owned(),
        data: compacted,
    })
}

/// The longest common byte prefix of `dirs` backed off to its parent directory (`path.Dir`), as
/// snapshot IDs share string prefixes (`snapshots/1` and `snapshots/12`). `None` for `/` or `.`.
fn common_parent<'a>(dirs: &[&'a str]) -> Option<&'a str> {
    let min = dirs.iter().min()?;
    let max = dirs.iter().max()?;
    let shared = min
        .bytes()
        .zip(max.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let bytes = min.as_bytes();
    // Drop the last element; a prefix without `/` has parent `.`.
    let mut end = bytes[..shared].iter().rposition(|&b| b == b'/')?;
    while end > 0 && bytes[end - 1] == b'/' {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    // `end` is at an ASCII `/`, hence on a char boundary.
    min.get(..end)
}

/// Mounts an overlay with containerd's lowerdir compaction.
fn mount_compacted(m: &Mount, target: &Path, opts: &ParsedOptions, detail: &str) -> Result<()> {
    match compact_lowerdir(&opts.data) {
        Some(c) => {
            debug!(target = %target.display(), dir = %c.dir, "mounting overlay with compacted lowerdir");
            mount_data_detailed(
                m,
                target,
                opts.flags,
                &c.data,
                Some(Path::new(&c.dir)),
                detail,
            )
        }
        None => mount_data_detailed(m, target, opts.flags, &opts.data, None, detail),
    }
}

/// One mount(2) of `m` with `data`, from directory `chdir` if given.
fn mount_data(
    m: &Mount,
    target: &Path,
    flags: MsFlags,
    data: &[String],
    chdir: Option<&Path>,
) -> Result<()> {
    mount_data_detailed(m, target, flags, data, chdir, "")
}

fn mount_data_detailed(
    m: &Mount,
    target: &Path,
    flags: MsFlags,
    data: &[String],
    chdir: Option<&Path>,
    detail: &str,
) -> Result<()> {
    let data = data.join(",");
    let page = page_size();
    // The kernel copies one page, which must hold the terminating NUL too.
    if data.len() >= page {
        return Err(Error::InvalidArgument(format!(
            "{} mount at {}: options are too long ({} bytes; mount(2) takes less than {page}){}",
            m.kind,
            target.display(),
            data.len(),
            if detail.is_empty() {
                String::new()
            } else {
                format!(" ({detail})")
            }
        )));
    }
    let data = (!data.is_empty()).then_some(data.as_str());
    let result = match chdir {
        None => sys_mount(Some(&m.source), target, Some(&m.kind), flags, data)
            .map_err(|e| (String::new(), e)),
        Some(dir) => mount_from(dir, &m.source, target, &m.kind, flags, data),
    };
    result.map_err(|(step, source)| Error::Mount {
        target: target.to_path_buf(),
        kind: m.kind.clone(),
        detail: [detail, step.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("; "),
        source,
    })
}

/// mount(2) from a thread whose working directory is `dir`, so relative paths in `data` resolve
/// there; the process's working directory is left alone (containerd 1.7+). Errors name the step
/// that failed (empty for the mount itself).
fn mount_from(
    dir: &Path,
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> std::result::Result<(), (String, io::Error)> {
    // A relative target would resolve against `dir` once there.
    let target = std::path::absolute(target).map_err(|e| ("resolving the target".to_owned(), e))?;
    let step = |what: String| move |e: Errno| (what, io::Error::from(e));
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name("rootfs-mount".to_owned())
            .spawn_scoped(s, || {
                // Give this thread its own fs context (cwd, root) so chdir touches no other
                // thread; the thread ends right after the mount.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                    .map_err(step("unshare(CLONE_FS)".to_owned()))?;
                nix::unistd::chdir(dir).map_err(step(format!("chdir {}", dir.display())))?;
                sys_mount(Some(source), &target, Some(fstype), flags, data)
                    .map_err(|e| (String::new(), e))
            })
            .map_err(|e| ("starting the mount thread".to_owned(), e))?;
        thread.join().unwrap_or_else(|_| {
            Err((
                "mount thread".to_owned(),
                io::Error::other("mount thread panicked"),
            ))
        })
    })
}

fn sys_mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    nix::mount::mount(source, target, fstype, flags, data).map_err(io::Error::from)
}

/// Unmounts the `count` mounts a guard or a failed [`mount_all`] stacked at `target`.
fn unmount_stacked(target: &Path, count: usize) -> Result<()> {
    for i in 0..count {
        match umount_once(target) {
            Ok(()) => {}
            Err(Errno::EINVAL) if i == 0 => return Err(Error::NotMounted(target.to_path_buf())),
            Err(Errno::EINVAL) => {
                warn!(target = %target.display(), "only {i} of {count} mounts were still mounted");
                return Ok(());
            }
            Err(e) => {
                return Err(Error::Unmount {
                    target: target.to_path_buf(),
                    source: e.into(),
                });
            }
        }
    }
    Ok(())
}

/// Unmounts the top mount at `target`: retried on EINTR, detached lazily when busy.
fn umount_once(target: &Path) -> std::result::Result<(), Errno> {
    let mut flags = MntFlags::empty();
    loop {
        match nix::mount::umount2(target, flags) {
            Err(Errno::EINTR) => continue,
            Err(Errno::EBUSY) if flags.is_empty() => {
                debug!(target = %target.display(), "mount busy, detaching it");
                flags = MntFlags::MNT_DETACH;
            }
            other => return other,
        }
    }
}

/// The size of the page mount(2) copies its data into.
fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(
        || match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
            Ok(Some(n)) => usize::try_from(n).unwrap_or(4096),
            _ => 4096,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn bind_options_become_flags() {
        let rw = parse_options(&strings(&["rw", "rbind"])).unwrap();
        assert_eq!(rw.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(rw.data.is_empty());
        let ro = parse_options(&strings(&["ro", "rbind"])).unwrap();
        assert_eq!(
            ro.flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY
        );
    }

    #[test]
    fn later_options_win_and_clear_flags() {
        let p =
            parse_options(&strings(&["ro", "nosuid", "rw", "suid", "nodev", "noexec"])).unwrap();
        assert_eq!(p.flags, MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
        let p = parse_options(&strings(&["sync", "async", "remount", "bind", "defaults"])).unwrap();
        assert_eq!(p.flags, MsFlags::MS_REMOUNT | MsFlags::MS_BIND);
        assert!(p.data.is_empty());
    }

    #[test]
    fn overlay_options_stay_data_in_order() {
        let opts = strings(&[
            "index=off",
            "userxattr",
            "workdir=/s/2/work",
            "upperdir=/s/2/fs",
            "lowerdir=/s/1/fs:/s/0/fs",
        ]);
        let p = parse_options(&opts).unwrap();
        assert_eq!(p.flags, MsFlags::empty());
        assert_eq!(p.data, opts);
    }

    #[test]
    fn propagation_is_kept_apart() {
        let p = parse_options(&strings(&["rbind", "rprivate"])).unwrap();
        assert_eq!(p.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(p.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
    }

    #[test]
    fn unimplemented_options_are_refused() {
        for o in ["loop", "uidmap=0:1000:1", "gidmap=0:1000:1"] {
            let e = parse_options(&strings(&[o])).unwrap_err();
            assert_eq!(e.kind(), snapshot_core::ErrorKind::NotImplemented, "{o}");
        }
    }

    #[test]
    fn compaction_backs_off_to_the_parent_of_the_common_prefix() {
        // `snapshots/1`, `snapshots/12`, `snapshots/13` share the string prefix `snapshots/1`.
        let data = strings(&[
            "lowerdir=/var/lib/s/snapshots/12/fs:/var/lib/s/snapshots/1/fs:/var/lib/s/snapshots/13/fs",
            "workdir=/var/lib/s/snapshots/14/work",
            "upperdir=/var/lib/s/snapshots/14/fs",
            "index=off",
        ]);
        let c = compact_lowerdir(&data).unwrap();
        assert_eq!(c.dir, "/var/lib/s/snapshots");
        assert_eq!(
            c.data,
            strings(&[
                "workdir=/var/lib/s/snapshots/14/work",
                "upperdir=/var/lib/s/snapshots/14/fs",
                "index=off",
                "lowerdir=12/fs:1/fs:13/fs",
            ])
        );
    }

    #[test]
    fn compaction_of_sibling_dirs_uses_their_parent() {
        let data = strings(&["lowerdir=/a/b/l2:/a/b/l1:/a/b/l0"]);
        let c = compact_lowerdir(&data).unwrap();
        assert_eq!(c.dir, "/a/b");
        assert_eq!(c.data, strings(&["lowerdir=l2:l1:l0"]));
    }

    #[test]
    fn compaction_does_not_apply_without_a_useful_common_dir() {
        // One lowerdir, no lowerdir, common dir `/`, and relative dirs with common dir `.`.
        assert_eq!(compact_lowerdir(&strings(&["lowerdir=/a/b/c"])), None);
        assert_eq!(compact_lowerdir(&strings(&["upperdir=/a/b/c"])), None);
        assert_eq!(compact_lowerdir(&strings(&["lowerdir=/a/1:/b/1"])), None);
        assert_eq!(compact_lowerdir(&strings(&["lowerdir=l1:l2"])), None);
        // A lowerdir that is the common dir itself cannot be made relative.
        assert_eq!(compact_lowerdir(&strings(&["lowerdir=/a/b/:/a/b/c"])), None);
    }

    #[test]
    fn compaction_prefix_is_byte_wise_but_cut_at_a_slash() {
        // Multi-byte characters sharing a leading byte must not be split.
        let c = compact_lowerdir(&strings(&["lowerdir=/x/é/1:/x/è/2"])).unwrap();
        assert_eq!(c.dir, "/x");
        assert_eq!(c.data, strings(&["lowerdir=é/1:è/2"]));
    }

    #[test]
    fn page_rule_is_containerds() {
        let page = page_size();
        assert!(fits_one_page(&["x".repeat(page - 513)]));
        assert!(!fits_one_page(&["x".repeat(page - 600), "y".repeat(88)]));
    }

    #[test]
    fn new_api_flags_split_attributes_and_superblock_flags() {
        let (attrs, sb) =
            new_api_flags(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOATIME).unwrap();
        assert_eq!(
            attrs,
            MountAttrFlags::MOUNT_ATTR_RDONLY
                | MountAttrFlags::MOUNT_ATTR_NOSUID
                | MountAttrFlags::MOUNT_ATTR_NOATIME
        );
        assert_eq!(sb, vec!["ro"]);
        assert!(new_api_flags(MsFlags::MS_BIND).is_none());
        assert!(new_api_flags(MsFlags::MS_REMOUNT).is_none());
    }
}
