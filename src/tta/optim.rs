//! SGD (momentum, weight decay) and AdamW over a list of parameter tensors, with the
//! exact update rules of `torch.optim` so results match the Python reference.
//!
//! State lives on the parameters' device; snapshots are device copies (no host trip).

use tch::Tensor;

use super::config::OptimizerKind;

pub struct Optimizer {
    kind: OptimizerKind,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    state: OptimizerState,
}

/// Per-parameter state: SGD momentum buffers, or AdamW moments and the step count.
#[derive(Default)]
pub struct OptimizerState {
    steps: i64,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
}

impl OptimizerState {
    fn copy(&self) -> OptimizerState {
        OptimizerState {
            steps: self.steps,
            first: self.first.iter().map(copy_defined).collect(),
            second: self.second.iter().map(copy_defined).collect(),
        }
    }
}

/// A device copy; an undefined tensor (the momentum buffer of a parameter that never had
/// a gradient, e.g. a denoiser's unused label table) stays undefined: copying it would fail.
fn copy_defined(t: &Tensor) -> Tensor {
    if t.defined() {
        t.copy()
    } else {
        Tensor::new()
    }
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

impl Optimizer {
    pub fn new(kind: OptimizerKind, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        Optimizer {
            kind,
            lr,
            momentum,
            weight_decay,
            state: OptimizerState::default(),
        }
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// One update from the parameters' accumulated gradients. Parameters without a
    /// gradient are left alone (as torch does).
    ///
    /// Errors are libtorch's (device out of memory); the parameters may then be partly
    /// updated, so the caller restores a snapshot before going on.
    pub fn step(&mut self, params: &[Tensor]) -> Result<(), tch::TchError> {
        tch::no_grad(|| match self.kind {
            OptimizerKind::Sgd => self.sgd(params),
            OptimizerKind::Adamw => self.adamw(params),
        })?;
        self.state.steps += 1;
        Ok(())
    }

    fn sgd(&mut self, params: &[Tensor]) -> Result<(), tch::TchError> {
        if self.state.first.len() != params.len() {
            self.state.first = params.iter().map(|_| Tensor::new()).collect();
        }
        for (p, buf) in params.iter().zip(self.state.first.iter_mut()) {
            let g = p.f_grad()?;
            if !g.defined() {
                continue;
            }
            let mut d = if self.weight_decay != 0.0 {
                &g + p * self.weight_decay
            } else {
                g
            };
            if self.momentum != 0.0 {
                if buf.defined() {
                    let _ = buf.f_mul_scalar_(self.momentum)?.f_add_(&d)?;
                } else {
                    *buf = d.copy(); // torch: buf = clone(d_p) on the first step
                }
                d = buf.shallow_clone();
            }
            let _ = p.shallow_clone().f_sub_(&(d * self.lr))?;
        }
        Ok(())
    }

    fn adamw(&mut self, params: &[Tensor]) -> Result<(), tch::TchError> {
        if self.state.steps == 0 {
            self.state.first = params.iter().map(|p| p.zeros_like()).collect();
            self.state.second = params.iter().map(|p| p.zeros_like()).collect();
        }
        let step = (self.state.steps + 1) as i32;
        let bias1 = 1.0 - BETA1.powi(step);
        let bias2 = 1.0 - BETA2.powi(step);
        let moments = self.state.first.iter_mut().zip(self.state.second.iter_mut());
        for (p, (m, v)) in params.iter().zip(moments) {
            let g = p.f_grad()?;
            if !g.defined() {
                continue;
            }
            let mut p = p.shallow_clone();
            let _ = p.f_mul_scalar_(1.0 - self.lr * self.weight_decay)?;
            let _ = m.f_lerp_(&g, 1.0 - BETA1)?;
            let _ = v.f_mul_scalar_(BETA2)?.f_add_(&(&g * &g * (1.0 - BETA2)))?;
            let denom = (v.f_sqrt()? / bias2.sqrt()) + ADAM_EPS;
            let _ = p.f_addcdiv_(&(&*m * (-self.lr / bias1)), &denom)?;
        }
        Ok(())
    }

    /// A device copy of the state (for online mode's divergence rollback).
    pub fn snapshot(&self) -> OptimizerState {
        self.state.copy()
    }

    pub fn restore(&mut self, state: OptimizerState) {
        self.state = state;
    }

    /// Moves the state out, leaving a fresh optimizer (no copy).
    pub fn take_state(&mut self) -> OptimizerState {
        std::mem::take(&mut self.state)
    }

    /// Back to a fresh optimizer, as before the first image.
    pub fn reset(&mut self) {
        self.state = OptimizerState::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn quadratic_grad(p: &Tensor) {
        // loss = sum(p^2) / 2, so grad = p
        let loss = (p * p).sum(Kind::Float) / 2.0;
        loss.backward();
    }

    #[test]
    fn sgd_momentum_matches_torch_formula() {
        let mut p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(OptimizerKind::Sgd, 0.1, 0.9, 0.0);
        let mut expected = [1.0f64, -2.0];
        let mut buf = [0.0f64; 2];
        for step in 0..3 {
            quadratic_grad(&p);
            opt.step(std::slice::from_ref(&p)).unwrap();
            p.zero_grad();
            for i in 0..2 {
                let g = expected[i];
                buf[i] = if step == 0 { g } else { 0.9 * buf[i] + g };
                expected[i] -= 0.1 * buf[i];
            }
        }
        let got: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        assert!((got[0] as f64 - expected[0]).abs() < 1e-6 && (got[1] as f64 - expected[1]).abs() < 1e-6);
    }

    #[test]
    fn adamw_matches_torch_formula() {
        let mut p = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
        let mut opt = Optimizer::new(OptimizerKind::Adamw, 0.01, 0.0, 0.1);
        let (mut x, mut m, mut v) = (0.5f64, 0.0f64, 0.0f64);
        for step in 1..=4 {
            quadratic_grad(&p);
            opt.step(std::slice::from_ref(&p)).unwrap();
            p.zero_grad();
            let g = x;
            x *= 1.0 - 0.01 * 0.1;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let b1 = 1.0 - 0.9f64.powi(step);
            let b2 = 1.0 - 0.999f64.powi(step);
            x -= 0.01 / b1 * m / (v.sqrt() / b2.sqrt() + 1e-8);
        }
        let got = f64::try_from(
            &p.detach()
                .to_kind(Kind::Double)
                .to_device(Device::Cpu)
                .sum(Kind::Double),
        )
        .unwrap();
        assert!((got - x).abs() < 1e-6, "{got} vs {x}");
    }
}
