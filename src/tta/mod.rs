//! Test-time adaptation methods. Each turns prepared samples into [`Outcome`]s on the
//! thread that owns the models and the device.

pub mod baselines;

use crate::image::Prepared;
use crate::shards::Status;

/// The result for one sample: one predictions row (without run-level columns).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub key: String,
    pub label: Option<i64>,
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
}

impl Outcome {
    /// The row of a sample that gets no prediction; keeps its label and reason.
    pub fn unpredicted(p: Prepared) -> Outcome {
        let (status, error) = match p.defect {
            Some(d) => (d.status, Some(d.message)),
            None => (Status::DecodeError, Some("no pixels".into())),
        };
        Outcome {
            key: p.key,
            label: p.label,
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
        }
    }

    /// Whether the final prediction matches the label (`None` without both).
    pub fn correct_after(&self) -> Option<bool> {
        Some(self.pred_after? == self.label?)
    }

    pub fn correct_before(&self) -> Option<bool> {
        Some(self.pred_before? == self.label?)
    }
}

/// A method as the adapt stage sees it.
pub trait Method {
    /// How many samples `run` would like at once (1 for per-image adaptation).
    fn batch_size(&self) -> usize;
    /// One outcome per input sample, in input order.
    fn run(&mut self, batch: Vec<Prepared>) -> Result<Vec<Outcome>, tch::TchError>;
}
