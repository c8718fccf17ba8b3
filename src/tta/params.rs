//! Which parameters adapt, and putting them back.
//!
//! Invariants: only selected parameters have `requires_grad`; a snapshot is a device
//! copy, and restoring copies it back in place, so the modules keep their tensors (no
//! reload, no host round trip). Buffers (BatchNorm statistics) are never written by
//! Diffusion-TTA: the classifier always runs in eval mode.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::config::Adapt;
use super::optim::{Optimizer, OptimizerState};
use crate::sample::Variant;

/// The adapted parameters of the classifier (and the denoiser).
pub struct AdaptedParams {
    pub names: Vec<String>,
    pub tensors: Vec<Tensor>,
}

impl AdaptedParams {
    /// Selects parameters per `adapt` and sets `requires_grad` accordingly on every
    /// parameter of both modules. `head` parameters are never selected (pass an empty
    /// list to adapt the whole classifier, as DUSA does).
    pub fn select(
        classifier: Vec<(String, Tensor)>,
        denoiser: Vec<(String, Tensor)>,
        adapt: Adapt,
        head: &[String],
        norm: &[String],
    ) -> AdaptedParams {
        let mut names = Vec::new();
        let mut tensors = Vec::new();
        for (name, t) in classifier {
            let chosen = !head.contains(&name)
                && match adapt {
                    Adapt::Classifier | Adapt::ClassifierDiffusion => true,
                    Adapt::Norm => norm.contains(&name),
                };
            let t = t.set_requires_grad(chosen);
            if chosen {
                names.push(format!("classifier.{name}"));
                tensors.push(t);
            }
        }
        for (name, t) in denoiser {
            let chosen = adapt == Adapt::ClassifierDiffusion;
            let t = t.set_requires_grad(chosen);
            if chosen {
                names.push(format!("denoiser.{name}"));
                tensors.push(t);
            }
        }
        AdaptedParams { names, tensors }
    }

    /// Device copies of the current values.
    pub fn snapshot(&self) -> Vec<Tensor> {
        tch::no_grad(|| self.tensors.iter().map(|t| t.detach().copy()).collect())
    }

    /// Copies `snapshot` back into the live parameters, in place.
    pub fn restore(&self, snapshot: &[Tensor]) {
        tch::no_grad(|| {
            for (t, s) in self.tensors.iter().zip(snapshot) {
                t.shallow_clone().f_copy_(s).expect("snapshot matches its parameter");
            }
        });
    }

    /// Device copies of the current gradients (zeros where a parameter has none yet):
    /// the gradients an unfinished accumulation cycle has gathered so far.
    pub fn grad_snapshot(&self) -> Vec<Tensor> {
        tch::no_grad(|| {
            self.tensors
                .iter()
                .map(|t| match t.grad() {
                    g if g.defined() => g.detach().copy(),
                    _ => t.zeros_like(),
                })
                .collect()
        })
    }

    /// Copies `snapshot` back into the gradients, in place. A parameter that has no
    /// gradient tensor (no backward pass reached it yet) keeps none: its snapshot is zeros.
    pub fn restore_grads(&self, snapshot: &[Tensor]) {
        tch::no_grad(|| {
            for (t, s) in self.tensors.iter().zip(snapshot) {
                let g = t.grad();
                if g.defined() {
                    g.shallow_clone()
                        .f_copy_(s)
                        .expect("gradient snapshot matches its parameter");
                }
            }
        });
    }

    /// Whether every adapted value is finite (one device reduction, one sync).
    pub fn all_finite(&self) -> Result<bool, tch::TchError> {
        if self.tensors.is_empty() {
            return Ok(true);
        }
        let flags: Vec<Tensor> = self.tensors.iter().map(|t| t.detach().isfinite().all()).collect();
        Ok(bool::try_from(Tensor::stack(&flags, 0).all())?)
    }

    pub fn zero_grad(&self) {
        for t in &self.tensors {
            let mut t = t.shallow_clone();
            t.zero_grad();
        }
    }

    /// L2 norm of all gradients together, as a device scalar (no sync).
    pub fn grad_norm(&self) -> Tensor {
        let squares: Vec<Tensor> = self
            .tensors
            .iter()
            .map(|t| t.grad())
            .filter(|g| g.defined())
            .map(|g| g.square().sum(Kind::Float))
            .collect();
        if squares.is_empty() {
            return Tensor::from(0f32);
        }
        Tensor::stack(&squares, 0).sum(Kind::Float).sqrt()
    }

    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.numel()).sum()
    }
}

/// Online methods keep one adapted state per variant: with `[corrupt]`, each corruption
/// and severity is its own stream that starts from the source weights, as ImageNet-C
/// evaluations adapt per corruption.
///
/// Hazard: every parked stream holds a device copy of the adapted parameters and the
/// optimizer state; with many variants and a large model that is many model copies.
pub struct VariantStreams {
    live: Variant,
    parked: HashMap<Variant, (Vec<Tensor>, OptimizerState)>,
}

impl Default for VariantStreams {
    fn default() -> Self {
        VariantStreams {
            live: Variant::CLEAN,
            parked: HashMap::new(),
        }
    }
}

impl VariantStreams {
    /// The variant whose state the live parameters hold.
    pub fn live(&self) -> Variant {
        self.live
    }

    /// Makes `to` the live stream: parks the live weights and optimizer state under the
    /// live variant, then loads `to`'s, or `originals` and a fresh optimizer when `to`
    /// has not been seen. A no-op when `to` is live.
    pub fn switch(&mut self, to: Variant, params: &AdaptedParams, optimizer: &mut Optimizer, originals: &[Tensor]) {
        if to == self.live {
            return;
        }
        self.parked
            .insert(self.live, (params.snapshot(), optimizer.take_state()));
        match self.parked.remove(&to) {
            Some((weights, state)) => {
                params.restore(&weights);
                optimizer.restore(state);
            }
            None => params.restore(originals),
        }
        self.live = to;
    }
}
