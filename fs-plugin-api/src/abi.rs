//! The types that cross the boundary between strata and a plugin `.so`.
//!
//! Everything here is `#[repr(C)]` and derives [`StableAbi`], so `abi_stable` checks at load time
//! that the plugin was built against the same layout; [`ABI_VERSION`] is checked too (its major
//! number must match). Plugin authors do not use these types directly: they implement
//! [`Plugin`](crate::Plugin) and call [`export_plugin!`](crate::export_plugin).

// abi_stable names the generated pointer types `Foo_Ref` and `Foo_TO`.
#![allow(non_camel_case_types)]

use abi_stable::{
    StableAbi, declare_root_module_statics,
    library::RootModule,
    sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, RResult, RStr, RString, RVec, Tuple2},
};
use snapshot_core::{Error, ErrorKind, Labels};

/// The version of this ABI. abi_stable refuses a plugin whose major number differs; appending a
/// field to [`FsPluginMod`] or a method to [`FfiFileSystem`] is a minor bump. abi_stable also
/// compares this crate's package version in its layout check, so the crate's major version is
/// kept equal to this one's.
pub const ABI_VERSION: &str = "1.0.0";

/// The name abi_stable reports for strata plugins in its own messages.
pub const ROOT_MODULE_NAME: &str = "strata_fs_plugin";

/// An error kind on the wire: the code of a [`snapshot_core::ErrorKind`].
///
/// A `u8` newtype rather than an enum so that a code this host does not know (a kind added to a
/// newer ABI) reads as [`ErrorKind::Unknown`] instead of being undefined behaviour.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorKindCode(pub u8);

impl ErrorKindCode {
    /// [`ErrorKind::Unknown`].
    pub const UNKNOWN: Self = Self(0);
    /// [`ErrorKind::NotFound`].
    pub const NOT_FOUND: Self = Self(1);
    /// [`ErrorKind::AlreadyExists`].
    pub const ALREADY_EXISTS: Self = Self(2);
    /// [`ErrorKind::FailedPrecondition`].
    pub const FAILED_PRECONDITION: Self = Self(3);
    /// [`ErrorKind::InvalidArgument`].
    pub const INVALID_ARGUMENT: Self = Self(4);
    /// [`ErrorKind::Unavailable`].
    pub const UNAVAILABLE: Self = Self(5);
    /// [`ErrorKind::NotImplemented`].
    pub const NOT_IMPLEMENTED: Self = Self(6);
}

impl From<ErrorKind> for ErrorKindCode {
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Unknown => Self::UNKNOWN,
            ErrorKind::NotFound => Self::NOT_FOUND,
            ErrorKind::AlreadyExists => Self::ALREADY_EXISTS,
            ErrorKind::FailedPrecondition => Self::FAILED_PRECONDITION,
            ErrorKind::InvalidArgument => Self::INVALID_ARGUMENT,
            ErrorKind::Unavailable => Self::UNAVAILABLE,
            ErrorKind::NotImplemented => Self::NOT_IMPLEMENTED,
        }
    }
}

impl From<ErrorKindCode> for ErrorKind {
    fn from(code: ErrorKindCode) -> Self {
        match code {
            ErrorKindCode::NOT_FOUND => ErrorKind::NotFound,
            ErrorKindCode::ALREADY_EXISTS => ErrorKind::AlreadyExists,
            ErrorKindCode::FAILED_PRECONDITION => ErrorKind::FailedPrecondition,
            ErrorKindCode::INVALID_ARGUMENT => ErrorKind::InvalidArgument,
            ErrorKindCode::UNAVAILABLE => ErrorKind::Unavailable,
            ErrorKindCode::NOT_IMPLEMENTED => ErrorKind::NotImplemented,
            _ => ErrorKind::Unknown,
        }
    }
}

/// An error a plugin returns: its kind and a one-line message.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginError {
    /// The containerd class of the error.
    pub kind: ErrorKindCode,
    /// What went wrong, without the kind (the host adds it back).
    pub message: RString,
}

impl PluginError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: RString::from(message.into()),
        }
    }

    /// The kind, as the host understands it.
    pub fn kind(&self) -> ErrorKind {
        self.kind.into()
    }

    /// The message.
    pub fn message(&self) -> &str {
        self.message.as_str()
    }
}

impl From<Error> for PluginError {
    /// Keeps the kind and the bare message, so that the host's `Error::from_kind` does not
    /// repeat the kind ("x: not found: not found").
    fn from(e: Error) -> Self {
        let kind = e.kind();
        let message = match e {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::FailedPrecondition(m)
            | Error::InvalidArgument(m)
            | Error::Unavailable(m)
            | Error::NotImplemented(m)
            | Error::Store(m)
            | Error::Other(m) => m,
            io @ Error::Io { .. } => io.to_string(),
        };
        Self::new(kind, message)
    }
}

impl From<PluginError> for Error {
    fn from(e: PluginError) -> Self {
        crate::error::core_error(e.kind(), "plugin".to_owned(), e.message.into_string())
    }
}

/// Snapshot labels on the wire, in key order.
pub type FfiLabels = RVec<Tuple2<RString, RString>>;

/// Converts labels for the wire.
pub fn labels_to_ffi(labels: &Labels) -> FfiLabels {
    labels
        .iter()
        .map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str())))
        .collect()
}

/// Converts labels from the wire.
pub fn labels_from_ffi(labels: &FfiLabels) -> Labels {
    labels
        .iter()
        .map(|Tuple2(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// The generated `FfiFileSystem_trait` module and `_TO` type carry no docs of their own, and
// abi_stable_derive 0.11 puts an impl inside a const (rustc's `non_local_definitions`).
#[allow(missing_docs, non_local_definitions)]
mod ffi_trait {
    use super::*;

    /// A mounted-layer file system as a plugin exports it (the FFI form of
    /// [`snapshot_core::FileSystem`]). Mountpoints are UTF-8 paths.
    #[sabi_trait]
    pub trait FfiFileSystem: Send + Sync {
        /// Mounts the layer named by `labels` at `mountpoint`.
        fn mount(&self, mountpoint: RStr<'_>, labels: &FfiLabels) -> RResult<(), PluginError>;

        /// Checks that the layer mounted at `mountpoint` is still usable.
        fn check(&self, mountpoint: RStr<'_>, labels: &FfiLabels) -> RResult<(), PluginError>;

        /// Unmounts the layer at `mountpoint`.
        #[sabi(last_prefix_field)]
        fn unmount(&self, mountpoint: RStr<'_>) -> RResult<(), PluginError>;
    }
}

pub use ffi_trait::{FfiFileSystem, FfiFileSystem_TO, FfiFileSystem_trait};

/// A file system instance made by a plugin's constructor, owned by the host.
pub type FileSystemBox = FfiFileSystem_TO<'static, RBox<()>>;

/// The constructor a plugin exports: takes the plugin's options as a JSON document.
pub type Constructor = extern "C" fn(options_json: RStr<'_>) -> RResult<FileSystemBox, PluginError>;

/// The root module every plugin `.so` exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = FsPluginMod_Ref)))]
pub struct FsPluginMod {
    /// The [`ABI_VERSION`] the plugin was built against.
    pub abi_version: RStr<'static>,
    /// The name the plugin declares: what a config's `[filesystem] plugin = ...` names.
    pub name: RStr<'static>,
    /// The plugin's own version (usually its crate version).
    pub version: RStr<'static>,
    /// Makes a file system from the plugin's options (a JSON document).
    #[sabi(last_prefix_field)]
    pub new: extern "C" fn(options_json: RStr<'_>) -> RResult<FileSystemBox, PluginError>,
}

impl RootModule for FsPluginMod_Ref {
    declare_root_module_statics! {FsPluginMod_Ref}
    const BASE_NAME: &'static str = ROOT_MODULE_NAME;
    const NAME: &'static str = ROOT_MODULE_NAME;
    const VERSION_STRINGS: VersionStrings = VersionStrings::new(ABI_VERSION);
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorKind; 7] = [
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::FailedPrecondition,
        ErrorKind::InvalidArgument,
        ErrorKind::Unavailable,
        ErrorKind::NotImplemented,
        ErrorKind::Unknown,
    ];

    #[test]
    fn every_error_kind_round_trips_through_its_code() {
        for kind in ALL {
            assert_eq!(ErrorKind::from(ErrorKindCode::from(kind)), kind);
        }
    }

    #[test]
    fn the_crate_version_moves_with_the_abi_version() {
        let major = |v: &str| v.split('.').next().unwrap().to_owned();
        assert_eq!(major(ABI_VERSION), major(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn an_unknown_code_reads_as_unknown() {
        assert_eq!(ErrorKind::from(ErrorKindCode(200)), ErrorKind::Unknown);
    }

    #[test]
    fn errors_cross_without_repeating_their_kind() {
        let e: PluginError = Error::NotFound("layer sha256:ab".into()).into();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.message(), "layer sha256:ab");
        let back = Error::from(e);
        assert_eq!(back.to_string(), "plugin: layer sha256:ab: not found");
    }

    #[test]
    fn an_unknown_error_does_not_read_as_a_metadata_store_error() {
        let back = Error::from(PluginError::new(ErrorKind::Unknown, "boom"));
        assert_eq!(back.kind(), ErrorKind::Unknown);
        assert_eq!(back.to_string(), "plugin: boom");
    }

    #[test]
    fn labels_round_trip_in_order() {
        let labels: Labels = [("b", "2"), ("a", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ffi = labels_to_ffi(&labels);
        assert_eq!(ffi[0].0.as_str(), "a");
        assert_eq!(labels_from_ffi(&ffi), labels);
    }
}
