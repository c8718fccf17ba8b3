//! `eata`: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022), as the
//! authors' eata.py does it; `fisher_alpha = 0` is ETA.

use tch::{Kind, Tensor};

use super::norm_online::{mask, softmax_entropy, NormOnline};
use super::Method;
use crate::image::Prepared;
use crate::model::Classifier;
use crate::sample::Variant;
use crate::tta::params::AdaptedParams;
use crate::tta::{EataConfig, Outcome};

/// Momentum of the moving average of kept probabilities (the authors' 0.9).
const PROBS_MOMENTUM: f64 = 0.9;

/// EATA, online, one stream per variant (as TENT, whose hazards it shares:
/// [`NormOnline`]). Per batch, in train mode:
/// 1. reliable: softmax entropy E below E0 = `e_margin` x ln C;
/// 2. kept: reliable and not redundant, i.e. |cos| of its probabilities with the
///    stream's moving average of kept probabilities below `d_margin` (no average yet:
///    every reliable sample is kept); the average then moves towards the kept mean;
/// 3. loss = mean over kept of E x 1/exp(E - E0) (the weight detached), plus
///    `fisher_alpha` x sum F (theta - theta0)^2; one SGD step, only when something is
///    kept (an empty batch leaves weights and momentum alone).
///
/// `pred_after` is the train-mode prediction before the update (the authors' output).
pub struct Eata {
    /// The weights, streams and undo; each stream's extra state is its moving average
    /// of kept probabilities `[C]` (absent until it keeps its first sample).
    state: NormOnline,
    cfg: EataConfig,
    /// Per adapted tensor: (Fisher information, source value); None for ETA.
    fisher: Option<Vec<(Tensor, Tensor)>>,
}

/// What one EATA batch did, for the rows and the parity test.
pub struct EataBatch {
    /// Train-mode logits `[B,C]` before the update.
    pub logits: Tensor,
    /// Entropy below E0.
    pub reliable: Vec<bool>,
    /// Reliable and not redundant: the samples the loss covers.
    pub kept: Vec<bool>,
    /// The loss that was minimised; None when nothing was kept (no update).
    pub loss: Option<f32>,
}

impl Eata {
    /// Computes the Fisher information from `fisher_images` (preprocessed clean images)
    /// unless `fisher_alpha` is 0: per batch of `fisher_batch`, the squared gradients of
    /// the cross-entropy on the model's own argmax (train mode), averaged over batches.
    /// The running statistics those passes touch are put back.
    pub fn new(
        classifier: Classifier,
        cfg: &EataConfig,
        fisher_images: &[Vec<f32>],
        batch_size: usize,
        topk: usize,
    ) -> Result<Self, tch::TchError> {
        if classifier.task.is_dense() {
            return Err(tch::TchError::Kind(
                "eata filters and weighs whole images by their class entropy; dtta runs it on classifiers only".into(),
            ));
        }
        let mut state = NormOnline::new("eata", classifier, |_| true, (cfg.lr, cfg.momentum), batch_size, topk)?;
        let fisher = if cfg.fisher_alpha == 0.0 {
            None
        } else {
            if fisher_images.is_empty() {
                return Err(tch::TchError::Kind(
                    "eata with fisher_alpha > 0 needs clean images (tta.eata.fisher_url); fisher_alpha = 0 is ETA"
                        .into(),
                ));
            }
            Some(fisher_information(&mut state, fisher_images, cfg.fisher_batch.max(1))?)
        };
        Ok(Eata {
            state,
            cfg: cfg.clone(),
            fisher,
        })
    }

    /// The adapted tensors, in selection order.
    pub fn adapted_parameters(&self) -> &AdaptedParams {
        &self.state.params
    }

    /// One EATA batch of `variant`'s stream (no rows; the parity test's entry point).
    pub fn adapt_batch(&mut self, images: &[&[f32]], variant: Variant) -> Result<EataBatch, tch::TchError> {
        let (cfg, fisher) = (&self.cfg, self.fisher.as_deref());
        self.state
            .adapt_images(images, variant, |s, x| adapt(s, cfg, fisher, x))
    }
}

/// The adaptation pass on `x` (classifier in train mode) of the live stream.
fn adapt(
    s: &mut NormOnline,
    cfg: &EataConfig,
    fisher: Option<&[(Tensor, Tensor)]>,
    x: &Tensor,
) -> Result<EataBatch, tch::TchError> {
    let logits = s.classifier.logits(x)?;
    let classes = logits.size()[1];
    let e0 = cfg.e_margin * (classes as f64).ln();
    let entropy = softmax_entropy(&logits);
    let ids1 = entropy.f_lt(e0)?.nonzero().squeeze_dim(1);
    let probs1 = tch::no_grad(|| logits.index_select(0, &ids1).softmax(-1, Kind::Float));
    let (ids2, average) = match s.extra() {
        Some(average) => {
            let cos = Tensor::cosine_similarity(&average.unsqueeze(0), &probs1, 1, 1e-8);
            let ids2 = cos.abs().f_lt(cfg.d_margin)?.nonzero().squeeze_dim(1);
            let kept = probs1.index_select(0, &ids2);
            let moved = if kept.size()[0] == 0 {
                average.copy()
            } else {
                average * PROBS_MOMENTUM + kept.mean_dim(0, false, Kind::Float) * (1.0 - PROBS_MOMENTUM)
            };
            (ids2, Some(moved))
        }
        None => {
            let all = Tensor::arange(ids1.size()[0], (Kind::Int64, logits.device()));
            let first = (probs1.size()[0] > 0).then(|| probs1.mean_dim(0, false, Kind::Float));
            (all, first)
        }
    };
    let kept_ids = ids1.index_select(0, &ids2);
    let kept_entropy = entropy.index_select(0, &kept_ids);
    let weight = (kept_entropy.detach() - e0).exp().reciprocal();
    let mut loss = (&kept_entropy * weight).mean(Kind::Float);
    for (p, (f, source)) in s.params.tensors.iter().zip(fisher.unwrap_or_default()) {
        let d = p - source;
        loss = loss + (f * &d * &d).sum(Kind::Float) * cfg.fisher_alpha;
    }
    let mut loss_value = None;
    if kept_ids.size()[0] > 0 {
        loss.f_backward()?;
        s.optimizer.step(&s.params.tensors)?;
        loss_value = Some(loss.detach().double_value(&[]) as f32);
        s.params.zero_grad();
        s.fault.after_update()?;
    }
    if let Some(average) = average {
        s.set_extra(average);
    }
    let n = logits.size()[0];
    Ok(EataBatch {
        reliable: mask(&ids1, n)?,
        kept: mask(&kept_ids, n)?,
        logits: logits.detach(),
        loss: loss_value,
    })
}

/// (F, theta0) per adapted tensor: the mean over batches of the squared gradient of the
/// cross-entropy on the model's own argmax, at the source weights, in train mode.
fn fisher_information(
    state: &mut NormOnline,
    images: &[Vec<f32>],
    batch: usize,
) -> Result<Vec<(Tensor, Tensor)>, tch::TchError> {
    let buffers = state.buffers_snapshot();
    state.classifier.set_train();
    let mut sums: Vec<Tensor> = state.params.tensors.iter().map(Tensor::zeros_like).collect();
    let mut batches = 0;
    let result = (|| {
        for chunk in images.chunks(batch) {
            let views: Vec<&[f32]> = chunk.iter().map(Vec::as_slice).collect();
            let logits = state.classifier.logits(&state.classifier.batch_from(&views))?;
            let targets = logits.detach().argmax(-1, false);
            logits.cross_entropy_for_logits(&targets).f_backward()?;
            tch::no_grad(|| {
                for (sum, p) in sums.iter_mut().zip(&state.params.tensors) {
                    let g = p.grad();
                    if g.defined() {
                        *sum += &g * &g;
                    }
                }
            });
            state.params.zero_grad();
            batches += 1;
        }
        Ok::<_, tch::TchError>(())
    })();
    state.classifier.set_eval();
    state.restore_buffers(&buffers);
    result?;
    tracing::info!(
        "eata: Fisher information from {} clean image(s) in {batches} batch(es)",
        images.len()
    );
    Ok(sums
        .into_iter()
        .zip(state.params.snapshot())
        .map(|(sum, source)| (sum / batches as f64, source))
        .collect())
}

impl Method for Eata {
    fn batch_size(&self) -> usize {
        self.state.batch_size()
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        let (cfg, fisher) = (&self.cfg, self.fisher.as_deref());
        self.state.run(batch, |s, x| Ok(adapt(s, cfg, fisher, x)?.logits))
    }

    /// [`NormOnline::recover`]: the stream's probability average goes back too.
    fn recover(&mut self) {
        self.state.recover();
    }
}
