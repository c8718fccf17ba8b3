//! Baselines of ALGORITHM.md. `source`: the classifier alone, batched.

use std::time::Instant;

use tch::{Kind, Tensor};

use super::{Method, Outcome};
use crate::image::Prepared;
use crate::model::Classifier;
use crate::shards::Status;

/// Top-1, confidence and top-k of the unadapted classifier.
pub struct Source {
    classifier: Classifier,
    batch_size: usize,
    topk: usize,
}

impl Source {
    pub fn new(classifier: Classifier, batch_size: usize, topk: usize) -> Self {
        let topk = topk.min(classifier.num_classes);
        Source {
            classifier,
            batch_size,
            topk,
        }
    }
}

impl Method for Source {
    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn run(&mut self, batch: Vec<Prepared>) -> Result<Vec<Outcome>, tch::TchError> {
        let started = Instant::now();
        let images: Vec<&[f32]> = batch.iter().filter_map(|p| p.pixels.as_deref()).collect();
        let (top_probs, top_classes) = if images.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let k = self.topk as i64;
            let (values, indices) = tch::no_grad(|| -> Result<(Tensor, Tensor), tch::TchError> {
                let logits = self.classifier.logits(&self.classifier.batch_from(&images))?;
                let probs = logits.to_kind(Kind::Float).softmax(-1, Kind::Float);
                Ok(probs.topk(k, -1, true, true))
            })?;
            // One device-to-host copy per batch.
            let probs = Vec::<f32>::try_from(values.to_device(tch::Device::Cpu).flatten(0, -1))?;
            let classes = Vec::<i64>::try_from(indices.to_device(tch::Device::Cpu).flatten(0, -1))?;
            (probs, classes)
        };
        let per_image_ms = started.elapsed().as_secs_f64() * 1e3 / images.len().max(1) as f64;
        let mut row = 0;
        let outcomes = batch
            .into_iter()
            .map(|p| {
                if p.pixels.is_none() {
                    return Outcome::unpredicted(p);
                }
                let span = row * self.topk..(row + 1) * self.topk;
                row += 1;
                let topk_after = top_classes[span.clone()].to_vec();
                let topk_probs_after = top_probs[span].to_vec();
                let (status, error) = match p.defect {
                    Some(d) => (d.status, Some(d.message)),
                    None => (Status::Ok, None),
                };
                Outcome {
                    key: p.key,
                    label: p.label,
                    status,
                    error,
                    pred_before: Some(topk_after[0]),
                    conf_before: Some(topk_probs_after[0]),
                    pred_after: Some(topk_after[0]),
                    conf_after: Some(topk_probs_after[0]),
                    topk_after,
                    topk_probs_after,
                    loss_first: None,
                    loss_last: None,
                    steps: 0,
                    adapt_ms: per_image_ms,
                }
            })
            .collect();
        Ok(outcomes)
    }
}
