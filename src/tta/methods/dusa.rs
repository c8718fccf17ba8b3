//! DUSA (ALGORITHM.md, "DUSA"; Li et al., NeurIPS 2024): one timestep, a few candidate
//! classes per image, and the loss `mean((eps - sum_k p_k eps_phi(x_t, t, E_{c_k}))^2)`,
//! a mixture of noise *predictions*, one per candidate under its own class embedding.
//!
//! Candidates: the top `topk` classes of the raw logits, plus `random` classes drawn
//! without replacement from the others with probabilities softmax(raw logits), by the
//! Gumbel-top-k trick (top `random` of `logits + Gumbel(u)` over the others: the same
//! distribution as successive draws, and no underflow for confident classifiers).
//! p = softmax over the candidates' l2-normalised logits (LogitNorm).
//!
//! Segmenters (issue 12; concat-conditioned bundles): the candidates are drawn the same
//! way from the image's mean logits over pixels, p(u) is the per-pixel softmax over the
//! candidates of the per-pixel LogitNorm logits, resampled to the latent's size
//! (bilinear, `align_corners = false`), and candidate k's noise prediction is
//! conditioned on E_k at every pixel: `mean((eps - sum_k p_k(u) eps_phi(x_t, t, E_k)(u))^2)`.
//!
//! Draws: per image and iteration one eps (shared by the image's candidates) and one
//! uniform `[K]` for the Gumbel noise, from torch's generator reseeded per image from
//! (run seed, key) ([`SeededDraws`]), so an image's draws do not depend on shard layout.
//!
//! Modes:
//! - episodic: per image, `steps` optimizer steps of `accum` iterations each (fresh draws
//!   and fresh candidates from the current logits every iteration); the image's b
//!   candidates run as one denoiser batch; then every adapted parameter and the
//!   optimizer are reset bit for bit.
//! - online (DUSA's setting): batches of `runtime.batch_size` images, one iteration per
//!   batch (all candidates of all images as one denoiser batch), an optimizer step every
//!   `accum` batches, one adapted state per variant stream (as TENT). `pred_before` is
//!   the live stream's classifier before this batch's update (eval mode, the forward
//!   that the loss uses); `pred_after` is the classifier after the update (a second,
//!   no-grad forward). With `accum > 1`, a batch that does not complete an accumulation
//!   cycle changes no weight, so its `pred_after` equals its `pred_before`.
//!
//! Invariants: the classifier runs in eval mode (BatchNorm statistics are never
//! written). A non-finite loss is caught before its backward pass: the image (episodic)
//! or the batch (online) keeps its before-prediction with status `diverged`, and the
//! weights are those from before it. Hazard: online, switching variant streams or a
//! failed batch in the middle of an accumulation cycle: pending gradients are applied
//! to their own stream before a switch (a smaller step), and dropped by `recover`.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::{per_image, step_metric, step_records, Adapted, Method};
use crate::image::Prepared;
use crate::model::{Classifier, Diffusion};
use crate::sample::Status;
use crate::tta::optim::{Optimizer, OptimizerState};
use crate::tta::params::{AdaptedParams, VariantStreams};
use crate::tta::schedule::{add_noise, image_seed};
use crate::tta::{
    dense, predictions, AfterUpdate, BudgetConfig, DenseMap, DenseRow, Mode, OptimizerKind, Outcome, Precision,
    Prediction, StepRecord, StopReason, TtaConfig,
};

/// Where an image's eps and Gumbel uniforms come from.
pub trait DusaDraws: Send {
    /// Called before the first draw of each image.
    fn begin_image(&mut self, key: &str);
    /// eps `[1, latent...]` and uniforms `[1, classes]` for the image's next iteration.
    fn draw(&mut self, latent: &[i64], classes: i64, device: Device) -> (Tensor, Tensor);
}

/// Draws from torch's generator, reseeded per image from (seed, key): eps, then `u`.
pub struct SeededDraws {
    pub seed: u64,
}

impl DusaDraws for SeededDraws {
    fn begin_image(&mut self, key: &str) {
        tch::manual_seed(image_seed(self.seed, key));
    }

    fn draw(&mut self, latent: &[i64], classes: i64, device: Device) -> (Tensor, Tensor) {
        let mut shape = vec![1];
        shape.extend_from_slice(latent);
        let eps = Tensor::randn(&shape, (Kind::Float, device));
        let u = Tensor::rand([1, classes], (Kind::Float, device));
        (eps, u)
    }
}

/// Replays given draws in call order: `eps` is `[n, latent...]`, `u` is `[n, classes]`.
/// For parity tests against a reference implementation.
pub struct ReplayDraws {
    pub eps: Tensor,
    pub u: Tensor,
    pub next: i64,
}

impl DusaDraws for ReplayDraws {
    fn begin_image(&mut self, _key: &str) {}

    fn draw(&mut self, _latent: &[i64], _classes: i64, device: Device) -> (Tensor, Tensor) {
        let i = self.next;
        self.next += 1;
        (
            self.eps.narrow(0, i, 1).to_device(device),
            self.u.narrow(0, i, 1).to_device(device),
        )
    }
}

/// What one iteration computed, still on the device.
struct Pass {
    /// Per-image mixture loss `[B]` (not divided by `accum`).
    losses: Tensor,
    /// The classifier's logits (with gradients) `[B, K]` (`[B, K, h, w]` for a segmenter).
    logits: Tensor,
    /// Candidates `[B, b]`.
    candidates: Tensor,
}

/// One image adapted in episodic mode (weights not yet reset).
#[derive(Debug)]
pub struct DusaImage {
    /// What every episodic method reports for an image (`iteration_losses`: each
    /// iteration's loss as backpropagated, divided by `accum`).
    pub image: Adapted,
    /// Candidates of every iteration, in order.
    pub candidates: Vec<Vec<i64>>,
}

/// One online batch: per-image rows plus the batch loss.
#[derive(Debug)]
pub struct DusaBatch {
    pub before: Vec<Prediction>,
    pub after: Vec<Prediction>,
    /// A segmenter's maps before and after, per image (empty for a classifier).
    pub dense: Vec<DenseRow>,
    /// Each image's own mixture loss (not divided by `accum`).
    pub image_losses: Vec<f32>,
    /// Entropy of each image's softmax before the update.
    pub entropies: Vec<f32>,
    /// The batch loss as backpropagated (mean over images, divided by `accum`).
    pub loss: f32,
    pub candidates: Vec<Vec<i64>>,
    pub grad_norm: f32,
    /// Whether this batch completed an accumulation cycle (the weights changed).
    pub stepped: bool,
    pub diverged: Option<String>,
    /// Denoiser forward passes per image.
    pub denoiser_evals: u64,
    pub elapsed_ms: f64,
}

pub struct Dusa {
    classifier: Classifier,
    diffusion: Diffusion,
    params: AdaptedParams,
    /// Parameter values before the first image: the episodic reset target and where a
    /// new variant stream starts.
    originals: Vec<Tensor>,
    optimizer: Optimizer,
    draws: Box<dyn DusaDraws>,
    timestep: i64,
    topk: i64,
    random: i64,
    steps: usize,
    accum: usize,
    mode: Mode,
    /// Episodic mode: adaptive compute per image (all off by default).
    budget: BudgetConfig,
    precision: Precision,
    /// Classes listed per predictions row.
    report_topk: usize,
    batch_size: usize,
    /// Online mode: one adapted state per variant stream.
    streams: VariantStreams,
    /// Online mode: batches whose gradients wait for the optimizer step.
    pending: usize,
    /// Online mode: the state before the optimizer step in progress, restored when it fails.
    rollback: Option<(Vec<Tensor>, OptimizerState)>,
}

impl Dusa {
    pub fn new(
        classifier: Classifier,
        diffusion: Diffusion,
        cfg: &TtaConfig,
        seed: u64,
        batch_size: usize,
    ) -> Result<Self, tch::TchError> {
        let d = &cfg.dusa;
        let classes = classifier.num_classes;
        if d.topk == 0 || d.topk + d.random > classes {
            return Err(tch::TchError::Kind(format!(
                "tta.dusa.topk ({}) + tta.dusa.random ({}) candidates must be between 1 and the {classes} classes",
                d.topk, d.random
            )));
        }
        if d.timestep as i64 >= diffusion.num_timesteps {
            return Err(tch::TchError::Kind(format!(
                "tta.dusa.timestep = {} is outside the diffusion schedule's 0..{}",
                d.timestep, diffusion.num_timesteps
            )));
        }
        let params = super::adapted_parameters(&classifier, &diffusion, cfg)?;
        tracing::info!("dusa: {} + {} candidates at t = {}", d.topk, d.random, d.timestep);
        Ok(Dusa {
            originals: params.snapshot(),
            classifier,
            diffusion,
            params,
            // Adam: AdamW without weight decay has the same update.
            optimizer: Optimizer::new(OptimizerKind::Adamw, d.lr, 0.0, 0.0),
            draws: Box::new(SeededDraws { seed }),
            timestep: d.timestep as i64,
            topk: d.topk as i64,
            random: d.random as i64,
            steps: d.steps,
            accum: d.accum,
            mode: cfg.mode,
            budget: cfg.budget.clone(),
            precision: cfg.precision,
            report_topk: cfg.topk,
            batch_size: batch_size.max(1),
            streams: VariantStreams::default(),
            pending: 0,
            rollback: None,
        })
    }

    /// Replaces the draws, e.g. with a replay for parity tests.
    pub fn with_draws(mut self, draws: Box<dyn DusaDraws>) -> Self {
        self.draws = draws;
        self
    }

    pub fn adapted_parameters(&self) -> &AdaptedParams {
        &self.params
    }

    /// Candidates per image (b = topk + random): denoiser forward passes per iteration.
    fn candidates_per_image(&self) -> i64 {
        self.topk + self.random
    }

    /// z0 for diffusion views (each `view.numel()` floats), no gradients.
    fn encode(&self, gens: &[&[f32]]) -> Result<Tensor, tch::TchError> {
        let view = &self.diffusion.view;
        let side = view.resolution as i64;
        let flat: Vec<f32> = gens.iter().flat_map(|g| g.iter().copied()).collect();
        let x_gen = Tensor::from_slice(&flat)
            .view([gens.len() as i64, view.channels.count() as i64, side, side])
            .to_device(self.classifier.device);
        Ok(tch::no_grad(|| self.autocast(|| self.diffusion.encode(&x_gen)))?.to_kind(Kind::Float))
    }

    /// One iteration for a batch: the classifier's logits on `x` (with gradients), the
    /// candidates from them and `u`, and each image's mixture loss at the fixed timestep.
    /// All candidates of all images run as one denoiser batch.
    fn pass(&self, x: &Tensor, z0: &Tensor, eps: &Tensor, u: &Tensor) -> Result<Pass, tch::TchError> {
        let logits = self.autocast(|| self.classifier.logits(x))?.to_kind(Kind::Float);
        let n = logits.size()[0];
        let b = self.candidates_per_image();
        let dense = self.classifier.task.is_dense();
        let candidates = tch::no_grad(|| {
            // A segmenter's image-level scores: its mean logits over pixels.
            let scores = match dense {
                true => logits.mean_dim([2i64, 3].as_slice(), false, Kind::Float),
                false => logits.shallow_clone(),
            };
            let top = scores.topk(self.topk, -1, true, true).1;
            if self.random == 0 {
                return top;
            }
            // Gumbel-top-k over the classes outside the top k.
            let gumbel = -(-u.clamp(1e-20, 1.0).log()).log();
            let keys = (&scores + gumbel).scatter_value(1, &top, f64::NEG_INFINITY);
            let drawn = keys.topk(self.random, -1, true, true).1;
            Tensor::cat(&[top, drawn], 1)
        });
        // LogitNorm over the class dimension (per pixel for a segmenter), then p over the
        // candidates: [n, b] or [n, b, H, W] at the latent's size.
        let normalised = &logits / logits.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
        let latent = self.diffusion.latent_shape.clone();
        let (p, cond) = if dense {
            let s = logits.size();
            let at = candidates.view([n, b, 1, 1]).expand([n, b, s[2], s[3]], false);
            let mut p = normalised.gather(1, &at, false).softmax(1, Kind::Float);
            if s[2..] != latent[1..] {
                p = p.upsample_bilinear2d([latent[1], latent[2]], false, None, None);
            }
            let e = self.diffusion.embeddings.index_select(0, &candidates.flatten(0, -1));
            let d = e.size()[1];
            let cond = e.view([n * b, d, 1, 1]).expand([n * b, d, latent[1], latent[2]], false);
            (p.unsqueeze(2), cond)
        } else {
            let p = normalised.gather(1, &candidates, false).softmax(-1, Kind::Float);
            let mut weights = vec![n, b];
            weights.extend(vec![1; eps.dim() - 1]);
            let cond = self.diffusion.embeddings.index_select(0, &candidates.flatten(0, -1));
            (p.view(weights.as_slice()), cond)
        };
        let t = Tensor::full([n], self.timestep, (Kind::Int64, logits.device()));
        let z_t = add_noise(&self.diffusion.alphas_cumprod, z0, &t, eps);
        let z_t = z_t.repeat_interleave_self_int(b, Some(0), None::<i64>);
        let t = Tensor::full([n * b], self.timestep, (Kind::Int64, logits.device()));
        let predicted = self.autocast(|| self.diffusion.predict_noise(&z_t, &t, &cond))?;
        let mut shape = vec![n, b];
        shape.extend_from_slice(&eps.size()[1..]);
        let predicted = predicted.to_kind(Kind::Float).view(shape.as_slice());
        let mixture = (p * predicted).sum_dim_intlist(1, false, Kind::Float);
        let losses = (mixture - eps).square().flatten(1, -1).mean_dim(1, false, Kind::Float);
        Ok(Pass {
            losses,
            logits,
            candidates,
        })
    }

    /// Episodic adaptation of one image: `steps` steps of `accum` iterations, gated by
    /// `[tta.budget]` (the source prediction comes from its own no-grad forward, so a
    /// confident image costs no denoiser pass). Leaves the adapted weights in place
    /// (`run` resets them after each image; parity tests read them).
    pub fn adapt_image(&mut self, key: &str, pixels: &[f32], gen: &[f32]) -> Result<DusaImage, tch::TchError> {
        let started = Instant::now();
        let device = self.classifier.device;
        self.classifier.set_eval();
        let x = self.classifier.batch_from(&[pixels]);
        let z0 = self.encode(&[gen])?;
        let latent = self.diffusion.latent_shape.clone();
        let classes = self.classifier.num_classes as i64;
        let (task, crop) = (self.classifier.task, self.classifier.view.crop);
        let (before, before_map) = self.predict(&x)?;
        let mut gate = self.budget.start(&before);
        if let Some(reason) = gate.skip() {
            return Ok(DusaImage {
                image: Adapted::skipped(before, reason, started),
                candidates: Vec::new(),
            });
        }
        self.draws.begin_image(key);
        self.params.zero_grad();
        let mut iteration_losses = Vec::with_capacity(self.steps * self.accum);
        let mut candidates = Vec::with_capacity(self.steps * self.accum);
        let mut step_metrics: Vec<Tensor> = Vec::with_capacity(self.steps);
        let mut step_host: Vec<(f32, f64)> = Vec::with_capacity(self.steps);
        let mut step_maps: Vec<DenseMap> = Vec::new();
        let mut diverged = None;
        let mut stop_reason = StopReason::None;
        let b = self.candidates_per_image() as u64;
        'steps: for step in 0..self.steps {
            if let Some(reason) = gate.before_step(self.accum as u64 * b) {
                stop_reason = reason;
                break;
            }
            let mut step_loss = 0f64;
            let mut seen = None;
            for _ in 0..self.accum {
                let (eps, u) = self.draws.draw(&latent, classes, device);
                let pass = self.pass(&x, &z0, &eps, &u)?;
                gate.charge(b);
                let loss = pass.losses.mean(Kind::Float) / self.accum as f64;
                let value = f64::try_from(&loss)?; // one sync per iteration, before backward
                iteration_losses.push(value as f32);
                candidates.push(Vec::<i64>::try_from(
                    pass.candidates.flatten(0, -1).to_device(Device::Cpu),
                )?);
                if !value.is_finite() {
                    diverged = Some(format!("loss became {value} at step {step}; source prediction kept"));
                    break 'steps;
                }
                loss.f_backward()?;
                step_loss += value;
                seen = Some(pass.logits.detach());
            }
            let grad_norm = self.params.grad_norm();
            self.optimizer.step(&self.params.tensors)?;
            self.params.zero_grad();
            let seen = seen.expect("accum >= 1");
            if task.is_dense() {
                // Scored against the label by the writer (the steps table's metrics).
                step_maps.extend(dense::maps(&seen, task, crop)?);
            }
            step_metrics.push(step_metric(&seen, task, &grad_norm.to_device(device)));
            step_host.push((step_loss as f32, started.elapsed().as_secs_f64() * 1e3));
            match gate.after_update(step, self.steps, || Ok::<_, tch::TchError>(self.predict(&x)?.0))? {
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
        let (after, after_map) = match (&diverged, gate.take_prediction()) {
            (Some(_), _) => (before.clone(), None),
            // The weights have not changed since that prediction (budgets are refused
            // for dense tasks, so there is no map to carry).
            (None, Some(p)) => (p, None),
            (None, None) => self.predict(&x)?,
        };
        if diverged.is_some() {
            self.reset();
            stop_reason = StopReason::Diverged;
        }
        let dense = before_map.map(|b| {
            let a = after_map.filter(|_| diverged.is_none()).unwrap_or_else(|| b.clone());
            DenseRow::new(crop, b, a).with_steps(step_maps)
        });
        let steps = step_records(&step_metrics, &step_host, self.optimizer.lr() as f32)?;
        Ok(DusaImage {
            image: Adapted {
                before,
                after,
                iteration_losses,
                steps,
                diverged,
                denoiser_evals: gate.evals(),
                stop_reason,
                elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                dense,
            },
            candidates,
        })
    }

    /// Online adaptation of one batch of images of the live variant stream: one
    /// iteration, an optimizer step when it completes an accumulation cycle.
    pub fn adapt_batch(
        &mut self,
        keys: &[&str],
        pixels: &[&[f32]],
        gens: &[&[f32]],
    ) -> Result<DusaBatch, tch::TchError> {
        let started = Instant::now();
        let device = self.classifier.device;
        self.classifier.set_eval();
        let x = self.classifier.batch_from(pixels);
        let z0 = self.encode(gens)?;
        let latent = self.diffusion.latent_shape.clone();
        let classes = self.classifier.num_classes as i64;
        let (eps, u): (Vec<Tensor>, Vec<Tensor>) = keys
            .iter()
            .map(|key| {
                self.draws.begin_image(key);
                self.draws.draw(&latent, classes, device)
            })
            .unzip();
        let pass = self.pass(&x, &z0, &Tensor::cat(&eps, 0), &Tensor::cat(&u, 0))?;
        let (before, before_maps) = self.outputs(&pass.logits.detach())?;
        let image_losses = Vec::<f32>::try_from(pass.losses.detach().to_device(Device::Cpu))?;
        let entropies = Vec::<f32>::try_from(entropy(&pass.logits.detach()).to_device(Device::Cpu))?;
        let candidates = Vec::<i64>::try_from(pass.candidates.flatten(0, -1).to_device(Device::Cpu))?
            .chunks(self.candidates_per_image() as usize)
            .map(<[i64]>::to_vec)
            .collect();
        let loss = pass.losses.mean(Kind::Float) / self.accum as f64;
        let loss_value = f64::try_from(&loss)?;
        let denoiser_evals = self.candidates_per_image() as u64;
        if !loss_value.is_finite() {
            // Caught before the backward pass: no gradient and no weight changed.
            let crop = self.classifier.view.crop;
            return Ok(DusaBatch {
                dense: before_maps
                    .into_iter()
                    .map(|m| DenseRow::new(crop, m.clone(), m))
                    .collect(),
                after: before.clone(),
                before,
                image_losses,
                entropies,
                loss: loss_value as f32,
                candidates,
                grad_norm: 0.0,
                stepped: false,
                diverged: Some(format!("batch loss became {loss_value}; prediction before kept")),
                denoiser_evals,
                elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            });
        }
        loss.f_backward()?;
        self.pending += 1;
        let grad_norm = f64::try_from(&self.params.grad_norm())? as f32;
        let stepped = self.pending >= self.accum;
        if stepped {
            self.step_pending()?;
        }
        let logits = tch::no_grad(|| self.autocast(|| self.classifier.logits(&x)))?;
        let (after, after_maps) = self.outputs(&logits)?;
        let crop = self.classifier.view.crop;
        Ok(DusaBatch {
            dense: before_maps
                .into_iter()
                .zip(after_maps)
                // The batch's one iteration saw the maps before the update.
                .map(|(b, a)| DenseRow::new(crop, b.clone(), a).with_steps(vec![b]))
                .collect(),
            before,
            after,
            image_losses,
            entropies,
            loss: loss_value as f32,
            candidates,
            grad_norm,
            stepped,
            diverged: None,
            denoiser_evals,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Applies the accumulated gradients (online), with a rollback point while it runs.
    fn step_pending(&mut self) -> Result<(), tch::TchError> {
        self.rollback = Some((self.params.snapshot(), self.optimizer.snapshot()));
        self.optimizer.step(&self.params.tensors)?;
        self.rollback = None;
        self.params.zero_grad();
        self.pending = 0;
        Ok(())
    }

    /// The classifier's prediction for one image `x` as the weights are now, without
    /// gradients; a segmenter's is a placeholder and its map.
    fn predict(&self, x: &Tensor) -> Result<(Prediction, Option<DenseMap>), tch::TchError> {
        let logits = tch::no_grad(|| self.autocast(|| self.classifier.logits(x)))?;
        let (mut p, maps) = self.outputs(&logits)?;
        Ok((p.remove(0), maps.into_iter().next()))
    }

    /// Host predictions of a batch's `logits`: top-k rows for a classifier; for a
    /// segmenter placeholders (no image-level class) and the maps at crop size.
    fn outputs(&self, logits: &Tensor) -> Result<(Vec<Prediction>, Vec<DenseMap>), tch::TchError> {
        let task = self.classifier.task;
        if !task.is_dense() {
            return Ok((predictions(logits, self.report_topk)?, Vec::new()));
        }
        let maps = dense::maps(logits, task, self.classifier.view.crop)?;
        Ok((vec![Prediction::placeholder(); maps.len()], maps))
    }

    /// Back to the weights and optimizer state from before the first image.
    pub fn reset(&mut self) {
        self.params.zero_grad();
        self.params.restore(&self.originals);
        self.optimizer.reset();
    }

    fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.precision == Precision::Bf16 {
            crate::tta::autocast::bf16(f)
        } else {
            f()
        }
    }

    fn run_episodic(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        per_image(batch, |p, pixels, gen| {
            let adapted = self.adapt_image(&p.key, pixels, gen);
            self.reset();
            Ok(adapted?.image.into_outcome(p))
        })
    }

    fn run_online(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        let usable: Vec<(&Prepared, &[f32], &[f32])> = batch
            .iter()
            .filter_map(|p| Some((p, p.pixels.as_deref()?, p.gen_pixels.as_deref()?)))
            .collect();
        let mut result = None;
        if let Some((first, _, _)) = usable.first() {
            // The adapt stage never mixes variants in a batch. Gradients pending for the
            // live stream go to it before it is parked.
            if first.variant != self.streams.live() && self.pending > 0 {
                self.step_pending()?;
            }
            self.streams
                .switch(first.variant, &self.params, &mut self.optimizer, &self.originals);
            let keys: Vec<&str> = usable.iter().map(|(p, _, _)| p.key.as_str()).collect();
            let pixels: Vec<&[f32]> = usable.iter().map(|u| u.1).collect();
            let gens: Vec<&[f32]> = usable.iter().map(|u| u.2).collect();
            result = Some(self.adapt_batch(&keys, &pixels, &gens)?);
        }
        let Some(r) = result else {
            return Ok(batch.iter().map(Outcome::unpredicted).collect());
        };
        let ms = r.elapsed_ms / usable.len() as f64;
        let lr = self.optimizer.lr() as f32;
        let mut dense_rows = r.dense.into_iter();
        let mut rows = r
            .before
            .into_iter()
            .zip(r.after)
            .zip(r.image_losses.into_iter().zip(r.entropies))
            .zip(usable.iter().map(|u| u.0));
        Ok(batch
            .iter()
            .map(|p| {
                if p.pixels.is_none() || p.gen_pixels.is_none() {
                    return Outcome::unpredicted(p);
                }
                let (((before, after), (loss, entropy)), q) = rows.next().expect("one result per usable image");
                debug_assert_eq!(q.key, p.key);
                let mut o = Outcome::blank(p.key.clone(), p.label, p.defect.clone());
                o.step_log = vec![StepRecord {
                    step: 0,
                    loss,
                    pred: before.class,
                    conf: before.conf,
                    entropy,
                    lr,
                    grad_norm: r.grad_norm,
                    elapsed_ms: r.elapsed_ms,
                }];
                o.set_before(&before);
                o.set_after(after);
                o.dense = dense_rows.next();
                o.loss_first = Some(loss);
                o.loss_last = Some(loss);
                o.steps = 1;
                o.adapt_ms = ms;
                o.denoiser_evals = r.denoiser_evals;
                if let Some(reason) = &r.diverged {
                    o.status = Status::Diverged;
                    o.error = Some(reason.clone());
                    o.stop_reason = StopReason::Diverged;
                }
                o
            })
            .collect())
    }
}

/// Entropy of each image's softmax over classes (dimension 1), `[B]`; a segmenter's is
/// the mean over its pixels.
fn entropy(logits: &Tensor) -> Tensor {
    let probs = logits.to_kind(Kind::Float).softmax(1, Kind::Float);
    let per = -(&probs * probs.clamp_min(1e-12).log()).sum_dim_intlist(1, false, Kind::Float);
    match per.dim() {
        1 => per,
        _ => per.flatten(1, -1).mean_dim(1, false, Kind::Float),
    }
}

impl Method for Dusa {
    fn batch_size(&self) -> usize {
        match self.mode {
            Mode::Episodic => 1,
            Mode::Online => self.batch_size,
        }
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        match self.mode {
            Mode::Episodic => self.run_episodic(batch),
            Mode::Online => self.run_online(batch),
        }
    }

    /// Episodic: back to the source weights. Online: an interrupted optimizer step is
    /// undone; the gradients of an unfinished accumulation cycle are dropped.
    fn recover(&mut self) {
        self.classifier.set_eval();
        match self.mode {
            Mode::Episodic => self.reset(),
            Mode::Online => {
                if let Some((params, state)) = self.rollback.take() {
                    self.params.restore(&params);
                    self.optimizer.restore(state);
                }
                self.params.zero_grad();
                self.pending = 0;
            }
        }
    }
}
