//! The snapshotter conformance suite: containerd's `snapshots/testsuite` (SEMANTICS.md §4) plus
//! strata's checks of error kinds (§1.4), label limits, rebase, arbitrary keys and usage.
//!
//! A snapshotter runs every case with one macro call in an integration test:
//!
//! ```text
//! fn factory(root: &std::path::Path) -> snapshot_core::Result<Box<dyn snapshot_core::Snapshotter>> {
//!     Ok(Box::new(MySnapshotter::open(root)?))
//! }
//! snapshot_core::snapshotter_conformance!(factory, &MyMounter);
//! ```
//!
//! Cases that look at file contents mount snapshots through the caller's [`Mounter`] (so they
//! need root and the kernel's file systems); the others only call the [`Snapshotter`] API. Every
//! case runs in its own temp dir with `root/` for the snapshotter and `work/` for mountpoints.
//! Unlike containerd the suite does not clear the umask (std offers no way to): modes it checks
//! are set explicitly, except the 0755 of a snapshot's root (RootPermission), which assumes a
//! umask that keeps 0755 (such as 022).

mod cases;
mod contract;
mod errors;
pub mod fstest;
mod harness;
mod layers;
mod metadata;

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use crate::{Mount, Snapshotter};

use harness::Ctx;

/// Performs and undoes mounts for the suite (snapshot-core itself never mounts).
pub trait Mounter: Send + Sync {
    /// Mounts `mounts`, in order, on the existing directory `target`.
    fn mount(&self, mounts: &[Mount], target: &Path) -> std::io::Result<()>;
    /// Unmounts whatever is mounted on `target` (detach semantics are fine).
    fn unmount(&self, target: &Path) -> std::io::Result<()>;
}

/// Makes a fresh snapshotter rooted at the given empty directory.
pub type Factory = dyn Fn(&Path) -> crate::Result<Box<dyn Snapshotter>> + Send + Sync;

/// Names of all cases, in the order [`snapshotter_conformance!`](crate::snapshotter_conformance)
/// generates them.
pub const CASES: &[&str] = &[
    "Basic",
    "StatActive",
    "StatCommitted",
    "Transitivity",
    "PrepareView",
    "Update",
    "Remove",
    "Walk",
    "LayerFileUpdate",
    "RemoveDirectoryInLowerLayer",
    "Chown",
    "DirectoryPermissionOnCommit",
    "RemoveIntermediateSnapshot",
    "DeletedFilesInChildSnapshot",
    "MoveFileFromLowerLayer",
    "Rename",
    "ViewReadonly",
    "StatInWalk",
    "CloseTwice",
    "RootPermission",
    "128LayersMount",
    "PrepareErrors",
    "CommitErrors",
    "MountsErrors",
    "RemoveErrors",
    "UpdateErrors",
    "LabelSizeLimit",
    "WalkErrors",
    "CommitRebase",
    "KeysWithSlashes",
    "Usage",
];

type CaseFn = fn(&Ctx);

/// The body of the case called `name`, if there is one.
fn case_fn(name: &str) -> Option<CaseFn> {
    Some(match name {
        "Basic" => cases::basic,
        "StatActive" => cases::stat_active,
        "StatCommitted" => cases::stat_committed,
        "Transitivity" => cases::transitivity,
        "PrepareView" => cases::prepare_view,
        "Update" => metadata::update,
        "Remove" => metadata::remove,
        "Walk" => metadata::walk,
        "LayerFileUpdate" => layers::layer_file_update,
        "RemoveDirectoryInLowerLayer" => layers::remove_directory_in_lower_layer,
        "Chown" => layers::chown,
        "DirectoryPermissionOnCommit" => layers::directory_permission_on_commit,
        "RemoveIntermediateSnapshot" => cases::remove_intermediate_snapshot,
        "DeletedFilesInChildSnapshot" => layers::deleted_files_in_child_snapshot,
        "MoveFileFromLowerLayer" => layers::move_file_from_lower_layer,
        "Rename" => layers::rename,
        "ViewReadonly" => layers::view_readonly,
        "StatInWalk" => metadata::stat_in_walk,
        "CloseTwice" => cases::close_twice,
        "RootPermission" => layers::root_permission,
        "128LayersMount" => layers::mount_128_layers,
        "PrepareErrors" => errors::prepare_errors,
        "CommitErrors" => errors::commit_errors,
        "MountsErrors" => errors::mounts_errors,
        "RemoveErrors" => errors::remove_errors,
        "UpdateErrors" => errors::update_errors,
        "LabelSizeLimit" => contract::label_size_limit,
        "WalkErrors" => errors::walk_errors,
        "CommitRebase" => contract::commit_rebase,
        "KeysWithSlashes" => contract::keys_with_slashes,
        "Usage" => contract::usage,
        _ => return None,
    })
}

/// Runs one case in a fresh temp dir (`root/` for the factory, `work/` for mountpoints); panics
/// with a clear message on failure; closes the snapshotter afterwards.
pub fn run_case(name: &str, factory: &Factory, mounter: &dyn Mounter) {
    let Some(body) = case_fn(name) else {
        panic!("unknown conformance case {name:?}: expected one of {CASES:?}");
    };
    let tmp = tempfile::Builder::new()
        .prefix(&format!("snapshot-suite-{name}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("[{name}] expected a temp dir: {e}"));
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");
    for dir in [&root, &work] {
        std::fs::create_dir(dir)
            .unwrap_or_else(|e| panic!("[{name}] expected to create {}: {e}", dir.display()));
    }
    let sn = factory(&root)
        .unwrap_or_else(|e| panic!("[{name}] expected the factory to open a snapshotter: {e}"));

    let ctx = Ctx::new(sn.as_ref(), mounter, work);
    // Mount guards inside the case unmount while unwinding, before the snapshotter closes.
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| body(&ctx)));
    drop(ctx);
    let closed = sn.close();
    drop(sn);

    if let Err(payload) = outcome {
        panic!(
            "conformance case {name} failed: {}",
            panic_message(&*payload)
        );
    }
    if let Err(e) = closed {
        panic!(
            "[{name}] expected close after the case to succeed, got {} error: {e}",
            e.kind()
        );
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    }
}

/// Generates one `#[test]` per conformance case: `snapshotter_conformance!(factory, mounter)`,
/// where `factory` coerces to `&`[`Factory`] once borrowed and `mounter` is a `&dyn`[`Mounter`].
#[macro_export]
macro_rules! snapshotter_conformance {
    ($factory:expr, $mounter:expr $(,)?) => {
        $crate::__snapshotter_cases!(__snapshotter_tests($factory, $mounter));
    };
}

/// The cases as `test_fn_name => "CaseName"`, fed to the callback macro `$cb` (internal).
#[doc(hidden)]
#[macro_export]
macro_rules! __snapshotter_cases {
    ($cb:ident ($($args:tt)*)) => {
        $crate::$cb! {
            ($($args)*)
            basic => "Basic",
            stat_active => "StatActive",
            stat_committed => "StatCommitted",
            transitivity => "Transitivity",
            prepare_view => "PrepareView",
            update => "Update",
            remove => "Remove",
            walk => "Walk",
            layer_file_update => "LayerFileUpdate",
            remove_directory_in_lower_layer => "RemoveDirectoryInLowerLayer",
            chown => "Chown",
            directory_permission_on_commit => "DirectoryPermissionOnCommit",
            remove_intermediate_snapshot => "RemoveIntermediateSnapshot",
            deleted_files_in_child_snapshot => "DeletedFilesInChildSnapshot",
            move_file_from_lower_layer => "MoveFileFromLowerLayer",
            rename => "Rename",
            view_readonly => "ViewReadonly",
            stat_in_walk => "StatInWalk",
            close_twice => "CloseTwice",
            root_permission => "RootPermission",
            mount_128_layers => "128LayersMount",
            prepare_errors => "PrepareErrors",
            commit_errors => "CommitErrors",
            mounts_errors => "MountsErrors",
            remove_errors => "RemoveErrors",
            update_errors => "UpdateErrors",
            label_size_limit => "LabelSizeLimit",
            walk_errors => "WalkErrors",
            commit_rebase => "CommitRebase",
            keys_with_slashes => "KeysWithSlashes",
            usage => "Usage",
        }
    };
}

/// Emits the `#[test]` functions (internal, see [`snapshotter_conformance!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __snapshotter_tests {
    (($factory:expr, $mounter:expr) $($test:ident => $case:literal,)*) => {
        $(
            #[test]
            fn $test() {
                $crate::testsuite::run_case($case, &$factory, $mounter);
            }
        )*
    };
}

/// The case names and test function names of the macro (internal, for the crate's own tests).
#[doc(hidden)]
#[macro_export]
macro_rules! __snapshotter_case_list {
    (() $($test:ident => $case:literal,)*) => {
        &[$((stringify!($test), $case)),*]
    };
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const MACRO_CASES: &[(&str, &str)] = crate::__snapshotter_cases!(__snapshotter_case_list());

    #[test]
    fn macro_generates_exactly_the_listed_cases_in_order() {
        let from_macro: Vec<&str> = MACRO_CASES.iter().map(|(_, case)| *case).collect();
        assert_eq!(
            from_macro, CASES,
            "expected the macro's cases to equal CASES"
        );
    }

    #[test]
    fn every_case_has_a_body_and_unknown_names_have_none() {
        for case in CASES {
            assert!(case_fn(case).is_some(), "expected a body for case {case}");
        }
        assert!(
            case_fn("NoSuchCase").is_none(),
            "expected no body for an unknown case"
        );
    }

    #[test]
    fn names_are_unique_and_test_fns_are_snake_case() {
        let names: BTreeSet<&str> = CASES.iter().copied().collect();
        assert_eq!(names.len(), CASES.len(), "expected unique case names");
        let fns: BTreeSet<&str> = MACRO_CASES.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            fns.len(),
            MACRO_CASES.len(),
            "expected unique test fn names"
        );
        for f in fns {
            let snake = f
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            assert!(snake, "expected test fn {f} to be snake_case");
        }
    }

    #[test]
    #[should_panic(expected = "unknown conformance case")]
    fn unknown_case_panics_with_the_list() {
        struct NoMount;
        impl Mounter for NoMount {
            fn mount(&self, _: &[Mount], _: &Path) -> std::io::Result<()> {
                Err(std::io::Error::other("no mounts here"))
            }
            fn unmount(&self, _: &Path) -> std::io::Result<()> {
                Ok(())
            }
        }
        let factory = |_: &Path| -> crate::Result<Box<dyn Snapshotter>> {
            Err(crate::Error::NotImplemented("factory".into()))
        };
        run_case("NoSuchCase", &factory, &NoMount);
    }
}
