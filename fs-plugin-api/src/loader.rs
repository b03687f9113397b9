//! Finding plugins: scan a directory, open every `*.so`, keep the ones that are strata plugins
//! of this ABI, and make file systems from them by name.
//!
//! Libraries are opened with `abi_stable::library::lib_header_from_path` and checked with
//! `LibHeader::init_root_module`, once per file: `RootModule::load_from_file` would cache one
//! module per root-module *type*, so a second plugin would silently come back as the first.
//! Libraries are never unloaded (abi_stable's rule), so a loaded plugin lives for the process.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use abi_stable::library::{LibraryError, lib_header_from_path};
use snapshot_core::FileSystem;
use tracing::{debug, info, warn};

use crate::{
    Error, LoadFailure, Result,
    abi::{FsPluginMod_Ref, ROOT_MODULE_NAME},
    adapter::LoadedFileSystem,
};

/// What a loadable plugin declares about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// The name configs use.
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// The plugin ABI version it was built against.
    pub abi_version: String,
    /// The file it was loaded from.
    pub path: PathBuf,
}

impl fmt::Display for PluginInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({})",
            self.name,
            self.version,
            self.path.display()
        )
    }
}

/// A file in the plugins directory that did not load, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The file.
    pub path: PathBuf,
    /// Why it was not loaded.
    pub reason: LoadFailure,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// A loaded plugin: its declaration and its checked root module.
#[derive(Clone)]
struct Loaded {
    info: PluginInfo,
    module: FsPluginMod_Ref,
}

/// The plugins found in one directory.
#[derive(Clone)]
pub struct PluginRegistry {
    dir: PathBuf,
    plugins: BTreeMap<String, Loaded>,
    rejected: Vec<Rejected>,
}

impl fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginRegistry")
            .field("dir", &self.dir)
            .field("plugins", &self.plugins().collect::<Vec<_>>())
            .field("rejected", &self.rejected)
            .finish()
    }
}

impl PluginRegistry {
    /// Opens every `*.so` file in `dir` (in name order) and records each one's declared name, or
    /// why it was rejected. Only an unreadable directory is an error.
    ///
    /// Opening a library runs its initialisers: the directory must be as trusted as the host.
    pub fn scan(dir: &Path) -> Result<Self> {
        let scan_err = |source| Error::ScanDir {
            dir: dir.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(scan_err)? {
            let path = entry.map_err(scan_err)?.path();
            if path.extension().is_some_and(|e| e == "so") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();

        let mut registry = PluginRegistry {
            dir: dir.to_path_buf(),
            plugins: BTreeMap::new(),
            rejected: Vec::new(),
        };
        for path in files {
            let outcome = open_plugin(&path).and_then(|loaded| {
                match registry.plugins.get(&loaded.info.name) {
                    Some(first) => Err(LoadFailure::DuplicateName {
                        name: loaded.info.name.clone(),
                        first: first.info.path.clone(),
                    }),
                    None => Ok(loaded),
                }
            });
            match outcome {
                Ok(loaded) => {
                    info!(plugin = %loaded.info, "found plugin");
                    registry.plugins.insert(loaded.info.name.clone(), loaded);
                }
                Err(reason) => {
                    let rejected = Rejected { path, reason };
                    warn!("skipping {rejected}");
                    registry.rejected.push(rejected);
                }
            }
        }
        Ok(registry)
    }

    /// The directory scanned.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The plugins that loaded, by name.
    pub fn plugins(&self) -> impl Iterator<Item = &PluginInfo> {
        self.plugins.values().map(|l| &l.info)
    }

    /// The plugin declaring `name`, if one loaded.
    pub fn get(&self, name: &str) -> Option<&PluginInfo> {
        self.plugins.get(name).map(|l| &l.info)
    }

    /// The files that did not load, with their reasons.
    pub fn rejected(&self) -> &[Rejected] {
        &self.rejected
    }

    /// Makes a file system from the plugin declaring `name`, handing it `options` (as JSON).
    ///
    /// A name no loadable plugin declares gives [`Error::PluginNotFound`], whose message lists the
    /// plugins found and the files rejected; a failing constructor gives [`Error::Plugin`] with
    /// the plugin's error kind.
    pub fn load(&self, name: &str, options: &serde_json::Value) -> Result<Arc<dyn FileSystem>> {
        let loaded = self
            .plugins
            .get(name)
            .ok_or_else(|| Error::PluginNotFound {
                name: name.to_owned(),
                dir: self.dir.clone(),
                found: self.plugins().cloned().collect(),
                rejected: self.rejected.clone(),
            })?;
        let options_json = serde_json::to_string(options).map_err(|e| Error::Options {
            plugin: name.to_owned(),
            message: e.to_string(),
        })?;
        let new = loaded.module.new();
        let fs = new(options_json.as_str().into())
            .into_result()
            .map_err(|e| Error::Plugin {
                plugin: name.to_owned(),
                kind: e.kind(),
                message: e.message.into_string(),
            })?;
        debug!(plugin = name, "file system created");
        Ok(Arc::new(LoadedFileSystem::new(name, fs)))
    }
}

/// Opens one file and checks that it is a strata plugin of this ABI.
fn open_plugin(path: &Path) -> std::result::Result<Loaded, LoadFailure> {
    let header = lib_header_from_path(path).map_err(|e| classify(path, e))?;
    // Any abi_stable library has a header; only ours carry this root-module name.
    let module_name = header.root_mod_consts().name();
    if module_name.as_str() != ROOT_MODULE_NAME {
        return Err(LoadFailure::NotAPlugin(format!(
            "an abi_stable library for {:?}, not for {ROOT_MODULE_NAME:?}",
            module_name.as_str()
        )));
    }
    let module = header
        .init_root_module::<FsPluginMod_Ref>()
        .map_err(|e| classify(path, e))?;
    let name = module.name().as_str().to_owned();
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(LoadFailure::Invalid(format!(
            "declared name {name:?} is empty or has characters other than ASCII letters, digits, '-', '_', '.'"
        )));
    }
    Ok(Loaded {
        info: PluginInfo {
            name,
            version: module.version().as_str().to_owned(),
            abi_version: module.abi_version().as_str().to_owned(),
            path: path.to_path_buf(),
        },
        module,
    })
}

/// Turns abi_stable's error into one line (some of its reports run to thousands of lines).
fn classify(path: &Path, e: LibraryError) -> LoadFailure {
    match e {
        LibraryError::OpenError { err, .. } => {
            // dlerror() starts with the path; the rejection names the file already.
            let msg = err.to_string();
            let prefix = format!("{}: ", path.display());
            LoadFailure::Open(one_line(msg.strip_prefix(&prefix).unwrap_or(&msg)))
        }
        LibraryError::GetSymbolError { .. } => LoadFailure::NotAPlugin(format!(
            "it exports no `{}` (use fs_plugin_api::export_plugin!)",
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        )),
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => LoadFailure::IncompatibleVersion {
            expected: expected_version.to_string(),
            found: actual_version.to_string(),
        },
        LibraryError::AbiInstability(report) => {
            let report = report.to_string();
            debug!(path = %path.display(), "abi_stable layout report:\n{report}");
            LoadFailure::IncompatibleLayout {
                summary: summarize_layout_report(&report),
            }
        }
        LibraryError::InvalidAbiHeader(_) => LoadFailure::IncompatibleLayout {
            summary: "built with an incompatible abi_stable release".to_owned(),
        },
        LibraryError::InvalidCAbi { .. } => LoadFailure::IncompatibleLayout {
            summary: "built by a compiler with a different C ABI".to_owned(),
        },
        LibraryError::ParseVersionError(e) => LoadFailure::Invalid(format!(
            "unparsable ABI version: {}",
            one_line(&e.to_string())
        )),
        LibraryError::RootModule { err, .. } => LoadFailure::Invalid(format!(
            "its root module failed to initialise: {}",
            one_line(&err.to_string())
        )),
        LibraryError::Many(errors) => match errors.into_iter().next() {
            Some(first) => classify(path, first),
            None => LoadFailure::Invalid("unknown abi_stable error".to_owned()),
        },
    }
}

/// The first few non-empty lines of `text`, whitespace collapsed, at most [`MAX_REASON`] chars.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    for line in lines.by_ref().take(4) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&line.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    let more = lines.count();
    if out.chars().count() > MAX_REASON {
        out = out.chars().take(MAX_REASON).collect();
        out.push('…');
    }
    if more > 0 {
        out.push_str(&format!(" […{more} more lines at debug level]"));
    }
    out
}

/// The `Error:` entries of abi_stable's layout report (each with the field it concerns and what
/// was expected and found), or its first lines if it has none.
fn summarize_layout_report(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim).collect();
    // The line after `label`, looked for in the few lines following an `Error:` line.
    let after = |from: usize, label: &str| {
        let window = lines
            .get(from..lines.len().min(from + 8))
            .unwrap_or_default();
        let at = window.iter().position(|l| *l == label)?;
        window.get(at + 1).copied()
    };
    let mut field = None;
    let mut errors: Vec<String> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("field_name:") {
            // `0` is the root module itself.
            if name != "0" {
                field = Some(name);
            }
        }
        let Some(error) = line.strip_prefix("Error:") else {
            continue;
        };
        let mut entry = match field {
            Some(f) => format!("field `{f}`: {}", error.trim()),
            None => error.trim().to_owned(),
        };
        if let (Some(expected), Some(found)) = (after(i, "Expected:"), after(i, "Found:")) {
            entry.push_str(&format!(" (expected {expected}, found {found})"));
        }
        if !errors.contains(&entry) {
            errors.push(entry);
        }
    }
    if errors.is_empty() {
        return one_line(report);
    }
    one_line(&errors.join("; "))
}

/// The longest reason kept from a library error.
const MAX_REASON: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_keeps_short_text() {
        assert_eq!(one_line("\n  a   b\n"), "a b");
    }

    #[test]
    fn one_line_cuts_long_reports() {
        let report = format!("{}\n", "x".repeat(500)).repeat(1000);
        let line = one_line(&report);
        assert!(!line.contains('\n'));
        assert!(line.chars().count() < MAX_REASON + 60, "{line}");
        assert!(line.ends_with("[…996 more lines at debug level]"), "{line}");
    }

    #[allow(
        non_camel_case_types,
        missing_docs,
        dead_code,
        clippy::wrong_self_convention
    )]
    mod changed {
        use abi_stable::{
            StableAbi,
            std_types::{RStr, RString},
        };

        /// The root module with another constructor signature (same package, same version).
        #[repr(C)]
        #[derive(StableAbi)]
        #[sabi(kind(Prefix(prefix_ref = FsPluginMod_Ref)))]
        pub struct FsPluginMod {
            pub abi_version: RStr<'static>,
            pub name: RStr<'static>,
            pub version: RStr<'static>,
            #[sabi(last_prefix_field)]
            pub new: extern "C" fn(options_json: RString) -> u32,
        }
    }

    #[test]
    fn a_changed_root_module_is_summarised_by_field_and_types() {
        use abi_stable::{StableAbi, abi_stability::abi_checking};
        // What `init_root_module` runs, on a layout that differs in one field.
        let report = abi_checking::exported_check_layout_compatibility(
            <crate::abi::FsPluginMod_Ref as StableAbi>::LAYOUT,
            <changed::FsPluginMod_Ref as StableAbi>::LAYOUT,
        )
        .into_result()
        .unwrap_err()
        .to_string();
        assert!(report.lines().count() > 100, "{report}");
        let summary = summarize_layout_report(&report);
        assert!(!summary.contains('\n'), "{summary}");
        assert!(summary.chars().count() <= MAX_REASON + 1, "{summary}");
        assert!(
            summary.starts_with("field `new`: function pointers reference different lifetimes"),
            "{summary}"
        );
        assert!(
            summary.contains("found fn(options_json,: RString)->u32)"),
            "{summary}"
        );
    }

    #[test]
    fn a_report_without_error_lines_falls_back_to_its_first_lines() {
        assert_eq!(
            summarize_layout_report("something\nwent wrong"),
            "something went wrong"
        );
    }

    #[test]
    fn scanning_a_missing_directory_is_not_found() {
        let e = PluginRegistry::scan(Path::new("/nonexistent/strata-plugins")).unwrap_err();
        assert_eq!(e.kind(), snapshot_core::ErrorKind::NotFound);
        assert!(e.to_string().contains("/nonexistent/strata-plugins"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_library_is_rejected_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.so"), "not ELF").unwrap();
        std::fs::write(dir.path().join("README"), "ignored: not *.so").unwrap();
        let registry = PluginRegistry::scan(dir.path()).unwrap();
        assert_eq!(registry.plugins().count(), 0);
        let [rejected] = registry.rejected() else {
            panic!("{:?}", registry.rejected())
        };
        assert!(rejected.path.ends_with("notes.so"));
        assert!(
            matches!(rejected.reason, LoadFailure::Open(_)),
            "{rejected}"
        );
        let e = registry
            .load("local", &serde_json::Value::Null)
            .err()
            .unwrap();
        assert_eq!(e.kind(), snapshot_core::ErrorKind::NotFound);
        let msg = e.to_string();
        assert!(msg.contains("no plugin named \"local\""), "{msg}");
        assert!(msg.contains("found no plugins"), "{msg}");
        assert!(msg.contains("notes.so: cannot be loaded"), "{msg}");
    }
}
