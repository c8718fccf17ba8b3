//! Many workers on one job, identified by their scheduler's environment, against S3:
//! every sample exactly once, no shard twice, a killed worker's index rerun alone, one
//! combined summary. And the manifests the job relies on.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::servers::S3;
use common::*;
use object_store::path::Path as StorePath;

struct Job {
    s3: S3,
    pipeline: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

const SHARDS: usize = 12;

fn job(prefix: &str) -> Job {
    let s3 = S3::start();
    s3.create_bucket("data");
    let store = s3.store("data");
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_samples();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for i in 0..SHARDS {
        let path = tmp.path().join(format!("s-{i:02}.tar"));
        write_demo_shard(&path, &demo[i * 50..(i + 1) * 50]);
        let bytes = std::fs::read(&path).unwrap();
        rt.block_on(object_store::ObjectStoreExt::put(
            store.as_ref(),
            &StorePath::from(format!("in/s-{i:02}.tar")),
            bytes.into(),
        ))
        .unwrap();
    }
    let pipeline = write_pipeline(
        tmp.path(),
        "s3://data/in/s-{00..11}.tar",
        &format!("s3://data/{prefix}/"),
        // A small Diffusion-TTA budget: slow enough (milliseconds per image) to be cut.
        "batch_size = 1\ntorch_threads = 1\nshards_in_flight = 1\n[tta]\nmethod = \"diffusion-tta\"\nsteps = 1\naccum = 1\nsamples_per_step = 2\n",
    );
    Job {
        s3,
        pipeline,
        _tmp: tmp,
    }
}

impl Job {
    fn spawn(&self, env: &[(&str, String)]) -> Child {
        dtta()
            .envs(self.s3.env())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["run", self.pipeline.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Marker contents below the output: shard -> worker index.
    fn markers(&self, prefix: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let dir = self.s3.server.dir.path().join(format!("data/{prefix}/_commits"));
        for entry in std::fs::read_dir(dir).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                out.insert(
                    m["shard"].as_str().unwrap().to_string(),
                    m["worker_index"].as_u64().unwrap(),
                );
            }
        }
        out
    }

    fn rows(&self, prefix: &str) -> Vec<Row> {
        committed_rows(&self.s3.server.dir.path().join(format!("data/{prefix}")))
    }
}

fn check_exactly_once(job: &Job, prefix: &str, workers: u64) {
    let markers = job.markers(prefix);
    assert_eq!(markers.len(), SHARDS, "every shard committed once");
    for (i, (shard, worker)) in markers.iter().enumerate() {
        assert_eq!(*worker, i as u64 % workers, "{shard} went to worker i mod count");
    }
    let rows = job.rows(prefix);
    let unique: BTreeSet<_> = rows.iter().map(|r| (r.shard.clone(), r.key.clone())).collect();
    assert_eq!(rows.len(), SHARDS * 50);
    assert_eq!(unique.len(), rows.len(), "no sample twice");
}

fn wait_all(children: Vec<Child>) {
    for child in children {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
}

#[test]
fn kubernetes_indexed_job_workers_split_the_shards() {
    let job = job("k8s");
    let children = (0..3)
        .map(|i| {
            job.spawn(&[
                ("JOB_COMPLETION_INDEX", i.to_string()),
                ("DTTA_WORKER_COUNT", "3".into()),
            ])
        })
        .collect();
    wait_all(children);
    check_exactly_once(&job, "k8s", 3);
}

#[test]
fn slurm_array_workers_split_the_shards_and_a_killed_index_reruns_alone() {
    let job = job("slurm");
    let env = |task: usize| {
        vec![
            ("SLURM_ARRAY_TASK_ID", task.to_string()),
            ("SLURM_ARRAY_TASK_MIN", "1".to_string()),
            ("SLURM_ARRAY_TASK_COUNT", "3".to_string()),
        ]
    };
    let mut victim = job.spawn(&env(2)); // worker index 1
    let others: Vec<Child> = [1, 3].iter().map(|t| job.spawn(&env(*t))).collect();
    // Kill worker 1 once it has committed something, before it finishes.
    let started = Instant::now();
    loop {
        let mine = job.markers("slurm").values().filter(|w| **w == 1).count();
        if mine >= 1 || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let finished_early = victim.try_wait().unwrap().is_some();
    victim.kill().unwrap();
    victim.wait().unwrap();
    wait_all(others);
    let before = job.markers("slurm");
    if !finished_early {
        assert!(
            before.values().filter(|w| **w == 1).count() < SHARDS / 3,
            "worker 1 was cut short"
        );
    }
    // Rerun only index 1 (task 2).
    let o = job.spawn(&env(2)).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    check_exactly_once(&job, "slurm", 3);

    // One combined summary over the three workers, as JSON and Parquet under _runs/.
    let o = dtta()
        .envs(job.s3.env())
        .args(["summarize", "s3://data/slurm/"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("12 committed shard(s)"), "{out}");
    let runs = job.s3.server.dir.path().join("data/slurm/_runs");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("summary.json")).unwrap()).unwrap();
    let rows = summary["rows"].as_array().unwrap();
    let total = rows.iter().find(|r| r["worker"].is_null()).unwrap();
    assert_eq!(total["tally"]["rows"], 600);
    let workers: BTreeSet<u64> = rows.iter().filter_map(|r| r["worker"].as_u64()).collect();
    assert_eq!(workers, BTreeSet::from([0, 1, 2]));
    assert!(rows.iter().all(|r| r["images_per_s"].as_f64().is_some_and(|v| v > 0.0)));
    assert!(runs.join("summary.parquet").exists());
}

#[test]
fn conflicting_worker_identity_is_an_error_naming_the_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_pipeline(tmp.path(), "data/", "out/", "");
    let o = dtta()
        .env("JOB_COMPLETION_INDEX", "2")
        .args([
            "plan",
            p.to_str().unwrap(),
            "--worker-index",
            "1",
            "--worker-count",
            "4",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--worker-index") && e.contains("JOB_COMPLETION_INDEX"),
        "{e}"
    );
}

#[test]
fn the_kubernetes_manifest_runs_an_indexed_job_per_night() {
    let text = std::fs::read_to_string(repo().join("pipelines/k8s/nightly-relabel.yaml")).unwrap();
    let y: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(y["kind"], "CronJob");
    let job = &y["spec"]["jobTemplate"]["spec"];
    assert_eq!(job["completionMode"], "Indexed");
    assert_eq!(job["completions"], job["parallelism"]);
    assert!(job["backoffLimitPerIndex"].as_u64().is_some_and(|n| n > 0));
    let pod = &job["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let c = &pod["containers"][0];
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], 1);
    let env = c["env"].as_sequence().unwrap();
    let var = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let count: u64 = var("DTTA_WORKER_COUNT")["value"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        Some(count),
        job["completions"].as_u64(),
        "worker count equals completions"
    );
    for secret in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            var(secret)["valueFrom"]["secretKeyRef"]["name"].is_string(),
            "{secret} from a Secret"
        );
    }
    assert_eq!(
        var("JOB_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.labels['batch.kubernetes.io/job-name']"
    );
    let args = c["args"][0].as_str().unwrap();
    assert!(
        args.contains("dtta run pipelines/nightly-relabel.toml") && args.contains("${RUN_DATE}"),
        "{args}"
    );
    assert!(repo().join("pipelines/nightly-relabel.toml").exists());

    // The date part: the CronJob names Jobs <name>-<scheduled minutes>; the shell turns
    // that into the scheduled day, the same for every pod and retry.
    let o = std::process::Command::new("sh")
        .args([
            "-c",
            "JOB_NAME=dtta-nightly-relabel-29400000; date -u -d \"@$(( ${JOB_NAME##*-} * 60 ))\" +%F",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "2025-11-24");

    let sbatch = std::fs::read_to_string(repo().join("pipelines/slurm/robustness-eval.sbatch")).unwrap();
    assert!(sbatch.contains("#SBATCH --array=") && sbatch.contains("dtta run pipelines/robustness-eval.toml"));
    for pipeline in ["nightly-relabel.toml", "robustness-eval.toml"] {
        let path = repo().join("pipelines").join(pipeline);
        dtta::config::PipelineConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{pipeline}: {e}"));
    }
}
