//! The plugin's options (`[filesystem.options]`) and their validation.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    time::Duration,
};

use fs_plugin_api::model::{Error, Result};
use serde::Deserialize;

/// The only store layout: `<export>/<algorithm>/<hex>/` per layer, as `strata export` writes.
pub const LAYOUT_SHA256_DIRS: &str = "sha256-dirs";

/// The plugin's options, as given in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The NFS server: an IP address or a host name.
    pub server: String,
    /// The exported path of the layer store on the server (what an NFSv3 MOUNT asks for).
    pub export: String,
    /// The server's MOUNT service port (rpcbind is not consulted).
    pub mount_port: u16,
    /// The server's NFS service port (rpcbind is not consulted).
    pub nfs_port: u16,
    /// The store layout; only [`LAYOUT_SHA256_DIRS`] (the default).
    #[serde(default = "default_layout")]
    pub store_layout: String,
    /// The NFS protocol version; only 3 (the default).
    #[serde(default = "default_version")]
    pub nfs_version: u32,
    /// Upper bound on every NFS call, connecting included, in milliseconds (default 5000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_layout() -> String {
    LAYOUT_SHA256_DIRS.to_owned()
}

fn default_version() -> u32 {
    3
}

fn default_timeout_ms() -> u64 {
    5000
}

/// Validated options.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server as written in the options (for messages).
    pub server_name: String,
    /// The server's address for the MOUNT service.
    pub mount_addr: SocketAddr,
    /// The server's address for the NFS service.
    pub nfs_addr: SocketAddr,
    /// The exported path.
    pub export: String,
    /// Upper bound on every NFS call.
    pub timeout: Duration,
}

impl Settings {
    /// Checks `options`, resolving the server's address.
    pub fn new(options: Options) -> Result<Self> {
        let invalid = |msg: String| Error::InvalidArgument(format!("nfs options: {msg}"));
        if options.server.trim().is_empty() {
            return Err(invalid("server: must name the NFS server".into()));
        }
        if !options.export.starts_with('/')
            || options.export.contains('\0')
            || options.export.split('/').any(|c| c == "..")
        {
            return Err(invalid(format!(
                "export {:?}: must be an absolute path on the server, without `..`",
                options.export
            )));
        }
        for (name, port) in [
            ("mount_port", options.mount_port),
            ("nfs_port", options.nfs_port),
        ] {
            if port == 0 {
                return Err(invalid(format!("{name}: must be a port number (1-65535)")));
            }
        }
        if options.store_layout != LAYOUT_SHA256_DIRS {
            return Err(invalid(format!(
                "store_layout {:?}: unknown (supported: {LAYOUT_SHA256_DIRS:?})",
                options.store_layout
            )));
        }
        if options.nfs_version != 3 {
            return Err(invalid(format!(
                "nfs_version {}: unsupported (this plugin speaks NFSv3 in user space)",
                options.nfs_version
            )));
        }
        if !(100..=600_000).contains(&options.timeout_ms) {
            return Err(invalid(format!(
                "timeout_ms {}: must be between 100 and 600000",
                options.timeout_ms
            )));
        }
        let resolve = |port: u16| -> Result<SocketAddr> {
            (options.server.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| invalid(format!("server {:?}: {e}", options.server)))?
                .next()
                .ok_or_else(|| invalid(format!("server {:?}: no address", options.server)))
        };
        Ok(Settings {
            mount_addr: resolve(options.mount_port)?,
            nfs_addr: resolve(options.nfs_port)?,
            server_name: options.server,
            export: options.export,
            timeout: Duration::from_millis(options.timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fs_plugin_api::model::ErrorKind;

    fn options(json: serde_json::Value) -> std::result::Result<Options, serde_json::Error> {
        serde_json::from_value(json)
    }

    fn valid() -> serde_json::Value {
        serde_json::json!({
            "server": "127.0.0.1", "export": "/export", "mount_port": 20048, "nfs_port": 2049
        })
    }

    #[test]
    fn defaults_are_sha256_dirs_nfsv3_and_five_seconds() {
        let s = Settings::new(options(valid()).unwrap()).unwrap();
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert_eq!(s.nfs_addr, "127.0.0.1:2049".parse().unwrap());
        assert_eq!(s.mount_addr, "127.0.0.1:20048".parse().unwrap());
    }

    #[test]
    fn unknown_fields_and_missing_ports_are_rejected_by_the_parser() {
        let mut v = valid();
        v["bogus"] = 1.into();
        assert!(options(v).unwrap_err().to_string().contains("bogus"));
        let mut v = valid();
        v.as_object_mut().unwrap().remove("nfs_port");
        assert!(options(v).unwrap_err().to_string().contains("nfs_port"));
    }

    #[test]
    fn each_bad_option_is_an_invalid_argument_naming_it() {
        for (key, value, says) in [
            ("server", serde_json::json!(""), "server"),
            ("export", serde_json::json!("export"), "export"),
            ("export", serde_json::json!("/a/../b"), "export"),
            ("mount_port", serde_json::json!(0), "mount_port"),
            ("store_layout", serde_json::json!("flat"), "store_layout"),
            ("nfs_version", serde_json::json!(4), "nfs_version"),
            ("timeout_ms", serde_json::json!(5), "timeout_ms"),
            (
                "server",
                serde_json::json!("no-such-host.invalid"),
                "server",
            ),
        ] {
            let mut v = valid();
            v[key] = value;
            let e = Settings::new(options(v).unwrap()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{key}: {e}");
            assert!(e.to_string().contains(says), "{key}: {e}");
        }
    }
}
