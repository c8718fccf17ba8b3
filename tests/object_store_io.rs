//! The pipeline over object-store URLs (memory://, in process): the input shards, the
//! model bundle and the output all live in a store, none on local disk.

mod common;

use bytes::Bytes;
use common::*;
use dtta::config::PipelineConfig;
use dtta::pipeline::{self, MixedBundles, ProgressMode};
use dtta::sink::commit;
use dtta::storage::{self, StoreOptions};
use dtta::worker::Worker;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_bundle_and_output_all_in_an_object_store() {
    let opts = StoreOptions::default();
    let data = storage::open("memory:///bucket/", &opts).unwrap();
    for i in 0..3 {
        let name = format!("shard-{i:06}.tar");
        let bytes = std::fs::read(repo().join("data/demo-mnist").join(&name)).unwrap();
        data.store
            .put(&data.child(&format!("mnist/{name}")), PutPayload::from(bytes))
            .await
            .unwrap();
    }
    for file in ["bundle.toml", "classifier.pt"] {
        let bytes = std::fs::read(demo_bundle().join(file)).unwrap();
        data.store
            .put(&data.child(&format!("models/demo/{file}")), PutPayload::from(bytes))
            .await
            .unwrap();
    }
    let text = r#"
[input]
url = "memory:///bucket/mnist/shard-{000000..000002}.tar"
[output]
url = "memory:///bucket/results/"
[model]
bundle = "memory:///bucket/models/demo"
[runtime]
device = "cpu"
"#;
    let config = PipelineConfig::from_toml_str(text, std::path::Path::new("inline.toml"), &[]).unwrap();
    let report = pipeline::run(config.clone(), Worker::SOLO, ProgressMode::Log, MixedBundles::Refuse)
        .await
        .unwrap();
    assert_eq!(report.shards_committed.len(), 3);
    assert_eq!(report.tally.rows, 300);
    // The digest of a bundle in a store is that of the same files in a folder.
    let local = tempfile::tempdir().unwrap();
    for file in ["bundle.toml", "classifier.pt"] {
        std::fs::copy(demo_bundle().join(file), local.path().join(file)).unwrap();
    }
    assert_eq!(report.bundle_sha256, shell_bundle_sha256(local.path()));

    let out = storage::open("memory:///bucket/results/", &opts).unwrap();
    let markers = commit::read_markers(&out).await.unwrap();
    assert_eq!(markers.len(), 3);
    let mut rows = 0;
    for marker in markers.values() {
        let bytes: Bytes = out
            .store
            .get(&out.child(&marker.predictions))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        rows += reader.map(|b| b.unwrap().num_rows()).sum::<usize>();
    }
    assert_eq!(rows, 300);

    // A second run skips the committed shards.
    let again = pipeline::run(config, Worker::SOLO, ProgressMode::Log, MixedBundles::Refuse)
        .await
        .unwrap();
    assert_eq!(again.shards_skipped, 3);
    assert_eq!(again.tally.rows, 0);
}
