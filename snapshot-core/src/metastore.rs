//! Durable, transactional snapshot metadata on `redb` (containerd's `snapshots/storage` on bbolt).
//!
//! Every mutating snapshot operation runs in one [`MetaStore::write`] transaction: either all of
//! it is committed or none of it is. Snapshotters do their filesystem work inside the closure so
//! a failure rolls the metadata back, and defer irreversible work (deleting directories) until
//! the transaction has committed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use redb::{
    ConcurrencyMode, Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::filter::Filter;
use crate::{CommitOpts, Error, Info, Kind, Labels, Result, Usage, validate_labels};

/// key or name -> JSON [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// (parent id, child id) -> child key or name: the child index.
const PARENTS: TableDefinition<(u64, u64), &str> = TableDefinition::new("parents");
/// Counters: `next_id`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// What is stored per snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    parent: String,
    created: SystemTime,
    updated: SystemTime,
    labels: Labels,
    usage: Usage,
}

impl Record {
    fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_string(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: self.created,
            updated: self.updated,
        }
    }
}

/// An active or view snapshot as a snapshotter needs it to build mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Stable ID, unique for the life of the store (never reused), kept across commit.
    pub id: String,
    /// Active or View.
    pub kind: Kind,
    /// IDs of all ancestors, nearest first (immediate parent at index 0).
    pub parent_ids: Vec<String>,
}

/// The metadata store of one snapshotter root (`<root>/metadata.db`).
pub struct MetaStore {
    path: PathBuf,
    db: Mutex<Option<Arc<Database>>>,
}

impl MetaStore {
    /// Opens or creates the store at `path`. Several processes may open the same store; writes
    /// are serialised.
    pub fn open(path: impl AsRef<Path>) -> Result<MetaStore> {
        let path = path.as_ref().to_path_buf();
        let db = Database::builder()
            .set_concurrency_mode(ConcurrencyMode::MultiWriter)
            .create(&path)
            .map_err(|e| Error::Store(format!("open {}: {e}", path.display())))?;
        // Create the tables up front so readers of a fresh store see empty tables.
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(PARENTS)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(MetaStore {
            path,
            db: Mutex::new(Some(Arc::new(db))),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<Arc<Database>> {
        let guard = self
            .db
            .lock()
            .map_err(|_| Error::Store("metadata store lock poisoned".into()))?;
        guard
            .clone()
            .ok_or_else(|| Error::Store(format!("{} is closed", self.path.display())))
    }

    /// Runs `f` in a read-only transaction (a consistent snapshot of the metadata).
    pub fn read<T>(&self, f: impl FnOnce(&ReadTx) -> Result<T>) -> Result<T> {
        let db = self.db()?;
        let tx = ReadTx {
            tx: db.begin_read()?,
        };
        f(&tx)
    }

    /// Runs `f` in a write transaction, committed only if `f` succeeds (and durable once this
    /// returns Ok). Only one write transaction runs at a time, across processes.
    pub fn write<T>(&self, f: impl FnOnce(&mut WriteTx) -> Result<T>) -> Result<T> {
        let db = self.db()?;
        let mut tx = WriteTx {
            tx: db.begin_write()?,
        };
        let out = f(&mut tx)?;
        tx.tx.commit()?;
        Ok(out)
    }

    /// Closes the store; later transactions fail. Closing twice is fine.
    pub fn close(&self) -> Result<()> {
        let mut guard = self
            .db
            .lock()
            .map_err(|_| Error::Store("metadata store lock poisoned".into()))?;
        guard.take();
        Ok(())
    }
}

/// A read-only transaction.
pub struct ReadTx {
    tx: ReadTransaction,
}

/// A write transaction.
pub struct WriteTx {
    tx: WriteTransaction,
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("corrupt record {key:?}: {e}")))
}

fn encode(rec: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(rec).map_err(|e| Error::Store(format!("encode record: {e}")))
}

fn lookup(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>> {
    match t.get(key)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

fn must_lookup(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Record> {
    lookup(t, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))
}

fn info_of(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<(String, Info, Usage)> {
    let rec = must_lookup(t, key)?;
    Ok((rec.id.to_string(), rec.info(key), rec.usage))
}

fn snapshot_of(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Snapshot> {
    let rec = must_lookup(t, key)?;
    if !matches!(rec.kind, Kind::Active | Kind::View) {
        return Err(Error::FailedPrecondition(format!(
            "snapshot {key:?} is {}, not active or view",
            rec.kind
        )));
    }
    let mut parent_ids = Vec::new();
    let mut parent = rec.parent.clone();
    while !parent.is_empty() {
        let p = must_lookup(t, &parent).map_err(|e| e.context(format!("parent of {key:?}")))?;
        parent_ids.push(p.id.to_string());
        parent = p.parent;
    }
    Ok(Snapshot {
        id: rec.id.to_string(),
        kind: rec.kind,
        parent_ids,
    })
}

fn walk_table(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    filter: &Filter,
    f: &mut dyn FnMut(&Info) -> Result<()>,
) -> Result<()> {
    for entry in t.iter()? {
        let (k, v) = entry?;
        let key = k.value();
        let info = decode(key, v.value())?.info(key);
        if filter.matches(&info) {
            f(&info)?;
        }
    }
    Ok(())
}

fn id_map_of(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for entry in t.iter()? {
        let (k, v) = entry?;
        let rec = decode(k.value(), v.value())?;
        out.insert(rec.id.to_string(), k.value().to_string());
    }
    Ok(out)
}

fn strip_empty(mut labels: Labels) -> Labels {
    labels.retain(|_, v| !v.is_empty());
    labels
}

macro_rules! read_queries {
    () => {
        /// `(id, info, usage)` of any snapshot. NotFound if missing.
        pub fn get_info(&self, key: &str) -> Result<(String, Info, Usage)> {
            info_of(&self.tx.open_table(SNAPSHOTS)?, key)
        }

        /// The active or view snapshot `key` with its ancestor IDs; FailedPrecondition for a
        /// committed one, NotFound if missing.
        pub fn get_snapshot(&self, key: &str) -> Result<Snapshot> {
            snapshot_of(&self.tx.open_table(SNAPSHOTS)?, key)
        }

        /// Calls `f` for every snapshot matching `filter`, in key byte order.
        pub fn walk(&self, filter: &Filter, f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()> {
            walk_table(&self.tx.open_table(SNAPSHOTS)?, filter, f)
        }

        /// Map of every live ID to its key or name (to find orphan directories).
        pub fn id_map(&self) -> Result<HashMap<String, String>> {
            id_map_of(&self.tx.open_table(SNAPSHOTS)?)
        }
    };
}

impl ReadTx {
    read_queries!();
}

impl WriteTx {
    read_queries!();

    /// Creates an active or view snapshot (SEMANTICS §1.4 check order: labels, parent missing
    /// -> NotFound, parent not committed -> InvalidArgument, key taken -> AlreadyExists).
    pub fn create_snapshot(
        &mut self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: &Labels,
    ) -> Result<Snapshot> {
        if !matches!(kind, Kind::Active | Kind::View) {
            return Err(Error::InvalidArgument(format!(
                "snapshot type {kind} invalid; only active and view can be created"
            )));
        }
        validate_labels(labels)?;
        let mut snaps = self.tx.open_table(SNAPSHOTS)?;
        let mut parent_id = None;
        if !parent.is_empty() {
            let p = lookup(&snaps, parent)?
                .ok_or_else(|| Error::NotFound(format!("parent {parent:?} of {key:?}")))?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent:?} is {}, not committed",
                    p.kind
                )));
            }
            parent_id = Some(p.id);
        }
        if lookup(&snaps, key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
        }
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        let id = {
            let mut meta = self.tx.open_table(META)?;
            let id = meta.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
            meta.insert(NEXT_ID, id + 1)?;
            id
        };
        let now = SystemTime::now();
        let rec = Record {
            id,
            kind,
            parent: parent.to_string(),
            created: now,
            updated: now,
            labels: strip_empty(labels.clone()),
            usage: Usage::default(),
        };
        snaps.insert(key, encode(&rec)?.as_slice())?;
        if let Some(pid) = parent_id {
            self.tx.open_table(PARENTS)?.insert((pid, id), key)?;
        }
        snapshot_of(&snaps, key)
    }

    /// Updates labels (SEMANTICS §1.4 `Update`): returns the resulting info.
    pub fn update_info(&mut self, info: &Info, fieldpaths: &[&str]) -> Result<Info> {
        let mut snaps = self.tx.open_table(SNAPSHOTS)?;
        let mut rec = must_lookup(&snaps, &info.name)?;
        if fieldpaths.is_empty() {
            rec.labels = info.labels.clone();
        }
        for path in fieldpaths {
            if *path == "labels" {
                rec.labels = info.labels.clone();
            } else if let Some(k) = path.strip_prefix("labels.") {
                match info.labels.get(k) {
                    Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                    None => rec.labels.remove(k),
                };
            } else {
                return Err(Error::InvalidArgument(format!(
                    "cannot update {path:?} field on snapshot {:?}",
                    info.name
                )));
            }
        }
        rec.labels = strip_empty(std::mem::take(&mut rec.labels));
        validate_labels(&rec.labels)?;
        rec.updated = SystemTime::now();
        snaps.insert(info.name.as_str(), encode(&rec)?.as_slice())?;
        Ok(rec.info(&info.name))
    }

    /// Turns the active `key` into the committed `name`, keeping its ID (SEMANTICS §2.3
    /// `CommitActive`, with HEAD's rebase rules for `opts.parent`). Returns the ID.
    pub fn commit_active(
        &mut self,
        key: &str,
        name: &str,
        usage: Usage,
        opts: &CommitOpts,
    ) -> Result<String> {
        validate_labels(&opts.labels)?;
        let mut snaps = self.tx.open_table(SNAPSHOTS)?;
        if lookup(&snaps, name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        let active = must_lookup(&snaps, key)?;
        if active.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is {}, only active snapshots can be committed",
                active.kind
            )));
        }
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        let parent = match opts.parent.as_deref() {
            None | Some("") => active.parent.clone(),
            Some(p) if active.parent.is_empty() || active.parent == p => p.to_string(),
            Some(p) => {
                return Err(Error::InvalidArgument(format!(
                    "cannot commit {key:?} with parent {p:?}: it was prepared on {:?}",
                    active.parent
                )));
            }
        };
        let mut parents = self.tx.open_table(PARENTS)?;
        if !parent.is_empty() {
            let p = lookup(&snaps, &parent)?
                .ok_or_else(|| Error::NotFound(format!("parent {parent:?} of {name:?}")))?;
            if p.kind != Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "parent {parent:?} is {}, not committed",
                    p.kind
                )));
            }
            if !active.parent.is_empty() {
                let old = lookup(&snaps, &active.parent)?.ok_or_else(|| {
                    Error::NotFound(format!("parent {:?} of {key:?}", active.parent))
                })?;
                parents.remove((old.id, active.id))?;
            }
            parents.insert((p.id, active.id), name)?;
        }
        let now = SystemTime::now();
        let rec = Record {
            id: active.id,
            kind: Kind::Committed,
            parent,
            created: now,
            updated: now,
            labels: strip_empty(opts.labels.clone()),
            usage,
        };
        snaps.remove(key)?;
        snaps.insert(name, encode(&rec)?.as_slice())?;
        Ok(rec.id.to_string())
    }

    /// Removes `key` if it has no children; returns its ID and kind.
    pub fn remove(&mut self, key: &str) -> Result<(String, Kind)> {
        let mut snaps = self.tx.open_table(SNAPSHOTS)?;
        let rec = must_lookup(&snaps, key)?;
        let mut parents = self.tx.open_table(PARENTS)?;
        if let Some(child) = parents.range((rec.id, 0)..=(rec.id, u64::MAX))?.next() {
            let (_, child) = child?;
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?} with child {:?}",
                child.value()
            )));
        }
        if !rec.parent.is_empty() {
            let p = must_lookup(&snaps, &rec.parent)?;
            parents.remove((p.id, rec.id))?;
        }
        snaps.remove(key)?;
        Ok((rec.id.to_string(), rec.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let ms = MetaStore::open(dir.path().join("metadata.db")).unwrap();
        (dir, ms)
    }

    fn create(ms: &MetaStore, kind: Kind, key: &str, parent: &str) -> Result<Snapshot> {
        ms.write(|tx| tx.create_snapshot(kind, key, parent, &Labels::new()))
    }

    fn commit(ms: &MetaStore, key: &str, name: &str) -> Result<String> {
        ms.write(|tx| tx.commit_active(key, name, Usage::default(), &CommitOpts::default()))
    }

    fn kind_of<T: std::fmt::Debug>(r: Result<T>) -> ErrorKind {
        r.unwrap_err().kind()
    }

    #[test]
    fn missing_keys_are_not_found_even_on_a_fresh_store() {
        let (_d, ms) = store();
        assert_eq!(kind_of(ms.read(|tx| tx.get_info("x"))), ErrorKind::NotFound);
        assert_eq!(
            kind_of(ms.read(|tx| tx.get_snapshot("x"))),
            ErrorKind::NotFound
        );
        assert_eq!(kind_of(ms.write(|tx| tx.remove("x"))), ErrorKind::NotFound);
    }

    #[test]
    fn ids_are_unique_increasing_and_kept_by_commit() {
        let (_d, ms) = store();
        let a = create(&ms, Kind::Active, "a", "").unwrap();
        assert_eq!(a.id, "1");
        assert_eq!(commit(&ms, "a", "A").unwrap(), "1");
        let b = create(&ms, Kind::Active, "b", "A").unwrap();
        assert_eq!(b.id, "2");
        ms.write(|tx| tx.remove("b")).unwrap();
        let c = create(&ms, Kind::Active, "b", "A").unwrap();
        assert_eq!(c.id, "3", "ids are never reused");
    }

    #[test]
    fn create_checks_in_containerd_order() {
        let (_d, ms) = store();
        create(&ms, Kind::Active, "a", "").unwrap();
        assert_eq!(
            kind_of(create(&ms, Kind::Active, "a", "missing")),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind_of(create(&ms, Kind::Active, "b", "a")),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            kind_of(create(&ms, Kind::View, "a", "")),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            kind_of(create(&ms, Kind::Committed, "c", "")),
            ErrorKind::InvalidArgument
        );
        commit(&ms, "a", "A").unwrap();
        assert_eq!(
            kind_of(create(&ms, Kind::Active, "A", "")),
            ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn failed_transactions_change_nothing() {
        let (_d, ms) = store();
        let r: Result<()> = ms.write(|tx| {
            tx.create_snapshot(Kind::Active, "a", "", &Labels::new())?;
            Err(Error::Unavailable("filesystem step failed".into()))
        });
        assert!(r.is_err());
        assert_eq!(kind_of(ms.read(|tx| tx.get_info("a"))), ErrorKind::NotFound);
        assert_eq!(create(&ms, Kind::Active, "a", "").unwrap().id, "1");
    }

    #[test]
    fn parent_ids_are_nearest_first() {
        let (_d, ms) = store();
        create(&ms, Kind::Active, "a", "").unwrap();
        commit(&ms, "a", "A").unwrap();
        create(&ms, Kind::Active, "b", "A").unwrap();
        commit(&ms, "b", "B").unwrap();
        let s = create(&ms, Kind::View, "v", "B").unwrap();
        assert_eq!(s.parent_ids, vec!["2".to_string(), "1".to_string()]);
        assert_eq!(
            kind_of(ms.read(|tx| tx.get_snapshot("B"))),
            ErrorKind::FailedPrecondition
        );
    }

    #[test]
    fn commit_errors() {
        let (_d, ms) = store();
        create(&ms, Kind::Active, "a", "").unwrap();
        create(&ms, Kind::View, "v", "").unwrap();
        assert_eq!(kind_of(commit(&ms, "missing", "X")), ErrorKind::NotFound);
        assert_eq!(
            kind_of(commit(&ms, "v", "X")),
            ErrorKind::FailedPrecondition
        );
        assert_eq!(kind_of(commit(&ms, "a", "v")), ErrorKind::AlreadyExists);
        commit(&ms, "a", "A").unwrap();
        assert_eq!(
            kind_of(commit(&ms, "A", "Y")),
            ErrorKind::FailedPrecondition
        );
        assert_eq!(kind_of(commit(&ms, "a", "Z")), ErrorKind::NotFound);
    }

    #[test]
    fn rebase_adopts_parent_and_moves_child_index() {
        let (_d, ms) = store();
        create(&ms, Kind::Active, "a", "").unwrap();
        commit(&ms, "a", "A").unwrap();
        create(&ms, Kind::Active, "b", "").unwrap();
        let opts = |p: &str| CommitOpts {
            labels: Labels::new(),
            parent: Some(p.to_string()),
        };
        ms.write(|tx| tx.commit_active("b", "B", Usage::default(), &opts("A")))
            .unwrap();
        let (_, info, _) = ms.read(|tx| tx.get_info("B")).unwrap();
        assert_eq!(info.parent, "A");
        assert_eq!(
            kind_of(ms.write(|tx| tx.remove("A"))),
            ErrorKind::FailedPrecondition
        );
        create(&ms, Kind::Active, "c", "A").unwrap();
        let r = ms.write(|tx| tx.commit_active("c", "C", Usage::default(), &opts("B")));
        assert_eq!(kind_of(r), ErrorKind::InvalidArgument);
        create(&ms, Kind::Active, "d", "").unwrap();
        let r = ms.write(|tx| tx.commit_active("d", "D", Usage::default(), &opts("nope")));
        assert_eq!(kind_of(r), ErrorKind::NotFound);
        let r = ms.write(|tx| tx.commit_active("d", "D", Usage::default(), &opts("c")));
        assert_eq!(kind_of(r), ErrorKind::FailedPrecondition);
    }

    #[test]
    fn remove_with_children_fails_and_unlinks_from_parent() {
        let (_d, ms) = store();
        create(&ms, Kind::Active, "a", "").unwrap();
        commit(&ms, "a", "A").unwrap();
        create(&ms, Kind::View, "v", "A").unwrap();
        let e = ms.write(|tx| tx.remove("A")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("remove"), "{e}");
        ms.write(|tx| tx.remove("v")).unwrap();
        assert_eq!(
            ms.write(|tx| tx.remove("A")).unwrap(),
            ("1".to_string(), Kind::Committed)
        );
    }

    #[test]
    fn update_label_rules() {
        let (_d, ms) = store();
        let mut l = Labels::new();
        l.insert("keep".into(), "1".into());
        l.insert("drop".into(), "2".into());
        ms.write(|tx| tx.create_snapshot(Kind::Active, "a", "", &l))
            .unwrap();
        let mut info = Info::named("a");
        info.labels.insert("new".into(), "3".into());
        info.labels.insert("keep".into(), "".into());
        let out = ms
            .write(|tx| tx.update_info(&info, &["labels.new", "labels.drop", "labels.keep"]))
            .unwrap();
        assert_eq!(out.labels.len(), 1, "{:?}", out.labels);
        assert_eq!(out.labels["new"], "3");
        assert!(out.updated > out.created);
        let r = ms.write(|tx| tx.update_info(&info, &["labels", "parent"]));
        assert_eq!(kind_of(r), ErrorKind::InvalidArgument);
        let (_, after, _) = ms.read(|tx| tx.get_info("a")).unwrap();
        assert_eq!(after.labels, out.labels, "a rejected update writes nothing");
    }

    #[test]
    fn store_is_durable_across_reopen_and_close_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.db");
        {
            let ms = MetaStore::open(&path).unwrap();
            create(&ms, Kind::Active, "a", "").unwrap();
            ms.close().unwrap();
            ms.close().unwrap();
            assert!(ms.read(|tx| tx.get_info("a")).is_err());
        }
        let ms = MetaStore::open(&path).unwrap();
        assert_eq!(ms.read(|tx| tx.id_map()).unwrap()["1"], "a");
    }
}
