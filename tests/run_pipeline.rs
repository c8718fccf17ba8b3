//! End-to-end runs of the real binary over real shards with the real demo bundle.

mod common;

use std::collections::BTreeSet;
use std::io::Cursor;

use common::*;

fn jpeg_of(png: &[u8]) -> Vec<u8> {
    let img = image::load_from_memory(png).unwrap().to_rgb8();
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn big_png(side: u32) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(side, side, image::Luma([9]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn demo_pipeline_writes_one_row_per_sample_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let input = repo().join("data/demo-mnist/shard-{000000..000009}.tar");
    let pipeline = write_pipeline(tmp.path(), &input.to_string_lossy(), &out.to_string_lossy(), "");
    let o = run_dtta(&["run", pipeline.to_str().unwrap(), "--set", "runtime.batch_size=16"]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("10 committed"), "{stdout}");
    assert!(stdout.contains("accuracy:"), "{stdout}");

    let rows = committed_rows(&out);
    let samples = demo_samples();
    assert_eq!(rows.len(), samples.len());
    let keys: BTreeSet<_> = rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), samples.len(), "every key exactly once");
    assert!(rows
        .iter()
        .all(|r| r.status == "ok" && r.error.is_none() && r.pred_after.is_some()));
    let labels: std::collections::HashMap<_, _> = samples.iter().map(|s| (s.key.clone(), s.label)).collect();
    assert!(
        rows.iter().all(|r| r.label == Some(labels[&r.key])),
        "labels come from .cls"
    );
    let correct = rows.iter().filter(|r| r.pred_after == r.label).count();
    assert!(correct > 900, "the demo classifier is accurate ({correct}/1000)");
    let printed = format!("{:.2}%", 100.0 * correct as f64 / rows.len() as f64);
    assert!(
        stdout.contains(&printed),
        "summary prints the real accuracy {printed}: {stdout}"
    );

    let runs: Vec<_> = std::fs::read_dir(out.join("_runs")).unwrap().collect();
    assert_eq!(runs.len(), 1);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs[0].as_ref().unwrap().path()).unwrap()).unwrap();
    assert_eq!(summary["tally"]["rows"], 1000);
    assert_eq!(summary["shards_committed"].as_array().unwrap().len(), 10);

    // A rerun finds everything committed and writes no new rows.
    let o = run_dtta(&["run", pipeline.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_stdout_has(&o, "10 skipped");
    assert_eq!(all_prediction_files(&out).len(), 10);

    // `plan` agrees, and `summarize` reads the markers.
    let o = run_dtta(&["plan", pipeline.to_str().unwrap()]);
    assert_stdout_has(&o, "10 committed, 0 to do");
    let o = run_dtta(&["summarize", out.to_str().unwrap()]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("10 committed shard(s)") && s.contains(&printed),
        "{}",
        text(&o)
    );
}

#[test]
fn predictions_match_pytorch_and_open_in_pyarrow_and_duckdb() {
    let python = repo().join(".venv/bin/python");
    assert!(python.exists(), "the venv is missing: run `make setup`");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let input = repo().join("data/demo-mnist/");
    let pipeline = write_pipeline(tmp.path(), &input.to_string_lossy(), &out.to_string_lossy(), "");
    let o = run_dtta(&["run", pipeline.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let check = std::process::Command::new(python)
        .arg(repo().join("tools/check_predictions.py"))
        .arg(&out)
        .arg(repo().join("data/demo-mnist"))
        .arg(demo_bundle())
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
}

#[test]
fn bad_members_become_status_rows_and_the_job_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_samples();
    let png = demo[0].png.clone();
    let jpeg = jpeg_of(&png);
    let mut truncated = jpeg.clone();
    truncated.truncate(jpeg.len() / 2);
    let m = |name: &str, data: &[u8]| (name.to_string(), data.to_vec());
    write_tar(
        &tmp.path().join("bad.tar"),
        &[
            m("good.png", &png),
            m("good.cls", b"7"),
            m("jpeg.jpg", &jpeg),
            m("jpeg.cls", b"7"),
            m("truncated.jpg", &truncated),
            m("truncated.cls", b"1"),
            m("empty.png", b""),
            m("empty.cls", b"2"),
            m("text.jpg", b"this is not an image at all"),
            m("text.cls", b"3"),
            m("nolabel.png", &png),
            m("badlabel.png", &png),
            m("badlabel.cls", b"seven"),
            m("huge.png", &big_png(2000)),
            m("huge.cls", b"4"),
            m("heavy.jpg", &vec![0u8; 300_000]),
            m("heavy.cls", b"5"),
            m("noimage.cls", b"6"),
            m("noimage.json", b"{}"),
        ],
    );
    let out = tmp.path().join("out");
    let pipeline = write_pipeline(
        tmp.path(),
        &tmp.path().join("bad.tar").to_string_lossy(),
        &out.to_string_lossy(),
        "[limits]\nmax_pixels = 1000000\nmax_member_bytes = \"200KiB\"\n",
    );
    let o = run_dtta(&["run", pipeline.to_str().unwrap(), "--set", "input.require_label=true"]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = committed_rows(&out);
    let status = |key: &str| {
        let r = rows
            .iter()
            .find(|r| r.key == key)
            .unwrap_or_else(|| panic!("no row for {key}"));
        (r.status.as_str(), r.error.clone().unwrap_or_default(), r.pred_after)
    };
    assert_eq!(rows.len(), 10, "one row per sample: {rows:?}");
    assert_eq!(status("good").0, "ok");
    assert!(status("good").2.is_some());
    assert_eq!(status("jpeg").0, "ok");
    let (s, e, p) = status("truncated");
    assert_eq!(s, "decode_error", "{e}");
    assert!(p.is_none());
    let (s, e, _) = status("empty");
    assert!(s == "decode_error" && e.contains("empty"), "{s}: {e}");
    let (s, e, _) = status("text");
    assert!(s == "decode_error" && e.contains("not an image"), "{s}: {e}");
    let (s, e, p) = status("nolabel");
    assert!(
        s == "missing_label" && e.contains("require_label") && p.is_some(),
        "{s}: {e}"
    );
    let (s, e, p) = status("badlabel");
    assert!(s == "bad_label" && e.contains("seven") && p.is_some(), "{s}: {e}");
    let (s, e, _) = status("huge");
    assert!(s == "too_large" && e.contains("2000x2000"), "{s}: {e}");
    let (s, e, _) = status("heavy");
    assert!(s == "too_large" && e.contains("max_member_bytes"), "{s}: {e}");
    let (s, e, _) = status("noimage");
    assert!(s == "no_image" && e.contains("cls"), "{s}: {e}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("decode_error: 3"), "{stdout}");
}

#[test]
fn a_truncated_tar_fails_its_shard_only_and_a_rerun_finishes_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let demo = demo_samples();
    for (i, chunk) in demo[..60].chunks(20).enumerate() {
        write_demo_shard(&shards.join(format!("s-{i}.tar")), chunk);
    }
    let broken = shards.join("s-1.tar");
    let full = std::fs::read(&broken).unwrap();
    std::fs::write(&broken, &full[..full.len() / 2 + 100]).unwrap();

    let out = tmp.path().join("out");
    let input = format!("{}/s-{{0..2}}.tar", shards.display());
    let pipeline = write_pipeline(tmp.path(), &input, &out.to_string_lossy(), "");
    let pipeline_s = pipeline.to_str().unwrap();
    let o = run_dtta(&["run", pipeline_s, "--set", "runtime.shard_retries=1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: 1 shard(s) failed") && last.contains("s-1"),
        "{last}"
    );
    assert!(stderr.contains("retry 1/1"), "the shard was retried: {stderr}");
    let committed = committed_files(&out);
    assert_eq!(committed.keys().cloned().collect::<Vec<_>>(), vec!["s-0", "s-2"]);
    assert_eq!(all_prediction_files(&out).len(), 2, "the failed shard leaves no file");

    // The shard is repaired upstream; a rerun processes only it.
    std::fs::write(&broken, &full).unwrap();
    let o = run_dtta(&["run", pipeline_s]);
    assert!(o.status.success(), "{}", text(&o));
    assert_stdout_has(&o, "2 skipped");
    let rows = committed_rows(&out);
    assert_eq!(rows.len(), 60);
    let keys: BTreeSet<_> = rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 60);
}

#[test]
fn bad_config_names_the_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(tmp.path(), "x/", "y/", "prefetch = 3\n");
    let o = run_dtta(&["run", pipeline.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("runtime.prefetch") && stderr.contains("pipeline.toml"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let pipeline = write_pipeline(tmp.path(), "x/", "y/", "");
    let o = run_dtta(&["run", pipeline.to_str().unwrap(), "--set", "runtime.batch_size=-1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_stderr_has(&o, "--set runtime.batch_size=-1");

    let o = run_dtta(&["run", tmp.path().join("missing.toml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_stderr_has(&o, "missing.toml");
}

#[test]
fn missing_shards_and_devices_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let input = repo().join("data/demo-mnist/shard-{000000..000012}.tar");
    let out = tmp.path().join("out");
    let pipeline = write_pipeline(tmp.path(), &input.to_string_lossy(), &out.to_string_lossy(), "");
    let o = run_dtta(&["run", pipeline.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("3 shard(s)") && stderr.contains("shard-000010.tar"),
        "{stderr}"
    );

    let input = repo().join("data/demo-mnist/shard-000000.tar");
    let pipeline = write_pipeline(tmp.path(), &input.to_string_lossy(), &out.to_string_lossy(), "");
    let o = run_dtta(&["inspect", demo_bundle().to_str().unwrap(), "--device", "cuda"]);
    let gpu = run_dtta(&["inspect", demo_bundle().to_str().unwrap(), "--device", "auto"]);
    if String::from_utf8_lossy(&gpu.stdout).contains("device:      cpu") {
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert_stderr_has(&o, "CUDA is not available");
        let o = run_dtta(&["run", pipeline.to_str().unwrap(), "--set", "runtime.device=cuda"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert_stderr_has(&o, "CUDA is not available");
    } else {
        assert!(o.status.success(), "{}", text(&o));
    }
}

#[test]
fn inspect_reports_the_bundle_and_rejects_mismatched_shapes() {
    let o = run_dtta(&["inspect", demo_bundle().to_str().unwrap(), "--device", "cpu"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("demo-mnist"), "{s}");
    assert!(s.contains("[1, 1, 28, 28]") && s.contains("[1, 10]"), "{s}");
    assert!(s.contains("fc.weight") && s.contains("0, 1, 2"), "{s}");

    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(demo_bundle().join("classifier.pt"), tmp.path().join("classifier.pt")).unwrap();
    let spec = std::fs::read_to_string(demo_bundle().join("bundle.toml")).unwrap();
    let wrong = spec.replace("num_classes = 10", "num_classes = 12").replace(
        "class_names = [\"0\", \"1\", \"2\", \"3\", \"4\", \"5\", \"6\", \"7\", \"8\", \"9\"]",
        "",
    );
    std::fs::write(tmp.path().join("bundle.toml"), wrong).unwrap();
    let o = run_dtta(&["inspect", tmp.path().to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("[1, 10]") && e.contains("num_classes = 12"), "{e}");
}
