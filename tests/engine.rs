//! The Diffusion-TTA engine against a Python reference of the published loop, on tiny
//! real TorchScript models, plus the engine's invariants (what adapts, what resets).

mod common;

use std::path::{Path, PathBuf};

use common::reference::*;
use dtta::model::Bundle;
use dtta::rng::Rng;
use dtta::tta::methods::{DiffusionTta, Dusa, ReplayDraws};
use dtta::tta::schedule::{normal_tensor, uniform_tensor, ReplayNoise};
use dtta::tta::{Adapt, DusaConfig, Loss, MethodName, Mode, OptimizerKind, TtaConfig};
use tch::{Device, Tensor};

fn tiny_bundle(dir: &Path, text_embeddings: bool) -> PathBuf {
    let flags: &[&str] = if text_embeddings { &["--text-embeddings"] } else { &[] };
    make_tiny_bundle(dir, if text_embeddings { "tiny-text" } else { "tiny" }, flags)
}

fn engine(bundle: &Bundle, cfg: &TtaConfig) -> DiffusionTta {
    let classifier = bundle.load_classifier(Device::Cpu).unwrap();
    let diffusion = bundle.load_diffusion(Device::Cpu).unwrap();
    DiffusionTta::new(classifier, diffusion, cfg, 0).unwrap()
}

fn knobs(steps: usize, accum: usize, samples: usize) -> TtaConfig {
    TtaConfig {
        steps,
        accum,
        samples_per_step: samples,
        lr: 0.05,
        ..TtaConfig::default()
    }
}

/// Runs the reference with `ref_args`, replays its draws through the engine configured
/// by `cfg`, and compares per-iteration losses and final adapted parameters.
fn check_parity(bundle_dir: &Path, cfg: TtaConfig, ref_args: &[&str]) {
    let reference = run_reference(bundle_dir, ref_args);

    let bundle = load(bundle_dir);
    // Online mode: the adapted weights stay in place after the image, to be compared;
    // `accum` separate iterations, as the reference runs them.
    let cfg = TtaConfig {
        mode: Mode::Online,
        fuse_accum: false,
        ..cfg
    };
    let mut engine = engine(&bundle, &cfg).with_noise(Box::new(ReplayNoise {
        t: reference["t"].shallow_clone(),
        eps: reference["eps"].shallow_clone(),
    }));
    let adapted = engine
        .adapt("k", &floats(&reference["x_cls"]), &floats(&reference["x_gen"]))
        .unwrap();
    assert!(adapted.diverged.is_none());
    let losses = floats(&reference["losses"]);
    assert_eq!(adapted.iteration_losses.len(), losses.len());
    let rel = max_rel(&adapted.iteration_losses, &losses);
    assert!(
        rel < 1e-4,
        "per-iteration losses differ by {rel:e}: {:?} vs {losses:?}",
        adapted.iteration_losses
    );

    let params = engine.adapted_parameters();
    let expected: Vec<&String> = reference.keys().filter(|k| k.starts_with("param.")).collect();
    assert_eq!(
        params.names.len(),
        expected.len(),
        "same adapted set: {:?}",
        params.names
    );
    for (name, t) in params.names.iter().zip(&params.tensors) {
        let r = &reference[&format!("param.{name}")];
        let rel = max_rel(&floats(t), &floats(r));
        assert!(rel < 1e-4, "{name} differs by {rel:e} relative");
    }
}

/// Runs the reference's DUSA loop with `ref_args`, replays its eps and Gumbel draws
/// through [`Dusa`] configured by `cfg`, and compares candidates, per-iteration losses
/// and the final adapted parameters (the weights are not reset in between).
fn check_dusa_parity(bundle_dir: &Path, cfg: TtaConfig, batch: usize, batches: usize, ref_args: &[&str]) {
    let reference = run_reference(bundle_dir, &[&["--method", "dusa"], ref_args].concat());
    let bundle = load(bundle_dir);
    let classifier = bundle.load_classifier(Device::Cpu).unwrap();
    let diffusion = bundle.load_diffusion(Device::Cpu).unwrap();
    let mut engine = Dusa::new(classifier, diffusion, &cfg, 0, batch)
        .unwrap()
        .with_draws(Box::new(ReplayDraws {
            eps: reference["eps"].shallow_clone(),
            u: reference["u"].shallow_clone(),
            next: 0,
        }));
    let x_cls = &reference["x_cls"];
    let x_gen = &reference["x_gen"];
    let image = |t: &Tensor, i: i64| floats(&t.get(i));
    let (losses, candidates): (Vec<f32>, Vec<Vec<i64>>) = if cfg.mode == Mode::Episodic {
        let r = engine.adapt_image("k", &image(x_cls, 0), &image(x_gen, 0)).unwrap();
        assert!(r.image.diverged.is_none());
        assert_eq!(
            r.image.denoiser_evals as usize,
            r.candidates.iter().map(Vec::len).sum::<usize>(),
            "one denoiser pass per candidate"
        );
        (r.image.iteration_losses, r.candidates)
    } else {
        let mut losses = Vec::new();
        let mut candidates = Vec::new();
        for j in 0..batches {
            let idx: Vec<i64> = (j * batch..(j + 1) * batch).map(|i| i as i64).collect();
            let xs: Vec<Vec<f32>> = idx.iter().map(|i| image(x_cls, *i)).collect();
            let gs: Vec<Vec<f32>> = idx.iter().map(|i| image(x_gen, *i)).collect();
            let keys: Vec<String> = idx.iter().map(|i| format!("k{i}")).collect();
            let r = engine
                .adapt_batch(
                    &keys.iter().map(String::as_str).collect::<Vec<_>>(),
                    &xs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                    &gs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                )
                .unwrap();
            assert!(r.diverged.is_none());
            assert_eq!(r.stepped, (j + 1) % cfg.dusa.accum == 0, "batch {j}");
            let evals: Vec<u64> = r.candidates.iter().map(|c| c.len() as u64).collect();
            assert_eq!(r.denoiser_evals, evals);
            losses.push(r.loss);
            candidates.extend(r.candidates);
        }
        (losses, candidates)
    };
    let expected: Vec<i64> = Vec::try_from(reference["candidates"].flatten(0, -1)).unwrap();
    assert_eq!(candidates.concat(), expected, "same candidates");
    let counts: Vec<i64> = Vec::try_from(&reference["candidate_counts"]).unwrap();
    assert_eq!(
        candidates.iter().map(|c| c.len() as i64).collect::<Vec<_>>(),
        counts,
        "same candidate counts"
    );
    let ref_losses = floats(&reference["losses"]);
    let rel = max_rel(&losses, &ref_losses);
    assert!(rel < 1e-4, "losses differ by {rel:e}: {losses:?} vs {ref_losses:?}");
    let params = engine.adapted_parameters();
    let expected: Vec<&String> = reference.keys().filter(|k| k.starts_with("param.")).collect();
    assert_eq!(
        params.names.len(),
        expected.len(),
        "same adapted set: {:?}",
        params.names
    );
    let mut moved = false;
    for (name, t) in params.names.iter().zip(&params.tensors) {
        let r = &reference[&format!("param.{name}")];
        let rel = max_rel(&floats(t), &floats(r));
        assert!(rel < 1e-4, "{name} differs by {rel:e} relative");
        moved |= !t.equal(&load_param(&bundle, name));
    }
    assert!(moved, "the parity run adapted nothing");
}

/// A parameter's value as the bundle stores it (`classifier.X` or `denoiser.X`).
fn load_param(bundle: &Bundle, name: &str) -> Tensor {
    let (module, rest) = name.split_once('.').unwrap();
    let all = if module == "classifier" {
        bundle.load_classifier(Device::Cpu).unwrap().named_parameters().unwrap()
    } else {
        bundle.load_diffusion(Device::Cpu).unwrap().named_parameters().unwrap()
    };
    all.into_iter().find(|(n, _)| n == rest).unwrap().1.detach().copy()
}

fn dusa_cfg(mode: Mode, steps: usize, accum: usize, adapt: Adapt) -> TtaConfig {
    TtaConfig {
        method: MethodName::Dusa,
        mode,
        adapt,
        dusa: DusaConfig {
            timestep: 100,
            topk: 2,
            random: 1,
            lr: 1e-3,
            steps,
            accum,
            ..DusaConfig::default()
        },
        ..TtaConfig::default()
    }
}

#[test]
fn dusa_matches_the_reference_episodic_steps_and_online_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tiny_bundle(tmp.path(), false);
    // One image, 3 Adam steps: the later losses see the updated weights.
    check_dusa_parity(
        &b,
        dusa_cfg(Mode::Episodic, 3, 1, Adapt::ClassifierDiffusion),
        1,
        1,
        &["--mode", "episodic", "--steps", "3", "--accum", "1", "--lr", "1e-3"],
    );
    // 4 batches of 3 images, a step every 2 batches; classifier only, text embeddings.
    let t = tiny_bundle(tmp.path(), true);
    // This one leaves the head out (tta.dusa.adapt_head = false).
    let mut no_head = dusa_cfg(Mode::Online, 1, 2, Adapt::Classifier);
    no_head.dusa.adapt_head = false;
    check_dusa_parity(
        &t,
        no_head,
        3,
        4,
        &[
            "--no-adapt-head",
            "--mode",
            "online",
            "--batch",
            "3",
            "--batches",
            "4",
            "--accum",
            "2",
            "--lr",
            "1e-3",
            "--adapt",
            "classifier",
        ],
    );
}

#[test]
fn matches_the_reference_loop_sgd_classifier_and_diffusion() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tiny_bundle(tmp.path(), false);
    check_parity(
        &b,
        knobs(3, 2, 4),
        &["--steps", "3", "--accum", "2", "--samples", "4", "--lr", "0.05"],
    );
}

#[test]
fn matches_the_reference_loop_adamw_l1_topk_text_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tiny_bundle(tmp.path(), true);
    let cfg = TtaConfig {
        optimizer: OptimizerKind::Adamw,
        lr: 0.01,
        weight_decay: 0.01,
        loss: Loss::L1,
        adapt: Adapt::Classifier,
        adapt_topk: 2,
        ..knobs(2, 3, 5)
    };
    check_parity(
        &b,
        cfg,
        &[
            "--steps",
            "2",
            "--accum",
            "3",
            "--samples",
            "5",
            "--lr",
            "0.01",
            "--weight-decay",
            "0.01",
            "--optimizer",
            "adamw",
            "--loss",
            "l1",
            "--adapt",
            "classifier",
            "--adapt-topk",
            "2",
        ],
    );
}

/// DUSA's per-pixel form for a segmenter, as the authors build it: candidates the union
/// of every pixel's top-k (top-1s always kept, a cap on the rest), a plain per-pixel
/// softmax resampled from the 6x6 output to the 4x4 latent; episodic (2 Adam steps,
/// whole classifier) and online (2 batches of 2 whose images have their own candidate
/// counts, padded in one denoiser batch; a cap of 3 of the 4 classes).
#[test]
fn dusa_for_a_segmenter_matches_the_reference_per_pixel_mixture() {
    let tmp = tempfile::tempdir().unwrap();
    let b = make_tiny_bundle(tmp.path(), "segmentation", &["--task", "segmentation"]);
    check_dusa_parity(
        &b,
        dusa_cfg(Mode::Episodic, 2, 1, Adapt::ClassifierDiffusion),
        1,
        1,
        &["--mode", "episodic", "--steps", "2", "--accum", "1", "--lr", "1e-3"],
    );
    let mut capped = dusa_cfg(Mode::Online, 1, 1, Adapt::Norm);
    capped.dusa.max_dense_candidates = 3;
    check_dusa_parity(
        &b,
        capped,
        2,
        2,
        &[
            "--max-dense-candidates",
            "3",
            "--mode",
            "online",
            "--batch",
            "2",
            "--batches",
            "2",
            "--accum",
            "1",
            "--lr",
            "1e-3",
            "--adapt",
            "norm",
        ],
    );
}

/// Concat conditioning (issue 12): a segmenter's per-pixel class-embedding mixture and a
/// depth network's normalised map, both resampled from a 6x6 output to the 4x4 latent, so
/// the bilinear path is compared, not skipped.
#[test]
fn dense_concat_conditioning_matches_the_reference_for_a_segmenter_and_a_depth_network() {
    let tmp = tempfile::tempdir().unwrap();
    for task in ["segmentation", "depth"] {
        let b = make_tiny_bundle(tmp.path(), task, &["--task", task]);
        assert_eq!(load(&b).spec.task.as_str(), task);
        check_parity(
            &b,
            knobs(3, 2, 4),
            &["--steps", "3", "--accum", "2", "--samples", "4", "--lr", "0.05"],
        );
        let cfg = TtaConfig {
            optimizer: OptimizerKind::Adamw,
            lr: 0.01,
            adapt: Adapt::Norm,
            ..knobs(2, 1, 3)
        };
        let args = ["--steps", "2", "--accum", "1", "--samples", "3", "--lr", "0.01"];
        check_parity(
            &b,
            cfg,
            &[&args[..], &["--optimizer", "adamw", "--adapt", "norm"]].concat(),
        );
    }
}

#[test]
fn fused_steps_give_the_gradient_of_separate_iterations() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = load(&tiny_bundle(tmp.path(), false));
    // Fixed draws for 3 steps x 4 iterations x 3 pairs, replayed by both engines.
    let mut rng = Rng::new(5);
    let t = Tensor::from_slice(&(0..36).map(|_| rng.int_in(0, 1000)).collect::<Vec<i64>>()).view([12, 3]);
    let eps = normal_tensor(&mut rng, &[12, 3, 2, 4, 4], Device::Cpu);
    let (x, g) = image(9);
    let run = |fuse: bool| {
        let cfg = TtaConfig {
            mode: Mode::Online,
            fuse_accum: fuse,
            max_batch: 5, // 12 pairs per step: chunks of 5, 5, 2
            ..knobs(3, 4, 3)
        };
        let mut e = engine(&bundle, &cfg).with_noise(Box::new(ReplayNoise {
            t: t.shallow_clone(),
            eps: eps.shallow_clone(),
        }));
        let r = e.adapt("k", &x, &g).unwrap();
        let weights: Vec<Vec<f32>> = e.adapted_parameters().tensors.iter().map(floats).collect();
        (r.steps.iter().map(|s| s.loss).collect::<Vec<_>>(), weights)
    };
    let (fused_losses, fused) = run(true);
    let (plain_losses, plain) = run(false);
    assert!(
        max_rel(&fused_losses, &plain_losses) < 1e-5,
        "{fused_losses:?} vs {plain_losses:?}"
    );
    for (a, b) in fused.iter().zip(&plain) {
        assert!(max_rel(a, b) < 1e-4, "weights differ by {:e}", max_rel(a, b));
    }
    assert!(fused.iter().zip(&plain).any(|(a, _)| a.iter().any(|v| *v != 0.0)));
}

fn snapshot(e: &DiffusionTta) -> Vec<(String, Tensor)> {
    let mut all: Vec<(String, Tensor)> = e
        .classifier()
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (format!("classifier.{n}"), t.detach().copy()))
        .collect();
    for (n, t) in e.adapted_parameters().names.iter().zip(&e.adapted_parameters().tensors) {
        if n.starts_with("denoiser.") {
            all.push((n.clone(), t.detach().copy()));
        }
    }
    all
}

/// A classifier view and a diffusion view from a local generator (never torch's global
/// one, which parallel tests share).
fn image(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    (
        floats(&normal_tensor(&mut rng, &[3 * 8 * 8], Device::Cpu)),
        floats(&(uniform_tensor(&mut rng, &[3 * 8 * 8], Device::Cpu) * 2.0 - 1.0)),
    )
}

#[test]
fn gradients_reach_the_classifier_but_not_its_head_and_adapt_classifier_spares_the_denoiser() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = load(&tiny_bundle(tmp.path(), false));
    let cfg = TtaConfig {
        adapt: Adapt::Classifier,
        mode: Mode::Online,
        ..knobs(2, 2, 4)
    };
    let mut e = engine(&bundle, &cfg);
    let denoiser_before: Vec<Tensor> = bundle_denoiser_params(&bundle);
    let before = snapshot(&e);
    let (x, g) = image(1);
    e.adapt("a", &x, &g).unwrap();
    let after = snapshot(&e);
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        if name.contains(".fc.") {
            assert!(a.equal(b), "head parameter {name} changed");
        } else {
            assert!(!a.equal(b), "classifier parameter {name} did not change");
        }
    }
    assert!(!e.adapted_parameters().names.iter().any(|n| n.starts_with("denoiser.")));
    let diffusion = e_denoiser_params(&e);
    for (d, original) in diffusion.iter().zip(&denoiser_before) {
        assert!(d.equal(original), "adapt = classifier changed the denoiser");
    }
}

fn bundle_denoiser_params(bundle: &Bundle) -> Vec<Tensor> {
    let d = bundle.load_diffusion(Device::Cpu).unwrap();
    d.named_parameters()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.detach().copy())
        .collect()
}

fn e_denoiser_params(e: &DiffusionTta) -> Vec<Tensor> {
    e.denoiser_parameters()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.detach().copy())
        .collect()
}

#[test]
fn episodic_reset_restores_every_weight_bit_for_bit_and_online_carries_them() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle_dir = tiny_bundle(tmp.path(), false);
    let bundle = load(&bundle_dir);
    let mut e = engine(
        &bundle,
        &TtaConfig {
            mode: Mode::Episodic,
            ..knobs(2, 2, 4)
        },
    );
    let originals = snapshot(&e);
    let originals_denoiser = e_denoiser_params(&e);
    for i in 0..2 {
        let (x, g) = image(i);
        let r = e.adapt(&format!("img-{i}"), &x, &g).unwrap();
        assert_eq!(r.steps.len(), 2);
        for ((name, o), (_, now)) in originals.iter().zip(&snapshot(&e)) {
            assert!(now.equal(o), "{name} not restored after image {i}");
        }
        for (o, now) in originals_denoiser.iter().zip(&e_denoiser_params(&e)) {
            assert!(now.equal(o), "denoiser not restored after image {i}");
        }
    }
    // Buffers too: the saved module equals the bundle's file, state_dict entry by entry.
    let saved = tmp.path().join("after.pt");
    e.classifier().save(&saved).unwrap();
    python(&[
        "-c",
        "import sys, torch\na = torch.jit.load(sys.argv[1]).state_dict()\nb = torch.jit.load(sys.argv[2]).state_dict()\nassert a.keys() == b.keys()\nfor k in a:\n    assert torch.equal(a[k], b[k]), k\nassert any('running_mean' in k for k in a)",
        saved.to_str().unwrap(),
        bundle_dir.join("classifier.pt").to_str().unwrap(),
    ]);

    let mut online = engine(
        &bundle,
        &TtaConfig {
            mode: Mode::Online,
            ..knobs(2, 2, 4)
        },
    );
    let (x, g) = image(0);
    online.adapt("img-0", &x, &g).unwrap();
    let after_first = snapshot(&online);
    assert!(
        after_first.iter().zip(&originals).any(|((_, a), (_, o))| !a.equal(o)),
        "online adapted nothing"
    );
    let (x, g) = image(1);
    online.adapt("img-1", &x, &g).unwrap();
    let after_second = snapshot(&online);
    assert!(
        after_second
            .iter()
            .zip(&after_first)
            .any(|((_, a), (_, b))| !a.equal(b)),
        "online did not carry on"
    );
}

#[test]
fn a_diverging_image_keeps_the_source_prediction_and_restores_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = load(&tiny_bundle(tmp.path(), false));
    let mut e = engine(
        &bundle,
        &TtaConfig {
            lr: 1e30,
            ..knobs(3, 1, 4)
        },
    );
    let originals = snapshot(&e);
    let (x, g) = image(3);
    let r = e.adapt("boom", &x, &g).unwrap();
    let reason = r.diverged.expect("a 1e30 learning rate diverges");
    assert!(reason.contains("loss became"), "{reason}");
    assert_eq!(r.after, r.before);
    for ((name, o), (_, now)) in originals.iter().zip(&snapshot(&e)) {
        assert!(now.equal(o), "{name} not restored after divergence");
    }
    // The next image adapts normally from the original weights.
    let mut fine = engine(&bundle, &knobs(1, 1, 4));
    let (x, g) = image(4);
    assert!(fine.adapt("ok", &x, &g).unwrap().diverged.is_none());
}

#[test]
fn mismatched_bundle_shapes_fail_at_load_naming_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_bundle(tmp.path(), false);
    let write_embeddings = |rows: i64, width: i64| {
        let e = normal_tensor(&mut Rng::new(1), &[rows, width], Device::Cpu);
        Tensor::write_safetensors(&[("embeddings", &e)], dir.join("class_embeddings.safetensors")).unwrap();
    };
    write_embeddings(5, 6);
    let err = load(&dir)
        .load_diffusion(Device::Cpu)
        .err()
        .expect("5 classes vs 4")
        .to_string();
    assert!(err.contains("[5, 6]") && err.contains("num_classes = 4"), "{err}");
    write_embeddings(4, 7);
    let err = load(&dir)
        .load_diffusion(Device::Cpu)
        .err()
        .expect("width 7 vs 6")
        .to_string();
    assert!(
        err.contains("[1, 7]") && err.contains("[4, 7]") && err.contains("denoiser rejected"),
        "{err}"
    );
}

/// Every classifier parameter and every adapted denoiser parameter of a DUSA engine.
fn dusa_snapshot(e: &Dusa, bundle: &Bundle) -> Vec<(String, Tensor)> {
    let p = e.adapted_parameters();
    let mut all: Vec<(String, Tensor)> = p
        .names
        .iter()
        .zip(&p.tensors)
        .map(|(n, t)| (n.clone(), t.detach().copy()))
        .collect();
    // The head is not adapted: it must not move either.
    for (n, t) in bundle.load_classifier(Device::Cpu).unwrap().named_parameters().unwrap() {
        if !p.names.contains(&format!("classifier.{n}")) {
            all.push((format!("head.{n}"), t.detach().copy()));
        }
    }
    all
}

#[test]
fn dusa_episodic_reset_is_bit_exact_and_online_carries_on() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = load(&tiny_bundle(tmp.path(), false));
    let make = |mode| {
        let c = bundle.load_classifier(Device::Cpu).unwrap();
        let d = bundle.load_diffusion(Device::Cpu).unwrap();
        Dusa::new(c, d, &dusa_cfg(mode, 2, 2, Adapt::ClassifierDiffusion), 3, 2).unwrap()
    };
    let mut e = make(Mode::Episodic);
    let originals = dusa_snapshot(&e, &bundle);
    let mut first_losses = Vec::new();
    for i in 0..2 {
        let (x, g) = image(i);
        let r = e.adapt_image(&format!("img-{i}"), &x, &g).unwrap();
        assert_eq!(r.image.steps.len(), 2);
        assert_eq!(r.image.iteration_losses.len(), 4);
        assert_eq!(r.image.denoiser_evals, 4 * 3, "b = 2 + 1 candidates per iteration");
        let moved = e
            .adapted_parameters()
            .tensors
            .iter()
            .zip(&originals)
            .any(|(now, (_, o))| !now.equal(o));
        assert!(moved, "image {i} adapted nothing");
        e.reset();
        for ((name, o), (_, now)) in originals.iter().zip(&dusa_snapshot(&e, &bundle)) {
            assert!(now.equal(o), "{name} not restored after image {i}");
        }
        first_losses.push(r.image.iteration_losses[0]);
    }
    // The same image again after the reset: the same draws and the same losses, bit for bit.
    let (x, g) = image(0);
    let again = e.adapt_image("img-0", &x, &g).unwrap();
    assert_eq!(again.image.iteration_losses[0], first_losses[0]);

    let mut online = make(Mode::Online);
    let (x0, g0) = image(0);
    let (x1, g1) = image(1);
    let keys = ["img-0", "img-1"];
    let r1 = online.adapt_batch(&keys, &[&x0, &x1], &[&g0, &g1]).unwrap();
    assert!(!r1.stepped, "accum = 2: the first batch only accumulates");
    let r2 = online.adapt_batch(&keys, &[&x0, &x1], &[&g0, &g1]).unwrap();
    assert!(r2.stepped);
    assert_eq!(r2.image_losses, r1.image_losses, "same weights, same per-image draws");
    assert_eq!(r2.predictions, r1.predictions, "rows are scored before the update");
    let r3 = online.adapt_batch(&keys, &[&x0, &x1], &[&g0, &g1]).unwrap();
    assert_ne!(r3.image_losses, r2.image_losses, "online carries the adapted weights");
}

/// Issue 21: a gradient that is not finite while the loss is (a tiny classifier whose
/// head gets NaN gradients on a sentinel image) is caught before the optimizer step.
/// Episodic: that image keeps its source prediction with a reason and the weights are
/// the source's; the next image is unchanged. Online: the batch is undone whole, so the
/// stream goes on exactly as if that batch had never come, every value finite.
#[test]
fn dusa_skips_a_non_finite_gradient_episodic_and_online() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = load(&make_tiny_bundle(tmp.path(), "sentinel", &["--nan-grad-sentinel"]));
    let make = |mode: Mode| {
        let cfg = TtaConfig {
            mode,
            ..dusa_cfg(mode, 2, 1, Adapt::ClassifierDiffusion)
        };
        let classifier = bundle.load_classifier(Device::Cpu).unwrap();
        let diffusion = bundle.load_diffusion(Device::Cpu).unwrap();
        Dusa::new(classifier, diffusion, &cfg, 0, 2).unwrap()
    };
    let (x, g) = image(1);
    let mut sentinel = x.clone();
    sentinel[0] = 100.0;

    let mut e = make(Mode::Episodic);
    let originals = dusa_snapshot(&e, &bundle);
    let plain = e.adapt_image("a", &x, &g).unwrap();
    assert!(plain.image.diverged.is_none(), "{:?}", plain.image.diverged);
    e.reset();
    let bad = e.adapt_image("s", &sentinel, &g).unwrap();
    let why = bad.image.diverged.clone().expect("a NaN gradient must not pass");
    assert!(why.contains("gradient norm"), "{why}");
    assert_eq!(bad.image.after, bad.image.before, "the source prediction is kept");
    assert!(bad.image.steps.is_empty(), "no step was taken");
    for ((name, o), (_, now)) in originals.iter().zip(&dusa_snapshot(&e, &bundle)) {
        assert!(now.equal(o), "{name} not the source value after the skipped image");
    }
    let again = e.adapt_image("a", &x, &g).unwrap();
    assert_eq!(again.image.iteration_losses, plain.image.iteration_losses);
    assert_eq!(again.image.after, plain.image.after);

    let (xb, gb) = image(2);
    let (xc, gc) = image(3);
    let mut live = make(Mode::Online);
    let mut undisturbed = make(Mode::Online);
    for m in [&mut live, &mut undisturbed] {
        let first = m.adapt_batch(&["a", "b"], &[&x, &xb], &[&g, &gb]).unwrap();
        assert!(first.stepped && first.diverged.is_none());
    }
    let hit = live.adapt_batch(&["s", "c"], &[&sentinel, &xc], &[&g, &gc]).unwrap();
    assert!(
        hit.diverged.as_deref().is_some_and(|w| w.contains("gradient norm")),
        "{:?}",
        hit.diverged
    );
    assert!(!hit.stepped);
    let after = live.adapt_batch(&["a", "b"], &[&x, &xb], &[&g, &gb]).unwrap();
    let expected = undisturbed.adapt_batch(&["a", "b"], &[&x, &xb], &[&g, &gb]).unwrap();
    assert!(after.diverged.is_none());
    assert_eq!(after.image_losses, expected.image_losses, "the bad batch left no trace");
    assert_eq!(after.predictions, expected.predictions);
    assert!(after.image_losses.iter().all(|l| l.is_finite()));
    assert!(
        live.adapted_parameters().all_finite().unwrap(),
        "the stream holds a non-finite weight"
    );
}

/// Online DUSA's accumulation: batches of 2 with `accum = 2` update the weights as
/// one batch of 4 does (the authors' 8 x 8 is 64 images per update).
#[test]
fn dusa_online_accumulation_has_the_gradient_of_one_large_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = load(&tiny_bundle(tmp.path(), false));
    let run = |batch: usize, accum: usize| {
        let cfg = dusa_cfg(Mode::Online, 1, accum, Adapt::ClassifierDiffusion);
        let classifier = bundle.load_classifier(Device::Cpu).unwrap();
        let diffusion = bundle.load_diffusion(Device::Cpu).unwrap();
        let mut m = Dusa::new(classifier, diffusion, &cfg, 0, batch).unwrap();
        let images: Vec<(Vec<f32>, Vec<f32>)> = (0..4).map(|i| image(10 + i)).collect();
        let keys = ["k0", "k1", "k2", "k3"];
        for chunk in (0..4).collect::<Vec<usize>>().chunks(batch) {
            let r = m
                .adapt_batch(
                    &chunk.iter().map(|&i| keys[i]).collect::<Vec<_>>(),
                    &chunk.iter().map(|&i| images[i].0.as_slice()).collect::<Vec<_>>(),
                    &chunk.iter().map(|&i| images[i].1.as_slice()).collect::<Vec<_>>(),
                )
                .unwrap();
            assert!(r.diverged.is_none());
        }
        m.adapted_parameters().tensors.iter().map(floats).collect::<Vec<_>>()
    };
    let (accumulated, one) = (run(2, 2), run(4, 1));
    for (a, b) in accumulated.iter().zip(&one) {
        assert!(max_rel(a, b) < 1e-4, "weights differ by {:e}", max_rel(a, b));
    }
}

/// Issue 23: an open-vocabulary bundle exported from the real architectures at tiny
/// size (transformers' CLIP, diffusers' UNet2DConditionModel and AutoencoderKL, random
/// weights, tools/export_clip_sd.py) runs the text-conditioned latent path, `[K,77,D]`
/// mixed by class probability, as the Python reference does, adapting the CLIP image
/// tower only (the reference's recipe).
#[test]
fn an_exported_clip_and_stable_diffusion_bundle_matches_the_reference_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = export_clip_sd(tmp.path(), "clip-sd", &["cat", "dog", "snake"], &[]);
    let cfg = TtaConfig {
        adapt: Adapt::Classifier,
        ..knobs(2, 2, 3)
    };
    check_parity(
        &bundle,
        cfg,
        &[
            "--steps",
            "2",
            "--accum",
            "2",
            "--samples",
            "3",
            "--adapt",
            "classifier",
        ],
    );
}

/// `tools/export_clip_sd.py OUT --clip random:tiny --sd random:tiny --classes (names)`.
fn export_clip_sd(dir: &Path, name: &str, classes: &[&str], flags: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let names = dir.join(format!("{name}-{}.txt", classes.len()));
    std::fs::write(&names, classes.join("\n")).unwrap();
    let script = common::repo().join("tools/export_clip_sd.py");
    let mut args = vec![script.to_str().unwrap(), out.to_str().unwrap()];
    args.extend([
        "--clip",
        "random:tiny",
        "--sd",
        "random:tiny",
        "--classes",
        names.to_str().unwrap(),
    ]);
    args.extend_from_slice(flags);
    python(&args);
    out
}

/// A new vocabulary re-exports the text part only: the head and the class embeddings
/// change, the UNet and the encoder files stay byte for byte, the image tower's weights
/// stay, and the bundle's digest changes.
#[test]
fn a_new_vocabulary_changes_the_text_part_and_the_digest_only() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = export_clip_sd(tmp.path(), "clip-sd", &["cat", "dog", "snake"], &[]);
    let before = load(&bundle);
    let read = |f: &str| std::fs::read(bundle.join(f)).unwrap();
    let (unet, encoder) = (read("denoiser.pt"), read("encoder.pt"));
    let tower = |b: &dtta::model::Bundle| -> Vec<(String, Tensor)> {
        let c = b.load_classifier(Device::Cpu).unwrap();
        c.named_parameters()
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n != "head.weight")
            .collect()
    };
    let export = export_clip_sd(tmp.path(), "clip-sd", &["airplane", "ship"], &["--text-only"]);
    assert_eq!(export, bundle);
    let after = load(&bundle);
    assert_ne!(before.sha256, after.sha256, "the digest follows the vocabulary");
    assert_eq!(after.spec.class_names, ["airplane", "ship"]);
    assert_eq!(after.spec.classifier.num_classes, 2);
    assert_eq!(read("denoiser.pt"), unet);
    assert_eq!(read("encoder.pt"), encoder);
    for ((name, a), (_, b)) in tower(&before).iter().zip(&tower(&after)) {
        assert!(a.equal(b), "{name} changed with the vocabulary");
    }
    let classifier = after.load_classifier(Device::Cpu).unwrap();
    assert_eq!(classifier.output_shape, [1, 2]);
    assert_eq!(
        after.load_diffusion(Device::Cpu).unwrap().embeddings.size(),
        [2, 77, 32]
    );
    let o = common::run_dtta(&["inspect", bundle.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && stdout.contains("vocabulary:  2 class names"),
        "{stdout}"
    );
}
