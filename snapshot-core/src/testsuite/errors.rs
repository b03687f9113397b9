//! Error kinds and their precedence (SEMANTICS.md §1.4, §1.5): what each operation answers
//! for missing, taken or wrongly-kinded keys, and that a failed call changes nothing.

use super::harness::{Ctx, commit_opts, fails, labels, ok};
use crate::{Error, ErrorKind, Info, Kind};

/// Prepare/View: missing parent NotFound, non-committed parent InvalidArgument, taken key
/// AlreadyExists — checked in that order, and a failed call creates nothing.
pub fn prepare_errors(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    fails(
        "prepare on a missing parent",
        ErrorKind::NotFound,
        sn.prepare("k", "missing", &l),
    );
    fails(
        "view of a missing parent",
        ErrorKind::NotFound,
        sn.view("k", "missing", &l),
    );
    ctx.committed("base", "");
    ok("prepare act", sn.prepare("act", "base", &l));
    ok("view vw", sn.view("vw", "base", &l));
    fails(
        "prepare on an active parent",
        ErrorKind::InvalidArgument,
        sn.prepare("k", "act", &l),
    );
    fails(
        "view of an active parent",
        ErrorKind::InvalidArgument,
        sn.view("k", "act", &l),
    );
    fails(
        "prepare on a view parent",
        ErrorKind::InvalidArgument,
        sn.prepare("k", "vw", &l),
    );
    fails(
        "stat after failed prepares",
        ErrorKind::NotFound,
        sn.stat("k"),
    );
    fails(
        "prepare an existing active key",
        ErrorKind::AlreadyExists,
        sn.prepare("act", "base", &l),
    );
    fails(
        "view with an existing active key",
        ErrorKind::AlreadyExists,
        sn.view("act", "base", &l),
    );
    fails(
        "prepare a committed name",
        ErrorKind::AlreadyExists,
        sn.prepare("base", "", &l),
    );
    fails(
        "prepare an existing view key",
        ErrorKind::AlreadyExists,
        sn.prepare("vw", "", &l),
    );
    fails(
        "prepare(existing, missing parent)",
        ErrorKind::NotFound,
        sn.prepare("act", "missing", &l),
    );
    fails(
        "view(existing, missing parent)",
        ErrorKind::NotFound,
        sn.view("base", "missing", &l),
    );
    fails(
        "prepare(existing, active parent)",
        ErrorKind::InvalidArgument,
        sn.prepare("vw", "act", &l),
    );
    ctx.expect_stat("act", Kind::Active, "base");
    ctx.expect_stat("vw", Kind::View, "base");
}

/// Commit: missing key NotFound, taken name AlreadyExists, view or committed key
/// FailedPrecondition — in that order; a committed key is gone.
pub fn commit_errors(ctx: &Ctx) {
    let (sn, l, o) = (ctx.sn, labels(&[]), commit_opts());
    ctx.committed("base", "");
    ok("prepare act", sn.prepare("act", "base", &l));
    ok("view vw", sn.view("vw", "base", &l));
    fails(
        "commit a missing key",
        ErrorKind::NotFound,
        sn.commit("n", "missing", &o),
    );
    fails(
        "commit a missing key to a taken name",
        ErrorKind::NotFound,
        sn.commit("base", "missing", &o),
    );
    fails(
        "commit to a committed name",
        ErrorKind::AlreadyExists,
        sn.commit("base", "act", &o),
    );
    fails(
        "commit to a view's key",
        ErrorKind::AlreadyExists,
        sn.commit("vw", "act", &o),
    );
    fails(
        "commit a view to a taken name",
        ErrorKind::AlreadyExists,
        sn.commit("base", "vw", &o),
    );
    fails(
        "commit a view",
        ErrorKind::FailedPrecondition,
        sn.commit("n", "vw", &o),
    );
    fails(
        "commit a committed",
        ErrorKind::FailedPrecondition,
        sn.commit("n", "base", &o),
    );
    fails(
        "stat after failed commits",
        ErrorKind::NotFound,
        sn.stat("n"),
    );
    ctx.expect_stat("act", Kind::Active, "base");
    ok("commit act", sn.commit("n", "act", &o));
    fails(
        "commit the same key again",
        ErrorKind::NotFound,
        sn.commit("n2", "act", &o),
    );
    fails("stat a committed key", ErrorKind::NotFound, sn.stat("act"));
    ctx.expect_stat("n", Kind::Committed, "base");
}

/// Mounts: committed FailedPrecondition, missing NotFound; actives and views re-derive the
/// mounts prepare and view returned.
pub fn mounts_errors(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    ctx.committed("base", "");
    fails(
        "mounts of a committed",
        ErrorKind::FailedPrecondition,
        sn.mounts("base"),
    );
    fails(
        "mounts of a missing key",
        ErrorKind::NotFound,
        sn.mounts("missing"),
    );
    let prepared = ok("prepare act", sn.prepare("act", "base", &l));
    assert_eq!(
        ok("mounts of act", sn.mounts("act")),
        prepared,
        "expected mounts == prepare's"
    );
    let viewed = ok("view vw", sn.view("vw", "base", &l));
    assert_eq!(
        ok("mounts of vw", sn.mounts("vw")),
        viewed,
        "expected mounts == view's"
    );
}

/// Remove: missing NotFound; a parent of an active, a view or a committed FailedPrecondition
/// with "remove" in the message.
pub fn remove_errors(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    fails(
        "remove a missing key",
        ErrorKind::NotFound,
        sn.remove("missing"),
    );
    ctx.committed("base", "");
    for child in ["active", "view", "committed"] {
        match child {
            "active" => drop(ok("prepare a child", sn.prepare("child", "base", &l))),
            "view" => drop(ok("view a child", sn.view("child", "base", &l))),
            _ => ctx.committed("child", "base"),
        }
        let what = format!("remove a parent of a {child}");
        let err = fails(&what, ErrorKind::FailedPrecondition, sn.remove("base"));
        assert!(
            err.to_string().contains("remove"),
            "{what}: expected \"remove\" in: {err}"
        );
        ctx.expect_stat("base", Kind::Committed, "");
        ok(&format!("remove the {child} child"), sn.remove("child"));
    }
    ok("remove the childless base", sn.remove("base"));
    fails("remove it again", ErrorKind::NotFound, sn.remove("base"));
}

/// Update: missing NotFound; immutable field paths InvalidArgument with nothing written; empty
/// values are never stored.
pub fn update_errors(ctx: &Ctx) {
    let sn = ctx.sn;
    fails(
        "update a missing key",
        ErrorKind::NotFound,
        sn.update(&Info::named("missing"), &[]),
    );
    let start = labels(&[("x", "1")]);
    ok("prepare a", sn.prepare("a", "", &start));
    let mut info = ok("stat a", sn.stat("a"));
    info.labels = labels(&[("x", "2"), ("y", "3")]);
    for path in ["parent", "kind", "name", "created", "updated"] {
        fails(
            &format!("update field path {path}"),
            ErrorKind::InvalidArgument,
            sn.update(&info, &[path]),
        );
    }
    let r = sn.update(&info, &["labels.y", "kind"]);
    fails("update labels.y then kind", ErrorKind::InvalidArgument, r);
    let after = ok("stat a", sn.stat("a"));
    assert_eq!(
        after.labels, start,
        "expected a rejected update to write nothing"
    );

    info.labels = labels(&[("e", "")]);
    let updated = ok("update with an empty value", sn.update(&info, &[]));
    assert_eq!(
        updated.labels,
        labels(&[]),
        "expected the empty-valued label dropped"
    );
    let l = labels(&[("e", "")]);
    ok(
        "prepare b with an empty-valued label",
        sn.prepare("b", "", &l),
    );
    let b = ok("stat b", sn.stat("b"));
    assert_eq!(
        b.labels,
        labels(&[]),
        "expected the empty-valued label not stored"
    );
}

/// Walk: malformed filters are InvalidArgument (even on a store never written to), a bad regexp
/// just never matches, and a callback error stops the walk and is returned.
pub fn walk_errors(ctx: &Ctx) {
    let sn = ctx.sn;
    let walk = |filters: &[&str]| {
        let mut names = Vec::new();
        sn.walk(filters, &mut |i| {
            names.push(i.name.clone());
            Ok(())
        })
        .map(|()| names)
    };
    fails(
        "malformed filter on a new store",
        ErrorKind::InvalidArgument,
        walk(&["name=="]),
    );
    ctx.committed("base", "");
    ok("prepare act", sn.prepare("act", "base", &labels(&[])));
    for bad in ["name==", "==x", "labels.", "kind==view,"] {
        fails(
            &format!("walk with filter {bad:?}"),
            ErrorKind::InvalidArgument,
            walk(&[bad]),
        );
    }
    fails(
        "walk with one good and one bad filter",
        ErrorKind::InvalidArgument,
        walk(&["name==act", "name=="]),
    );
    let none = ok("walk with an invalid regexp", walk(&["name~=["]));
    assert!(
        none.is_empty(),
        "expected an invalid regexp to match nothing, got {none:?}"
    );

    let mut calls = 0;
    let r = sn.walk(&[], &mut |_| {
        calls += 1;
        Err(Error::Unavailable("stop here".into()))
    });
    fails("walk whose callback fails", ErrorKind::Unavailable, r);
    assert_eq!(
        calls, 1,
        "expected the walk to stop at the first callback error"
    );
}
