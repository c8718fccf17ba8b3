//! Delta Lake tables, written and read by dtta itself (protocol reader 1, writer 2: no
//! column mapping, deletion vectors or v2 checkpoints, so every engine reads them).
//!
//! A table is a folder of Parquet files plus `_delta_log/`: commit `N` is the object
//! `_delta_log/<N as 20 digits>.json`, one JSON action per line, created with
//! `PutMode::Create`. Whoever creates `N` first wins; a writer that loses reloads the log
//! and tries `N + 1`. Every `checkpoint_interval` versions the writer of that version also
//! writes `<N>.checkpoint.parquet` (the whole state at `N`) and points
//! `_delta_log/_last_checkpoint` at it, so opening the table reads one checkpoint plus
//! fewer than `checkpoint_interval` commits.
//!
//! Invariants:
//! - a data file is visible only once a commit's `add` names it; files written by a run
//!   that never committed are in no snapshot (`dtta vacuum` deletes them);
//! - a commit carries a transaction identifier (`txn`, app id per shard): a writer commits
//!   only when the snapshot just below its version lacks that id, so a shard is added
//!   once however often the commit is retried or raced.
//!
//! Hazards:
//! - S3 answers two simultaneous conditional writes of one key with 409, which the store
//!   client reports as `AlreadyExists` even when neither landed. That is handled like any
//!   lost race: reload, and the version is tried again if it is still free.
//! - `_last_checkpoint` is a hint that a slow writer can set back to an older checkpoint;
//!   readers list the log from it onwards, so a stale hint costs reads, never correctness.

pub mod checkpoint;
pub mod schema;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::SinkError;
use crate::storage::retry::retry;
use crate::storage::{self, retrying, Backoff, Location};

/// Versions of a table, from 0.
pub type Version = u64;

/// How one try of a commit failed: the version was taken (go back to the log and try
/// the next one), or something that trying again cannot fix.
#[derive(Debug)]
enum Attempt {
    LostRace(Version),
    Failed(SinkError),
}

impl From<SinkError> for Attempt {
    fn from(e: SinkError) -> Attempt {
        Attempt::Failed(e)
    }
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::LostRace(v) => write!(f, "another writer committed version {v} first"),
            Attempt::Failed(e) => e.fmt(f),
        }
    }
}

/// The log's `protocol` action: the oldest reader and writer features, which every
/// engine named in the README reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Protocol {
    pub min_reader_version: i32,
    pub min_writer_version: i32,
}

impl Protocol {
    pub const DTTA: Protocol = Protocol {
        min_reader_version: 1,
        min_writer_version: 2,
    };
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Format {
    pub provider: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// The log's `metaData` action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub format: Format,
    pub schema_string: String,
    #[serde(default)]
    pub partition_columns: Vec<String>,
    #[serde(default)]
    pub configuration: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_time: Option<i64>,
}

/// An `add` action: one data file of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddFile {
    /// Relative to the table's folder, percent-encoded (a URI reference).
    pub path: String,
    #[serde(default)]
    pub partition_values: BTreeMap<String, String>,
    pub size: i64,
    pub modification_time: i64,
    pub data_change: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<String>,
    /// dtta keeps each shard's commit record here (`sink::commit`): tags survive
    /// checkpoints, where commitInfo does not.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl AddFile {
    /// The `add` of a data file at `rel` (relative to the table, not yet encoded) that
    /// holds `rows` rows, with no tags.
    pub fn data_file(rel: &str, size: u64, modified_ms: i64, rows: u64) -> AddFile {
        AddFile {
            path: encode_path(rel),
            partition_values: BTreeMap::new(),
            size: size as i64,
            modification_time: modified_ms,
            data_change: true,
            stats: Some(serde_json::json!({ "numRecords": rows }).to_string()),
            tags: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoveFile {
    pub path: String,
    #[serde(default)]
    pub deletion_timestamp: Option<i64>,
    #[serde(default)]
    pub data_change: bool,
}

/// A `txn` action: the application `app_id` has committed `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Txn {
    pub app_id: String,
    pub version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<i64>,
}

/// One line of a commit file. Actions dtta neither writes nor needs (cdc, domain
/// metadata, ...) are ignored; a table whose protocol asks for them is refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Action {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_info: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<Metadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<Txn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add: Option<AddFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove: Option<RemoveFile>,
}

/// A table's state at one version.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `None`: the table has no commit yet.
    pub version: Option<Version>,
    pub protocol: Option<Protocol>,
    pub metadata: Option<Metadata>,
    /// Live data files by (percent-encoded) path.
    pub files: BTreeMap<String, AddFile>,
    /// Transaction identifiers: app id -> version.
    pub txns: HashMap<String, i64>,
}

impl Snapshot {
    fn apply(&mut self, action: Action) {
        if let Some(p) = action.protocol {
            self.protocol = Some(p);
        }
        if let Some(m) = action.meta_data {
            self.metadata = Some(m);
        }
        if let Some(t) = action.txn {
            self.txns.insert(t.app_id, t.version);
        }
        if let Some(a) = action.add {
            self.files.insert(a.path.clone(), a);
        }
        if let Some(r) = action.remove {
            self.files.remove(&r.path);
        }
    }

    /// The `add` actions and other state that a checkpoint at this version holds.
    pub fn actions(&self) -> impl Iterator<Item = Action> + '_ {
        let protocol = self.protocol.clone().map(|p| Action {
            protocol: Some(p),
            ..Default::default()
        });
        let metadata = self.metadata.clone().map(|m| Action {
            meta_data: Some(m),
            ..Default::default()
        });
        let mut txns: Vec<_> = self.txns.iter().collect();
        txns.sort();
        protocol
            .into_iter()
            .chain(metadata)
            .chain(txns.into_iter().map(|(app_id, version)| Action {
                txn: Some(Txn {
                    app_id: app_id.clone(),
                    version: *version,
                    last_updated: None,
                }),
                ..Default::default()
            }))
            .chain(self.files.values().map(|a| Action {
                add: Some(a.clone()),
                ..Default::default()
            }))
    }
}

/// Which version of a table to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum At {
    #[default]
    Latest,
    Version(Version),
    /// The last version committed at or before this time (milliseconds since the epoch).
    Timestamp(i64),
}

/// What one commit adds: its data files, its transaction id and its commitInfo.
#[derive(Debug, Clone)]
pub struct Commit {
    pub adds: Vec<AddFile>,
    pub txn: Txn,
    /// Fields of commitInfo beyond Delta's own (timestamp, operation, engineInfo).
    pub info: serde_json::Map<String, Value>,
}

impl Commit {
    /// A commit of one file under the transaction id `app_id` (version 0: dtta commits
    /// each id once).
    pub fn one_file(add: AddFile, app_id: String, info: serde_json::Map<String, Value>) -> Commit {
        Commit {
            adds: vec![add],
            txn: Txn {
                app_id,
                version: 0,
                last_updated: None,
            },
            info,
        }
    }
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Committed {
    /// At this version.
    Now(Version),
    /// The snapshot already held the transaction id; these are the files that carried it.
    Before(Vec<AddFile>),
}

/// One Delta table below an output, with the snapshot last seen (commits reuse it and read
/// only newer versions).
pub struct Table {
    pub loc: Location,
    pub checkpoint_interval: u64,
    cached: tokio::sync::Mutex<Snapshot>,
}

/// The log file of commit `v`, relative to the table.
pub fn commit_file(v: Version) -> String {
    format!("_delta_log/{v:020}.json")
}

fn checkpoint_file(v: Version) -> String {
    format!("_delta_log/{v:020}.checkpoint.parquet")
}

const LAST_CHECKPOINT: &str = "_delta_log/_last_checkpoint";

/// The `_last_checkpoint` hint.
#[derive(Debug, Serialize, Deserialize)]
struct LastCheckpoint {
    version: Version,
    size: u64,
}

impl Table {
    pub fn new(loc: Location, checkpoint_interval: u64) -> Table {
        Table {
            loc,
            checkpoint_interval: checkpoint_interval.max(1),
            cached: Default::default(),
        }
    }

    fn store_err(&self, rel: &str) -> impl Fn(object_store::Error) -> SinkError + '_ {
        let path = self.loc.display_child(rel);
        move |source| SinkError::Store {
            path: path.clone(),
            source,
        }
    }

    fn corrupt(&self, rel: &str, message: impl Into<String>) -> SinkError {
        SinkError::Corrupt {
            path: self.loc.display_child(rel),
            message: message.into(),
        }
    }

    /// Reads commit `v`; `None` when it does not exist.
    pub async fn read_commit(&self, v: Version) -> Result<Option<Vec<Action>>, SinkError> {
        let rel = commit_file(v);
        let path = self.loc.child(&rel);
        let got = retrying(&format!("reading {rel}"), || async {
            self.loc.store.get(&path).await?.bytes().await
        })
        .await;
        let bytes = match got {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_err(&rel)(e)),
        };
        let text = std::str::from_utf8(&bytes).map_err(|e| self.corrupt(&rel, e.to_string()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<Action>(l).map_err(|e| self.corrupt(&rel, e.to_string())))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Versions of the commit and checkpoint files in `_delta_log/` from `from` on.
    async fn list_log(&self, from: Version) -> Result<(Vec<Version>, Vec<Version>), SinkError> {
        let dir = self.loc.child("_delta_log");
        // Keys sort by version (20 digits); the offset skips everything before `from`.
        let offset = self.loc.child(&format!("_delta_log/{:020}", from.saturating_sub(1)));
        let metas: Vec<_> = retrying("listing _delta_log/", || {
            let stream = match from {
                0 => self.loc.store.list(Some(&dir)),
                _ => self.loc.store.list_with_offset(Some(&dir), &offset),
            };
            stream.try_collect::<Vec<_>>()
        })
        .await
        .map_err(self.store_err("_delta_log/"))?;
        let (mut commits, mut checkpoints) = (Vec::new(), Vec::new());
        for meta in metas {
            let Some(name) = meta.location.filename() else { continue };
            let (digits, rest) = name.split_at(name.len().min(20));
            let Ok(v) = digits.parse::<Version>() else { continue };
            if v < from || digits.len() != 20 {
                continue;
            }
            match rest {
                ".json" => commits.push(v),
                ".checkpoint.parquet" => checkpoints.push(v),
                _ => {}
            }
        }
        commits.sort_unstable();
        checkpoints.sort_unstable();
        Ok((commits, checkpoints))
    }

    async fn last_checkpoint_hint(&self) -> Result<Option<Version>, SinkError> {
        let path = self.loc.child(LAST_CHECKPOINT);
        match retrying("reading _last_checkpoint", || async {
            self.loc.store.get(&path).await?.bytes().await
        })
        .await
        {
            Ok(bytes) => Ok(serde_json::from_slice::<LastCheckpoint>(&bytes).ok().map(|h| h.version)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err(LAST_CHECKPOINT)(e)),
        }
    }

    /// The table at `at`, read from the newest checkpoint at or below it plus the commits
    /// after that checkpoint. A table with no commit yet is an empty snapshot (for
    /// `At::Latest`) or an error (for a version that does not exist).
    pub async fn snapshot(&self, at: At) -> Result<Snapshot, SinkError> {
        let target = match at {
            At::Latest => None,
            At::Version(v) => Some(v),
            At::Timestamp(ms) => Some(self.version_at(ms).await?),
        };
        let hint = self
            .last_checkpoint_hint()
            .await?
            .filter(|h| target.is_none_or(|t| *h <= t));
        let (commits, checkpoints) = self.list_log(hint.unwrap_or(0)).await?;
        let wanted = |v: &Version| target.is_none_or(|t| *v <= t);
        let newest_checkpoint = checkpoints.iter().copied().filter(wanted).max();
        let mut snap = Snapshot::default();
        if let Some(v) = newest_checkpoint {
            for action in checkpoint::read(&self.loc, &checkpoint_file(v)).await? {
                snap.apply(action);
            }
            snap.version = Some(v);
        } else if hint.is_some() {
            return Err(self.corrupt(LAST_CHECKPOINT, "names a checkpoint that is not in _delta_log/"));
        }
        let start = snap.version.map_or(0, |v| v + 1);
        let todo: Vec<Version> = commits.into_iter().filter(|v| *v >= start && wanted(v)).collect();
        for (i, v) in todo.iter().enumerate() {
            if *v != start + i as u64 {
                return Err(self.corrupt(&commit_file(start + i as u64), "missing: the log has a gap"));
            }
        }
        // Read a few commits at a time, apply them in order.
        let mut reads = futures::stream::iter(
            todo.iter()
                .copied()
                .map(|v| async move { (v, self.read_commit(v).await) }),
        )
        .buffered(16);
        while let Some((v, actions)) = reads.next().await {
            let actions = actions?.ok_or_else(|| self.corrupt(&commit_file(v), "listed but gone"))?;
            for action in actions {
                snap.apply(action);
            }
            snap.version = Some(v);
        }
        if let Some(t) = target {
            if snap.version != Some(t) {
                return Err(self.corrupt(&commit_file(t), "no such version of the table"));
            }
        }
        self.check_protocol(&snap)?;
        Ok(snap)
    }

    fn check_protocol(&self, snap: &Snapshot) -> Result<(), SinkError> {
        match &snap.protocol {
            Some(p) if p.min_reader_version > 1 || p.min_writer_version > Protocol::DTTA.min_writer_version => {
                Err(self.corrupt(
                    "_delta_log/",
                    format!(
                        "the table needs reader {} / writer {}; dtta reads 1 and writes 2 (features such as \
                         column mapping or deletion vectors were enabled by another engine)",
                        p.min_reader_version, p.min_writer_version
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The last version whose commitInfo timestamp is at or before `ms`, by bisection over
    /// the commits (timestamps grow with versions, as every writer stamps its own clock
    /// at commit time; a skewed clock moves the answer by the skew).
    pub async fn version_at(&self, ms: i64) -> Result<Version, SinkError> {
        let latest = self
            .latest_version()
            .await?
            .ok_or_else(|| self.corrupt("_delta_log/", "the table is empty"))?;
        let stamp = |v| async move {
            let actions = self
                .read_commit(v)
                .await?
                .ok_or_else(|| self.corrupt(&commit_file(v), "missing"))?;
            Ok::<_, SinkError>(commit_timestamp(&actions).unwrap_or(i64::MIN))
        };
        if stamp(0).await? > ms {
            return Err(self.corrupt(
                &commit_file(0),
                format!("the table's first commit is later than {}", format_ms(ms)),
            ));
        }
        let (mut lo, mut hi) = (0, latest);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if stamp(mid).await? <= ms {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Ok(lo)
    }

    /// The newest version, from a listing; `None` for a table with no commit.
    pub async fn latest_version(&self) -> Result<Option<Version>, SinkError> {
        let hint = self.last_checkpoint_hint().await?.unwrap_or(0);
        let (commits, _) = self.list_log(hint).await?;
        Ok(commits.last().copied())
    }

    /// The snapshot last seen, brought up to date by reading the commits after it (one
    /// GET each, plus one that finds nothing).
    async fn refresh(&self, snap: &mut Snapshot) -> Result<(), SinkError> {
        if snap.version.is_none() {
            *snap = self.snapshot(At::Latest).await?;
            return Ok(());
        }
        loop {
            let next = snap.version.map_or(0, |v| v + 1);
            match self.read_commit(next).await? {
                Some(actions) => {
                    for action in actions {
                        snap.apply(action);
                    }
                    snap.version = Some(next);
                }
                None => break,
            }
        }
        self.check_protocol(snap)
    }

    /// Commits `commit` unless the table already holds its transaction id. Creates the
    /// table (protocol and metadata with `schema`) if it has no commit yet; refuses a
    /// table whose schema is not `schema`.
    ///
    /// The put of a commit file is retried on transient errors with [`Backoff::COMMIT`];
    /// a put that fails because the version exists (another writer's, or our own whose
    /// response was lost) sends us back to the log, where the transaction id tells the two
    /// apart.
    pub async fn commit(&self, commit: &Commit, schema: &arrow_schema::Schema) -> Result<Committed, SinkError> {
        let schema_string = schema::schema_string(schema);
        let what = format!("committing to {}", self.loc.display);
        let is_final = |e: &Attempt| !matches!(e, Attempt::LostRace(_));
        match retry(&what, Backoff::COMMIT_RACE, is_final, || {
            self.try_commit(commit, &schema_string)
        })
        .await
        {
            Ok(done) => Ok(done),
            Err(Attempt::Failed(e)) => Err(e),
            Err(Attempt::LostRace(v)) => Err(self.corrupt(
                &commit_file(v),
                format!("lost {} commit races in a row", Backoff::COMMIT_RACE.retries + 1),
            )),
        }
    }

    /// One try of [`Table::commit`] at the version after the latest.
    async fn try_commit(&self, commit: &Commit, schema_string: &str) -> Result<Committed, Attempt> {
        let mut snap = self.cached.lock().await;
        self.refresh(&mut snap).await?;
        if snap.txns.contains_key(&commit.txn.app_id) {
            let carried: Vec<AddFile> = snap
                .files
                .values()
                .filter(|a| a.tags.get(TXN_TAG) == Some(&commit.txn.app_id))
                .cloned()
                .collect();
            return Ok(Committed::Before(carried));
        }
        if let Some(m) = &snap.metadata {
            if m.schema_string != *schema_string {
                return Err(self
                    .corrupt(
                        "_delta_log/",
                        "the table's columns differ from this run's (another task's output, or an older dtta's); \
                             write to a new output URL",
                    )
                    .into());
            }
        }
        let version = snap.version.map_or(0, |v| v + 1);
        let now = chrono::Utc::now().timestamp_millis();
        let mut actions = Vec::new();
        let mut info = serde_json::Map::new();
        info.insert("timestamp".into(), now.into());
        info.insert("operation".into(), "WRITE".into());
        info.insert("operationParameters".into(), serde_json::json!({"mode": "Append"}));
        info.insert("isBlindAppend".into(), true.into());
        info.insert(
            "engineInfo".into(),
            format!("dtta/{}", env!("CARGO_PKG_VERSION")).into(),
        );
        info.extend(commit.info.clone());
        actions.push(Action {
            commit_info: Some(Value::Object(info)),
            ..Default::default()
        });
        if snap.version.is_none() {
            actions.push(Action {
                protocol: Some(Protocol::DTTA),
                ..Default::default()
            });
            actions.push(Action {
                meta_data: Some(Metadata {
                    id: new_table_id(),
                    name: None,
                    format: Format {
                        provider: "parquet".into(),
                        options: BTreeMap::new(),
                    },
                    schema_string: schema_string.to_string(),
                    partition_columns: Vec::new(),
                    configuration: BTreeMap::new(),
                    created_time: Some(now),
                }),
                ..Default::default()
            });
        }
        actions.push(Action {
            txn: Some(Txn {
                last_updated: Some(now),
                ..commit.txn.clone()
            }),
            ..Default::default()
        });
        for add in &commit.adds {
            let mut add = add.clone();
            add.tags.insert(TXN_TAG.into(), commit.txn.app_id.clone());
            actions.push(Action {
                add: Some(add),
                ..Default::default()
            });
        }
        let mut body = Vec::new();
        for a in &actions {
            serde_json::to_writer(&mut body, a).expect("actions serialize");
            body.push(b'\n');
        }
        let rel = commit_file(version);
        let path = self.loc.child(&rel);
        let payload = PutPayload::from(body);
        let created = retry(&format!("committing {rel}"), Backoff::COMMIT, storage::is_final, || {
            self.loc.store.put_opts(
                &path,
                payload.clone(),
                PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                },
            )
        })
        .await;
        match created {
            Ok(_) => {
                for a in actions {
                    snap.apply(a);
                }
                snap.version = Some(version);
                if version > 0 && version % self.checkpoint_interval == 0 {
                    // Best effort: a missing checkpoint only makes opening slower.
                    if let Err(e) = self.write_checkpoint(&snap).await {
                        tracing::warn!("could not write the checkpoint at version {version}: {e}");
                    }
                }
                Ok(Committed::Now(version))
            }
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                tracing::debug!("{rel} exists (another writer's commit, or ours whose response was lost)");
                Err(Attempt::LostRace(version))
            }
            Err(e) => Err(self.store_err(&rel)(e).into()),
        }
    }

    /// Writes `<version>.checkpoint.parquet` with the state of `snap`, then points
    /// `_last_checkpoint` at it. Only the writer of that version writes it, so two writers
    /// never write one checkpoint; a retried write puts the same bytes again.
    pub async fn write_checkpoint(&self, snap: &Snapshot) -> Result<(), SinkError> {
        let Some(version) = snap.version else { return Ok(()) };
        let rows = checkpoint::write(&self.loc, &checkpoint_file(version), snap).await?;
        let hint = serde_json::to_vec(&LastCheckpoint { version, size: rows }).expect("hint serializes");
        self.loc
            .store
            .put(&self.loc.child(LAST_CHECKPOINT), PutPayload::from(hint))
            .await
            .map_err(self.store_err(LAST_CHECKPOINT))?;
        Ok(())
    }

    /// Data files below the table (not the log), with their age; for vacuum.
    pub async fn data_files(&self) -> Result<Vec<object_store::ObjectMeta>, SinkError> {
        let metas: Vec<_> = retrying("listing the table", || {
            self.loc.store.list(Some(&self.loc.prefix)).try_collect::<Vec<_>>()
        })
        .await
        .or_else(|e| match e {
            object_store::Error::NotFound { .. } => Ok(Vec::new()),
            e => Err(e),
        })
        .map_err(self.store_err(""))?;
        Ok(metas
            .into_iter()
            .filter(|m| {
                self.loc
                    .relative(&m.location)
                    .is_some_and(|rel| !rel.starts_with("_delta_log/") && rel.ends_with(".parquet"))
            })
            .collect())
    }

    /// The store path of a data file named by an `add` path.
    pub fn file_location(&self, add_path: &str) -> Path {
        self.loc.child(&decode_path(add_path))
    }
}

/// The tag of an `add` that names the transaction id of its commit.
pub const TXN_TAG: &str = "dtta.txn";

/// The commitInfo timestamp of a commit's actions.
pub fn commit_timestamp(actions: &[Action]) -> Option<i64> {
    actions
        .iter()
        .find_map(|a| a.commit_info.as_ref()?.get("timestamp")?.as_i64())
}

/// Milliseconds since the epoch as RFC 3339, for messages.
pub fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or(ms.to_string(), |t| t.to_rfc3339())
}

fn new_table_id() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Characters kept as they are in an `add` path: RFC 3986's unreserved ones and `/`.
const PATH_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// A path relative to the table as an `add` path (a relative URI).
pub fn encode_path(rel: &str) -> String {
    percent_encoding::utf8_percent_encode(rel, PATH_SET).to_string()
}

pub fn decode_path(add_path: &str) -> String {
    percent_encoding::percent_decode_str(add_path)
        .decode_utf8_lossy()
        .into_owned()
}

/// Shared so that callers can hold tables in one place.
pub type TableRef = Arc<Table>;

#[cfg(test)]
mod tests;
