//! Diffusion-TTA (ALGORITHM.md): per image, minimise the diffusion loss conditioned on
//! the classifier's own prediction, by gradient descent on the classifier (and the
//! denoiser), then predict again.
//!
//! Invariants: the classifier runs in eval mode (BatchNorm statistics are read, never
//! written); in episodic mode every adapted parameter and the optimizer state are back
//! to their pre-image values, bit for bit, before the next image; a non-finite loss,
//! gradient or adapted prediction stops the image (`stop_reason` `diverged`), keeps the
//! source prediction and restores the weights.
//!
//! Adaptive compute (`[tta.budget]`, episodic only, see [`crate::tta::budget`]): a
//! confident image is not adapted; a step that would pass `max_evals` is not started;
//! with `stable_steps` the classifier predicts after every step and adaptation stops
//! once its answer has not changed for that many steps. Denoiser evaluations are counted
//! per image, one per (t, eps) pair, fused or not: `steps x accum x samples_per_step`
//! for an image that runs every step.
//! Device work is not synchronised inside an iteration: the host reads one loss per
//! optimizer step (to catch divergence) and the rest once per image.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::{per_image, step_metric, InjectedFault, Method};
use crate::image::Prepared;
use crate::model::{Classifier, Diffusion};
use crate::sample::Status;
use crate::tta::optim::{Optimizer, OptimizerState};
use crate::tta::params::{AdaptedParams, VariantStreams};
use crate::tta::schedule::{add_noise, NoiseSource, SeededNoise};
use crate::tta::{
    dense, predictions, AfterUpdate, BudgetConfig, DenseMap, DenseRow, Loss, Mode, Outcome, Precision, Prediction,
    StepRecord, StopReason, TtaConfig,
};

/// The knobs of the loop, from `[tta]`.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub steps: usize,
    pub accum: usize,
    pub samples: usize,
    pub loss: Loss,
    pub adapt_topk: usize,
    pub mode: Mode,
    pub topk: usize,
    pub precision: Precision,
    /// Run a step's pairs as one batch (chunks of `max_batch`) instead of `accum` iterations.
    pub fuse: bool,
    pub max_batch: usize,
    pub budget: BudgetConfig,
}

impl Knobs {
    pub fn from_config(cfg: &TtaConfig) -> Knobs {
        Knobs {
            steps: cfg.steps,
            accum: cfg.accum,
            samples: cfg.samples_per_step,
            loss: cfg.loss,
            adapt_topk: cfg.adapt_topk,
            mode: cfg.mode,
            topk: cfg.topk,
            precision: cfg.precision,
            fuse: cfg.fuse_accum,
            max_batch: cfg.max_batch,
            budget: cfg.budget.clone(),
        }
    }
}

/// What adapting one image produced.
#[derive(Debug)]
pub struct Adapted {
    pub before: Prediction,
    pub after: Prediction,
    /// Loss of every iteration (already divided by `accum`), in order; with `fuse`, one
    /// per step.
    pub iteration_losses: Vec<f32>,
    pub steps: Vec<StepRecord>,
    /// Why adaptation stopped early, if it diverged.
    pub diverged: Option<String>,
    /// Denoiser evaluations spent (one per (t, eps) pair through the denoiser).
    pub denoiser_evals: u64,
    /// Why adaptation ended before `steps` ([`StopReason::None`]: it did not).
    pub stop_reason: StopReason,
    pub elapsed_ms: f64,
    /// Dense tasks: the masks or depth maps before and after (`before`/`after` are then
    /// placeholders without a class).
    pub dense: Option<DenseRow>,
}

impl Adapted {
    /// An image a budget gate let through unadapted (`reason`): the source prediction
    /// twice, no steps, no denoiser evaluations.
    pub fn skipped(before: Prediction, reason: StopReason, started: Instant) -> Adapted {
        Adapted {
            after: before.clone(),
            before,
            iteration_losses: Vec::new(),
            steps: Vec::new(),
            diverged: None,
            denoiser_evals: 0,
            stop_reason: reason,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            dense: None,
        }
    }

    /// The predictions row of sample `p` (status `diverged` with its reason when it
    /// diverged), with its steps rows.
    pub fn into_outcome(self, p: &Prepared) -> Outcome {
        let mut o = Outcome::blank(p.key.clone(), p.label, p.defect.clone());
        match self.dense {
            Some(dense) => o.dense = Some(dense),
            None => {
                o.set_before(&self.before);
                o.set_after(self.after);
            }
        }
        o.loss_first = self.steps.first().map(|s| s.loss);
        o.loss_last = self.steps.last().map(|s| s.loss);
        o.steps = self.steps.len() as u32;
        o.adapt_ms = self.elapsed_ms;
        o.denoiser_evals = self.denoiser_evals;
        o.stop_reason = self.stop_reason;
        o.step_log = self.steps;
        if let Some(reason) = self.diverged {
            o.status = Status::Diverged;
            o.error = Some(reason);
        }
        o
    }
}

pub struct DiffusionTta {
    classifier: Classifier,
    diffusion: Diffusion,
    params: AdaptedParams,
    /// Parameter values before the first image: the episodic reset target.
    originals: Vec<Tensor>,
    optimizer: Optimizer,
    noise: Box<dyn NoiseSource>,
    knobs: Knobs,
    /// Online mode: one adapted state per variant stream.
    streams: VariantStreams,
    /// Online mode: the weights and optimizer state before the current image, restored
    /// when it diverges or fails.
    rollback: Option<(Vec<Tensor>, OptimizerState)>,
    fault: InjectedFault,
}

impl DiffusionTta {
    pub fn new(
        classifier: Classifier,
        diffusion: Diffusion,
        cfg: &TtaConfig,
        seed: u64,
    ) -> Result<Self, tch::TchError> {
        let params = super::adapted_parameters(&classifier, &diffusion, cfg, false)?;
        let originals = params.snapshot();
        let noise = Box::new(SeededNoise::new(
            seed,
            diffusion.num_timesteps,
            cfg.timesteps,
            cfg.same_noise,
        ));
        Ok(DiffusionTta {
            classifier,
            diffusion,
            params,
            originals,
            optimizer: Optimizer::new(cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay),
            noise,
            knobs: Knobs::from_config(cfg),
            streams: VariantStreams::default(),
            rollback: None,
            fault: InjectedFault::from_env(),
        })
    }

    /// Replaces the (t, eps) source, e.g. with a replay for parity tests.
    pub fn with_noise(mut self, noise: Box<dyn NoiseSource>) -> Self {
        self.noise = noise;
        self
    }

    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// The live denoiser parameters (adapted or not).
    pub fn denoiser_parameters(&self) -> Result<Vec<(String, Tensor)>, tch::TchError> {
        self.diffusion.named_parameters()
    }

    pub fn adapted_parameters(&self) -> &AdaptedParams {
        &self.params
    }

    /// Adapts to one image (classifier view `pixels`, diffusion view `gen`).
    pub fn adapt(&mut self, key: &str, pixels: &[f32], gen: &[f32]) -> Result<Adapted, tch::TchError> {
        let started = Instant::now();
        let device = self.classifier.device;
        let k = self.knobs.clone();
        let x = self.classifier.batch_from(&[pixels]);
        let view = &self.diffusion.view;
        let side = view.resolution as i64;
        let x_gen = Tensor::from_slice(gen)
            .view([1, view.channels.count() as i64, side, side])
            .to_device(device);
        self.classifier.set_eval();
        let logits0 = tch::no_grad(|| self.autocast(|| self.classifier.logits(&x)))?;
        // Dense tasks: the map is the prediction; the image-level one is a placeholder
        // (budgets, which read it, are refused for dense tasks).
        let task = self.classifier.task;
        let crop = self.classifier.view.crop;
        let before_map = match task.is_dense() {
            true => Some(dense::maps(&logits0, task, crop)?.remove(0)),
            false => None,
        };
        let before = match before_map {
            Some(_) => Prediction::placeholder(),
            None => predictions(&logits0, k.topk)?.remove(0),
        };
        let mut gate = k.budget.start(&before);
        if let Some(reason) = gate.skip() {
            return Ok(Adapted::skipped(before, reason, started));
        }
        let z0 = tch::no_grad(|| self.autocast(|| self.diffusion.encode(&x_gen)))?.to_kind(Kind::Float);
        let classes = (k.adapt_topk > 0 && !task.is_dense()).then(|| {
            let kk = (k.adapt_topk as i64).min(logits0.size()[1]);
            logits0.topk(kk, -1, true, true).1.squeeze_dim(0)
        });
        // Online mode keeps state across images; keep a rollback point for divergence
        // and failures.
        self.rollback = (k.mode == Mode::Online).then(|| (self.params.snapshot(), self.optimizer.snapshot()));

        self.noise.begin_image(key);
        self.params.zero_grad();
        let latent = self.diffusion.latent_shape.clone();
        let mut iteration_losses = Vec::with_capacity(k.steps * k.accum);
        let mut step_metrics: Vec<Tensor> = Vec::with_capacity(k.steps);
        let mut step_host: Vec<(f32, f64)> = Vec::with_capacity(k.steps);
        let mut step_maps: Vec<DenseMap> = Vec::new();
        let mut diverged = None;
        let mut stop_reason = StopReason::None;
        let step_evals = (k.accum * k.samples) as u64;
        for step in 0..k.steps {
            if let Some(reason) = gate.before_step(step_evals) {
                stop_reason = reason;
                break;
            }
            let mut step_loss = Tensor::zeros([], (Kind::Float, device));
            let logits_seen;
            if k.fuse {
                // The step's (t, eps) pairs as one batch: the classifier's output does not
                // change within a step, so it runs once; the denoiser runs in chunks of at
                // most `max_batch` pairs against a detached condition whose gradient is then
                // pushed through the classifier once. Same gradient as `accum` iterations.
                let draws: Vec<(Tensor, Tensor)> = (0..k.accum)
                    .map(|a| self.noise.draw(step * k.accum + a, k.samples, &latent, device))
                    .collect();
                let t = Tensor::cat(&draws.iter().map(|d| d.0.shallow_clone()).collect::<Vec<_>>(), 0);
                let eps = Tensor::cat(&draws.iter().map(|d| d.1.shallow_clone()).collect::<Vec<_>>(), 0);
                let total = t.size()[0];
                gate.charge(total as u64);
                let (logits, cond) = self.autocast(|| self.condition_of(&x, classes.as_ref()))?;
                let leaf = cond.detach().set_requires_grad(true);
                let mut start = 0;
                while start < total {
                    let len = (k.max_batch as i64).min(total - start);
                    let loss = self.autocast(|| {
                        self.noise_loss(
                            &z0,
                            &t.narrow(0, start, len),
                            &eps.narrow(0, start, len),
                            &leaf,
                            len as f64 / total as f64,
                        )
                    })?;
                    loss.f_backward()?;
                    step_loss += loss.detach();
                    start += len;
                }
                (&cond * leaf.f_grad()?).sum(Kind::Float).f_backward()?;
                iteration_losses.push(step_loss.shallow_clone());
                logits_seen = logits.detach();
            } else {
                let mut last = None;
                for a in 0..k.accum {
                    let (t, eps) = self.noise.draw(step * k.accum + a, k.samples, &latent, device);
                    gate.charge(t.size()[0] as u64);
                    let (loss, logits) = self.autocast(|| -> Result<(Tensor, Tensor), tch::TchError> {
                        // The reference loop: the classifier re-runs every iteration.
                        let (logits, cond) = self.condition_of(&x, classes.as_ref())?;
                        Ok((self.noise_loss(&z0, &t, &eps, &cond, 1.0 / k.accum as f64)?, logits))
                    })?;
                    loss.f_backward()?;
                    let loss = loss.detach();
                    step_loss += &loss;
                    iteration_losses.push(loss);
                    last = Some(logits.detach());
                }
                logits_seen = last.expect("accum >= 1");
            }
            let grad_norm = self.params.grad_norm().to_device(device);
            // The one sync per step: the loss and the gradient norm together.
            let checked = Tensor::stack(&[step_loss.to_kind(Kind::Double), grad_norm.to_kind(Kind::Double)], 0);
            let checked = Vec::<f64>::try_from(checked.to_device(Device::Cpu))?;
            let (loss_value, grad_value) = (checked[0], checked[1]);
            if !loss_value.is_finite() || !grad_value.is_finite() {
                let what = if loss_value.is_finite() {
                    "gradient norm"
                } else {
                    "loss"
                };
                let value = if loss_value.is_finite() { grad_value } else { loss_value };
                diverged = Some(format!("{what} became {value} at step {step}; source prediction kept"));
                break;
            }
            self.optimizer.step(&self.params.tensors)?;
            self.params.zero_grad();
            self.fault.after_update()?;
            if task.is_dense() {
                // Scored against the label by the writer (the steps table's metrics).
                step_maps.extend(dense::maps(&logits_seen, task, crop)?);
            }
            step_metrics.push(step_metric(&logits_seen, task, &grad_norm));
            step_host.push((loss_value as f32, started.elapsed().as_secs_f64() * 1e3));
            let update = gate.after_update(step, k.steps, || {
                let logits = tch::no_grad(|| self.autocast(|| self.classifier.logits(&x)))?;
                Ok::<_, tch::TchError>(predictions(&logits, k.topk)?.remove(0))
            })?;
            match update {
                AfterUpdate::Continue => {}
                AfterUpdate::Stop(reason) => {
                    stop_reason = reason;
                    break;
                }
                AfterUpdate::Diverged(why) => {
                    diverged = Some(why);
                    break;
                }
            }
        }
        self.params.zero_grad();

        let mut after_map = None;
        let mut after = match (&diverged, gate.take_prediction()) {
            (Some(_), _) => before.clone(),
            // The weights have not changed since that prediction.
            (None, Some(p)) => p,
            (None, None) => {
                let logits = tch::no_grad(|| self.autocast(|| self.classifier.logits(&x)))?;
                if task.is_dense() {
                    // A non-finite output makes the placeholder's confidence NaN: diverged.
                    let finite = logits.isfinite().all().int64_value(&[]) == 1;
                    after_map = Some(dense::maps(&logits, task, crop)?.remove(0));
                    Prediction {
                        conf: if finite { 0.0 } else { f32::NAN },
                        ..Prediction::placeholder()
                    }
                } else {
                    predictions(&logits, k.topk)?.remove(0)
                }
            }
        };
        if diverged.is_none() && !after.conf.is_finite() {
            diverged = Some(format!(
                "prediction became {} after adaptation; source prediction kept",
                after.conf
            ));
            after = before.clone();
        }
        if diverged.is_some() {
            self.roll_back();
            stop_reason = StopReason::Diverged;
            after_map = None;
        }
        let dense = before_map.map(|b| {
            let a = after_map.unwrap_or_else(|| b.clone());
            DenseRow::new(crop, b, a).with_steps(step_maps)
        });
        if k.mode == Mode::Episodic {
            self.reset();
        }
        self.rollback = None;

        // One host copy for the whole image.
        let iteration_losses = if iteration_losses.is_empty() {
            Vec::new()
        } else {
            Vec::<f32>::try_from(Tensor::stack(&iteration_losses, 0).to_device(Device::Cpu))?
        };
        let steps = super::step_records(&step_metrics, &step_host, self.optimizer.lr() as f32)?;
        Ok(Adapted {
            before,
            after,
            iteration_losses,
            steps,
            diverged,
            denoiser_evals: gate.evals(),
            stop_reason,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            dense,
        })
    }

    /// The classifier's logits for `x` and the condition `sum_k p_k E_k` they give,
    /// `[1, D...]` (over `classes` when set), with gradients.
    fn condition_of(&self, x: &Tensor, classes: Option<&Tensor>) -> Result<(Tensor, Tensor), tch::TchError> {
        let logits = self.classifier.logits(x)?;
        if self.classifier.task.is_dense() {
            let cond = self.diffusion.condition_map(&logits, self.classifier.task)?;
            return Ok((logits, cond));
        }
        let chosen = match classes {
            Some(idx) => logits.index_select(1, idx),
            None => logits.shallow_clone(),
        };
        let p = chosen.to_kind(Kind::Float).softmax(-1, Kind::Float);
        let cond = self.diffusion.condition(&p, classes);
        Ok((logits, cond))
    }

    /// `weight` times the mean diffusion loss of the pairs `(t, eps)` with condition
    /// `cond` (`[1, D...]`, broadcast to every pair).
    fn noise_loss(
        &self,
        z0: &Tensor,
        t: &Tensor,
        eps: &Tensor,
        cond: &Tensor,
        weight: f64,
    ) -> Result<Tensor, tch::TchError> {
        let z_t = add_noise(&self.diffusion.alphas_cumprod, z0, t, eps);
        let mut shape = cond.size();
        shape[0] = t.size()[0];
        let cond = cond.expand(shape.as_slice(), false);
        let diff = self.diffusion.predict_noise(&z_t, t, &cond)?.to_kind(Kind::Float) - eps;
        let loss = match self.knobs.loss {
            Loss::Mse => diff.square().mean(Kind::Float),
            Loss::L1 => diff.abs().mean(Kind::Float),
        };
        Ok(loss * weight)
    }

    /// Back to where the current image started: the online rollback point, or the
    /// source weights in episodic mode.
    fn roll_back(&mut self) {
        self.params.zero_grad();
        match (self.rollback.take(), self.knobs.mode) {
            (Some((params, state)), _) => {
                self.params.restore(&params);
                self.optimizer.restore(state);
            }
            (None, Mode::Episodic) => self.reset(),
            // Between images: the live stream's state is whole.
            (None, Mode::Online) => {}
        }
    }

    /// Back to the weights and optimizer state from before the first image.
    fn reset(&mut self) {
        self.params.restore(&self.originals);
        self.optimizer.reset();
    }

    fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.knobs.precision == Precision::Bf16 {
            crate::tta::autocast::bf16(f)
        } else {
            f()
        }
    }
}

impl Method for DiffusionTta {
    fn batch_size(&self) -> usize {
        1
    }

    /// A failed image may leave partly updated weights and gradients: roll back to where
    /// it started (episodic: the source weights), so a retry sees the same state.
    fn recover(&mut self) {
        self.roll_back();
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        per_image(batch, |p, pixels, gen| {
            if self.knobs.mode == Mode::Online {
                self.streams
                    .switch(p.variant, &self.params, &mut self.optimizer, &self.originals);
            }
            Ok(self.adapt(&p.key, pixels, gen)?.into_outcome(p))
        })
    }
}
