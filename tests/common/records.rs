//! Shard commit records for tests and benchmarks that commit without running a pipeline
//! (tests/object_stores.rs; benches/delta_commit.rs includes this file by path).
#![allow(dead_code)]

use dtta::sink::commit::CommitMarker;
use dtta::sink::{DataFile, Tally};

/// Shard `shard`'s commit record for run `run` by worker `worker` (of 8), with its two
/// placeholder files (100 rows, 4 KiB each: sizes only the log records).
pub fn marker_for(shard: &str, run: &str, worker: usize) -> (CommitMarker, DataFile, DataFile) {
    let file = |table: &str| DataFile {
        rel: format!("{table}/{shard}.{run}.parquet"),
        rows: 100,
        size: 4096,
        modified_ms: 0,
    };
    let marker = CommitMarker {
        shard: shard.into(),
        run_id: run.into(),
        predictions: file("predictions").rel,
        steps: file("steps").rel,
        source: format!("s3://bucket/in/{shard}.tar"),
        method: "source".into(),
        bundle_sha256: Some("0".repeat(64)),
        config_sha256: Some("1".repeat(64)),
        worker_index: worker,
        worker_count: 8,
        committed_at: "2026-12-04T00:00:00Z".into(),
        tally: Tally {
            rows: 100,
            ..Default::default()
        },
    };
    (marker, file("predictions"), file("steps"))
}
