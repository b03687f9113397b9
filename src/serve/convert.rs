//! Conversions between containerd's protobuf messages and `snapshot_core` types, and between
//! snapshot errors and gRPC statuses (containerd's `errgrpc`: `ToGRPC` / `ToNative`).

use std::time::SystemTime;

use snapshot_core::{Error, ErrorKind, Info, Kind, Labels, Mount};
use tonic::{Code, Status};

use super::proto::{snapshots as pb, types};

/// The gRPC code containerd uses for an error kind (`errgrpc.ToGRPC`).
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::NotImplemented => Code::Unimplemented,
        ErrorKind::Unknown => Code::Unknown,
    }
}

/// The error kind of a gRPC code (`errgrpc.ToNative`); codes without a kind are Unknown.
#[allow(dead_code)] // for client.rs, which only the tests compile
pub fn kind_of(code: Code) -> ErrorKind {
    match code {
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::InvalidArgument => ErrorKind::InvalidArgument,
        Code::Unavailable => ErrorKind::Unavailable,
        Code::Unimplemented => ErrorKind::NotImplemented,
        _ => ErrorKind::Unknown,
    }
}

/// A snapshot error as the status containerd's proxy client turns back into the same kind.
pub fn status_from_error(e: &Error) -> Status {
    Status::new(code_of(e.kind()), e.to_string())
}

/// A status as a snapshot error of the matching kind. The kind's own suffix (`: not found`),
/// which the server's message carries, is not repeated.
#[allow(dead_code)] // for client.rs, which only the tests compile
pub fn error_from_status(what: &str, s: &Status) -> Error {
    let kind = kind_of(s.code());
    let msg = s.message();
    if kind == ErrorKind::Unknown {
        let detail = if msg.is_empty() {
            s.code().description()
        } else {
            msg
        };
        return Error::io(what, std::io::Error::other(detail.to_owned()));
    }
    let msg = msg.strip_suffix(&format!(": {kind}")).unwrap_or(msg);
    Error::from_kind(kind, msg)
}

/// Proto labels (a map) as snapshot labels.
pub fn labels_from_proto(labels: std::collections::HashMap<String, String>) -> Labels {
    labels.into_iter().collect()
}

/// Snapshot labels as a proto map.
pub fn labels_to_proto(labels: &Labels) -> std::collections::HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The proto enum value of a kind (same numbers: UNKNOWN=0, VIEW=1, ACTIVE=2, COMMITTED=3).
pub fn kind_to_proto(kind: Kind) -> i32 {
    i32::from(kind.as_u8())
}

/// A proto enum value as a kind; out-of-range values are Unknown.
pub fn kind_from_proto(v: i32) -> Kind {
    u8::try_from(v).map_or(Kind::Unknown, Kind::from_u8)
}

fn time_from_proto(t: Option<prost_types::Timestamp>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// An `Info` as its proto message.
pub fn info_to_proto(info: &Info) -> pb::Info {
    pb::Info {
        name: info.name.clone(),
        parent: info.parent.clone(),
        kind: kind_to_proto(info.kind),
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: labels_to_proto(&info.labels),
    }
}

/// A proto `Info` as an `Info` (missing times are the Unix epoch).
pub fn info_from_proto(info: pb::Info) -> Info {
    Info {
        name: info.name,
        parent: info.parent,
        kind: kind_from_proto(info.kind),
        created: time_from_proto(info.created_at),
        updated: time_from_proto(info.updated_at),
        labels: labels_from_proto(info.labels),
    }
}

/// A mount as its proto message. Like containerd's snapshot services, `target` is never set.
pub fn mount_to_proto(m: &Mount) -> types::Mount {
    types::Mount {
        r#type: m.kind.clone(),
        source: m.source.clone(),
        target: String::new(),
        options: m.options.clone(),
    }
}

/// A proto mount as a mount (`target` is ignored, as by containerd's snapshot services).
#[allow(dead_code)] // for client.rs, which only the tests compile
pub fn mount_from_proto(m: types::Mount) -> Mount {
    Mount {
        kind: m.r#type,
        source: m.source,
        options: m.options,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_its_code_and_back() {
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::FailedPrecondition,
            ErrorKind::InvalidArgument,
            ErrorKind::Unavailable,
            ErrorKind::NotImplemented,
            ErrorKind::Unknown,
        ] {
            assert_eq!(kind_of(code_of(kind)), kind, "{kind}");
            let e = Error::from_kind(kind, "snapshot x");
            let back = error_from_status("stat", &status_from_error(&e));
            assert_eq!(back.kind(), kind);
        }
        assert_eq!(kind_of(Code::DeadlineExceeded), ErrorKind::Unknown);
    }

    #[test]
    fn kind_suffix_is_not_repeated() {
        let e = Error::NotFound("snapshot x".into());
        let back = error_from_status("stat", &status_from_error(&e));
        assert_eq!(back.to_string(), "snapshot x: not found");
    }

    #[test]
    fn info_round_trips_with_nanoseconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
        let info = Info {
            name: "ns/1/a".into(),
            parent: "ns/0/b".into(),
            kind: Kind::Committed,
            labels: Labels::from([("k".to_owned(), "v".to_owned())]),
            created: t,
            updated: t + std::time::Duration::from_nanos(1),
        };
        assert_eq!(info_from_proto(info_to_proto(&info)), info);
        assert_eq!(kind_from_proto(7), Kind::Unknown);
        assert_eq!(kind_from_proto(-1), Kind::Unknown);
    }
}
