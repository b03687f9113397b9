//! strata's TOML config, as far as backing file systems go.
//!
//! ```toml
//! root = "/var/lib/strata"
//! plugins_dir = "/usr/lib/strata/plugins"
//! [filesystem]              # optional: without it, layers are unpacked as usual
//! plugin = "local"          # the name the plugin declares
//! [filesystem.options]      # handed to the plugin as JSON
//! store = "/srv/layers"
//! ```
//!
//! Relative paths in a file loaded with [`Config::load`] are relative to that file's directory.
//! Keys this crate does not know are ignored at the top level (the program may add its own), but
//! refused inside `[filesystem]`.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use snapshot_core::FileSystem;

use crate::{Error, PluginRegistry, Result};

/// Where strata keeps its state unless the config says otherwise.
pub const DEFAULT_ROOT: &str = "/var/lib/strata";

/// Where plugins are looked for unless the config says otherwise.
pub const DEFAULT_PLUGINS_DIR: &str = "/usr/lib/strata/plugins";

/// The config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    /// strata's state directory.
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// The directory scanned for plugin `.so` files.
    #[serde(default = "default_plugins_dir")]
    pub plugins_dir: PathBuf,
    /// The backing file system, if layers are to be mounted by a plugin.
    #[serde(default)]
    pub filesystem: Option<FilesystemConfig>,
}

/// The `[filesystem]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesystemConfig {
    /// The name the plugin declares.
    pub plugin: String,
    /// The plugin's options (`[filesystem.options]`), handed to it as JSON.
    #[serde(default)]
    pub options: toml::Table,
}

fn default_root() -> PathBuf {
    PathBuf::from(DEFAULT_ROOT)
}

fn default_plugins_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PLUGINS_DIR)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: default_root(),
            plugins_dir: default_plugins_dir(),
            filesystem: None,
        }
    }
}

impl Config {
    /// Reads and parses the config file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| Error::ConfigParse {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(base) = path.parent() {
            config.root = base.join(&config.root);
            config.plugins_dir = base.join(&config.plugins_dir);
        }
        Ok(config)
    }

    /// Loads the configured plugin and makes its file system, or `None` without `[filesystem]`.
    pub fn filesystem(&self) -> Result<Option<Arc<dyn FileSystem>>> {
        let Some(fs) = &self.filesystem else {
            return Ok(None);
        };
        let options = fs.options_json()?;
        let registry = PluginRegistry::scan(&self.plugins_dir)?;
        registry.load(&fs.plugin, &options).map(Some)
    }
}

impl FilesystemConfig {
    /// The options as the JSON the plugin receives (TOML datetimes become strings).
    pub fn options_json(&self) -> Result<serde_json::Value> {
        table_to_json(&self.options).map_err(|message| Error::Options {
            plugin: self.plugin.clone(),
            message,
        })
    }
}

fn table_to_json(table: &toml::Table) -> std::result::Result<serde_json::Value, String> {
    table
        .iter()
        .map(|(k, v)| Ok((k.clone(), to_json(v).map_err(|e| format!("{k}: {e}"))?)))
        .collect::<std::result::Result<serde_json::Map<_, _>, String>>()
        .map(serde_json::Value::Object)
}

fn to_json(value: &toml::Value) -> std::result::Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match value {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .ok_or_else(|| format!("{f} has no JSON form"))?,
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(items) => J::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| to_json(v).map_err(|e| format!("[{i}]: {e}")))
                .collect::<std::result::Result<_, _>>()?,
        ),
        toml::Value::Table(t) => table_to_json(t)?,
    })
}

impl std::str::FromStr for Config {
    type Err = toml::de::Error;

    /// Parses a config from TOML text (relative paths are kept as they are).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        toml::from_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use snapshot_core::ErrorKind;

    #[test]
    fn an_empty_config_has_the_defaults_and_no_filesystem() {
        let config: Config = "".parse().unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.plugins_dir, Path::new("/usr/lib/strata/plugins"));
        assert!(config.filesystem().unwrap().is_none());
    }

    #[test]
    fn filesystem_options_become_json() {
        let config: Config = r#"
            plugins_dir = "/opt/plugins"
            [filesystem]
            plugin = "http"
            [filesystem.options]
            url = "http://127.0.0.1:5000"
            retries = 3
            ratio = 0.5
            mirrors = ["a", "b"]
            since = 1979-05-27T07:32:00Z
            [filesystem.options.cache]
            dir = "/var/cache"
        "#
        .parse()
        .unwrap();
        let fs = config.filesystem.as_ref().unwrap();
        assert_eq!(fs.plugin, "http");
        assert_eq!(
            fs.options_json().unwrap(),
            json!({
                "url": "http://127.0.0.1:5000",
                "retries": 3,
                "ratio": 0.5,
                "mirrors": ["a", "b"],
                "since": "1979-05-27T07:32:00Z",
                "cache": { "dir": "/var/cache" },
            })
        );
    }

    #[test]
    fn a_nan_option_is_an_invalid_argument() {
        let config: Config = "[filesystem]\nplugin = \"x\"\n[filesystem.options]\nn = nan\n"
            .parse()
            .unwrap();
        let e = config.filesystem.unwrap().options_json().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("n: NaN"), "{e}");
    }

    #[test]
    fn an_unknown_key_in_filesystem_is_refused() {
        let e = "[filesystem]\nplugin = \"x\"\nplugins = 1\n"
            .parse::<Config>()
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `plugins`"), "{e}");
    }

    #[test]
    fn load_resolves_relative_paths_against_the_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("strata.toml");
        std::fs::write(&path, "root = \"state\"\nplugins_dir = \"/abs/plugins\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.root, dir.path().join("state"));
        assert_eq!(config.plugins_dir, Path::new("/abs/plugins"));
    }

    #[test]
    fn load_reports_the_file_on_a_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "root = [").unwrap();
        let e = Config::load(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(
            e.to_string()
                .starts_with(&format!("config {}", path.display())),
            "{e}"
        );
    }

    #[test]
    fn a_configured_plugin_missing_from_the_plugins_dir_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            plugins_dir: dir.path().to_path_buf(),
            filesystem: Some(FilesystemConfig {
                plugin: "local".into(),
                options: toml::Table::new(),
            }),
            ..Config::default()
        };
        let e = config.filesystem().err().unwrap();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("no plugin named \"local\""), "{e}");
    }
}
