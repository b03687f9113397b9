//! Mount lists for overlay snapshots (SEMANTICS.md §3.4) and the options decided at start-up.

use std::path::Path;

use snapshot_core::{Kind, Mount};

/// True when this process runs in a user namespace that does not map the full ID range
/// (rootless): overlay then needs `userxattr` and cannot write `trusted.` whiteout xattrs.
pub fn running_in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

/// Whether overlay mounts need `userxattr`: only in a user namespace, and there only from Linux
/// 5.11 on (where unprivileged overlay exists and requires it).
pub fn needs_userxattr() -> bool {
    if !running_in_user_namespace() {
        return false;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut nums = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    (major, minor) >= (5, 11)
}

/// Overlay options added to every overlay mount: the configured ones, then `userxattr` when
/// needed, then `index=off` when the kernel has the `index` feature and nothing chose otherwise.
pub(crate) fn extra_overlay_options(configured: &[String]) -> Vec<String> {
    let mut out = configured.to_vec();
    if !out.iter().any(|o| o == "userxattr") && needs_userxattr() {
        out.push("userxattr".into());
    }
    let index_set = out.iter().any(|o| o == "index" || o.starts_with("index="));
    if !index_set && Path::new("/sys/module/overlay/parameters/index").exists() {
        out.push("index=off".into());
    }
    out
}

/// The mounts of a snapshot: `dir(id)` is a snapshot's directory, `parent_ids` nearest first.
/// Options come in containerd 1.6's order (extra options before workdir/upperdir/lowerdir).
pub(crate) fn snapshot_mounts(
    kind: Kind,
    id: &str,
    parent_ids: &[String],
    extra: &[String],
    fs_dir: impl Fn(&str) -> String,
    work_dir: impl Fn(&str) -> String,
) -> Vec<Mount> {
    let ro = kind == Kind::View;
    let bind = |source: String| Mount {
        kind: "bind".into(),
        source,
        options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
    };
    if parent_ids.is_empty() {
        return vec![bind(fs_dir(id))];
    }
    if ro && parent_ids.len() == 1 {
        return vec![bind(fs_dir(&parent_ids[0]))];
    }
    let lower: Vec<String> = parent_ids.iter().map(|p| fs_dir(p)).collect();
    let mut options = extra.to_vec();
    if !ro {
        options.push(format!("workdir={}", work_dir(id)));
        options.push(format!("upperdir={}", fs_dir(id)));
    }
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts(kind: Kind, parents: &[&str]) -> Vec<Mount> {
        let parents: Vec<String> = parents.iter().map(|s| s.to_string()).collect();
        snapshot_mounts(
            kind,
            "9",
            &parents,
            &["index=off".to_string()],
            |id| format!("/r/snapshots/{id}/fs"),
            |id| format!("/r/snapshots/{id}/work"),
        )
    }

    #[test]
    fn active_without_parent_is_rw_bind_of_own_fs() {
        let m = mounts(Kind::Active, &[]);
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/9/fs")
        );
        assert_eq!(m[0].options, ["rw", "rbind"]);
    }

    #[test]
    fn view_of_one_layer_is_ro_bind_of_the_parent() {
        let m = mounts(Kind::View, &["3"]);
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/3/fs")
        );
        assert_eq!(m[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn view_of_several_layers_is_lowerdir_only_overlay() {
        let m = mounts(Kind::View, &["3", "2"]);
        assert_eq!(m[0].kind, "overlay");
        assert_eq!(
            m[0].options,
            ["index=off", "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"]
        );
    }

    #[test]
    fn active_with_parents_is_overlay_in_containerd_order() {
        let m = mounts(Kind::Active, &["3", "2"]);
        assert_eq!(
            m[0].options,
            [
                "index=off",
                "workdir=/r/snapshots/9/work",
                "upperdir=/r/snapshots/9/fs",
                "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"
            ]
        );
    }

    #[test]
    fn configured_index_option_is_not_overridden() {
        let out = extra_overlay_options(&["index=on".to_string()]);
        assert!(!out.iter().any(|o| o == "index=off"), "{out:?}");
    }
}
