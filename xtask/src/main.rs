//! Developer commands: `cargo xtask test` (what CI runs) and `cargo xtask bench <name>`.

mod bench_diff;
mod bench_lazy;
mod bench_nfs;
mod bench_serve;
mod bench_unpack;
mod plugins;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  test               install missing system packages, check formatting and lints, build and run every test
  test-plugins       build every plugin, install it into a fresh plugins dir, run the plugin conformance
                     suite through the real loader, and check the deliberately broken test plugins
  bench snapshots    prepare+commit, stat and walk over 10,000 snapshots (release build)
  bench unpack       strata's unpack vs `umoci unpack` and `pigz -dc|zstd -dc | tar -x` on generated images
                     (small files, large files, an OS image; gzip and zstd), printed as ratios (release build)
  bench diff         overlay differ vs walking differ: 100 changed files over the OS image (release build)
  bench serve        `ctr images import` + unpack of an OS image into a private containerd: strata serve
                     as proxy snapshotter vs containerd's overlayfs snapshotter (release build)
  bench lazy         time to first read and bytes fetched from a local registry: full pull + unpack of
                     the OS image vs lazy pull of its eStargz form through the http plugin (release build)
  bench nfs          read a whole layer (~300 MB from /usr) through the nfs plugin from a local
                     nfs-ganesha vs from local disk, cold and cached (release build)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["test"] => test(),
        ["test-plugins"] => plugins::test_plugins(),
        ["bench", name] => bench(name),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `program args...` from the workspace root, failing with the command line on error.
fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("xtask: running {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The tests mount overlayfs, bind mounts and (later) FUSE: they need root.
fn require_root() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    if euid != "0" {
        bail!("the tests mount filesystems and must run as root (effective uid is {euid})");
    }
    Ok(())
}

/// Makes sure the kernel can do what the tests need, failing with what is missing.
fn require_kernel_features() -> Result<()> {
    let fs = std::fs::read_to_string("/proc/filesystems").context("read /proc/filesystems")?;
    if !fs.lines().any(|l| l.trim_end().ends_with("overlay")) {
        // Try to load it; the tests cannot run without it.
        let _ = Command::new("modprobe").arg("overlay").status();
        let fs = std::fs::read_to_string("/proc/filesystems").context("read /proc/filesystems")?;
        if !fs.lines().any(|l| l.trim_end().ends_with("overlay")) {
            bail!("the kernel has no overlay filesystem (modprobe overlay failed)");
        }
    }
    Ok(())
}

/// `snapshot-core` must stay usable alone: none of the mount, plugin, async or gRPC machinery.
fn check_core_dependencies(cargo: &str) -> Result<()> {
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "snapshot-core",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(workspace_root())
        .output()
        .context("cannot run cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let forbidden = [
        "nix",
        "rustix",
        "abi_stable",
        "libloading",
        "tokio",
        "tonic",
        "fuser",
    ];
    let found: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| forbidden.contains(name))
        .collect();
    if !found.is_empty() {
        bail!(
            "snapshot-core depends on {found:?}; it must build without mount/plugin/async/gRPC crates"
        );
    }
    Ok(())
}

/// Debian packages the tests need: (a command they provide, the package).
const TEST_PACKAGES: &[(&str, &str)] = &[
    // tests/containerd_e2e.rs: a private containerd 1.6 with strata as proxy snapshotter, a
    // container run through runc, a static busybox inside the test image.
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("runc", "runc"),
    ("busybox", "busybox-static"),
    // rootfs/tests/other_tools.rs: images built by umoci and copied by skopeo, compared with
    // `umoci unpack`.
    ("umoci", "umoci"),
    ("skopeo", "skopeo"),
    // The nfs plugin's backend (tests/nfs_plugin.rs, the plugin conformance suite, `bench nfs`):
    // a user-space NFS server with its VFS backend (a library, no command, so probed by path),
    // and the rpcbind it registers with.
    ("ganesha.nfsd", "nfs-ganesha"),
    (
        "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so",
        "nfs-ganesha-vfs",
    ),
    ("rpcbind", "rpcbind"),
    // The http plugin (issue 6): a local OCI registry, stargz's own eStargz converter, and
    // htpasswd for the registry's basic-auth test.
    ("docker-registry", "docker-registry"),
    ("ctr-remote", "stargz-snapshotter"),
    ("htpasswd", "apache2-utils"),
];

/// Installs the packages of `wanted` whose command is missing (`apt-get`, as root), then fails
/// with the names of any that are still missing.
fn ensure_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let on_path = |cmd: &str| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(cmd).is_file()))
            || std::path::Path::new(cmd).is_file()
    };
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing missing packages: {}", missing.join(" "));
    // dpkg may be locked by another apt run: retry for a while.
    let mut updated = false;
    for attempt in 0..20 {
        if !updated {
            updated = Command::new("apt-get")
                .args(["update", "-q"])
                .status()
                .is_ok_and(|s| s.success());
        }
        let status = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if status.success() {
            break;
        }
        eprintln!("xtask: apt-get failed ({status}), retrying ({attempt})");
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    let still: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !still.is_empty() {
        bail!(
            "required packages could not be installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn test() -> Result<()> {
    require_root()?;
    require_kernel_features()?;
    ensure_packages(TEST_PACKAGES)?;
    let cargo = cargo();
    check_core_dependencies(&cargo)?;
    run(&cargo, &["fmt", "--all", "--", "--check"])?;
    run(
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // Not --all-targets: that would also run the benchmarks (harness = false) as tests.
    run(
        &cargo,
        &[
            "test",
            "--workspace",
            "--lib",
            "--bins",
            "--tests",
            "--examples",
            "--all-features",
        ],
    )?;
    run(&cargo, &["test", "--workspace", "--doc", "--all-features"])?;
    plugins::test_plugins()?;
    Ok(())
}

fn bench(name: &str) -> Result<()> {
    let cargo = cargo();
    match name {
        "snapshots" => {
            require_root()?;
            run(
                &cargo,
                &["bench", "-p", "snapshot-overlay", "--bench", "snapshots"],
            )
        }
        "serve" => bench_serve::bench_serve(),
        "nfs" => bench_nfs::bench_nfs(),
        "unpack" => bench_unpack::bench_unpack(),
        "diff" => bench_diff::bench_diff(),
        "lazy" => bench_lazy::bench_lazy(),
        other => bail!("unknown benchmark {other:?}\n{USAGE}"),
    }
}
