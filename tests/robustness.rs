//! Robustness evaluation end to end: `[corrupt]` expands every sample into variants, stateful
//! methods keep one stream per variant, and `summarize` tabulates method x variant.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use arrow_array::{Int32Array, Int64Array, StringArray};
use common::*;

const CORRUPT: &str = "[corrupt]\nkinds = [\"gaussian_noise\", \"contrast\"]\nseverities = [1, 5]\n";

/// (key, corruption, severity) -> (pred_before, pred_after, label) of every committed row.
fn variant_rows(out: &std::path::Path) -> BTreeMap<(String, String, i32), (i64, i64, i64)> {
    let mut rows = BTreeMap::new();
    for batch in committed_batches(out, "predictions") {
        let key = column::<StringArray>(&batch, "key");
        let corruption = column::<StringArray>(&batch, "corruption");
        let severity = column::<Int32Array>(&batch, "severity");
        let (before, after, label) = (
            column::<Int64Array>(&batch, "pred_before"),
            column::<Int64Array>(&batch, "pred_after"),
            column::<Int64Array>(&batch, "label"),
        );
        for r in 0..batch.num_rows() {
            let id = (
                key.value(r).to_string(),
                corruption.value(r).to_string(),
                severity.value(r),
            );
            let previous = rows.insert(id.clone(), (before.value(r), after.value(r), label.value(r)));
            assert!(previous.is_none(), "{id:?} twice");
        }
    }
    rows
}

fn run(pipeline: &std::path::Path, sets: &[&str]) {
    // One shard at a time: TENT is online, so its rows depend on the order of its batches.
    let mut args = vec!["run", pipeline.to_str().unwrap(), "--set", "runtime.shards_in_flight=1"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = run_dtta(&args);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn corrupt_section_expands_samples_into_variants_with_one_stream_each() {
    let tmp = tempfile::tempdir().unwrap();
    let input = repo().join("data/demo-mnist/shard-{000000..000001}.tar");
    let eval = tmp.path().join("eval");
    let url = |name: &str| format!("output.url={}/{name}/", eval.display());
    let pipeline = write_pipeline(tmp.path(), &input.to_string_lossy(), "unused", CORRUPT);
    run(&pipeline, &["tta.method=tent", &url("tent")]);
    run(&pipeline, &["tta.method=source", &url("source")]);

    let rows = variant_rows(&eval.join("tent"));
    let keys: BTreeSet<_> = rows.keys().map(|k| k.0.clone()).collect();
    assert_eq!(keys.len(), 200);
    let variants: BTreeSet<_> = rows.keys().map(|k| (k.1.clone(), k.2)).collect();
    let expected: BTreeSet<_> = [
        ("clean", 0),
        ("contrast", 1),
        ("contrast", 5),
        ("gaussian_noise", 1),
        ("gaussian_noise", 5),
    ]
    .into_iter()
    .map(|(c, s)| (c.to_string(), s))
    .collect();
    assert_eq!(variants, expected);
    assert_eq!(rows.len(), 200 * 5, "every sample once per variant");

    // The corruptions reach the classifier: severe contrast loss costs the source model.
    let source = variant_rows(&eval.join("source"));
    let accuracy = |corruption: &str, severity: i32| {
        let cell: Vec<_> = source
            .iter()
            .filter(|(k, _)| k.1 == corruption && k.2 == severity)
            .map(|(_, v)| v.1 == v.2)
            .collect();
        cell.iter().filter(|c| **c).count() as f64 / cell.len() as f64
    };
    assert!(accuracy("clean", 0) > 0.9, "{}", accuracy("clean", 0));
    assert!(
        accuracy("contrast", 5) < accuracy("clean", 0) - 0.2,
        "{}",
        accuracy("contrast", 5)
    );

    // TENT adapts online, one state per variant: its clean predictions are those of a run
    // without corruptions (same batches, a stream that never saw a corrupted image).
    // (pred_before is not compared: it reads BatchNorm running statistics, which every
    // train-mode pass updates, whatever its stream.)
    let clean_only = tmp.path().join("clean-only");
    let plain = write_pipeline(tmp.path(), &input.to_string_lossy(), &clean_only.to_string_lossy(), "");
    run(&plain, &["tta.method=tent"]);
    let plain_rows = variant_rows(&clean_only);
    assert_eq!(plain_rows.len(), 200);
    for ((key, corruption, severity), v) in &plain_rows {
        assert_eq!((corruption.as_str(), *severity), ("clean", 0));
        let corrupted_run = rows[&(key.clone(), "clean".to_string(), 0)];
        assert_eq!((corrupted_run.1, corrupted_run.2), (v.1, v.2), "{key}");
    }

    // One table over both outputs, also as CSV.
    let o = run_dtta(&["summarize", &format!("{}/", eval.display())]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("mean over corrupted"), "{stdout}");
    let csv = std::fs::read_to_string(eval.join("_runs/robustness.csv")).unwrap();
    let lines: Vec<_> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "method,corruption,severity,rows,labelled,top1_before,top1_after,ms_per_image,denoiser_evals_per_image"
    );
    assert_eq!(lines.len(), 1 + 2 * 5, "{csv}");
    let contrast5 = format!("{:.6}", accuracy("contrast", 5));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("source,contrast,5,200,200,") && l.contains(&contrast5)),
        "{csv}"
    );

    // The report: gains over source, the pooled interval resampling the 200 images (each
    // with its 4 corrupted variants), and the page saying so.
    let report = |out: &std::path::Path, name: &str| {
        let page = tmp.path().join(name);
        let o = run_dtta(&["report", &format!("{}/", out.display()), "-o", page.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("_runs/report.json")).unwrap()).unwrap();
        (std::fs::read_to_string(&page).unwrap(), json)
    };
    let (html, json) = report(&eval, "report.html");
    assert_eq!(json["robustness"]["reference"], "source");
    let pooled = json["robustness"]["gains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["series"] == "tent" && g["variant"] == "all corrupted")
        .unwrap();
    assert_eq!(
        (&pooled["pairs"], &pooled["images"]),
        (&800.into(), &200.into()),
        "{pooled}"
    );
    let unit = "bootstrap over images; an image&#39;s variants are resampled together";
    assert!(html.contains(unit), "{html}");
    assert!(html.contains("over 800 pairs of 200 images"), "{html}");
    assert!(!html.contains("no source series given"), "{html}");

    // Without the source output, TENT's gains are against its live stream's pred_before:
    // the page must not call that an unadapted reference.
    let (html, json) = report(&eval.join("tent"), "tent-only.html");
    assert_eq!(json["robustness"]["live_reference"], serde_json::json!(["tent"]));
    assert!(
        html.contains("tent (against the live stream&#39;s pred_before: no source series given)"),
        "{html}"
    );
    assert!(
        html.contains("no unadapted reference for the online method(s) tent"),
        "{html}"
    );
}

#[test]
fn bad_corrupt_settings_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(tmp.path(), "in/*.tar", "out/", CORRUPT);
    for (set, key) in [
        ("corrupt.kinds=[\"fog\", \"rain\"]", "corrupt.kinds"),
        ("corrupt.severities=[0, 3]", "corrupt.severities"),
        ("corrupt.severities=[]", "corrupt.severities"),
    ] {
        let o = run_dtta(&["plan", pipeline.to_str().unwrap(), "--set", set]);
        assert!(!o.status.success());
        assert!(text(&o).contains(key), "{set}: {}", text(&o));
    }
}

#[test]
fn online_diffusion_tta_keeps_a_stream_per_variant() {
    // The demo denoiser has a parameter that never gets a gradient (its label table: the
    // condition comes in as a vector), so its momentum buffer stays undefined; parking and
    // rolling back a stream must cope with that.
    let tmp = tempfile::tempdir().unwrap();
    let shard = tmp.path().join("shard-000000.tar");
    write_demo_shard(&shard, &demo_samples()[..12]);
    let out = tmp.path().join("out");
    let extra = format!(
        "{CORRUPT}[tta]\nmethod = \"diffusion-tta\"\nmode = \"online\"\nsteps = 2\naccum = 1\nsamples_per_step = 4\n"
    );
    let pipeline = write_pipeline(tmp.path(), &shard.to_string_lossy(), &out.to_string_lossy(), &extra);
    run(&pipeline, &[]);
    let rows = variant_rows(&out);
    assert_eq!(rows.len(), 12 * 5);
    let marker = serde_json::to_value(&committed_markers(&out)["shard-000000"]).unwrap();
    assert_eq!(marker["method"], "diffusion-tta-online");
    assert_eq!(marker["tally"]["by_variant"]["contrast/5"]["rows"], 12);
}
