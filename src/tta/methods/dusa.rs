//! DUSA (ALGORITHM.md, "DUSA"; Li et al., NeurIPS 2024): one timestep, a few candidate
//! classes per image, and the loss `mean((eps - sum_k p_k eps_phi(x_t, t, E_{c_k}))^2)`,
//! a mixture of noise *predictions*, one per candidate under its own class embedding.
//! Defaults follow the authors' recipe: the whole classifier adapts, head included
//! (`tta.dusa.adapt_head`), with the denoiser (`tta.adapt`), Adam, t = 100, 4 + 2
//! candidates; `pipelines/dusa-imagenet-c.toml` is their ImageNet-C setting (8 x 8).
//!
//! Classifiers: the top `topk` classes of the raw logits, plus `random` classes drawn
//! without replacement from the others with probabilities softmax(raw logits), by the
//! Gumbel-top-k trick (top `random` of `logits + Gumbel(u)` over the others: the same
//! distribution as successive draws, and no underflow for confident classifiers).
//! p = softmax over the candidates' l2-normalised logits (LogitNorm).
//!
//! Segmenters (concat-conditioned bundles), as the authors' segmentation code: the
//! candidates are the union of every pixel's top `topk` classes, always including every
//! pixel's top-1, at most `max_dense_candidates` (past that, the other classes by how
//! many pixels rank them; ascending class order; `random` is not used). p(u) is the
//! plain per-pixel softmax over the candidates' logits, resampled to the latent's size
//! (bilinear, `align_corners = false`), and candidate k's noise prediction is
//! conditioned on E_k at every pixel: `mean((eps - sum_k p_k(u) eps_phi(x_t, t, E_k)(u))^2)`.
//! Images of one batch may have different candidate counts: the batch is padded with
//! masked candidates (p = 0, their passes are wasted work), and `denoiser_evals` counts
//! an image's own candidates.
//!
//! Draws: per image and iteration one eps (shared by the image's candidates) and one
//! uniform `[K]` for the Gumbel noise, from a generator of the image's own seeded from
//! (run seed, key) ([`SeededDraws`]), so an image's draws do not depend on shard layout,
//! device, thread or any other user of torch's generator.
//!
//! Modes:
//! - episodic: per image, `steps` optimizer steps of `accum` iterations each (fresh draws
//!   and fresh candidates from the current logits every iteration); the image's
//!   candidates run as one denoiser batch; then every adapted parameter and the
//!   optimizer are reset bit for bit (not needed, and skipped, for an image the budget
//!   let through unadapted).
//! - online (DUSA's setting): batches of `runtime.batch_size` images, one iteration per
//!   batch (all candidates of all images as one denoiser batch), an optimizer step every
//!   `accum` batches (batch 8 x accum 8 has the gradient of one batch of 64), one adapted
//!   state per variant stream (as TENT). As in the authors' runner and TENT, a row's
//!   prediction is the forward that the loss used, before the update: `pred_before` and
//!   `pred_after` are both that live-stream prediction (no second forward). The gain of
//!   online adaptation is read against a `source` run of the same samples.
//!
//! Invariants: the classifier runs in eval mode (BatchNorm statistics are never
//! written). A non-finite loss is caught before its backward pass, a non-finite gradient
//! before its step, non-finite weights after it, and a non-finite prediction (episodic)
//! after adaptation: the image (episodic) or the batch (online) keeps its prediction from
//! before with status `diverged`, and the weights and gradients are those from before
//! it, so an online stream never holds a non-finite value. Online, `recover` returns to
//! the state before the failed batch whatever failed: its gradients, the accumulation
//! count, and the weights and optimizer state if its step ran. Hazard: online,
//! switching variant streams in the middle of an accumulation cycle applies the pending
//! gradients to their own stream before the switch (a smaller step); with `accum > 1`
//! each batch keeps a device copy of the pending gradients (one more model-size copy).

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::{per_image, step_metric, step_records, Adapted, InjectedFault, Method};
use crate::image::Prepared;
use crate::model::{Classifier, Diffusion};
use crate::rng::Rng;
use crate::sample::Status;
use crate::tta::optim::{Optimizer, OptimizerState};
use crate::tta::params::{AdaptedParams, VariantStreams};
use crate::tta::schedule::{add_noise, image_seed, normal_tensor, uniform_tensor};
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

/// Draws from a generator of the image's own, seeded from (seed, key) at
/// `begin_image` (a host [`Rng`] copied to the device, as [`crate::tta::SeededNoise`]):
/// eps, then `u`.
pub struct SeededDraws {
    seed: u64,
    rng: Rng,
}

impl SeededDraws {
    pub fn new(seed: u64) -> SeededDraws {
        SeededDraws {
            seed,
            rng: Rng::new(image_seed(seed, "")),
        }
    }
}

impl DusaDraws for SeededDraws {
    fn begin_image(&mut self, key: &str) {
        self.rng = Rng::new(image_seed(self.seed, key));
    }

    fn draw(&mut self, latent: &[i64], classes: i64, device: Device) -> (Tensor, Tensor) {
        let mut shape = vec![1];
        shape.extend_from_slice(latent);
        let eps = normal_tensor(&mut self.rng, &shape, device);
        let u = uniform_tensor(&mut self.rng, &[1, classes], device);
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

/// What one iteration computed, still on the device unless said.
struct Pass {
    /// Per-image mixture loss `[B]` (not divided by `accum`).
    losses: Tensor,
    /// The classifier's logits (with gradients) `[B, K]` (`[B, K, h, w]` for a segmenter).
    logits: Tensor,
    /// Each image's candidates, on the host.
    candidates: Vec<Vec<i64>>,
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
    /// Each image's prediction from the forward the loss used (the live stream before
    /// this batch's update): the row's `pred_before` and `pred_after`.
    pub predictions: Vec<Prediction>,
    /// A segmenter's maps from that forward, per image (empty for a classifier).
    pub dense: Vec<DenseRow>,
    /// Each image's own mixture loss (not divided by `accum`).
    pub image_losses: Vec<f32>,
    /// Entropy of each image's softmax in that forward.
    pub entropies: Vec<f32>,
    /// The batch loss as backpropagated (mean over images, divided by `accum`).
    pub loss: f32,
    /// Each image's candidates.
    pub candidates: Vec<Vec<i64>>,
    /// Norm of the gradients accumulated so far (this batch's included).
    pub grad_norm: f32,
    /// Whether this batch completed an accumulation cycle (the weights changed).
    pub stepped: bool,
    pub diverged: Option<String>,
    /// Denoiser forward passes per image (its candidates).
    pub denoiser_evals: Vec<u64>,
    pub elapsed_ms: f64,
}

/// Online: what [`Method::recover`] puts back when a batch fails, wherever it failed.
struct BatchRollback {
    /// Batches of the accumulation cycle before this one.
    pending: usize,
    /// Their gradients (when `pending > 0`).
    grads: Option<Vec<Tensor>>,
    /// Weights and optimizer state from before this batch's optimizer step, once it began.
    step: Option<(Vec<Tensor>, OptimizerState)>,
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
    /// Segmenters: the most candidates per image.
    max_dense_candidates: usize,
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
    /// Online mode: the state before the batch in progress (None between batches).
    batch_rollback: Option<BatchRollback>,
    fault: InjectedFault,
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
        if classifier.task.is_dense() && d.max_dense_candidates == 0 {
            return Err(tch::TchError::Kind(
                "tta.dusa.max_dense_candidates must be at least 1".into(),
            ));
        }
        let params = super::adapted_parameters(&classifier, &diffusion, cfg, d.adapt_head)?;
        match classifier.task.is_dense() {
            true => tracing::info!(
                "dusa: per-pixel top-{} candidates (at most {}) at t = {}",
                d.topk,
                d.max_dense_candidates,
                d.timestep
            ),
            false => tracing::info!("dusa: {} + {} candidates at t = {}", d.topk, d.random, d.timestep),
        }
        Ok(Dusa {
            originals: params.snapshot(),
            classifier,
            diffusion,
            params,
            // Adam: AdamW without weight decay has the same update.
            optimizer: Optimizer::new(OptimizerKind::Adamw, d.lr, 0.0, 0.0),
            draws: Box::new(SeededDraws::new(seed)),
            timestep: d.timestep as i64,
            topk: d.topk as i64,
            random: d.random as i64,
            max_dense_candidates: d.max_dense_candidates,
            steps: d.steps,
            accum: d.accum,
            mode: cfg.mode,
            budget: cfg.budget.clone(),
            precision: cfg.precision,
            report_topk: cfg.topk,
            batch_size: batch_size.max(1),
            streams: VariantStreams::default(),
            pending: 0,
            batch_rollback: None,
            fault: InjectedFault::from_env(),
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

    /// A classifier's candidates per image (b = topk + random): denoiser forward passes
    /// per iteration. (A segmenter's count depends on the image.)
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

    /// A classifier's candidates `[n, topk + random]` from its logits and `u`.
    fn class_candidates(&self, logits: &Tensor, u: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let top = logits.topk(self.topk, -1, true, true).1;
            if self.random == 0 {
                return top;
            }
            // Gumbel-top-k over the classes outside the top k.
            let gumbel = -(-u.clamp(1e-20, 1.0).log()).log();
            let keys = (logits + gumbel).scatter_value(1, &top, f64::NEG_INFINITY);
            let drawn = keys.topk(self.random, -1, true, true).1;
            Tensor::cat(&[top, drawn], 1)
        })
    }

    /// A segmenter's candidates per image (module doc): every pixel's top-1 classes,
    /// then the classes in some pixel's top `topk` by how many pixels rank them, up to
    /// `max_dense_candidates` (never dropping a top-1 class), in ascending class order.
    fn dense_candidates(&self, logits: &Tensor) -> Result<Vec<Vec<i64>>, tch::TchError> {
        let (n, k) = (logits.size()[0], logits.size()[1]);
        let counts = tch::no_grad(|| {
            let ranked = logits.topk(self.topk.min(k), 1, true, true).1.flatten(1, -1);
            let top1 = logits.argmax(1, false).flatten(1, -1);
            let count = |idx: &Tensor| {
                Tensor::zeros([n, k], (Kind::Int64, logits.device())).scatter_add(1, idx, &idx.ones_like())
            };
            Tensor::cat(&[count(&top1), count(&ranked)], 1).to_device(Device::Cpu)
        });
        let counts = Vec::<i64>::try_from(counts.flatten(0, -1))?;
        let k = k as usize;
        Ok(counts
            .chunks(2 * k)
            .map(|row| {
                let (top1, ranked) = row.split_at(k);
                let mut chosen: Vec<i64> = (0..k as i64).filter(|&c| top1[c as usize] > 0).collect();
                let mut others: Vec<i64> = (0..k as i64)
                    .filter(|&c| top1[c as usize] == 0 && ranked[c as usize] > 0)
                    .collect();
                others.sort_by_key(|&c| (-ranked[c as usize], c));
                let room = self.max_dense_candidates.saturating_sub(chosen.len());
                chosen.extend(others.into_iter().take(room));
                chosen.sort_unstable();
                chosen
            })
            .collect())
    }

    /// One iteration for a batch: the classifier's logits on `x` (with gradients), the
    /// candidates from them (and `u`), and each image's mixture loss at the fixed
    /// timestep. All candidates of all images run as one denoiser batch.
    fn pass(&self, x: &Tensor, z0: &Tensor, eps: &Tensor, u: &Tensor) -> Result<Pass, tch::TchError> {
        let logits = self.autocast(|| self.classifier.logits(x))?.to_kind(Kind::Float);
        let n = logits.size()[0];
        let device = logits.device();
        let latent = self.diffusion.latent_shape.clone();
        let (candidates, (candidate_ids, p)) = if self.classifier.task.is_dense() {
            // Padded to the batch's largest set with the image's first candidate, whose
            // padded copies get p = 0.
            let lists = self.dense_candidates(&logits.detach())?;
            let b = lists.iter().map(Vec::len).max().unwrap_or(1);
            let padded: Vec<i64> = lists
                .iter()
                .flat_map(|l| l.iter().copied().chain(std::iter::repeat(l[0]).take(b - l.len())))
                .collect();
            let mask: Vec<bool> = lists.iter().flat_map(|l| (0..b).map(move |j| j >= l.len())).collect();
            let b = b as i64;
            let candidates = Tensor::from_slice(&padded).view([n, b]).to_device(device);
            let padding = Tensor::from_slice(&mask).view([n, b, 1, 1]).to_device(device);
            let s = logits.size();
            let at = candidates.view([n, b, 1, 1]).expand([n, b, s[2], s[3]], false);
            let scores = logits.gather(1, &at, false).masked_fill(&padding, f64::NEG_INFINITY);
            let mut p = scores.softmax(1, Kind::Float);
            if s[2..] != latent[1..] {
                p = p.upsample_bilinear2d([latent[1], latent[2]], false, None, None);
            }
            (lists, (candidates, p.unsqueeze(2)))
        } else {
            let candidates = self.class_candidates(&logits.detach(), u);
            // LogitNorm, then p over the candidates.
            let normalised = &logits / logits.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
            let p = normalised.gather(1, &candidates, false).softmax(-1, Kind::Float);
            let b = candidates.size()[1];
            let mut weights = vec![n, b];
            weights.extend(vec![1; eps.dim() - 1]);
            let lists = Vec::<i64>::try_from(candidates.flatten(0, -1).to_device(Device::Cpu))?
                .chunks(b as usize)
                .map(<[i64]>::to_vec)
                .collect();
            (lists, (candidates, p.view(weights.as_slice())))
        };
        let b = candidate_ids.size()[1];
        let e = self.diffusion.embeddings.index_select(0, &candidate_ids.flatten(0, -1));
        let cond = match self.classifier.task.is_dense() {
            true => {
                let d = e.size()[1];
                e.view([n * b, d, 1, 1]).expand([n * b, d, latent[1], latent[2]], false)
            }
            false => e,
        };
        let t = Tensor::full([n], self.timestep, (Kind::Int64, device));
        let z_t = add_noise(&self.diffusion.alphas_cumprod, z0, &t, eps);
        let z_t = z_t.repeat_interleave_self_int(b, Some(0), None::<i64>);
        let t = Tensor::full([n * b], self.timestep, (Kind::Int64, device));
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
                let mut pass = self.pass(&x, &z0, &eps, &u)?;
                let image_candidates = pass.candidates.remove(0);
                gate.charge(image_candidates.len() as u64);
                candidates.push(image_candidates);
                let loss = pass.losses.mean(Kind::Float) / self.accum as f64;
                let value = f64::try_from(&loss)?; // one sync per iteration, before backward
                iteration_losses.push(value as f32);
                if !value.is_finite() {
                    diverged = Some(format!("loss became {value} at step {step}; source prediction kept"));
                    break 'steps;
                }
                loss.f_backward()?;
                step_loss += value;
                seen = Some(pass.logits.detach());
            }
            let grad_norm = self.params.grad_norm();
            let grad_value = f64::try_from(&grad_norm)?;
            if !grad_value.is_finite() {
                diverged = Some(format!(
                    "gradient norm became {grad_value} at step {step}; source prediction kept"
                ));
                break;
            }
            self.optimizer.step(&self.params.tensors)?;
            self.params.zero_grad();
            self.fault.after_update()?;
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
        let (mut after, mut after_map) = match (&diverged, gate.take_prediction()) {
            (Some(_), _) => (before.clone(), None),
            // The weights have not changed since that prediction (budgets are refused
            // for dense tasks, so there is no map to carry).
            (None, Some(p)) => (p, None),
            (None, None) => self.predict(&x)?,
        };
        if diverged.is_none() && !after.conf.is_finite() {
            diverged = Some(format!(
                "prediction became {} after adaptation; source prediction kept",
                after.conf
            ));
        }
        if diverged.is_some() {
            self.reset();
            after = before.clone();
            after_map = None;
            stop_reason = StopReason::Diverged;
        }
        let dense = before_map.map(|b| {
            let a = after_map.unwrap_or_else(|| b.clone());
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
    /// iteration, an optimizer step when it completes an accumulation cycle. Rows are
    /// scored from the iteration's forward, before the update.
    pub fn adapt_batch(
        &mut self,
        keys: &[&str],
        pixels: &[&[f32]],
        gens: &[&[f32]],
    ) -> Result<DusaBatch, tch::TchError> {
        let started = Instant::now();
        let device = self.classifier.device;
        self.classifier.set_eval();
        // The state to return to if this batch fails, wherever it fails.
        self.batch_rollback = Some(BatchRollback {
            pending: self.pending,
            grads: (self.pending > 0).then(|| self.params.grad_snapshot()),
            step: None,
        });
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
        let (predictions, maps) = self.outputs(&pass.logits.detach())?;
        let image_losses = Vec::<f32>::try_from(pass.losses.detach().to_device(Device::Cpu))?;
        let entropies = Vec::<f32>::try_from(entropy(&pass.logits.detach()).to_device(Device::Cpu))?;
        let denoiser_evals = pass.candidates.iter().map(|c| c.len() as u64).collect();
        let loss = pass.losses.mean(Kind::Float) / self.accum as f64;
        let loss_value = f64::try_from(&loss)?;
        let crop = self.classifier.view.crop;
        // The batch's one iteration saw these maps, before the update.
        let dense = maps
            .into_iter()
            .map(|m| DenseRow::new(crop, m.clone(), m.clone()).with_steps(vec![m]))
            .collect();
        let mut batch = DusaBatch {
            predictions,
            dense,
            image_losses,
            entropies,
            loss: loss_value as f32,
            candidates: pass.candidates,
            grad_norm: 0.0,
            stepped: false,
            diverged: None,
            denoiser_evals,
            elapsed_ms: 0.0,
        };
        if !loss_value.is_finite() {
            // Caught before the backward pass: no gradient and no weight changed.
            batch.diverged = Some(format!(
                "batch loss became {loss_value}; weights from before the batch kept"
            ));
        } else {
            loss.f_backward()?;
            batch.grad_norm = f64::try_from(&self.params.grad_norm())? as f32;
            if !batch.grad_norm.is_finite() {
                batch.diverged = Some(format!(
                    "gradient norm became {}; weights from before the batch kept",
                    batch.grad_norm
                ));
            } else if self.pending + 1 >= self.accum {
                batch.stepped = true;
                if let Some(why) = self.step_pending()? {
                    batch.diverged = Some(why);
                    batch.stepped = false;
                }
            } else {
                self.pending += 1;
            }
        }
        if batch.diverged.is_some() {
            // This batch's gradient (and step) undone; the cycle's earlier batches kept.
            self.undo_batch();
        }
        batch.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(batch)
    }

    /// Applies the accumulated gradients (online), keeping the state from before in the
    /// batch's rollback. `Some(reason)` when the step made a weight non-finite (the
    /// caller undoes it).
    fn step_pending(&mut self) -> Result<Option<String>, tch::TchError> {
        let before = (self.params.snapshot(), self.optimizer.snapshot());
        match &mut self.batch_rollback {
            Some(r) => r.step = Some(before),
            None => {
                self.batch_rollback = Some(BatchRollback {
                    pending: self.pending,
                    grads: Some(self.params.grad_snapshot()),
                    step: Some(before),
                })
            }
        }
        self.optimizer.step(&self.params.tensors)?;
        self.params.zero_grad();
        self.pending = 0;
        self.fault.after_update()?;
        if !self.params.all_finite()? {
            return Ok(Some(
                "the update made a weight non-finite; weights from before the batch kept".into(),
            ));
        }
        Ok(None)
    }

    /// Online: back to the state before the batch in progress (module doc).
    fn undo_batch(&mut self) {
        let Some(r) = self.batch_rollback.take() else {
            self.params.zero_grad();
            self.pending = 0;
            return;
        };
        if let Some((weights, state)) = r.step {
            self.params.restore(&weights);
            self.optimizer.restore(state);
        }
        match &r.grads {
            Some(grads) => self.params.restore_grads(grads),
            None => self.params.zero_grad(),
        }
        self.pending = r.pending;
    }

    /// The classifier's prediction for one image `x` as the weights are now, without
    /// gradients; a segmenter's is a placeholder and its map.
    fn predict(&self, x: &Tensor) -> Result<(Prediction, Option<DenseMap>), tch::TchError> {
        let logits = tch::no_grad(|| self.autocast(|| self.classifier.logits(x)))?;
        let (mut p, maps) = self.outputs(&logits)?;
        let mut prediction = p.remove(0);
        if self.classifier.task.is_dense() && !bool::try_from(logits.isfinite().all())? {
            // A non-finite map: the placeholder's confidence says so (diverged).
            prediction.conf = f32::NAN;
        }
        Ok((prediction, maps.into_iter().next()))
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
            // An image the budget let through changed nothing: no copy back.
            if !matches!(&adapted, Ok(a) if a.image.steps.is_empty() && a.image.diverged.is_none()) {
                self.reset();
            }
            Ok(adapted?.image.into_outcome(p))
        })
    }

    fn run_online(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        let usable: Vec<(&Prepared, &[f32], &[f32])> = batch
            .iter()
            .filter_map(|p| Some((p, p.pixels.as_deref()?, p.gen_pixels.as_deref()?)))
            .collect();
        let Some((first, _, _)) = usable.first() else {
            return Ok(batch.iter().map(Outcome::unpredicted).collect());
        };
        // The adapt stage never mixes variants in a batch. Gradients pending for the
        // live stream go to it before it is parked (their own small step).
        if first.variant != self.streams.live() && self.pending > 0 {
            self.batch_rollback = None;
            if let Some(why) = self.step_pending()? {
                tracing::warn!("dusa: the last step of stream {}: {why}", self.streams.live().tag());
                self.undo_batch();
                self.params.zero_grad();
                self.pending = 0;
            }
            self.batch_rollback = None;
        }
        self.streams
            .switch(first.variant, &self.params, &mut self.optimizer, &self.originals);
        let keys: Vec<&str> = usable.iter().map(|(p, _, _)| p.key.as_str()).collect();
        let pixels: Vec<&[f32]> = usable.iter().map(|u| u.1).collect();
        let gens: Vec<&[f32]> = usable.iter().map(|u| u.2).collect();
        let r = self.adapt_batch(&keys, &pixels, &gens)?;
        let ms = r.elapsed_ms / usable.len() as f64;
        let lr = self.optimizer.lr() as f32;
        let dense = self.classifier.task.is_dense();
        let mut dense_rows = r.dense.into_iter();
        let mut rows = r
            .predictions
            .into_iter()
            .zip(r.image_losses.into_iter().zip(r.entropies))
            .zip(r.denoiser_evals)
            .zip(usable.iter().map(|u| u.0));
        let outcomes = batch
            .iter()
            .map(|p| {
                if p.pixels.is_none() || p.gen_pixels.is_none() {
                    return Outcome::unpredicted(p);
                }
                let (((prediction, (loss, entropy)), evals), q) = rows.next().expect("one result per usable image");
                debug_assert_eq!(q.key, p.key);
                let mut o = Outcome::blank(p.key.clone(), p.label, p.defect.clone());
                o.step_log = vec![StepRecord {
                    step: 0,
                    loss,
                    pred: prediction.class,
                    conf: prediction.conf,
                    entropy,
                    lr,
                    grad_norm: r.grad_norm,
                    elapsed_ms: r.elapsed_ms,
                }];
                if dense {
                    // The map is the prediction: no image-level class (null columns).
                    o.dense = dense_rows.next();
                } else {
                    o.set_before(&prediction);
                    o.set_after(prediction);
                }
                o.loss_first = Some(loss);
                o.loss_last = Some(loss);
                o.steps = 1;
                o.adapt_ms = ms;
                o.denoiser_evals = evals;
                if let Some(reason) = &r.diverged {
                    o.status = Status::Diverged;
                    o.error = Some(reason.clone());
                    o.stop_reason = StopReason::Diverged;
                }
                o
            })
            .collect();
        // The batch is whole: nothing to roll back to any more.
        self.batch_rollback = None;
        Ok(outcomes)
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

    /// Episodic: back to the source weights. Online: back to the state before the failed
    /// batch (its gradients, the accumulation count, and its step if one ran).
    fn recover(&mut self) {
        self.classifier.set_eval();
        match self.mode {
            Mode::Episodic => self.reset(),
            Mode::Online => self.undo_batch(),
        }
    }
}
