//! Classic Parquet checkpoints (`<version>.checkpoint.parquet`): one row per action of a
//! snapshot, in the columns `txn`, `add`, `remove`, `metaData` and `protocol` of the Delta
//! protocol. Single-file checkpoints only (no v2, no sidecars), which every reader reads.
//!
//! Every child field is written nullable: a row holds one action, and the other columns'
//! structs are null on it.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, MapBuilder, MapFieldNames, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Int32Array, Int64Array, MapArray, RecordBatch, StringArray, StructArray,
};
use arrow_schema::{Field, Fields, Schema};
use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;

use super::{Action, AddFile, Format, Metadata, Protocol, RemoveFile, Snapshot, Txn};
use crate::sink::SinkError;
use crate::storage::{retrying, Location};

fn map_names() -> MapFieldNames {
    MapFieldNames {
        entry: "key_value".into(),
        key: "key".into(),
        value: "value".into(),
    }
}

fn map_builder() -> MapBuilder<StringBuilder, StringBuilder> {
    MapBuilder::new(Some(map_names()), StringBuilder::new(), StringBuilder::new())
}

fn append_map(b: &mut MapBuilder<StringBuilder, StringBuilder>, m: Option<&BTreeMap<String, String>>) {
    if let Some(m) = m {
        for (k, v) in m {
            b.keys().append_value(k);
            b.values().append_value(v);
        }
    }
    b.append(m.is_some()).expect("keys and values stay aligned");
}

fn strings<'a>(v: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(StringArray::from_iter(v))
}

fn longs(v: impl Iterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(Int64Array::from_iter(v))
}

/// A struct column from named children, null where `valid` is false.
fn struct_column(children: Vec<(&str, ArrayRef)>, valid: &[bool]) -> ArrayRef {
    let fields: Fields = children
        .iter()
        .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
        .collect();
    let arrays = children.into_iter().map(|(_, a)| a).collect();
    Arc::new(
        StructArray::try_new(fields, arrays, Some(valid.iter().copied().collect()))
            .expect("children have one entry per row"),
    )
}

fn valid<T>(v: &[Option<T>]) -> Vec<bool> {
    v.iter().map(Option::is_some).collect()
}

/// The rows of a checkpoint of `snap`.
pub fn record_batch(snap: &Snapshot) -> RecordBatch {
    let actions: Vec<Action> = snap.actions().collect();
    let txn: Vec<Option<&Txn>> = actions.iter().map(|a| a.txn.as_ref()).collect();
    let add: Vec<Option<&AddFile>> = actions.iter().map(|a| a.add.as_ref()).collect();
    let meta: Vec<Option<&Metadata>> = actions.iter().map(|a| a.meta_data.as_ref()).collect();
    let proto: Vec<Option<&Protocol>> = actions.iter().map(|a| a.protocol.as_ref()).collect();

    let txn_col = struct_column(
        vec![
            ("appId", strings(txn.iter().map(|t| t.map(|t| t.app_id.as_str())))),
            ("version", longs(txn.iter().map(|t| t.map(|t| t.version)))),
            ("lastUpdated", longs(txn.iter().map(|t| t.and_then(|t| t.last_updated)))),
        ],
        &valid(&txn),
    );

    let (mut partition_values, mut tags) = (map_builder(), map_builder());
    for a in &add {
        append_map(&mut partition_values, a.map(|a| &a.partition_values));
        append_map(&mut tags, a.map(|a| &a.tags));
    }
    let add_col = struct_column(
        vec![
            ("path", strings(add.iter().map(|a| a.map(|a| a.path.as_str())))),
            ("partitionValues", Arc::new(partition_values.finish())),
            ("size", longs(add.iter().map(|a| a.map(|a| a.size)))),
            (
                "modificationTime",
                longs(add.iter().map(|a| a.map(|a| a.modification_time))),
            ),
            (
                "dataChange",
                Arc::new(BooleanArray::from_iter(add.iter().map(|a| a.map(|a| a.data_change)))),
            ),
            ("stats", strings(add.iter().map(|a| a.and_then(|a| a.stats.as_deref())))),
            ("tags", Arc::new(tags.finish())),
        ],
        &valid(&add),
    );

    let none = vec![false; actions.len()];
    let remove_col = struct_column(
        vec![
            ("path", strings(none.iter().map(|_| None))),
            ("deletionTimestamp", longs(none.iter().map(|_| None))),
            (
                "dataChange",
                Arc::new(BooleanArray::from_iter(none.iter().map(|_| None::<bool>))),
            ),
        ],
        &none,
    );

    let (mut options, mut configuration) = (map_builder(), map_builder());
    let mut partition_columns = ListBuilder::new(StringBuilder::new());
    for m in &meta {
        append_map(&mut options, m.map(|m| &m.format.options));
        append_map(&mut configuration, m.map(|m| &m.configuration));
        match m {
            Some(m) => {
                for c in &m.partition_columns {
                    partition_columns.values().append_value(c);
                }
                partition_columns.append(true);
            }
            None => partition_columns.append(false),
        }
    }
    let format_col = struct_column(
        vec![
            (
                "provider",
                strings(meta.iter().map(|m| m.map(|m| m.format.provider.as_str()))),
            ),
            ("options", Arc::new(options.finish())),
        ],
        &valid(&meta),
    );
    let meta_col = struct_column(
        vec![
            ("id", strings(meta.iter().map(|m| m.map(|m| m.id.as_str())))),
            ("name", strings(meta.iter().map(|m| m.and_then(|m| m.name.as_deref())))),
            ("description", strings(meta.iter().map(|_| None))),
            ("format", format_col),
            (
                "schemaString",
                strings(meta.iter().map(|m| m.map(|m| m.schema_string.as_str()))),
            ),
            ("partitionColumns", Arc::new(partition_columns.finish())),
            ("configuration", Arc::new(configuration.finish())),
            (
                "createdTime",
                longs(meta.iter().map(|m| m.and_then(|m| m.created_time))),
            ),
        ],
        &valid(&meta),
    );

    let proto_col = struct_column(
        vec![
            (
                "minReaderVersion",
                Arc::new(Int32Array::from_iter(
                    proto.iter().map(|p| p.map(|p| p.min_reader_version)),
                )),
            ),
            (
                "minWriterVersion",
                Arc::new(Int32Array::from_iter(
                    proto.iter().map(|p| p.map(|p| p.min_writer_version)),
                )),
            ),
        ],
        &valid(&proto),
    );

    let columns = vec![
        ("txn", txn_col),
        ("add", add_col),
        ("remove", remove_col),
        ("metaData", meta_col),
        ("protocol", proto_col),
    ];
    let schema = Schema::new(
        columns
            .iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    RecordBatch::try_new(Arc::new(schema), columns.into_iter().map(|(_, a)| a).collect())
        .expect("columns match the schema")
}

/// Writes the checkpoint of `snap` to `rel` (below the table); returns its row count.
pub async fn write(table: &Location, rel: &str, snap: &Snapshot) -> Result<u64, SinkError> {
    let batch = record_batch(snap);
    let rows = batch.num_rows() as u64;
    let mut buf = Vec::new();
    let parquet_err = |source| SinkError::Parquet {
        path: table.display_child(rel),
        source,
    };
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), None).map_err(parquet_err)?;
    writer.write(&batch).map_err(parquet_err)?;
    writer.close().map_err(parquet_err)?;
    // A plain put is atomic on every store; only the committer of this version writes it.
    table
        .store
        .put(&table.child(rel), PutPayload::from(buf))
        .await
        .map_err(|source| SinkError::Store {
            path: table.display_child(rel),
            source,
        })?;
    Ok(rows)
}

/// The actions of the checkpoint at `rel` (below the table).
pub async fn read(table: &Location, rel: &str) -> Result<Vec<Action>, SinkError> {
    let path = table.child(rel);
    let bytes: Bytes = retrying(&format!("reading {rel}"), || async {
        table.store.get(&path).await?.bytes().await
    })
    .await
    .map_err(|source| SinkError::Store {
        path: table.display_child(rel),
        source,
    })?;
    let corrupt = |message: String| SinkError::Corrupt {
        path: table.display_child(rel),
        message,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| corrupt(e.to_string()))?;
    let mut actions = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| corrupt(e.to_string()))?;
        parse_batch(&batch, &mut actions).map_err(corrupt)?;
    }
    Ok(actions)
}

/// A child of a struct column, by name; `None` when absent (another writer's checkpoint
/// may lack optional fields).
fn child<'a>(s: &'a StructArray, name: &str) -> Option<&'a ArrayRef> {
    s.column_by_name(name)
}

fn string_at(s: &StructArray, name: &str, i: usize) -> Option<String> {
    let a = child(s, name)?;
    let a = a.as_string_opt::<i32>()?;
    a.is_valid(i).then(|| a.value(i).to_string())
}

fn long_at(s: &StructArray, name: &str, i: usize) -> Option<i64> {
    let a = child(s, name)?.as_primitive_opt::<Int64Type>()?;
    a.is_valid(i).then(|| a.value(i))
}

fn int_at(s: &StructArray, name: &str, i: usize) -> Option<i32> {
    let a = child(s, name)?.as_primitive_opt::<Int32Type>()?;
    a.is_valid(i).then(|| a.value(i))
}

fn bool_at(s: &StructArray, name: &str, i: usize) -> Option<bool> {
    let a = child(s, name)?.as_boolean_opt()?;
    a.is_valid(i).then(|| a.value(i))
}

fn map_at(s: &StructArray, name: &str, i: usize) -> BTreeMap<String, String> {
    let Some(m) = child(s, name).and_then(|a| a.as_any().downcast_ref::<MapArray>()) else {
        return BTreeMap::new();
    };
    if !m.is_valid(i) {
        return BTreeMap::new();
    }
    let entries = m.value(i);
    let (Some(keys), Some(values)) = (
        entries.column(0).as_string_opt::<i32>(),
        entries.column(1).as_string_opt::<i32>(),
    ) else {
        return BTreeMap::new();
    };
    (0..keys.len())
        .filter(|j| values.is_valid(*j))
        .map(|j| (keys.value(j).to_string(), values.value(j).to_string()))
        .collect()
}

fn struct_of<'a>(batch: &'a RecordBatch, name: &str) -> Option<&'a StructArray> {
    batch.column_by_name(name)?.as_struct_opt()
}

fn parse_batch(batch: &RecordBatch, out: &mut Vec<Action>) -> Result<(), String> {
    let (txn, add, remove, meta, proto) = (
        struct_of(batch, "txn"),
        struct_of(batch, "add"),
        struct_of(batch, "remove"),
        struct_of(batch, "metaData"),
        struct_of(batch, "protocol"),
    );
    let missing = |what: &str, i: usize| format!("row {i}: {what} is missing");
    for i in 0..batch.num_rows() {
        let mut a = Action::default();
        if let Some(s) = txn.filter(|s| s.is_valid(i)) {
            a.txn = Some(Txn {
                app_id: string_at(s, "appId", i).ok_or_else(|| missing("txn.appId", i))?,
                version: long_at(s, "version", i).ok_or_else(|| missing("txn.version", i))?,
                last_updated: long_at(s, "lastUpdated", i),
            });
        }
        if let Some(s) = add.filter(|s| s.is_valid(i)) {
            a.add = Some(AddFile {
                path: string_at(s, "path", i).ok_or_else(|| missing("add.path", i))?,
                partition_values: map_at(s, "partitionValues", i),
                size: long_at(s, "size", i).unwrap_or(0),
                modification_time: long_at(s, "modificationTime", i).unwrap_or(0),
                data_change: bool_at(s, "dataChange", i).unwrap_or(false),
                stats: string_at(s, "stats", i),
                tags: map_at(s, "tags", i),
            });
        }
        if let Some(s) = remove.filter(|s| s.is_valid(i)) {
            a.remove = Some(RemoveFile {
                path: string_at(s, "path", i).ok_or_else(|| missing("remove.path", i))?,
                deletion_timestamp: long_at(s, "deletionTimestamp", i),
                data_change: bool_at(s, "dataChange", i).unwrap_or(false),
            });
        }
        if let Some(s) = meta.filter(|s| s.is_valid(i)) {
            let format = child(s, "format").and_then(|f| f.as_struct_opt());
            let partition_columns = child(s, "partitionColumns")
                .and_then(|l| l.as_list_opt::<i32>())
                .filter(|l| l.is_valid(i))
                .and_then(|l| {
                    let v = l.value(i);
                    let v = v.as_string_opt::<i32>()?;
                    Some((0..v.len()).map(|j| v.value(j).to_string()).collect())
                })
                .unwrap_or_default();
            a.meta_data = Some(Metadata {
                id: string_at(s, "id", i).ok_or_else(|| missing("metaData.id", i))?,
                name: string_at(s, "name", i),
                format: Format {
                    provider: format
                        .and_then(|f| string_at(f, "provider", i))
                        .unwrap_or_else(|| "parquet".into()),
                    options: format.map(|f| map_at(f, "options", i)).unwrap_or_default(),
                },
                schema_string: string_at(s, "schemaString", i).ok_or_else(|| missing("metaData.schemaString", i))?,
                partition_columns,
                configuration: map_at(s, "configuration", i),
                created_time: long_at(s, "createdTime", i),
            });
        }
        if let Some(s) = proto.filter(|s| s.is_valid(i)) {
            a.protocol = Some(Protocol {
                min_reader_version: int_at(s, "minReaderVersion", i).ok_or_else(|| missing("minReaderVersion", i))?,
                min_writer_version: int_at(s, "minWriterVersion", i).ok_or_else(|| missing("minWriterVersion", i))?,
            });
        }
        out.push(a);
    }
    Ok(())
}
