//! The predictions table: one row per input sample. Column names and types are a
//! contract with dashboards; add columns, never rename or retype them.

use std::sync::{Arc, OnceLock};

use arrow_array::builder::{Float32Builder, Int64Builder, ListBuilder};
use arrow_array::{ArrayRef, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::dense;
use crate::sample::Task;
use crate::tta::Outcome;

/// What a predictions table holds besides the classification columns: dense tasks add
/// their masks or depth maps and metrics after them (a classification table's schema
/// never changes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    pub task: Task,
    /// Classes of the model (per-class mIoU sums have this many entries).
    pub classes: usize,
    /// Metres per unit of a written 16-bit depth PNG (`label.depth_scale`).
    pub depth_scale: f64,
}

impl Layout {
    pub const CLASSIFICATION: Layout = Layout {
        task: Task::Classification,
        classes: 0,
        depth_scale: 0.001,
    };
}

/// The predictions schema of `layout`, in column order.
pub fn schema(layout: &Layout) -> SchemaRef {
    let base = classification_schema();
    match layout.task {
        Task::Classification => base,
        task => {
            let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
            fields.extend(dense::fields(task));
            Arc::new(Schema::new(fields))
        }
    }
}

fn classification_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let list = |item: DataType| DataType::List(Arc::new(Field::new("item", item, true)));
            Arc::new(Schema::new(vec![
                Field::new("run_id", DataType::Utf8, false),
                Field::new("shard", DataType::Utf8, false),
                Field::new("key", DataType::Utf8, false),
                Field::new("label", DataType::Int64, true),
                Field::new("status", DataType::Utf8, false),
                Field::new("error", DataType::Utf8, true),
                Field::new("method", DataType::Utf8, false),
                Field::new("pred_before", DataType::Int64, true),
                Field::new("conf_before", DataType::Float32, true),
                Field::new("pred_after", DataType::Int64, true),
                Field::new("conf_after", DataType::Float32, true),
                Field::new("topk_after", list(DataType::Int64), false),
                Field::new("topk_probs_after", list(DataType::Float32), false),
                Field::new("loss_first", DataType::Float32, true),
                Field::new("loss_last", DataType::Float32, true),
                Field::new("steps", DataType::Int32, false),
                Field::new("adapt_ms", DataType::Float64, false),
                // The variant ([corrupt]): `clean` and 0 for the image as decoded.
                Field::new("corruption", DataType::Utf8, false),
                Field::new("severity", DataType::Int32, false),
                // Adaptive compute: denoiser forward passes spent on the row (one per
                // (t, eps) pair, per class scored), and why adaptation ended early.
                Field::new("denoiser_evals", DataType::Int64, false),
                Field::new("stop_reason", DataType::Utf8, false),
                // The model bundle's digest (README, "Provenance").
                Field::new("bundle_sha256", super::dictionary_type(), false),
            ]))
        })
        .clone()
}

/// Builds one record batch of rows that share run, shard, method and bundle.
pub fn record_batch(
    layout: &Layout,
    run_id: &str,
    shard: &str,
    method: &str,
    bundle_sha256: &str,
    rows: &[Outcome],
) -> RecordBatch {
    let n = rows.len();
    let repeat = |s: &str| Arc::new(StringArray::from(vec![s; n])) as ArrayRef;
    let mut topk = ListBuilder::new(Int64Builder::new());
    let mut topk_probs = ListBuilder::new(Float32Builder::new());
    for r in rows {
        topk.values().append_slice(&r.topk_after);
        topk.append(true);
        topk_probs.values().append_slice(&r.topk_probs_after);
        topk_probs.append(true);
    }
    let mut columns: Vec<ArrayRef> = vec![
        repeat(run_id),
        repeat(shard),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.key.as_str()))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.label))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.status.as_str()))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.error.as_deref()))),
        repeat(method),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.pred_before))),
        Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.conf_before))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.pred_after))),
        Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.conf_after))),
        Arc::new(topk.finish()),
        Arc::new(topk_probs.finish()),
        Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.loss_first))),
        Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.loss_last))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.steps as i32))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.adapt_ms))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.variant.corruption_name()),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.variant.severity as i32),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.denoiser_evals as i64),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.stop_reason.as_str()),
        )),
        super::repeated_dictionary(bundle_sha256, n),
    ];
    if layout.task.is_dense() {
        columns.extend(dense::columns(layout, rows));
    }
    RecordBatch::try_new(schema(layout), columns).expect("columns match the schema")
}
