//! The data types of containerd's snapshot model: kinds, infos, usage, mounts and labels.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Snapshot labels: key -> value. Empty values are never stored.
pub type Labels = BTreeMap<String, String>;

/// Upper bound on `len(key) + len(value)` of one label (containerd's metadata limit).
pub const MAX_LABEL_SIZE: usize = 4096;

/// Label naming the chain ID a remote snapshotter should make available (`Prepare` target).
pub const LABEL_TARGET_REF: &str = "containerd.io/snapshot.ref";
/// Label marking a snapshot whose content is mounted by a backing file system.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
/// Label naming the layer (blob) digest a backing file system should mount (strata's own; the
/// key of a layer store).
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/remote/strata.layer-digest";
/// Label naming the image a remote layer belongs to (`registry/repository[:tag|@digest]`), for
/// backing file systems that fetch layers from a registry (strata's own form of stargz's
/// `containerd.io/snapshot/remote/stargz.reference`).
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/remote/strata.image-ref";
/// Label synthesised by the overlay snapshotter with a snapshot's upper directory.
pub const LABEL_OVERLAY_UPPERDIR: &str = "containerd.io/snapshot/overlay.upperdir";

/// Checks every label against containerd's size limit; InvalidArgument on the first offender.
pub fn validate_labels(labels: &Labels) -> Result<()> {
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL_SIZE {
            let shown: String = k.chars().take(10).collect();
            return Err(Error::InvalidArgument(format!(
                "label key and value length ({} bytes) greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {shown}",
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

/// Whether a label is forwarded from containerd's metadata layer to a snapshotter backend.
pub fn is_inherited_label(key: &str) -> bool {
    key == LABEL_TARGET_REF || key.starts_with("containerd.io/snapshot/")
}

/// The kind of a snapshot.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub enum Kind {
    /// Not a valid kind (what an unknown string parses to).
    #[default]
    Unknown,
    /// Read-only snapshot of a parent.
    View,
    /// Writable snapshot that can be committed.
    Active,
    /// Immutable snapshot that can be a parent.
    Committed,
}

impl Kind {
    /// Lower-case name used by walk filters (`kind==active`); `None` for Unknown.
    pub fn filter_name(self) -> Option<&'static str> {
        match self {
            Kind::Unknown => None,
            Kind::View => Some("view"),
            Kind::Active => Some("active"),
            Kind::Committed => Some("committed"),
        }
    }

    /// The numeric value containerd uses (proto enum and bolt byte).
    pub fn as_u8(self) -> u8 {
        match self {
            Kind::Unknown => 0,
            Kind::View => 1,
            Kind::Active => 2,
            Kind::Committed => 3,
        }
    }

    /// Inverse of [`Kind::as_u8`]; unknown values map to `Unknown`.
    pub fn from_u8(v: u8) -> Kind {
        match v {
            1 => Kind::View,
            2 => Kind::Active,
            3 => Kind::Committed,
            _ => Kind::Unknown,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Unknown => "Unknown",
            Kind::View => "View",
            Kind::Active => "Active",
            Kind::Committed => "Committed",
        })
    }
}

impl FromStr for Kind {
    type Err = std::convert::Infallible;
    /// Case-insensitive; anything unrecognised is `Unknown` (containerd never fails here).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "view" => Kind::View,
            "active" => Kind::Active,
            "committed" => Kind::Committed,
            _ => Kind::Unknown,
        })
    }
}

/// What is known about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The key (active/view) or name (committed).
    pub name: String,
    /// The parent's name; empty when there is none.
    pub parent: String,
    /// The kind.
    pub kind: Kind,
    /// Labels.
    pub labels: Labels,
    /// Creation time (UTC, nanosecond precision).
    pub created: SystemTime,
    /// Last update time; equal to `created` at creation and commit.
    pub updated: SystemTime,
}

impl Info {
    /// An info with only a name (for [`crate::Snapshotter::update`]).
    pub fn named(name: impl Into<String>) -> Info {
        Info {
            name: name.into(),
            parent: String::new(),
            kind: Kind::Unknown,
            labels: Labels::new(),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        }
    }
}

/// Resources used by one snapshot alone (never its parents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Allocated bytes (sum of `st_blocks * 512` over distinct inodes).
    pub size: i64,
    /// Distinct inodes.
    pub inodes: i64,
}

impl Usage {
    /// Sums both fields (an upper bound when inodes are shared).
    pub fn add(&mut self, other: Usage) {
        self.size += other.size;
        self.inodes += other.inodes;
    }
}

/// One mount a caller performs to see a snapshot: `mount -t <kind> <source> -o <options>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Filesystem type: `bind`, `overlay`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Source path or device.
    pub source: String,
    /// Mount options, in order.
    pub options: Vec<String>,
}

impl Mount {
    /// The value of the first `name=value` option, if present.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
    }

    /// True for a bind mount that carries `ro`.
    pub fn is_readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Options of [`crate::Snapshotter::commit`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitOpts {
    /// Labels of the committed snapshot (the active's labels are not inherited).
    pub labels: Labels,
    /// Parent to adopt when the active snapshot was prepared without one ("rebase").
    pub parent: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_size_limit_is_inclusive() {
        let mut l = Labels::new();
        l.insert("k".into(), "v".repeat(MAX_LABEL_SIZE - 1));
        assert!(validate_labels(&l).is_ok());
        l.insert("k".into(), "v".repeat(MAX_LABEL_SIZE));
        let err = validate_labels(&l).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
    }

    #[test]
    fn kind_parses_case_insensitively_and_unknown_never_fails() {
        assert_eq!("ACTIVE".parse::<Kind>(), Ok(Kind::Active));
        assert_eq!("bogus".parse::<Kind>(), Ok(Kind::Unknown));
        assert_eq!(Kind::from_u8(Kind::Committed.as_u8()), Kind::Committed);
    }

    #[test]
    fn inherited_labels() {
        assert!(is_inherited_label("containerd.io/snapshot.ref"));
        assert!(is_inherited_label("containerd.io/snapshot/remote"));
        assert!(!is_inherited_label("containerd.io/gc.root"));
    }

    #[test]
    fn mount_option_lookup() {
        let m = Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec!["workdir=/w".into(), "upperdir=/u".into()],
        };
        assert_eq!(m.option("upperdir"), Some("/u"));
        assert_eq!(m.option("upper"), None);
    }
}
