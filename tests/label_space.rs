//! Label spaces end to end through the real binary, on the demo bundle and real demo
//! digits: with a 5-class subset every method writes positions in the subset list
//! (predictions, top-k, per-step predictions), the restriction happens before the
//! softmax, and a many-to-one label map writes dataset classes, each once in the top-k.
//! An ImageNet-R-style layout (200 wnid folders, and the same as shards) scores in its
//! own label space with `class_subset = "imagenet-r"`; segmentation bundles take either
//! key with every dense method.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::{Array, BinaryArray, Float32Array, Int64Array, ListArray, StringArray};
use common::*;

/// The kept classes: the upper half of the digits, so that the lower digits in the
/// input must still be predicted inside it. Written as their positions 0..5.
const SUBSET: [i64; 5] = [5, 6, 7, 8, 9];
/// The seed of the runs made with [`run_bundle`].
const SEED: &str = "runtime.seed=3";

/// The position of model class `c` in [`SUBSET`], if kept.
fn position(c: i64) -> Option<i64> {
    SUBSET.iter().position(|&k| k == c).map(|p| p as i64)
}

/// Every method at a small budget, with its label in the predictions table.
const METHODS: &[(&str, &str)] = &[
    ("source", "[tta]\nmethod = \"source\"\n"),
    ("tent", "[tta]\nmethod = \"tent\"\n"),
    (
        "diffusion-classifier",
        "[tta]\nmethod = \"diffusion-classifier\"\n[tta.diffusion_classifier]\nsamples = 8\n",
    ),
    (
        "diffusion-tta",
        "[tta]\nmethod = \"diffusion-tta\"\nsteps = 2\naccum = 1\nsamples_per_step = 4\ntopk = 3\n",
    ),
    (
        "diffusion-tta-online",
        "[tta]\nmethod = \"diffusion-tta\"\nmode = \"online\"\nsteps = 1\naccum = 1\nsamples_per_step = 4\n",
    ),
    (
        "dusa",
        "[tta]\nmethod = \"dusa\"\n[tta.dusa]\ntopk = 2\nrandom = 1\nsteps = 2\n",
    ),
    (
        "dusa-online",
        "[tta]\nmethod = \"dusa\"\nmode = \"online\"\n[tta.dusa]\ntopk = 2\nrandom = 1\n",
    ),
];

/// 10 demo test digits, one of each class.
fn input(dir: &Path) -> String {
    let mut samples = demo_samples();
    samples.sort_by_key(|s| s.label);
    let mut one_each: Vec<DemoSample> = Vec::new();
    for s in samples {
        if one_each.last().is_none_or(|l| l.label != s.label) {
            one_each.push(s);
        }
    }
    assert_eq!(one_each.len(), 10);
    let path = dir.join("in.tar");
    write_demo_shard(&path, &one_each);
    path.display().to_string()
}

/// One predictions row's class columns.
#[derive(Debug)]
struct Classes {
    label: i64,
    status: String,
    pred_before: i64,
    pred_after: i64,
    conf_after: f32,
    topk_after: Vec<i64>,
    topk_probs_after: Vec<f32>,
}

fn run(dir: &Path, input: &str, name: &str, tta: &str, sets: &[&str]) -> std::process::Output {
    let sub = dir.join(format!("p-{name}"));
    std::fs::create_dir_all(&sub).unwrap();
    let out = dir.join(name).display().to_string();
    let p = write_pipeline(&sub, input, &out, &format!("seed = 3\n{tta}"));
    let mut args = vec!["run", p.to_str().unwrap(), "--no-progress"];
    for s in sets {
        args.extend(["--set", s]);
    }
    run_dtta(&args)
}

/// Runs the source method over `input` twice, into `DIR/full` and, with a label map
/// file holding `map`, into `DIR/mapped`; both must succeed. The mapped run's output.
fn source_full_and_mapped(dir: &Path, input: &str, map: &str) -> std::process::Output {
    let path = dir.join("map.txt");
    std::fs::write(&path, map).unwrap();
    let source = METHODS[0].1;
    let o = run(dir, input, "full", source, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let set = format!("model.label_map={}", path.display());
    let o = run(dir, input, "mapped", source, &[&set]);
    assert!(o.status.success(), "{}", text(&o));
    o
}

fn rows(out: &Path) -> BTreeMap<String, Classes> {
    let mut map = BTreeMap::new();
    for b in committed_batches(out, "predictions") {
        let key = column::<StringArray>(&b, "key");
        let status = column::<StringArray>(&b, "status");
        let label = column::<Int64Array>(&b, "label");
        let (before, after) = (
            column::<Int64Array>(&b, "pred_before"),
            column::<Int64Array>(&b, "pred_after"),
        );
        let conf = column::<Float32Array>(&b, "conf_after");
        let topk = column::<ListArray>(&b, "topk_after");
        let topk_probs = column::<ListArray>(&b, "topk_probs_after");
        for r in 0..b.num_rows() {
            let top = topk.value(r);
            let top = top.as_any().downcast_ref::<Int64Array>().unwrap();
            let probs = topk_probs.value(r);
            let probs = probs.as_any().downcast_ref::<Float32Array>().unwrap();
            map.insert(
                key.value(r).to_string(),
                Classes {
                    label: label.value(r),
                    status: status.value(r).to_string(),
                    pred_before: before.value(r),
                    pred_after: after.value(r),
                    conf_after: conf.value(r),
                    topk_after: top.values().to_vec(),
                    topk_probs_after: probs.values().to_vec(),
                },
            );
        }
    }
    map
}

/// The per-step predictions of the steps table (empty for methods without steps).
fn step_preds(out: &Path) -> Vec<i64> {
    committed_batches(out, "steps")
        .iter()
        .flat_map(|b| column::<Int64Array>(b, "pred").values().to_vec())
        .collect()
}

#[test]
fn every_method_predicts_inside_a_five_class_subset() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    let subset = format!("model.class_subset={SUBSET:?}");
    for (name, tta) in METHODS {
        let o = run(dir.path(), &input, name, tta, &[&subset]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(
            text(&o).contains("label space the inline list: 5 of 10 classes"),
            "{name}: {}",
            text(&o)
        );
        let out = dir.path().join(name);
        let rows = rows(&out);
        assert_eq!(rows.len(), 10, "{name}");
        for (key, r) in &rows {
            assert_eq!(r.status, "ok", "{name} {key}");
            let classes = [r.pred_before, r.pred_after]
                .into_iter()
                .chain(r.topk_after.iter().copied());
            for c in classes {
                assert!(
                    (0..SUBSET.len() as i64).contains(&c),
                    "{name} {key}: class {c} is not a position in {SUBSET:?}: {r:?}"
                );
            }
            assert!(!r.topk_after.is_empty(), "{name} {key}");
        }
        let steps = step_preds(&out);
        if name.starts_with("diffusion-tta") || name.starts_with("dusa") {
            assert!(!steps.is_empty(), "{name}: a steps table");
        }
        for c in steps {
            assert!(
                (0..SUBSET.len() as i64).contains(&c),
                "{name}: step prediction {c} is not a position in {SUBSET:?}"
            );
        }
    }
}

#[test]
fn the_subset_restricts_the_logits_before_the_softmax() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    let source = METHODS[0].1;
    let o = run(dir.path(), &input, "full", source, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        dir.path(),
        &input,
        "sub",
        source,
        &[&format!("model.class_subset={SUBSET:?}")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let full = rows(&dir.path().join("full"));
    let sub = rows(&dir.path().join("sub"));
    let mut digits_inside = 0;
    for (key, f) in &full {
        let s = &sub[key];
        if let Some(p) = position(f.pred_after) {
            // The argmax is kept (written as its position), and its probability grows:
            // the softmax runs over fewer classes.
            digits_inside += 1;
            assert_eq!(s.pred_after, p, "{key}");
            assert!(
                s.conf_after >= f.conf_after,
                "{key}: {} < {}",
                s.conf_after,
                f.conf_after
            );
        }
        // The subset's top-k is the full top-k with the other classes left out.
        let kept: Vec<i64> = f.topk_after.iter().filter_map(|&c| position(c)).collect();
        assert_eq!(&s.topk_after[..kept.len()], &kept[..], "{key}");
    }
    assert!(digits_inside >= 4, "the source model gets most of 5..9 right: {full:?}");
}

#[test]
fn a_label_map_writes_dataset_classes() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    // Dataset classes: 0 = small digits {0, 1, 2}, 1 = large digits {7, 8, 9}; 3..6 unmapped.
    let o = source_full_and_mapped(dir.path(), &input, "# small, large\n0 1 2 # small\n7 8 9 # large\n");
    assert!(
        text(&o).contains("6 of 10 model classes onto 2 dataset classes"),
        "{}",
        text(&o)
    );
    let full = rows(&dir.path().join("full"));
    for (key, m) in rows(&dir.path().join("mapped")) {
        assert!(
            [0, 1].contains(&m.pred_after) && [0, 1].contains(&m.pred_before),
            "{key}: {m:?}"
        );
        let f = &full[&key];
        match f.pred_after {
            0..=2 => assert_eq!(m.pred_after, 0, "{key}"),
            7..=9 => assert_eq!(m.pred_after, 1, "{key}"),
            _ => {}
        }
        // The label column is the dataset's, untouched.
        assert_eq!(m.label, f.label, "{key}");
    }
}

#[test]
fn label_spaces_that_do_not_fit_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    let source = METHODS[0].1;
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "range",
            &["model.class_subset=[3, 10]"],
            "model.class_subset: the inline list: class 10 is out of range (the classifier has 10 classes, 0 to 9)",
        ),
        (
            "unsorted",
            &["model.class_subset=[7, 2, 5]"],
            "model.class_subset: the inline list: class 2 is listed after class 7; list the classes in ascending order",
        ),
        (
            "shipped",
            &["model.class_subset=imagenet-r"],
            "is out of range (the classifier has 10 classes, 0 to 9)",
        ),
        (
            "both",
            &["model.class_subset=[1]", "model.label_map=objectnet"],
            "cannot be combined with model.class_subset",
        ),
        (
            "dusa",
            &["model.class_subset=[1, 2]"],
            "candidates must be between 1 and the 2 classes",
        ),
    ];
    for (name, sets, message) in cases {
        let tta = if *name == "dusa" { METHODS[5].1 } else { source };
        let o = run(dir.path(), &input, name, tta, sets);
        assert!(!o.status.success(), "{name}: {}", text(&o));
        assert!(
            text(&o).contains(message),
            "{name}: expected {message:?} in {}",
            text(&o)
        );
        if *name != "dusa" {
            assert_eq!(o.status.code(), Some(2), "{name}: {}", text(&o));
            assert!(
                committed_batches(&dir.path().join(name), "predictions").is_empty(),
                "{name}"
            );
        }
    }
}

#[test]
fn a_label_map_top_k_lists_each_dataset_class_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    // Every digit mapped (even, odd): the restricted logits are the full ones, so the
    // mapped top-k is the full top-k with each parity at its best digit.
    source_full_and_mapped(dir.path(), &input, "0 2 4 6 8 # even\n1 3 5 7 9 # odd\n");
    let full = rows(&dir.path().join("full"));
    let mapped = rows(&dir.path().join("mapped"));
    assert_eq!(mapped.len(), 10);
    for (key, m) in &mapped {
        let f = &full[key];
        // Five of ten digits: some parity repeats in every full top-5.
        assert_eq!(f.topk_after.len(), 5, "{key}");
        let (mut classes, mut probs) = (Vec::new(), Vec::new());
        for (&c, &p) in f.topk_after.iter().zip(&f.topk_probs_after) {
            if !classes.contains(&(c % 2)) {
                classes.push(c % 2);
                probs.push(p);
            }
        }
        assert_eq!(m.topk_after, classes, "{key}: {m:?} against {f:?}");
        assert_eq!(m.topk_probs_after.len(), m.topk_after.len(), "{key}");
        for (a, b) in m.topk_probs_after.iter().zip(&probs) {
            assert!((a - b).abs() < 1e-6, "{key}: {m:?} against {f:?}");
        }
        assert_eq!(m.topk_after[0], m.pred_after, "{key}");
        assert_eq!(m.topk_probs_after[0], m.conf_after, "{key}");
    }
}

/// Writes a classifier-only 1,000-class bundle into `argv[1]`. Its logits read an image
/// whose pixels all have the value `j` as ImageNet class `kept[j]` (`argv[2]`, the
/// ascending ImageNet-R classes), best among the kept classes, while class 0 (not in
/// ImageNet-R) is the best of all 1,000 for every image.
const CODED_CLASSIFIER: &str = r#"
import sys, torch
from torch import nn
out, kept = sys.argv[1], [int(k) for k in sys.argv[2].split(",")]

class Coded(nn.Module):
    def __init__(self):
        super().__init__()
        code = torch.full((1000,), 1.0e4)
        code[torch.tensor(kept)] = torch.arange(len(kept), dtype=torch.float32)
        fixed = torch.zeros(1000, dtype=torch.bool)
        fixed[0] = True
        self.register_buffer("code", code)
        self.register_buffer("fixed", fixed)

    def forward(self, x):
        # The pixel value, back from the bundle's normalisation (mean 0.5, std 0.25).
        v = (x.mean(dim=(1, 2, 3)) * 0.25 + 0.5) * 255.0
        scores = -(v[:, None] - self.code[None, :]).abs()
        return torch.where(self.fixed[None, :], torch.full_like(scores, 10.0), scores)

torch.jit.script(Coded().eval()).save(f"{out}/classifier.pt")
with open(f"{out}/bundle.toml", "w") as f:
    f.write('name = "coded-1k"\n[classifier]\nfile = "classifier.pt"\nnum_classes = 1000\n'
            '[classifier.preprocess]\nchannels = 3\nresize = 8\ncrop = 8\n'
            'mean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n')
"#;

/// The classes of a shipped list, in file order, read from its file.
fn shipped_list(name: &str) -> Vec<i64> {
    let text = std::fs::read_to_string(repo().join(format!("configs/label_spaces/{name}.txt"))).unwrap();
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().unwrap())
        .collect()
}

/// An 8x8 PNG whose every pixel (all channels) is `value`.
fn flat_png(value: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([value; 3]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    png.into_inner()
}

/// A wnid-like folder name for ImageNet class `index`. ImageNet numbers its classes in
/// sorted wnid order, so these names sort as the indices do (uneven gaps, as real wnids).
fn wnid(index: i64) -> String {
    format!("n{:08}", 1_440_000 + index * 2_000 + (index * 37) % 1_000)
}

/// ImageNet-R as published: 200 wnid folders, numbered 0..199 in sorted order by the
/// folder reader (as ImageFolder and the dataset's eval.py number them), and the same
/// images as a WebDataset shard labelled 0..199. A 1,000-class classifier with
/// `class_subset = "imagenet-r"` that predicts each folder's ImageNet class scores 100 %
/// top-1 on both, with no remapping; without the subset, 0.5 % (class 0 everywhere).
#[test]
fn imagenet_r_laid_out_as_published_scores_in_its_own_label_space() {
    let dir = tempfile::tempdir().unwrap();
    let kept = shipped_list("imagenet-r");
    assert_eq!(kept.len(), 200);
    assert!(kept.windows(2).all(|w| w[0] < w[1]), "the shipped list is ascending");
    assert!(kept[0] > 0, "class 0 is outside ImageNet-R");
    let bundle = dir.path().join("coded-1k");
    std::fs::create_dir_all(&bundle).unwrap();
    let joined: Vec<String> = kept.iter().map(|k| k.to_string()).collect();
    // From a file: torch.jit.script reads the module's source.
    let script = dir.path().join("coded.py");
    std::fs::write(&script, CODED_CLASSIFIER).unwrap();
    let o = std::process::Command::new(repo().join(".venv/bin/python"))
        .args([script.to_str().unwrap(), bundle.to_str().unwrap(), &joined.join(",")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // Folder j (in sorted order) holds ImageNet class kept[j] and an image of value j.
    let root = dir.path().join("imagenet-r");
    let mut members = Vec::new();
    for (j, &class) in kept.iter().enumerate() {
        let folder = root.join(wnid(class));
        std::fs::create_dir_all(&folder).unwrap();
        let png = flat_png(j as u8);
        std::fs::write(folder.join(format!("art_{j}.png")), &png).unwrap();
        members.push((format!("{}_art_{j}.png", wnid(class)), png));
        members.push((format!("{}_art_{j}.cls", wnid(class)), j.to_string().into_bytes()));
    }
    let shard = dir.path().join("imagenet-r.tar");
    write_tar(&shard, &members);
    let folder_url = format!("{}/", root.display());
    let subset = "model.class_subset=imagenet-r";
    let cases = [
        ("folder", folder_url.as_str(), "input.format=folder", Some(subset)),
        (
            "shards",
            shard.to_str().unwrap(),
            "input.format=webdataset",
            Some(subset),
        ),
        ("folder-full", folder_url.as_str(), "input.format=folder", None),
    ];
    for (name, input, format, subset) in cases {
        let mut sets = vec![format, "input.folder.shard_size=64", SEED];
        sets.extend(subset);
        let o = run_bundle(dir.path(), name, input, &bundle, &sets);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let rows = committed_rows(&dir.path().join(name));
        assert_eq!(rows.len(), 200, "{name}");
        for r in &rows {
            let j: i64 = r.key.rsplit('_').next().unwrap().parse().unwrap();
            assert_eq!(r.label, Some(j), "{name} {}: the sorted-folder index", r.key);
            let expected = if subset.is_some() { j } else { 0 };
            assert_eq!(r.pred_after, Some(expected), "{name} {}", r.key);
        }
        // Without the subset only folder 0 (label 0) matches the predicted class 0.
        let accuracy = if subset.is_some() { "100.00%" } else { "0.50%" };
        let line = format!("accuracy: {accuracy} top-1 before, {accuracy} after (source) on 200 labelled images");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(&line),
            "{name}: expected {line:?} in {}",
            text(&o)
        );
        if subset.is_some() {
            assert!(
                text(&o).contains("label space imagenet-r: 200 of 1000 classes"),
                "{name}"
            );
        }
    }
}

/// The demo segmenter's classes: background, digits 0..9 (classes 1..=10).
fn seg_bundle() -> PathBuf {
    repo().join("configs/bundles/demo-seg")
}

/// Kept for the segmentation subset (written as positions 0..6).
const SEG_SUBSET: [i64; 6] = [0, 2, 4, 6, 8, 10];

/// The segmentation label map: background; digits 0-4; digits 5-9.
const SEG_MAP: &str = "0 # background\n1 2 3 4 5 # small digits\n6 7 8 9 10 # large digits\n";

fn seg_map_class(c: u8) -> u8 {
    match c {
        0 => 0,
        1..=5 => 1,
        _ => 2,
    }
}

/// Every dense method, at a small budget.
const DENSE_METHODS: &[(&str, &[&str])] = &[
    ("source", &["tta.method=source"]),
    ("tent", &["tta.method=tent"]),
    (
        "diffusion-tta",
        &[
            "tta.method=diffusion-tta",
            "tta.steps=2",
            "tta.accum=1",
            "tta.samples_per_step=2",
        ],
    ),
    (
        "dusa",
        &[
            "tta.method=dusa",
            "tta.dusa.topk=2",
            "tta.dusa.random=1",
            "tta.dusa.steps=2",
        ],
    ),
];

/// The first `n` scenes of the demo segmentation test shard 0, as `DIR/seg.tar`.
fn seg_scenes(dir: &Path, n: usize) -> PathBuf {
    let src = repo().join("data/demo-seg/shard-000000.tar");
    let mut all: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(src).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        all.insert(name, data);
    }
    let keys: Vec<String> = all
        .keys()
        .filter_map(|k| k.strip_suffix(".png").filter(|k| !k.contains('.')))
        .map(String::from)
        .take(n)
        .collect();
    let picked: Vec<(String, Vec<u8>)> = all
        .into_iter()
        .filter(|(name, _)| keys.iter().any(|k| name.starts_with(&format!("{k}."))))
        .collect();
    let path = dir.join("seg.tar");
    write_tar(&path, &picked);
    path
}

fn gray8(png: &[u8]) -> Vec<u8> {
    match image::load_from_memory(png).unwrap() {
        image::DynamicImage::ImageLuma8(i) => i.into_raw(),
        other => panic!("expected an 8-bit gray PNG, got {:?}", other.color()),
    }
}

/// Key -> (mask_before, mask_after) of every row (all must be `ok`).
fn masks(out: &Path) -> BTreeMap<String, (Vec<u8>, Vec<u8>)> {
    let mut map = BTreeMap::new();
    for b in committed_batches(out, "predictions") {
        let key = column::<StringArray>(&b, "key");
        let status = column::<StringArray>(&b, "status");
        let before = column::<BinaryArray>(&b, "mask_before");
        let after = column::<BinaryArray>(&b, "mask_after");
        for r in 0..b.num_rows() {
            assert_eq!(status.value(r), "ok", "{}", key.value(r));
            map.insert(
                key.value(r).to_string(),
                (gray8(before.value(r)), gray8(after.value(r))),
            );
        }
    }
    map
}

/// A segmentation bundle with `class_subset` or `label_map` runs with every dense method:
/// masks in the label space's classes (subset positions, dataset classes), per pixel as
/// the full-space masks map for source, and steps with no image-level class (-1).
#[test]
fn segmentation_takes_a_subset_or_a_label_map_with_every_dense_method() {
    let dir = tempfile::tempdir().unwrap();
    let input = seg_scenes(dir.path(), 4);
    let input = input.to_str().unwrap();
    let o = run_bundle(dir.path(), "full", input, &seg_bundle(), &["tta.method=source", SEED]);
    assert!(o.status.success(), "{}", text(&o));
    let full = masks(&dir.path().join("full"));
    assert_eq!(full.len(), 4);
    let map = dir.path().join("seg-map.txt");
    std::fs::write(&map, SEG_MAP).unwrap();
    let subset_set = format!("model.class_subset={SEG_SUBSET:?}");
    let map_set = format!("model.label_map={}", map.display());
    for (space, set, classes) in [("subset", &subset_set, 6u8), ("map", &map_set, 3u8)] {
        for (method, sets) in DENSE_METHODS {
            let name = format!("{space}-{method}");
            let mut all = sets.to_vec();
            all.extend([set.as_str(), SEED]);
            let o = run_bundle(dir.path(), &name, input, &seg_bundle(), &all);
            assert!(o.status.success(), "{name}: {}", text(&o));
            let out = dir.path().join(&name);
            let masks = masks(&out);
            assert_eq!(masks.len(), 4, "{name}");
            let mut checked = 0;
            for (key, (before, after)) in &masks {
                for &c in before.iter().chain(after) {
                    assert!(
                        c < classes,
                        "{name} {key}: class {c} is outside the label space's {classes}"
                    );
                }
                if *method != "source" {
                    continue;
                }
                assert_eq!(before, after, "{name} {key}");
                for (&m, &f) in after.iter().zip(&full[key].1) {
                    match space {
                        "subset" => {
                            // Where the full-space argmax is kept, it stays the argmax.
                            if let Some(p) = SEG_SUBSET.iter().position(|&k| k == f as i64) {
                                assert_eq!(m as usize, p, "{name} {key}");
                                checked += (p > 0) as usize;
                            }
                        }
                        _ => {
                            // Every class mapped: the restricted logits are the full ones.
                            assert_eq!(m, seg_map_class(f), "{name} {key}");
                            checked += (f > 0) as usize;
                        }
                    }
                }
            }
            if *method == "source" {
                assert!(checked > 0, "{name}: no foreground pixel was compared");
            }
            let steps = step_preds(&out);
            if ["diffusion-tta", "dusa"].contains(method) {
                assert!(!steps.is_empty(), "{name}: a steps table");
            }
            assert!(steps.iter().all(|&c| c == -1), "{name}: {steps:?}");
        }
    }
}
