//! Looking after an output's tables: their history (`dtta history`) and removing data
//! files that no commit references (`dtta vacuum`).

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use super::commit::{refuse_old_layout, table_location, DEFAULT_CHECKPOINT_INTERVAL};
use super::delta::{self, Table, Version};
use super::SinkError;
use crate::storage::Location;

/// One version of the predictions table, with the facts its commit carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    pub version: Version,
    /// commitInfo's timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    pub run_id: Option<String>,
    pub worker: Option<(u64, u64)>,
    pub bundle_sha256: Option<String>,
    pub shards: Vec<String>,
    /// Rows the commit added (its files' `numRecords`).
    pub rows: u64,
    /// Files the commit added.
    pub files: usize,
}

/// Every version of `out`'s predictions table, oldest first. Reads each commit file
/// (16 at a time); versions only a checkpoint still holds are not listed.
pub async fn history(out: &Location) -> Result<Vec<HistoryEntry>, SinkError> {
    refuse_old_layout(out).await?;
    let table = Table::new(table_location(out, "predictions"), DEFAULT_CHECKPOINT_INTERVAL);
    let Some(latest) = table.latest_version().await? else {
        return Ok(Vec::new());
    };
    let table = &table;
    let entries: Vec<Result<Option<HistoryEntry>, SinkError>> = futures::stream::iter(0..=latest)
        .map(|v| async move {
            let Some(actions) = table.read_commit(v).await? else {
                return Ok(None);
            };
            let facts = actions
                .iter()
                .find_map(|a| a.commit_info.as_ref()?.get("dtta").cloned())
                .unwrap_or_default();
            let text = |k: &str| facts.get(k).and_then(|x| x.as_str()).map(str::to_string);
            let adds: Vec<&delta::AddFile> = actions.iter().filter_map(|a| a.add.as_ref()).collect();
            Ok(Some(HistoryEntry {
                version: v,
                timestamp_ms: delta::commit_timestamp(&actions),
                run_id: text("run_id"),
                worker: facts
                    .get("worker_index")
                    .and_then(|i| i.as_u64())
                    .zip(facts.get("worker_count").and_then(|n| n.as_u64())),
                bundle_sha256: text("bundle_sha256"),
                shards: facts
                    .get("shards")
                    .and_then(|s| s.as_array())
                    .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                    .unwrap_or_default(),
                rows: adds.iter().map(|a| records(a)).sum(),
                files: adds.len(),
            }))
        })
        .buffered(16)
        .collect()
        .await;
    let mut out = Vec::new();
    for e in entries {
        out.extend(e?);
    }
    Ok(out)
}

/// `numRecords` of an `add` action's stats; 0 without stats.
pub fn records(add: &delta::AddFile) -> u64 {
    add.stats
        .as_deref()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|s| s.get("numRecords")?.as_u64())
        .unwrap_or(0)
}

/// What `vacuum` found and did, per table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VacuumReport {
    pub table: String,
    /// Data files the latest snapshot references (kept).
    pub referenced: usize,
    /// Unreferenced files younger than the retention (kept: a run may still commit them).
    pub recent: usize,
    /// Unreferenced files older than the retention, deleted (or, dry, to delete).
    pub removed: Vec<String>,
    pub removed_bytes: u64,
}

/// Deletes the data files of `out`'s tables that no commit references and that are
/// older than `retention`. Never deletes a referenced file: the referenced set is read
/// after the listing, so a file committed in between is seen as referenced.
///
/// Hazard: a run still writing a shard has files no commit references yet; the
/// retention must exceed the longest time a shard takes from its first write to its
/// commit (the default, 7 days, does by far).
pub async fn vacuum(out: &Location, retention: Duration, dry_run: bool) -> Result<Vec<VacuumReport>, SinkError> {
    refuse_old_layout(out).await?;
    let cutoff = chrono::Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut reports = Vec::new();
    for name in super::TABLES {
        let table = Table::new(table_location(out, name), DEFAULT_CHECKPOINT_INTERVAL);
        let files = table.data_files().await?;
        let snap = table.snapshot(delta::At::Latest).await?;
        let referenced: BTreeSet<object_store::path::Path> =
            snap.files.keys().map(|p| table.file_location(p)).collect();
        let mut report = VacuumReport {
            table: table.loc.display.clone(),
            ..Default::default()
        };
        for meta in files {
            if referenced.contains(&meta.location) {
                report.referenced += 1;
            } else if meta.last_modified > cutoff {
                report.recent += 1;
            } else {
                if !dry_run {
                    super::commit::delete(&table.loc, &meta.location).await?;
                }
                report.removed_bytes += meta.size;
                report
                    .removed
                    .push(table.loc.relative(&meta.location).unwrap_or_default());
            }
        }
        reports.push(report);
    }
    Ok(reports)
}
