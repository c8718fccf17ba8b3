//! `dtta summarize`: one table over every worker's committed shards, written beside the
//! run summaries as `_runs/summary.json` and `_runs/summary.parquet` for dashboards.
//!
//! Counts come from commit markers only (committed data); speeds and failures come from
//! the run summaries (`_runs/<run_id>.json`) the workers wrote.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::AsyncArrowWriter;
use serde::Serialize;

use super::commit::read_markers;
use super::{SinkError, Tally};
use crate::storage::{retrying, Location};

/// One line of the table: a method, over all workers (`worker = None`) or one worker.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    pub method: String,
    pub worker: Option<usize>,
    pub shards: usize,
    pub tally: Tally,
    /// Images per second of wall time, from the run summaries of that worker (all runs).
    pub images_per_s: Option<f64>,
}

impl SummaryRow {
    pub fn ms_per_image(&self) -> f64 {
        self.tally.adapt_ms / self.tally.predicted().max(1) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub output: String,
    pub committed_shards: usize,
    pub rows: Vec<SummaryRow>,
    /// Shards a run reported as failed that are still not committed: (shard, error).
    pub failed_shards: Vec<(String, String)>,
    pub runs: usize,
}

/// The parts of a run summary the table needs.
#[derive(serde::Deserialize)]
struct RunFacts {
    worker: crate::worker::Worker,
    method: String,
    elapsed_s: f64,
    tally: Tally,
    #[serde(default)]
    shards_failed: Vec<FailedFacts>,
}

#[derive(serde::Deserialize)]
struct FailedFacts {
    shard: String,
    error: String,
}

pub async fn summarize(out: &Location) -> Result<Summary, SinkError> {
    let markers = read_markers(out).await?;
    let runs = read_runs(out).await?;
    let mut rows: BTreeMap<(String, Option<usize>), SummaryRow> = BTreeMap::new();
    for m in markers.values() {
        for worker in [None, Some(m.worker_index)] {
            let row = rows.entry((m.method.clone(), worker)).or_insert_with(|| SummaryRow {
                method: m.method.clone(),
                worker,
                shards: 0,
                tally: Tally::default(),
                images_per_s: None,
            });
            row.shards += 1;
            row.tally.merge(&m.tally);
        }
    }
    // Speed per (method, worker): images over wall time, summed over that worker's runs.
    let mut speed: BTreeMap<(String, Option<usize>), (u64, f64)> = BTreeMap::new();
    for r in &runs {
        for worker in [None, Some(r.worker.index)] {
            let e = speed.entry((r.method.clone(), worker)).or_default();
            e.0 += r.tally.rows;
            e.1 += r.elapsed_s;
        }
    }
    for (key, row) in rows.iter_mut() {
        if let Some((images, secs)) = speed.get(key).filter(|(_, s)| *s > 0.0) {
            row.images_per_s = Some(*images as f64 / secs);
        }
    }
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    for r in &runs {
        for f in &r.shards_failed {
            if !markers.contains_key(&f.shard) {
                failed.insert(f.shard.clone(), f.error.clone());
            }
        }
    }
    Ok(Summary {
        output: out.display.clone(),
        committed_shards: markers.len(),
        rows: rows.into_values().collect(),
        failed_shards: failed.into_iter().collect(),
        runs: runs.len(),
    })
}

async fn read_runs(out: &Location) -> Result<Vec<RunFacts>, SinkError> {
    let dir = out.child("_runs");
    let metas: Vec<_> = retrying("listing _runs/", || out.store.list(Some(&dir)).try_collect())
        .await
        .map_err(|source| SinkError::Store {
            path: out.display_child("_runs/"),
            source,
        })?;
    let mut runs = Vec::new();
    for meta in metas {
        let name = meta.location.filename().unwrap_or_default().to_string();
        if !name.ends_with(".json") || name.starts_with("summary") {
            continue;
        }
        let bytes = retrying("reading a run summary", || async {
            out.store.get(&meta.location).await?.bytes().await
        })
        .await
        .map_err(|source| SinkError::Store {
            path: meta.location.to_string(),
            source,
        })?;
        match serde_json::from_slice::<RunFacts>(&bytes) {
            Ok(r) => runs.push(r),
            Err(e) => tracing::warn!("skipping {}: not a run summary ({e})", meta.location),
        }
    }
    Ok(runs)
}

/// Writes `_runs/summary.json` and `_runs/summary.parquet`; returns their display paths.
pub async fn write(out: &Location, summary: &Summary) -> Result<(String, String), SinkError> {
    let json = out.child("_runs/summary.json");
    let body = serde_json::to_vec_pretty(summary).expect("summaries serialize");
    out.store
        .put(&json, PutPayload::from(body))
        .await
        .map_err(|source| SinkError::Store {
            path: out.display_child("_runs/summary.json"),
            source,
        })?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("method", DataType::Utf8, false),
        Field::new("worker", DataType::Int64, true),
        Field::new("shards", DataType::UInt64, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("not_ok", DataType::UInt64, false),
        Field::new("labelled", DataType::UInt64, false),
        Field::new("top1_before", DataType::Float64, true),
        Field::new("top1_after", DataType::Float64, true),
        Field::new("ms_per_image", DataType::Float64, false),
        Field::new("images_per_s", DataType::Float64, true),
    ]));
    let r = &summary.rows;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.method.as_str()))),
        Arc::new(Int64Array::from_iter(r.iter().map(|x| x.worker.map(|w| w as i64)))),
        Arc::new(UInt64Array::from_iter_values(r.iter().map(|x| x.shards as u64))),
        Arc::new(UInt64Array::from_iter_values(r.iter().map(|x| x.tally.rows))),
        Arc::new(UInt64Array::from_iter_values(r.iter().map(|x| x.tally.not_ok()))),
        Arc::new(UInt64Array::from_iter_values(r.iter().map(|x| x.tally.labelled))),
        Arc::new(Float64Array::from_iter(r.iter().map(|x| x.tally.accuracy_before()))),
        Arc::new(Float64Array::from_iter(r.iter().map(|x| x.tally.accuracy_after()))),
        Arc::new(Float64Array::from_iter_values(r.iter().map(|x| x.ms_per_image()))),
        Arc::new(Float64Array::from_iter(r.iter().map(|x| x.images_per_s))),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match the schema");
    let parquet_path = out.display_child("_runs/summary.parquet");
    let parquet_err = |source| SinkError::Parquet {
        path: parquet_path.clone(),
        source,
    };
    let mut writer = AsyncArrowWriter::try_new(
        BufWriter::new(out.store.clone(), out.child("_runs/summary.parquet")),
        schema,
        None,
    )
    .map_err(parquet_err)?;
    writer.write(&batch).await.map_err(parquet_err)?;
    writer.close().await.map_err(parquet_err)?;
    Ok((out.display_child("_runs/summary.json"), parquet_path))
}
