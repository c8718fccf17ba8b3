//! What the Delta log costs: committing one shard, and opening a long table.
//!
//! ```text
//! cargo bench --bench delta_commit -- [--s3-endpoint URL] [--shards N] [--long N] [--out FILE]
//! ```
//!
//! 1. Commit latency per shard, on local disk and (with `--s3-endpoint`, a loopback S3
//!    server whose bucket `bench` exists; AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from
//!    the environment) on S3: `sink::commit::commit` of N shards (a steps and a
//!    predictions commit each, with the log read back as a writer does), against the
//!    baseline of dtta before the Delta log: one `PutMode::Create` of a commit marker
//!    per shard. Median and mean milliseconds per shard; ratio = Delta / marker.
//! 2. Opening a table of `--long` commits (default 10,000) from scratch, with a
//!    checkpoint every 100 commits and with none; ratio = without / with.
//!
//! Results: a table on stdout and FILE (default `target/bench/delta.json`).

use std::sync::Arc;
use std::time::Instant;

use dtta::sink::commit::{self, Tables};
use dtta::sink::delta::{self, At, Commit, Table};
use dtta::sink::predictions::Layout;
use dtta::storage::Location;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

// The commit records the tests use too (tests/object_stores.rs).
#[path = "../tests/common/records.rs"]
mod records;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn stats(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms.iter().sum::<f64>() / ms.len() as f64)
}

/// Per-shard milliseconds: Delta commits, then marker puts, on `store` below `prefix`.
async fn commit_latency(store: Arc<dyn ObjectStore>, prefix: &str, shards: usize) -> serde_json::Value {
    let out = Location {
        store: store.clone(),
        prefix: Path::from(prefix),
        display: prefix.into(),
    };
    let tables = Tables::new(&out, 100);
    let (mut delta_ms, mut marker_ms) = (Vec::new(), Vec::new());
    for i in 0..shards {
        let (m, p, s) = records::marker_for(&format!("shard-{i:06}"), "bench", 0);
        let t = Instant::now();
        commit::commit(&tables, &m, (&p, &s), &Layout::CLASSIFICATION)
            .await
            .unwrap();
        delta_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // The marker protocol: one conditional create of the shard's JSON record.
        let body = PutPayload::from(serde_json::to_vec_pretty(&m).unwrap());
        let t = Instant::now();
        store
            .put_opts(
                &out.child(&format!("_commits/{}.json", m.shard)),
                body,
                PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        marker_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (dm, da) = stats(delta_ms);
    let (mm, ma) = stats(marker_ms);
    serde_json::json!({
        "shards": shards, "delta_median_ms": dm, "delta_mean_ms": da,
        "marker_median_ms": mm, "marker_mean_ms": ma, "ratio_median": dm / mm,
    })
}

/// Seconds to open a fresh snapshot of a `commits`-long table, with checkpoints every
/// `interval` commits (`u64::MAX`: none).
async fn open_time(dir: &std::path::Path, commits: u64, interval: u64) -> f64 {
    let loc = dtta::storage::open(dir.to_str().unwrap(), &Default::default()).unwrap();
    let schema = dtta::sink::predictions::schema(&Layout::CLASSIFICATION);
    let table = Table::new(loc.clone(), interval);
    for i in 0..commits {
        let add = delta::AddFile::data_file(&format!("shard-{i:06}.bench.parquet"), 4096, 0, 100);
        let c = Commit::one_file(add, format!("dtta/shard-{i:06}"), Default::default());
        table.commit(&c, &schema).await.unwrap();
    }
    let mut secs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let snap = Table::new(loc.clone(), interval).snapshot(At::Latest).await.unwrap();
        secs.push(t.elapsed().as_secs_f64());
        assert_eq!(snap.files.len() as u64, commits);
    }
    stats(secs).0
}

fn main() {
    let shards: usize = arg("--shards").map_or(200, |s| s.parse().unwrap());
    let long: u64 = arg("--long").map_or(10_000, |s| s.parse().unwrap());
    let out = arg("--out").unwrap_or_else(|| "target/bench/delta.json".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut results = serde_json::Map::new();
    let local: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
    let prefix = tmp
        .path()
        .join("local")
        .to_str()
        .unwrap()
        .trim_start_matches('/')
        .to_string();
    std::fs::create_dir_all(tmp.path().join("local")).unwrap();
    results.insert(
        "commit_local".into(),
        rt.block_on(commit_latency(local, &prefix, shards)),
    );
    if let Some(endpoint) = arg("--s3-endpoint") {
        let s3: Arc<dyn ObjectStore> = Arc::new(
            object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name("bench")
                .with_endpoint(endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .build()
                .unwrap(),
        );
        // A prefix of its own, so a rerun against the same server starts empty.
        let prefix = format!("run-{}", std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos());
        results.insert("commit_s3".into(), rt.block_on(commit_latency(s3, &prefix, shards)));
    }
    let with = rt.block_on(open_time(&tmp.path().join("with"), long, 100));
    let without = rt.block_on(open_time(&tmp.path().join("without"), long, u64::MAX));
    results.insert(
        "open".into(),
        serde_json::json!({"commits": long, "with_checkpoints_s": with, "without_s": without, "ratio": without / with}),
    );
    println!("{:<58} {:>10} {:>10} {:>8}", "figure", "dtta", "baseline", "ratio");
    for key in ["commit_local", "commit_s3"] {
        if let Some(r) = results.get(key) {
            println!(
                "{:<58} {:>10.2} {:>10.2} {:>8.2}",
                format!("{key}: ms/shard, Delta (2 commits) vs marker (median)"),
                r["delta_median_ms"].as_f64().unwrap(),
                r["marker_median_ms"].as_f64().unwrap(),
                r["ratio_median"].as_f64().unwrap()
            );
        }
    }
    println!(
        "{:<58} {:>10.3} {:>10.3} {:>8.2}",
        format!("open a {long}-commit table, s: checkpoints vs none"),
        with,
        without,
        without / with
    );
    std::fs::create_dir_all(std::path::Path::new(&out).parent().unwrap()).unwrap();
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&serde_json::Value::Object(results)).unwrap(),
    )
    .unwrap();
    println!("written: {out}");
}
