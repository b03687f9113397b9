//! strata's checks beyond containerd's suite: the label size limit (SEMANTICS.md §1.6), commit
//! with a parent ("rebase", HEAD), opaque keys and usage (§1.3, §3.5).

use std::io::Write;

use super::fstest::create_file;
use super::harness::{Ctx, apply_flat, commit_opts, fails, labels, ok};
use crate::{CommitOpts, ErrorKind, Kind, MAX_LABEL_SIZE};

/// A label of `len(key) + len(value) > 4096` is InvalidArgument on prepare, view, commit and
/// update, and nothing changes; exactly 4096 is accepted.
pub fn label_size_limit(ctx: &Ctx) {
    let sn = ctx.sn;
    let sized = |total: usize| labels(&[("big", &"v".repeat(total - "big".len()))]);
    let (over, exact) = (sized(MAX_LABEL_SIZE + 1), sized(MAX_LABEL_SIZE));
    fails(
        "prepare with a 4097-byte label",
        ErrorKind::InvalidArgument,
        sn.prepare("k", "", &over),
    );
    fails(
        "view with a 4097-byte label",
        ErrorKind::InvalidArgument,
        sn.view("k", "", &over),
    );
    fails(
        "stat after the rejected prepare",
        ErrorKind::NotFound,
        sn.stat("k"),
    );
    ok(
        "prepare with a 4096-byte label",
        sn.prepare("k", "", &exact),
    );
    assert_eq!(
        ok("stat k", sn.stat("k")).labels,
        exact,
        "expected the 4096-byte label stored"
    );
    let opts = CommitOpts {
        labels: over.clone(),
        parent: None,
    };
    fails(
        "commit with a 4097-byte label",
        ErrorKind::InvalidArgument,
        sn.commit("c", "k", &opts),
    );
    ctx.expect_stat("k", Kind::Active, "");
    ok(
        "commit with a 4096-byte label",
        sn.commit(
            "c",
            "k",
            &CommitOpts {
                labels: exact.clone(),
                parent: None,
            },
        ),
    );
    let mut info = ok("stat c", sn.stat("c"));
    info.labels = over;
    fails(
        "update with a 4097-byte label",
        ErrorKind::InvalidArgument,
        sn.update(&info, &[]),
    );
    let r = sn.update(&info, &["labels.big"]);
    fails(
        "update labels.big with a 4097-byte label",
        ErrorKind::InvalidArgument,
        r,
    );
    assert_eq!(
        ok("stat c", sn.stat("c")).labels,
        exact,
        "expected rejected updates to write nothing"
    );
}

/// Rebase (only when the snapshotter advertises `rebase`): a parentless active adopts the
/// commit's parent; a different parent is InvalidArgument, the same one is fine, a missing one
/// NotFound and an active one FailedPrecondition.
pub fn commit_rebase(ctx: &Ctx) {
    let sn = ctx.sn;
    if !sn.capabilities().iter().any(|c| c == "rebase") {
        // Without the capability a commit's parent must not rebase anything (containerd 1.6
        // ignores it): either the commit fails or the snapshot keeps its prepared parent.
        ok(
            "prepare a parentless active",
            sn.prepare("p-a", "", &labels(&[])),
        );
        ctx.commit("P", "p-a");
        ok(
            "prepare another parentless active",
            sn.prepare("orphan", "", &labels(&[])),
        );
        let opts = CommitOpts {
            labels: labels(&[]),
            parent: Some("P".to_owned()),
        };
        if sn.commit("rebased", "orphan", &opts).is_ok() {
            ctx.expect_stat("rebased", Kind::Committed, "");
        }
        return;
    }
    let with_parent = |p: &str| CommitOpts {
        labels: labels(&[]),
        parent: Some(p.to_owned()),
    };
    let (p_file, c_file) = (
        create_file("/p-file", "from P\n", 0o644),
        create_file("/c-file", "child\n", 0o644),
    );
    let mounted = ctx.prepare_mounted("p-a", "");
    ctx.apply_mounted(&mounted.path, std::slice::from_ref(&p_file));
    mounted.unmount();
    ctx.commit("P", "p-a");
    let mounted = ctx.prepare_mounted("orphan", "");
    ctx.apply_mounted(&mounted.path, std::slice::from_ref(&c_file));
    mounted.unmount();
    ok(
        "commit a parentless active with parent P",
        sn.commit("rebased", "orphan", &with_parent("P")),
    );
    ctx.expect_stat("rebased", Kind::Committed, "P");
    let flat = ctx.fresh_dir("flat");
    apply_flat(&flat, &[p_file, c_file]);
    ctx.check_view("rebased", &flat, "view of the rebased snapshot");

    ctx.committed("Q", "");
    ok("prepare on P", sn.prepare("on-p", "P", &labels(&[])));
    fails(
        "commit with a different parent",
        ErrorKind::InvalidArgument,
        sn.commit("x", "on-p", &with_parent("Q")),
    );
    ctx.expect_stat("on-p", Kind::Active, "P");
    ok(
        "commit with the same parent",
        sn.commit("x", "on-p", &with_parent("P")),
    );
    ctx.expect_stat("x", Kind::Committed, "P");

    ok(
        "prepare a parentless active",
        sn.prepare("loose", "", &labels(&[])),
    );
    ok(
        "prepare an active to use as parent",
        sn.prepare("act", "", &labels(&[])),
    );
    fails(
        "commit with a missing parent",
        ErrorKind::NotFound,
        sn.commit("y", "loose", &with_parent("missing")),
    );
    let r = sn.commit("y", "loose", &with_parent("act"));
    fails(
        "commit with an active as parent",
        ErrorKind::FailedPrecondition,
        r,
    );
    ctx.expect_stat("loose", Kind::Active, "");
}

/// Go-quotes `s` for a filter value.
fn quote(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\t', "\\t");
    format!("\"{escaped}\"")
}

/// Keys and names are opaque strings: slashes, dots, colons, spaces and non-ASCII work.
pub fn keys_with_slashes(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    let keys = [
        "a/b",
        "a/b/c",
        "/abs//double/slash/",
        "../../escape",
        ".",
        "..",
        "ns/12/sha256:0123abcd",
        "with space\tand tab",
        "ünïcødé/ключ",
    ];
    for key in keys {
        let prepared = ok(&format!("prepare {key:?}"), sn.prepare(key, "", &l));
        assert_eq!(
            ok("stat", sn.stat(key)).name,
            key,
            "expected stat to report {key:?}"
        );
        assert_eq!(
            ok("mounts", sn.mounts(key)),
            prepared,
            "expected mounts of {key:?} == prepare's"
        );
        let mut names = Vec::new();
        let filter = format!("name=={}", quote(key));
        ok(
            &format!("walk {filter}"),
            sn.walk(&[&filter], &mut |i| {
                names.push(i.name.clone());
                Ok(())
            }),
        );
        assert_eq!(
            names,
            [key],
            "expected walk {filter} to find exactly {key:?}"
        );
    }
    for key in keys {
        let (name, view) = (format!("committed/{key}"), format!("view/{key}"));
        ok(
            &format!("commit {key:?}"),
            sn.commit(&name, key, &commit_opts()),
        );
        ok(&format!("view {view:?}"), sn.view(&view, &name, &l));
        ctx.expect_stat(&view, Kind::View, &name);
    }
    for key in keys {
        let (name, view) = (format!("committed/{key}"), format!("view/{key}"));
        ok(&format!("remove {view:?}"), sn.remove(&view));
        ok(&format!("remove {name:?}"), sn.remove(&name));
        fails(
            &format!("stat removed {name:?}"),
            ErrorKind::NotFound,
            sn.stat(&name),
        );
    }
}

/// Usage: an active grows when written (hard links counted once); a committed reports what
/// the active used at commit, > 0 bytes and >= 2 inodes; missing is NotFound.
pub fn usage(ctx: &Ctx) {
    let sn = ctx.sn;
    fails(
        "usage of a missing key",
        ErrorKind::NotFound,
        sn.usage("missing"),
    );
    let key = ctx.key("active");
    let mounted = ctx.prepare_mounted(&key, "");
    let before = ok("usage of the empty active", sn.usage(&key));
    let data = mounted.path.join("data");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&data)?;
        f.write_all(&vec![0x5a; 256 * 1024])?;
        f.sync_all()?;
        std::fs::hard_link(&data, mounted.path.join("data-link"))
    };
    write().unwrap_or_else(|e| panic!("expected to write {}: {e}", data.display()));
    let after = ok("usage of the written active", sn.usage(&key));
    assert!(
        after.size > before.size,
        "expected size to grow from {before:?}, got {after:?}"
    );
    assert_eq!(
        after.inodes,
        before.inodes + 1,
        "expected one more inode than {before:?}, got {after:?}"
    );
    mounted.unmount();
    let name = ctx.key("committed");
    ctx.commit(&name, &key);
    let recorded = ok("usage of the committed", sn.usage(&name));
    assert!(
        recorded.size > 0 && recorded.inodes >= 2,
        "expected > 0 bytes and >= 2 inodes, got {recorded:?}"
    );
    assert_eq!(
        recorded, after,
        "expected the committed usage to be the active's at commit"
    );
}
