//! What the report reads: committed shards only. The predictions table's snapshot names
//! each committed shard's predictions file, and its marker the same run's steps file
//! (README, "Outputs": predictions first, then steps); files of runs that never
//! committed are never opened. Run summaries give the run facts.
//!
//! Hazard: every predictions row and steps row is held in memory (about 80 bytes per
//! predictions row with its key, 16 per steps row), because the paired bootstrap needs
//! each key's outcome under every method. A report over hundreds of millions of rows
//! needs a sampled variant of this.

use std::collections::{BTreeMap, BTreeSet};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde::Deserialize;

use crate::report::summary::{committed_below, read_runs};
use crate::sample::Variant;
use crate::sink::delta::At;
use crate::sink::dense::DenseTally;
use crate::sink::{SinkError, Tally};
use crate::storage::{retrying, Location};

/// One predictions row, the columns the report uses.
#[derive(Debug, Clone)]
pub struct PredRow {
    /// Index into [`Committed::series`].
    pub series: usize,
    /// Index into [`Committed::shard_ids`]; with `key` and `variant` it names the image
    /// the same way in every output, which is what the paired bootstrap pairs on.
    pub shard: usize,
    pub key: String,
    pub variant: Variant,
    pub label: Option<i64>,
    pub pred_before: Option<i64>,
    pub conf_before: Option<f32>,
    pub pred_after: Option<i64>,
    pub conf_after: Option<f32>,
    pub adapt_ms: f64,
    /// The `denoiser_evals` column, where the predictions table has it.
    pub denoiser_evals: Option<i64>,
}

/// One steps row, the columns the report uses.
#[derive(Debug, Clone, Copy)]
pub struct StepRow {
    pub series: usize,
    pub step: i32,
    pub loss: f32,
    pub entropy: f32,
    pub conf: f32,
}

/// The parts of a run summary (`_runs/<run_id>.json`) the report shows. Fields added
/// by later versions (`bundle_sha256`) are optional, so older summaries still read.
#[derive(Debug, Clone, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    #[serde(default)]
    pub dtta_version: String,
    pub started_at: String,
    pub finished_at: String,
    pub elapsed_s: f64,
    pub method: String,
    #[serde(default)]
    pub device: String,
    pub bundle: String,
    #[serde(default)]
    pub bundle_sha256: Option<String>,
    #[serde(default)]
    pub shards_committed: Vec<String>,
    pub tally: Tally,
    /// The run's config (credentials stripped), kept as JSON for its digest.
    pub config: serde_json::Value,
}

/// Everything committed below the report's output URLs.
#[derive(Debug, Default)]
pub struct Committed {
    /// Display URL of every output read (a parent of outputs counts as its children).
    pub outputs: Vec<String>,
    /// Series labels: the method, or `method (output folder)` when one method appears
    /// in more than one output.
    pub series: Vec<String>,
    /// Committed shards, over all outputs.
    pub committed_shards: usize,
    /// Distinct shard ids (as in the commit records), indexed by [`PredRow::shard`].
    pub shard_ids: Vec<String>,
    /// Commit-record tallies, summed (committed rows only).
    pub tally: Tally,
    /// Run summaries with the display URL of their output.
    pub runs: Vec<(String, RunSummary)>,
    pub predictions: Vec<PredRow>,
    pub steps: Vec<StepRow>,
    /// Whether any predictions file had a `denoiser_evals` column.
    pub has_denoiser_evals: bool,
    /// Dense tasks: commit-record tallies per (series, variant tag), summed; only
    /// those with dataset-level dense sums.
    pub dense: BTreeMap<(usize, String), DenseTally>,
}

/// Reads every committed shard below each of `outs`, as of `at` (at an older version,
/// only the runs that committed shards by then are listed).
pub async fn read(outs: &[Location], at: At) -> Result<Committed, SinkError> {
    let mut c = Committed::default();
    let mut outputs = Vec::new();
    // Series: (output index, method) -> index, labelled once all are known.
    let mut series_of: BTreeMap<(usize, String), usize> = BTreeMap::new();
    let mut markers = Vec::new();
    for (o, (output, committed)) in committed_below(outs, at).await?.into_iter().enumerate() {
        c.outputs.push(output.display.clone());
        let runs_in_snapshot: BTreeSet<String> = committed.values().map(|m| m.run_id.clone()).collect();
        for marker in committed.into_values() {
            let next = series_of.len();
            let series = *series_of.entry((o, marker.method.clone())).or_insert(next);
            markers.push((o, series, marker));
        }
        for run in read_runs::<RunSummary>(&output).await? {
            if at == At::Latest || runs_in_snapshot.contains(&run.run_id) {
                c.runs.push((output.display.clone(), run));
            }
        }
        outputs.push(output);
    }
    c.series = series_labels(&series_of, &outputs);
    let mut shard_index: BTreeMap<String, usize> = BTreeMap::new();
    for (o, series, marker) in markers {
        let output = &outputs[o];
        let next = shard_index.len();
        let shard = *shard_index.entry(marker.shard.clone()).or_insert(next);
        if shard == c.shard_ids.len() {
            c.shard_ids.push(marker.shard.clone());
        }
        c.committed_shards += 1;
        c.tally.merge(&marker.tally);
        let by_variant: Vec<(String, &Tally)> = match marker.tally.by_variant.is_empty() {
            true => vec![("clean".to_string(), &marker.tally)],
            false => marker.tally.by_variant.iter().map(|(v, t)| (v.clone(), t)).collect(),
        };
        for (variant, tally) in by_variant {
            if let Some(d) = &tally.dense {
                c.dense.entry((series, variant)).or_default().merge(d);
            }
        }
        let batches = read_parquet(output, &marker.predictions, &PREDICTION_COLUMNS).await?;
        for batch in &batches {
            c.has_denoiser_evals |= batch.column_by_name("denoiser_evals").is_some();
            push_predictions(&mut c.predictions, batch, series, shard)
                .map_err(|message| corrupt(output, &marker.predictions, message))?;
        }
        let batches = read_parquet(output, &marker.steps, &STEP_COLUMNS).await?;
        for batch in &batches {
            push_steps(&mut c.steps, batch, series).map_err(|message| corrupt(output, &marker.steps, message))?;
        }
    }
    Ok(c)
}

fn series_labels(series_of: &BTreeMap<(usize, String), usize>, outputs: &[Location]) -> Vec<String> {
    let mut labels = vec![String::new(); series_of.len()];
    for ((o, method), &i) in series_of {
        let shared = series_of.keys().filter(|(_, m)| m == method).count() > 1;
        labels[i] = if shared {
            let folder = outputs[*o]
                .display
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("");
            format!("{method} ({folder})")
        } else {
            method.clone()
        };
    }
    labels
}

fn corrupt(out: &Location, rel: &str, message: String) -> SinkError {
    SinkError::Corrupt {
        path: out.display_child(rel),
        message,
    }
}

/// Columns read from predictions files; `denoiser_evals` only where it exists.
const PREDICTION_COLUMNS: [&str; 10] = [
    "key",
    "label",
    "pred_before",
    "conf_before",
    "pred_after",
    "conf_after",
    "adapt_ms",
    "corruption",
    "severity",
    "denoiser_evals",
];
const STEP_COLUMNS: [&str; 4] = ["step", "loss", "entropy", "conf"];

/// Reads the named columns (those the file has) of one committed Parquet file.
async fn read_parquet(out: &Location, rel: &str, columns: &[&str]) -> Result<Vec<RecordBatch>, SinkError> {
    let location = out.child(rel);
    let bytes = retrying(&format!("reading {rel}"), || async {
        out.store.get(&location).await?.bytes().await
    })
    .await
    .map_err(|source| SinkError::Store {
        path: out.display_child(rel),
        source,
    })?;
    let parquet_err = |e: parquet::errors::ParquetError| corrupt(out, rel, e.to_string());
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(parquet_err)?;
    let roots: Vec<usize> = columns
        .iter()
        .filter_map(|c| builder.schema().index_of(c).ok())
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder.with_projection(mask).build().map_err(parquet_err)?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| corrupt(out, rel, e.to_string()))
}

/// A column of `batch` cast to `kind`; an error names a missing or mistyped column.
fn column(batch: &RecordBatch, name: &str, kind: &DataType) -> Result<arrow_array::ArrayRef, String> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| format!("no column `{name}`"))?;
    arrow_cast::cast(col, kind).map_err(|e| format!("column `{name}`: {e}"))
}

fn push_predictions(rows: &mut Vec<PredRow>, batch: &RecordBatch, series: usize, shard: usize) -> Result<(), String> {
    let key = column(batch, "key", &DataType::Utf8)?;
    let key = key.as_string::<i32>();
    let int = |name| column(batch, name, &DataType::Int64);
    let float = |name| column(batch, name, &DataType::Float32);
    let (label, pred_before, pred_after) = (int("label")?, int("pred_before")?, int("pred_after")?);
    let (label, pred_before, pred_after) = (
        label.as_primitive::<Int64Type>(),
        pred_before.as_primitive::<Int64Type>(),
        pred_after.as_primitive::<Int64Type>(),
    );
    let (conf_before, conf_after) = (float("conf_before")?, float("conf_after")?);
    let (conf_before, conf_after) = (
        conf_before.as_primitive::<Float32Type>(),
        conf_after.as_primitive::<Float32Type>(),
    );
    let adapt_ms = column(batch, "adapt_ms", &DataType::Float64)?;
    let adapt_ms = adapt_ms.as_primitive::<Float64Type>();
    let corruption = column(batch, "corruption", &DataType::Utf8)?;
    let corruption = corruption.as_string::<i32>();
    let severity = column(batch, "severity", &DataType::Int32)?;
    let severity = severity.as_primitive::<Int32Type>();
    let evals = batch
        .column_by_name("denoiser_evals")
        .map(|_| int("denoiser_evals"))
        .transpose()?;
    let evals = evals.as_ref().map(|e| e.as_primitive::<Int64Type>());
    let opt_i = |a: &arrow_array::Int64Array, r: usize| a.is_valid(r).then(|| a.value(r));
    let opt_f = |a: &arrow_array::Float32Array, r: usize| a.is_valid(r).then(|| a.value(r));
    for r in 0..batch.num_rows() {
        let tag = match corruption.value(r) {
            "clean" => "clean".to_string(),
            name => format!("{name}/{}", severity.value(r)),
        };
        rows.push(PredRow {
            series,
            shard,
            key: key.value(r).to_string(),
            variant: tag.parse()?,
            label: opt_i(label, r),
            pred_before: opt_i(pred_before, r),
            conf_before: opt_f(conf_before, r),
            pred_after: opt_i(pred_after, r),
            conf_after: opt_f(conf_after, r),
            adapt_ms: adapt_ms.value(r),
            denoiser_evals: evals.and_then(|e| opt_i(e, r)),
        });
    }
    Ok(())
}

fn push_steps(rows: &mut Vec<StepRow>, batch: &RecordBatch, series: usize) -> Result<(), String> {
    let step = column(batch, "step", &DataType::Int32)?;
    let step = step.as_primitive::<Int32Type>();
    let float = |name| column(batch, name, &DataType::Float32);
    let (loss, entropy, conf) = (float("loss")?, float("entropy")?, float("conf")?);
    let (loss, entropy, conf) = (
        loss.as_primitive::<Float32Type>(),
        entropy.as_primitive::<Float32Type>(),
        conf.as_primitive::<Float32Type>(),
    );
    rows.extend((0..batch.num_rows()).map(|r| StepRow {
        series,
        step: step.value(r),
        loss: loss.value(r),
        entropy: entropy.value(r),
        conf: conf.value(r),
    }));
    Ok(())
}
