//! `OverlaySnapshotter`: metadata in a [`MetaStore`], data in `<root>/snapshots/<id>`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use snapshot_core::filter::Filter;
use snapshot_core::{
    CommitOpts, Error, FileSystem, Info, Kind, LABEL_OVERLAY_UPPERDIR, Labels, MetaStore, Mount,
    Result, Snapshot, Snapshotter, Usage, WriteTx, disk_usage,
};

use crate::mounts::{extra_overlay_options, running_in_user_namespace, snapshot_mounts};
use crate::remote::wants_remote;

/// Options of the overlay snapshotter.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `remove` only deletes metadata; disk space is reclaimed by `cleanup` (containerd's
    /// `AsynchronousRemove`, the default inside containerd 1.x).
    pub async_remove: bool,
    /// Add `containerd.io/snapshot/overlay.upperdir` to the labels returned by stat/update/walk.
    pub upperdir_label: bool,
    /// Extra overlay mount options (e.g. `volatile`), put on every overlay mount.
    pub mount_options: Vec<String>,
}

/// containerd's overlayfs snapshotter.
pub struct OverlaySnapshotter {
    root: PathBuf,
    ms: MetaStore,
    opts: Options,
    extra_options: Vec<String>,
    fs: Option<Arc<dyn FileSystem>>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |e| Error::io(context, e)
}

fn mkdir_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::create_dir(path).map_err(io(format!("mkdir {}", path.display())))?;
    // Explicit chmod: the mode must not depend on the process umask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", path.display())))
}

/// A unique name for a directory under construction (`new-*`), reaped by cleanup after a crash.
fn temp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "new-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl OverlaySnapshotter {
    /// Opens (or creates) a snapshotter rooted at `root`.
    pub fn open(root: &Path, opts: Options) -> Result<OverlaySnapshotter> {
        Self::open_with_filesystem(root, opts, None)
    }

    /// Opens a snapshotter whose layers may be provided by a backing file system (the remote
    /// snapshotter): remote snapshots found in the store are mounted again before this returns.
    pub fn open_with_filesystem(
        root: &Path,
        opts: Options,
        fs: Option<Arc<dyn FileSystem>>,
    ) -> Result<OverlaySnapshotter> {
        std::fs::create_dir_all(root).map_err(io(format!("create root {}", root.display())))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", root.display())))?;
        let ms = MetaStore::open(root.join("metadata.db"))?;
        let snapshots = root.join("snapshots");
        if !snapshots.is_dir() {
            mkdir_mode(&snapshots, 0o700)?;
        }
        let extra_options = extra_overlay_options(&opts.mount_options);
        let sn = OverlaySnapshotter {
            root: root.to_path_buf(),
            ms,
            opts,
            extra_options,
            fs,
        };
        sn.restore_remote()?;
        Ok(sn)
    }

    pub(crate) fn filesystem(&self) -> Option<&Arc<dyn FileSystem>> {
        self.fs.as_ref()
    }

    pub(crate) fn store(&self) -> &MetaStore {
        &self.ms
    }

    /// Commit; `usage` false skips the disk walk (remote layers: their files are not ours).
    pub(crate) fn commit_inner(
        &self,
        name: &str,
        key: &str,
        opts: &CommitOpts,
        usage: bool,
    ) -> Result<()> {
        self.ms.write(|tx| {
            let (id, _, stored) = tx.get_info(key)?;
            let usage = if usage {
                disk_usage(&self.upper_dir(&id))?
            } else {
                stored
            };
            tx.commit_active(key, name, usage, opts)
        })?;
        Ok(())
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of snapshot `id`.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

    /// The directory of the snapshot named `key` (its files are in `fs` below it).
    pub fn snapshot_dir_of(&self, key: &str) -> Result<PathBuf> {
        let (id, _, _) = self.ms.read(|tx| tx.get_info(key))?;
        Ok(self.snapshot_dir(&id))
    }

    /// The upper (content) directory of snapshot `id`.
    pub fn upper_dir(&self, id: &str) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    fn mounts_of(&self, s: &Snapshot) -> Vec<Mount> {
        let dir = |id: &str, sub: &str| self.snapshot_dir(id).join(sub).display().to_string();
        snapshot_mounts(
            s.kind,
            &s.id,
            &s.parent_ids,
            &self.extra_options,
            |id| dir(id, "fs"),
            |id| dir(id, "work"),
        )
    }

    fn with_upperdir_label(&self, id: &str, mut info: Info) -> Info {
        if self.opts.upperdir_label {
            info.labels.insert(
                LABEL_OVERLAY_UPPERDIR.into(),
                self.upper_dir(id).display().to_string(),
            );
        }
        info
    }

    fn create(&self, kind: Kind, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>> {
        let snapshots = self.root.join("snapshots");
        let mut made: Option<PathBuf> = None;
        let res = self.ms.write(|tx| {
            let tmp = snapshots.join(temp_name());
            mkdir_mode(&tmp, 0o700)?;
            made = Some(tmp.clone());
            mkdir_mode(&tmp.join("fs"), 0o755)?;
            if kind == Kind::Active {
                mkdir_mode(&tmp.join("work"), 0o711)?;
            }
            let snap = tx.create_snapshot(kind, key, parent, labels)?;
            if let Some(pid) = snap.parent_ids.first() {
                let parent_fs = self.upper_dir(pid);
                let md = std::fs::metadata(&parent_fs)
                    .map_err(io(format!("stat {}", parent_fs.display())))?;
                std::os::unix::fs::chown(tmp.join("fs"), Some(md.uid()), Some(md.gid()))
                    .map_err(io(format!("chown {}", tmp.join("fs").display())))?;
            }
            let target = self.snapshot_dir(&snap.id);
            if target.exists() {
                // IDs are never reused, so this is an orphan of a crashed transaction.
                tracing::warn!(path = %target.display(), "removing orphan snapshot directory");
                std::fs::remove_dir_all(&target)
                    .map_err(io(format!("remove orphan {}", target.display())))?;
            }
            std::fs::rename(&tmp, &target).map_err(io(format!(
                "rename {} to {}",
                tmp.display(),
                target.display()
            )))?;
            made = Some(target);
            Ok(snap)
        });
        match res {
            Ok(snap) => Ok(self.mounts_of(&snap)),
            Err(e) => {
                if let Some(dir) = made
                    && let Err(err) = std::fs::remove_dir_all(&dir)
                {
                    tracing::warn!(path = %dir.display(), %err, "cannot remove directory of failed snapshot");
                }
                Err(e)
            }
        }
    }

    /// Directories under `snapshots/` that belong to no live snapshot (removed or orphaned).
    fn cleanup_dirs(&self, tx: &WriteTx) -> Result<Vec<PathBuf>> {
        let ids = tx.id_map()?;
        let snapshots = self.root.join("snapshots");
        let entries =
            std::fs::read_dir(&snapshots).map_err(io(format!("read {}", snapshots.display())))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(format!("read {}", snapshots.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !ids.contains_key(&name) {
                out.push(entry.path());
            }
        }
        Ok(out)
    }
}

impl Snapshotter for OverlaySnapshotter {
    fn stat(&self, key: &str) -> Result<Info> {
        let (id, info, _) = self.ms.read(|tx| tx.get_info(key))?;
        Ok(self.with_upperdir_label(&id, info))
    }

    fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info> {
        let (id, out) = self.ms.write(|tx| {
            let out = tx.update_info(info, fieldpaths)?;
            let (id, _, _) = tx.get_info(&info.name)?;
            Ok((id, out))
        })?;
        Ok(self.with_upperdir_label(&id, out))
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let (id, info, usage) = self.ms.read(|tx| tx.get_info(key))?;
        match info.kind {
            Kind::Active => disk_usage(&self.upper_dir(&id)),
            _ => Ok(usage),
        }
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let snap = self.ms.read(|tx| tx.get_snapshot(key))?;
        self.check_available(key)?;
        Ok(self.mounts_of(&snap))
    }

    fn prepare(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>> {
        let mounts = self.create(Kind::Active, key, parent, labels)?;
        if wants_remote(Kind::Active, labels) {
            // Err(AlreadyExists) when the layer was mounted remotely; Ok to fall back.
            self.try_prepare_remote(key, labels)?;
        }
        self.check_available(parent)?;
        Ok(mounts)
    }

    fn view(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>> {
        let mounts = self.create(Kind::View, key, parent, labels)?;
        self.check_available(parent)?;
        Ok(mounts)
    }

    fn commit(&self, name: &str, key: &str, opts: &CommitOpts) -> Result<()> {
        self.commit_inner(name, key, opts, true)
    }

    fn remove(&self, key: &str) -> Result<()> {
        let dirs = self
            .ms
            .write(|tx| {
                tx.remove(key)?;
                if self.opts.async_remove {
                    Ok(Vec::new())
                } else {
                    self.cleanup_dirs(tx)
                }
            })
            .map_err(|e| e.context("failed to remove"))?;
        self.remove_dirs(dirs);
        Ok(())
    }

    fn walk(&self, filters: &[&str], f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()> {
        let filter = Filter::parse(filters)?;
        if !self.opts.upperdir_label {
            return self.ms.read(|tx| tx.walk(&filter, f));
        }
        self.ms.read(|tx| {
            let ids = tx.id_map()?;
            let by_key: std::collections::HashMap<&String, &String> =
                ids.iter().map(|(id, key)| (key, id)).collect();
            tx.walk(&filter, &mut |info| match by_key.get(&info.name) {
                Some(id) => f(&self.with_upperdir_label(id, info.clone())),
                None => f(info),
            })
        })
    }

    fn cleanup(&self) -> Result<()> {
        let dirs = self.ms.write(|tx| self.cleanup_dirs(tx))?;
        self.remove_dirs(dirs);
        Ok(())
    }

    /// Closes the metadata store. Remote layers stay mounted (they are unmounted when their
    /// snapshot is removed; the next open checks and, if needed, remounts them).
    fn close(&self) -> Result<()> {
        self.ms.close()
    }

    fn capabilities(&self) -> Vec<String> {
        if running_in_user_namespace() {
            // Parallel unpack relies on writing overlay whiteouts, which a user namespace cannot.
            Vec::new()
        } else {
            vec!["rebase".into()]
        }
    }
}
