//! What the tests that run real processes share: bounded commands, daemons that are always
//! stopped, a private containerd, and an offline OCI image archive builder.
#![allow(dead_code)] // each test crate uses part of it
#![allow(clippy::unwrap_used)] // tests may unwrap

pub mod containerd;
pub mod ctr_remote;
pub mod layers;
pub mod oci;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The `strata` binary under test.
pub fn strata_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strata"))
}

/// Runs `strata <args>` and requires success; returns its standard output and error.
pub fn strata_run(args: &[&str]) -> (String, String) {
    let out = Command::new(strata_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs `strata <args>` and requires success; returns its standard output.
pub fn strata_ok(args: &[&str]) -> String {
    strata_run(args).0
}

/// Fails the test unless every command is on `PATH` (`cargo xtask test` installs them).
pub fn require_commands(cmds: &[&str], install_hint: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = cmds
        .iter()
        .copied()
        .filter(|c| !std::env::split_paths(&path).any(|d| d.join(c).is_file()))
        .collect();
    assert!(
        missing.is_empty(),
        "expected {missing:?} on PATH: install them with `{install_hint}` (`cargo xtask test` does)"
    );
}

/// Polls `ready` every 50 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "expected {what} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `cmd` to completion, killing it (and failing) after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("expected to start {shown}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("expected {shown} to finish within {timeout:?}");
        }
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Runs `cmd` (bounded) and requires success; returns its standard output.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let shown = format!("{cmd:?}");
    let out = run_bounded(cmd, timeout);
    assert!(
        out.status.success(),
        "expected {shown} to succeed, got {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Waits up to `timeout` for `child`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => return None,
            Err(e) => panic!("expected to wait for pid {}: {e}", child.id()),
        }
    }
}

/// A background process that is stopped when dropped: SIGTERM, at most `grace`, then SIGKILL,
/// and always waited for. Its output goes to a log file, shown when the test fails.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    grace: Duration,
}

impl Daemon {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Daemon {
        let file = File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("expected to start {name} ({cmd:?}): {e}"));
        Daemon {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_path_buf(),
            grace: Duration::from_secs(20),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with its log) if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "expected {} to be running, it exited with {status}; log:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// Sends `sig` without waiting.
    pub fn signal(&self, sig: Signal) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), sig);
        }
    }

    /// Stops it with SIGTERM and returns its exit status (`None` if it had to be killed).
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        if let Some(status) = wait_timeout(&mut child, self.grace) {
            return Some(status);
        }
        eprintln!(
            "{} did not stop within {:?} after SIGTERM; killing it",
            self.name, self.grace
        );
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate();
            if std::thread::panicking() {
                eprintln!(
                    "---- {} log ({}) ----\n{}",
                    self.name,
                    self.log.display(),
                    self.log()
                );
            }
        }
    }
}

/// Starts `strata serve` on `socket` with state in `root`; returns once it accepts connections.
pub fn start_strata(root: &Path, socket: &Path, log: &Path, extra: &[&str]) -> Daemon {
    let mut cmd = Command::new(strata_bin());
    cmd.arg("--root")
        .arg(root)
        .args(["--log-level", "info,strata=debug", "serve", "--address"])
        .arg(socket)
        .args(extra);
    let mut daemon = Daemon::spawn("strata serve", &mut cmd, log);
    wait_until("strata serve to listen", Duration::from_secs(30), || {
        daemon.assert_running();
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
    daemon
}

/// Mount points under `dir` (deepest first), from `/proc/self/mountinfo`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Lazily unmounts everything mounted under `dir`.
pub fn unmount_all_under(dir: &Path) {
    for m in mounts_under(dir) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cannot unmount {}: {e}", m.display());
        }
    }
}

/// Unmounts `target` (lazily) when dropped.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        unmount_all_under(&self.0);
    }
}
