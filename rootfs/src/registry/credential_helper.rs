//! Docker credential helpers: `docker-credential-<name> get`, the server URL on stdin, answers
//! `{"ServerURL", "Username", "Secret"}` on stdout (the protocol of docker's
//! credential-helpers, used by `credsStore` and `credHelpers` in a docker config).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::auth::Credentials;
use crate::{Error, Result};

/// How long a helper may take to answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// The program of helper `name`, looked up in `search_path` (the directories of `$PATH`).
fn program(name: &str, search_path: &[PathBuf]) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "docker config: credential helper name {name:?} is not a plain name"
        )));
    }
    let file = format!("docker-credential-{name}");
    search_path
        .iter()
        .map(|dir| dir.join(&file))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::NotFound(format!("credential helper {file} is not in PATH")))
}

/// Asks helper `name` for the credentials of `server`: `None` when it has none for it.
pub fn get(
    name: &str,
    server: &str,
    search_path: &[PathBuf],
    timeout: Duration,
) -> Result<Option<Credentials>> {
    let program = program(name, search_path)?;
    let (code, stdout, stderr) = run(&program, server, timeout)?;
    let what = program.display();
    if code != Some(0) {
        let said = format!("{} {}", stdout.trim(), stderr.trim());
        if said.contains("credentials not found") {
            return Ok(None);
        }
        return Err(Error::Unavailable(format!(
            "{what} get {server}: exit status {code:?}: {}",
            said.trim()
        )));
    }
    let answer: Answer = serde_json::from_str(&stdout)
        .map_err(|e| Error::InvalidArgument(format!("{what} get {server}: bad answer: {e}")))?;
    if answer.username == "<token>" {
        return Err(Error::InvalidArgument(format!(
            "{what} get {server}: answers an identity token, which strata does not support"
        )));
    }
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
}

/// Runs `program get` with `server` on stdin: exit code, stdout, stderr. Killed after `timeout`.
fn run(program: &Path, server: &str, timeout: Duration) -> Result<(Option<i32>, String, String)> {
    let what = || format!("{} get", program.display());
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("start {}", what()), e))?;
    let mut stdin = child.stdin.take();
    if let Some(s) = stdin.as_mut() {
        // A helper that exits without reading its input is its own business.
        let _ = s.write_all(server.as_bytes());
    }
    drop(stdin);
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(r) = r {
                let _ = r.take(1 << 20).read_to_string(&mut text);
            }
            text
        })
    };
    let out = pipe(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = pipe(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Unavailable(format!(
                    "{} did not answer within {} s",
                    what(),
                    timeout.as_secs_f32()
                )));
            }
            Err(e) => return Err(Error::io(format!("wait for {}", what()), e)),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok((status.code(), stdout, stderr))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A helper `docker-credential-<name>` running `script` (sh) in a new directory.
    pub(crate) fn helper(name: &str, script: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn a_helper_answers_credentials_for_the_server_it_is_given() {
        let dir = helper(
            "t",
            r#"[ "$1" = get ] || exit 2
read -r server
[ "$server" = "127.0.0.1:5000" ] || { echo "credentials not found in native keychain"; exit 1; }
printf '{"ServerURL":"%s","Username":"alice","Secret":"s3cret"}' "$server""#,
        );
        let path = vec![PathBuf::from("/nonexistent"), dir.path().to_path_buf()];
        let c = get("t", "127.0.0.1:5000", &path, TIMEOUT).unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        assert_eq!(get("t", "other:5000", &path, TIMEOUT).unwrap(), None);
    }

    #[test]
    fn a_failing_slow_missing_or_oddly_named_helper_is_an_error() {
        let fails = helper("f", "echo boom >&2; exit 3");
        let e = get("f", "h", &[fails.path().to_path_buf()], TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        let token = helper("tok", r#"echo '{"Username":"<token>","Secret":"x"}'"#);
        let e = get("tok", "h", &[token.path().to_path_buf()], TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("identity token"), "{e}");
        let slow = helper("s", "sleep 30");
        let start = Instant::now();
        let e = get(
            "s",
            "h",
            &[slow.path().to_path_buf()],
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{e}");
        assert!(e.to_string().contains("did not answer"), "{e}");
        let e = get("absent", "h", &[slow.path().to_path_buf()], TIMEOUT).unwrap_err();
        assert_eq!(e.kind(), snapshot_core::ErrorKind::NotFound, "{e}");
        let e = get("../s", "h", &[slow.path().to_path_buf()], TIMEOUT).unwrap_err();
        assert_eq!(e.kind(), snapshot_core::ErrorKind::InvalidArgument, "{e}");
    }
}
