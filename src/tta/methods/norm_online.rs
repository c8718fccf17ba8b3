//! What the online entropy methods (TENT, EATA, SAR) share: the norm layers' affine
//! parameters adapted batch by batch on train-mode predictions, one stream per variant,
//! the eval-mode `pred_before`, the rows of a batch, and undoing a failed batch whole.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::{assemble, assemble_dense, InjectedFault};
use crate::image::Prepared;
use crate::model::Classifier;
use crate::sample::Variant;
use crate::tta::optim::{Optimizer, OptimizerState};
use crate::tta::params::{AdaptedParams, VariantStreams};
use crate::tta::{dense, predictions, Adapt, DenseRow, OptimizerKind, Outcome};

/// Why a batch-statistics method on a BatchNorm model wants batches (logged when
/// `runtime.batch_size` is 1).
pub fn batch_of_one_warning(method: &str) -> String {
    format!(
        "{method} with runtime.batch_size = 1 on a classifier with running statistics (BatchNorm): in train \
         mode each image is normalised by its own statistics (over its pixels alone; a 1x1 feature map has zero \
         variance), so its predictions and the entropy gradient are unreliable. Use batch_size >= 16, or a \
         backbone with GroupNorm or LayerNorm (README, \"Online methods and batch size\")"
    )
}

/// Entropy of the softmax over the last dimension, per row: `[B,K] -> [B]`.
pub fn softmax_entropy(logits: &Tensor) -> Tensor {
    let p = logits.softmax(-1, Kind::Float);
    -(&p * logits.log_softmax(-1, Kind::Float)).sum_dim_intlist(-1, false, Kind::Float)
}

/// A `[n]` membership mask of the indices `ids`, on the host.
pub fn mask(ids: &Tensor, n: i64) -> Result<Vec<bool>, tch::TchError> {
    let ids = Vec::<i64>::try_from(ids.to_device(Device::Cpu))?;
    let mut m = vec![false; n as usize];
    for i in ids {
        m[i as usize] = true;
    }
    Ok(m)
}

/// The live adapted state of an online norm-layer method.
///
/// Hazard: train-mode passes also update the BatchNorm running statistics (module
/// buffers shared by every stream), and `pred_before` (eval mode) reads them, so
/// `pred_before` drifts with every batch of every stream; `pred_after` does not use them.
/// Read gains against a `source` run of the same samples.
///
/// Invariant: between [`NormOnline::begin`] and [`NormOnline::end`], [`NormOnline::recover`]
/// puts back the affine parameters, the optimizer state and the running statistics as
/// they were before the batch, so a retry gives the rows an undisturbed run gives.
pub struct NormOnline {
    pub classifier: Classifier,
    pub params: AdaptedParams,
    /// The source values of `params`: where a new variant stream starts.
    originals: Vec<Tensor>,
    streams: VariantStreams,
    pub optimizer: Optimizer,
    batch_size: usize,
    topk: usize,
    /// The module's buffers (aliases of the live running statistics).
    buffers: Vec<Tensor>,
    /// The state before the batch in progress (None between batches).
    rollback: Option<(Vec<Tensor>, OptimizerState, Vec<Tensor>)>,
    pub fault: InjectedFault,
}

impl NormOnline {
    /// Selects the bundle's norm-layer affine parameters (`classifier.norm`) that
    /// `adapts` accepts, with an SGD optimizer; warns when batches of one meet BatchNorm.
    pub fn new(
        method: &str,
        classifier: Classifier,
        adapts: impl Fn(&str) -> bool,
        (lr, momentum): (f64, f64),
        batch_size: usize,
        topk: usize,
    ) -> Result<Self, tch::TchError> {
        if classifier.norm.is_empty() {
            return Err(tch::TchError::Kind(format!(
                "{method} adapts norm-layer affine parameters, but the bundle lists none (classifier.norm)"
            )));
        }
        let norm: Vec<String> = classifier.norm.iter().filter(|n| adapts(n)).cloned().collect();
        if norm.is_empty() {
            return Err(tch::TchError::Kind(format!(
                "{method}: every norm-layer parameter the bundle lists (classifier.norm) is left out of adaptation"
            )));
        }
        let params = AdaptedParams::select(
            classifier.named_parameters()?,
            Vec::new(),
            Adapt::Norm,
            &classifier.head,
            &norm,
        );
        let buffers = classifier.buffers()?;
        if batch_size == 1 && !buffers.is_empty() {
            tracing::warn!("{}", batch_of_one_warning(method));
        }
        Ok(NormOnline {
            buffers,
            rollback: None,
            fault: InjectedFault::from_env(),
            classifier,
            originals: params.snapshot(),
            streams: VariantStreams::default(),
            params,
            optimizer: Optimizer::new(OptimizerKind::Sgd, lr, momentum, 0.0),
            batch_size,
            topk,
        })
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Starts a batch of `variant`: makes its stream live and remembers what to undo.
    pub fn begin(&mut self, variant: Variant) {
        self.streams
            .switch(variant, &self.params, &mut self.optimizer, &self.originals);
        self.rollback = Some((
            self.params.snapshot(),
            self.optimizer.snapshot(),
            self.buffers_snapshot(),
        ));
    }

    /// The stream whose state is live.
    pub fn live(&self) -> Variant {
        self.streams.live()
    }

    /// Eval-mode logits (running statistics), no gradient: the `pred_before` view.
    /// Leaves the classifier in train mode for the adaptation passes.
    pub fn eval_then_train(&mut self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        self.classifier.set_eval();
        let logits = tch::no_grad(|| self.classifier.logits(x));
        self.classifier.set_train();
        logits
    }

    /// The live stream back to the source weights and a fresh optimizer (SAR's recovery).
    pub fn reset_live(&mut self) {
        self.params.restore(&self.originals);
        self.optimizer.reset();
    }

    /// A device copy of the running statistics.
    pub fn buffers_snapshot(&self) -> Vec<Tensor> {
        tch::no_grad(|| self.buffers.iter().map(Tensor::copy).collect())
    }

    /// Copies the running statistics back from `saved` ([`NormOnline::buffers_snapshot`]).
    pub fn restore_buffers(&self, saved: &[Tensor]) {
        tch::no_grad(|| {
            for (live, saved) in self.buffers.iter().zip(saved) {
                live.shallow_clone()
                    .f_copy_(saved)
                    .expect("a buffer snapshot matches its buffer");
            }
        });
    }

    /// Ends a batch that went through: eval mode, nothing left to undo; then the rows,
    /// `pred_before` from `source` and `pred_after` from `adapted` (train-mode logits
    /// before the update, as the authors' methods return them).
    pub fn end(
        &mut self,
        batch: &[Prepared],
        source: &Tensor,
        adapted: &Tensor,
        started: Instant,
    ) -> Result<Vec<Outcome>, tch::TchError> {
        self.classifier.set_eval();
        let images = batch.iter().filter(|p| p.pixels.is_some()).count().max(1);
        let ms = started.elapsed().as_secs_f64() * 1e3 / images as f64;
        let task = self.classifier.task;
        let outcomes = if task.is_dense() {
            let side = self.classifier.view.crop;
            let before = dense::maps(source, task, side)?;
            let after = dense::maps(adapted, task, side)?;
            let rows = before
                .into_iter()
                .zip(after)
                .map(|(b, a)| DenseRow::new(side, b, a))
                .collect();
            assemble_dense(batch, rows, ms)
        } else {
            assemble(
                batch,
                predictions(source, self.topk)?,
                predictions(adapted, self.topk)?,
                ms,
            )
        };
        self.rollback = None;
        Ok(outcomes)
    }

    /// Back to the state before the failed batch, whatever failed: its affine
    /// parameters, optimizer state and running statistics; no gradient; eval mode.
    pub fn recover(&mut self) {
        self.params.zero_grad();
        self.classifier.set_eval();
        if let Some((params, state, buffers)) = self.rollback.take() {
            self.params.restore(&params);
            self.optimizer.restore(state);
            self.restore_buffers(&buffers);
        }
    }
}
