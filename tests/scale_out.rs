//! Many workers on one job, identified by their scheduler's environment, against S3:
//! every sample exactly once, no shard twice, a killed worker's index rerun alone, one
//! combined summary. And the manifests the job relies on: the Kubernetes pods run the
//! manifest's own command and environment.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};

use common::servers::S3;
use common::*;
use common::{kill, wait_while_running, was_killed};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};

struct Job {
    s3: S3,
    pipeline: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

const SHARDS: usize = 12;

fn job(prefix: &str) -> Job {
    // Workers commit to one Delta table at once: the server's creates must be atomic.
    let s3 = S3::start_atomic();
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

    /// The predictions table below the output `bucket/prefix` (read through the
    /// server): shard -> worker index of the commit.
    fn markers(&self, output: &str) -> BTreeMap<String, u64> {
        self.markers_of(output, "predictions")
    }

    /// The same for `table`.
    fn markers_of(&self, output: &str, table: &str) -> BTreeMap<String, u64> {
        let (bucket, prefix) = output.split_once('/').unwrap();
        committed_markers_in(&self.s3.store(bucket), prefix, table)
            .into_iter()
            .map(|(shard, m)| (shard, m.worker_index as u64))
            .collect()
    }

    fn rows(&self, output: &str) -> Vec<Row> {
        let (bucket, prefix) = output.split_once('/').unwrap();
        committed_rows_in(&self.s3.store(bucket), prefix)
    }
}

/// Every shard below the output `bucket/prefix` committed once, by worker i mod count.
fn check_exactly_once(job: &Job, output: &str, workers: u64) {
    let markers = job.markers(output);
    assert_eq!(markers.len(), SHARDS, "every shard committed once");
    for (i, (shard, worker)) in markers.iter().enumerate() {
        assert_eq!(*worker, i as u64 % workers, "{shard} went to worker i mod count");
    }
    let rows = job.rows(output);
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

/// The Kubernetes manifest.
fn manifest() -> serde_yaml::Value {
    let text = std::fs::read_to_string(repo().join("pipelines/k8s/nightly-relabel.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// The spec of the Indexed Job the manifest's CronJob creates each night.
fn job_spec(manifest: &serde_yaml::Value) -> &serde_yaml::Value {
    &manifest["spec"]["jobTemplate"]["spec"]
}

/// The one container of the Job's pods.
fn container(manifest: &serde_yaml::Value) -> &serde_yaml::Value {
    &job_spec(manifest)["template"]["spec"]["containers"][0]
}

/// What Kubernetes runs in pod `index` of the Job `job_name`: the container's command and
/// args, with the container's environment over `cluster` (what the test stands in for:
/// the S3 endpoint, and the Secrets' values by variable name), the Job name for its
/// label, and the index Kubernetes gives an Indexed Job's pod.
fn pod(manifest: &serde_yaml::Value, job_name: &str, index: u64, cluster: &[(&str, String)]) -> Command {
    let c = container(manifest);
    let strings = |v: &serde_yaml::Value| -> Vec<String> {
        let items = v.as_sequence().into_iter().flatten();
        items.map(|s| s.as_str().unwrap().to_string()).collect()
    };
    let argv: Vec<String> = strings(&c["command"]).into_iter().chain(strings(&c["args"])).collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).envs(cluster.iter().map(|(k, v)| (*k, v.as_str())));
    cmd.env("JOB_COMPLETION_INDEX", index.to_string());
    for var in c["env"].as_sequence().unwrap() {
        let name = var["name"].as_str().unwrap();
        let from = &var["valueFrom"];
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else if from["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']" {
            job_name.to_string()
        } else if from["secretKeyRef"]["name"].is_string() {
            let secret = cluster.iter().find(|(k, _)| *k == name);
            secret
                .unwrap_or_else(|| panic!("no test value for the Secret of {name}"))
                .1
                .clone()
        } else {
            panic!("the test cannot fill {name}: {var:?}")
        };
        cmd.env(name, value);
    }
    cmd
}

#[test]
fn kubernetes_indexed_job_workers_split_the_shards() {
    // One night of the manifest's CronJob: every pod of its Indexed Job runs the
    // manifest's own command, with its environment, as Kubernetes would start it; `dtta`
    // on PATH is the binary under test, and the working directory holds a test pipeline
    // at the path the command names.
    let manifest = manifest();
    let job = job("k8s"); // its output URL is the one the command sets
    job.s3.create_bucket("relabel");
    let workdir = job._tmp.path().join("pod");
    std::fs::create_dir_all(workdir.join("pipelines")).unwrap();
    std::fs::copy(&job.pipeline, workdir.join("pipelines/nightly-relabel.toml")).unwrap();
    let bin = job._tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_dtta"), bin.join("dtta")).unwrap();
    let path = std::env::join_paths(
        std::iter::once(bin).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    // The CronJob names each night's Job <cronjob>-<scheduled minutes since the epoch>.
    let job_name = format!("{}-29400000", manifest["metadata"]["name"].as_str().unwrap());
    let completions = job_spec(&manifest)["completions"].as_u64().unwrap();
    let children = (0..completions)
        .map(|i| {
            pod(&manifest, &job_name, i, &job.s3.env())
                .env("PATH", &path)
                .env("DTTA_LOG", "info")
                .current_dir(&workdir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_all(children);
    // Minute 29400000 is in 2025-11-24 (UTC): every pod wrote below that night's prefix.
    let store = job.s3.store("relabel");
    let listing = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(store.list_with_delimiter(Some(&StorePath::from("nightly"))))
        .unwrap();
    let nights: Vec<String> = listing
        .common_prefixes
        .iter()
        .map(|p| p.filename().unwrap().to_string())
        .collect();
    assert_eq!(nights, ["2025-11-24"], "the night's output prefix");
    check_exactly_once(&job, "relabel/nightly/2025-11-24", completions);
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
    // Kill worker 1 once its first commit lands, with shards of its own still to do.
    let mine = || job.markers("data/slurm").values().filter(|w| **w == 1).count();
    wait_while_running(
        &mut victim,
        || "worker 1 finished before it could be killed".into(),
        || mine() >= 1,
    );
    let status = kill(&mut victim);
    assert!(was_killed(status), "worker 1 was killed ({status})");
    // In steps: its shards in predictions, plus one a kill may have caught between its two
    // commits, which the rerun completes first (and so skips too).
    let done = job
        .markers_of("data/slurm", "steps")
        .values()
        .filter(|w| **w == 1)
        .count();
    let share = SHARDS / 3;
    assert!(
        done < share,
        "worker 1 was cut short: {done} of its {share} shard(s) committed"
    );
    wait_all(others);
    // Rerun only index 1 (task 2): it skips what the killed run committed, does the rest.
    let o = job.spawn(&env(2)).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let expected = format!(
        "shards:   {} committed, {done} skipped (already committed), 0 failed",
        share - done
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&expected),
        "expected `{expected}`: {}",
        text(&o)
    );
    check_exactly_once(&job, "data/slurm", 3);

    // One combined summary over the three workers, as JSON and Parquet under _runs/.
    let o = dtta()
        .envs(job.s3.env())
        .args(["summarize", "s3://data/slurm/"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("12 committed shard(s)"), "{out}");
    let store = job.s3.store("data");
    let read = |key: &str| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { store.get(&StorePath::from(key)).await?.bytes().await })
    };
    let summary: serde_json::Value = serde_json::from_slice(&read("slurm/_runs/summary.json").unwrap()).unwrap();
    let rows = summary["rows"].as_array().unwrap();
    let total = rows.iter().find(|r| r["worker"].is_null()).unwrap();
    assert_eq!(total["tally"]["rows"], 600);
    let workers: BTreeSet<u64> = rows.iter().filter_map(|r| r["worker"].as_u64()).collect();
    assert_eq!(workers, BTreeSet::from([0, 1, 2]));
    assert!(rows.iter().all(|r| r["images_per_s"].as_f64().is_some_and(|v| v > 0.0)));
    assert!(read("slurm/_runs/summary.parquet").is_ok());
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
    // Its command and environment are run by kubernetes_indexed_job_workers_split_the_shards.
    let y = manifest();
    assert_eq!(y["kind"], "CronJob");
    let job = job_spec(&y);
    assert_eq!(job["completionMode"], "Indexed");
    assert_eq!(job["completions"], job["parallelism"]);
    assert!(job["backoffLimitPerIndex"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(job["template"]["spec"]["restartPolicy"], "Never");
    let c = container(&y);
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
    assert!(args.contains("dtta run pipelines/nightly-relabel.toml"), "{args}");
    assert!(repo().join("pipelines/nightly-relabel.toml").exists());

    let sbatch = std::fs::read_to_string(repo().join("pipelines/slurm/robustness-eval.sbatch")).unwrap();
    assert!(sbatch.contains("#SBATCH --array=") && sbatch.contains("dtta run pipelines/robustness-eval.toml"));
    for pipeline in [
        "nightly-relabel.toml",
        "robustness-eval.toml",
        "robustness-eval-seg.toml",
        "robustness-eval-depth.toml",
        "demo-seg.toml",
        "demo-depth.toml",
        "dusa-imagenet-c.toml",
    ] {
        let path = repo().join("pipelines").join(pipeline);
        dtta::config::PipelineConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{pipeline}: {e}"));
    }
}
