//! The plugin's options (`[filesystem.options]`) and their validation.

use std::{path::PathBuf, time::Duration};

use fs_plugin_api::model::{Error, Result};
use rootfs::{estargz::IndexOptions, registry::RegistryOptions};
use serde::Deserialize;

/// Default chunk cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/strata/http";
/// Default bound on the chunk cache: 10 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 10 << 30;
/// Default prefetch of a layer without landmark: its first 10 MiB.
pub const DEFAULT_PREFETCH_BYTES: u64 = 10 << 20;
/// Default check interval: stargz's blob `valid_interval`.
pub const DEFAULT_CHECK_INTERVAL_SECS: u64 = 60;
/// Default bound on a Check's wait for the prefetch: stargz's `prefetch_timeout_sec`.
pub const DEFAULT_PREFETCH_TIMEOUT_SECS: u64 = 10;
/// Default bound on resolving a layer at mount time.
pub const DEFAULT_RESOLVE_TIMEOUT_SECS: u64 = 30;

/// The plugin's options, as given in the config. Every field has a default; unknown fields are
/// refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// The registry client's options (`[filesystem.options.registry]`): `hosts` (with
    /// `plain_http`, `mirrors`, `insecure_skip_verify`), `docker_config`, `max_in_flight`,
    /// `timeout_secs`, `retries`, `spool_dir`.
    pub registry: RegistryOptions,
    /// Where fetched chunks and TOCs are kept (`chunks/`, `toc/`).
    pub cache_dir: PathBuf,
    /// Bound on the bytes of chunks kept; least recently used chunks are evicted beyond it.
    pub cache_max_bytes: u64,
    /// Bytes fetched at mount time from a layer without landmark (label
    /// `containerd.io/snapshot/remote/stargz.prefetch` overrides it per layer); 0: none.
    pub prefetch_bytes: u64,
    /// After the prefetch, fetch the rest of the layer at low priority so it ends up local.
    pub background_fetch: bool,
    /// Mount layers whose TOC digest is not given when they carry the skipverify label.
    pub allow_no_verification: bool,
    /// Bound on resolving a layer at mount time (registry probe, footer and TOC), in seconds.
    pub resolve_timeout_secs: u64,
    /// Xattrs set to `y` on opaque directories.
    pub opaque_xattrs: Vec<String>,
    /// Seconds during which an answer of the registry for a layer's blob (opening it, a
    /// fetch, a Check) stands for a passed Check; 0: every Check asks the registry.
    pub check_interval_secs: u64,
    /// Seconds a Check waits for the mount-time prefetch to end (so that what it brings is
    /// local when the container starts); 0: Check does not wait.
    pub prefetch_timeout_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            registry: RegistryOptions::default(),
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            prefetch_bytes: DEFAULT_PREFETCH_BYTES,
            background_fetch: true,
            allow_no_verification: false,
            resolve_timeout_secs: DEFAULT_RESOLVE_TIMEOUT_SECS,
            opaque_xattrs: vec!["trusted.overlay.opaque".into()],
            check_interval_secs: DEFAULT_CHECK_INTERVAL_SECS,
            prefetch_timeout_secs: DEFAULT_PREFETCH_TIMEOUT_SECS,
        }
    }
}

impl Options {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Error::InvalidArgument(format!("http options: {msg}"));
        if !self.cache_dir.is_absolute() {
            return Err(invalid(format!(
                "cache_dir {:?}: must be an absolute path",
                self.cache_dir
            )));
        }
        if self.cache_max_bytes < 1 << 20 {
            return Err(invalid(format!(
                "cache_max_bytes {}: must be at least 1 MiB",
                self.cache_max_bytes
            )));
        }
        if !(1..=3600).contains(&self.resolve_timeout_secs) {
            return Err(invalid(format!(
                "resolve_timeout_secs {}: must be between 1 and 3600",
                self.resolve_timeout_secs
            )));
        }
        if self.prefetch_timeout_secs > 3600 {
            return Err(invalid(format!(
                "prefetch_timeout_secs {}: must be at most 3600",
                self.prefetch_timeout_secs
            )));
        }
        if self.check_interval_secs > 86_400 {
            return Err(invalid(format!(
                "check_interval_secs {}: must be at most 86400 (a day)",
                self.check_interval_secs
            )));
        }
        if self.registry.max_in_flight == 0 {
            return Err(invalid("registry.max_in_flight: must be at least 1".into()));
        }
        if self.registry.timeout_secs == 0 {
            return Err(invalid("registry.timeout_secs: must be at least 1".into()));
        }
        for x in &self.opaque_xattrs {
            if !(x.starts_with("trusted.") || x.starts_with("user.")) || x.contains('\0') {
                return Err(invalid(format!(
                    "opaque_xattrs: {x:?} is not a trusted.* or user.* attribute name"
                )));
            }
        }
        Ok(())
    }

    /// How layer trees are built.
    pub fn index_options(&self) -> IndexOptions {
        IndexOptions {
            opaque_xattrs: self.opaque_xattrs.clone(),
        }
    }

    /// How long a Check waits for the mount-time prefetch.
    pub fn prefetch_timeout(&self) -> Duration {
        Duration::from_secs(self.prefetch_timeout_secs)
    }

    /// How long an answer of the registry stands for a passed Check.
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs(self.check_interval_secs)
    }

    /// The bound on resolving a layer.
    pub fn resolve_timeout(&self) -> Duration {
        Duration::from_secs(self.resolve_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fs_plugin_api::model::ErrorKind;

    fn parse(json: serde_json::Value) -> std::result::Result<Options, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn empty_options_take_the_documented_defaults() {
        let o = parse(serde_json::json!({})).unwrap();
        o.validate().unwrap();
        assert_eq!(o.cache_dir, PathBuf::from("/var/cache/strata/http"));
        assert_eq!(o.cache_max_bytes, 10 << 30);
        assert_eq!(o.prefetch_bytes, 10 << 20);
        assert!(o.background_fetch);
        assert!(!o.allow_no_verification);
        assert_eq!(o.resolve_timeout(), Duration::from_secs(30));
        assert_eq!(o.check_interval(), Duration::from_secs(60));
        assert_eq!(o.prefetch_timeout(), Duration::from_secs(10));
        assert_eq!(o.opaque_xattrs, ["trusted.overlay.opaque"]);
        assert_eq!(o.registry, RegistryOptions::default());
    }

    #[test]
    fn registry_options_nest_under_registry() {
        let o = parse(serde_json::json!({
            "registry": {
                "hosts": {"127.0.0.1:5000": {"plain_http": true, "mirrors": ["127.0.0.1:5001"]}},
                "max_in_flight": 2, "retries": 1, "timeout_secs": 5
            },
            "cache_dir": "/tmp/c", "prefetch_bytes": 0, "background_fetch": false
        }))
        .unwrap();
        o.validate().unwrap();
        let host = &o.registry.hosts["127.0.0.1:5000"];
        assert!(host.plain_http);
        assert_eq!(host.mirrors, ["127.0.0.1:5001"]);
        assert_eq!(o.registry.max_in_flight, 2);
        assert!(!o.background_fetch);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = parse(serde_json::json!({"cache_size": 1})).unwrap_err();
        assert!(e.to_string().contains("cache_size"), "{e}");
    }

    #[test]
    fn bad_values_are_invalid_arguments_naming_the_option() {
        for (json, says) in [
            (serde_json::json!({"cache_dir": "relative"}), "cache_dir"),
            (
                serde_json::json!({"cache_max_bytes": 10}),
                "cache_max_bytes",
            ),
            (
                serde_json::json!({"resolve_timeout_secs": 0}),
                "resolve_timeout_secs",
            ),
            (
                serde_json::json!({"prefetch_timeout_secs": 7200}),
                "prefetch_timeout_secs",
            ),
            (
                serde_json::json!({"check_interval_secs": 100_000}),
                "check_interval_secs",
            ),
            (
                serde_json::json!({"registry": {"max_in_flight": 0}}),
                "max_in_flight",
            ),
            (
                serde_json::json!({"opaque_xattrs": ["security.x"]}),
                "opaque_xattrs",
            ),
        ] {
            let e = parse(json.clone()).unwrap().validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{json}: {e}");
            assert!(e.to_string().contains(says), "{json}: {e}");
        }
    }
}
