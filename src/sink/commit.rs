//! Commit markers (`_commits/<shard>.json`) and run summaries (`_runs/<run_id>.json`).
//!
//! Hazard: stores that ignore `PutMode::Create` would let two workers both "commit" a
//! shard; every store dtta supports (S3, GCS, Azure, local, memory) honours it.

use std::collections::{BTreeMap, BTreeSet};

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::{SinkError, Tally};
use crate::storage::retry::retry;
use crate::storage::{self, retrying, Backoff, Location};

/// The proof that a shard is done, and what it produced.
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
    /// The model bundle's digest (`model::bundle::sha256_of_files`); `None` in markers
    /// written before dtta recorded it.
    #[serde(default)]
    pub bundle_sha256: Option<String>,
    pub worker_index: usize,
    pub worker_count: usize,
    pub committed_at: String,
    pub tally: Tally,
}

/// What happened to a commit attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitResult {
    Committed,
    /// Another run committed this shard first; our output for it must be discarded.
    AlreadyCommitted,
}

fn marker_relative(shard: &str) -> String {
    format!("_commits/{shard}.json")
}

/// Creates the shard's marker unless one exists. The store client does not retry a
/// conditional create whose request may have reached the server (it is not idempotent);
/// this does, with [`Backoff::COMMIT`], because a marker found afterwards is checked for
/// being our own.
///
/// Hazard: a create whose response was lost, when tried again, finds the marker it wrote
/// itself. The existing marker's run id tells the two apart, so a run never mistakes its
/// own commit for another's (and deletes its data).
pub async fn commit(out: &Location, marker: &CommitMarker) -> Result<CommitResult, SinkError> {
    let rel = marker_relative(&marker.shard);
    let body = PutPayload::from(serde_json::to_vec_pretty(marker).expect("markers serialize"));
    let path = out.child(&rel);
    let created = retry(
        &format!("committing shard {}", marker.shard),
        Backoff::COMMIT,
        storage::is_final,
        || {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            out.store.put_opts(&path, body.clone(), opts)
        },
    )
    .await;
    match created {
        Ok(_) => Ok(CommitResult::Committed),
        Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => {
            match read_marker(out, &marker.shard).await?.run_id == marker.run_id {
                true => Ok(CommitResult::Committed),
                false => Ok(CommitResult::AlreadyCommitted),
            }
        }
        Err(source) => Err(SinkError::Store {
            path: out.display_child(&rel),
            source,
        }),
    }
}

/// Reads one shard's commit marker.
pub async fn read_marker(out: &Location, shard: &str) -> Result<CommitMarker, SinkError> {
    let rel = marker_relative(shard);
    let path = out.display_child(&rel);
    let location = out.child(&rel);
    let bytes = retrying(&format!("reading {path}"), || async {
        out.store.get(&location).await?.bytes().await
    })
    .await
    .map_err(|source| SinkError::Store {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| SinkError::Corrupt {
        path,
        message: e.to_string(),
    })
}

/// Ids of committed shards, from listing `_commits/` (no marker is read).
pub async fn committed_ids(out: &Location) -> Result<Vec<String>, SinkError> {
    let dir = out.child("_commits");
    let list_err = |source| SinkError::Store {
        path: out.display_child("_commits/"),
        source,
    };
    let metas: Vec<_> = retrying("listing _commits/", || out.store.list(Some(&dir)).try_collect())
        .await
        .map_err(list_err)?;
    let mut ids: Vec<String> = metas
        .iter()
        .filter_map(|m| out.relative(&m.location))
        .filter_map(|rel| rel.strip_prefix("_commits/")?.strip_suffix(".json").map(str::to_string))
        .collect();
    ids.sort();
    Ok(ids)
}

/// The bundle digest each of `shards` (committed shards) was made with, by shard id;
/// `None` for markers written before dtta recorded it. Reads the markers a few at a time.
pub async fn bundle_digests(
    out: &Location,
    shards: impl IntoIterator<Item = &String>,
) -> Result<BTreeMap<String, Option<String>>, SinkError> {
    futures::stream::iter(shards)
        .map(|shard| async move { Ok::<_, SinkError>((shard.clone(), read_marker(out, shard).await?.bundle_sha256)) })
        .buffer_unordered(16)
        .try_collect()
        .await
}

/// Every commit marker below `out`, by shard id.
pub async fn read_markers(out: &Location) -> Result<BTreeMap<String, CommitMarker>, SinkError> {
    let mut markers = BTreeMap::new();
    for id in committed_ids(out).await? {
        let marker = read_marker(out, &id).await?;
        markers.insert(id, marker);
    }
    Ok(markers)
}

/// Removes data files of `shard` written by runs other than `keep_run` (killed before
/// their commit, or losers of a commit race). Call only after the shard is committed.
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
        out.store
            .delete(&meta.location)
            .await
            .map_err(|source| SinkError::Store {
                path: meta.location.to_string(),
                source,
            })?;
        removed += 1;
    }
    Ok(removed)
}

/// Removes the data files of `committed` shards that their markers do not name. The
/// committing run removes them itself right after its commit ([`remove_orphans`]), but a
/// run killed between the two leaves them, and no later run would otherwise look at a
/// committed shard again. Costs one listing per table, plus a marker read and a listing
/// for each shard that has more than one file. Call only with shards known committed.
pub async fn sweep_orphans(out: &Location, committed: &BTreeSet<String>) -> Result<usize, SinkError> {
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
        let marker = read_marker(out, &shard).await?;
        removed += remove_orphans(out, &shard, &marker.run_id).await?;
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
