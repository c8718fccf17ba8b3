//! `source`: the classifier alone, unadapted; the baseline every method is measured
//! against.

use std::time::Instant;

use super::{assemble, assemble_dense, predicted_images, Method};
use crate::image::Prepared;
use crate::model::Classifier;
use crate::tta::{dense, predictions, DenseRow, Outcome};

/// Top-1, confidence and top-k of the unadapted classifier.
pub struct Source {
    classifier: Classifier,
    batch_size: usize,
    topk: usize,
}

impl Source {
    pub fn new(classifier: Classifier, batch_size: usize, topk: usize) -> Self {
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

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        let started = Instant::now();
        let images = predicted_images(batch);
        if self.classifier.task.is_dense() {
            let rows = if images.is_empty() {
                Vec::new()
            } else {
                let out = tch::no_grad(|| self.classifier.logits(&self.classifier.batch_from(&images)))?;
                let side = self.classifier.view.crop;
                let maps = dense::maps(&out, self.classifier.task, side)?;
                maps.into_iter().map(|m| DenseRow::new(side, m.clone(), m)).collect()
            };
            let ms = started.elapsed().as_secs_f64() * 1e3 / images.len().max(1) as f64;
            return Ok(assemble_dense(batch, rows, ms));
        }
        let preds = if images.is_empty() {
            Vec::new()
        } else {
            let logits = tch::no_grad(|| self.classifier.logits(&self.classifier.batch_from(&images)))?;
            predictions(&logits, self.topk)?
        };
        let ms = started.elapsed().as_secs_f64() * 1e3 / images.len().max(1) as f64;
        Ok(assemble(batch, preds.clone(), preds, ms))
    }
}
