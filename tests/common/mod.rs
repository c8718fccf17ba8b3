//! Helpers shared by the integration tests: real shards, real bundle, real binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use arrow_array::{Array, Int64Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn dtta() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dtta"));
    cmd.env("DTTA_LOG", "info");
    cmd
}

/// Runs `dtta` with args; returns the output (never panics on a non-zero exit).
pub fn run_dtta(args: &[&str]) -> Output {
    dtta().args(args).output().expect("dtta runs")
}

pub fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Fails, printing the whole output, unless the process's stdout contains `needle`.
#[track_caller]
pub fn assert_stdout_has(output: &Output, needle: impl AsRef<str>) {
    assert_stream_has(output, "stdout", &output.stdout, needle.as_ref());
}

/// Fails, printing the whole output, unless the process's stderr contains `needle`.
#[track_caller]
pub fn assert_stderr_has(output: &Output, needle: impl AsRef<str>) {
    assert_stream_has(output, "stderr", &output.stderr, needle.as_ref());
}

#[track_caller]
fn assert_stream_has(output: &Output, stream: &str, bytes: &[u8], needle: &str) {
    assert!(
        String::from_utf8_lossy(bytes).contains(needle),
        "{stream} lacks {needle:?}\n{}",
        text(output)
    );
}

pub fn demo_bundle() -> PathBuf {
    repo().join("configs/bundles/demo-mnist")
}

/// One demo sample: key, PNG bytes, label.
#[derive(Clone)]
pub struct DemoSample {
    pub key: String,
    pub png: Vec<u8>,
    pub label: i64,
}

/// Every sample of the committed demo shards, in shard order.
pub fn demo_samples() -> Vec<DemoSample> {
    let mut out = Vec::new();
    for i in 0..10 {
        let path = repo().join(format!("data/demo-mnist/shard-{i:06}.tar"));
        let mut archive = tar::Archive::new(File::open(path).unwrap());
        let mut pending: BTreeMap<String, (Option<Vec<u8>>, Option<i64>)> = BTreeMap::new();
        let mut order = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            let (key, ext) = name.split_once('.').unwrap();
            let slot = pending.entry(key.to_string()).or_insert_with(|| {
                order.push(key.to_string());
                (None, None)
            });
            match ext {
                "png" => slot.0 = Some(data),
                "cls" => slot.1 = Some(String::from_utf8(data).unwrap().trim().parse().unwrap()),
                _ => {}
            }
        }
        for key in order {
            let (png, label) = pending.remove(&key).unwrap();
            out.push(DemoSample {
                key,
                png: png.unwrap(),
                label: label.unwrap(),
            });
        }
    }
    out
}

/// Writes a tar shard of (member name, bytes).
pub fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut builder = tar::Builder::new(File::create(path).unwrap());
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    builder.finish().unwrap();
}

/// A shard of demo samples as `<key>.png` + `<key>.cls`.
pub fn write_demo_shard(path: &Path, samples: &[DemoSample]) {
    let members: Vec<(String, Vec<u8>)> = samples
        .iter()
        .flat_map(|s| {
            [
                (format!("{}.png", s.key), s.png.clone()),
                (format!("{}.cls", s.key), s.label.to_string().into_bytes()),
            ]
        })
        .collect();
    write_tar(path, &members);
}

/// A pipeline file with the demo bundle; `extra` is appended verbatim.
pub fn write_pipeline(dir: &Path, input_url: &str, output_url: &str, extra: &str) -> PathBuf {
    let path = dir.join("pipeline.toml");
    let text = format!(
        "[input]\nurl = \"{input_url}\"\n[output]\nurl = \"{output_url}\"\n[model]\nbundle = \"{}\"\n[runtime]\ndevice = \"cpu\"\n{extra}",
        demo_bundle().display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes a pipeline over `input` with `bundle` into `DIR/NAME.toml` (output `DIR/NAME`,
/// on the CPU) and runs it with `--set` for each of `sets`.
pub fn run_bundle(dir: &Path, name: &str, input: &str, bundle: &Path, sets: &[&str]) -> Output {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "[input]\nurl = \"{input}\"\n[output]\nurl = \"{}\"\n[model]\nbundle = \"{}\"\n[runtime]\ndevice = \"cpu\"\n",
        dir.join(name).display(),
        bundle.display()
    );
    std::fs::write(&path, text).unwrap();
    let mut args = vec!["run", path.to_str().unwrap(), "--no-progress"];
    for s in sets {
        args.extend(["--set", s]);
    }
    run_dtta(&args)
}

/// A bundle folder's digest as the README defines it, computed by the shell pipeline
/// (coreutils), not by dtta.
pub fn shell_bundle_sha256(dir: &Path) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg("find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum")
        .current_dir(dir)
        .output()
        .expect("sh runs");
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let digest = out.split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(digest.len(), 64, "sha256sum printed {out:?}");
    digest
}

/// One predictions row, the columns tests look at.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub run_id: String,
    pub shard: String,
    pub key: String,
    pub label: Option<i64>,
    pub status: String,
    pub error: Option<String>,
    pub pred_after: Option<i64>,
}

/// The column `name` of `batch` as a concrete arrow array type.
pub fn column<T: Array + Clone + 'static>(batch: &arrow_array::RecordBatch, name: &str) -> T {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap_or_else(|| panic!("column {name} has another type"))
        .clone()
}

pub fn read_parquet(path: &Path) -> Vec<Row> {
    read_parquet_bytes(bytes::Bytes::from(std::fs::read(path).unwrap()))
}

/// The rows of one predictions file's bytes.
pub fn read_parquet_bytes(data: bytes::Bytes) -> Vec<Row> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(data).unwrap().build().unwrap();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let s = |name: &str| column::<StringArray>(&batch, name);
        let i = |name: &str| column::<Int64Array>(&batch, name);
        let (run, shard, key, status, error) = (s("run_id"), s("shard"), s("key"), s("status"), s("error"));
        let (label, pred) = (i("label"), i("pred_after"));
        for r in 0..batch.num_rows() {
            rows.push(Row {
                run_id: run.value(r).to_string(),
                shard: shard.value(r).to_string(),
                key: key.value(r).to_string(),
                label: label.is_valid(r).then(|| label.value(r)),
                status: status.value(r).to_string(),
                error: error.is_valid(r).then(|| error.value(r).to_string()),
                pred_after: pred.is_valid(r).then(|| pred.value(r)),
            });
        }
    }
    rows
}

/// Record batches of `table` (`predictions` or `steps`) of every committed shard.
pub fn committed_batches(out: &Path, table: &str) -> Vec<arrow_array::RecordBatch> {
    committed_table_files(out, table)
        .values()
        .flat_map(|path| {
            ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap())
        })
        .collect()
}

/// Shard id -> predictions file named by its commit marker.
pub fn committed_files(out: &Path) -> BTreeMap<String, PathBuf> {
    committed_table_files(out, "predictions")
}

/// Shard id -> the file of `table` that the latest snapshot of that Delta table holds
/// (read with dtta's own log reader; tests/delta_readers.rs checks it against others).
pub fn committed_table_files(out: &Path, table: &str) -> BTreeMap<String, PathBuf> {
    committed_markers_of(out, table)
        .into_iter()
        .map(|(shard, m)| {
            let rel = if table == "steps" { m.steps } else { m.predictions };
            (shard, out.join(rel))
        })
        .collect()
}

/// Shard id -> its commit record in the latest snapshot of `table` below `out` (a local
/// folder); empty when the table does not exist yet.
pub fn committed_markers_of(out: &Path, table: &str) -> BTreeMap<String, dtta::sink::commit::CommitMarker> {
    let out = dtta::storage::open(out.to_str().unwrap(), &Default::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(dtta::sink::commit::table_markers(&out, table, Default::default()))
        .unwrap()
}

/// Shard id -> its commit record in the latest snapshot of `table` below `prefix` of
/// `store` (an object store, such as a loopback S3 server's bucket).
pub fn committed_markers_in(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    prefix: &str,
    table: &str,
) -> BTreeMap<String, dtta::sink::commit::CommitMarker> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(dtta::sink::commit::table_markers(
        &store_location(store, prefix),
        table,
        Default::default(),
    ))
    .unwrap()
}

/// Rows of every committed shard below `prefix` of `store`.
pub fn committed_rows_in(store: &std::sync::Arc<dyn object_store::ObjectStore>, prefix: &str) -> Vec<Row> {
    let out = store_location(store, prefix);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    committed_markers_in(store, prefix, "predictions")
        .values()
        .flat_map(|m| {
            let bytes = rt.block_on(async {
                let got = object_store::ObjectStoreExt::get(store.as_ref(), &out.child(&m.predictions)).await;
                got.unwrap().bytes().await.unwrap()
            });
            read_parquet_bytes(bytes)
        })
        .collect()
}

fn store_location(store: &std::sync::Arc<dyn object_store::ObjectStore>, prefix: &str) -> dtta::storage::Location {
    dtta::storage::Location {
        store: store.clone(),
        prefix: object_store::path::Path::from(prefix),
        display: prefix.to_string(),
    }
}

/// Shard id -> its commit record in the predictions table.
pub fn committed_markers(out: &Path) -> BTreeMap<String, dtta::sink::commit::CommitMarker> {
    committed_markers_of(out, "predictions")
}

/// Rows of every committed shard.
pub fn committed_rows(out: &Path) -> Vec<Row> {
    committed_files(out).values().flat_map(|p| read_parquet(p)).collect()
}

/// Every `.parquet` file under `out/predictions`, committed or not.
pub fn all_prediction_files(out: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![out.join("predictions")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                // The Delta log's checkpoints are Parquet too, but not data.
                if p.file_name().is_some_and(|n| n != "_delta_log") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "parquet") {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}
pub mod fault_proxy;
pub mod records;
pub mod reference;
pub mod servers;

/// The seed of one test's random choices: `DTTA_TEST_SEED` when set (decimal, or hex
/// with `0x`), else random. Printed first, so a failure can be replayed; put it in
/// assertion messages too.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("DTTA_TEST_SEED") {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("DTTA_TEST_SEED={v:?} is not a u64: {e}"))
        }
        Err(_) => rand::random(),
    };
    eprintln!("{test}: seed {seed} (DTTA_TEST_SEED={seed} replays this test's random choices)");
    seed
}

/// Polls until `done()` holds, for a process that must still be running then. Panics if
/// it exits first or if nothing happens for 10 minutes (a hang guard, not a timing
/// condition), with `context()` (the seed, a log).
pub fn wait_while_running(child: &mut Child, context: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the process exited ({status}) before the awaited point; {}", context());
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the awaited point was not reached in 10 minutes; {}",
            context()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGKILLs `child` and returns how it ended: killed, unless it had exited already.
pub fn kill(child: &mut Child) -> ExitStatus {
    child.kill().unwrap();
    child.wait().unwrap()
}

/// Whether `status` is the end of a SIGKILL.
pub fn was_killed(status: ExitStatus) -> bool {
    std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL)
}
