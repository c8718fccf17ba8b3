//! Throttling, dropped connections, stalls and broken streams between dtta and S3: the
//! job still finishes with every sample exactly once. The proxy's faults come from one
//! seed per run (`DTTA_TEST_SEED` replays it); the assertions are on what the proxy
//! injected and what was committed, not on how long anything took.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::fault_proxy::{FaultProxy, Faults};
use common::servers::S3;
use common::test_seed;
use common::*;
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutPayload};

#[test]
fn faults_on_the_wire_lose_and_duplicate_nothing() {
    let seed = test_seed("faults_on_the_wire_lose_and_duplicate_nothing");
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
            stall_limit: Duration::from_secs(120),
            seed,
        },
    );
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
    // dtta has exited, so every connection ends: the proxy's counts are final.
    let s = proxy.finish();
    let faults = format!("seed {seed}: {}", s.summary());
    eprintln!("fault proxy, {faults}");
    assert!(o.status.success(), "{faults}\n{}", text(&o));
    use std::sync::atomic::Ordering::Relaxed;
    let count = |c: &std::sync::atomic::AtomicUsize| c.load(Relaxed);
    assert!(
        count(&s.resets) > 0 && count(&s.slow_downs) > 0 && count(&s.stalls) > 0 && count(&s.cuts) > 0,
        "every kind of fault was injected: {faults}"
    );
    // dtta's request timeout, not the proxy, ended every stall.
    assert_eq!(
        count(&s.stalls_abandoned),
        count(&s.stalls),
        "dtta gave up on every stalled request: {faults}"
    );

    // Read back directly from the server (no proxy): every sample exactly once.
    let out = dtta::storage::Location {
        store: store.clone(),
        prefix: StorePath::from("out"),
        display: "s3://data/out".into(),
    };
    let markers = rt.block_on(dtta::sink::commit::read_markers(&out)).unwrap();
    assert_eq!(markers.len(), shards, "every shard committed ({faults})");
    let mut seen = Vec::new();
    for marker in markers.values() {
        let file = out.child(&marker.predictions);
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
    assert_eq!(unique.len(), seen.len(), "{faults}");
}
