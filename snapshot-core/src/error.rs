//! The error type of the snapshot model, classified by containerd's error kinds.

use std::fmt;

/// containerd's error classes (`errdefs`): callers match on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The snapshot, parent or key does not exist.
    NotFound,
    /// The key or name is taken.
    AlreadyExists,
    /// The object is in the wrong state for the operation (e.g. committing a view).
    FailedPrecondition,
    /// The request itself is malformed.
    InvalidArgument,
    /// A backing resource (e.g. a remote layer) cannot be reached.
    Unavailable,
    /// The operation is not supported by this implementation.
    NotImplemented,
    /// Anything else: I/O, the metadata store, unexpected states.
    Unknown,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::NotImplemented => "not implemented",
            ErrorKind::Unknown => "unknown",
        })
    }
}

/// Errors of snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// See [`ErrorKind::NotFound`].
    #[error("{0}: not found")]
    NotFound(String),
    /// See [`ErrorKind::AlreadyExists`].
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// See [`ErrorKind::FailedPrecondition`].
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    /// See [`ErrorKind::InvalidArgument`].
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    /// See [`ErrorKind::Unavailable`].
    #[error("{0}: unavailable")]
    Unavailable(String),
    /// See [`ErrorKind::NotImplemented`].
    #[error("{0}: not implemented")]
    NotImplemented(String),
    /// A filesystem or system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Store(String),
    /// Any other failure (e.g. reported by a plugin or a remote peer without a kind).
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The containerd class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::NotImplemented(_) => ErrorKind::NotImplemented,
            Error::Io { .. } | Error::Store(_) | Error::Other(_) => ErrorKind::Unknown,
        }
    }

    /// Builds an error of `kind` with `message` (the inverse of [`Error::kind`], for adapters
    /// such as the gRPC client and the plugin ABI).
    pub fn from_kind(kind: ErrorKind, message: impl Into<String>) -> Self {
        let m = message.into();
        match kind {
            ErrorKind::NotFound => Error::NotFound(m),
            ErrorKind::AlreadyExists => Error::AlreadyExists(m),
            ErrorKind::FailedPrecondition => Error::FailedPrecondition(m),
            ErrorKind::InvalidArgument => Error::InvalidArgument(m),
            ErrorKind::Unavailable => Error::Unavailable(m),
            ErrorKind::NotImplemented => Error::NotImplemented(m),
            ErrorKind::Unknown => Error::Other(m),
        }
    }

    /// An I/O error with context (usually the operation and the path).
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Prefixes the message with `context`, keeping the kind.
    pub fn context(self, context: impl fmt::Display) -> Self {
        match self {
            Error::Io { context: c, source } => Error::Io {
                context: format!("{context}: {c}"),
                source,
            },
            other => {
                let kind = other.kind();
                let msg = match &other {
                    Error::NotFound(m)
                    | Error::AlreadyExists(m)
                    | Error::FailedPrecondition(m)
                    | Error::InvalidArgument(m)
                    | Error::Unavailable(m)
                    | Error::NotImplemented(m)
                    | Error::Store(m)
                    | Error::Other(m) => m.clone(),
                    Error::Io { .. } => String::new(),
                };
                Error::from_kind(kind, format!("{context}: {msg}"))
            }
        }
    }

    /// True if this error is of `kind`.
    pub fn is(&self, kind: ErrorKind) -> bool {
        self.kind() == kind
    }
}

/// Result alias for snapshot operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.to_string())
            }
        }
    )*};
}
store_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_kind_and_prefixes_message() {
        let e = Error::NotFound("snapshot a".into()).context("failed to remove");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "failed to remove: snapshot a: not found");
    }

    #[test]
    fn io_errors_are_unknown() {
        let e = Error::io("open x", std::io::Error::other("boom"));
        assert_eq!(e.kind(), ErrorKind::Unknown);
        assert!(e.to_string().starts_with("open x: "));
    }
}
