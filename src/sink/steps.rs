//! The steps table: one row per sample per adaptation step (diffusion-tta). Column names
//! and types are a contract with dashboards. Dense tasks append the metrics of each
//! step's prediction against the label (`super::dense::step_fields`); a classification
//! table's schema does not change.

use std::sync::{Arc, OnceLock};

use arrow_array::{ArrayRef, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::dense;
use super::predictions::Layout;
use crate::sample::Task;
use crate::tta::Outcome;

/// The steps table's schema for `layout` (dense tasks add their metric columns).
pub fn schema(layout: &Layout) -> SchemaRef {
    if layout.task == Task::Classification {
        return classification_schema();
    }
    let mut fields: Vec<_> = classification_schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend(dense::step_fields(layout.task));
    Arc::new(Schema::new(fields))
}

fn classification_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("run_id", DataType::Utf8, false),
                Field::new("shard", DataType::Utf8, false),
                Field::new("key", DataType::Utf8, false),
                Field::new("step", DataType::Int32, false),
                Field::new("loss", DataType::Float32, false),
                Field::new("pred", DataType::Int64, false),
                Field::new("conf", DataType::Float32, false),
                Field::new("entropy", DataType::Float32, false),
                Field::new("lr", DataType::Float32, false),
                Field::new("grad_norm", DataType::Float32, false),
                Field::new("elapsed_ms", DataType::Float64, false),
                Field::new("corruption", DataType::Utf8, false),
                Field::new("severity", DataType::Int32, false),
                Field::new("bundle_sha256", super::dictionary_type(), false),
            ]))
        })
        .clone()
}

/// The step rows of `outcomes` (possibly none).
pub fn record_batch(
    layout: &Layout,
    run_id: &str,
    shard: &str,
    bundle_sha256: &str,
    outcomes: &[Outcome],
) -> RecordBatch {
    let rows: Vec<(&Outcome, &crate::tta::StepRecord)> = outcomes
        .iter()
        .flat_map(|o| o.step_log.iter().map(move |s| (o, s)))
        .collect();
    let n = rows.len();
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![run_id; n])),
        Arc::new(StringArray::from(vec![shard; n])),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|(o, _)| o.key.as_str()))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|(_, s)| s.step as i32))),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|(_, s)| s.loss))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|(_, s)| s.pred))),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|(_, s)| s.conf))),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|(_, s)| s.entropy))),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|(_, s)| s.lr))),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|(_, s)| s.grad_norm))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(_, s)| s.elapsed_ms))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(o, _)| o.variant.corruption_name()),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|(o, _)| o.variant.severity as i32),
        )),
        super::repeated_dictionary(bundle_sha256, n),
    ];
    columns.extend(dense::step_columns(layout.task, &rows));
    RecordBatch::try_new(schema(layout), columns).expect("columns match the schema")
}
