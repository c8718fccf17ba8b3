//! The forward process and the (t, eps) draws of one image. The schedule itself (the
//! bundle's betas) lives in `model::schedule`.
//!
//! Invariant: with [`SeededNoise`], the draws of an image depend only on (seed, key), so
//! results do not depend on worker count, shard order or batch composition.

use tch::{Device, Kind, Tensor};

use super::config::Timesteps;

/// The forward process: `sqrt(abar_t) z0 + sqrt(1 - abar_t) eps` for a batch of `t`.
/// `z0` is `[1, ...]` (broadcast) or `[n, ...]`; `alphas_cumprod` is `[T]` on the device.
pub fn add_noise(alphas_cumprod: &Tensor, z0: &Tensor, t: &Tensor, eps: &Tensor) -> Tensor {
    let n = t.size()[0];
    let abar = alphas_cumprod.index_select(0, t).view([n, 1, 1, 1]);
    abar.sqrt() * z0 + (-&abar + 1.0).sqrt() * eps
}

/// Where an image's timesteps and noise come from.
pub trait NoiseSource: Send {
    /// Called before the first draw of each image.
    fn begin_image(&mut self, key: &str);
    /// Timesteps `[n]` (int64) and noise `[n, shape...]` for iteration `iteration`.
    fn draw(&mut self, iteration: usize, n: usize, shape: &[i64], device: Device) -> (Tensor, Tensor);
}

/// Draws from torch's generator, reseeded per image from (seed, key).
pub struct SeededNoise {
    pub seed: u64,
    pub num_timesteps: i64,
    pub timesteps: Timesteps,
    pub same_noise: bool,
}

/// Mixes the run seed and a sample key into a torch seed (FNV-1a over the key).
pub fn image_seed(seed: u64, key: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 1) as i64
}

impl NoiseSource for SeededNoise {
    fn begin_image(&mut self, key: &str) {
        tch::manual_seed(image_seed(self.seed, key));
    }

    fn draw(&mut self, _iteration: usize, n: usize, shape: &[i64], device: Device) -> (Tensor, Tensor) {
        let n_i = n as i64;
        let t = match self.timesteps {
            Timesteps::Uniform => Tensor::randint(self.num_timesteps, [n_i], (Kind::Int64, device)),
            Timesteps::Stratified => {
                let stride = self.num_timesteps as f64 / n as f64;
                let offset = Tensor::rand([1], (Kind::Double, device)) * stride;
                (Tensor::arange(n_i, (Kind::Double, device)) * stride + offset)
                    .floor()
                    .clamp(0.0, (self.num_timesteps - 1) as f64)
                    .to_kind(Kind::Int64)
            }
        };
        let mut full = vec![n_i];
        full.extend_from_slice(shape);
        let eps = if self.same_noise {
            let mut one = vec![1];
            one.extend_from_slice(shape);
            Tensor::randn(&one, (Kind::Float, device))
                .expand(&full, false)
                .contiguous()
        } else {
            Tensor::randn(&full, (Kind::Float, device))
        };
        (t, eps)
    }
}

/// Replays given draws: `t` is `[iterations, n]`, `eps` is `[iterations, n, shape...]`.
/// For parity tests against a reference implementation.
pub struct ReplayNoise {
    pub t: Tensor,
    pub eps: Tensor,
}

impl NoiseSource for ReplayNoise {
    fn begin_image(&mut self, _key: &str) {}

    fn draw(&mut self, iteration: usize, _n: usize, _shape: &[i64], device: Device) -> (Tensor, Tensor) {
        let i = iteration as i64;
        (self.t.get(i).to_device(device), self.eps.get(i).to_device(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_on_seed_and_key_only() {
        let mut noise = SeededNoise {
            seed: 7,
            num_timesteps: 1000,
            timesteps: Timesteps::Uniform,
            same_noise: false,
        };
        noise.begin_image("a");
        let (t1, e1) = noise.draw(0, 4, &[1, 2, 2], Device::Cpu);
        noise.begin_image("b");
        let _ = noise.draw(0, 4, &[1, 2, 2], Device::Cpu);
        noise.begin_image("a");
        let (t2, e2) = noise.draw(0, 4, &[1, 2, 2], Device::Cpu);
        assert!(t1.equal(&t2) && e1.equal(&e2));
        assert_eq!(e1.size(), [4, 1, 2, 2]);
    }

    #[test]
    fn stratified_and_shared_noise() {
        let mut noise = SeededNoise {
            seed: 0,
            num_timesteps: 1000,
            timesteps: Timesteps::Stratified,
            same_noise: true,
        };
        noise.begin_image("k");
        let (t, e) = noise.draw(0, 10, &[3], Device::Cpu);
        let t: Vec<i64> = Vec::try_from(&t).unwrap();
        for (i, v) in t.iter().enumerate() {
            assert!((i as i64 * 100..(i as i64 + 1) * 100).contains(v), "{t:?}");
        }
        assert!(e.get(0).equal(&e.get(9)));
    }
}
