#![allow(clippy::unwrap_used)]
//! The host against plugins that are wrong on purpose (`plugins/testing`) and against the example
//! plugin (`examples/hello_plugin.rs`): each is reported clearly and the host keeps working.
//!
//! `cargo xtask test-plugins` builds the fixtures, puts their `.so` files in a directory and runs
//! these tests (`cargo test --test …`; they are `test = false` so a plain `cargo test` does not pick them up) with `STRATA_TEST_PLUGINS_DIR` naming it; without it they fail.

mod common;

use std::path::{Path, PathBuf};

use fs_plugin_api::{Error, LoadFailure, PluginRegistry, config::Config};
use serde_json::json;
use snapshot_core::{ErrorKind, Labels};
use tempfile::TempDir;

const WRONG_ABI: &str = "libstrata_test_plugin_wrong_abi.so";
const WRONG_LAYOUT: &str = "libstrata_test_plugin_wrong_layout.so";
const NOT_A_PLUGIN: &str = "libstrata_test_not_a_plugin.so";
const FAILING: &str = "libstrata_test_plugin_failing.so";
const PANICKING: &str = "libstrata_test_plugin_panicking.so";
const HELLO: &str = "libhello_plugin.so";
/// Written by the tests: not a shared library at all.
const GARBAGE: &str = "garbage.so";
/// A second copy of the failing plugin: a duplicate name.
const DUPLICATE: &str = "libzz_copy_of_failing.so";

/// A fresh plugins directory with every fixture, a garbage file and a duplicate, scanned.
fn scan_fixtures() -> (TempDir, PluginRegistry) {
    let built = common::env_dir("STRATA_TEST_PLUGINS_DIR");
    let dir = tempfile::tempdir().unwrap();
    for file in [
        WRONG_ABI,
        WRONG_LAYOUT,
        NOT_A_PLUGIN,
        FAILING,
        PANICKING,
        HELLO,
    ] {
        let from = built.join(file);
        assert!(from.is_file(), "{} was not built", from.display());
        std::fs::copy(&from, dir.path().join(file)).unwrap();
    }
    std::fs::copy(built.join(FAILING), dir.path().join(DUPLICATE)).unwrap();
    std::fs::write(dir.path().join(GARBAGE), "this is not an ELF file\n").unwrap();
    let registry = PluginRegistry::scan(dir.path()).unwrap();
    (dir, registry)
}

fn rejection<'a>(registry: &'a PluginRegistry, file: &str) -> &'a fs_plugin_api::Rejected {
    registry
        .rejected()
        .iter()
        .find(|r| r.path.file_name().unwrap() == file)
        .unwrap_or_else(|| panic!("{file} was not rejected: {registry:?}"))
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn mount_err(registry: &PluginRegistry, plugin: &str, labels: &Labels) -> snapshot_core::Error {
    let fs = registry.load(plugin, &json!({})).unwrap();
    fs.mount(Path::new("/nonexistent/mnt"), labels).unwrap_err()
}

#[test]
fn several_different_plugins_load_in_one_process() {
    let (_dir, registry) = scan_fixtures();
    let names: Vec<&str> = registry.plugins().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["failing", "hello", "panicking"]);
    for plugin in registry.plugins() {
        assert_eq!(plugin.abi_version, fs_plugin_api::ABI_VERSION);
        assert!(!plugin.version.is_empty(), "{plugin}");
    }
    // The example is built by this package: it declares this package's version.
    assert_eq!(
        registry.get("hello").unwrap().version,
        env!("CARGO_PKG_VERSION")
    );
    // Each name reaches its own library, not the first one loaded.
    let failing = registry.load("failing", &json!({})).unwrap();
    let panicking = registry.load("panicking", &json!({})).unwrap();
    let nowhere = Path::new("/nonexistent/mnt");
    assert_eq!(
        failing.check(nowhere, &Labels::new()).unwrap_err().kind(),
        ErrorKind::Unavailable
    );
    panicking.check(nowhere, &Labels::new()).unwrap();
}

#[test]
fn a_plugin_built_for_another_abi_version_is_rejected_naming_the_file() {
    let (dir, registry) = scan_fixtures();
    let r = rejection(&registry, WRONG_ABI);
    assert_eq!(
        r.reason,
        LoadFailure::IncompatibleVersion {
            expected: "1.0.0".into(),
            found: "2.0.0".into()
        }
    );
    assert_eq!(
        r.to_string(),
        format!(
            "{}: built for plugin ABI 2.0.0, but this host speaks plugin ABI 1.0.0",
            dir.path().join(WRONG_ABI).display()
        )
    );
}

#[test]
fn a_plugin_with_another_layout_is_rejected_in_one_short_line() {
    let (dir, registry) = scan_fixtures();
    let r = rejection(&registry, WRONG_LAYOUT);
    assert!(
        matches!(r.reason, LoadFailure::IncompatibleLayout { .. }),
        "{r}"
    );
    let line = r.to_string();
    assert!(
        line.starts_with(&format!(
            "{}: incompatible plugin ABI layout",
            dir.path().join(WRONG_LAYOUT).display()
        )),
        "{line}"
    );
    assert!(!line.contains('\n'), "{line}");
    assert!(line.len() < 600, "{} chars: {line}", line.len());
}

#[test]
fn a_library_without_a_root_module_is_not_a_strata_plugin() {
    let (_dir, registry) = scan_fixtures();
    let r = rejection(&registry, NOT_A_PLUGIN);
    assert!(matches!(r.reason, LoadFailure::NotAPlugin(_)), "{r}");
    assert!(r.to_string().contains("not a strata plugin"), "{r}");
    let r = rejection(&registry, GARBAGE);
    assert!(matches!(r.reason, LoadFailure::Open(_)), "{r}");
    assert!(r.to_string().contains("cannot be loaded"), "{r}");
}

#[test]
fn a_second_file_declaring_a_taken_name_is_rejected() {
    let (dir, registry) = scan_fixtures();
    let r = rejection(&registry, DUPLICATE);
    assert_eq!(
        r.reason,
        LoadFailure::DuplicateName {
            name: "failing".into(),
            first: dir.path().join(FAILING)
        }
    );
}

#[test]
fn a_missing_plugin_name_lists_what_was_found_and_what_was_rejected() {
    let (dir, registry) = scan_fixtures();
    let e = registry.load("nfs", &json!({})).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "no plugin named \"nfs\" in {}",
            dir.path().display()
        )),
        "{msg}"
    );
    for name in ["failing", "hello", "panicking"] {
        let found = registry.get(name).unwrap().to_string();
        assert!(msg.contains(&found), "{found:?} missing from: {msg}");
    }
    for file in [WRONG_ABI, WRONG_LAYOUT, NOT_A_PLUGIN, GARBAGE, DUPLICATE] {
        let line = rejection(&registry, file).to_string();
        assert!(msg.contains(&line), "{line:?} missing from: {msg}");
    }
    // What the snapshotter sees keeps the kind.
    let core: snapshot_core::Error = e.into();
    assert_eq!(core.kind(), ErrorKind::NotFound);
}

#[test]
fn errors_from_a_plugin_arrive_with_their_kinds() {
    let (_dir, registry) = scan_fixtures();
    for (name, kind) in [
        ("not-found", ErrorKind::NotFound),
        ("already-exists", ErrorKind::AlreadyExists),
        ("failed-precondition", ErrorKind::FailedPrecondition),
        ("invalid-argument", ErrorKind::InvalidArgument),
        ("unavailable", ErrorKind::Unavailable),
        ("not-implemented", ErrorKind::NotImplemented),
        ("unknown", ErrorKind::Unknown),
    ] {
        let e = mount_err(
            &registry,
            "failing",
            &labels(&[("strata.test/fail-kind", name)]),
        );
        assert_eq!(e.kind(), kind, "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "plugin failing: mount /nonexistent/mnt: failing plugin: mount fails on purpose"
            ),
            "{msg}"
        );
    }
    let fs = registry.load("failing", &json!({})).unwrap();
    let e = fs.unmount(Path::new("/mnt")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
}

#[test]
fn a_failing_constructor_and_bad_options_arrive_with_their_kinds() {
    let (_dir, registry) = scan_fixtures();
    let e = registry
        .load("failing", &json!({ "fail_new_with": "unavailable" }))
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(
        e.to_string(),
        "plugin failing: failing plugin: the constructor fails on purpose"
    );
    let e = registry
        .load("failing", &json!({ "bogus": 1 }))
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
}

#[test]
fn a_panicking_plugin_gives_an_error_and_the_host_keeps_working() {
    let (_dir, registry) = scan_fixtures();
    let fs = registry.load("panicking", &json!({})).unwrap();
    let e = fs.mount(Path::new("/mnt/x"), &Labels::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unknown);
    assert_eq!(
        e.to_string(),
        "plugin panicking: mount /mnt/x: plugin panicked: panicking plugin: boom in mount /mnt/x (in mount)"
    );
    let e = fs.unmount(Path::new("/mnt/x")).unwrap_err();
    assert!(
        e.to_string()
            .contains("plugin panicked: a non-string panic payload (in unmount)"),
        "{e}"
    );
    // The same instance, and the host, still work.
    fs.check(Path::new("/mnt/x"), &Labels::new()).unwrap();
    let e = registry
        .load("panicking", &json!({ "panic_in_new": true }))
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Unknown);
    assert!(matches!(e, Error::Plugin { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("plugin panicked: panicking plugin: boom in the constructor (in new)"),
        "{e}"
    );
    registry.load("panicking", &json!({})).unwrap();
    let e = mount_err(
        &registry,
        "failing",
        &labels(&[("strata.test/fail-kind", "not-found")]),
    );
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

/// The README's route: a config naming the plugin, loaded through [`Config::filesystem`].
#[test]
fn the_example_plugin_mounts_through_a_config() {
    let (dir, _registry) = scan_fixtures();
    let config_path = dir.path().join("strata.toml");
    std::fs::write(
        &config_path,
        format!(
            "plugins_dir = {:?}\n[filesystem]\nplugin = \"hello\"\n[filesystem.options]\ngreeting = \"hi\"\n",
            dir.path()
        ),
    )
    .unwrap();
    let fs = Config::load(&config_path)
        .unwrap()
        .filesystem()
        .unwrap()
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let (mnt, _guard): (PathBuf, _) = common::mountpoint(scratch.path(), "hello");
    let digest = format!("sha256:{}", "ab".repeat(32));
    let labels = labels(&[(fs_plugin_api::LABEL_LAYER_DIGEST, &digest)]);
    fs.mount(&mnt, &labels).unwrap();
    assert!(common::is_mount_point(&mnt));
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello.txt")).unwrap(),
        format!("hi {digest}\n")
    );
    fs.check(&mnt, &labels).unwrap();
    fs.unmount(&mnt).unwrap();
    assert!(!common::is_mount_point(&mnt));
    assert_eq!(
        fs.check(&mnt, &labels).unwrap_err().kind(),
        ErrorKind::Unavailable
    );
}
