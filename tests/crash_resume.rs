//! Killing `dtta run` (SIGKILL) at random points and running it again completes the
//! job with every sample exactly once, and no uncommitted file left behind.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::servers::S3;
use common::*;

#[test]
fn killed_runs_resume_with_every_sample_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    kill_and_resume(tmp.path(), &out.to_string_lossy(), &out, &[]);
}

#[test]
fn killed_runs_resume_with_every_sample_exactly_once_on_s3() {
    let s3 = S3::start();
    s3.create_bucket("results");
    let tmp = tempfile::tempdir().unwrap();
    // s3s-fs keeps each object as a file below its root, so the same file checks apply.
    let on_disk = s3.server.dir.path().join("results/run");
    kill_and_resume(tmp.path(), "s3://results/run/", &on_disk, &s3.env());
}

/// Runs the job, SIGKILLs it at random points several times, lets it finish, and checks
/// the committed output (seen as files in `out_dir`) holds every sample exactly once.
fn kill_and_resume(dir: &std::path::Path, out_url: &str, out_dir: &std::path::Path, env: &[(&'static str, String)]) {
    let shards = dir.join("shards");
    std::fs::create_dir(&shards).unwrap();
    let demo = demo_samples();
    let shard_count = 60;
    for i in 0..shard_count {
        let chunk: Vec<_> = demo.iter().skip(i * 15).take(100).cloned().collect();
        write_demo_shard(&shards.join(format!("part-{i:03}.tar")), &chunk);
    }
    let out = out_dir.to_path_buf();
    let input = format!("{}/part-*.tar", shards.display());
    let pipeline = write_pipeline(dir, &input, out_url, "");
    // Small batches and one compute thread keep the run long enough to be cut.
    let args = [
        "run",
        pipeline.to_str().unwrap(),
        "--set",
        "runtime.batch_size=1",
        "--set",
        "runtime.torch_threads=1",
        "--set",
        "runtime.shards_in_flight=3",
    ];

    let mut kills = 0;
    for round in 0..10 {
        if kills >= 4 {
            break;
        }
        let mut child = dtta()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let before = committed_files(&out).len();
        // Random point: a random delay, or (odd rounds) right after a random number of
        // further commits land.
        let delay = Duration::from_millis(350 + rand::random::<u64>() % 500);
        let commits = 1 + rand::random::<u64>() as usize % 4;
        let started = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            let cut = if round % 2 == 1 {
                committed_files(&out).len() >= before + commits || started.elapsed() > Duration::from_secs(20)
            } else {
                started.elapsed() >= delay
            };
            if cut {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                eprintln!(
                    "round {round}: killed at {:?} with {} shard(s) committed",
                    started.elapsed(),
                    committed_files(&out).len()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let o = dtta()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(kills >= 3, "the run was too fast to interrupt ({kills} kills)");

    let committed = committed_files(&out);
    assert_eq!(committed.len(), shard_count, "every shard committed");
    let rows = committed_rows(&out);
    let unique: BTreeSet<_> = rows.iter().map(|r| (r.shard.clone(), r.key.clone())).collect();
    assert_eq!(rows.len(), shard_count * 100, "no sample lost or duplicated");
    assert_eq!(unique.len(), rows.len(), "every (shard, key) exactly once");
    // Files of killed runs were removed once their shard committed: a plain glob over
    // predictions/ sees exactly the committed data.
    let committed_paths: BTreeSet<_> = committed.values().cloned().collect();
    let on_disk: BTreeSet<_> = all_prediction_files(&out).into_iter().collect();
    assert_eq!(on_disk, committed_paths);
}
