//! The methods of ALGORITHM.md side by side, one file each, behind one [`Method`] trait,
//! and [`build`], which loads the models a configured method needs.

mod diffusion_classifier;
mod diffusion_tta;
mod dusa;
mod eata;
mod norm_online;
mod sar;
mod source;
mod tent;

pub use diffusion_classifier::DiffusionClassifier;
pub use diffusion_tta::{Adapted, DiffusionTta, Knobs};
pub use dusa::{Dusa, DusaBatch, DusaDraws, DusaImage, ReplayDraws, SeededDraws};
pub use eata::{Eata, EataBatch};
pub use norm_online::batch_of_one_warning;
pub use sar::{Sar, SarBatch};
pub use source::Source;
pub use tent::Tent;

use tch::{Device, Kind, Tensor};

use super::params::AdaptedParams;
use super::{DenseRow, MethodName, Outcome, Precision, Prediction, StepRecord, TtaConfig};
use crate::image::Prepared;
use crate::model::{Bundle, BundleError, Classifier, Diffusion, LabelSpace};
use crate::sample::Task;

/// Runs `adapt` on every sample that has both views, in order; the others get their
/// status row. For the per-image methods.
pub fn per_image(
    batch: &[Prepared],
    mut adapt: impl FnMut(&Prepared, &[f32], &[f32]) -> Result<Outcome, tch::TchError>,
) -> Result<Vec<Outcome>, tch::TchError> {
    batch
        .iter()
        .map(|p| match (p.pixels.as_deref(), p.gen_pixels.as_deref()) {
            (Some(pixels), Some(gen)) => adapt(p, pixels, gen),
            _ => Ok(Outcome::unpredicted(p)),
        })
        .collect()
}

/// A method as the adapt stage sees it.
///
/// Contract: `run` returns one outcome per input sample, in input order, with the
/// sample's key (the adapt stage checks both and fails the shard otherwise). An `Err`,
/// or a panic, fails the batch: the adapt stage calls [`Method::recover`] and may run
/// the same batch again (`runtime.shard_retries`), so `run` must not consume its input.
pub trait Method {
    /// How many samples `run` would like at once (1 for per-image adaptation).
    fn batch_size(&self) -> usize;
    /// One outcome per input sample, in input order.
    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError>;
    /// Called after `run` failed or panicked: bring the state back to one where the next
    /// batch (or the same one again) gives the result it would have given without the
    /// failure, as far as the method can (episodic methods restore the source weights).
    fn recover(&mut self) {}
}

/// A one-shot failure right after the Nth optimizer update of the process, for tests of
/// [`Method::recover`]: set `DTTA_FAIL_AFTER_UPDATE=N` (unset: off). The update has been
/// applied when it fails, as when a libtorch call after the step fails (a device error,
/// a host copy), so a retry only gives the rows of an undisturbed run if `recover`
/// undoes the whole batch.
#[derive(Debug, Default)]
pub struct InjectedFault {
    countdown: Option<u64>,
}

impl InjectedFault {
    pub const ENV: &'static str = "DTTA_FAIL_AFTER_UPDATE";

    pub fn from_env() -> InjectedFault {
        let countdown = std::env::var(Self::ENV).ok().and_then(|v| v.trim().parse().ok());
        if let Some(n) = countdown {
            tracing::warn!(
                "{}={n}: the {n}th optimizer update will fail once (a test aid)",
                Self::ENV
            );
        }
        InjectedFault {
            countdown: countdown.filter(|n| *n > 0),
        }
    }

    /// Call right after each optimizer update: fails the Nth call, once.
    pub fn after_update(&mut self) -> Result<(), tch::TchError> {
        match self.countdown {
            Some(1) => {
                self.countdown = None;
                Err(tch::TchError::Torch(format!(
                    "injected fault after an optimizer update ({})",
                    Self::ENV
                )))
            }
            Some(n) => {
                self.countdown = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// Why a configured method could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{method} cannot run with this bundle and config: {source}")]
    Unsupported {
        method: &'static str,
        source: tch::TchError,
    },
}

/// Loads the models the configured method needs and builds it. Call it on the thread
/// that will run the method: tch modules stay on the thread that owns the device.
///
/// With a label space, the models are restricted before the method sees them (so every
/// method works over the kept classes only) and the method is wrapped in [`Restricted`].
/// `clean_images` (preprocessed classifier views) feed EATA's Fisher information; the
/// other methods ignore them.
pub fn build(
    bundle: &Bundle,
    space: Option<&LabelSpace>,
    device: Device,
    tta: &TtaConfig,
    (seed, batch_size): (u64, usize),
    clean_images: &[Vec<f32>],
) -> Result<Box<dyn Method>, BuildError> {
    let unsupported = |source| BuildError::Unsupported {
        method: tta.method_column(),
        source,
    };
    let task = bundle.spec.task;
    let dense_ready = match tta.method {
        MethodName::Source | MethodName::DiffusionTta => true,
        MethodName::Tent | MethodName::Dusa => task != Task::Depth,
        MethodName::DiffusionClassifier | MethodName::Eata | MethodName::Sar => false,
    };
    if task.is_dense() && !dense_ready {
        let why = match tta.method {
            MethodName::Tent => "it minimises class entropy, and a depth model has no classes",
            MethodName::Dusa => "it mixes class-conditional noise predictions, and a depth model has no classes",
            MethodName::Eata | MethodName::Sar => {
                "it filters (and weighs) whole images by their class entropy; dtta runs it on classifiers only"
            }
            _ => "it scores one class per image and has no per-pixel form",
        };
        return Err(BuildError::Unsupported {
            method: tta.method_column(),
            source: tch::TchError::Kind(format!("the bundle's task is {}, and {why}", task.as_str())),
        });
    }
    let mut classifier = bundle.load_classifier(device)?;
    let load_diffusion = || -> Result<Diffusion, BundleError> {
        let mut diffusion = bundle.load_diffusion(device)?;
        if let Some(space) = space {
            diffusion.restrict(space);
        }
        Ok(diffusion)
    };
    if let Some(space) = space {
        classifier.restrict(space);
    }
    let method: Box<dyn Method> = match tta.method {
        MethodName::Source => Box::new(Source::new(classifier, batch_size, tta.topk)),
        MethodName::Tent => Box::new(Tent::new(classifier, &tta.tent, batch_size, tta.topk).map_err(unsupported)?),
        MethodName::Eata => {
            Box::new(Eata::new(classifier, &tta.eata, clean_images, batch_size, tta.topk).map_err(unsupported)?)
        }
        MethodName::Sar => Box::new(Sar::new(classifier, &tta.sar, batch_size, tta.topk).map_err(unsupported)?),
        MethodName::DiffusionClassifier => {
            let diffusion = load_diffusion()?;
            Box::new(DiffusionClassifier::new(
                classifier,
                diffusion,
                &tta.diffusion_classifier,
                seed,
                tta.topk,
                batch_size.max(64),
            ))
        }
        MethodName::DiffusionTta => {
            let diffusion = load_diffusion()?;
            Box::new(DiffusionTta::new(classifier, diffusion, tta, seed).map_err(unsupported)?)
        }
        MethodName::Dusa => {
            let diffusion = load_diffusion()?;
            Box::new(Dusa::new(classifier, diffusion, tta, seed, batch_size).map_err(unsupported)?)
        }
    };
    Ok(match space {
        Some(space) => Box::new(Restricted {
            inner: method,
            space: space.clone(),
        }),
        None => method,
    })
}

/// A method run on a restricted classifier: reports every class index of its rows
/// (predictions, per-step predictions, every pixel of every mask) as
/// [`LabelSpace::output_class`] of the logit column the method saw, and the top-k as
/// [`LabelSpace::output_topk`] (each class once), so the output speaks the dataset's
/// class indices: the position in the subset list, or the label map's dataset class.
/// A class of -1 (no image-level class: a dense model's step predictions) stays -1.
pub struct Restricted {
    inner: Box<dyn Method>,
    space: LabelSpace,
}

impl Method for Restricted {
    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        let mut outcomes = self.inner.run(batch)?;
        let class = |c: i64| self.space.output_class(c);
        for o in &mut outcomes {
            o.pred_before = o.pred_before.map(class);
            o.pred_after = o.pred_after.map(class);
            (o.topk_after, o.topk_probs_after) = self.space.output_topk(&o.topk_after, &o.topk_probs_after);
            o.step_log.iter_mut().for_each(|s| s.pred = class(s.pred));
            if let Some(dense) = &mut o.dense {
                dense.map_classes(class);
            }
        }
        Ok(outcomes)
    }

    fn recover(&mut self) {
        self.inner.recover()
    }
}

/// What the diffusion-guided methods (Diffusion-TTA, DUSA) check and select before their
/// first image: bf16 support on the device, `[tta.budget]` against the method, and the
/// parameters `tta.adapt` selects (an empty selection is an error), the classifier's
/// head only with `with_head`. Sets `requires_grad` on both modules as a side effect
/// ([`AdaptedParams::select`]).
fn adapted_parameters(
    classifier: &Classifier,
    diffusion: &Diffusion,
    cfg: &TtaConfig,
    with_head: bool,
) -> Result<AdaptedParams, tch::TchError> {
    if cfg.precision == Precision::Bf16 {
        crate::tta::autocast::check_supported(classifier.device)?;
    }
    cfg.budget
        .validate(cfg.budget_step_cost())
        .map_err(|(key, message)| tch::TchError::Kind(format!("{key}: {message}")))?;
    if classifier.task.is_dense() && !cfg.budget.is_off() {
        return Err(tch::TchError::Kind(
            "tta.budget: its gates read an image-level prediction; a dense task has none".into(),
        ));
    }
    let params = AdaptedParams::select(
        classifier.named_parameters()?,
        diffusion.named_parameters()?,
        cfg.adapt,
        if with_head { &[] } else { &classifier.head },
        &classifier.norm,
    );
    if params.tensors.is_empty() {
        return Err(tch::TchError::Kind(format!(
            "tta.adapt = {:?} selects no parameter (does the bundle list classifier.norm?)",
            cfg.adapt
        )));
    }
    tracing::info!(
        "{} adapts {} tensors, {} parameters",
        cfg.method_column(),
        params.tensors.len(),
        params.numel()
    );
    Ok(params)
}

/// Splits a batch into the images to run and their positions.
fn predicted_images(batch: &[Prepared]) -> Vec<&[f32]> {
    batch.iter().filter_map(|p| p.pixels.as_deref()).collect()
}

/// Assembles outcomes in input order: the rows without pixels get their status row,
/// and `fill` completes the others' rows, in order.
fn assemble_with(batch: &[Prepared], per_image_ms: f64, mut fill: impl FnMut(&mut Outcome)) -> Vec<Outcome> {
    batch
        .iter()
        .map(|p| {
            if p.pixels.is_none() {
                return Outcome::unpredicted(p);
            }
            let mut o = Outcome::blank(p.key.clone(), p.label, p.defect.clone());
            fill(&mut o);
            o.adapt_ms = per_image_ms;
            o
        })
        .collect()
}

/// Assembles outcomes in input order from per-image predictions of the predicted rows.
fn assemble(batch: &[Prepared], before: Vec<Prediction>, after: Vec<Prediction>, per_image_ms: f64) -> Vec<Outcome> {
    let mut pairs = before.into_iter().zip(after);
    assemble_with(batch, per_image_ms, |o| {
        let (before, after) = pairs.next().expect("one prediction per image");
        o.set_before(&before);
        o.set_after(after);
    })
}

/// Assembles outcomes in input order from the dense predictions of the predicted rows.
fn assemble_dense(batch: &[Prepared], rows: Vec<DenseRow>, per_image_ms: f64) -> Vec<Outcome> {
    let mut rows = rows.into_iter();
    assemble_with(batch, per_image_ms, |o| {
        o.dense = Some(rows.next().expect("one dense prediction per image"));
    })
}

/// One step's `[pred, conf, entropy, grad_norm]` on the device: the top-1, its
/// probability and the softmax entropy for a classifier; for a segmenter the per-pixel
/// mean confidence and entropy with pred -1 (no image-level class); for a depth network
/// -1, 0, 0.
pub(super) fn step_metric(logits: &Tensor, task: Task, grad_norm: &Tensor) -> Tensor {
    let device = logits.device();
    let (pred, conf, entropy) = match task {
        Task::Classification => {
            let probs = logits.to_kind(Kind::Float).softmax(-1, Kind::Float);
            let (conf, pred) = probs.max_dim(-1, false);
            let entropy = -(&probs * probs.clamp_min(1e-12).log()).sum_dim_intlist(-1, false, Kind::Float);
            (pred.to_kind(Kind::Float), conf, entropy)
        }
        Task::Segmentation => {
            let probs = logits.to_kind(Kind::Float).softmax(1, Kind::Float);
            let conf = probs.amax(1, false).mean(Kind::Float).view([1]);
            let entropy = (-(&probs * probs.clamp_min(1e-12).log()).sum_dim_intlist(1, false, Kind::Float))
                .mean(Kind::Float)
                .view([1]);
            (Tensor::from_slice(&[-1f32]).to_device(device), conf, entropy)
        }
        Task::Depth => {
            let fixed = Tensor::from_slice(&[-1f32, 0.0, 0.0]).to_device(device);
            (fixed.narrow(0, 0, 1), fixed.narrow(0, 1, 1), fixed.narrow(0, 2, 1))
        }
    };
    Tensor::cat(&[pred, conf, entropy, grad_norm.view([1])], 0)
}

/// Steps rows from the per-step `[pred, conf, entropy, grad_norm]` device metrics (one host copy) and host values.
pub(super) fn step_records(metrics: &[Tensor], host: &[(f32, f64)], lr: f32) -> Result<Vec<StepRecord>, tch::TchError> {
    if metrics.is_empty() {
        return Ok(Vec::new());
    }
    let m = Vec::<f32>::try_from(Tensor::stack(metrics, 0).to_device(Device::Cpu).flatten(0, -1))?;
    Ok(host
        .iter()
        .enumerate()
        .map(|(i, (loss, elapsed_ms))| StepRecord {
            step: i as u32,
            loss: *loss,
            pred: m[i * 4] as i64,
            conf: m[i * 4 + 1],
            entropy: m[i * 4 + 2],
            lr,
            grad_norm: m[i * 4 + 3],
            elapsed_ms: *elapsed_ms,
        })
        .collect())
}
