//! The error type of the rootfs crate, classified by containerd's error kinds.

use std::io;
use std::path::{Path, PathBuf};

use snapshot_core::ErrorKind;

/// Errors of rootfs operations.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// Mounting a filesystem at a target failed.
    #[error("{}: {source}", mount_context(kind, target, detail))]
    Mount {
        /// Where the mount was to be made.
        target: PathBuf,
        /// The mount's filesystem type (`bind`, `overlay`, ...).
        kind: String,
        /// What else is known, e.g. the kernel's own message; may be empty.
        detail: String,
        /// The system call's error.
        #[source]
        source: io::Error,
    },
    /// Unmounting a target failed.
    #[error("unmount {}: {source}", target.display())]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The system call's error.
        #[source]
        source: io::Error,
    },
    /// Nothing is mounted at the target of an unmount.
    #[error("unmount {}: not a mount point", .0.display())]
    NotMounted(PathBuf),
    /// The request is malformed (unknown mount kind, overlay without lowerdir, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// Something named by the request does not exist (a blob, an image, a tag, ...).
    #[error("{0}: not found")]
    NotFound(String),
    /// The request is valid but this implementation does not support it (yet).
    #[error("{0}: not supported")]
    Unsupported(String),
    /// A blob or an uncompressed layer does not have the digest (or size) it should.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was checked (e.g. "layer blob sha256:…", "diff ID of layer 2").
        what: String,
        /// The digest (or size) that was expected.
        expected: String,
        /// The digest (or size) that was found.
        actual: String,
    },
    /// A layer archive is malformed or hostile (path escapes, bad whiteouts, bombs, ...).
    #[error("invalid archive: {0}")]
    InvalidArchive(String),
    /// A remote resource (e.g. an OCI registry) cannot be reached, or kept failing (timeouts,
    /// refused connections, 5xx answers after retries).
    #[error("{0}: unavailable")]
    Unavailable(String),
    /// A remote resource refused access (HTTP 401/403 after authenticating, or no credentials
    /// for a registry that demands them).
    #[error("{0}: permission denied")]
    PermissionDenied(String),
    /// A snapshotter operation failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot_core::Error),
    /// Another system call or filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Result alias for rootfs operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn mount_context(kind: &str, target: &Path, detail: &str) -> String {
    if detail.is_empty() {
        format!("mount {kind} at {}", target.display())
    } else {
        format!("mount {kind} at {} ({detail})", target.display())
    }
}

impl Error {
    /// The containerd class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Mount { source, .. }
            | Error::Unmount { source, .. }
            | Error::Io { source, .. } => io_kind(source),
            Error::NotMounted(_) => ErrorKind::FailedPrecondition,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Unsupported(_) => ErrorKind::NotImplemented,
            Error::DigestMismatch { .. } => ErrorKind::FailedPrecondition,
            Error::InvalidArchive(_) => ErrorKind::InvalidArgument,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            // containerd has no separate kind the snapshotter API carries for this.
            Error::PermissionDenied(_) => ErrorKind::FailedPrecondition,
            Error::Snapshot(e) => e.kind(),
        }
    }

    /// An I/O error with context (usually the operation and the path).
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

fn io_kind(e: &io::Error) -> ErrorKind {
    match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        _ => ErrorKind::Unknown,
    }
}

impl From<Error> for snapshot_core::Error {
    /// Keeps the kind; errors of kind Unknown keep their `io::Error` as the source.
    fn from(e: Error) -> Self {
        let kind = e.kind();
        if kind != ErrorKind::Unknown {
            return snapshot_core::Error::from_kind(kind, e.to_string());
        }
        match e {
            Error::Mount {
                target,
                kind,
                detail,
                source,
            } => snapshot_core::Error::io(mount_context(&kind, &target, &detail), source),
            Error::Unmount { target, source } => {
                snapshot_core::Error::io(format!("unmount {}", target.display()), source)
            }
            Error::Io { context, source } => snapshot_core::Error::io(context, source),
            Error::Snapshot(e) => e,
            other => snapshot_core::Error::from_kind(kind, other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_mounted_is_failed_precondition_and_names_the_path() {
        let e = Error::NotMounted(PathBuf::from("/x/y"));
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(e.to_string(), "unmount /x/y: not a mount point");
        let core: snapshot_core::Error = e.into();
        assert_eq!(core.kind(), ErrorKind::FailedPrecondition);
        assert!(core.to_string().contains("/x/y"));
    }

    #[test]
    fn mount_errors_show_detail_and_keep_the_io_source_in_core() {
        let e = Error::Mount {
            target: PathBuf::from("/t"),
            kind: "overlay".into(),
            detail: "kernel: overlay: bad".into(),
            source: io::Error::from_raw_os_error(22),
        };
        assert_eq!(e.kind(), ErrorKind::Unknown);
        let text = e.to_string();
        assert!(
            text.starts_with("mount overlay at /t (kernel: overlay: bad): "),
            "{text}"
        );
        let core: snapshot_core::Error = e.into();
        assert_eq!(core.kind(), ErrorKind::Unknown);
        assert!(
            core.to_string()
                .starts_with("mount overlay at /t (kernel: overlay: bad): ")
        );
        assert!(
            matches!(&core, snapshot_core::Error::Io { source, .. } if source.raw_os_error() == Some(22))
        );
    }

    #[test]
    fn missing_paths_are_not_found() {
        let e = Error::Unmount {
            target: PathBuf::from("/nope"),
            source: io::Error::from_raw_os_error(2),
        };
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let core: snapshot_core::Error = e.into();
        assert_eq!(core.kind(), ErrorKind::NotFound);
    }
}
