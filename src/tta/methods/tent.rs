//! `tent`: online entropy minimisation over the norm layers' affine parameters
//! (Wang et al., ICLR 2021); for segmenters, of the per-pixel entropy's mean.

use tch::Kind;

use super::norm_online::NormOnline;
use super::Method;
use crate::image::Prepared;
use crate::model::Classifier;
use crate::tta::{Outcome, TentConfig};

/// TENT: online; each batch is predicted in train mode (batch statistics) and then used
/// for one entropy-minimisation step on the norm layers' affine parameters. With
/// variants, each variant is its own stream of affine parameters and optimizer state.
/// The hazards and the undo invariant are [`NormOnline`]'s.
pub struct Tent {
    state: NormOnline,
}

impl Tent {
    pub fn new(
        classifier: Classifier,
        cfg: &TentConfig,
        batch_size: usize,
        topk: usize,
    ) -> Result<Self, tch::TchError> {
        let state = NormOnline::new("tent", classifier, |_| true, (cfg.lr, cfg.momentum), batch_size, topk)?;
        Ok(Tent { state })
    }
}

impl Method for Tent {
    fn batch_size(&self) -> usize {
        self.state.batch_size()
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        self.state.run(batch, |s, x| {
            let logits = s.classifier.logits(x)?;
            // Classes are the last dimension of [B,K], the second of a segmenter's
            // [B,K,h,w]; a segmenter's entropy is the mean over its output pixels.
            let class_dim = if s.classifier.task.is_dense() { 1 } else { -1 };
            let p = logits.softmax(class_dim, Kind::Float);
            let entropy =
                -(&p * logits.log_softmax(class_dim, Kind::Float)).sum_dim_intlist(class_dim, false, Kind::Float);
            entropy.mean(Kind::Float).f_backward()?;
            s.optimizer.step(&s.params.tensors)?;
            s.params.zero_grad();
            s.fault.after_update()?;
            Ok(logits)
        })
    }

    fn recover(&mut self) {
        self.state.recover()
    }
}
