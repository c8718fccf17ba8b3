//! Killing `dtta run` (SIGKILL) at random points and running it again completes the
//! job with every sample exactly once, and no uncommitted file left behind. The kill
//! points come from one seed per test (`DTTA_TEST_SEED` replays it): each run is killed
//! once a shard's data is written but not committed, or after a drawn number of further
//! commits, at once or a drawn delay later. What is asserted is what happened (each run
//! was killed, what the last run skipped and committed, the rows, the files), not how
//! long anything took.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::servers::S3;
use common::*;
use common::{kill, test_seed, wait_while_running, was_killed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn killed_runs_resume_with_every_sample_exactly_once() {
    let seed = test_seed("killed_runs_resume_with_every_sample_exactly_once");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    kill_and_resume(seed, tmp.path(), &out.to_string_lossy(), &out, &[]);
}

#[test]
fn killed_runs_resume_with_every_sample_exactly_once_on_s3() {
    let seed = test_seed("killed_runs_resume_with_every_sample_exactly_once_on_s3");
    let s3 = S3::start();
    s3.create_bucket("results");
    let tmp = tempfile::tempdir().unwrap();
    // s3s-fs keeps each object as a file below its root, so the same file checks apply.
    let on_disk = s3.server.dir.path().join("results/run");
    kill_and_resume(seed, tmp.path(), "s3://results/run/", &on_disk, &s3.env());
}

/// Runs killed before they finish.
const KILLS: usize = 4;

/// Runs the job, SIGKILLs it at seeded points [`KILLS`] times, lets it finish, and checks
/// the committed output (seen as files in `out_dir`) holds every sample exactly once.
fn kill_and_resume(
    seed: u64,
    dir: &std::path::Path,
    out_url: &str,
    out_dir: &std::path::Path,
    env: &[(&'static str, String)],
) {
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
    // Small batches and one compute thread: many shards in flight when a kill lands.
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

    let mut rng = StdRng::seed_from_u64(seed);
    let mut history = format!("seed {seed}");
    for round in 0..KILLS {
        // The kill point: a shard's data written but not yet committed (else the commit
        // limit), or after 1 to 3 further commits, at once or up to 250 ms later.
        let commits = rng.random_range(1..=3usize);
        let delay = Duration::from_millis(rng.random_range(1..250));
        let point = match rng.random_range(0..3) {
            0 => KillPoint::Uncommitted,
            1 => KillPoint::Commits,
            _ => KillPoint::Later(delay),
        };
        let before = committed_files(&out).len();
        let left_before = uncommitted(&out);
        let log = dir.join(format!("round-{round}.log"));
        let mut child = dtta()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let context = || {
            format!(
                "{history}; round {round}, log:\n{}",
                std::fs::read_to_string(&log).unwrap()
            )
        };
        wait_while_running(&mut child, context, || {
            let new_data = point == KillPoint::Uncommitted && !uncommitted(&out).is_subset(&left_before);
            new_data || committed_files(&out).len() >= before + commits
        });
        if let KillPoint::Later(delay) = point {
            std::thread::sleep(delay);
        }
        let status = kill(&mut child);
        assert!(
            was_killed(status),
            "round {round} ended by itself ({status}); {}",
            context()
        );
        let (after, left) = (committed_files(&out).len(), uncommitted(&out).len());
        let what =
            format!("round {round}: killed {point:?} (commit limit {commits}): {after} committed, {left} uncommitted");
        eprintln!("{what}");
        history += &format!("; {what}");
    }
    // Shards in steps: those in predictions, plus any a kill left between a shard's two
    // commits, which the next run completes before it plans (so it skips them too).
    let committed_before = committed_markers_of(&out, "steps").len();
    let o = dtta()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{history}\n{}", text(&o));
    // The last run found the killed runs' commits and did the rest.
    let report = String::from_utf8_lossy(&o.stdout);
    let expected = format!(
        "shards:   {} committed, {committed_before} skipped (already committed), 0 failed",
        shard_count - committed_before
    );
    assert!(
        report.contains(&expected),
        "{history}: expected `{expected}` in\n{report}"
    );

    let committed = committed_files(&out);
    assert_eq!(committed.len(), shard_count, "every shard committed ({history})");
    let rows = committed_rows(&out);
    let unique: BTreeSet<_> = rows.iter().map(|r| (r.shard.clone(), r.key.clone())).collect();
    assert_eq!(
        rows.len(),
        shard_count * 100,
        "no sample lost or duplicated ({history})"
    );
    assert_eq!(unique.len(), rows.len(), "every (shard, key) exactly once ({history})");
    // Files of killed runs were removed once their shard committed: a plain glob over
    // predictions/ sees exactly the committed data.
    assert_eq!(uncommitted(&out), BTreeSet::new(), "{history}");
}

/// Where a run is killed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KillPoint {
    /// As soon as a predictions file that no commit names appears (between a shard's data
    /// and its commit), or at the commit limit, whichever comes first.
    Uncommitted,
    /// Right after the commit limit is reached.
    Commits,
    /// This long after the commit limit is reached.
    Later(Duration),
}

/// Predictions files below `out` that no commit of the predictions table names.
fn uncommitted(out: &std::path::Path) -> BTreeSet<std::path::PathBuf> {
    let committed: BTreeSet<_> = committed_files(out).into_values().collect();
    all_prediction_files(out)
        .into_iter()
        .filter(|p| !committed.contains(p))
        .collect()
}
