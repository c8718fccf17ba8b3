//! Committing shards to the output's two Delta tables, reading what is committed, and
//! run summaries (`_runs/<run_id>.json`).
//!
//! One shard is one commit per table, each carrying the transaction id `dtta/<shard>`
//! and, in its `add` action's tags, the shard's [`CommitMarker`] (run, bundle, worker,
//! tally). Steps are committed first, predictions second; predictions is the table of
//! record. The rule for readers (README, "Outputs"): a shard is done when predictions
//! holds it; read predictions first, then steps, and every shard of that predictions
//! version has all its steps rows. A run killed between the two commits leaves a shard
//! in steps only, which the next run completes by committing the same run's predictions
//! file ([`complete_pairs`]), so the two tables never disagree for longer than that.
//!
//! Hazard: stores that ignore `PutMode::Create` would let two workers both commit one
//! version; every store dtta supports (S3, GCS, Azure, local, memory) honours it.

use std::collections::{BTreeMap, BTreeSet};

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::delta::{self, At, Commit, Committed, Table};
use super::predictions::Layout;
use super::{DataFile, SinkError, Tally};
use crate::storage::{retrying, Location};

/// What a shard's commit records about it, in the tags of its `add` actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitMarker {
    pub shard: String,
    pub run_id: String,
    /// Predictions file, relative to the output URL.
    pub predictions: String,
    /// Steps file, relative to the output URL.
    pub steps: String,
    /// Where the shard was read from (credentials redacted).
    pub source: String,
    pub method: String,
    /// The model bundle's digest (`model::bundle::sha256_of_files`).
    #[serde(default)]
    pub bundle_sha256: Option<String>,
    /// sha256 of the run's config, credentials stripped (`config::digest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    pub worker_index: usize,
    pub worker_count: usize,
    pub committed_at: String,
    pub tally: Tally,
}

/// The tag of an `add` action that holds its shard's [`CommitMarker`] as JSON.
pub const MARKER_TAG: &str = "dtta.commit";

/// What happened to a commit attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitResult {
    Committed,
    /// Another run committed this shard first; our output for it must be discarded.
    AlreadyCommitted,
}

/// Checkpoints are written every this many commits unless `output.checkpoint_interval`
/// says otherwise.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 100;

/// The output's two tables, each with the snapshot its commits last saw.
pub struct Tables {
    pub out: Location,
    pub predictions: Table,
    pub steps: Table,
}

/// The location of table `name` below `out`.
pub fn table_location(out: &Location, name: &str) -> Location {
    Location {
        store: out.store.clone(),
        prefix: out.child(name),
        display: out.display_child(name),
    }
}

impl Tables {
    pub fn new(out: &Location, checkpoint_interval: u64) -> Tables {
        Tables {
            out: out.clone(),
            predictions: Table::new(table_location(out, "predictions"), checkpoint_interval),
            steps: Table::new(table_location(out, "steps"), checkpoint_interval),
        }
    }
}

/// Refuses an output written by a dtta from before the Delta log (it has `_commits/`).
pub async fn refuse_old_layout(out: &Location) -> Result<(), SinkError> {
    let dir = out.child("_commits");
    let listing = retrying("listing _commits/", || out.store.list_with_delimiter(Some(&dir))).await;
    match listing {
        Ok(l) if !l.objects.is_empty() || !l.common_prefixes.is_empty() => Err(SinkError::OldLayout {
            output: out.display.clone(),
        }),
        Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(SinkError::Store {
            path: out.display_child("_commits/"),
            source,
        }),
    }
}

fn txn_id(shard: &str) -> String {
    format!("dtta/{shard}")
}

/// The `add` action of `file`, carrying `marker`.
fn add_action(file: &DataFile, table: &str, marker: &CommitMarker) -> delta::AddFile {
    let in_table = file.rel.strip_prefix(&format!("{table}/")).unwrap_or(&file.rel);
    let mut add = delta::AddFile::data_file(in_table, file.size, file.modified_ms, file.rows);
    add.tags.insert(
        MARKER_TAG.to_string(),
        serde_json::to_string(marker).expect("markers serialize"),
    );
    add
}

/// The commitInfo fields dtta adds: who committed what (README, "Outputs").
fn run_facts(marker: &CommitMarker, rows: u64) -> serde_json::Map<String, serde_json::Value> {
    let facts = serde_json::json!({
        "dtta": {
            "version": env!("CARGO_PKG_VERSION"),
            "run_id": marker.run_id,
            "bundle_sha256": marker.bundle_sha256,
            "config_sha256": marker.config_sha256,
            "worker_index": marker.worker_index,
            "worker_count": marker.worker_count,
            "method": marker.method,
            "shards": [marker.shard],
            "rows": rows,
        }
    });
    match facts {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("an object literal"),
    }
}

/// The marker in an `add` action's tags.
fn marker_of(table: &Table, add: &delta::AddFile) -> Result<CommitMarker, SinkError> {
    let json = add.tags.get(MARKER_TAG).ok_or_else(|| SinkError::Corrupt {
        path: table.loc.display_child(&delta::decode_path(&add.path)),
        message: format!("its add action has no {MARKER_TAG} tag (not written by dtta)"),
    })?;
    serde_json::from_str(json).map_err(|e| SinkError::Corrupt {
        path: table.loc.display_child(&delta::decode_path(&add.path)),
        message: format!("{MARKER_TAG}: {e}"),
    })
}

/// Commits one file of a shard to `table`: `Committed` when the table holds it now (by
/// this call, or by an earlier try of the same run), `AlreadyCommitted` when another run
/// holds the shard.
async fn commit_file(
    table: &Table,
    name: &str,
    file: &DataFile,
    marker: &CommitMarker,
    schema: &arrow_schema::Schema,
) -> Result<CommitResult, SinkError> {
    let commit = Commit::one_file(
        add_action(file, name, marker),
        txn_id(&marker.shard),
        run_facts(marker, file.rows),
    );
    match table.commit(&commit, schema).await? {
        Committed::Now(_) => Ok(CommitResult::Committed),
        Committed::Before(adds) => {
            let ours = adds
                .iter()
                .map(|a| marker_of(table, a))
                .collect::<Result<Vec<_>, _>>()?
                .iter()
                .any(|m| m.run_id == marker.run_id);
            Ok(match ours {
                true => CommitResult::Committed,
                false => CommitResult::AlreadyCommitted,
            })
        }
    }
}

/// Where a test stops the process dead (`DTTA_ABORT_AT=files:N` or `steps:N`): after
/// the Nth shard's files are written and before its commits, or after its steps commit
/// and before its predictions commit. Stands in for a SIGKILL at exactly that point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortPoint {
    Files,
    Steps,
}

impl AbortPoint {
    pub const ENV: &'static str = "DTTA_ABORT_AT";

    /// Aborts the process if `DTTA_ABORT_AT` names this point and this is its Nth pass.
    fn pass(self) {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;
        static TARGET: OnceLock<Option<(AbortPoint, u64)>> = OnceLock::new();
        static PASSES: AtomicU64 = AtomicU64::new(0);
        let target = TARGET.get_or_init(|| {
            let v = std::env::var(Self::ENV).ok()?;
            let (point, n) = v.split_once(':')?;
            let point = match point {
                "files" => AbortPoint::Files,
                "steps" => AbortPoint::Steps,
                _ => return None,
            };
            tracing::warn!("{}={v}: the process aborts there (a test aid)", Self::ENV);
            Some((point, n.trim().parse().ok()?))
        });
        if let Some((point, n)) = *target {
            if point == self && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == n {
                eprintln!("{}: aborting at {self:?} of shard pass {n}", Self::ENV);
                std::process::abort();
            }
        }
    }
}

/// Commits a shard's two files: steps, then predictions. A shard another run holds in
/// steps is that run's; if that run died before its predictions commit, this completes
/// it with that run's file, and our files are to be discarded.
pub async fn commit(
    tables: &Tables,
    marker: &CommitMarker,
    files: (&DataFile, &DataFile),
    layout: &Layout,
) -> Result<CommitResult, SinkError> {
    let (predictions, steps) = files;
    let steps_schema = super::steps::schema(layout);
    AbortPoint::Files.pass();
    match commit_file(&tables.steps, "steps", steps, marker, &steps_schema).await? {
        CommitResult::Committed => {
            AbortPoint::Steps.pass();
            let schema = super::predictions::schema(layout);
            commit_file(&tables.predictions, "predictions", predictions, marker, &schema).await
        }
        CommitResult::AlreadyCommitted => {
            complete_pairs(tables, layout).await?;
            Ok(CommitResult::AlreadyCommitted)
        }
    }
}

/// Commits to predictions the shards that steps holds and predictions lacks (a run died
/// between its two commits), with the predictions file of the run that committed the
/// steps. Returns those shards.
pub async fn complete_pairs(tables: &Tables, layout: &Layout) -> Result<Vec<String>, SinkError> {
    let steps = read_table_markers(&tables.steps, At::Latest).await?;
    let predictions = read_table_markers(&tables.predictions, At::Latest).await?;
    let schema = super::predictions::schema(layout);
    let mut completed = Vec::new();
    for (shard, marker) in steps.into_iter().filter(|(s, _)| !predictions.contains_key(s)) {
        let location = tables.out.child(&marker.predictions);
        let head = retrying(&format!("finding {}", marker.predictions), || {
            tables.out.store.head(&location)
        })
        .await
        .map_err(|source| SinkError::Store {
            path: tables.out.display_child(&marker.predictions),
            source,
        })?;
        let file = DataFile {
            rel: marker.predictions.clone(),
            rows: marker.tally.rows,
            size: head.size,
            modified_ms: head.last_modified.timestamp_millis(),
        };
        if commit_file(&tables.predictions, "predictions", &file, &marker, &schema).await? == CommitResult::Committed {
            tracing::info!(
                shard,
                run = marker.run_id,
                "completed the predictions commit of a run that stopped after its steps commit"
            );
            completed.push(shard);
        }
    }
    Ok(completed)
}

/// Every shard's marker in `table` (`predictions` or `steps`) below `out` at `at`.
pub async fn table_markers(out: &Location, table: &str, at: At) -> Result<BTreeMap<String, CommitMarker>, SinkError> {
    refuse_old_layout(out).await?;
    read_table_markers(&Table::new(table_location(out, table), DEFAULT_CHECKPOINT_INTERVAL), at).await
}

async fn read_table_markers(table: &Table, at: At) -> Result<BTreeMap<String, CommitMarker>, SinkError> {
    let snap = table.snapshot(at).await?;
    let mut markers = BTreeMap::new();
    for add in snap.files.values() {
        let marker = marker_of(table, add)?;
        markers.insert(marker.shard.clone(), marker);
    }
    Ok(markers)
}

/// Every committed shard's marker, by shard id, from the predictions table at `at`.
pub async fn read_markers_at(out: &Location, at: At) -> Result<BTreeMap<String, CommitMarker>, SinkError> {
    table_markers(out, "predictions", at).await
}

/// Every committed shard's marker, by shard id, from the latest predictions snapshot.
pub async fn read_markers(out: &Location) -> Result<BTreeMap<String, CommitMarker>, SinkError> {
    read_markers_at(out, At::Latest).await
}

/// Ids of committed shards (in the latest predictions snapshot), sorted.
pub async fn committed_ids(out: &Location) -> Result<Vec<String>, SinkError> {
    Ok(read_markers(out).await?.into_keys().collect())
}

/// Removes data files of `shard` written by runs other than `keep_run` (killed before
/// their commit, or losers of a commit race). Call only after the shard is committed:
/// then no other run can commit it, so none of these files can become referenced.
pub async fn remove_orphans(out: &Location, shard: &str, keep_run: &str) -> Result<usize, SinkError> {
    let mut removed = 0;
    for table in super::TABLES {
        removed += remove_table_orphans(out, table, shard, keep_run).await?;
    }
    Ok(removed)
}

async fn remove_table_orphans(out: &Location, table: &str, shard: &str, keep_run: &str) -> Result<usize, SinkError> {
    let (dir, base) = match shard.rsplit_once('/') {
        Some((d, b)) => (format!("{table}/{d}"), b),
        None => (table.to_string(), shard),
    };
    let prefix = out.child(&dir);
    let metas: Vec<_> = retrying(&format!("listing {dir}/"), || {
        out.store.list_with_delimiter(Some(&prefix))
    })
    .await
    .map(|l| l.objects)
    .or_else(|e| match e {
        object_store::Error::NotFound { .. } => Ok(Vec::new()),
        e => Err(e),
    })
    .map_err(|source| SinkError::Store {
        path: out.display_child(&dir),
        source,
    })?;
    let mut removed = 0;
    for meta in metas {
        let Some(name) = meta.location.filename() else { continue };
        let Some(run) = name
            .strip_prefix(base)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".parquet"))
        else {
            continue;
        };
        // Run ids hold no dots, so `a.b.<run>.parquet` is never taken for shard `a`.
        if run.contains('.') || run == keep_run {
            continue;
        }
        delete(out, &meta.location).await?;
        removed += 1;
    }
    Ok(removed)
}

/// Deletes one object of `out`'s store.
pub(crate) async fn delete(out: &Location, location: &object_store::path::Path) -> Result<(), SinkError> {
    out.store.delete(location).await.map_err(|source| SinkError::Store {
        path: location.to_string(),
        source,
    })
}

/// Removes the data files of `committed` shards that their commits do not name. The
/// committing run removes them itself right after its commit ([`remove_orphans`]), but a
/// run killed between the two leaves them, and no later run would otherwise look at a
/// committed shard again. Costs one listing per table. `markers` are the committed
/// shards' markers.
pub async fn sweep_orphans(
    out: &Location,
    committed: &BTreeSet<String>,
    markers: &BTreeMap<String, CommitMarker>,
) -> Result<usize, SinkError> {
    let mut suspects = BTreeSet::new();
    for table in super::TABLES {
        let prefix = out.child(table);
        let listing: Vec<_> = retrying(&format!("listing {table}/"), || {
            out.store.list(Some(&prefix)).try_collect()
        })
        .await
        .or_else(|e| match e {
            object_store::Error::NotFound { .. } => Ok(Vec::new()),
            e => Err(e),
        })
        .map_err(|source| SinkError::Store {
            path: out.display_child(table),
            source,
        })?;
        let mut files: BTreeMap<String, usize> = BTreeMap::new();
        for meta in listing {
            // `<table>/<shard>.<run_id>.parquet`; run ids hold no dots.
            let shard = out
                .relative(&meta.location)
                .filter(|rel| !rel.starts_with(&format!("{table}/_delta_log/")))
                .and_then(|rel| {
                    Some(
                        rel.strip_prefix(&format!("{table}/"))?
                            .strip_suffix(".parquet")?
                            .to_string(),
                    )
                })
                .and_then(|name| Some(name.rsplit_once('.')?.0.to_string()));
            if let Some(shard) = shard.filter(|s| committed.contains(s)) {
                *files.entry(shard).or_default() += 1;
            }
        }
        suspects.extend(files.into_iter().filter(|(_, n)| *n > 1).map(|(shard, _)| shard));
    }
    let mut removed = 0;
    for shard in suspects {
        if let Some(marker) = markers.get(&shard) {
            removed += remove_orphans(out, &shard, &marker.run_id).await?;
        }
    }
    Ok(removed)
}

/// Writes `_runs/<run_id>.json`.
pub async fn write_run_summary<T: Serialize>(out: &Location, run_id: &str, summary: &T) -> Result<String, SinkError> {
    let rel = format!("_runs/{run_id}.json");
    let body = serde_json::to_vec_pretty(summary).expect("summaries serialize");
    out.store
        .put(&out.child(&rel), PutPayload::from(body))
        .await
        .map_err(|source| SinkError::Store {
            path: out.display_child(&rel),
            source,
        })?;
    Ok(out.display_child(&rel))
}
