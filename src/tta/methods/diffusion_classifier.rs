//! `diffusion-classifier`: no classifier in the loop; the class whose condition explains
//! the image best under the diffusion loss (Li et al., ICCV 2023).

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::{per_image, Method};
use crate::image::Prepared;
use crate::model::{Classifier, Diffusion};
use crate::tta::schedule::{add_noise, NoiseSource, SeededNoise};
use crate::tta::{predictions, DiffusionClassifierConfig, Outcome, Prediction, Timesteps};

/// Diffusion Classifier: for each class k, the mean diffusion loss with condition E_k
/// over one shared set of (t, eps) pairs; the prediction is the lowest. With pruning, a
/// first pass on `first_samples` pairs keeps the `prune_to` best classes for the rest.
/// `conf_after` is the softmax of the negative mean losses (a relative score, not a
/// calibrated probability).
pub struct DiffusionClassifier {
    classifier: Classifier,
    diffusion: Diffusion,
    cfg: DiffusionClassifierConfig,
    noise: SeededNoise,
    topk: usize,
    /// Denoiser calls per forward, at most.
    chunk: usize,
}

impl DiffusionClassifier {
    pub fn new(
        classifier: Classifier,
        diffusion: Diffusion,
        cfg: &DiffusionClassifierConfig,
        seed: u64,
        topk: usize,
        chunk: usize,
    ) -> Self {
        let noise = SeededNoise::new(seed, diffusion.num_timesteps, Timesteps::Stratified, false);
        DiffusionClassifier {
            classifier,
            diffusion,
            cfg: cfg.clone(),
            noise,
            topk,
            chunk: chunk.max(1),
        }
    }

    /// Summed losses `[classes]` of `classes` over the pairs `(t, eps)`, and the
    /// denoiser evaluations that took (one per class and pair).
    fn losses(&self, z0: &Tensor, t: &Tensor, eps: &Tensor, classes: &Tensor) -> Result<(Tensor, u64), tch::TchError> {
        let n = t.size()[0];
        let k = classes.size()[0];
        let z_t = add_noise(&self.diffusion.alphas_cumprod, z0, t, eps);
        let cond_all = self.diffusion.embeddings.index_select(0, classes);
        let total = k * n;
        let mut sums = Vec::new();
        let mut start = 0;
        while start < total {
            let len = (self.chunk as i64).min(total - start);
            let idx = Tensor::arange_start(start, start + len, (Kind::Int64, self.diffusion.device));
            let class_of = idx.divide_scalar_mode(n, "floor");
            let pair_of = idx.remainder(n);
            let eps_hat = self.diffusion.predict_noise(
                &z_t.index_select(0, &pair_of),
                &t.index_select(0, &pair_of),
                &cond_all.index_select(0, &class_of),
            )?;
            let per = (eps_hat.to_kind(Kind::Float) - eps.index_select(0, &pair_of))
                .square()
                .flatten(1, -1)
                .mean_dim(1, false, Kind::Float);
            sums.push(Tensor::zeros([k], (Kind::Float, self.diffusion.device)).index_add(0, &class_of, &per));
            start += len;
        }
        Ok((
            Tensor::stack(&sums, 0).sum_dim_intlist(0, false, Kind::Float),
            total as u64,
        ))
    }
}

impl Method for DiffusionClassifier {
    fn batch_size(&self) -> usize {
        1
    }

    fn run(&mut self, batch: &[Prepared]) -> Result<Vec<Outcome>, tch::TchError> {
        per_image(batch, |p, pixels, gen| {
            let started = Instant::now();
            let device = self.diffusion.device;
            let side = self.diffusion.view.resolution as i64;
            let channels = self.diffusion.view.channels.count() as i64;
            type Scored = (Prediction, (Tensor, Tensor), u64);
            let (before, result, evals) = tch::no_grad(|| -> Result<Scored, tch::TchError> {
                let logits = self.classifier.logits(&self.classifier.batch_from(&[pixels]))?;
                let before = predictions(&logits, self.topk)?.remove(0);
                let x_gen = Tensor::from_slice(gen)
                    .view([1, channels, side, side])
                    .to_device(device);
                let z0 = self.diffusion.encode(&x_gen)?.to_kind(Kind::Float);
                self.noise.begin_image(&p.key);
                let (t, eps) = self
                    .noise
                    .draw(0, self.cfg.samples, &self.diffusion.latent_shape, device);
                let k = self.diffusion.embeddings.size()[0];
                let all = Tensor::arange(k, (Kind::Int64, device));
                let (classes, losses, evals) = if self.cfg.prune_to > 0 && (self.cfg.prune_to as i64) < k {
                    let m = self.cfg.first_samples as i64;
                    let (first, n1) = self.losses(&z0, &t.narrow(0, 0, m), &eps.narrow(0, 0, m), &all)?;
                    let keep = first.topk(self.cfg.prune_to as i64, -1, false, true).1;
                    let rest = self.cfg.samples as i64 - m;
                    let (more, n2) = self.losses(&z0, &t.narrow(0, m, rest), &eps.narrow(0, m, rest), &keep)?;
                    (keep.shallow_clone(), first.index_select(0, &keep) + more, n1 + n2)
                } else {
                    let (l, n) = self.losses(&z0, &t, &eps, &all)?;
                    (all, l, n)
                };
                Ok((before, (classes, losses / self.cfg.samples as f64), evals))
            })?;
            let (classes, mean_losses) = result;
            let scores = (-&mean_losses).softmax(-1, Kind::Float);
            let kk = (self.topk as i64).min(scores.size()[0]);
            let (probs, order) = scores.topk(kk, -1, true, true);
            let topk = Vec::<i64>::try_from(classes.index_select(0, &order).to_device(Device::Cpu))?;
            let topk_probs = Vec::<f32>::try_from(probs.to_device(Device::Cpu))?;
            let best_loss = f64::try_from(mean_losses.min())? as f32;
            let mut o = Outcome::blank(p.key.clone(), p.label, p.defect.clone());
            o.set_before(&before);
            o.set_after(Prediction {
                class: topk[0],
                conf: topk_probs[0],
                topk,
                topk_probs,
            });
            o.loss_first = Some(best_loss);
            o.loss_last = Some(best_loss);
            o.adapt_ms = started.elapsed().as_secs_f64() * 1e3;
            o.denoiser_evals = evals;
            Ok(o)
        })
    }
}
