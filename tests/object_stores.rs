//! The binary against real storage servers on loopback: S3 (s3s-fs) and Azure (Azurite)
//! as input and output, GCS (fake-gcs-server) as input. Secrets never leak.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use common::servers::{Azurite, FakeGcs, S3};
use common::*;
use dtta::sink::commit::{self, CommitResult};
use dtta::sink::predictions::Layout;
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

/// Keys of the committed predictions under `prefix`: the files the predictions table's
/// latest snapshot names, read back through the store.
fn committed_keys(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    let out = location(store, prefix);
    let markers = block_on(commit::read_markers(&out)).unwrap();
    let mut keys = Vec::new();
    for marker in markers.values() {
        let data = block_on(async {
            store
                .get(&out.child(&marker.predictions))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        });
        for batch in ParquetRecordBatchReaderBuilder::try_new(data).unwrap().build().unwrap() {
            let batch = batch.unwrap();
            let col = column::<arrow_array::StringArray>(&batch, "key");
            keys.extend((0..batch.num_rows()).map(|r| col.value(r).to_string()));
        }
    }
    keys.sort();
    keys
}

fn location(store: &Arc<dyn ObjectStore>, prefix: &str) -> Location {
    Location {
        store: store.clone(),
        prefix: StorePath::from(prefix),
        display: prefix.to_string(),
    }
}

/// Eight writers, each with its own view of the log as separate processes have, commit
/// to one pair of tables at once: 6 shards each, and each shard a second time by another
/// "run" (a worker restarted elsewhere). Every shard lands once, in one commit per
/// table; the versions are contiguous; concurrent checkpoints (every 5 commits) leave a
/// log that opens to the same state.
fn eight_writers_commit_each_shard_once(store: Arc<dyn ObjectStore>, prefix: &str) {
    let out = location(&store, prefix);
    let layout = Layout::CLASSIFICATION;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let results: Vec<Vec<(String, String, CommitResult)>> = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let out = out.clone();
                tokio::spawn(async move {
                    let tables = commit::Tables::new(&out, 5);
                    let mut results = Vec::new();
                    for i in 0..6 {
                        // Worker w owns shards w*6..w*6+6 and retries its neighbour's.
                        for (shard, run) in [
                            (format!("s{:02}", w * 6 + i), format!("w{w}")),
                            (format!("s{:02}", ((w + 1) % 8) * 6 + i), format!("x{w}")),
                        ] {
                            let (marker, p, s) = records::marker_for(&shard, &run, w);
                            for f in [&p, &s] {
                                out.store
                                    .put(&out.child(&f.rel), PutPayload::from_static(b"x"))
                                    .await
                                    .unwrap();
                            }
                            let r = commit::commit(&tables, &marker, (&p, &s), &layout).await.unwrap();
                            results.push((shard, run, r));
                        }
                    }
                    results
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.unwrap());
        }
        all
    });
    let mut winners: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (shard, run, r) in results.into_iter().flatten() {
        if r == CommitResult::Committed {
            winners.entry(shard).or_default().push(run);
        }
    }
    assert_eq!(winners.len(), 48, "every shard committed");
    assert!(
        winners.values().all(|runs| runs.len() == 1),
        "each shard by one run: {winners:?}"
    );
    for table in ["predictions", "steps"] {
        let markers = block_on(commit::table_markers(&out, table, Default::default())).unwrap();
        let by_run: std::collections::BTreeMap<String, String> =
            markers.iter().map(|(s, m)| (s.clone(), m.run_id.clone())).collect();
        let expected: std::collections::BTreeMap<String, String> =
            winners.iter().map(|(s, r)| (s.clone(), r[0].clone())).collect();
        assert_eq!(by_run, expected, "{table}: the winners, once each");
        let log: Vec<String> = objects(&store, &format!("{prefix}/{table}/_delta_log"))
            .into_iter()
            .map(|(p, _)| p.rsplit('/').next().unwrap().to_string())
            .collect();
        let versions: Vec<String> = log.iter().filter(|n| n.ends_with(".json")).cloned().collect();
        let contiguous: Vec<String> = (0..48).map(|v| format!("{v:020}.json")).collect();
        assert_eq!(
            versions, contiguous,
            "{table}: one commit per shard, versions 0..47, no gap"
        );
        assert!(
            log.iter().any(|n| n.ends_with(".checkpoint.parquet")),
            "{table}: checkpoints were written: {log:?}"
        );
    }
}

#[test]
fn eight_writers_on_s3_commit_each_shard_once() {
    let s3 = S3::start_atomic();
    s3.create_bucket("race");
    eight_writers_commit_each_shard_once(s3.store("race"), "out");
}

#[test]
fn eight_writers_on_azurite_commit_each_shard_once() {
    let az = Azurite::start();
    az.create_container("race");
    eight_writers_commit_each_shard_once(az.store("race"), "out");
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
    assert_stdout_has(&again, "3 skipped");
    let plan = run_with_env(&s3.env(), &["plan", p.to_str().unwrap()]);
    assert_stdout_has(&plan, "3 committed, 0 to do");

    // The server honours PutMode::Create: another run's commit of the shard loses; the
    // same run committing again (a retried request) finds its own commit.
    let tables = commit::Tables::new(&location(&store, "race"), 100);
    let layout = Layout::CLASSIFICATION;
    let (marker, pf, sf) = records::marker_for("s", "r1", 0);
    assert_eq!(
        block_on(commit::commit(&tables, &marker, (&pf, &sf), &layout)).unwrap(),
        CommitResult::Committed
    );
    let (other, p2, s2) = records::marker_for("s", "r2", 0);
    assert_eq!(
        block_on(commit::commit(&tables, &other, (&p2, &s2), &layout)).unwrap(),
        CommitResult::AlreadyCommitted
    );
    assert_eq!(
        block_on(commit::commit(&tables, &marker, (&pf, &sf), &layout)).unwrap(),
        CommitResult::Committed
    );
    assert_eq!(
        block_on(commit::read_markers(&location(&store, "race"))).unwrap()["s"].run_id,
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
    assert_stdout_has(&again, "2 skipped");
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
