//! `sar`: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023), as
//! the authors' sar.py and sam.py do it.

use std::collections::HashMap;
use std::time::Instant;

use tch::{Kind, Tensor};

use super::norm_online::{mask, softmax_entropy, NormOnline};
use super::{assemble, predicted_images, Method};
use crate::image::Prepared;
use crate::model::Classifier;
use crate::sample::Variant;
use crate::tta::params::AdaptedParams;
use crate::tta::{Outcome, SarConfig};

/// Momentum of the moving average of the second pass's loss (the authors' 0.9).
const EMA_MOMENTUM: f64 = 0.9;
/// SAM's guard against a zero gradient norm (the authors' 1e-12).
const SAM_EPS: f64 = 1e-12;

/// SAR, online, one stream per variant (as TENT, whose hazards it shares:
/// [`NormOnline`]). Per batch, in train mode:
/// 1. first pass: reliable = entropy below E0 = `e_margin` x ln C; backward of their
///    mean entropy; SAM's ascent: every adapted tensor moves by rho x g / (||g|| + 1e-12);
/// 2. second pass at the perturbed weights: of the first pass's reliable samples, those
///    still below E0; backward of their mean entropy at the perturbed point, weights put
///    back, one SGD step with that gradient;
/// 3. model recovery: the stream's moving average (0.9) of the second loss (batches
///    where it is defined); below `reset_below`, the stream's weights and optimizer go
///    back to the source.
///
/// As the authors' code, the moving average is kept across a recovery (their `reset`
/// clears it and the caller then stores it again), so recovery repeats batch after
/// batch until the second loss lifts the average back over the threshold.
/// `pred_after` is the first pass's train-mode prediction (the authors' output).
pub struct Sar {
    state: NormOnline,
    cfg: SarConfig,
    /// Per stream: the moving average of the second pass's loss.
    ema: HashMap<Variant, f64>,
    /// The live stream's average before the batch in progress, for `recover`.
    rollback_ema: Option<Option<f64>>,
}

/// What one SAR batch did, for the rows and the parity test.
pub struct SarBatch {
    /// First-pass train-mode logits `[B,C]`.
    pub logits: Tensor,
    /// Entropy below E0 on the first pass.
    pub reliable: Vec<bool>,
    /// Reliable on the first pass and below E0 on the second (perturbed) pass.
    pub kept: Vec<bool>,
    /// The first pass's loss (NaN when nothing was reliable, as torch's empty mean).
    pub loss_first: f32,
    /// The second pass's loss (NaN when nothing was kept).
    pub loss_second: f32,
    /// The stream's moving average after this batch.
    pub ema: Option<f64>,
    /// Whether this batch ended in model recovery.
    pub reset: bool,
}

impl Sar {
    pub fn new(classifier: Classifier, cfg: &SarConfig, batch_size: usize, topk: usize) -> Result<Self, tch::TchError> {
        if classifier.task.is_dense() {
            return Err(tch::TchError::Kind(
                "sar filters whole images by their class entropy; dtta runs it on classifiers only".into(),
            ));
        }
        let lr = cfg.lr_at(batch_size);
        let state = NormOnline::new(
            "sar",
            classifier,
            |name| !cfg.is_frozen(name),
            (lr, cfg.momentum),
            batch_size,
            topk,
        )?;
        tracing::info!(
            "sar adapts {} norm tensors (lr {lr:e}); frozen module paths: {:?}",
            state.params.tensors.len(),
            cfg.frozen
        );
        Ok(Sar {
            state,
            cfg: cfg.clone(),
            ema: HashMap::new(),
            rollback_ema: None,
        })
    }

    /// The adapted tensors, in selection order.
    pub fn adapted_parameters(&self) -> &AdaptedParams {
        &self.state.params
    }

    /// One SAR batch of `variant`'s stream (no rows; the parity test's entry point).
    pub fn adapt_batch(&mut self, images: &[&[f32]], variant: Variant) -> Result<SarBatch, tch::TchError> {
        self.begin(variant);
        let x = self.state.classifier.batch_from(images);
        self.state.classifier.set_train();
        let r = self.adapt(&x, variant);
        self.state.classifier.set_eval();
        r
    }

    fn begin(&mut self, variant: Variant) {
        self.state.begin(variant);
        self.rollback_ema = Some(self.ema.get(&variant).copied());
    }

    /// Both passes and the update on `x` (classifier in train mode).
    fn adapt(&mut self, x: &Tensor, variant: Variant) -> Result<SarBatch, tch::TchError> {
        let s = &mut self.state;
        s.params.zero_grad();
        let logits = s.classifier.logits(x)?;
        let e0 = self.cfg.e_margin * (logits.size()[1] as f64).ln();
        let entropy = softmax_entropy(&logits);
        let ids1 = entropy.f_lt(e0)?.nonzero().squeeze_dim(1);
        let loss_first = entropy.index_select(0, &ids1).mean(Kind::Float);
        loss_first.f_backward()?;

        // SAM's first step: to the worst point of the rho-ball, remembering where we were.
        let here = s.params.snapshot();
        let scale = self.cfg.rho / (s.params.grad_norm() + SAM_EPS);
        tch::no_grad(|| {
            for p in &s.params.tensors {
                let g = p.grad();
                if g.defined() {
                    let _ = p.shallow_clone().f_add_(&(&g * &scale))?;
                }
            }
            Ok::<_, tch::TchError>(())
        })?;
        s.params.zero_grad();

        let entropy2 = softmax_entropy(&s.classifier.logits(x)?).index_select(0, &ids1);
        let ids2 = entropy2.f_lt(e0)?.nonzero().squeeze_dim(1);
        let loss_second = entropy2.index_select(0, &ids2).mean(Kind::Float);
        let second = loss_second.detach().double_value(&[]);
        let previous = self.ema.get(&variant).copied();
        let ema = if second.is_nan() {
            previous
        } else {
            Some(previous.map_or(second, |e| EMA_MOMENTUM * e + (1.0 - EMA_MOMENTUM) * second))
        };
        loss_second.f_backward()?;
        // SAM's second step: back to where we were, then the base optimizer's update.
        s.params.restore(&here);
        s.optimizer.step(&s.params.tensors)?;
        s.params.zero_grad();
        s.fault.after_update()?;

        let reset = ema.is_some_and(|e| e < self.cfg.reset_below);
        if reset {
            tracing::debug!(
                "sar: loss average {:.4} below {}: model recovery",
                ema.unwrap_or_default(),
                self.cfg.reset_below
            );
            s.reset_live();
        }
        if let Some(e) = ema {
            self.ema.insert(variant, e);
        }
        let n = logits.size()[0];
        let kept_ids = ids1.index_select(0, &ids2);
        Ok(SarBatch {
            reliable: mask(&ids1, n)?,
            kept: mask(&kept_ids, n)?,
            logits: logits.detach(),
            loss_first: loss_first.detach().double_value(&[]) as f32,
            loss_second: second as f32,
            ema,
            reset,
        })
    }
}

impl Method for Sar {
    fn batch_size(&self) -> usize {
        self.state.batch_size()
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        let started = Instant::now();
        let images = predicted_images(batch);
        if images.is_empty() {
            return Ok(assemble(batch, Vec::new(), Vec::new(), 0.0));
        }
        let variant = batch[0].variant;
        self.begin(variant);
        let x = self.state.classifier.batch_from(&images);
        let source = self.state.eval_then_train(&x)?;
        let r = self.adapt(&x, variant)?;
        self.rollback_ema = None;
        self.state.end(batch, &source, &r.logits, started)
    }

    /// [`NormOnline::recover`], and the stream's loss average as before the batch.
    fn recover(&mut self) {
        self.state.recover();
        if let Some(saved) = self.rollback_ema.take() {
            let live = self.state.live();
            match saved {
                Some(e) => self.ema.insert(live, e),
                None => self.ema.remove(&live),
            };
        }
    }
}
