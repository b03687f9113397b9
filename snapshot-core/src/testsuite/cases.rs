//! containerd's lifecycle cases (SEMANTICS.md §4): prepare, commit, stat, view, remove, close.

use std::collections::BTreeMap;

use super::fstest::{self, create_dir, create_file, remove_all};
use super::harness::{Ctx, apply_flat, expect_info, fails, labels, ok};
use crate::{CommitOpts, ErrorKind, Info, Kind};

/// Every snapshot the unfiltered walk reports, by name.
fn walk_all(ctx: &Ctx) -> BTreeMap<String, Info> {
    let mut seen = BTreeMap::new();
    let walked = ctx.sn.walk(&[], &mut |info| {
        seen.insert(info.name.clone(), info.clone());
        Ok(())
    });
    ok("walk without filters", walked);
    seen
}

/// The full lifecycle: prepare, write, commit, prepare on top, view, walk, remove.
pub fn basic(ctx: &Ctx) {
    let initial = [
        create_file("/foo", "foo\n", 0o777),
        create_dir("/a", 0o755),
        create_dir("/a/b", 0o755),
        create_dir("/a/b/c", 0o755),
    ];
    let diff = [
        create_file("/bar", "bar\n", 0o777),
        create_file("/foo", "bar\n", 0o777),
        remove_all("/a/b"),
    ];
    let flat = ctx.fresh_dir("flat");
    let sn = ctx.sn;

    let preparing = ctx.key("preparing");
    let active_labels = labels(&[("active-only", "not inherited")]);
    let mounts = ok("prepare", sn.prepare(&preparing, "", &active_labels));
    let active = ctx.mount(&mounts, "active");
    ctx.apply_mounted(&active.path, &initial);
    active.unmount();
    let committed = ctx.key("committed");
    let only_commit_labels = labels(&[("committed", "yes")]);
    let opts = CommitOpts {
        labels: only_commit_labels.clone(),
        parent: None,
    };
    ok(
        "commit the first layer",
        sn.commit(&committed, &preparing, &opts),
    );
    let si = ok("stat the first layer", sn.stat(&committed));
    expect_info(&si, &committed, Kind::Committed, "");
    assert_eq!(
        si.labels, only_commit_labels,
        "expected exactly the commit's labels on {committed}"
    );
    fails(
        "stat the committed active's key",
        ErrorKind::NotFound,
        sn.stat(&preparing),
    );

    let next = ctx.key("nextlayer");
    let active = ctx.prepare_mounted(&next, &committed);
    apply_flat(&flat, &initial);
    if let Err(d) = fstest::check_directory_equal(&flat, &active.path) {
        panic!("expected the child of {committed} to show its content: {d}");
    }
    ctx.apply_mounted(&active.path, &diff);
    active.unmount();
    expect_info(
        &ok("stat the second active", sn.stat(&next)),
        &next,
        Kind::Active,
        &committed,
    );
    let next_committed = ctx.key("committed-next");
    ctx.commit(&next_committed, &next);
    let si2 = ok("stat the second layer", sn.stat(&next_committed));
    expect_info(&si2, &next_committed, Kind::Committed, &committed);
    fails(
        "stat the second active's key",
        ErrorKind::NotFound,
        sn.stat(&next),
    );

    let walked = walk_all(ctx);
    for expected in [&si, &si2] {
        let got = walked.get(&expected.name);
        assert_eq!(
            got,
            Some(expected),
            "expected the walk to report {} as stat does",
            expected.name
        );
    }

    apply_flat(&flat, &diff);
    ctx.check_view(&next_committed, &flat, "view of the top layer");
    let err = fails(
        "remove a parent",
        ErrorKind::FailedPrecondition,
        sn.remove(&committed),
    );
    assert!(
        err.to_string().contains("remove"),
        "expected \"remove\" in the error, got: {err}"
    );
    ok("remove the top layer", sn.remove(&next_committed));
    ok("remove the base layer", sn.remove(&committed));
}

/// Stat of a fresh, mounted, written parentless active.
pub fn stat_active(ctx: &Ctx) {
    let key = ctx.key("preparing");
    let active = ctx.prepare_mounted(&key, "");
    ctx.apply_mounted(&active.path, &[create_file("/foo", "foo\n", 0o777)]);
    expect_info(
        &ok("stat the active", ctx.sn.stat(&key)),
        &key,
        Kind::Active,
        "",
    );
}

/// Stat of a committed parentless snapshot.
pub fn stat_committed(ctx: &Ctx) {
    let key = ctx.key("preparing");
    let active = ctx.prepare_mounted(&key, "");
    ctx.apply_mounted(&active.path, &[create_file("/foo", "foo\n", 0o777)]);
    let committed = ctx.key("committed");
    ctx.commit(&committed, &key);
    expect_info(
        &ok("stat the committed", ctx.sn.stat(&committed)),
        &committed,
        Kind::Committed,
        "",
    );
}

/// A <- B: parents are reported transitively; commits happen while the actives are mounted.
pub fn transitivity(ctx: &Ctx) {
    let (sn, preparing, next) = (ctx.sn, ctx.key("preparing"), ctx.key("next"));
    let (snap_a, snap_b) = (ctx.key("snapA"), ctx.key("snapB"));
    let first = ctx.prepare_mounted(&preparing, "");
    ctx.apply_mounted(&first.path, &[create_file("/foo", "foo\n", 0o777)]);
    ctx.commit(&snap_a, &preparing);
    let second = ctx.prepare_mounted(&next, &snap_a);
    ctx.apply_mounted(&second.path, &[create_file("/foo", "foo bar\n", 0o777)]);
    ctx.commit(&snap_b, &next);
    let si_a = ok("stat A", sn.stat(&snap_a));
    let si_b = ok("stat B", sn.stat(&snap_b));
    let si_b_parent = ok("stat B's parent", sn.stat(&si_b.parent));
    assert_eq!(si_a.parent, "", "expected A to have no parent");
    assert_eq!(si_b.parent, snap_a, "expected B's parent to be A");
    assert_eq!(
        si_b_parent.parent, "",
        "expected B's parent (A) to have no parent"
    );
    second.unmount();
    first.unmount();
}

/// The same key twice is rejected for prepare+view, prepare+prepare and view+view.
pub fn prepare_view(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    let preparing = ctx.key("preparing");
    let mounted = ctx.prepare_mounted(&preparing, "");
    let snap_a = ctx.key("snapA");
    ctx.commit(&snap_a, &preparing);
    let new_layer = ctx.key("newlayer");
    ok("prepare newlayer", sn.prepare(&new_layer, &snap_a, &l));
    fails(
        "view with an active's key",
        ErrorKind::AlreadyExists,
        sn.view(&new_layer, &snap_a, &l),
    );
    let prep_layer = ctx.key("prepLayer");
    ok("prepare prepLayer", sn.prepare(&prep_layer, &snap_a, &l));
    fails(
        "prepare the same key twice",
        ErrorKind::AlreadyExists,
        sn.prepare(&prep_layer, &snap_a, &l),
    );
    let view_layer = ctx.key("viewLayer");
    ok("view viewLayer", sn.view(&view_layer, &snap_a, &l));
    fails(
        "view the same key twice",
        ErrorKind::AlreadyExists,
        sn.view(&view_layer, &snap_a, &l),
    );
    mounted.unmount();
}

/// base <- inter <- top(active): the intermediate cannot be removed until its child is.
pub fn remove_intermediate_snapshot(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    let base = ctx.key("base");
    let mounted = ctx.prepare_mounted(&base, "");
    let committed_base = ctx.key("committed-base");
    ctx.commit(&committed_base, &base);
    let inter = ctx.key("intermediate");
    ok(
        "prepare the intermediate",
        sn.prepare(&inter, &committed_base, &l),
    );
    let committed_inter = ctx.key("committed-inter");
    ctx.commit(&committed_inter, &inter);
    let top = ctx.key("toplayer");
    ok("prepare the top", sn.prepare(&top, &committed_inter, &l));
    fails(
        "remove the intermediate",
        ErrorKind::FailedPrecondition,
        sn.remove(&committed_inter),
    );
    ok("remove the top", sn.remove(&top));
    ok("remove the intermediate", sn.remove(&committed_inter));
    mounted.unmount();
    ok("remove the base", sn.remove(&committed_base));
}

/// Close twice returns Ok both times (the harness closes a third time).
pub fn close_twice(ctx: &Ctx) {
    let sn = ctx.sn;
    let n = format!("closeTwice-{}", ctx.next_seq());
    let prepare = format!("{n}-prepare");
    ok("prepare", sn.prepare(&prepare, "", &labels(&[])));
    ctx.commit(&n, &prepare);
    ok("remove", sn.remove(&n));
    ok("first close", sn.close());
    ok("second close", sn.close());
}
