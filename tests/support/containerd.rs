//! A private containerd (own root, state, sockets and config in a temp dir) with `strata` as a
//! proxy snapshotter, and `ctr` against it. Dropping it stops containerd, the shims it started
//! and their containers, and unmounts what they left mounted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Daemon, Output, run_bounded, run_ok, unmount_all_under, wait_until};

/// The namespace the tests use.
pub const NAMESPACE: &str = "strata-test";

/// Bound on one `ctr` call.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(180);

/// A running private containerd.
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    daemon: Option<Daemon>,
}

/// The config (SEMANTICS.md §7.2, TESTING.md): version 2, private paths, no CRI, no aufs / btrfs
/// / zfs / devmapper; strata as the proxy snapshotter `strata` on `strata_socket`.
pub fn config(dir: &Path, strata_socket: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[proxy_plugins.strata]
  type = "snapshot"
  address = "{s}"
"#,
        s = strata_socket.display()
    )
}

impl Containerd {
    /// Starts containerd with state in `dir` (created) and waits until it answers.
    pub fn start(dir: &Path, strata_socket: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config(dir, strata_socket)).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config_path);
        let daemon = Daemon::spawn("containerd", &mut cmd, &dir.join("containerd.log"));
        let mut c = Containerd {
            dir: dir.to_path_buf(),
            socket: dir.join("containerd.sock"),
            daemon: Some(daemon),
        };
        wait_until("containerd to answer", Duration::from_secs(60), || {
            if let Some(d) = c.daemon.as_mut() {
                d.assert_running();
            }
            run_bounded(
                Command::new("ctr")
                    .arg("--address")
                    .arg(&c.socket)
                    .arg("version"),
                Duration::from_secs(10),
            )
            .status
            .success()
        });
        c
    }

    /// The containerd socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `ctr --address <socket> -n <namespace> <args>`.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args);
        cmd
    }

    /// Runs `ctr <args>` and requires success; returns its standard output.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.ctr(args), CTR_TIMEOUT)
    }

    /// Runs `ctr <args>`, whatever its outcome.
    pub fn ctr_run(&self, args: &[&str]) -> Output {
        run_bounded(&mut self.ctr(args), CTR_TIMEOUT)
    }

    /// What containerd logged so far.
    pub fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// Stops containerd gracefully; returns whether it exited by itself.
    pub fn stop(mut self) -> bool {
        self.teardown()
    }

    fn teardown(&mut self) -> bool {
        let Some(daemon) = self.daemon.take() else {
            return true;
        };
        // Containers first (a failed test may leave tasks running), while containerd answers.
        let tasks = run_bounded(
            &mut self.ctr(&["tasks", "ls", "-q"]),
            Duration::from_secs(20),
        );
        for id in tasks
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            let _ = run_bounded(
                &mut self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]),
                Duration::from_secs(20),
            );
            let _ = run_bounded(
                &mut self.ctr(&["tasks", "rm", "-f", id]),
                Duration::from_secs(20),
            );
        }
        let stopped = daemon.stop().is_some();
        kill_shims(&self.dir);
        unmount_all_under(&self.dir);
        stopped
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            if std::thread::panicking() {
                eprintln!("---- containerd log ----\n{}", self.log());
            }
            self.teardown();
        }
    }
}

/// Kills the runc shims whose command line names `dir` (ours: they carry our socket paths), and
/// reaps them when they are our children (this process is their subreaper, see
/// [`become_subreaper`]).
pub fn kill_shims(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            for _ in 0..100 {
                match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => break,
                }
            }
        }
    }
}

/// Makes this process the reaper of orphans it starts (runc shims daemonise; PID 1 here does
/// not reap them).
pub fn become_subreaper() {
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

/// Whether the ELF file at `path` is statically linked (no `PT_INTERP` program header).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}

/// Removes the (empty) private cgroup parent `/<name>` from every hierarchy when dropped.
pub struct CgroupGuard(pub String);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in hierarchies.flatten() {
            let parent = h.path().join(&self.0);
            if parent.is_dir() {
                if let Ok(children) = std::fs::read_dir(&parent) {
                    for c in children.flatten().filter(|c| c.path().is_dir()) {
                        let _ = std::fs::remove_dir(c.path());
                    }
                }
                let _ = std::fs::remove_dir(&parent);
            }
        }
    }
}
