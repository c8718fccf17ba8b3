//! In-process tests of the stages: real WebDataset shards in the `memory://` store, the
//! real fetch, decode and write stages, and a fake method (no model), so that ordering,
//! end-of-shard counts, broken streams, wrong outcomes, failing or panicking methods and
//! panicking decoders are each checked where they happen.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::*;
use crate::image::{Channels, ClassifierView};
use crate::sample::Sample;
use crate::tta::Prediction;

/// What the fake method does on a batch that holds `key`.
#[derive(Clone, Copy)]
enum Fault {
    /// Returns one outcome fewer than samples.
    DropOne,
    /// Fails with a libtorch-style error on its first `n` tries, then works.
    FailTimes(u32),
    /// Panics every time.
    Panic,
}

/// Predicts the class `(sum of pixels) mod 10` for every sample with pixels, and records
/// the keys it saw in order; misbehaves per `fault` on batches holding `fault_key`.
struct FakeMethod {
    seen: Arc<Mutex<Vec<String>>>,
    fault: Option<(&'static str, Fault)>,
    failures: u32,
    recovered: Arc<Mutex<u32>>,
}

impl Method for FakeMethod {
    fn batch_size(&self) -> usize {
        4
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        let mut outcomes: Vec<Outcome> = batch
            .iter()
            .map(|p| {
                let Some(pixels) = &p.pixels else {
                    return Outcome::unpredicted(p);
                };
                let class = (pixels.iter().sum::<f32>() as i64).rem_euclid(10);
                let mut o = Outcome::blank(p.key.clone(), p.label, p.defect.clone());
                let prediction = Prediction {
                    class,
                    conf: 1.0,
                    topk: vec![class],
                    topk_probs: vec![1.0],
                };
                o.set_before(&prediction);
                o.set_after(prediction);
                o
            })
            .collect();
        if let Some((key, fault)) = self.fault {
            if batch.iter().any(|p| p.key == key) {
                match fault {
                    Fault::DropOne => {
                        outcomes.pop();
                    }
                    Fault::FailTimes(n) if self.failures < n => {
                        self.failures += 1;
                        return Err(tch::TchError::Torch("CUDA out of memory (injected)".into()));
                    }
                    Fault::FailTimes(_) => {}
                    Fault::Panic => panic!("injected method panic on {key}"),
                }
            }
        }
        self.seen.lock().unwrap().extend(batch.iter().map(|p| p.key.clone()));
        Ok(outcomes)
    }

    fn recover(&mut self) {
        *self.recovered.lock().unwrap() += 1;
    }
}

/// A prepare function whose decoder panics on the sample keyed `s1-0003`.
fn panicking_prepare(
    sample: Sample,
    views: &Views,
    limits: DecodeLimits,
    require_label: bool,
    expansion: &Expansion,
) -> Vec<Prepared> {
    if sample.key == "s1-0003" {
        panic!("injected decoder panic");
    }
    crate::image::prepare(sample, views, limits, require_label, expansion)
}

/// A small gray PNG whose pixels depend on `seed`.
fn png(seed: u8) -> Vec<u8> {
    let img = image::GrayImage::from_fn(8, 8, |x, y| {
        image::Luma([seed.wrapping_mul(7).wrapping_add((x * y) as u8)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A WebDataset tar of `n` samples `<prefix>-NNNN` (png + cls).
fn shard(prefix: &str, n: usize) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for i in 0..n {
        for (ext, data) in [("png", png(i as u8)), ("cls", (i % 10).to_string().into_bytes())] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, format!("{prefix}-{i:04}.{ext}"), data.as_slice())
                .unwrap();
        }
    }
    builder.into_inner().unwrap()
}

/// Writes shards `s0..s{sizes.len()}` below a fresh `memory://` prefix; `broken` names a
/// shard to cut in the middle of a member. Returns the config for it.
async fn setup(name: &str, sizes: &[usize], broken: Option<usize>, retries: u32) -> PipelineConfig {
    let input = storage::open(&format!("memory:///{name}/in/"), &StoreOptions::default()).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        let mut bytes = shard(&format!("s{i}"), n);
        if broken == Some(i) {
            bytes.truncate(bytes.len() / 2 + 100);
        }
        input
            .store
            .put(&input.child(&format!("s{i}.tar")), PutPayload::from(bytes))
            .await
            .unwrap();
    }
    let text = format!(
        r#"
[input]
url = "memory:///{name}/in/"
[output]
url = "memory:///{name}/out/"
[model]
bundle = "unused: the tests bring their own method"
[runtime]
shards_in_flight = 1
shard_retries = {retries}
batch_size = 4
decode_threads = 2
"#
    );
    PipelineConfig::from_toml_str(&text, std::path::Path::new("test.toml"), &[]).unwrap()
}

struct Ran {
    report: RunReport,
    seen: Vec<String>,
    recovered: u32,
    /// Committed rows per shard: (key, status, error), in file order.
    rows: BTreeMap<String, Vec<(String, String, Option<String>)>>,
}

async fn run_with(config: PipelineConfig, fault: Option<(&'static str, Fault)>, prepare: PrepareFn) -> Ran {
    let worker = Worker { index: 0, count: 1 };
    let plan = plan(&config, worker).await.unwrap();
    let output = plan.output.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recovered = Arc::new(Mutex::new(0));
    let method = FakeMethod {
        seen: seen.clone(),
        fault,
        failures: 0,
        recovered: recovered.clone(),
    };
    let stages = Stages {
        bundle: "fake".into(),
        bundle_sha256: "0".repeat(64),
        device: "cpu".into(),
        layout: crate::sink::predictions::Layout::CLASSIFICATION,
        tables: Arc::new(commit::Tables::new(&output, 100)),
        views: Views {
            classifier: ClassifierView {
                channels: Channels::Gray,
                resize: 8,
                crop: 8,
                mean: vec![0.0],
                std: vec![1.0],
            },
            diffusion: None,
            task: crate::sample::Task::Classification,
            labels: Default::default(),
        },
        prepare,
        method: Box::new(move || Ok(Box::new(method) as Box<dyn Method>)),
    };
    let report = execute(config, worker, plan, stages, ProgressMode::Log, Instant::now())
        .await
        .unwrap();
    let mut rows = BTreeMap::new();
    for (shard, marker) in commit::read_markers(&output).await.unwrap() {
        let bytes = output.store.get(&output.child(&marker.predictions)).await.unwrap();
        let batches = ParquetRecordBatchReaderBuilder::try_new(bytes.bytes().await.unwrap())
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap);
        let mut shard_rows = Vec::new();
        for b in batches {
            let col = |name: &str| {
                arrow_cast::display::ArrayFormatter::try_new(b.column_by_name(name).unwrap(), &Default::default())
                    .unwrap()
            };
            let (keys, statuses) = (col("key"), col("status"));
            let errors = b.column_by_name("error").unwrap();
            for i in 0..b.num_rows() {
                let error = errors.is_valid(i).then(|| col("error").value(i).to_string());
                shard_rows.push((keys.value(i).to_string(), statuses.value(i).to_string(), error));
            }
        }
        rows.insert(shard, shard_rows);
    }
    let seen = seen.lock().unwrap().clone();
    let recovered = *recovered.lock().unwrap();
    Ran {
        report,
        seen,
        recovered,
        rows,
    }
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_keep_shard_order_and_every_shard_commits_its_count() {
    let config = setup("order", &[9, 4, 6], None, 0).await;
    let ran = run_with(config, None, crate::image::prepare).await;
    assert_eq!(ran.report.shards_committed.len(), 3, "{:?}", ran.report.shards_failed);
    assert_eq!(ran.report.tally.rows, 19);
    for (i, n) in [9, 4, 6].into_iter().enumerate() {
        let shard = format!("s{i}");
        let got: Vec<String> = ran.rows[&shard].iter().map(|r| r.0.clone()).collect();
        assert_eq!(got, keys(&shard, n), "rows of {shard} in shard order");
        assert!(ran.rows[&shard].iter().all(|r| r.1 == "ok"));
    }
    // One shard in flight: the method saw every sample once, in input order.
    let expected: Vec<String> = [("s0", 9), ("s1", 4), ("s2", 6)]
        .iter()
        .flat_map(|(s, n)| keys(s, *n))
        .collect();
    assert_eq!(ran.seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_mid_shard_fails_that_shard_only() {
    let config = setup("broken", &[5, 40, 5], Some(1), 1).await;
    let ran = run_with(config, None, crate::image::prepare).await;
    assert_eq!(ran.report.shards_committed, ["s0", "s2"]);
    assert_eq!(ran.report.shards_failed.len(), 1);
    let failed = &ran.report.shards_failed[0];
    assert_eq!(failed.shard, "s1");
    assert!(failed.error.contains("after 2 attempt(s)"), "{}", failed.error);
    assert!(!ran.rows.contains_key("s1"), "nothing of a failed shard is committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_returning_too_few_outcomes_fails_the_shard_by_name() {
    let config = setup("count", &[4, 4, 4], None, 2).await;
    let ran = run_with(config, Some(("s1-0002", Fault::DropOne)), crate::image::prepare).await;
    assert_eq!(ran.report.shards_committed, ["s0", "s2"]);
    let failed = &ran.report.shards_failed;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].shard, "s1");
    assert!(
        failed[0].error.contains("returned 3 outcome(s) for 4 sample(s)")
            && failed[0].error.contains("after 1 attempt"),
        "a wrong count is a bug, not retried: {}",
        failed[0].error
    );
    assert_eq!(ran.rows["s0"].len() + ran.rows["s2"].len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_that_fails_is_retried_and_every_row_arrives() {
    let config = setup("retry", &[6, 6], None, 2).await;
    let ran = run_with(config, Some(("s0-0005", Fault::FailTimes(2))), crate::image::prepare).await;
    assert!(ran.report.shards_failed.is_empty(), "{:?}", ran.report.shards_failed);
    assert_eq!(ran.report.tally.rows, 12);
    assert_eq!(ran.recovered, 2, "recover() after each failed try");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_that_keeps_failing_or_panics_fails_its_shard_and_the_run_goes_on() {
    for (name, fault, reason) in [
        ("oom", Fault::FailTimes(u32::MAX), "CUDA out of memory (injected)"),
        (
            "panic",
            Fault::Panic,
            "the method panicked: injected method panic on s1-0001",
        ),
    ] {
        let config = setup(name, &[5, 5, 5], None, 1).await;
        let ran = run_with(config, Some(("s1-0001", fault)), crate::image::prepare).await;
        assert_eq!(ran.report.shards_committed, ["s0", "s2"], "{name}");
        let failed = &ran.report.shards_failed;
        assert_eq!(failed.len(), 1, "{name}");
        assert_eq!(failed[0].shard, "s1");
        assert!(
            failed[0].error.contains(reason) && failed[0].error.contains("after 2 attempt(s)"),
            "{name}: {}",
            failed[0].error
        );
        assert_eq!(ran.recovered, 2, "{name}");
        // The rest of s1 (after the failed batch) was dropped, not adapted.
        assert!(!ran.seen.iter().any(|k| k == "s1-0004"), "{name}: {:?}", ran.seen);
        assert!(ran.seen.iter().any(|k| k == "s2-0004"), "{name}: the run went on");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_decoder_costs_one_row_its_pixels() {
    let config = setup("decoder", &[5, 5], None, 0).await;
    let ran = run_with(config, None, panicking_prepare).await;
    assert!(ran.report.shards_failed.is_empty());
    assert_eq!(ran.report.tally.rows, 10, "every row present");
    let row = ran.rows["s1"].iter().find(|r| r.0 == "s1-0003").unwrap();
    assert_eq!(row.1, "decode_error");
    let error = row.2.as_deref().unwrap_or_default();
    assert!(
        error.contains("panicked") && error.contains("injected decoder panic"),
        "{error}"
    );
    let ok = ran.rows.values().flatten().filter(|r| r.1 == "ok").count();
    assert_eq!(ok, 9);
}
