//! Dense tasks end to end through the real binary, on the committed demo segmenter and
//! depth network and their demo scenes: the dense columns and metrics are what the masks
//! and depth maps in the table give against the labels in the shard (recomputed here),
//! bad dense labels cost the label and never the row, a shard written by the Python
//! `webdataset` library runs, and methods without a dense form are refused.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use arrow_array::{Array, BinaryArray, Float32Array, Int32Array, Int64Array, ListArray, StringArray};
use common::*;

fn seg_bundle() -> PathBuf {
    repo().join("configs/bundles/demo-seg")
}

fn depth_bundle() -> PathBuf {
    repo().join("configs/bundles/demo-depth")
}

/// The members of a tar shard by name.
fn members(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(File::open(path).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.insert(name, data);
    }
    out
}

fn gray8(png: &[u8]) -> Vec<u8> {
    match image::load_from_memory(png).unwrap() {
        image::DynamicImage::ImageLuma8(i) => i.into_raw(),
        other => panic!("expected an 8-bit gray PNG, got {:?}", other.color()),
    }
}

fn gray16(png: &[u8]) -> Vec<u16> {
    match image::load_from_memory(png).unwrap() {
        image::DynamicImage::ImageLuma16(i) => i.into_raw(),
        other => panic!("expected a 16-bit gray PNG, got {:?}", other.color()),
    }
}

fn list(a: &ListArray, r: usize) -> Vec<i64> {
    let v = a.value(r);
    v.as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()
}

/// Runs `source` over the task's test shard 0 into `DIR/source`; the shard's members.
fn run_source(dir: &Path, task: &str) -> BTreeMap<String, Vec<u8>> {
    let shard = repo().join(format!("data/demo-{task}/shard-000000.tar"));
    let bundle = if task == "seg" { seg_bundle() } else { depth_bundle() };
    let o = run_bundle(dir, "source", shard.to_str().unwrap(), &bundle, &[]);
    assert!(o.status.success(), "{}", text(&o));
    members(&shard)
}

/// Checks every predictions row below `out`: status ok, denoiser evaluations within
/// `evals` and a `map` column; returns how many rows there are and their evaluations.
fn adapted_rows(out: &Path, name: &str, evals: RangeInclusive<i64>, map: &str) -> (usize, Vec<i64>) {
    let mut rows = 0;
    let mut counts = Vec::new();
    for b in committed_batches(out, "predictions") {
        let status = column::<StringArray>(&b, "status");
        let loss = column::<Float32Array>(&b, "loss_last");
        let denoiser = column::<Int64Array>(&b, "denoiser_evals");
        let maps = column::<BinaryArray>(&b, map);
        for r in 0..b.num_rows() {
            rows += 1;
            assert_eq!(status.value(r), "ok", "{name}");
            assert!(loss.value(r).is_finite(), "{name}");
            assert!(
                evals.contains(&denoiser.value(r)),
                "{name}: {} denoiser evaluations",
                denoiser.value(r)
            );
            counts.push(denoiser.value(r));
            assert!(maps.is_valid(r), "{name}");
        }
    }
    (rows, counts)
}

#[test]
fn segmentation_columns_match_the_masks_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let labels = run_source(dir.path(), "seg");
    let (mut inter, mut union) = (vec![0i64; 11], vec![0i64; 11]);
    let mut rows = 0;
    for b in committed_batches(&dir.path().join("source"), "predictions") {
        let key = column::<StringArray>(&b, "key");
        let status = column::<StringArray>(&b, "status");
        let mask = column::<BinaryArray>(&b, "mask_after");
        let before = column::<BinaryArray>(&b, "mask_before");
        let acc = column::<Float32Array>(&b, "pixel_acc_after");
        let (i_col, u_col) = (
            column::<ListArray>(&b, "intersections_after"),
            column::<ListArray>(&b, "unions_after"),
        );
        // A segmentation row has no image-level class.
        assert_eq!(column::<Int64Array>(&b, "pred_after").null_count(), b.num_rows());
        for r in 0..b.num_rows() {
            rows += 1;
            assert_eq!(status.value(r), "ok");
            let m = gray8(mask.value(r));
            assert_eq!(m, gray8(before.value(r)), "source: before = after");
            let l = gray8(&labels[&format!("{}.seg.png", key.value(r))]);
            assert_eq!((m.len(), l.len()), (64 * 64, 64 * 64));
            // Recomputed here from the written mask and the shard's label.
            let (mut i, mut u) = (vec![0i64; 11], vec![0i64; 11]);
            let mut correct = 0;
            for (&p, &g) in m.iter().zip(&l) {
                assert!(p < 11, "class {p}");
                if g == 255 {
                    continue;
                }
                correct += (p == g) as i32;
                u[p as usize] += 1;
                if p == g {
                    i[g as usize] += 1;
                } else {
                    u[g as usize] += 1;
                }
            }
            assert!((acc.value(r) - correct as f32 / l.iter().filter(|&&g| g != 255).count() as f32).abs() < 1e-6);
            assert_eq!(list(&i_col, r), i, "{}", key.value(r));
            assert_eq!(list(&u_col, r), u, "{}", key.value(r));
            inter.iter_mut().zip(&i).for_each(|(a, b)| *a += b);
            union.iter_mut().zip(&u).for_each(|(a, b)| *a += b);
        }
    }
    assert_eq!(rows, 100);
    let ious: Vec<f64> = inter
        .iter()
        .zip(&union)
        .filter(|(_, &u)| u > 0)
        .map(|(&i, &u)| i as f64 / u as f64)
        .collect();
    let miou = ious.iter().sum::<f64>() / ious.len() as f64;
    let o = run_dtta(&["summarize", dir.path().join("source").to_str().unwrap()]);
    let expected = format!("mIoU {:.1} -> {:.1} %", miou * 100.0, miou * 100.0);
    assert!(text(&o).contains(&expected), "expected {expected:?} in {}", text(&o));
    // The report's dense section holds the same dataset mIoU.
    let out = dir.path().join("source");
    let page = dir.path().join("report.html");
    let o = run_dtta(&["report", out.to_str().unwrap(), "-o", page.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_runs/report.json")).unwrap()).unwrap();
    let rows = json["dense"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{json}");
    assert!(
        (rows[0]["miou_after"].as_f64().unwrap() - miou * 100.0).abs() < 1e-9,
        "{json}"
    );
    assert_eq!(rows[0]["images"], 100);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("<h2>Dense tasks</h2>"));
    // Its heatmap shows the same mIoU, one cell per variant (here: clean).
    let cell = format!(">{:.1}</text>", miou * 100.0);
    assert!(
        html.contains("aria-label=\"dense mIoU\"") && html.contains(&cell),
        "{cell}"
    );
}

#[test]
fn depth_columns_match_the_maps_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let labels = run_source(dir.path(), "depth");
    let mut rows = 0;
    for b in committed_batches(&dir.path().join("source"), "predictions") {
        let key = column::<StringArray>(&b, "key");
        let depth = column::<BinaryArray>(&b, "depth_after");
        let abs_rel = column::<Float32Array>(&b, "abs_rel_after");
        let valid = column::<Int64Array>(&b, "valid_pixels");
        for r in 0..b.num_rows() {
            rows += 1;
            // Millimetres, as label.depth_scale says; the label in the same units.
            let d = gray16(depth.value(r));
            let l = gray16(&labels[&format!("{}.depth.png", key.value(r))]);
            let pairs: Vec<(f64, f64)> = d
                .iter()
                .zip(&l)
                .filter(|(_, &g)| g > 0)
                .map(|(&p, &g)| (p as f64, g as f64))
                .collect();
            assert_eq!(valid.value(r), pairs.len() as i64);
            let recomputed = pairs.iter().map(|(p, g)| (p - g).abs() / g).sum::<f64>() / pairs.len() as f64;
            // The column is computed before the 1 mm rounding of the PNG.
            assert!(
                (abs_rel.value(r) as f64 - recomputed).abs() < 2e-3,
                "{}: {} vs {recomputed}",
                key.value(r),
                abs_rel.value(r)
            );
        }
    }
    assert_eq!(rows, 100);
    let o = run_dtta(&["summarize", dir.path().join("source").to_str().unwrap()]);
    assert!(
        text(&o).contains("source: depth over 100 labelled image(s)"),
        "{}",
        text(&o)
    );
}

/// A 64x64 gray PNG of `f`.
fn png8(side: u32, f: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let img = image::GrayImage::from_fn(side, side, |x, y| image::Luma([f(x, y)]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn bad_dense_labels_cost_the_label_not_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let image = png8(64, |x, y| ((x * 4) ^ (y * 4)) as u8);
    let members = vec![
        ("good.png".to_string(), image.clone()),
        ("good.seg.png".to_string(), png8(64, |x, _| (x / 32) as u8)),
        ("small.png".to_string(), image.clone()),
        ("small.seg.png".to_string(), png8(32, |_, _| 0)),
        ("garbage.png".to_string(), image.clone()),
        ("garbage.seg.png".to_string(), b"\x89PNG\r\n\x1a\nnot a png".to_vec()),
        ("none.png".to_string(), image.clone()),
        ("broken.png".to_string(), b"not an image".to_vec()),
        ("broken.seg.png".to_string(), png8(64, |_, _| 1)),
    ];
    let shard = dir.path().join("bad.tar");
    write_tar(&shard, &members);
    let sets = ["corrupt.kinds=[\"fog\"]", "corrupt.severities=[2]"];
    let o = run_bundle(dir.path(), "out", shard.to_str().unwrap(), &seg_bundle(), &sets);
    assert!(o.status.success(), "{}", text(&o));
    let mut seen = BTreeMap::new();
    for b in committed_batches(&dir.path().join("out"), "predictions") {
        let key = column::<StringArray>(&b, "key");
        let status = column::<StringArray>(&b, "status");
        let error = column::<StringArray>(&b, "error");
        let mask = column::<BinaryArray>(&b, "mask_after");
        let miou = column::<Float32Array>(&b, "miou_after");
        let corruption = column::<StringArray>(&b, "corruption");
        for r in 0..b.num_rows() {
            let row = (
                status.value(r).to_string(),
                error.is_valid(r).then(|| error.value(r).to_string()),
                mask.is_valid(r),
                miou.is_valid(r),
            );
            seen.insert(format!("{}/{}", key.value(r), corruption.value(r)), row);
        }
    }
    assert_eq!(seen.len(), 10, "{seen:?}");
    for variant in ["clean", "fog"] {
        let row = |k: &str| seen[&format!("{k}/{variant}")].clone();
        assert_eq!(row("good"), ("ok".into(), None, true, true));
        let (status, error, predicted, scored) = row("small");
        assert_eq!((status.as_str(), predicted, scored), ("bad_label", true, false));
        assert_eq!(error.unwrap(), "seg.png: 32x32 label for a 64x64 image");
        let (status, error, predicted, scored) = row("garbage");
        assert_eq!((status.as_str(), predicted, scored), ("bad_label", true, false));
        assert!(error.unwrap().starts_with("seg.png: cannot decode"));
        // No label: predicted, not scored, nothing wrong.
        assert_eq!(row("none"), ("ok".into(), None, true, false));
        let (status, _, predicted, _) = row("broken");
        assert_eq!((status.as_str(), predicted), ("decode_error", false));
    }
}

#[test]
fn a_shard_written_by_the_webdataset_library_runs() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("wds.tar");
    // Five test scenes of the committed shard, written again by webdataset.TarWriter.
    let script = r#"
import io, sys, tarfile
import webdataset as wds
src, dst = sys.argv[1], sys.argv[2]
samples = {}
with tarfile.open(src) as t:
    for m in t.getmembers():
        key, ext = m.name.split(".", 1)
        samples.setdefault(key, {})[ext] = t.extractfile(m).read()
with wds.TarWriter(dst) as w:
    for key in sorted(samples)[:5]:
        s = samples[key]
        w.write({"__key__": key, "png": s["png"], "seg.png": s["seg.png"]})
"#;
    let py = repo().join(".venv/bin/python");
    let src = repo().join("data/demo-seg/shard-000000.tar");
    let o = std::process::Command::new(py)
        .args(["-c", script, src.to_str().unwrap(), shard.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = run_bundle(dir.path(), "out", shard.to_str().unwrap(), &seg_bundle(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let batches = committed_batches(&dir.path().join("out"), "predictions");
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 5);
    for b in &batches {
        assert_eq!(
            column::<StringArray>(b, "status")
                .iter()
                .flatten()
                .filter(|s| *s != "ok")
                .count(),
            0
        );
        assert_eq!(
            column::<Float32Array>(b, "miou_after").null_count(),
            0,
            "every scene scored"
        );
    }
}

#[test]
fn methods_without_a_dense_form_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let seg = repo().join("data/demo-seg/shard-000000.tar");
    let depth = repo().join("data/demo-depth/shard-000000.tar");
    let cases = [
        (
            "dc",
            &seg,
            seg_bundle(),
            "diffusion-classifier",
            "scores one class per image",
        ),
        (
            "tent-depth",
            &depth,
            depth_bundle(),
            "tent",
            "a depth model has no classes",
        ),
        (
            "dusa-depth",
            &depth,
            depth_bundle(),
            "dusa",
            "mixes class-conditional noise predictions",
        ),
    ];
    for (name, input, bundle, method, message) in cases {
        let o = run_bundle(
            dir.path(),
            name,
            input.to_str().unwrap(),
            &bundle,
            &[&format!("tta.method={method}")],
        );
        assert_eq!(o.status.code(), Some(2), "{name}: {}", text(&o));
        assert!(text(&o).contains(message), "{name}: {}", text(&o));
    }
    // TENT adapts a segmenter: every row scored, before and after.
    let o = run_bundle(
        dir.path(),
        "tent",
        seg.to_str().unwrap(),
        &seg_bundle(),
        &["tta.method=tent"],
    );
    assert!(o.status.success(), "{}", text(&o));
    for b in committed_batches(&dir.path().join("tent"), "predictions") {
        assert_eq!(column::<Float32Array>(&b, "miou_before").null_count(), 0);
        assert_eq!(column::<Float32Array>(&b, "miou_after").null_count(), 0);
    }
}

/// The first five scenes of a task's test shard 0, as `DIR/TASK.tar`.
fn five_scenes(dir: &Path, task: &str) -> PathBuf {
    let src = repo().join(format!("data/demo-{task}/shard-000000.tar"));
    let all = members(&src);
    let keys: Vec<String> = all
        .keys()
        .filter_map(|k| k.strip_suffix(".png").filter(|k| !k.contains('.')))
        .map(String::from)
        .take(5)
        .collect();
    let picked: Vec<(String, Vec<u8>)> = all
        .into_iter()
        .filter(|(name, _)| keys.iter().any(|k| name.starts_with(&format!("{k}."))))
        .collect();
    let path = dir.join(format!("{task}.tar"));
    write_tar(&path, &picked);
    path
}

/// DUSA's per-pixel form adapts a segmenter, episodic and online: every row has both
/// masks and metrics, the denoiser passes are an image's candidates per iteration (the
/// union of its pixels' top-4 classes: at least 1, at most the 11 classes, and more than
/// 4 somewhere on these scenes), and the steps rows carry the label metrics.
#[test]
fn dusa_adapts_segmenters_episodic_and_online() {
    let dir = tempfile::tempdir().unwrap();
    let input = five_scenes(dir.path(), "seg");
    for (name, sets, iterations, steps) in [
        ("dusa-episodic", ["tta.mode=episodic", "tta.dusa.steps=2"], 2, 10),
        ("dusa-online", ["tta.mode=online", "runtime.batch_size=2"], 1, 5),
    ] {
        let mut all = vec!["tta.method=dusa", "tta.dusa.lr=1e-3"];
        all.extend(sets);
        let o = run_bundle(dir.path(), name, input.to_str().unwrap(), &seg_bundle(), &all);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let out = dir.path().join(name);
        let (rows, evals) = adapted_rows(&out, name, iterations..=iterations * 11, "mask_after");
        assert_eq!(rows, 5, "{name}");
        assert!(
            evals.iter().any(|e| *e > iterations * 4),
            "{name}: never more than the top-4 classes: {evals:?}"
        );
        for b in committed_batches(&out, "predictions") {
            assert_eq!(column::<Float32Array>(&b, "miou_after").null_count(), 0, "{name}");
        }
        let step_rows: usize = committed_batches(&out, "steps")
            .iter()
            .map(|b| {
                assert_eq!(column::<Float32Array>(b, "miou").null_count(), 0, "{name}");
                b.num_rows()
            })
            .sum();
        assert_eq!(step_rows, steps, "{name}");
    }
}

#[test]
fn diffusion_tta_adapts_segmenters_and_depth_networks() {
    let dir = tempfile::tempdir().unwrap();
    let small = |task: &str| five_scenes(dir.path(), task);
    let knobs = [
        "tta.method=diffusion-tta",
        "tta.steps=2",
        "tta.accum=2",
        "tta.samples_per_step=4",
        "tta.lr=0.05",
    ];
    let cases = [
        (
            "seg-episodic",
            small("seg"),
            seg_bundle(),
            "tta.mode=episodic",
            "mask_after",
        ),
        (
            "seg-online",
            small("seg"),
            seg_bundle(),
            "tta.mode=online",
            "mask_after",
        ),
        (
            "depth-episodic",
            small("depth"),
            depth_bundle(),
            "tta.mode=episodic",
            "depth_after",
        ),
    ];
    for (name, input, bundle, mode, map) in cases {
        let mut sets = knobs.to_vec();
        sets.push(mode);
        let o = run_bundle(dir.path(), name, input.to_str().unwrap(), &bundle, &sets);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let out = dir.path().join(name);
        // steps x accum x samples evaluations per image.
        assert_eq!(adapted_rows(&out, name, 16..=16, map).0, 5, "{name}");
        // Two steps per image in the steps table, with no image-level class.
        let steps: Vec<i64> = committed_batches(&out, "steps")
            .iter()
            .flat_map(|b| column::<Int64Array>(b, "pred").values().to_vec())
            .collect();
        assert_eq!(steps.len(), 10, "{name}");
        assert!(steps.iter().all(|&p| p == -1), "{name}");
        // Each step row carries the label metric of the prediction that step saw. Step 0
        // of an episodic image sees the source weights: its metric is the row's `_before`.
        let metric = if map == "mask_after" { "miou" } else { "abs_rel" };
        let mut before = BTreeMap::new();
        for b in committed_batches(&out, "predictions") {
            let keys = column::<StringArray>(&b, "key");
            let m = column::<Float32Array>(&b, &format!("{metric}_before"));
            for r in 0..b.num_rows() {
                before.insert(keys.value(r).to_string(), m.value(r));
            }
        }
        let mut step_rows = 0;
        for b in committed_batches(&out, "steps") {
            let (keys, step) = (column::<StringArray>(&b, "key"), column::<Int32Array>(&b, "step"));
            let m = column::<Float32Array>(&b, metric);
            for r in 0..b.num_rows() {
                assert!(
                    m.is_valid(r) && m.value(r).is_finite(),
                    "{name}: {metric} of every step"
                );
                if mode == "tta.mode=episodic" && step.value(r) == 0 {
                    assert_eq!(m.value(r), before[keys.value(r)], "{name}: step 0 of {}", keys.value(r));
                    step_rows += 1;
                }
            }
        }
        if mode == "tta.mode=episodic" {
            assert_eq!(step_rows, 5, "{name}");
        }
    }
    // A budget reads an image-level prediction: refused for dense tasks.
    let o = run_bundle(
        dir.path(),
        "budget",
        small("seg").to_str().unwrap(),
        &seg_bundle(),
        &["tta.method=diffusion-tta", "tta.budget.skip_conf=0.9"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("a dense task has none"), "{}", text(&o));
}

/// A PNG's IHDR size set to `w x h`, its CRC fixed (a well-formed header that lies).
fn png_with_size(mut png: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn mutated_dense_labels_cost_one_label_each() {
    use rand::{Rng, SeedableRng};
    let seed = test_seed("mutated_dense_labels_cost_one_label_each");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    for (task, member, bundle) in [("seg", "seg.png", seg_bundle()), ("depth", "depth.png", depth_bundle())] {
        let src = members(&repo().join(format!("data/demo-{task}/shard-000000.tar")));
        let mut out = Vec::new();
        let mut untouched = BTreeMap::new();
        for (i, (name, label)) in src
            .iter()
            .filter(|(n, _)| n.ends_with(&format!(".{member}")))
            .enumerate()
        {
            let key = name.strip_suffix(&format!(".{member}")).unwrap();
            out.push((format!("{key}.png"), src[&format!("{key}.png")].clone()));
            let mut l = label.clone();
            let what = match i % 8 {
                0 => "untouched",
                1 => {
                    for _ in 0..rng.random_range(1..8) {
                        let at = rng.random_range(0..l.len());
                        l[at] ^= 1 << rng.random_range(0..8);
                    }
                    "bit flips"
                }
                2 => {
                    l.truncate(rng.random_range(0..l.len()));
                    "truncated"
                }
                3 => {
                    l = png_with_size(l, 65535, 65535);
                    "bomb header"
                }
                4 => {
                    l = png_with_size(l, 64, 63);
                    "off-by-one header"
                }
                5 => {
                    l = png8(64, |x, y| (x + y) as u8);
                    if task == "seg" {
                        "valid"
                    } else {
                        "8-bit depth"
                    }
                }
                6 => {
                    l = (0..rng.random_range(0..200)).map(|_| rng.random()).collect();
                    "garbage"
                }
                _ => {
                    l.extend((0..100).map(|_| rng.random::<u8>()));
                    "trailing junk"
                }
            };
            untouched.insert(key.to_string(), what);
            out.push((name.clone(), l));
        }
        let shard = dir.path().join(format!("{task}.tar"));
        write_tar(&shard, &out);
        let o = run_bundle(dir.path(), task, shard.to_str().unwrap(), &bundle, &[]);
        assert!(o.status.success(), "seed {seed}, {task}: {}", text(&o));
        let mut rows = 0;
        let map = if task == "seg" { "mask_after" } else { "depth_after" };
        let metric = if task == "seg" { "miou_after" } else { "abs_rel_after" };
        for b in committed_batches(&dir.path().join(task), "predictions") {
            let key = column::<StringArray>(&b, "key");
            let status = column::<StringArray>(&b, "status");
            let maps = column::<BinaryArray>(&b, map);
            let scored = column::<Float32Array>(&b, metric);
            for r in 0..b.num_rows() {
                rows += 1;
                let what = untouched[key.value(r)];
                let context = format!("seed {seed}, {task}, {} ({what})", key.value(r));
                // The image is always valid: every row is predicted, and scored exactly
                // when its label was read.
                assert!(maps.is_valid(r), "{context}");
                assert!(
                    ["ok", "bad_label"].contains(&status.value(r)),
                    "{context}: {}",
                    status.value(r)
                );
                assert_eq!(scored.is_valid(r), status.value(r) == "ok", "{context}");
                let expected = match what {
                    "untouched" | "trailing junk" => Some("ok"),
                    "valid" => Some("ok"),
                    "bomb header" | "off-by-one header" | "8-bit depth" => Some("bad_label"),
                    _ => None,
                };
                if let Some(e) = expected {
                    assert_eq!(status.value(r), e, "{context}");
                }
            }
        }
        assert_eq!(rows, 100, "seed {seed}, {task}: one row per sample");
    }
}
