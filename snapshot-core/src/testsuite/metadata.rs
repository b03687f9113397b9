//! containerd's metadata cases (SEMANTICS.md §4): update, key reuse after remove, walk filters
//! and stat inside walk.

use std::time::SystemTime;

use super::harness::{Ctx, GC_ROOT, commit_opts, expect_info, fails, labels, ok};
use crate::{CommitOpts, ErrorKind, Kind, Labels};

/// containerd's `baseTestSnapshots`: c1, c2(c1), a1(c2), a2, v1(c2), v2 — all empty.
fn base_snapshots(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    ok("prepare c1-a", sn.prepare("c1-a", "", &l));
    ctx.commit("c1", "c1-a");
    ok("prepare c2-a", sn.prepare("c2-a", "c1", &l));
    ctx.commit("c2", "c2-a");
    ok("prepare a1", sn.prepare("a1", "c2", &l));
    ok("prepare a2", sn.prepare("a2", "", &l));
    ok("view v1", sn.view("v1", "c2", &l));
    ok("view v2", sn.view("v2", "", &l));
}

#[track_caller]
fn expect_labels(what: &str, got: &Labels, want: &[(&str, &str)]) {
    let want: Labels = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        got,
        &want,
        "{what}: expected exactly these labels ({} of them)",
        want.len()
    );
}

/// Update: times, ignored immutable fields, label field paths, and `parent` rejected.
pub fn update(ctx: &Ctx) {
    let sn = ctx.sn;
    let t1 = SystemTime::now();
    base_snapshots(ctx);
    let t2 = SystemTime::now();
    let table = [
        ("c1", Kind::Committed, ""),
        ("c2", Kind::Committed, "c1"),
        ("a1", Kind::Active, "c2"),
        ("a2", Kind::Active, ""),
        ("v1", Kind::View, "c2"),
        ("v2", Kind::View, ""),
    ];
    for (name, kind, parent) in table {
        let mut st = ok(&format!("stat {name}"), sn.stat(name));
        assert!(
            t1 <= st.created && st.created <= t2,
            "({name}) expected created {:?} within [{t1:?}, {t2:?}]",
            st.created
        );
        assert_eq!(
            st.created, st.updated,
            "({name}) expected updated == created at creation"
        );
        expect_info(&st, name, kind, parent);
        let created = st.created;

        let root = (GC_ROOT, "rooted");
        let full = [("l1", "v1"), ("l2", "v2"), ("l3", "v3"), root];
        st.parent = "doesnotexist".into();
        st.labels = full
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let u1 = SystemTime::now();
        let st = ok(
            &format!("update {name} without field paths"),
            sn.update(&st, &[]),
        );
        let u2 = SystemTime::now();
        assert_eq!(
            st.created, created,
            "({name}) expected update to keep created"
        );
        assert!(
            u1 <= st.updated && st.updated <= u2,
            "({name}) expected updated {:?} within [{u1:?}, {u2:?}]",
            st.updated
        );
        expect_info(&st, name, kind, parent);
        expect_labels(&format!("({name}) full update"), &st.labels, &full);

        let mut st = st;
        st.labels = Labels::from([("l1".into(), "updated".into()), ("l4".into(), "v4".into())]);
        let st = ok(
            &format!("update {name} labels.l1, labels.l2"),
            sn.update(&st, &["labels.l1", "labels.l2"]),
        );
        let want = [("l1", "updated"), ("l3", "v3"), root];
        expect_labels(&format!("({name}) field-path update"), &st.labels, &want);

        let mut st = st;
        st.labels = Labels::from([
            ("l4".into(), "v4".into()),
            (GC_ROOT.into(), "rooted".into()),
        ]);
        let mut st = ok(
            &format!("update {name} labels"),
            sn.update(&st, &["labels"]),
        );
        expect_labels(
            &format!("({name}) `labels` update"),
            &st.labels,
            &[("l4", "v4"), root],
        );
        assert_eq!(
            ok("stat after update", sn.stat(name)),
            st,
            "({name}) expected stat to equal the update's result"
        );

        st.parent = "doesnotexist".into();
        fails(
            &format!("update {name} with field path parent"),
            ErrorKind::InvalidArgument,
            sn.update(&st, &["parent"]),
        );
        let after = ok("stat after rejected update", sn.stat(name));
        expect_info(&after, name, kind, parent);
    }
}

/// A removed key is reusable at once, and a committed name can be committed to again.
pub fn remove(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    ok("prepare committed-a", sn.prepare("committed-a", "", &l));
    ctx.commit("committed-1", "committed-a");
    ok("prepare reuse-1", sn.prepare("reuse-1", "committed-1", &l));
    ok("remove reuse-1", sn.remove("reuse-1"));
    ok(
        "view reuse-1 after its removal",
        sn.view("reuse-1", "committed-1", &l),
    );
    ok("remove view reuse-1", sn.remove("reuse-1"));
    ok("prepare reuse-1 once more", sn.prepare("reuse-1", "", &l));
    ok("remove committed-1", sn.remove("committed-1"));
    ok(
        "commit to the freed name committed-1",
        sn.commit("committed-1", "reuse-1", &commit_opts()),
    );
    fails(
        "stat a removed key",
        ErrorKind::NotFound,
        sn.stat("reuse-1"),
    );
}

/// The 10 filter cases of containerd's `checkWalk` over 8 snapshots.
pub fn walk(ctx: &Ctx) {
    let sn = ctx.sn;
    let gc = |extra: &[(&str, &str)]| {
        let mut l = Labels::from([(GC_ROOT.to_owned(), "check-walk".to_owned())]);
        l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        l
    };
    let commit = |name: &str, key: &str, l: Labels| {
        ok(
            &format!("commit {name}"),
            sn.commit(
                name,
                key,
                &CommitOpts {
                    labels: l,
                    parent: None,
                },
            ),
        );
    };
    ok("prepare a-np", sn.prepare("a-np", "", &gc(&[])));
    ok("prepare p-tmp", sn.prepare("p-tmp", "", &gc(&[])));
    commit("p", "p-tmp", gc(&[]));
    ok("prepare a", sn.prepare("a", "p", &gc(&[])));
    ok("view v", sn.view("v", "p", &gc(&[])));
    ok("prepare p-wl-tmp", sn.prepare("p-wl-tmp", "", &gc(&[])));
    commit("p-wl", "p-wl-tmp", gc(&[("l", "1")]));
    ok(
        "prepare a-wl",
        sn.prepare("a-wl", "p-wl", &gc(&[("l", "2")])),
    );
    ok("view v-wl", sn.view("v-wl", "p-wl", &gc(&[("l", "3")])));
    ok(
        "prepare a-np-wl",
        sn.prepare("a-np-wl", "", &gc(&[("l", "2")])),
    );

    let root = r#"labels."containerd.io/gc.root"==check-walk"#;
    let table: [(&[&str], Vec<String>); 10] = [
        (
            &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            vec![root.into()],
        ),
        (
            &["a-np", "a", "a-wl", "a-np-wl"],
            vec![format!("kind==active,{root}")],
        ),
        (&["v", "v-wl"], vec![format!("kind==view,{root}")]),
        (&["p", "p-wl"], vec![format!("kind==committed,{root}")]),
        (
            &["p", "a-np-wl"],
            vec!["name==p".into(), "name==a-np-wl".into()],
        ),
        (&["a-wl"], vec!["name==a-wl,labels.l".into()]),
        (&["a", "v"], vec!["parent==p".into()]),
        (
            &["a", "v", "a-wl", "v-wl"],
            vec![format!(r#"parent!="",{root}"#)],
        ),
        (
            &["p-wl", "a-wl", "v-wl", "a-np-wl"],
            vec!["labels.l".into()],
        ),
        (&["a-wl", "a-np-wl"], vec!["labels.l==2".into()]),
    ];
    for (i, (want, filters)) in table.iter().enumerate() {
        let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
        let mut got = Vec::new();
        ok(
            &format!("walk {filters:?}"),
            sn.walk(&filters, &mut |info| {
                got.push(info.name.clone());
                Ok(())
            }),
        );
        got.sort();
        let mut want: Vec<&str> = want.to_vec();
        want.sort_unstable();
        assert_eq!(
            got, want,
            "[{i}] expected walk {filters:?} to match exactly these names"
        );
    }
}

/// Stat inside a walk callback works and equals the walked info.
pub fn stat_in_walk(ctx: &Ctx) {
    let (sn, l) = (ctx.sn, labels(&[]));
    let p = "stats-in-walk-";
    let (c1, c2) = (format!("{p}c1"), format!("{p}c2"));
    let active = ctx.prepare_mounted(&format!("{c1}-a"), "");
    active.unmount();
    ctx.commit(&c1, &format!("{c1}-a"));
    ok("prepare c2-a", sn.prepare(&format!("{c2}-a"), &c1, &l));
    ctx.commit(&c2, &format!("{c2}-a"));
    ok("prepare a1", sn.prepare(&format!("{p}a1"), &c2, &l));
    ok("view v1", sn.view(&format!("{p}v1"), &c2, &l));

    // No assertion inside the callback: a panic must not unwind through the snapshotter.
    let (mut checked, mut mismatches) = (Vec::new(), Vec::new());
    let walked = sn.walk(&[], &mut |info| {
        if info.name.starts_with(p) {
            let st = sn.stat(&info.name)?;
            if &st != info {
                mismatches.push(format!("walked {info:?}, stat {st:?}"));
            }
            checked.push(info.name.clone());
        }
        Ok(())
    });
    ok("walk with stat inside", walked);
    assert!(
        mismatches.is_empty(),
        "expected stat inside the walk to equal the walked info: {mismatches:#?}"
    );
    checked.sort();
    let want = [format!("{p}a1"), c1, c2, format!("{p}v1")];
    assert_eq!(
        checked, want,
        "expected the walk to visit exactly the four snapshots"
    );
}
