//! `strata`: unpack OCI images into snapshots, mount root filesystems, turn containers' changes
//! back into layers.

mod commands;
mod convert;
mod demo;
mod image_ref;
mod progress;
mod pull;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Keeps glibc from raising its mmap threshold as large blocks are freed. Each FUSE session
/// (fuser) allocates zeroed 16 MiB request buffers; served from the heap once the threshold has
/// grown, every one of them is memset page by page (tens of ms per lazily mounted layer), while
/// as fresh mappings they cost only the pages the kernel's requests touch. Smaller blocks (TOCs,
/// chunks) still reuse the heap, kept up to the trim threshold glibc would pick itself.
fn pin_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Default state directory.
const DEFAULT_ROOT: &str = "/var/lib/strata";

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "OCI layers <-> mounted root filesystems"
)]
struct Cli {
    /// State directory (snapshots, metadata). Overrides the config file's `root`.
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// TOML config (root, plugins_dir, [filesystem] plugin and options).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace) for messages on stderr.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Unpack an image into snapshots; prints its chain ID.
    Unpack {
        /// `<oci-layout-dir>[:tag|@sha256:…]`
        image: String,
    },
    /// Fetch an image from an OCI registry into `<root>/content`, then unpack it; prints its
    /// chain ID.
    Pull {
        /// `<registry>/<repository>[:tag|@sha256:…]`
        reference: String,
        /// Talk plain HTTP (not HTTPS) to the registry.
        #[arg(long)]
        plain_http: bool,
        /// Do not download eStargz layers: the configured backing file system (the `http`
        /// plugin) mounts them from the registry and fetches what is read.
        #[arg(long)]
        lazy: bool,
        /// Then mount the image at this directory, as `strata mount` does. With a backing file
        /// system configured this process stays in the foreground serving its layers (as
        /// `strata mount --foreground`), so a lazily pulled image is readable at once.
        #[arg(long, value_name = "DIR")]
        mount: Option<PathBuf>,
        /// With `--mount`: writable (an active snapshot) instead of a read-only view.
        #[arg(long, requires = "mount")]
        rw: bool,
        /// With `--mount`: snapshot name (default: `mount:<DIR>`).
        #[arg(long, requires = "mount")]
        name: Option<String>,
    },
    /// Unpack if needed, create a container snapshot on the image and mount it.
    Mount {
        /// `<oci-layout-dir>[:tag|@sha256:…]`
        image: String,
        /// Directory to mount at.
        target: PathBuf,
        /// Writable (an active snapshot) instead of a read-only view.
        #[arg(long)]
        rw: bool,
        /// Snapshot name (default: `mount:<target>`).
        #[arg(long)]
        name: Option<String>,
        /// Stay in the foreground serving lazily fetched layers (FUSE, e.g. the http plugin)
        /// until SIGINT/SIGTERM or until the target is unmounted; then unmount (and remove the
        /// snapshot unless `--rw`).
        #[arg(long)]
        foreground: bool,
    },
    /// Unmount a root filesystem mounted by `strata mount`.
    Umount {
        /// The mount point.
        target: PathBuf,
        /// Also remove the container snapshot created by `strata mount`.
        #[arg(long)]
        rm: bool,
        /// The snapshot name given to `strata mount --name` (for `--rm`).
        #[arg(long)]
        name: Option<String>,
    },
    /// Write a snapshot's changes as a layer blob into an OCI layout; prints its descriptor.
    Diff {
        /// The snapshot (e.g. the name given to `strata mount --rw`).
        name: String,
        /// OCI layout directory to write the blob into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Blob compression.
        #[arg(long, value_enum, default_value = "gzip")]
        compression: CompressionArg,
    },
    /// Publish an image's layers, unpacked, into a layer store (`<dir>/sha256/<hex>`) that the
    /// `local` (and `nfs`) backing file systems mount instead of unpacking.
    Export {
        /// The layer store directory.
        #[arg(long)]
        to: PathBuf,
        /// `<oci-layout-dir>[:tag|@sha256:…]`
        image: String,
    },
    /// Convert an image's layers to eStargz into another OCI layout; prints the new manifest's
    /// digest.
    Convert(convert::ConvertArgs),
    /// List snapshots.
    Ls,
    /// Remove a snapshot (it must have no children).
    Rm {
        /// Snapshot name or key.
        name: String,
    },
    /// Disk usage of one snapshot (its own changes, not its parents).
    Usage {
        /// Snapshot name or key.
        name: String,
    },
    /// Build a small multi-layer demo image, unpack it, mount it and show the result.
    Demo {
        /// Keep the demo image in this OCI layout directory (tag `demo`) for other commands.
        #[arg(long)]
        image: Option<PathBuf>,
    },
    /// Serve the snapshotter to containerd as a proxy snapshotter (gRPC on a unix socket) until
    /// SIGTERM/SIGINT.
    Serve {
        /// The unix socket to listen on (`address` of `[proxy_plugins.NAME]`).
        #[arg(long)]
        address: PathBuf,
        /// Remove only deletes metadata; containerd's garbage collector reclaims disk space
        /// through Cleanup (like containerd 1.x's built-in overlayfs snapshotter).
        #[arg(long)]
        async_remove: bool,
    },
}

/// Blob compression for `strata diff`.
#[derive(Clone, Copy, ValueEnum)]
enum CompressionArg {
    /// tar+gzip
    Gzip,
    /// tar+zstd
    Zstd,
    /// plain tar
    None,
}

fn main() -> ExitCode {
    pin_mmap_threshold();
    let cli = Cli::parse();
    if std::env::var_os(fs_plugin_api::LOG_ENV).is_none() {
        // SAFETY: no other thread exists yet (nothing has been started).
        unsafe { std::env::set_var(fs_plugin_api::LOG_ENV, &cli.log_level) };
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("strata: {msg}");
            ExitCode::FAILURE
        }
    }
}
