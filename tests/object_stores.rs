//! The binary against real storage servers on loopback: S3 (s3s-fs) and Azure (Azurite)
//! as input and output, GCS (fake-gcs-server) as input. Secrets never leak.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use common::servers::{Azurite, FakeGcs, S3};
use common::*;
use dtta::sink::commit::{self, CommitMarker, CommitResult};
use dtta::sink::Tally;
use dtta::storage::Location;
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn seed_demo_shards(store: &Arc<dyn ObjectStore>, prefix: &str, count: usize) {
    block_on(async {
        for i in 0..count {
            let name = format!("shard-{i:06}.tar");
            let bytes = std::fs::read(repo().join("data/demo-mnist").join(&name)).unwrap();
            store
                .put(&StorePath::from(format!("{prefix}/{name}")), PutPayload::from(bytes))
                .await
                .unwrap();
        }
    })
}

/// Every object below `prefix`: (path, bytes).
fn objects(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<(String, Bytes)> {
    block_on(async {
        let metas: Vec<_> = store.list(Some(&StorePath::from(prefix))).try_collect().await.unwrap();
        let mut out = Vec::new();
        for m in metas {
            let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.push((m.location.to_string(), bytes));
        }
        out.sort();
        out
    })
}

/// Keys of the committed predictions under `prefix`, read back through the store.
fn committed_keys(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    let all = objects(store, prefix);
    let mut keys = Vec::new();
    for (path, bytes) in &all {
        if !(path.contains("/_commits/") && path.ends_with(".json")) {
            continue;
        }
        let marker: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        let file = format!("{prefix}/{}", marker["predictions"].as_str().unwrap());
        let data = &all
            .iter()
            .find(|(p, _)| *p == file)
            .unwrap_or_else(|| panic!("{file} missing"))
            .1;
        for batch in ParquetRecordBatchReaderBuilder::try_new(data.clone())
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let col = column::<arrow_array::StringArray>(&batch, "key");
            keys.extend((0..batch.num_rows()).map(|r| col.value(r).to_string()));
        }
    }
    keys.sort();
    keys
}

fn run_with_env(env: &[(&'static str, String)], args: &[&str]) -> std::process::Output {
    let mut cmd = dtta();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).output().unwrap()
}

#[test]
fn s3_input_and_output_commit_once_and_keep_secrets() {
    let s3 = S3::start();
    s3.create_bucket("data");
    let store = s3.store("data");
    seed_demo_shards(&store, "mnist", 3);
    let tmp = tempfile::tempdir().unwrap();
    let p = write_pipeline(
        tmp.path(),
        "s3://data/mnist/shard-{000000..000002}.tar",
        "s3://data/out/",
        "",
    );
    let o = run_with_env(&s3.env(), &["run", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let keys = committed_keys(&store, "out");
    assert_eq!(keys.len(), 300);
    assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), 300, "each key once");

    let again = run_with_env(&s3.env(), &["run", p.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("3 skipped"),
        "{}",
        text(&again)
    );
    let plan = run_with_env(&s3.env(), &["plan", p.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains("3 committed, 0 to do"),
        "{}",
        text(&plan)
    );

    // The server honours PutMode::Create: another run's commit of the shard loses; the
    // same run committing again (a retried request) finds its own marker.
    let out = Location {
        store: store.clone(),
        prefix: StorePath::from("race"),
        display: "s3://data/race".into(),
    };
    let marker = CommitMarker {
        shard: "s".into(),
        run_id: "r1".into(),
        predictions: "predictions/s.r1.parquet".into(),
        steps: "steps/s.r1.parquet".into(),
        source: String::new(),
        method: "source".into(),
        bundle_sha256: Some("0".repeat(64)),
        worker_index: 0,
        worker_count: 1,
        committed_at: String::new(),
        tally: Tally::default(),
    };
    assert_eq!(
        block_on(commit::commit(&out, &marker)).unwrap(),
        CommitResult::Committed
    );
    let other = CommitMarker {
        run_id: "r2".into(),
        ..marker.clone()
    };
    assert_eq!(
        block_on(commit::commit(&out, &other)).unwrap(),
        CommitResult::AlreadyCommitted
    );
    assert_eq!(
        block_on(commit::commit(&out, &marker)).unwrap(),
        CommitResult::Committed
    );
    assert_eq!(
        block_on(commit::read_marker(&out, "s")).unwrap().run_id,
        "r1",
        "the first commit stands"
    );

    // A wrong secret fails with a clear error that does not echo credentials.
    let mut bad_env = s3.env();
    bad_env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    bad_env.push(("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123".into()));
    let bad = run_with_env(
        &bad_env,
        &["run", p.to_str().unwrap(), "--set", "output.url=s3://data/out-bad/"],
    );
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));

    // No secret anywhere: logs, errors, run summaries, markers, Parquet.
    let mut haystack: Vec<u8> = Vec::new();
    for o in [&o, &again, &plan, &bad] {
        haystack.extend_from_slice(&o.stdout);
        haystack.extend_from_slice(&o.stderr);
    }
    for (_, bytes) in objects(&store, "out") {
        haystack.extend_from_slice(&bytes);
    }
    let haystack = String::from_utf8_lossy(&haystack);
    for secret in [s3.secret_key.as_str(), s3.access_key.as_str(), "wrong-secret-value-123"] {
        assert!(!haystack.contains(secret), "a credential leaked into outputs or logs");
    }
}

#[test]
fn azure_input_and_output_through_azurite() {
    let az = Azurite::start();
    az.create_container("datasets");
    let store = az.store("datasets");
    seed_demo_shards(&store, "mnist", 2);
    let tmp = tempfile::tempdir().unwrap();
    let p = write_pipeline(tmp.path(), "az://datasets/mnist/*.tar", "az://datasets/out/", "");
    let o = run_with_env(&az.env(), &["run", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(committed_keys(&store, "out").len(), 200);
    let again = run_with_env(&az.env(), &["run", p.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("2 skipped"),
        "{}",
        text(&again)
    );
}

#[test]
fn gcs_as_input_through_fake_gcs_server() {
    let gcs = FakeGcs::start();
    gcs.create_bucket("public");
    for i in 0..2 {
        let name = format!("shard-{i:06}.tar");
        gcs.upload(
            "public",
            &format!("mnist/{name}"),
            &std::fs::read(repo().join("data/demo-mnist").join(&name)).unwrap(),
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let p = write_pipeline(
        tmp.path(),
        "gs://public/mnist/shard-{000000..000001}.tar",
        &out.to_string_lossy(),
        "",
    );
    let o = run_with_env(&gcs.env(), &["run", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = committed_rows(&out);
    assert_eq!(rows.len(), 200);
    assert!(rows.iter().all(|r| r.status == "ok"));
}
