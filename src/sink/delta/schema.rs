//! Arrow schemas as Delta's JSON schema string (`metaData.schemaString`).
//!
//! Dictionary-encoded strings (`bundle_sha256`) are Delta `string`: the dictionary is a
//! Parquet encoding, not a type, and every engine reads the column as text.

use arrow_schema::{DataType, Field, Schema};
use serde_json::{json, Value};

/// The Delta type of an Arrow type dtta writes. Panics on a type dtta never writes (a
/// programming error caught by the unit test over every schema).
fn delta_type(t: &DataType) -> Value {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 => json!("string"),
        DataType::Dictionary(_, v) => delta_type(v),
        DataType::Int64 => json!("long"),
        DataType::Int32 => json!("integer"),
        DataType::Int16 => json!("short"),
        DataType::Int8 => json!("byte"),
        DataType::Float32 => json!("float"),
        DataType::Float64 => json!("double"),
        DataType::Boolean => json!("boolean"),
        DataType::Binary | DataType::LargeBinary => json!("binary"),
        DataType::List(item) | DataType::LargeList(item) => json!({
            "type": "array",
            "elementType": delta_type(item.data_type()),
            "containsNull": item.is_nullable(),
        }),
        DataType::Struct(fields) => struct_type(fields.iter().map(|f| f.as_ref())),
        other => panic!("no Delta type for {other:?}"),
    }
}

fn struct_type<'a>(fields: impl Iterator<Item = &'a Field>) -> Value {
    let fields: Vec<Value> = fields
        .map(|f| {
            json!({
                "name": f.name(),
                "type": delta_type(f.data_type()),
                "nullable": f.is_nullable(),
                "metadata": {},
            })
        })
        .collect();
    json!({"type": "struct", "fields": fields})
}

/// `schema` as a Delta schema string.
pub fn schema_string(schema: &Schema) -> String {
    struct_type(schema.fields().iter().map(|f| f.as_ref())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Task;
    use crate::sink::predictions::Layout;

    #[test]
    fn every_table_dtta_writes_has_a_delta_schema() {
        for task in [Task::Classification, Task::Segmentation, Task::Depth] {
            let layout = Layout {
                task,
                ..Layout::CLASSIFICATION
            };
            for schema in [
                crate::sink::predictions::schema(&layout),
                crate::sink::steps::schema(&layout),
            ] {
                let s: Value = serde_json::from_str(&schema_string(&schema)).unwrap();
                assert_eq!(s["type"], "struct");
                assert_eq!(s["fields"].as_array().unwrap().len(), schema.fields().len());
            }
        }
        let layout = Layout::CLASSIFICATION;
        let s: Value = serde_json::from_str(&schema_string(&crate::sink::predictions::schema(&layout))).unwrap();
        let field = |name: &str| {
            s["fields"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == name)
                .unwrap()
                .clone()
        };
        assert_eq!(field("bundle_sha256")["type"], "string");
        assert_eq!(field("pred_after")["type"], "long");
        assert_eq!(field("topk_after")["type"]["elementType"], "long");
        assert_eq!(field("topk_after")["nullable"], false);
    }
}
