//! `dtta summarize`: one table over every worker's committed shards, written beside the
//! run summaries as `_runs/summary.json` and `_runs/summary.parquet` for dashboards.
//!
//! Counts come from the shards' commit records in the predictions table's snapshot only
//! (committed data); speeds and failures come from the run summaries
//! (`_runs/<run_id>.json`) the workers wrote.
//!
//! An output URL without a predictions table of its own is read as a parent of outputs
//! (one per method, as `make eval` writes): every direct child folder with one counts.
//! Runs with `[corrupt]` also get the robustness table, one row per method and variant,
//! written as `_runs/robustness.csv` and `_runs/robustness.parquet`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::AsyncArrowWriter;
use serde::Serialize;

use crate::sample::Variant;
use crate::sink::commit::{read_markers_at, CommitMarker};
use crate::sink::delta::At;
use crate::sink::{SinkError, Tally};
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
        self.tally.ms_per_image()
    }

    pub fn denoiser_evals_per_image(&self) -> f64 {
        self.tally.denoiser_evals_per_image()
    }
}

/// One cell group of the robustness table: a method on one variant, over all workers.
#[derive(Debug, Clone, Serialize)]
pub struct VariantRow {
    pub method: String,
    /// `clean` or an ImageNet-C corruption name.
    pub corruption: String,
    /// 0 for `clean`, else 1..=5.
    pub severity: u8,
    pub tally: Tally,
}

impl VariantRow {
    pub fn ms_per_image(&self) -> f64 {
        self.tally.ms_per_image()
    }

    pub fn denoiser_evals_per_image(&self) -> f64 {
        self.tally.denoiser_evals_per_image()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub output: String,
    pub committed_shards: usize,
    pub rows: Vec<SummaryRow>,
    /// Per method and variant, for runs with `[corrupt]`; sorted by variant, then method.
    pub variants: Vec<VariantRow>,
    /// Shards a run reported as failed that are still not committed: (shard, error).
    pub failed_shards: Vec<(String, String)>,
    pub runs: usize,
    /// Committed shards per model bundle digest (`None`: a commit record without one);
    /// more than one entry means the output mixes models.
    pub bundles: Vec<(Option<String>, usize)>,
    /// Every run summary found, by output and start time.
    pub run_list: Vec<RunLine>,
}

/// One run, as its summary (`_runs/<run_id>.json`) records it.
#[derive(Debug, Clone, Serialize)]
pub struct RunLine {
    /// The output it wrote to (one of several below a parent of outputs).
    pub output: String,
    /// When it started (RFC 3339, UTC); lines sort by it within an output.
    pub started_at: String,
    pub run_id: String,
    pub worker: usize,
    pub method: String,
    pub shards_committed: usize,
    /// The model bundle's digest; `None` for runs from before dtta recorded it.
    pub bundle_sha256: Option<String>,
}

/// The parts of a run summary the table needs.
#[derive(serde::Deserialize)]
struct RunFacts {
    #[serde(default)]
    run_id: String,
    /// RFC 3339 with sub-second digits; run ids only sort by the second they start in.
    #[serde(default)]
    started_at: String,
    #[serde(default)]
    bundle_sha256: Option<String>,
    #[serde(default)]
    shards_committed: Vec<String>,
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

/// Summarizes the committed shards below `out` as of `at` (README, "Outputs": time
/// travel); at an older version, only the runs that committed shards by then count.
pub async fn summarize(out: &Location, at: At) -> Result<Summary, SinkError> {
    let mut markers = Vec::new();
    let mut runs = Vec::new();
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let mut run_list = Vec::new();
    for (output, committed) in committed_below(std::slice::from_ref(out), at).await? {
        let mut output_runs: Vec<RunFacts> = read_runs(&output).await?;
        if at != At::Latest {
            let in_snapshot: BTreeSet<&str> = committed.values().map(|m| m.run_id.as_str()).collect();
            output_runs.retain(|r| in_snapshot.contains(r.run_id.as_str()));
        }
        for f in output_runs.iter().flat_map(|r| &r.shards_failed) {
            if !committed.contains_key(&f.shard) {
                failed.insert(output.display_child(&f.shard), f.error.clone());
            }
        }
        markers.extend(committed.into_values());
        run_list.extend(output_runs.iter().map(|r| RunLine {
            output: output.display.clone(),
            started_at: r.started_at.clone(),
            run_id: r.run_id.clone(),
            worker: r.worker.index,
            method: r.method.clone(),
            shards_committed: r.shards_committed.len(),
            bundle_sha256: r.bundle_sha256.clone(),
        }));
        runs.extend(output_runs);
    }
    run_list.sort_by(|a, b| (&a.output, &a.started_at, &a.run_id).cmp(&(&b.output, &b.started_at, &b.run_id)));
    let mut bundles: BTreeMap<Option<String>, usize> = BTreeMap::new();
    for m in &markers {
        *bundles.entry(m.bundle_sha256.clone()).or_default() += 1;
    }
    let mut rows: BTreeMap<(String, Option<usize>), SummaryRow> = BTreeMap::new();
    let mut variants: BTreeMap<(u8, String, String), VariantRow> = BTreeMap::new();
    for m in &markers {
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
        for (tag, tally) in &m.tally.by_variant {
            let variant: Variant = tag.parse().map_err(|e| SinkError::Corrupt {
                path: format!("commit record of shard {}", m.shard),
                message: e,
            })?;
            let (corruption, severity) = (variant.corruption_name().to_string(), variant.severity);
            // Clean first, then by corruption name and severity.
            let order = u8::from(severity > 0);
            let row = variants
                .entry((order, format!("{corruption}/{severity}"), m.method.clone()))
                .or_insert_with(|| VariantRow {
                    method: m.method.clone(),
                    corruption,
                    severity,
                    tally: Tally::default(),
                });
            row.tally.merge(tally);
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
    Ok(Summary {
        output: out.display.clone(),
        committed_shards: markers.len(),
        rows: rows.into_values().collect(),
        variants: variants.into_values().collect(),
        failed_shards: failed.into_iter().collect(),
        runs: runs.len(),
        bundles: bundles.into_iter().collect(),
        run_list,
    })
}

/// Each output below `outs` ([`outputs_below`]) with its committed shards' markers at
/// `at`. A version number names one table's version, so it is refused when `outs`
/// hold more than one output; a timestamp applies to each.
pub async fn committed_below(
    outs: &[Location],
    at: At,
) -> Result<Vec<(Location, BTreeMap<String, CommitMarker>)>, SinkError> {
    let mut outputs = Vec::new();
    for out in outs {
        outputs.extend(outputs_below(out).await?);
    }
    if let (At::Version(v), [_, _, ..]) = (at, outputs.as_slice()) {
        return Err(SinkError::Corrupt {
            path: outputs
                .iter()
                .map(|o| o.display.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            message: format!(
                "--version {v} is ambiguous over {} outputs; name one output, or use --as-of",
                outputs.len()
            ),
        });
    }
    let mut found = Vec::new();
    for output in outputs {
        let markers = read_markers_at(&output, at).await?;
        found.push((output, markers));
    }
    Ok(found)
}

/// `out` when it is an output (it has a predictions table, or the `_commits/` markers of
/// an older dtta, which reading then refuses) or nothing below it at all, else its direct
/// child folders that are outputs.
pub async fn outputs_below(out: &Location) -> Result<Vec<Location>, SinkError> {
    let is_output = |loc: Location| async move {
        for rel in ["predictions/_delta_log", "_commits"] {
            let dir = loc.child(rel);
            let found = retrying(&format!("listing {rel}/"), || loc.store.list_with_delimiter(Some(&dir)))
                .await
                .map(|l| !l.objects.is_empty())
                .unwrap_or(false);
            if found {
                return true;
            }
        }
        false
    };
    if is_output(out.clone()).await {
        return Ok(vec![out.clone()]);
    }
    let listing = retrying("listing the output", || {
        out.store.list_with_delimiter(Some(&out.prefix))
    })
    .await
    .map_err(|source| SinkError::Store {
        path: out.display.clone(),
        source,
    })?;
    let mut children = Vec::new();
    for prefix in listing.common_prefixes {
        let name = prefix.filename().unwrap_or_default().to_string();
        let child = Location {
            store: out.store.clone(),
            prefix,
            display: out.display_child(&format!("{name}/")),
        };
        if is_output(child.clone()).await {
            children.push(child);
        }
    }
    if children.is_empty() {
        children.push(out.clone());
    }
    Ok(children)
}

/// The run summaries (`_runs/<run_id>.json`) of one output, as `T`; files that do not
/// parse as `T` (the summary and report files beside them) are skipped with a warning.
pub async fn read_runs<T: serde::de::DeserializeOwned>(out: &Location) -> Result<Vec<T>, SinkError> {
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
        if !name.ends_with(".json") || name.starts_with("summary") || name.starts_with("report") {
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
        match serde_json::from_slice::<T>(&bytes) {
            Ok(r) => runs.push(r),
            Err(e) => tracing::warn!("skipping {}: not a run summary ({e})", meta.location),
        }
    }
    Ok(runs)
}

/// Writes `_runs/summary.json` and `_runs/summary.parquet`, and with variants also
/// `_runs/robustness.csv` and `_runs/robustness.parquet`; returns their display paths.
pub async fn write(out: &Location, summary: &Summary) -> Result<Vec<String>, SinkError> {
    let body = serde_json::to_vec_pretty(summary).expect("summaries serialize");
    let mut written = vec![put(out, "_runs/summary.json", body).await?];
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
        Field::new("denoiser_evals_per_image", DataType::Float64, false),
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
        Arc::new(Float64Array::from_iter_values(
            r.iter().map(|x| x.denoiser_evals_per_image()),
        )),
    ];
    let batch = RecordBatch::try_new(schema, columns).expect("columns match the schema");
    written.push(put_parquet(out, "_runs/summary.parquet", &batch).await?);
    if summary.variants.is_empty() {
        return Ok(written);
    }
    let v = &summary.variants;
    let schema = Arc::new(Schema::new(vec![
        Field::new("method", DataType::Utf8, false),
        Field::new("corruption", DataType::Utf8, false),
        Field::new("severity", DataType::Int64, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("labelled", DataType::UInt64, false),
        Field::new("top1_before", DataType::Float64, true),
        Field::new("top1_after", DataType::Float64, true),
        Field::new("ms_per_image", DataType::Float64, false),
        Field::new("denoiser_evals_per_image", DataType::Float64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(v.iter().map(|x| x.method.as_str()))),
        Arc::new(StringArray::from_iter_values(v.iter().map(|x| x.corruption.as_str()))),
        Arc::new(Int64Array::from_iter_values(v.iter().map(|x| x.severity as i64))),
        Arc::new(UInt64Array::from_iter_values(v.iter().map(|x| x.tally.rows))),
        Arc::new(UInt64Array::from_iter_values(v.iter().map(|x| x.tally.labelled))),
        Arc::new(Float64Array::from_iter(v.iter().map(|x| x.tally.accuracy_before()))),
        Arc::new(Float64Array::from_iter(v.iter().map(|x| x.tally.accuracy_after()))),
        Arc::new(Float64Array::from_iter_values(v.iter().map(|x| x.ms_per_image()))),
        Arc::new(Float64Array::from_iter_values(
            v.iter().map(|x| x.denoiser_evals_per_image()),
        )),
    ];
    let batch = RecordBatch::try_new(schema, columns).expect("columns match the schema");
    let mut csv = String::from(
        "method,corruption,severity,rows,labelled,top1_before,top1_after,ms_per_image,denoiser_evals_per_image\n",
    );
    let opt = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.6}"));
    for x in v {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{:.3},{:.3}\n",
            x.method,
            x.corruption,
            x.severity,
            x.tally.rows,
            x.tally.labelled,
            opt(x.tally.accuracy_before()),
            opt(x.tally.accuracy_after()),
            x.ms_per_image(),
            x.denoiser_evals_per_image()
        ));
    }
    written.push(put(out, "_runs/robustness.csv", csv.into_bytes()).await?);
    written.push(put_parquet(out, "_runs/robustness.parquet", &batch).await?);
    Ok(written)
}

/// Writes `body` to `rel` below `out`; returns its display path.
pub async fn put(out: &Location, rel: &str, body: Vec<u8>) -> Result<String, SinkError> {
    out.store
        .put(&out.child(rel), PutPayload::from(body))
        .await
        .map_err(|source| SinkError::Store {
            path: out.display_child(rel),
            source,
        })?;
    Ok(out.display_child(rel))
}

async fn put_parquet(out: &Location, rel: &str, batch: &RecordBatch) -> Result<String, SinkError> {
    let path = out.display_child(rel);
    let parquet_err = |source| SinkError::Parquet {
        path: path.clone(),
        source,
    };
    let mut writer = AsyncArrowWriter::try_new(BufWriter::new(out.store.clone(), out.child(rel)), batch.schema(), None)
        .map_err(parquet_err)?;
    writer.write(batch).await.map_err(parquet_err)?;
    writer.close().await.map_err(parquet_err)?;
    Ok(path)
}
