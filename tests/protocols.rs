//! `[protocol]` end to end through the binary: the stream protocols' rows, their order
//! independence (the same rows whatever the read concurrency and decode threads), and
//! that they differ from `reset_each_shift` where they should.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use arrow_array::{Array, Float32Array, Int64Array, StringArray};
use common::*;

/// Two shards of 12 demo digits each.
fn input(dir: &Path) -> String {
    let dir = dir.join("in");
    std::fs::create_dir_all(&dir).unwrap();
    let demo = demo_samples();
    for i in 0..2 {
        write_demo_shard(&dir.join(format!("s-{i:02}.tar")), &demo[i * 12..(i + 1) * 12]);
    }
    format!("{}/", dir.display())
}

/// (key, corruption, severity) -> (pred_after, conf_after bits), every committed row.
type Rows = BTreeMap<(String, String, i64), (i64, u32)>;

fn rows(out: &Path) -> Rows {
    let mut map = Rows::new();
    for b in committed_batches(out, "predictions") {
        let key = column::<StringArray>(&b, "key");
        let corruption = column::<StringArray>(&b, "corruption");
        let severity = b.column_by_name("severity").unwrap();
        let severity = arrow_cast::cast(severity, &arrow_schema::DataType::Int64).unwrap();
        let severity = severity.as_any().downcast_ref::<Int64Array>().unwrap();
        let pred = column::<Int64Array>(&b, "pred_after");
        let conf = column::<Float32Array>(&b, "conf_after");
        let method = column::<StringArray>(&b, "method");
        for r in 0..b.num_rows() {
            assert!(method.value(r).starts_with("tent"), "{}", method.value(r));
            let id = (
                key.value(r).to_string(),
                corruption.value(r).to_string(),
                severity.value(r),
            );
            let previous = map.insert(id.clone(), (pred.value(r), conf.value(r).to_bits()));
            assert!(previous.is_none(), "row {id:?} twice");
        }
    }
    map
}

fn run(dir: &Path, input: &str, name: &str, sets: &[&str]) -> (Rows, String) {
    let out = dir.join(name);
    let pipeline = dir.join(format!("{name}.toml"));
    std::fs::write(
        &pipeline,
        format!(
            "[input]\nurl = \"{input}\"\n[output]\nurl = \"{}\"\n[model]\nbundle = \"{}\"\n[runtime]\ndevice = \"cpu\"\nbatch_size = 8\n\
             [tta]\nmethod = \"tent\"\n[corrupt]\nkinds = [\"fog\", \"brightness\"]\nseverities = [1, 3, 5]\nclean = false\n",
            out.display(),
            demo_bundle().display()
        ),
    )
    .unwrap();
    let mut args = vec!["run", pipeline.to_str().unwrap(), "--no-progress"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = run_dtta(&args);
    assert!(o.status.success(), "{name}: {}", text(&o));
    let methods: Vec<String> = committed_batches(&out, "predictions")
        .iter()
        .map(|b| column::<StringArray>(b, "method").value(0).to_string())
        .collect();
    (rows(&out), methods[0].clone())
}

#[test]
fn stream_protocols_write_their_rows_in_an_order_the_config_defines() {
    let tmp = tempfile::tempdir().unwrap();
    let input = input(tmp.path());
    let (reset, label) = run(tmp.path(), &input, "reset", &[]);
    assert_eq!(label, "tent");
    assert_eq!(reset.len(), 24 * 6, "24 digits x 2 corruptions x 3 severities");
    for protocol in ["continual", "gradual", "mixed"] {
        let kind = format!("protocol.kind={protocol}");
        let (rows, label) = run(tmp.path(), &input, protocol, &[&kind]);
        assert_eq!(label, format!("tent-{protocol}"));
        // Order-free: other read concurrency and decode threads, the same rows bit for bit.
        let (again, _) = run(
            tmp.path(),
            &input,
            &format!("{protocol}-again"),
            &[&kind, "runtime.shards_in_flight=4", "runtime.decode_threads=1"],
        );
        assert_eq!(rows, again, "{protocol}: the rows depend on more than the config");
        if protocol == "gradual" {
            // Each digit once per corruption, its severity by its place in the shard:
            // 12 digits over the 5 steps 1,3,5,3,1.
            assert_eq!(rows.len(), 24 * 2);
            let first_shard = &demo_samples()[..12];
            let fog_severities: Vec<i64> = first_shard
                .iter()
                .map(|d| rows.keys().find(|(k, c, _)| *k == d.key && c == "fog").unwrap().2)
                .collect();
            assert_eq!(
                fog_severities,
                [1, 1, 1, 3, 3, 5, 5, 5, 3, 3, 1, 1],
                "first shard, in shard order"
            );
        } else {
            assert_eq!(
                rows.keys().collect::<Vec<_>>(),
                reset.keys().collect::<Vec<_>>(),
                "{protocol}: the same rows"
            );
            assert_ne!(
                rows, reset,
                "{protocol}: one stream predicts otherwise than one per shift"
            );
        }
    }
}

#[test]
fn a_stream_protocol_without_corruptions_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let p = write_pipeline(
        tmp.path(),
        &repo().join("data/demo-mnist/shard-000000.tar").to_string_lossy(),
        &out.to_string_lossy(),
        "[protocol]\nkind = \"continual\"\n",
    );
    let o = run_dtta(&["run", p.to_str().unwrap(), "--no-progress"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("protocol.kind") && stderr.contains("[corrupt]"),
        "{stderr}"
    );
}
