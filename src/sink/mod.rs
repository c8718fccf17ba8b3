//! Output: two Delta Lake tables (`predictions/`, `steps/`) and run summaries.
//!
//! Invariant: a shard's rows count only once a Delta commit adds its file. Data files are
//! written first under names unique to the run (`predictions/<shard>.<run_id>.parquet`,
//! `steps/<shard>.<run_id>.parquet`), then committed, steps first, with the shard's
//! transaction id (`commit`); a second writer of the same shard finds the id in the log
//! and removes its files. Files of runs that never committed are in no snapshot; after a
//! commit, those of the same shard are removed, and `dtta vacuum` removes the rest.

pub mod commit;
pub mod delta;
pub mod dense;
pub mod maintenance;
pub mod predictions;
pub mod steps;

use std::collections::BTreeMap;

use object_store::buffered::BufWriter;
use object_store::ObjectStoreExt;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::sample::Status;
use crate::storage::Location;
use crate::tta::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write {path}: {source}")]
    Parquet {
        path: String,
        source: parquet::errors::ParquetError,
    },
    #[error("cannot write {path}: {source}")]
    Store { path: String, source: object_store::Error },
    #[error("cannot read {path}: {message}")]
    Corrupt { path: String, message: String },
    #[error(
        "{output} was written by an older dtta (commit markers in _commits/, no Delta log); \
         write to a new output URL, or delete this one and run again"
    )]
    OldLayout { output: String },
}

/// Rows per record batch handed to the Parquet writer.
const BATCH_ROWS: usize = 4096;
/// Rows per row group: DuckDB's default, also fine for Polars.
const ROW_GROUP_ROWS: usize = 122_880;

/// Counts kept per shard and per run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub rows: u64,
    /// Rows per `status` value.
    pub statuses: BTreeMap<String, u64>,
    /// Rows with both a label and a prediction.
    pub labelled: u64,
    pub correct_before: u64,
    pub correct_after: u64,
    /// Sum of `adapt_ms` over predicted rows.
    pub adapt_ms: f64,
    /// Sum of `denoiser_evals` over all rows (rows without a prediction spend none).
    /// Absent from markers and run summaries written before it existed: read as 0.
    #[serde(default)]
    pub denoiser_evals: u64,
    /// The same counts per variant tag (`clean`, `gaussian_noise/3`, ...), when the
    /// run expands samples into corrupted variants; empty otherwise.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_variant: BTreeMap<String, Tally>,
    /// Dense tasks: dataset-level sums of the rows scored against a label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense: Option<dense::DenseTally>,
}

impl Tally {
    pub fn add(&mut self, o: &Outcome, by_variant: bool) {
        if by_variant {
            self.by_variant.entry(o.variant.tag()).or_default().add(o, false);
        }
        self.rows += 1;
        *self.statuses.entry(o.status.as_str().to_string()).or_default() += 1;
        if let Some(after) = o.correct_after() {
            self.labelled += 1;
            self.correct_after += after as u64;
            self.correct_before += o.correct_before().unwrap_or(false) as u64;
        }
        self.adapt_ms += o.adapt_ms;
        self.denoiser_evals += o.denoiser_evals;
        if let Some(row) = &o.dense {
            if let (Some(b), Some(a)) = (&row.metrics_before, &row.metrics_after) {
                self.dense.get_or_insert_with(Default::default).add(b, a);
            }
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        self.rows += other.rows;
        for (k, v) in &other.statuses {
            *self.statuses.entry(k.clone()).or_default() += v;
        }
        self.labelled += other.labelled;
        self.correct_before += other.correct_before;
        self.correct_after += other.correct_after;
        self.adapt_ms += other.adapt_ms;
        self.denoiser_evals += other.denoiser_evals;
        for (variant, tally) in &other.by_variant {
            self.by_variant.entry(variant.clone()).or_default().merge(tally);
        }
        if let Some(d) = &other.dense {
            self.dense.get_or_insert_with(Default::default).merge(d);
        }
    }

    /// Top-1 accuracy after adaptation over labelled rows, if any.
    pub fn accuracy_after(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct_after as f64 / self.labelled as f64)
    }

    pub fn accuracy_before(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct_before as f64 / self.labelled as f64)
    }

    /// Rows that got a prediction (ok, label problems, diverged with the source kept).
    pub fn predicted(&self) -> u64 {
        Status::ALL
            .iter()
            .filter(|s| s.is_predicted())
            .map(|s| self.statuses.get(s.as_str()).copied().unwrap_or(0))
            .sum()
    }

    /// Mean milliseconds in the method per predicted row.
    pub fn ms_per_image(&self) -> f64 {
        self.adapt_ms / self.predicted().max(1) as f64
    }

    /// Mean denoiser evaluations per predicted row.
    pub fn denoiser_evals_per_image(&self) -> f64 {
        self.denoiser_evals as f64 / self.predicted().max(1) as f64
    }

    /// Rows whose status is not `ok`.
    pub fn not_ok(&self) -> u64 {
        self.rows - self.statuses.get(Status::Ok.as_str()).copied().unwrap_or(0)
    }
}

/// A column holding `value` on each of `n` rows, dictionary-encoded: one value stored
/// once per batch (and per Parquet page), however many rows.
pub(crate) fn repeated_dictionary(value: &str, n: usize) -> arrow_array::ArrayRef {
    let keys = arrow_array::Int32Array::from(vec![0; n]);
    let values = std::sync::Arc::new(arrow_array::StringArray::from(vec![value]));
    std::sync::Arc::new(
        arrow_array::DictionaryArray::<arrow_array::types::Int32Type>::try_new(keys, values)
            .expect("key 0 indexes the one value"),
    )
}

/// The type of a [`repeated_dictionary`] column.
pub(crate) fn dictionary_type() -> arrow_schema::DataType {
    arrow_schema::DataType::Dictionary(
        Box::new(arrow_schema::DataType::Int32),
        Box::new(arrow_schema::DataType::Utf8),
    )
}

/// One finished data file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFile {
    /// Relative to the output URL (`predictions/<shard>.<run_id>.parquet`).
    pub rel: String,
    pub rows: u64,
    pub size: u64,
    /// When the store last wrote it, in milliseconds since the epoch.
    pub modified_ms: i64,
}

/// A shard's two finished files, not yet committed.
#[derive(Debug, Clone)]
pub struct ShardFiles {
    pub predictions: DataFile,
    pub steps: DataFile,
    pub tally: Tally,
}

/// The two tables every shard gets.
pub const TABLES: [&str; 2] = ["predictions", "steps"];

/// One Parquet file being written.
struct TableWriter {
    display: String,
    writer: AsyncArrowWriter<BufWriter>,
}

impl TableWriter {
    fn create(out: &Location, rel: &str, schema: arrow_schema::SchemaRef) -> Result<Self, SinkError> {
        let display = out.display_child(rel);
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("valid level")))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_created_by(format!("dtta {}", env!("CARGO_PKG_VERSION")))
            .build();
        let buf = BufWriter::new(out.store.clone(), out.child(rel));
        let writer = AsyncArrowWriter::try_new(buf, schema, Some(props)).map_err(|source| SinkError::Parquet {
            path: display.clone(),
            source,
        })?;
        Ok(TableWriter { display, writer })
    }

    async fn write(&mut self, batch: &arrow_array::RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.writer.write(batch).await.map_err(|source| SinkError::Parquet {
            path: self.display.clone(),
            source,
        })
    }

    /// Completes the file; returns its row count, size and time of writing, which its
    /// Delta `add` action records.
    async fn close(self, out: &Location, rel: &str) -> Result<DataFile, SinkError> {
        let metadata = self.writer.close().await.map_err(|source| SinkError::Parquet {
            path: self.display.clone(),
            source,
        })?;
        let location = out.child(rel);
        let head = crate::storage::retrying(&format!("reading the size of {}", self.display), || {
            out.store.head(&location)
        })
        .await
        .map_err(|source| SinkError::Store {
            path: self.display.clone(),
            source,
        })?;
        Ok(DataFile {
            rel: rel.to_string(),
            rows: metadata.file_metadata().num_rows().max(0) as u64,
            size: head.size,
            modified_ms: head.last_modified.timestamp_millis(),
        })
    }

    async fn abort(self) {
        let mut inner = self.writer.into_inner();
        if let Err(e) = inner.abort().await {
            tracing::warn!("could not abort upload of {}: {e}", self.display);
        }
    }
}

/// Writes one shard's predictions and steps files. Dropping it without `finish` writes
/// nothing visible; call `abort` to also release multipart uploads.
pub struct ShardWriter {
    shard: String,
    run_id: String,
    method: String,
    /// The model bundle's digest, written on every row.
    bundle_sha256: String,
    /// Which columns the predictions table has (dense tasks add theirs).
    layout: predictions::Layout,
    predictions: TableWriter,
    steps: TableWriter,
    pending: Vec<Outcome>,
    pub tally: Tally,
    /// Keep `tally.by_variant` (the run expands samples into variants).
    by_variant: bool,
}

impl ShardWriter {
    /// Relative path (below the output URL) of a shard's file of `table` for a run.
    pub fn relative_path(table: &str, shard: &str, run_id: &str) -> String {
        format!("{table}/{shard}.{run_id}.parquet")
    }

    pub fn create(
        out: &Location,
        run_id: &str,
        shard: &str,
        method: &str,
        bundle_sha256: &str,
        layout: predictions::Layout,
        by_variant: bool,
    ) -> Result<Self, SinkError> {
        let rel = |table| Self::relative_path(table, shard, run_id);
        Ok(ShardWriter {
            shard: shard.to_string(),
            run_id: run_id.to_string(),
            method: method.to_string(),
            bundle_sha256: bundle_sha256.to_string(),
            layout,
            predictions: TableWriter::create(out, &rel("predictions"), predictions::schema(&layout))?,
            steps: TableWriter::create(out, &rel("steps"), steps::schema(&layout))?,
            pending: Vec::new(),
            tally: Tally::default(),
            by_variant,
        })
    }

    pub fn shard(&self) -> &str {
        &self.shard
    }

    pub async fn push(&mut self, mut outcome: Outcome) -> Result<(), SinkError> {
        // Dense rows are scored here, once, for both the columns and the tally.
        if let (Some(row), Some(label)) = (&mut outcome.dense, &outcome.dense_label) {
            row.score(label, self.layout.classes);
        }
        self.tally.add(&outcome, self.by_variant);
        self.pending.push(outcome);
        if self.pending.len() >= BATCH_ROWS {
            self.flush_batch().await?;
        }
        Ok(())
    }

    async fn flush_batch(&mut self) -> Result<(), SinkError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        self.predictions
            .write(&predictions::record_batch(
                &self.layout,
                &self.run_id,
                &self.shard,
                &self.method,
                &self.bundle_sha256,
                &rows,
            ))
            .await?;
        self.steps
            .write(&steps::record_batch(
                &self.layout,
                &self.run_id,
                &self.shard,
                &self.bundle_sha256,
                &rows,
            ))
            .await
    }

    /// Completes both files; returns them and the shard's tally.
    pub async fn finish(mut self, out: &Location) -> Result<ShardFiles, SinkError> {
        self.flush_batch().await?;
        let predictions = self
            .predictions
            .close(out, &Self::relative_path("predictions", &self.shard, &self.run_id))
            .await?;
        let steps = self
            .steps
            .close(out, &Self::relative_path("steps", &self.shard, &self.run_id))
            .await?;
        Ok(ShardFiles {
            predictions,
            steps,
            tally: self.tally,
        })
    }

    /// Drops everything written so far.
    pub async fn abort(self) {
        self.predictions.abort().await;
        self.steps.abort().await;
    }
}
