//! `tent`: online entropy minimisation over the norm layers' affine parameters
//! (Wang et al., ICLR 2021); for segmenters, of the per-pixel entropy's mean.

use std::time::Instant;

use tch::{Kind, Tensor};

use super::{assemble, assemble_dense, predicted_images, InjectedFault, Method};
use crate::image::Prepared;
use crate::model::Classifier;
use crate::tta::optim::{Optimizer, OptimizerState};
use crate::tta::params::{AdaptedParams, VariantStreams};
use crate::tta::{dense, predictions, Adapt, DenseRow, OptimizerKind, Outcome, TentConfig};

/// TENT: online; each batch is predicted in train mode (batch statistics) and then used
/// for one entropy-minimisation step on the norm layers' affine parameters. With
/// variants, each variant is its own stream of affine parameters and optimizer state.
///
/// Hazard: train-mode passes also update the BatchNorm running statistics (module
/// buffers shared by every stream), and `pred_before` (eval mode) reads them, so
/// `pred_before` drifts with every batch of every stream; `pred_after` does not use them.
/// Read gains against a `source` run of the same samples.
///
/// Invariant: a failed batch is undone whole by `recover` (affine parameters, optimizer
/// state and running statistics as before the batch), so a retry gives the rows an
/// undisturbed run gives.
pub struct Tent {
    classifier: Classifier,
    params: AdaptedParams,
    /// The source values of `params`: where a new variant stream starts.
    originals: Vec<Tensor>,
    streams: VariantStreams,
    optimizer: Optimizer,
    batch_size: usize,
    topk: usize,
    /// The module's buffers (aliases of the live running statistics).
    buffers: Vec<Tensor>,
    /// The state before the batch in progress: affine parameters, optimizer state and
    /// buffer values (None between batches).
    rollback: Option<(Vec<Tensor>, OptimizerState, Vec<Tensor>)>,
    fault: InjectedFault,
}

impl Tent {
    /// Why TENT on a BatchNorm model wants batches (logged when `batch_size` is 1).
    pub const BATCH_OF_ONE: &'static str = "tent with runtime.batch_size = 1 on a classifier with running statistics \
        (BatchNorm): in train mode each image is normalised by its own statistics (over its pixels alone; a 1x1 \
        feature map has zero variance), so its predictions and the entropy gradient are unreliable. Use \
        batch_size >= 16, or a backbone with GroupNorm or LayerNorm (README, \"TENT and batch size\")";

    pub fn new(
        classifier: Classifier,
        cfg: &TentConfig,
        batch_size: usize,
        topk: usize,
    ) -> Result<Self, tch::TchError> {
        if classifier.norm.is_empty() {
            return Err(tch::TchError::Kind(
                "tent adapts norm-layer affine parameters, but the bundle lists none (classifier.norm)".into(),
            ));
        }
        let params = AdaptedParams::select(
            classifier.named_parameters()?,
            Vec::new(),
            Adapt::Norm,
            &classifier.head,
            &classifier.norm,
        );
        let buffers = classifier.buffers()?;
        if batch_size == 1 && !buffers.is_empty() {
            tracing::warn!("{}", Self::BATCH_OF_ONE);
        }
        Ok(Tent {
            buffers,
            rollback: None,
            fault: InjectedFault::from_env(),
            classifier,
            originals: params.snapshot(),
            streams: VariantStreams::default(),
            params,
            optimizer: Optimizer::new(OptimizerKind::Sgd, cfg.lr, cfg.momentum, 0.0),
            batch_size,
            topk,
        })
    }
}

impl Method for Tent {
    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        let started = Instant::now();
        let images = predicted_images(batch);
        if images.is_empty() {
            return Ok(assemble(batch, Vec::new(), Vec::new(), 0.0));
        }
        // The adapt stage never mixes variants in a batch.
        self.streams
            .switch(batch[0].variant, &self.params, &mut self.optimizer, &self.originals);
        let buffers = tch::no_grad(|| self.buffers.iter().map(Tensor::copy).collect());
        self.rollback = Some((self.params.snapshot(), self.optimizer.snapshot(), buffers));
        let x = self.classifier.batch_from(&images);
        // The unadapted model's view, for pred_before.
        self.classifier.set_eval();
        let source = tch::no_grad(|| self.classifier.logits(&x))?;
        self.classifier.set_train();
        let logits = self.classifier.logits(&x)?;
        // Classes are the last dimension of [B,K], the second of a segmenter's [B,K,h,w];
        // a segmenter's entropy is the mean over its output pixels.
        let task = self.classifier.task;
        let class_dim = if task.is_dense() { 1 } else { -1 };
        let p = logits.softmax(class_dim, Kind::Float);
        let entropy = -(&p * logits.log_softmax(class_dim, Kind::Float)).sum_dim_intlist(class_dim, false, Kind::Float);
        entropy.mean(Kind::Float).f_backward()?;
        self.optimizer.step(&self.params.tensors)?;
        self.params.zero_grad();
        self.fault.after_update()?;
        self.classifier.set_eval();
        let ms = || started.elapsed().as_secs_f64() * 1e3 / images.len() as f64;
        if task.is_dense() {
            let side = self.classifier.view.crop;
            let before = dense::maps(&source, task, side)?;
            let after = dense::maps(&logits, task, side)?;
            let rows = before
                .into_iter()
                .zip(after)
                .map(|(b, a)| DenseRow::new(side, b, a))
                .collect();
            self.rollback = None;
            return Ok(assemble_dense(batch, rows, ms()));
        }
        let before = predictions(&source, self.topk)?;
        let after = predictions(&logits, self.topk)?;
        self.rollback = None;
        Ok(assemble(batch, before, after, ms()))
    }

    /// Back to the state before the failed batch, whatever failed: its affine
    /// parameters, optimizer state and running statistics; no gradient; eval mode.
    fn recover(&mut self) {
        self.params.zero_grad();
        self.classifier.set_eval();
        if let Some((params, state, buffers)) = self.rollback.take() {
            self.params.restore(&params);
            self.optimizer.restore(state);
            tch::no_grad(|| {
                for (live, saved) in self.buffers.iter().zip(&buffers) {
                    live.shallow_clone()
                        .f_copy_(saved)
                        .expect("a buffer snapshot matches its buffer");
                }
            });
        }
    }
}
