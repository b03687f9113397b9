//! TEST FIXTURE, not a real plugin: every call fails, so tests can see errors cross the ABI
//! with their kinds.
//!
//! - options `{ "fail_new_with": "<kind>" }` make the constructor fail with that kind;
//! - `mount` fails with the kind named by the [`FAIL_KIND_LABEL`] label;
//! - `check` fails with `unavailable`, `unmount` with `failed-precondition`.
//!
//! Kinds are written `not-found`, `already-exists`, `failed-precondition`, `invalid-argument`,
//! `unavailable`, `not-implemented`, `unknown`.

use std::path::Path;

use fs_plugin_api::{
    Plugin,
    model::{Error, ErrorKind, Labels, Result},
};
use serde::Deserialize;

fs_plugin_api::export_plugin!(
    name = "failing",
    version = env!("CARGO_PKG_VERSION"),
    constructor = Failing::new,
);

/// The label naming the kind `mount` fails with.
pub const FAIL_KIND_LABEL: &str = "strata.test/fail-kind";

/// The fixture's options.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Make the constructor fail with this kind.
    #[serde(default)]
    pub fail_new_with: Option<String>,
}

/// A file system whose every call fails.
pub struct Failing;

impl Failing {
    /// Succeeds unless the options ask for a failure.
    pub fn new(options: Options) -> Result<Self> {
        match options.fail_new_with {
            Some(kind) => Err(Error::from_kind(
                parse_kind(&kind)?,
                "failing plugin: the constructor fails on purpose",
            )),
            None => Ok(Failing),
        }
    }
}

fn parse_kind(name: &str) -> Result<ErrorKind> {
    Ok(match name {
        "not-found" => ErrorKind::NotFound,
        "already-exists" => ErrorKind::AlreadyExists,
        "failed-precondition" => ErrorKind::FailedPrecondition,
        "invalid-argument" => ErrorKind::InvalidArgument,
        "unavailable" => ErrorKind::Unavailable,
        "not-implemented" => ErrorKind::NotImplemented,
        "unknown" => ErrorKind::Unknown,
        other => {
            return Err(Error::InvalidArgument(format!(
                "failing plugin: no error kind {other:?}"
            )));
        }
    })
}

impl Plugin for Failing {
    fn mount(&self, _mountpoint: &Path, labels: &Labels) -> Result<()> {
        let kind = labels.get(FAIL_KIND_LABEL).ok_or_else(|| {
            Error::InvalidArgument(format!("failing plugin: no {FAIL_KIND_LABEL} label"))
        })?;
        Err(Error::from_kind(
            parse_kind(kind)?,
            format!("failing plugin: mount fails on purpose with {kind}"),
        ))
    }

    fn check(&self, _mountpoint: &Path, _labels: &Labels) -> Result<()> {
        Err(Error::Unavailable(
            "failing plugin: the backend is unreachable on purpose".into(),
        ))
    }

    fn unmount(&self, _mountpoint: &Path) -> Result<()> {
        Err(Error::FailedPrecondition(
            "failing plugin: unmount fails on purpose".into(),
        ))
    }
}
