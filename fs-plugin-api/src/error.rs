//! Errors of loading and configuring plugins.

use std::{fmt, io, path::PathBuf};

use snapshot_core::ErrorKind;

use crate::loader::{PluginInfo, Rejected};

/// Why a `.so` file in the plugins directory was not loaded (one line each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadFailure {
    /// `dlopen` failed: not a shared library, wrong architecture, missing dependency.
    #[error("cannot be loaded: {0}")]
    Open(String),
    /// A shared library without a strata root module.
    #[error("not a strata plugin: {0}")]
    NotAPlugin(String),
    /// A strata plugin built against another major ABI version.
    #[error("built for plugin ABI {found}, but this host speaks plugin ABI {expected}")]
    IncompatibleVersion {
        /// The host's ABI version.
        expected: String,
        /// The plugin's ABI version.
        found: String,
    },
    /// The plugin's types do not have the layout this host expects.
    #[error(
        "incompatible plugin ABI layout (rebuild it against fs-plugin-api with ABI {}): {summary}",
        crate::ABI_VERSION
    )]
    IncompatibleLayout {
        /// The first lines of abi_stable's report (the full report is logged at debug level).
        summary: String,
    },
    /// The plugin loaded but is unusable (failing initialiser, empty name, ...).
    #[error("invalid plugin: {0}")]
    Invalid(String),
    /// Another file already declared the same plugin name.
    #[error("declares plugin name {name:?}, already taken by {}", first.display())]
    DuplicateName {
        /// The declared name.
        name: String,
        /// The file that declared it first (files are read in name order).
        first: PathBuf,
    },
}

/// Errors of `fs-plugin-api`: finding, loading and configuring plugins.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plugins directory cannot be read.
    #[error("plugins directory {}: {source}", dir.display())]
    ScanDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No loadable plugin declares the requested name.
    #[error("{}", NotFoundMessage { name, dir, found, rejected })]
    PluginNotFound {
        /// The requested name.
        name: String,
        /// The directory scanned.
        dir: PathBuf,
        /// The plugins that loaded.
        found: Vec<PluginInfo>,
        /// The files that did not load, with their reasons.
        rejected: Vec<Rejected>,
    },
    /// A plugin's constructor failed (e.g. it rejected its options).
    #[error("plugin {plugin}: {message}")]
    Plugin {
        /// The plugin's name.
        plugin: String,
        /// The error's kind.
        kind: ErrorKind,
        /// The plugin's message.
        message: String,
    },
    /// A plugin's options cannot be expressed as JSON.
    #[error("plugin {plugin}: options: {message}")]
    Options {
        /// The plugin's name.
        plugin: String,
        /// What is wrong.
        message: String,
    },
    /// The config file cannot be read.
    #[error("config {}: {source}", path.display())]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The config file is not valid TOML or has invalid fields.
    #[error("config {}: {source}", path.display())]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
}

impl Error {
    /// The containerd class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::ScanDir { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Error::ScanDir { .. } => ErrorKind::Unknown,
            Error::PluginNotFound { .. } => ErrorKind::NotFound,
            Error::Plugin { kind, .. } => *kind,
            Error::Options { .. } | Error::ConfigParse { .. } => ErrorKind::InvalidArgument,
            Error::ConfigRead { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Error::ConfigRead { .. } => ErrorKind::Unknown,
        }
    }
}

impl From<Error> for snapshot_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::ScanDir { dir, source } => {
                snapshot_core::Error::io(format!("plugins directory {}", dir.display()), source)
            }
            Error::ConfigRead { path, source } => {
                snapshot_core::Error::io(format!("config {}", path.display()), source)
            }
            Error::Plugin {
                plugin,
                kind,
                message,
            } => core_error(kind, format!("plugin {plugin}"), message),
            other => snapshot_core::Error::from_kind(other.kind(), other.to_string()),
        }
    }
}

/// A `snapshot_core::Error` of `kind` reading "context: message".
pub(crate) fn core_error(
    kind: ErrorKind,
    context: String,
    message: String,
) -> snapshot_core::Error {
    snapshot_core::Error::from_kind(kind, format!("{context}: {message}"))
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

struct NotFoundMessage<'a> {
    name: &'a str,
    dir: &'a PathBuf,
    found: &'a [PluginInfo],
    rejected: &'a [Rejected],
}

impl fmt::Display for NotFoundMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no plugin named {:?} in {}; ",
            self.name,
            self.dir.display()
        )?;
        if self.found.is_empty() {
            f.write_str("found no plugins")?;
        } else {
            f.write_str("found: ")?;
            for (i, p) in self.found.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{}", p)?;
            }
        }
        if !self.rejected.is_empty() {
            f.write_str("; rejected:")?;
            for r in self.rejected {
                write!(f, "\n  {r}")?;
            }
        }
        Ok(())
    }
}
