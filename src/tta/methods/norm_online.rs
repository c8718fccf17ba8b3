//! What the online entropy methods (TENT, EATA, SAR) share: the norm layers' affine
//! parameters adapted batch by batch on train-mode predictions, one stream per variant,
//! the eval-mode `pred_before`, the rows of a batch, and undoing a failed batch whole.

use std::collections::HashMap;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::{assemble, assemble_dense, predicted_images, InjectedFault};
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
    /// Per stream: the method's own state beside the weights (EATA's probability
    /// average, SAR's loss average), absent until the method sets it.
    extra: HashMap<Variant, Tensor>,
    /// The state before the batch in progress (None between batches).
    rollback: Option<Rollback>,
    pub fault: InjectedFault,
}

/// What a failed batch puts back: weights, optimizer state, running statistics, and the
/// live stream's extra state.
struct Rollback {
    params: Vec<Tensor>,
    optimizer: OptimizerState,
    buffers: Vec<Tensor>,
    extra: Option<Tensor>,
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
            extra: HashMap::new(),
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
        self.rollback = Some(Rollback {
            params: self.params.snapshot(),
            optimizer: self.optimizer.snapshot(),
            buffers: self.buffers_snapshot(),
            extra: self.extra.get(&variant).map(Tensor::copy),
        });
    }

    /// The live stream's extra state, if the method set one.
    pub fn extra(&self) -> Option<&Tensor> {
        self.extra.get(&self.streams.live())
    }

    pub fn set_extra(&mut self, value: Tensor) {
        self.extra.insert(self.streams.live(), value);
    }

    /// One online batch: the live stream becomes `batch`'s variant (the adapt stage
    /// never mixes streams in a batch), `pred_before` in eval mode, then `adapt` on the
    /// device batch in train mode, which returns the logits `pred_after` reads.
    pub fn run(
        &mut self,
        batch: &[Prepared],
        adapt: impl FnOnce(&mut Self, &Tensor) -> Result<Tensor, tch::TchError>,
    ) -> Result<Vec<Outcome>, tch::TchError> {
        let started = Instant::now();
        let images = predicted_images(batch);
        if images.is_empty() {
            return Ok(assemble(batch, Vec::new(), Vec::new(), 0.0));
        }
        self.begin(batch[0].variant);
        let x = self.classifier.batch_from(&images);
        let source = self.eval_then_train(&x)?;
        let adapted = adapt(self, &x)?;
        self.end(batch, &source, &adapted, started)
    }

    /// Eval-mode logits (running statistics), no gradient: the `pred_before` view.
    /// Leaves the classifier in train mode for the adaptation passes.
    pub fn eval_then_train(&mut self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        self.classifier.set_eval();
        let logits = tch::no_grad(|| self.classifier.logits(x));
        self.classifier.set_train();
        logits
    }

    /// One batch of `variant`'s stream through `adapt` (train mode), without rows: the
    /// parity tests' entry point.
    pub fn adapt_images<T>(
        &mut self,
        images: &[&[f32]],
        variant: Variant,
        adapt: impl FnOnce(&mut Self, &Tensor) -> Result<T, tch::TchError>,
    ) -> Result<T, tch::TchError> {
        self.begin(variant);
        let x = self.classifier.batch_from(images);
        self.classifier.set_train();
        let result = adapt(self, &x);
        self.classifier.set_eval();
        self.rollback = None;
        result
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
        if let Some(saved) = self.rollback.take() {
            self.params.restore(&saved.params);
            self.optimizer.restore(saved.optimizer);
            self.restore_buffers(&saved.buffers);
            let live = self.streams.live();
            match saved.extra {
                Some(extra) => self.extra.insert(live, extra),
                None => self.extra.remove(&live),
            };
        }
    }
}
