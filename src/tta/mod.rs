//! Test-time adaptation: the methods ([`methods`], one file each) and what they share:
//! the [`Outcome`] row they produce, parameter selection and snapshots, optimizers,
//! noise draws and autocast. Everything here runs on the one thread that owns the models
//! and the device.

pub mod autocast;
pub mod budget;
mod config;
pub mod dense;
pub mod methods;
pub mod optim;
pub mod params;
pub mod schedule;

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::image::{DenseLabel, Prepared};
use crate::sample::{Defect, Status, Variant};
pub use budget::{AfterUpdate, BudgetConfig, Gate, StepCost, StopReason};
pub use config::{
    Adapt, DiffusionClassifierConfig, DusaConfig, EataConfig, Loss, MethodName, Mode, OptimizerKind, Precision,
    SarConfig, TentConfig, Timesteps, TtaConfig,
};
pub use dense::{DenseMap, DenseRow};
pub use methods::Method;

/// The result for one sample: one predictions row (without run-level columns), and the
/// per-step metrics of adaptive methods.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub key: String,
    pub label: Option<i64>,
    /// The presentation of the image this row is about (the adapt stage sets it).
    pub variant: Variant,
    pub status: Status,
    pub error: Option<String>,
    pub pred_before: Option<i64>,
    pub conf_before: Option<f32>,
    pub pred_after: Option<i64>,
    pub conf_after: Option<f32>,
    pub topk_after: Vec<i64>,
    pub topk_probs_after: Vec<f32>,
    pub loss_first: Option<f32>,
    pub loss_last: Option<f32>,
    pub steps: u32,
    pub adapt_ms: f64,
    /// Denoiser forward passes spent on this row, counted per image: one per (t, eps)
    /// pair (and per class condition scored) that went through the denoiser, however
    /// the pairs were batched. 0 for source and TENT.
    pub denoiser_evals: u64,
    /// Why adaptation ended before its configured steps ([`StopReason::None`] when no
    /// gate fired and the loss stayed finite).
    pub stop_reason: StopReason,
    pub step_log: Vec<StepRecord>,
    /// Dense tasks: the masks or depth maps before and after adaptation.
    pub dense: Option<DenseRow>,
    /// Dense tasks: the sample's label in the crop's geometry (the adapt stage sets it).
    pub dense_label: Option<Arc<DenseLabel>>,
}

/// One optimizer step of one image: a row of the steps table.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub step: u32,
    /// Mean diffusion loss over the step's iterations.
    pub loss: f32,
    /// The classifier's top-1, its probability and the entropy of its softmax during the step.
    pub pred: i64,
    pub conf: f32,
    pub entropy: f32,
    pub lr: f32,
    /// L2 norm of the adapted parameters' gradient before the update.
    pub grad_norm: f32,
    /// Milliseconds from the start of the image to the end of the step.
    pub elapsed_ms: f64,
}

/// Top-1 and top-k of one softmax row.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub class: i64,
    pub conf: f32,
    pub topk: Vec<i64>,
    pub topk_probs: Vec<f32>,
}

/// Softmax predictions for a `[B, K]` logits batch, copied to the host once.
pub fn predictions(logits: &Tensor, k: usize) -> Result<Vec<Prediction>, tch::TchError> {
    let b = logits.size()[0] as usize;
    let k = k.min(logits.size()[1] as usize);
    let probs = logits.detach().to_kind(Kind::Float).softmax(-1, Kind::Float);
    let (values, indices) = probs.topk(k as i64, -1, true, true);
    let values = Vec::<f32>::try_from(values.to_device(Device::Cpu).flatten(0, -1))?;
    let indices = Vec::<i64>::try_from(indices.to_device(Device::Cpu).flatten(0, -1))?;
    Ok((0..b)
        .map(|i| Prediction {
            class: indices[i * k],
            conf: values[i * k],
            topk: indices[i * k..(i + 1) * k].to_vec(),
            topk_probs: values[i * k..(i + 1) * k].to_vec(),
        })
        .collect())
}

impl Prediction {
    /// No image-level class (dense tasks, whose prediction is a map): class -1,
    /// confidence 0, empty top-k.
    pub fn placeholder() -> Prediction {
        Prediction {
            class: -1,
            conf: 0.0,
            topk: Vec::new(),
            topk_probs: Vec::new(),
        }
    }
}

impl Outcome {
    /// A row with the sample's identity and status, and no prediction yet.
    pub fn blank(key: String, label: Option<i64>, defect: Option<Defect>) -> Outcome {
        let (status, error) = match defect {
            Some(d) => (d.status, Some(d.message)),
            None => (Status::Ok, None),
        };
        Outcome {
            key,
            label,
            variant: Variant::CLEAN,
            status,
            error,
            pred_before: None,
            conf_before: None,
            pred_after: None,
            conf_after: None,
            topk_after: Vec::new(),
            topk_probs_after: Vec::new(),
            loss_first: None,
            loss_last: None,
            steps: 0,
            adapt_ms: 0.0,
            denoiser_evals: 0,
            stop_reason: StopReason::None,
            step_log: Vec::new(),
            dense: None,
            dense_label: None,
        }
    }

    /// The row of a sample that gets no prediction; keeps its label and reason.
    pub fn unpredicted(p: &Prepared) -> Outcome {
        let defect = p
            .defect
            .clone()
            .unwrap_or_else(|| Defect::new(Status::DecodeError, "no pixels"));
        Outcome::blank(p.key.clone(), p.label, Some(defect))
    }

    pub fn set_before(&mut self, p: &Prediction) {
        self.pred_before = Some(p.class);
        self.conf_before = Some(p.conf);
    }

    pub fn set_after(&mut self, p: Prediction) {
        self.pred_after = Some(p.class);
        self.conf_after = Some(p.conf);
        self.topk_after = p.topk;
        self.topk_probs_after = p.topk_probs;
    }

    /// Whether the final prediction matches the label (`None` without both).
    pub fn correct_after(&self) -> Option<bool> {
        Some(self.pred_after? == self.label?)
    }

    pub fn correct_before(&self) -> Option<bool> {
        Some(self.pred_before? == self.label?)
    }
}
