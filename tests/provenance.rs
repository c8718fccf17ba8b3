//! Provenance (README, "Provenance"): the bundle digest, the pin, the resume check, the
//! lineage columns and the run summaries, on the real binary, the real demo bundle and
//! real shards. Runs use the `source` method on demo shards of 100 images.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::Int32Type;
use arrow_schema::DataType;
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The `sha256:` line `dtta inspect` prints for `bundle`.
fn inspected_sha256(bundle: &Path) -> String {
    let o = run_dtta(&["inspect", bundle.to_str().unwrap(), "--device", "cpu"]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("sha256:"))
        .unwrap_or_else(|| panic!("inspect prints no sha256: {stdout}"))
        .trim()
        .to_string()
}

/// A copy of the demo bundle in `dir`.
fn copy_demo_bundle(dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    for entry in std::fs::read_dir(demo_bundle()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, bundle.join(path.file_name().unwrap())).unwrap();
    }
    bundle
}

/// Runs `dtta run` as worker `worker` of 2 (of demo shards 0 and 1) with
/// `bundle`, plus `extra` arguments.
fn run_on(pipeline: &Path, bundle: &Path, worker: usize, extra: &[&str]) -> std::process::Output {
    let set_bundle = format!("model.bundle={}", bundle.display());
    let worker = worker.to_string();
    let mut args = vec![
        "run",
        pipeline.to_str().unwrap(),
        "--set",
        &set_bundle,
        "--worker-index",
        &worker,
        "--worker-count",
        "2",
    ];
    args.extend_from_slice(extra);
    run_dtta(&args)
}

/// A pipeline over demo shards 0 and 1 (one per worker of two) into `out`.
fn two_shard_pipeline(dir: &Path, out: &Path) -> PathBuf {
    let input = repo().join("data/demo-mnist/shard-{000000..000001}.tar");
    write_pipeline(dir, &input.to_string_lossy(), &out.to_string_lossy(), "")
}

/// Every file below `dir`, relative.
fn files_below(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                found.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

/// The values and the arrow type of column `bundle_sha256` of a Parquet file.
fn lineage_column(path: &Path) -> (DataType, Vec<String>) {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let field = reader.schema().field_with_name("bundle_sha256").unwrap().clone();
    let mut values = Vec::new();
    for batch in reader.build().unwrap() {
        let batch = batch.unwrap();
        let column = batch.column_by_name("bundle_sha256").unwrap();
        let dict = column.as_dictionary::<Int32Type>();
        let strings = dict.values().as_string::<i32>();
        for key in dict.keys().iter() {
            values.push(strings.value(key.unwrap() as usize).to_string());
        }
    }
    (field.data_type().clone(), values)
}

/// A shard's commit record in the predictions table, as JSON.
fn marker(out: &Path, shard: &str) -> serde_json::Value {
    serde_json::to_value(&committed_markers(out)[shard]).unwrap()
}

/// The `dtta` facts of every commit of `table`'s log, oldest first.
fn commit_facts(out: &Path, table: &str) -> Vec<serde_json::Value> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(out.join(table).join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    logs.sort();
    logs.iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let info = text
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .find(|a| a.get("commitInfo").is_some())
                .expect("every commit has commitInfo");
            info["commitInfo"]["dtta"].clone()
        })
        .collect()
}

fn run_summaries(out: &Path) -> Vec<serde_json::Value> {
    let mut runs: Vec<serde_json::Value> = std::fs::read_dir(out.join("_runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("summary"))
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect();
    // Start order: two runs that start within one second have run ids in random order.
    runs.sort_by_key(|r| chrono::DateTime::parse_from_rfc3339(r["started_at"].as_str().unwrap()).unwrap());
    runs
}

#[test]
fn the_digest_is_the_shell_pipelines_and_inspect_prints_it() {
    let demo = shell_bundle_sha256(&demo_bundle());
    assert_eq!(inspected_sha256(&demo_bundle()), demo);

    // Nested folders, names that sort differently by bytes than by locale, and a file
    // the spec does not name all count.
    let tmp = tempfile::tempdir().unwrap();
    let bundle = copy_demo_bundle(tmp.path());
    std::fs::create_dir_all(bundle.join("docs/more")).unwrap();
    std::fs::write(bundle.join("docs/more/NOTES.txt"), "trained on MNIST\n").unwrap();
    std::fs::write(bundle.join("README"), "demo\n").unwrap();
    std::fs::write(bundle.join("bundle.toml.orig"), "").unwrap();
    let nested = shell_bundle_sha256(&bundle);
    assert_ne!(nested, demo);
    assert_eq!(inspected_sha256(&bundle), nested);
}

#[test]
fn a_wrong_pin_exits_2_with_both_digests_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pipeline = two_shard_pipeline(tmp.path(), &out);
    let demo = shell_bundle_sha256(&demo_bundle());
    // Another bundle's digest: the demo bundle without its denoiser.
    let other = copy_demo_bundle(tmp.path());
    std::fs::remove_file(other.join("denoiser.pt")).unwrap();
    let pin = shell_bundle_sha256(&other);
    let o = run_dtta(&[
        "run",
        pipeline.to_str().unwrap(),
        "--set",
        &format!("model.sha256={pin}"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error.len(), 1, "{stderr}");
    for part in [&pin, &demo, &demo_bundle().display().to_string()] {
        assert!(error[0].contains(part.as_str()), "the error names {part}: {stderr}");
    }
    assert_eq!(files_below(&out), Vec::<String>::new(), "nothing written");

    // A pin that is no digest is a configuration error.
    let o = run_dtta(&["run", pipeline.to_str().unwrap(), "--set", "model.sha256=e25fa978"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_stderr_has(&o, "model.sha256");

    // The right pin runs; without one, the digest is logged with a hint to pin it.
    let pinned = format!("model.sha256={}", demo.to_uppercase());
    let o = run_on(&pipeline, &demo_bundle(), 0, &["--set", &pinned]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run_on(&pipeline, &demo_bundle(), 1, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("model.sha256 = \"{demo}\"")),
        "hint to pin: {stderr}"
    );
}

#[test]
fn resuming_with_a_changed_bundle_is_refused_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pipeline = two_shard_pipeline(tmp.path(), &out);
    let bundle = copy_demo_bundle(tmp.path());
    let first = shell_bundle_sha256(&bundle);

    // Worker 0 commits shard 0 with the bundle as it was.
    let o = run_on(&pipeline, &bundle, 0, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(marker(&out, "shard-000000")["bundle_sha256"], first.as_str());

    // The bundle changes (bundle.toml still valid); worker 1 would add shard 1.
    let mut spec = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    spec.push_str("# retrained\n");
    std::fs::write(bundle.join("bundle.toml"), spec).unwrap();
    let second = shell_bundle_sha256(&bundle);
    assert_ne!(first, second);
    let before = files_below(&out);
    let o = run_on(&pipeline, &bundle, 1, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&first) && stderr.contains(&second) && stderr.contains("--allow-mixed-bundles"),
        "{stderr}"
    );
    assert_eq!(files_below(&out), before, "a refused run writes nothing");

    // Allowed, it commits shard 1, and each row says which bundle made it.
    let o = run_on(&pipeline, &bundle, 1, &["--allow-mixed-bundles"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(marker(&out, "shard-000001")["bundle_sha256"], second.as_str());
    let dictionary = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    for (shard, digest) in [("shard-000000", &first), ("shard-000001", &second)] {
        let (data_type, values) = lineage_column(&committed_files(&out)[shard]);
        assert_eq!(data_type, dictionary);
        assert_eq!(values.len(), 100);
        assert!(values.iter().all(|v| v == digest), "{shard}: {values:?}");
        let (data_type, _) = lineage_column(&committed_table_files(&out, "steps")[shard]);
        assert_eq!(data_type, dictionary, "steps table of {shard}");
    }
    let runs = run_summaries(&out);
    let digests: Vec<&str> = runs.iter().map(|r| r["bundle_sha256"].as_str().unwrap()).collect();
    assert_eq!(digests, [first.as_str(), second.as_str()]);
    assert!(runs
        .iter()
        .all(|r| r["dtta_version"].is_string() && r["config"].is_object()));

    // `summarize` shows each run's bundle and the committed shards per bundle.
    let o = run_dtta(&["summarize", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    for r in &runs {
        let line = format!(
            "run {} (worker {}, source): 1 shard(s) committed, bundle sha256 {}",
            r["run_id"].as_str().unwrap(),
            r["worker"]["index"],
            r["bundle_sha256"].as_str().unwrap()
        );
        assert!(s.contains(&line), "{line}\n{s}");
    }
    for digest in [&first, &second] {
        assert!(
            s.contains(&format!("bundle sha256 {digest}: 1 committed shard(s)")),
            "{s}"
        );
    }
}

#[test]
fn every_commit_carries_the_run_facts_and_an_older_dtta_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pipeline = two_shard_pipeline(tmp.path(), &out);
    let o = run_on(&pipeline, &demo_bundle(), 0, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let run = &run_summaries(&out)[0];
    let config_sha256 = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(serde_json::to_vec(&run["config"]).unwrap());
        digest.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    for table in ["predictions", "steps"] {
        let facts = commit_facts(&out, table);
        assert_eq!(facts.len(), 1, "one commit per shard in {table}");
        let f = &facts[0];
        assert_eq!(f["run_id"], run["run_id"], "{f}");
        assert_eq!(f["bundle_sha256"], run["bundle_sha256"], "{f}");
        assert_eq!(f["config_sha256"], config_sha256.as_str(), "{f}");
        assert_eq!(
            (f["worker_index"].as_u64(), f["worker_count"].as_u64()),
            (Some(0), Some(2)),
            "{f}"
        );
        assert_eq!(f["version"], env!("CARGO_PKG_VERSION"), "{f}");
        assert_eq!(f["shards"], serde_json::json!(["shard-000000"]), "{f}");
    }
    let o = run_dtta(&["history", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let history = String::from_utf8_lossy(&o.stdout);
    assert!(
        history.contains(run["run_id"].as_str().unwrap()) && history.contains("shard-000000"),
        "{history}"
    );

    // What an older dtta left: commit markers, no Delta log.
    let old = tmp.path().join("old");
    std::fs::create_dir_all(old.join("_commits")).unwrap();
    std::fs::write(old.join("_commits/shard-000000.json"), b"{}").unwrap();
    let old_pipeline = two_shard_pipeline(tmp.path(), &old);
    let o = run_on(&old_pipeline, &demo_bundle(), 0, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    for o in [o, run_dtta(&["summarize", old.to_str().unwrap()])] {
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("written by an older dtta")
                && stderr.contains("new output URL")
                && stderr.lines().count() == 1,
            "{stderr}"
        );
    }
}
