//! The output's Delta tables as other engines see them: the `deltalake` package, Polars
//! and DuckDB's delta extension (built on the Delta project's Rust kernel) read what
//! several workers committed (on local disk and on S3) and see what dtta sees, version
//! by version; a long log opens from its checkpoint; a process killed
//! between a shard's files and its commits, or between its two commits, leaves nothing
//! half-visible, and the next run finishes the job once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::servers::S3;
use common::*;
use dtta::sink::delta::{self, At, Commit, Table};

fn python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(python.exists(), "the venv is missing: run `make setup`");
    python
}

/// What tools/read_delta.py prints for `output` (`args`: `--all-versions`, ...).
fn read_with_other_engines(output: &str, args: &[&str], env: &[(&str, String)]) -> serde_json::Value {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tools/read_delta.py")).arg(output).args(args);
    let o = cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str()))).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
}

/// Runs `workers` dtta processes at once over the first `shards` demo shards.
fn run_workers(dir: &Path, output: &str, shards: usize, workers: usize, env: &[(&str, String)], extra: &str) {
    let input = repo().join(format!("data/demo-mnist/shard-{{000000..{:06}}}.tar", shards - 1));
    let pipeline = write_pipeline(dir, &input.to_string_lossy(), output, extra);
    let children: Vec<_> = (0..workers)
        .map(|w| {
            dtta()
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .args(["run", pipeline.to_str().unwrap(), "--no-progress"])
                .args(["--worker-index", &w.to_string(), "--worker-count", &workers.to_string()])
                .args(["--set", "output.checkpoint_interval=2"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
}

/// A tiny Diffusion-TTA budget, so that the steps table has rows too; one compute and
/// one decode thread per worker, as three workers share two cores.
const TINY_DTTA: &str = "batch_size = 8\ntorch_threads = 1\ndecode_threads = 1\n[tta]\nmethod = \"diffusion-tta\"\nsteps = 1\naccum = 1\nsamples_per_step = 2\n";

/// The `dtta` facts of predictions commit `v`, read from the log as plain JSON.
fn commit_shards(log: &dyn Fn(u64) -> String, v: u64) -> Vec<String> {
    let text = log(v);
    let info = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|a| a.get("commitInfo").is_some())
        .unwrap();
    serde_json::from_value(info["commitInfo"]["dtta"]["shards"].clone()).unwrap()
}

/// deltalake, Polars and DuckDB agree with each other and with dtta's summary and rows, and
/// each version holds exactly the shards committed by then. Returns what they saw.
fn check_readers_agree(
    output: &str,
    env: &[(&str, String)],
    summary: &serde_json::Value,
    dtta_keys: BTreeSet<(String, String)>,
    log: &dyn Fn(u64) -> String,
) -> serde_json::Value {
    let seen = read_with_other_engines(output, &["--all-versions"], env);
    for table in ["predictions", "steps"] {
        for other in ["polars", "duckdb"] {
            assert_eq!(
                seen[table]["deltalake"], seen[table][other],
                "{table}: deltalake and {other} agree"
            );
        }
    }
    let p = &seen["predictions"]["deltalake"];
    let total = summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["worker"].is_null())
        .unwrap();
    assert_eq!(
        p["rows"], total["tally"]["rows"],
        "rows: deltalake against dtta summarize"
    );
    assert_eq!(
        p["correct_after"], total["tally"]["correct_after"],
        "correct rows against dtta summarize"
    );
    let keys: BTreeSet<(String, String)> = serde_json::from_value(p["keys"].clone()).unwrap();
    assert_eq!(
        keys.len(),
        p["rows"].as_u64().unwrap() as usize,
        "each (shard, key) once"
    );
    assert_eq!(keys, dtta_keys, "the same rows as dtta's reader");
    let steps = &seen["steps"]["deltalake"];
    assert_eq!(
        steps["shards"].as_object().unwrap().len(),
        p["shards"].as_object().unwrap().len()
    );
    assert!(steps["rows"].as_u64().unwrap() > 0, "the steps table has rows");

    // Version k holds the shards of commits 0..=k.
    let latest = p["version"].as_u64().unwrap();
    let mut expected = BTreeSet::new();
    assert_eq!(seen["versions"].as_array().unwrap().len() as u64, latest + 1);
    for k in 0..=latest {
        expected.extend(commit_shards(log, k));
        let at_k = &seen["versions"][k as usize];
        assert_eq!(at_k["deltalake"]["version"], k);
        let shards: BTreeSet<String> = at_k["deltalake"]["shards"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(shards, expected, "version {k}");
        assert_eq!(at_k["deltalake"], at_k["polars"], "version {k}, polars");
        assert_eq!(at_k["deltalake"], at_k["duckdb"], "version {k}, duckdb");
    }
    seen
}

#[test]
fn other_engines_read_a_multi_worker_output_on_local_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    run_workers(tmp.path(), out.to_str().unwrap(), 6, 3, &[], TINY_DTTA);
    let o = run_dtta(&["summarize", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_runs/summary.json")).unwrap()).unwrap();
    let dtta_keys = committed_rows(&out).into_iter().map(|r| (r.shard, r.key)).collect();
    let log = |v: u64| std::fs::read_to_string(out.join(format!("predictions/_delta_log/{v:020}.json"))).unwrap();
    let latest = check_readers_agree(out.to_str().unwrap(), &[], &summary, dtta_keys, &log);
    // Interval 2 over 6 commits: checkpoints at 2 and 4. Without the commits before 4,
    // every reader must open the latest version from that checkpoint, and see the same.
    for v in 0..4 {
        std::fs::remove_file(out.join(format!("predictions/_delta_log/{v:020}.json"))).unwrap();
    }
    let from_checkpoint = read_with_other_engines(out.to_str().unwrap(), &[], &[]);
    for reader in ["deltalake", "polars", "duckdb"] {
        assert_eq!(
            from_checkpoint["predictions"][reader], latest["predictions"][reader],
            "{reader} from the checkpoint at 4"
        );
    }
}

#[test]
fn other_engines_read_a_multi_worker_output_on_s3() {
    let s3 = S3::start_atomic();
    s3.create_bucket("lake");
    let mut env = s3.env();
    env.push(("AWS_ENDPOINT_URL", s3.server.endpoint()));
    let tmp = tempfile::tempdir().unwrap();
    run_workers(tmp.path(), "s3://lake/out/", 6, 3, &env, TINY_DTTA);
    let o = dtta()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(["summarize", "s3://lake/out/"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let store = s3.store("lake");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |key: String| {
        rt.block_on(async {
            object_store::ObjectStoreExt::get(store.as_ref(), &object_store::path::Path::from(key))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        })
    };
    let summary: serde_json::Value = serde_json::from_slice(&get("out/_runs/summary.json".into())).unwrap();
    let dtta_keys = committed_rows_in(&store, "out")
        .into_iter()
        .map(|r| (r.shard, r.key))
        .collect();
    let log = |v: u64| String::from_utf8(get(format!("out/predictions/_delta_log/{v:020}.json")).to_vec()).unwrap();
    check_readers_agree("s3://lake/out", &env, &summary, dtta_keys, &log);
}

#[test]
fn a_table_of_a_thousand_commits_opens_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t");
    std::fs::create_dir_all(&dir).unwrap();
    let loc = dtta::storage::open(dir.to_str().unwrap(), &Default::default()).unwrap();
    let schema = dtta::sink::predictions::schema(&dtta::sink::predictions::Layout::CLASSIFICATION);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let table = Table::new(loc.clone(), 100);
        for i in 0..1000 {
            let add = delta::AddFile::data_file(&format!("s{i:04}.r.parquet"), 1, 0, 1);
            let commit = Commit::one_file(add, format!("dtta/s{i:04}"), Default::default());
            table.commit(&commit, &schema).await.unwrap();
        }
    });
    // Only the checkpoint at 900 and the commits after it are needed to open the table.
    for v in 0..900u64 {
        std::fs::remove_file(dir.join(format!("_delta_log/{v:020}.json"))).unwrap();
    }
    let snap = rt.block_on(Table::new(loc, 100).snapshot(At::Latest)).unwrap();
    assert_eq!(snap.version, Some(999));
    assert_eq!(snap.files.len(), 1000);
    assert_eq!(snap.txns.len(), 1000);
    let o = Command::new(python())
        .arg("-c")
        .arg(
            "import sys, os\nfrom deltalake import DeltaTable\nt = DeltaTable(sys.argv[1])\n\
             print(t.version(), len(t.file_uris()))\nsys.stdout.flush()\nos._exit(0)",
        )
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "999 1000", "{}", text(&o));
}

/// Runs the three-shard pipeline in `dir` with `env`, one shard at a time.
fn run_three(dir: &Path, out: &Path, env: &[(&str, &str)]) -> Output {
    let input = repo().join("data/demo-mnist/shard-{000000..000002}.tar");
    let pipeline = write_pipeline(
        dir,
        &input.to_string_lossy(),
        out.to_str().unwrap(),
        "shards_in_flight = 1\n",
    );
    dtta()
        .envs(env.iter().copied())
        .args(["run", pipeline.to_str().unwrap(), "--no-progress"])
        .output()
        .unwrap()
}

/// `run_three` with `DTTA_ABORT_AT=point`: the process must die of the abort there.
fn run_aborted_at(dir: &Path, out: &Path, point: &str) {
    use std::os::unix::process::ExitStatusExt;
    let o = run_three(dir, out, &[("DTTA_ABORT_AT", point)]);
    assert_eq!(o.status.signal(), Some(libc::SIGABRT), "{}", text(&o));
}

/// Every shard once in both tables, each shard's steps and predictions from one run.
fn check_complete(out: &Path) {
    let predictions = committed_markers_of(out, "predictions");
    let steps = committed_markers_of(out, "steps");
    assert_eq!(predictions.len(), 3);
    let runs = |m: &BTreeMap<String, dtta::sink::commit::CommitMarker>| -> Vec<(String, String)> {
        m.iter().map(|(s, m)| (s.clone(), m.run_id.clone())).collect()
    };
    assert_eq!(
        runs(&predictions),
        runs(&steps),
        "the pair comes from one run per shard"
    );
    let rows = committed_rows(out);
    let unique: BTreeSet<_> = rows.iter().map(|r| (r.shard.clone(), r.key.clone())).collect();
    assert_eq!((rows.len(), unique.len()), (300, 300), "each (shard, key) once");
}

#[test]
fn a_kill_after_the_files_and_before_the_commits_shows_nothing_and_vacuum_removes_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    run_aborted_at(tmp.path(), &out, "files:2");
    // The second shard's files exist; no snapshot references them.
    assert_eq!(all_prediction_files(&out).len(), 2);
    assert_eq!(committed_markers_of(&out, "predictions").len(), 1);
    assert_eq!(committed_markers_of(&out, "steps").len(), 1);
    let seen = read_with_other_engines(out.to_str().unwrap(), &[], &[]);
    assert_eq!(
        seen["predictions"]["deltalake"]["rows"], 100,
        "nothing of the killed shard is visible"
    );

    // Young files are kept; with no retention, exactly the two unreferenced ones go.
    let o = run_dtta(&["vacuum", out.to_str().unwrap(), "--dry-run"]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("would remove 0"),
        "{}",
        text(&o)
    );
    let o = run_dtta(&["vacuum", out.to_str().unwrap(), "--retention", "0s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).matches("  removed ").count(),
        2,
        "{}",
        text(&o)
    );
    assert_eq!(all_prediction_files(&out).len(), 1, "the referenced file stays");
    assert_eq!(committed_rows(&out).len(), 100);

    let o = run_three(tmp.path(), &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_stdout_has(&o, "2 committed, 1 skipped");
    check_complete(&out);
}

#[test]
fn a_kill_between_the_two_commits_is_completed_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    run_aborted_at(tmp.path(), &out, "steps:2");
    // Steps holds the second shard, predictions (the table of record) does not yet.
    assert_eq!(committed_markers_of(&out, "steps").len(), 2);
    let predictions = committed_markers_of(&out, "predictions");
    assert_eq!(predictions.len(), 1);
    let o = run_dtta(&["summarize", out.to_str().unwrap()]);
    assert_stdout_has(&o, "1 committed shard(s)");

    // The next run commits the killed run's predictions file for that shard, then does
    // the third shard.
    let o = run_three(tmp.path(), &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_stderr_has(&o, "completed the predictions commit");
    assert_stdout_has(&o, "1 committed, 2 skipped");
    check_complete(&out);
}
