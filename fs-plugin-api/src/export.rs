//! The plugin author's side: the [`Plugin`] trait and what [`export_plugin!`] expands to.
//!
//! Every call into the plugin (the constructor included) runs under `catch_unwind`: a panic
//! unwinding out of an `extern "C"` function or an abi_stable trait object would end the whole
//! host process, so it becomes a [`PluginError`] of kind `Unknown` ("plugin panicked: ...").

use std::{
    mem::ManuallyDrop,
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
};

use abi_stable::{
    library::{self, RootModuleResult},
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    std_types::{RResult, RStr},
};
use serde::de::DeserializeOwned;
use snapshot_core::{Error, ErrorKind, Labels, Result};

use crate::abi::{
    ABI_VERSION, Constructor, FfiFileSystem, FfiLabels, FileSystemBox, FsPluginMod,
    FsPluginMod_Ref, PluginError, labels_from_ffi,
};

/// What a plugin author implements: [`snapshot_core::FileSystem`] for one backend.
///
/// Return errors of the kind callers act on: `NotFound` for a layer the backend does not have,
/// `Unavailable` from `check` once the backend is gone, `InvalidArgument` for bad labels.
/// `mount` must leave `mountpoint` clean (nothing mounted) when it fails.
pub trait Plugin: Send + Sync + 'static {
    /// Mounts the layer named by `labels` at `mountpoint` (an existing empty directory).
    fn mount(&self, mountpoint: &Path, labels: &Labels) -> Result<()>;

    /// Checks that the layer mounted at `mountpoint` is still usable.
    fn check(&self, mountpoint: &Path, labels: &Labels) -> Result<()>;

    /// Unmounts the layer at `mountpoint`.
    fn unmount(&self, mountpoint: &Path) -> Result<()>;
}

/// Exports a plain Rust [`Plugin`] as a strata plugin `.so` (put it once in a `cdylib` crate).
///
/// - `name`: the name configs use (`[filesystem] plugin = "..."`).
/// - `version`: the plugin's own version, usually `env!("CARGO_PKG_VERSION")`.
/// - `constructor`: a function or closure `fn(Options) -> fs_plugin_api::Result<impl Plugin>`,
///   where `Options: serde::de::DeserializeOwned` is read from the config's
///   `[filesystem.options]` (malformed options are reported as `InvalidArgument`).
///
/// ```standalone_crate
/// use std::path::Path;
///
/// use fs_plugin_api::model::{Error, Labels, Result};
///
/// struct NullFs;
///
/// impl fs_plugin_api::Plugin for NullFs {
///     fn mount(&self, _: &Path, _: &Labels) -> Result<()> {
///         Err(Error::NotImplemented("nullfs mounts nothing".into()))
///     }
///     fn check(&self, _: &Path, _: &Labels) -> Result<()> {
///         Ok(())
///     }
///     fn unmount(&self, _: &Path) -> Result<()> {
///         Ok(())
///     }
/// }
///
/// fs_plugin_api::export_plugin!(
///     name = "null",
///     version = env!("CARGO_PKG_VERSION"),
///     constructor = |_options: serde_json::Value| Ok(NullFs),
/// );
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_plugin {
    (name = $name:expr, version = $version:expr, constructor = $constructor:expr $(,)?) => {
        const _: () = {
            extern "C" fn __strata_plugin_new(
                options_json: $crate::__private::RStr<'_>,
            ) -> $crate::__private::RResult<$crate::abi::FileSystemBox, $crate::abi::PluginError>
            {
                $crate::__private::construct(options_json, $constructor)
            }

            fn __strata_plugin_root_module() -> $crate::abi::FsPluginMod_Ref {
                $crate::__private::root_module($name, $version, __strata_plugin_new)
            }

            extern "C" fn __strata_plugin_loader() -> $crate::__private::RootModuleResult {
                $crate::__private::call_root_module_loader(__strata_plugin_root_module)
            }

            /// The abi_stable library header the host looks up (what `#[export_root_module]`
            /// would emit, spelled with `$crate` paths so plugins need no direct abi_stable
            /// dependency). The name is abi_stable's `ROOT_MODULE_LOADER_NAME`.
            #[unsafe(no_mangle)]
            pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::__private::LibHeader = unsafe {
                // SAFETY: the constructor returns the root module of type `FsPluginMod_Ref`,
                // the type given here.
                $crate::__private::LibHeader::from_constructor::<$crate::abi::FsPluginMod_Ref>(
                    __strata_plugin_loader,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            };
        };
    };
}

/// Implementation details of [`export_plugin!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use abi_stable::{
        library::{CheckTypeLayout, LibHeader, RootModuleResult},
        std_types::{RResult, RStr},
    };

    pub use super::{call_root_module_loader, construct, root_module};
}

/// Builds the root module (called once per process, when the host first loads the library).
#[doc(hidden)]
pub fn root_module(name: &'static str, version: &'static str, new: Constructor) -> FsPluginMod_Ref {
    FsPluginMod {
        abi_version: RStr::from_str(ABI_VERSION),
        name: RStr::from_str(name),
        version: RStr::from_str(version),
        new,
    }
    .leak_into_prefix()
}

/// Runs the root-module function the way `#[export_root_module]` does.
#[doc(hidden)]
pub fn call_root_module_loader(f: fn() -> FsPluginMod_Ref) -> RootModuleResult {
    library::__call_root_module_loader(f)
}

/// The exported constructor: parses the options, runs the author's constructor, boxes the result.
#[doc(hidden)]
pub fn construct<O, P, F>(
    options_json: RStr<'_>,
    constructor: F,
) -> RResult<FileSystemBox, PluginError>
where
    O: DeserializeOwned,
    P: Plugin,
    F: FnOnce(O) -> Result<P>,
{
    init_logging();
    guarded("new", || {
        let options: O = serde_json::from_str(options_json.as_str())
            .map_err(|e| Error::InvalidArgument(format!("plugin options: {e}")))?;
        let plugin = constructor(options)?;
        Ok(FileSystemBox::from_value(
            Exported {
                inner: ManuallyDrop::new(plugin),
            },
            TD_Opaque,
        ))
    })
}

/// Environment variable with the plugin's log filter (`warn`, `info,strata_plugin_http=debug`,
/// ...). The `strata` program sets it from `--log-level`.
pub const LOG_ENV: &str = "STRATA_LOG";

/// Sends the plugin's `tracing` events to stderr, filtered by [`LOG_ENV`]. A plugin carries its
/// own copy of `tracing`, so the host's subscriber never sees them otherwise.
fn init_logging() {
    let wanted = std::env::var(LOG_ENV).unwrap_or_else(|_| "warn".into());
    // fuser warns when its session's own unmount finds the mount gone, which plugins cause on
    // purpose (they unmount first, lazily when busy).
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{wanted},fuser::mnt=error"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser::mnt=error"));
    // Fails when already set (a second plugin instance): nothing to do then.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs `f`, turning its error or its panic into a [`PluginError`].
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => RResult::ROk(value),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(payload) => {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".to_owned());
            RResult::RErr(PluginError::new(
                ErrorKind::Unknown,
                format!("plugin panicked: {reason} (in {what})"),
            ))
        }
    }
}

/// An author's [`Plugin`] behind the FFI trait.
struct Exported<P: Plugin> {
    // ManuallyDrop so that `Drop` can run the plugin's destructor under `catch_unwind` too.
    inner: ManuallyDrop<P>,
}

impl<P: Plugin> Drop for Exported<P> {
    fn drop(&mut self) {
        // SAFETY: `inner` is never used again; this is the only place it is taken.
        let inner = unsafe { ManuallyDrop::take(&mut self.inner) };
        if catch_unwind(AssertUnwindSafe(move || drop(inner))).is_err() {
            // Nothing to return an error to: the host is dropping the file system.
            eprintln!("strata plugin: a file system panicked while being dropped");
        }
    }
}

fn mountpoint<'a>(mountpoint: &'a RStr<'_>) -> &'a Path {
    Path::new(mountpoint.as_str())
}

impl<P: Plugin> FfiFileSystem for Exported<P> {
    fn mount(&self, mp: RStr<'_>, labels: &FfiLabels) -> RResult<(), PluginError> {
        guarded("mount", || {
            self.inner.mount(mountpoint(&mp), &labels_from_ffi(labels))
        })
    }

    fn check(&self, mp: RStr<'_>, labels: &FfiLabels) -> RResult<(), PluginError> {
        guarded("check", || {
            self.inner.check(mountpoint(&mp), &labels_from_ffi(labels))
        })
    }

    fn unmount(&self, mp: RStr<'_>) -> RResult<(), PluginError> {
        guarded("unmount", || self.inner.unmount(mountpoint(&mp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exported_header_uses_abi_stables_symbol_name() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }

    #[test]
    fn a_panic_becomes_an_unknown_error_naming_the_call() {
        let r: RResult<(), PluginError> = guarded("mount", || panic!("boom"));
        let e = r.into_result().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unknown);
        assert_eq!(e.message(), "plugin panicked: boom (in mount)");
    }

    #[test]
    fn an_error_keeps_its_kind() {
        let r: RResult<(), PluginError> =
            guarded("check", || Err(Error::Unavailable("gone".into())));
        let e = r.into_result().unwrap_err();
        assert_eq!((e.kind(), e.message()), (ErrorKind::Unavailable, "gone"));
    }
}
