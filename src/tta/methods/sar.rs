//! `sar`: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023), as
//! the authors' sar.py and sam.py do it.

use tch::{Kind, Tensor};

use super::norm_online::{mask, softmax_entropy, NormOnline};
use super::Method;
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
    /// The weights, streams and undo; each stream's extra state is its moving average
    /// of the second pass's loss (a scalar tensor).
    state: NormOnline,
    cfg: SarConfig,
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
        })
    }

    /// The adapted tensors, in selection order.
    pub fn adapted_parameters(&self) -> &AdaptedParams {
        &self.state.params
    }

    /// One SAR batch of `variant`'s stream (no rows; the parity test's entry point).
    pub fn adapt_batch(&mut self, images: &[&[f32]], variant: Variant) -> Result<SarBatch, tch::TchError> {
        let cfg = &self.cfg;
        self.state.adapt_images(images, variant, |s, x| adapt(s, cfg, x))
    }
}

/// Both passes and the update on `x` (classifier in train mode), for the live stream.
fn adapt(s: &mut NormOnline, cfg: &SarConfig, x: &Tensor) -> Result<SarBatch, tch::TchError> {
    s.params.zero_grad();
    let logits = s.classifier.logits(x)?;
    let e0 = cfg.e_margin * (logits.size()[1] as f64).ln();
    let entropy = softmax_entropy(&logits);
    let ids1 = entropy.f_lt(e0)?.nonzero().squeeze_dim(1);
    let loss_first = entropy.index_select(0, &ids1).mean(Kind::Float);
    loss_first.f_backward()?;

    // SAM's first step: to the worst point of the rho-ball, remembering where we were.
    let here = s.params.snapshot();
    let scale = cfg.rho / (s.params.grad_norm() + SAM_EPS);
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
    let previous = s.extra().map(|e| e.double_value(&[]));
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

    let reset = ema.is_some_and(|e| e < cfg.reset_below);
    if reset {
        tracing::debug!(
            "sar: loss average {:.4} below {}: model recovery",
            ema.unwrap_or_default(),
            cfg.reset_below
        );
        s.reset_live();
    }
    if let Some(e) = ema {
        s.set_extra(Tensor::from(e));
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

impl Method for Sar {
    fn batch_size(&self) -> usize {
        self.state.batch_size()
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        let cfg = &self.cfg;
        self.state.run(batch, |s, x| Ok(adapt(s, cfg, x)?.logits))
    }

    /// [`NormOnline::recover`]: the stream's loss average goes back too.
    fn recover(&mut self) {
        self.state.recover();
    }
}
