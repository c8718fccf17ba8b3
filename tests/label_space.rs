//! Label spaces end to end through the real binary, on the demo bundle and real demo
//! digits: with a 5-class subset no method ever writes a class outside it (predictions,
//! top-k, per-step predictions), the restriction happens before the softmax, and a
//! many-to-one label map writes dataset classes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use arrow_array::{Array, Float32Array, Int64Array, ListArray, StringArray};
use common::*;

/// The kept classes: the upper half of the digits, so that the lower digits in the
/// input must still be predicted inside it.
const SUBSET: [i64; 5] = [5, 6, 7, 8, 9];

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
        for r in 0..b.num_rows() {
            let top = topk.value(r);
            let top = top.as_any().downcast_ref::<Int64Array>().unwrap();
            map.insert(
                key.value(r).to_string(),
                Classes {
                    label: label.value(r),
                    status: status.value(r).to_string(),
                    pred_before: before.value(r),
                    pred_after: after.value(r),
                    conf_after: conf.value(r),
                    topk_after: top.values().to_vec(),
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
                    SUBSET.contains(&c),
                    "{name} {key}: class {c} is outside {SUBSET:?}: {r:?}"
                );
            }
            assert!(!r.topk_after.is_empty(), "{name} {key}");
        }
        let steps = step_preds(&out);
        if name.starts_with("diffusion-tta") || name.starts_with("dusa") {
            assert!(!steps.is_empty(), "{name}: a steps table");
        }
        for c in steps {
            assert!(SUBSET.contains(&c), "{name}: step prediction {c} is outside {SUBSET:?}");
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
        if SUBSET.contains(&f.pred_after) {
            // The argmax is kept, and its probability grows: the softmax runs over fewer classes.
            digits_inside += 1;
            assert_eq!(s.pred_after, f.pred_after, "{key}");
            assert!(
                s.conf_after >= f.conf_after,
                "{key}: {} < {}",
                s.conf_after,
                f.conf_after
            );
        }
        // The subset's top-k is the full top-k with the other classes left out.
        let kept: Vec<i64> = f.topk_after.iter().copied().filter(|c| SUBSET.contains(c)).collect();
        assert_eq!(&s.topk_after[..kept.len()], &kept[..], "{key}");
    }
    assert!(digits_inside >= 4, "the source model gets most of 5..9 right: {full:?}");
}

#[test]
fn a_label_map_writes_dataset_classes() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    // Dataset classes: 0 = small digits {0, 1, 2}, 1 = large digits {7, 8, 9}; 3..6 unmapped.
    let map = dir.path().join("sizes.txt");
    std::fs::write(&map, "# small, large\n0 1 2 # small\n7 8 9 # large\n").unwrap();
    let source = METHODS[0].1;
    let o = run(dir.path(), &input, "full", source, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let set = format!("model.label_map={}", map.display());
    let o = run(dir.path(), &input, "mapped", source, &[&set]);
    assert!(o.status.success(), "{}", text(&o));
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
