//! Adaptive compute (`[tta.budget]`) end to end through the real binary, on the demo
//! bundle and real demo digits: the default path is unchanged, each gate stops where it
//! says, denoiser evaluations are counted exactly, and the two columns are on every row.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use arrow_array::{Array, Float32Array, Int32Array, Int64Array, StringArray};
use common::*;

/// Diffusion-TTA at a small budget: 4 steps x 2 x 4 pairs = 8 evaluations per step.
const DTTA: &str = "[tta]\nmethod = \"diffusion-tta\"\nsteps = 4\naccum = 2\nsamples_per_step = 4\n";
const STEP_EVALS: i64 = 8;

/// One predictions row.
#[derive(Debug, Clone, PartialEq)]
struct Budgeted {
    status: String,
    pred_before: Option<i64>,
    pred_after: Option<i64>,
    conf_after: Option<f32>,
    loss_last: Option<f32>,
    steps: i32,
    denoiser_evals: i64,
    stop_reason: String,
}

/// 12 demo test digits spread over the split, in one shard.
fn input(dir: &Path) -> String {
    let samples: Vec<DemoSample> = demo_samples().into_iter().step_by(83).take(12).collect();
    let path = dir.join("in.tar");
    write_demo_shard(&path, &samples);
    path.display().to_string()
}

/// Runs the demo pipeline with `tta` (and `sets`) into `dir/<name>`; returns rows by key.
fn run(dir: &Path, input: &str, name: &str, tta: &str, sets: &[&str]) -> BTreeMap<String, Budgeted> {
    let out = dir.join(name);
    let sub = dir.join(format!("p-{name}"));
    std::fs::create_dir_all(&sub).unwrap();
    let p = write_pipeline(&sub, input, &out.display().to_string(), &format!("seed = 5\n{tta}"));
    let mut args = vec!["run", p.to_str().unwrap(), "--no-progress"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = run_dtta(&args);
    assert!(o.status.success(), "{name}: {}", text(&o));
    rows(&out)
}

fn rows(out: &Path) -> BTreeMap<String, Budgeted> {
    let mut map = BTreeMap::new();
    for b in committed_batches(out, "predictions") {
        // `column` panics unless the column exists with this arrow type.
        let evals = column::<Int64Array>(&b, "denoiser_evals");
        let reason = column::<StringArray>(&b, "stop_reason");
        assert_eq!(evals.null_count() + reason.null_count(), 0, "on every row");
        let (key, status) = (column::<StringArray>(&b, "key"), column::<StringArray>(&b, "status"));
        let (before, after) = (
            column::<Int64Array>(&b, "pred_before"),
            column::<Int64Array>(&b, "pred_after"),
        );
        let conf = column::<Float32Array>(&b, "conf_after");
        let loss = column::<Float32Array>(&b, "loss_last");
        let steps = column::<Int32Array>(&b, "steps");
        for r in 0..b.num_rows() {
            let i = |a: &Int64Array| a.is_valid(r).then(|| a.value(r));
            let f = |a: &Float32Array| a.is_valid(r).then(|| a.value(r));
            map.insert(
                key.value(r).to_string(),
                Budgeted {
                    status: status.value(r).to_string(),
                    pred_before: i(&before),
                    pred_after: i(&after),
                    conf_after: f(&conf),
                    loss_last: f(&loss),
                    steps: steps.value(r),
                    denoiser_evals: evals.value(r),
                    stop_reason: reason.value(r).to_string(),
                },
            );
        }
    }
    map
}

/// Steps rows per key.
fn steps_per_key(out: &Path) -> BTreeMap<String, usize> {
    let mut map = BTreeMap::new();
    for b in committed_batches(out, "steps") {
        let key = column::<StringArray>(&b, "key");
        for r in 0..b.num_rows() {
            *map.entry(key.value(r).to_string()).or_default() += 1;
        }
    }
    map
}

#[test]
fn with_the_budget_off_or_never_firing_results_are_unchanged_and_evals_counted_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let input = input(tmp.path());
    let plain = run(tmp.path(), &input, "plain", DTTA, &[]);
    assert_eq!(plain.len(), 12);
    for (key, r) in &plain {
        assert_eq!(r.status, "ok", "{key}");
        assert_eq!((r.steps, r.stop_reason.as_str()), (4, "none"), "{key}");
        assert_eq!(r.denoiser_evals, 4 * STEP_EVALS, "{key}: steps x accum x samples");
    }
    // A cap that allows every step, and an empty section: the same rows, bit for bit.
    let capped = run(tmp.path(), &input, "capped", DTTA, &["tta.budget.max_evals=32"]);
    assert_eq!(capped, plain);
    let empty = run(tmp.path(), &input, "empty", &format!("{DTTA}[tta.budget]\n"), &[]);
    assert_eq!(empty, plain);
    // The count is per image and pair, however the pairs are batched.
    let unfused = run(tmp.path(), &input, "unfused", DTTA, &["tta.fuse_accum=false"]);
    assert!(unfused
        .values()
        .all(|r| r.denoiser_evals == 4 * STEP_EVALS && r.steps == 4));
    let chunked = run(tmp.path(), &input, "chunked", DTTA, &["tta.max_batch=3"]);
    assert!(chunked.values().all(|r| r.denoiser_evals == 4 * STEP_EVALS));

    // Methods without a denoiser spend none; the Diffusion Classifier counts its passes.
    let source = run(tmp.path(), &input, "source", "[tta]\nmethod = \"source\"\n", &[]);
    assert!(source
        .values()
        .all(|r| r.denoiser_evals == 0 && r.stop_reason == "none"));
    let dc = "[tta]\nmethod = \"diffusion-classifier\"\n[tta.diffusion_classifier]\nsamples = 6\n";
    let full = run(tmp.path(), &input, "dc", dc, &[]);
    assert!(
        full.values().all(|r| r.denoiser_evals == 6 * 10),
        "6 pairs x 10 classes"
    );
    let pruned = run(
        tmp.path(),
        &input,
        "dc-pruned",
        dc,
        &[
            "tta.diffusion_classifier.prune_to=3",
            "tta.diffusion_classifier.first_samples=2",
        ],
    );
    assert!(
        pruned.values().all(|r| r.denoiser_evals == 2 * 10 + 4 * 3),
        "2 pairs x 10 classes, then 4 x 3: {pruned:?}"
    );

    // `dtta summarize` and the robustness-free summary report the mean.
    let o = run_dtta(&["summarize", tmp.path().join("plain").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("evals/image"), "{stdout}");
    assert!(stdout.contains(" 32.0 "), "{stdout}");
}

#[test]
fn skip_conf_zero_adapts_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = input(tmp.path());
    let rows = run(tmp.path(), &input, "skip", DTTA, &["tta.budget.skip_conf=0.0"]);
    assert_eq!(rows.len(), 12);
    for (key, r) in &rows {
        assert_eq!(r.status, "ok", "{key}");
        assert_eq!(
            (r.steps, r.denoiser_evals, r.stop_reason.as_str()),
            (0, 0, "confident"),
            "{key}"
        );
        assert_eq!(r.pred_after, r.pred_before, "{key}: the source's answer");
        assert!(r.pred_after.is_some() && r.loss_last.is_none(), "{key}");
    }
    assert!(steps_per_key(&tmp.path().join("skip")).is_empty(), "no steps rows");

    // A threshold between: confident digits are skipped, the others adapted in full.
    let some = run(tmp.path(), &input, "some", DTTA, &["tta.budget.skip_conf=0.999"]);
    let plain = run(tmp.path(), &input, "plain", DTTA, &[]);
    for (key, r) in &some {
        match r.stop_reason.as_str() {
            "confident" => assert_eq!((r.denoiser_evals, r.pred_after), (0, r.pred_before), "{key}"),
            "none" => assert_eq!(r, &plain[key], "{key}: adapted as without the gate"),
            other => panic!("{key}: {other}"),
        }
    }
}

#[test]
fn max_evals_caps_the_evaluations_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let input = input(tmp.path());
    // 20 allows two steps of 8; the third would reach 24.
    let rows = run(tmp.path(), &input, "cap", DTTA, &["tta.budget.max_evals=20"]);
    let steps = steps_per_key(&tmp.path().join("cap"));
    for (key, r) in &rows {
        assert_eq!(
            (r.steps, r.denoiser_evals, r.stop_reason.as_str()),
            (2, 16, "budget"),
            "{key}"
        );
        assert_eq!(steps[key], 2, "{key}");
    }
    // The same two steps as an uncapped run of two steps.
    let two = run(tmp.path(), &input, "two", DTTA, &["tta.steps=2"]);
    for (key, r) in &rows {
        let t = &two[key];
        assert_eq!(
            (r.pred_after, r.conf_after, r.loss_last),
            (t.pred_after, t.conf_after, t.loss_last),
            "{key}"
        );
    }
}

#[test]
fn stable_steps_stop_once_the_answer_stops_changing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = input(tmp.path());
    let rows = run(tmp.path(), &input, "stable", DTTA, &["tta.budget.stable_steps=1"]);
    let plain = run(tmp.path(), &input, "plain", DTTA, &[]);
    let mut stopped = 0;
    for (key, r) in &rows {
        assert_eq!(r.denoiser_evals, r.steps as i64 * STEP_EVALS, "{key}");
        match r.stop_reason.as_str() {
            "stable" => {
                stopped += 1;
                assert!((1..4).contains(&r.steps), "{key}: {r:?}");
                if r.steps == 1 {
                    // p1 == p0: the first update left the source's answer.
                    assert_eq!(r.pred_after, r.pred_before, "{key}");
                }
            }
            "none" => assert_eq!(r, &plain[key], "{key}: ran in full, as without the gate"),
            other => panic!("{key}: {other}"),
        }
    }
    assert!(stopped > 0, "the demo lr rarely changes an answer: {rows:?}");
    // Stopping early reproduces the first steps of the full run exactly.
    let one = run(tmp.path(), &input, "one", DTTA, &["tta.steps=1"]);
    for (key, r) in rows.iter().filter(|(_, r)| r.steps == 1) {
        assert_eq!(
            (r.pred_after, r.conf_after, r.loss_last),
            (one[key].pred_after, one[key].conf_after, one[key].loss_last)
        );
    }
}

#[test]
fn a_diverging_image_stops_with_its_reason_and_keeps_the_source_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let input = input(tmp.path());
    let rows = run(tmp.path(), &input, "nan", DTTA, &["tta.lr=1e30"]);
    let diverged: Vec<_> = rows.values().filter(|r| r.stop_reason == "diverged").collect();
    assert!(!diverged.is_empty(), "{rows:?}");
    for r in rows.values() {
        assert_eq!(r.status == "diverged", r.stop_reason == "diverged", "{r:?}");
        assert!(r.conf_after.is_some_and(f32::is_finite), "no garbage: {r:?}");
    }
    for r in diverged {
        assert_eq!(r.pred_after, r.pred_before, "{r:?}");
        assert!(r.denoiser_evals > 0 && r.denoiser_evals % STEP_EVALS == 0, "{r:?}");
    }
}

#[test]
fn budget_settings_that_cannot_apply_are_errors_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_pipeline(tmp.path(), "in/*.tar", "out/", DTTA);
    let cases: [(&[&str], &str, &str); 5] = [
        (
            &["tta.budget.skip_conf=0.9", "tta.mode=online"],
            "tta.budget",
            "episodic",
        ),
        (&["tta.budget.max_evals=100", "tta.method=tent"], "tta.budget", "tent"),
        (&["tta.budget.max_evals=7"], "tta.budget.max_evals", "one step's 8"),
        (&["tta.budget.stable_steps=4"], "tta.budget.stable_steps", "never stop"),
        (&["tta.budget.skip_conf=1.5"], "tta.budget.skip_conf", "0..=1"),
    ];
    for (sets, key, words) in cases {
        let mut args = vec!["plan", p.to_str().unwrap()];
        for s in sets {
            args.extend(["--set", *s]);
        }
        let o = run_dtta(&args);
        assert_eq!(o.status.code(), Some(2), "{sets:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(key) && err.contains(words), "{sets:?}: {err}");
    }
}
