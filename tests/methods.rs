//! Every method end to end through the real binary, on a tiny real bundle: rows, the
//! steps table, and reproducibility across shard layouts and worker counts.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::{Array, Float32Array, Int32Array, Int64Array, StringArray};
use common::*;

fn tiny_bundle(dir: &Path) -> PathBuf {
    let out = dir.join("tiny");
    let o = std::process::Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tools/make_tiny_bundle.py"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    out
}

fn pipeline(dir: &Path, input: &str, out: &Path, bundle: &Path, tta: &str) -> PathBuf {
    let path = dir.join(format!("p-{}.toml", rand::random::<u32>()));
    std::fs::write(
        &path,
        format!(
            "[input]\nurl = \"{input}\"\n[output]\nurl = \"{}\"\n[model]\nbundle = \"{}\"\n[runtime]\ndevice = \"cpu\"\nseed = 11\n[tta]\n{tta}\n",
            out.display(),
            bundle.display()
        ),
    )
    .unwrap();
    path
}

/// pred_before, pred_after, loss_last, status of one row.
type RowSummary = (Option<i64>, Option<i64>, Option<f32>, String);

/// key -> summary of every committed predictions row.
fn results(out: &Path) -> BTreeMap<String, RowSummary> {
    let mut map = BTreeMap::new();
    for b in committed_batches(out, "predictions") {
        let key = column::<StringArray>(&b, "key");
        let status = column::<StringArray>(&b, "status");
        let before = column::<Int64Array>(&b, "pred_before");
        let after = column::<Int64Array>(&b, "pred_after");
        let loss = column::<Float32Array>(&b, "loss_last");
        for r in 0..b.num_rows() {
            let opt_i = |a: &Int64Array| a.is_valid(r).then(|| a.value(r));
            let summary = (
                opt_i(&before),
                opt_i(&after),
                loss.is_valid(r).then(|| loss.value(r)),
                status.value(r).to_string(),
            );
            map.insert(key.value(r).to_string(), summary);
        }
    }
    map
}

/// (key, step) of every committed steps row, sorted.
fn steps_rows(out: &Path) -> Vec<(String, i32)> {
    let mut rows = Vec::new();
    for b in committed_batches(out, "steps") {
        let key = column::<StringArray>(&b, "key");
        let step = column::<Int32Array>(&b, "step");
        rows.extend((0..b.num_rows()).map(|r| (key.value(r).to_string(), step.value(r))));
    }
    rows.sort();
    rows
}

fn shards(dir: &Path, per_shard: usize, count: usize) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let demo = demo_samples();
    for i in 0..count {
        write_demo_shard(
            &dir.join(format!("s-{i:02}.tar")),
            &demo[i * per_shard..(i + 1) * per_shard],
        );
    }
    format!("{}/", dir.display())
}

#[test]
fn every_method_writes_its_rows_and_diffusion_tta_its_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tiny_bundle(tmp.path());
    let input = shards(&tmp.path().join("in"), 4, 3);
    let cases = [
        ("source", "method = \"source\""),
        ("tent", "method = \"tent\""),
        ("diffusion-classifier", "method = \"diffusion-classifier\"\n[tta.diffusion_classifier]\nsamples = 8\nprune_to = 2\nfirst_samples = 4"),
        ("diffusion-tta", "method = \"diffusion-tta\"\nsteps = 2\naccum = 2\nsamples_per_step = 3"),
    ];
    for (name, tta) in cases {
        let out = tmp.path().join(format!("out-{name}"));
        let p = pipeline(tmp.path(), &input, &out, &bundle, tta);
        let o = run_dtta(&["run", p.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let r = results(&out);
        assert_eq!(r.len(), 12, "{name}");
        assert!(
            r.values().all(|(b, a, _, s)| b.is_some() && a.is_some() && s == "ok"),
            "{name}: {r:?}"
        );
        let steps = steps_rows(&out);
        if name == "diffusion-tta" {
            assert_eq!(steps.len(), 12 * 2, "two steps per image");
            assert!(r.values().all(|(_, _, loss, _)| loss.is_some()));
        } else {
            assert!(steps.is_empty(), "{name} writes no steps");
        }
        let summary = run_dtta(&["summarize", out.to_str().unwrap()]);
        assert_stdout_has(&summary, name);
    }
}

#[test]
fn diffusion_tta_results_depend_on_seed_and_key_not_on_layout_or_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tiny_bundle(tmp.path());
    let tta = "method = \"diffusion-tta\"\nsteps = 2\naccum = 2\nsamples_per_step = 3\nlr = 0.5";
    // 12 images as 2 shards of 6, run by one worker.
    let a_in = shards(&tmp.path().join("a"), 6, 2);
    let a_out = tmp.path().join("out-a");
    let o = run_dtta(&[
        "run",
        pipeline(tmp.path(), &a_in, &a_out, &bundle, tta).to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // The same images as 4 shards of 3, split across 2 workers.
    let b_in = shards(&tmp.path().join("b"), 3, 4);
    let b_out = tmp.path().join("out-b");
    let p = pipeline(tmp.path(), &b_in, &b_out, &bundle, tta);
    for w in ["0", "1"] {
        let o = run_dtta(&["run", p.to_str().unwrap(), "--worker-index", w, "--worker-count", "2"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let (a, b) = (results(&a_out), results(&b_out));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "same (seed, key), same result");
    assert!(a.values().all(|v| v.2.is_some()), "every image adapted");

    // A different seed draws different noise.
    let c_out = tmp.path().join("out-c");
    let p = pipeline(tmp.path(), &a_in, &c_out, &bundle, tta);
    let o = run_dtta(&["run", p.to_str().unwrap(), "--set", "runtime.seed=12"]);
    assert!(o.status.success(), "{}", text(&o));
    let c = results(&c_out);
    assert!(
        a.iter().zip(&c).any(|((_, x), (_, y))| x.2 != y.2),
        "losses should change with the seed"
    );
}

#[test]
fn unusable_method_settings_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tiny_bundle(tmp.path());
    let input = shards(&tmp.path().join("in"), 2, 1);
    let out = tmp.path().join("out");
    let p = pipeline(
        tmp.path(),
        &input,
        &out,
        &bundle,
        "method = \"diffusion-tta\"\nprecision = \"bf16\"",
    );
    let o = run_dtta(&["run", p.to_str().unwrap()]);
    // A method the bundle, device and config cannot run is a configuration error.
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bf16") && err.contains("CUDA"), "{err}");

    // A bundle without a diffusion model cannot run diffusion methods.
    let p = pipeline(tmp.path(), &input, &out, &bundle, "method = \"diffusion-classifier\"");
    let spec = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    std::fs::write(bundle.join("bundle.toml"), spec.split("\n[diffusion]").next().unwrap()).unwrap();
    let o = run_dtta(&["run", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_stderr_has(&o, "no [diffusion] section");
    assert!(committed_files(&out).is_empty(), "nothing committed");
}

/// (pred_before, pred_after, loss_first, status) of one predictions row.
type DusaRow = (Option<i64>, Option<i64>, Option<f32>, String);

/// key -> the row, for every committed predictions row.
fn dusa_rows(out: &Path) -> BTreeMap<String, DusaRow> {
    let mut map = BTreeMap::new();
    for b in committed_batches(out, "predictions") {
        let key = column::<StringArray>(&b, "key");
        let status = column::<StringArray>(&b, "status");
        let method = column::<StringArray>(&b, "method");
        let before = column::<Int64Array>(&b, "pred_before");
        let after = column::<Int64Array>(&b, "pred_after");
        let loss = column::<Float32Array>(&b, "loss_first");
        for r in 0..b.num_rows() {
            assert!(method.value(r).starts_with("dusa"), "{}", method.value(r));
            let opt_i = |a: &Int64Array| a.is_valid(r).then(|| a.value(r));
            map.insert(
                key.value(r).to_string(),
                (
                    opt_i(&before),
                    opt_i(&after),
                    loss.is_valid(r).then(|| loss.value(r)),
                    status.value(r).to_string(),
                ),
            );
        }
    }
    map
}

/// DUSA on the demo bundle (10 classes: the default 4 + 2 candidates): episodic and
/// online rows and steps, the `-online` label, and online adaptation carrying over.
#[test]
fn dusa_episodic_and_online_write_their_rows_and_steps_on_the_demo_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = demo_bundle();
    let input = shards(&tmp.path().join("in"), 4, 3);
    let run = |name: &str, tta: &str| {
        let out = tmp.path().join(format!("out-{name}"));
        let p = pipeline(tmp.path(), &input, &out, &bundle, tta);
        let o = run_dtta(&["run", p.to_str().unwrap(), "--set", "runtime.batch_size=4"]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let summary = run_dtta(&["summarize", out.to_str().unwrap()]);
        assert_stdout_has(&summary, name);
        (dusa_rows(&out), steps_rows(&out))
    };
    let (episodic, e_steps) = run(
        "dusa",
        "method = \"dusa\"\nmode = \"episodic\"\n[tta.dusa]\nsteps = 2\nlr = 1e-3",
    );
    let (online, o_steps) = run(
        "dusa-online",
        "method = \"dusa\"\nmode = \"online\"\n[tta.dusa]\nlr = 1e-3",
    );
    for rows in [&episodic, &online] {
        assert_eq!(rows.len(), 12);
        assert!(
            rows.values()
                .all(|(b, a, l, s)| b.is_some() && a.is_some() && l.is_some() && s == "ok"),
            "{rows:?}"
        );
    }
    assert_eq!(e_steps.len(), 12 * 2, "two steps per image");
    assert_eq!(o_steps.len(), 12, "one pass per image online");
    // Episodic: every image starts from the source weights; online: the first batch sees
    // the source weights (same draws, same first loss), later batches the adapted ones.
    let firsts: Vec<(f32, f32)> = episodic
        .values()
        .zip(online.values())
        .map(|(e, o)| (e.2.unwrap(), o.2.unwrap()))
        .collect();
    assert!(
        firsts.iter().any(|(e, o)| (e - o).abs() > 1e-6 * e.abs().max(1e-6)),
        "online never differs from episodic: {firsts:?}"
    );
}

/// Episodic DUSA resets bit for bit: results depend on (seed, key) only, not on the
/// shard layout, the images before, or the worker count; another seed changes them.
#[test]
fn dusa_episodic_results_depend_on_seed_and_key_not_on_layout_or_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = demo_bundle();
    let tta = "method = \"dusa\"\n[tta.dusa]\nsteps = 2\nlr = 1e-3";
    let a_in = shards(&tmp.path().join("a"), 6, 2);
    let a_out = tmp.path().join("out-a");
    let o = run_dtta(&[
        "run",
        pipeline(tmp.path(), &a_in, &a_out, &bundle, tta).to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let b_in = shards(&tmp.path().join("b"), 3, 4);
    let b_out = tmp.path().join("out-b");
    let p = pipeline(tmp.path(), &b_in, &b_out, &bundle, tta);
    for w in ["1", "0"] {
        let o = run_dtta(&["run", p.to_str().unwrap(), "--worker-index", w, "--worker-count", "2"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let (a, b) = (dusa_rows(&a_out), dusa_rows(&b_out));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "same (seed, key), same result");
    let c_out = tmp.path().join("out-c");
    let p = pipeline(tmp.path(), &a_in, &c_out, &bundle, tta);
    let o = run_dtta(&["run", p.to_str().unwrap(), "--set", "runtime.seed=12"]);
    assert!(o.status.success(), "{}", text(&o));
    let c = dusa_rows(&c_out);
    assert!(
        a.iter().zip(&c).any(|((_, x), (_, y))| x.2 != y.2),
        "losses should change with the seed"
    );
}

#[test]
fn dusa_candidate_counts_beyond_the_classes_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let input = shards(&tmp.path().join("in"), 2, 1);
    let out = tmp.path().join("out");
    let p = pipeline(
        tmp.path(),
        &input,
        &out,
        &demo_bundle(),
        "method = \"dusa\"\n[tta.dusa]\ntopk = 8\nrandom = 3",
    );
    let o = run_dtta(&["run", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tta.dusa.topk") && err.contains("10 classes"), "{err}");
    // A bad value in the config itself: exit 2, naming the key.
    let o = run_dtta(&["run", p.to_str().unwrap(), "--set", "tta.dusa.topk=0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_stderr_has(&o, "tta.dusa.topk");
    assert!(committed_files(&out).is_empty(), "nothing committed");
}

/// Every column a user reads from a predictions row (not timings), as text, by key.
fn full_rows(out: &Path) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for b in committed_batches(out, "predictions") {
        let key = column::<StringArray>(&b, "key");
        let names = [
            "status",
            "pred_before",
            "conf_before",
            "pred_after",
            "conf_after",
            "topk_after",
            "loss_first",
            "loss_last",
            "denoiser_evals",
        ];
        for r in 0..b.num_rows() {
            let row: Vec<String> = names
                .iter()
                .map(|n| {
                    let col = b.column_by_name(n).unwrap_or_else(|| panic!("no column {n}"));
                    arrow_cast::display::array_value_to_string(col, r).unwrap()
                })
                .collect();
            map.insert(key.value(r).to_string(), row.join(" | "));
        }
    }
    map
}

/// Issue 21: for every online method, a libtorch failure injected right after an
/// optimizer update (`DTTA_FAIL_AFTER_UPDATE`) fails the batch, `recover` undoes it
/// whole (weights, optimizer state, pending gradients, running statistics), and the
/// retried batch gives exactly the rows of a run without the fault.
#[test]
fn a_fault_after_an_update_is_undone_and_the_retry_gives_the_undisturbed_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = demo_bundle();
    // One shard: an online stream's rows depend on the order of its batches.
    let input = shards(&tmp.path().join("in"), 12, 1);
    // (name, [tta], batch size, the update that fails)
    let eata = format!(
        "method = \"eata\"\n[tta.eata]\nfisher_url = \"{input}\"\nfisher_samples = 6\nfisher_batch = 3\ne_margin = 0.9\nd_margin = 0.9"
    );
    let cases = [
        ("tent", "method = \"tent\"", "runtime.batch_size=3", "2"),
        ("eata", eata.as_str(), "runtime.batch_size=3", "2"),
        (
            "sar",
            "method = \"sar\"\n[tta.sar]\nreset_below = 0.05",
            "runtime.batch_size=3",
            "2",
        ),
        (
            "diffusion-tta-online",
            "method = \"diffusion-tta\"\nmode = \"online\"\nsteps = 2\naccum = 1\nsamples_per_step = 2\nlr = 0.01",
            "runtime.batch_size=1",
            "3",
        ),
        (
            // Batches 3 and 4 make the second update: the retry must keep batch 3's
            // pending gradients.
            "dusa-online",
            "method = \"dusa\"\nmode = \"online\"\n[tta.dusa]\nlr = 1e-3\naccum = 2",
            "runtime.batch_size=2",
            "2",
        ),
    ];
    for (name, tta, batch, update) in cases {
        let run = |tag: &str, fault: Option<&str>| {
            let out = tmp.path().join(format!("out-{name}-{tag}"));
            let p = pipeline(tmp.path(), &input, &out, &bundle, tta);
            let mut cmd = dtta();
            cmd.args(["run", p.to_str().unwrap(), "--no-progress", "--set", batch]);
            cmd.args(["--set", "runtime.shard_retries=2"]);
            if let Some(n) = fault {
                cmd.env("DTTA_FAIL_AFTER_UPDATE", n);
            }
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "{name} {tag}: {}", text(&o));
            (full_rows(&out), text(&o))
        };
        let (clean, _) = run("clean", None);
        let (faulted, log) = run("fault", Some(update));
        assert!(log.contains("injected fault"), "{name}: the fault never fired: {log}");
        assert_eq!(clean.len(), 12, "{name}");
        assert!(clean.values().all(|r| r.starts_with("ok")), "{name}: {clean:?}");
        for (key, row) in &clean {
            assert_eq!(Some(row), faulted.get(key), "{name}: row {key} differs after the retry");
        }
    }
}

#[test]
fn batch_statistics_methods_with_batches_of_one_on_a_batchnorm_classifier_warn_why() {
    let tmp = tempfile::tempdir().unwrap();
    let input = repo().join("data/demo-mnist/shard-000000.tar");
    for method in ["tent", "eata", "sar"] {
        for (batch, warned) in [(1, true), (8, false)] {
            let out = tmp.path().join(format!("out-{method}-{batch}"));
            let p = write_pipeline(
                tmp.path(),
                &input.to_string_lossy(),
                &out.to_string_lossy(),
                &format!("batch_size = {batch}\n[tta]\nmethod = \"{method}\"\n[tta.eata]\nfisher_alpha = 0.0\n"),
            );
            let o = run_dtta(&["run", p.to_str().unwrap(), "--no-progress"]);
            assert!(o.status.success(), "{}", text(&o));
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert_eq!(
                stderr.contains(&format!("{method} with runtime.batch_size = 1"))
                    && stderr.contains("GroupNorm or LayerNorm"),
                warned,
                "{method}, batch {batch}: {stderr}"
            );
        }
    }
}

/// EATA's Fisher information needs clean images: without `tta.eata.fisher_url` (and
/// `fisher_alpha` > 0) the run is refused with exit 2 and one line saying so; with it,
/// the log says how many images made it.
#[test]
fn eata_reads_its_clean_images_or_says_it_needs_them() {
    let tmp = tempfile::tempdir().unwrap();
    let input = repo().join("data/demo-mnist/shard-000000.tar");
    let out = tmp.path().join("out");
    let p = write_pipeline(
        tmp.path(),
        &input.to_string_lossy(),
        &out.to_string_lossy(),
        "batch_size = 16\n[tta]\nmethod = \"eata\"\n",
    );
    let o = run_dtta(&["run", p.to_str().unwrap(), "--no-progress"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_stderr_has(&o, "tta.eata.fisher_url");
    assert!(committed_files(&out).is_empty());

    let fisher = format!("tta.eata.fisher_url={}", input.display());
    let sets = ["--set", &fisher, "--set", "tta.eata.fisher_samples=40"];
    let o = run_dtta(&[&["run", p.to_str().unwrap(), "--no-progress"], &sets[..]].concat());
    assert!(o.status.success(), "{}", text(&o));
    assert_stderr_has(&o, "Fisher information from 40 clean image(s) in 1 batch(es)");
    assert_eq!(committed_files(&out).len(), 1);
}
