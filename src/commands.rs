//! The subcommands.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result, bail};
use rootfs::applier::ContentApplier;
use rootfs::content::ContentStore;
use rootfs::diff::Compression;
use rootfs::{UnpackOpts, Unpacker};
use snapshot_core::identity::Digest;
use snapshot_core::{FileSystem, LABEL_REMOTE, Snapshotter};
use snapshot_overlay::{Options, OverlaySnapshotter};

use crate::image_ref::ImageRef;
use crate::progress::Progress;
use crate::{Cli, Command, CompressionArg, DEFAULT_ROOT};

/// Where state lives and which backing file system (if any) provides layers.
pub struct Settings {
    /// The state directory.
    pub root: PathBuf,
    /// The configured backing file system, loaded in the background.
    filesystem: Loading,
}

type LoadResult = Result<Option<Arc<dyn FileSystem>>>;

/// A backing file system plugin being loaded on another thread (its `dlopen` from a cold page
/// cache overlaps the first round trips of a pull).
struct Loading {
    configured: bool,
    thread: Mutex<Option<std::thread::JoinHandle<LoadResult>>>,
    loaded: OnceLock<std::result::Result<Option<Arc<dyn FileSystem>>, String>>,
}

impl Settings {
    /// Whether the config names a backing file system.
    pub fn has_filesystem(&self) -> bool {
        self.filesystem.configured
    }

    /// The configured backing file system (waits for it to load).
    pub fn filesystem(&self) -> Result<Option<Arc<dyn FileSystem>>> {
        let loaded = self.filesystem.loaded.get_or_init(|| {
            let thread = self
                .filesystem
                .thread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            match thread.map(|t| t.join()) {
                None => Ok(None),
                Some(Ok(r)) => r.map_err(|e| format!("{e:#}")),
                Some(Err(_)) => Err("loading the backing file system panicked".into()),
            }
        });
        loaded.clone().map_err(anyhow::Error::msg)
    }
}

fn settings(cli: &Cli) -> Result<Settings> {
    let config = match &cli.config {
        Some(path) => Some(
            fs_plugin_api::config::Config::load(path)
                .with_context(|| format!("config {}", path.display()))?,
        ),
        None => None,
    };
    let root = cli
        .root
        .clone()
        .or_else(|| config.as_ref().map(|c| c.root.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    let configured = config.as_ref().is_some_and(|c| c.filesystem.is_some());
    let thread = match config {
        Some(c) if configured => Some(
            std::thread::Builder::new()
                .name("strata-load-fs".into())
                .spawn(move || {
                    c.filesystem()
                        .context("load the backing file system plugin")
                })
                .context("start loading the backing file system")?,
        ),
        _ => None,
    };
    Ok(Settings {
        root,
        filesystem: Loading {
            configured,
            thread: Mutex::new(thread),
            loaded: OnceLock::new(),
        },
    })
}

/// Opens the overlay snapshotter of `settings` (remote-capable when a file system is set).
pub fn open_snapshotter(settings: &Settings) -> Result<OverlaySnapshotter> {
    OverlaySnapshotter::open_with_filesystem(
        &settings.root,
        Options::default(),
        settings.filesystem()?,
    )
    .with_context(|| format!("open snapshotter at {}", settings.root.display()))
}

/// Unpacks `image` into `sn` with progress output; returns the top chain ID.
pub fn unpack(sn: &dyn Snapshotter, image: &ImageRef, remote: bool) -> Result<Digest> {
    let store = ContentStore::open(&image.layout)
        .with_context(|| format!("open image layout {}", image.layout.display()))?;
    let img = store
        .resolve(image.reference.as_deref())
        .with_context(|| format!("resolve image in {}", image.layout.display()))?;
    let progress = Progress::new();
    let applier = ContentApplier::new(store).with_progress(progress.callback());
    // Remote layers are only tried in ordered mode (they need each layer's parent).
    let opts = if remote {
        UnpackOpts { max_parallel: 1 }
    } else {
        UnpackOpts::default()
    };
    let chain = Unpacker::new()
        .apply_layers(&img.layers, sn, &applier, &opts)
        .context("unpack")?;
    Ok(chain)
}

fn default_name(target: &Path) -> Result<String> {
    let abs = std::fs::canonicalize(target)
        .with_context(|| format!("mount point {}", target.display()))?;
    Ok(format!("mount:{}", abs.display()))
}

/// Runs the command line.
pub fn run(cli: Cli) -> Result<()> {
    let settings = settings(&cli)?;
    match cli.command {
        Command::Unpack { image } => {
            let sn = open_snapshotter(&settings)?;
            let chain = unpack(&sn, &ImageRef::parse(&image), settings.has_filesystem())?;
            println!("{chain}");
            sn.close()?;
        }
        Command::Pull {
            reference,
            plain_http,
            lazy,
            mount,
            rw,
            name,
        } => {
            let opts = crate::pull::PullOpts {
                plain_http,
                lazy,
                ..Default::default()
            };
            let mount = mount.map(|target| MountOpts {
                target,
                rw,
                name,
                foreground: settings.has_filesystem(),
            });
            crate::pull::run(&settings, &reference, &opts, mount.as_ref())?
        }
        Command::Mount {
            image,
            target,
            rw,
            name,
            foreground,
        } => {
            require_root()?;
            let sn = open_snapshotter(&settings)?;
            let chain = unpack(&sn, &ImageRef::parse(&image), settings.has_filesystem())?;
            let opts = MountOpts {
                target,
                rw,
                name,
                foreground,
            };
            mount_image(&sn, &chain, &opts)?;
            sn.close()?;
        }
        Command::Umount { target, rm, name } => {
            let name = match name {
                Some(n) => n,
                None => default_name(&target)?,
            };
            rootfs::mount::unmount(&target)?;
            if rm {
                let sn = open_snapshotter(&settings)?;
                sn.remove(&name)
                    .with_context(|| format!("remove {name:?}"))?;
                sn.close()?;
            }
        }
        Command::Diff {
            name,
            out,
            compression,
        } => {
            let sn = open_snapshotter(&settings)?;
            let store = ContentStore::create(&out)
                .with_context(|| format!("open output layout {}", out.display()))?;
            let compression = match compression {
                CompressionArg::Gzip => Compression::Gzip,
                CompressionArg::Zstd => Compression::Zstd,
                CompressionArg::None => Compression::None,
            };
            let diff = rootfs::diff(&name, &sn, &store, compression)
                .with_context(|| format!("diff {name:?}"))?;
            println!("{}", serde_json::to_string_pretty(&diff.blob)?);
            sn.close()?;
        }
        Command::Export { to, image } => {
            let image = ImageRef::parse(&image);
            let store = ContentStore::open(&image.layout)
                .with_context(|| format!("open image layout {}", image.layout.display()))?;
            let img = store.resolve(image.reference.as_deref())?;
            for layer in &img.layers {
                let what = rootfs::export::export_layer(&store, layer, &to)
                    .with_context(|| format!("export layer {}", layer.blob.digest()))?;
                let dir = rootfs::export::layer_dir(&to, layer.blob.digest());
                println!("{} {:?}", dir.display(), what);
            }
        }
        Command::Convert(args) => crate::convert::run(&args)?,
        Command::Ls => {
            let sn = open_snapshotter(&settings)?;
            let mut infos = Vec::new();
            sn.walk(&[], &mut |info| {
                infos.push(info.clone());
                Ok(())
            })?;
            println!("{:<72} {:<10} {:<16} PARENT", "NAME", "KIND", "REMOTE");
            for info in infos {
                let remote = if info.labels.contains_key(LABEL_REMOTE) {
                    remote_state(&sn, &info.name)
                } else {
                    "-".to_string()
                };
                println!(
                    "{:<72} {:<10} {:<16} {}",
                    info.name,
                    info.kind.to_string(),
                    remote,
                    info.parent
                );
            }
            sn.close()?;
        }
        Command::Rm { name } => {
            let sn = open_snapshotter(&settings)?;
            sn.remove(&name)?;
            sn.close()?;
        }
        Command::Usage { name } => {
            let sn = open_snapshotter(&settings)?;
            let u = sn.usage(&name)?;
            println!("size={} inodes={}", u.size, u.inodes);
            sn.close()?;
        }
        Command::Demo { image } => {
            require_root()?;
            crate::demo::run(&settings, image.as_deref())?
        }
        Command::Serve {
            address,
            async_remove,
        } => {
            let opts = crate::serve::ServeOpts {
                address: &address,
                async_remove,
            };
            crate::serve::run(&settings, &opts)?
        }
    }
    Ok(())
}

/// `remote`, or how far a lazily fetched remote layer is (`lazy 42%`, `complete`), as its
/// plugin reports it.
fn remote_state(sn: &OverlaySnapshotter, key: &str) -> String {
    let status = sn
        .snapshot_dir_of(key)
        .ok()
        .and_then(|dir| fs_plugin_api::status::read_status(&dir.join("fs")));
    match status {
        Some(s) if s.state == "lazy" => format!("lazy {:.0}%", s.percent_cached),
        Some(s) => s.state,
        None => "remote".to_string(),
    }
}

/// Where and how `strata mount` (or `strata pull --mount`) mounts an image.
pub struct MountOpts {
    /// Directory to mount at.
    pub target: PathBuf,
    /// An active snapshot instead of a read-only view.
    pub rw: bool,
    /// Snapshot name (default: `mount:<target>`).
    pub name: Option<String>,
    /// Serve until SIGINT/SIGTERM or until `target` is unmounted, then unmount (and remove a
    /// read-only view).
    pub foreground: bool,
}

/// Creates a container snapshot on `chain` and mounts it at `opts.target`; prints its name.
pub fn mount_image(sn: &OverlaySnapshotter, chain: &Digest, opts: &MountOpts) -> Result<()> {
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => default_name(&opts.target)?,
    };
    let mounts = rootfs::init_rootfs(&name, chain.as_ref(), !opts.rw, sn)
        .with_context(|| format!("create rootfs {name:?}"))?;
    // The mount outlives this process unless in the foreground; `strata umount` undoes it.
    rootfs::mount::mount_all(&mounts, &opts.target)?;
    println!("{name}");
    if opts.foreground {
        serve_until_unmounted(&opts.target)?;
        if !opts.rw {
            // A read-only view holds nothing: do not leave it behind.
            sn.remove(&name)
                .with_context(|| format!("remove the view {name:?}"))?;
        }
    }
    Ok(())
}

/// Keeps this process (and the FUSE layers it serves) alive until SIGINT/SIGTERM or until
/// `target` stops being a mount point; unmounts `target` if it still is one.
fn serve_until_unmounted(target: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let is_mounted = || -> bool {
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        let parent = target.parent().unwrap_or(Path::new("/"));
        dev(target) != dev(parent)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the signal handler")?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => if !is_mounted() { break },
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .context("wait for a signal")?;
    if is_mounted() {
        rootfs::mount::unmount(target)?;
    }
    Ok(())
}

/// Fails unless running as root (mounting needs it).
pub fn require_root() -> Result<()> {
    if !is_root() {
        bail!("this command mounts file systems and must run as root");
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(|u| u == "0")
        })
        .unwrap_or(false)
}
