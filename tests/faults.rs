//! Throttling, dropped connections, stalls and broken streams between dtta and S3: the
//! job still finishes with every sample exactly once.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::fault_proxy::{FaultProxy, Faults};
use common::servers::S3;
use common::*;
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutPayload};

#[test]
fn faults_on_the_wire_lose_and_duplicate_nothing() {
    let s3 = S3::start();
    s3.create_bucket("data");
    let store = s3.store("data");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let demo = demo_samples();
    let tmp = tempfile::tempdir().unwrap();
    let shards = 8;
    for i in 0..shards {
        let path = tmp.path().join(format!("part-{i}.tar"));
        write_demo_shard(&path, &demo[i * 100..(i + 1) * 100]);
        let bytes = std::fs::read(&path).unwrap();
        rt.block_on(store.put(&StorePath::from(format!("in/part-{i}.tar")), PutPayload::from(bytes)))
            .unwrap();
    }
    let proxy = FaultProxy::start(
        s3.server.port,
        Faults {
            reset: 0.10,
            slow_down: 0.10,
            stall: 0.04,
            cut: 0.15,
            stall_for: Duration::from_secs(3),
            seed: rand::random(),
        },
    );
    let out = tmp.path().join("pipeline-out");
    std::fs::create_dir_all(&out).unwrap();
    let p = write_pipeline(tmp.path(), "s3://data/in/part-*.tar", "s3://data/out/", "");
    let mut cmd = dtta();
    for (k, v) in s3.env_for(&proxy.endpoint()) {
        cmd.env(k, v);
    }
    // One request per connection, so every request meets the proxy's dice.
    cmd.env("AWS_POOL_MAX_IDLE_PER_HOST", "0");
    let o = cmd
        .args([
            "run",
            p.to_str().unwrap(),
            "--set",
            "limits.request_timeout=1s",
            "--set",
            "runtime.shard_retries=8",
        ])
        .output()
        .unwrap();
    let faults = proxy.stats.summary();
    eprintln!("fault proxy: {faults}");
    assert!(o.status.success(), "{faults}\n{}", text(&o));
    let s = &proxy.stats;
    use std::sync::atomic::Ordering::Relaxed;
    assert!(
        s.resets.load(Relaxed) > 0
            && s.slow_downs.load(Relaxed) > 0
            && s.stalls.load(Relaxed) > 0
            && s.cuts.load(Relaxed) > 0,
        "faults were injected: {faults}"
    );

    // Read back directly from the server (no proxy): every sample exactly once.
    let objects: Vec<_> = rt
        .block_on(futures::TryStreamExt::try_collect::<Vec<_>>(
            object_store::ObjectStore::list(store.as_ref(), Some(&StorePath::from("out/_commits"))),
        ))
        .unwrap();
    assert_eq!(objects.len(), shards, "every shard committed");
    let mut seen = Vec::new();
    for meta in objects {
        let marker: serde_json::Value = serde_json::from_slice(
            &rt.block_on(async { store.get(&meta.location).await.unwrap().bytes().await.unwrap() }),
        )
        .unwrap();
        let file = StorePath::from(format!("out/{}", marker["predictions"].as_str().unwrap()));
        let bytes = rt.block_on(async { store.get(&file).await.unwrap().bytes().await.unwrap() });
        for batch in parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let key = column::<arrow_array::StringArray>(&batch, "key");
            let shard = column::<arrow_array::StringArray>(&batch, "shard");
            seen.extend((0..batch.num_rows()).map(|r| (shard.value(r).to_string(), key.value(r).to_string())));
        }
    }
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), shards * 100, "no sample lost or duplicated ({faults})");
    assert_eq!(unique.len(), seen.len());
}
