//! The forward process and the (t, eps) draws of one image. The schedule itself (the
//! bundle's betas) lives in `model::schedule`.
//!
//! Invariant: with [`SeededNoise`], the draws of an image depend only on (seed, key), so
//! results do not depend on worker count, shard order, batch composition, thread, device
//! or any other user of torch's global generator.

use tch::{Device, Tensor};

use super::config::Timesteps;
use crate::rng::Rng;

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

/// Draws from a generator of this image's own, seeded from (seed, key) at
/// [`NoiseSource::begin_image`]: a local [`Rng`] on the host whose values are copied to
/// the device. So the draws of one (seed, key) are the same on CPU and GPU, in any
/// thread, whatever else in the process uses torch's generator. Order per draw: the
/// timesteps, then the noise, sample by sample.
pub struct SeededNoise {
    pub seed: u64,
    pub num_timesteps: i64,
    pub timesteps: Timesteps,
    pub same_noise: bool,
    rng: Rng,
}

impl SeededNoise {
    pub fn new(seed: u64, num_timesteps: i64, timesteps: Timesteps, same_noise: bool) -> SeededNoise {
        SeededNoise {
            seed,
            num_timesteps,
            timesteps,
            same_noise,
            rng: Rng::new(image_seed(seed, "")),
        }
    }
}

/// Mixes the run seed and a sample key into an image's seed (FNV-1a over the key).
pub fn image_seed(seed: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A float32 tensor of `shape` filled with standard normals from `rng`, on `device`.
pub fn normal_tensor(rng: &mut Rng, shape: &[i64], device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_slice(&values).view(shape).to_device(device)
}

/// A float32 tensor of `shape` filled with uniforms on [0, 1) from `rng`, on `device`.
pub fn uniform_tensor(rng: &mut Rng, shape: &[i64], device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.uniform() as f32).collect();
    Tensor::from_slice(&values).view(shape).to_device(device)
}

impl NoiseSource for SeededNoise {
    fn begin_image(&mut self, key: &str) {
        self.rng = Rng::new(image_seed(self.seed, key));
    }

    fn draw(&mut self, _iteration: usize, n: usize, shape: &[i64], device: Device) -> (Tensor, Tensor) {
        let t: Vec<i64> = match self.timesteps {
            Timesteps::Uniform => (0..n).map(|_| self.rng.int_in(0, self.num_timesteps)).collect(),
            Timesteps::Stratified => {
                let stride = self.num_timesteps as f64 / n as f64;
                let offset = self.rng.uniform() * stride;
                (0..n)
                    .map(|i| ((i as f64 * stride + offset).floor() as i64).clamp(0, self.num_timesteps - 1))
                    .collect()
            }
        };
        let t = Tensor::from_slice(&t).to_device(device);
        let mut full = vec![n as i64];
        full.extend_from_slice(shape);
        let eps = if self.same_noise {
            let mut one = vec![1];
            one.extend_from_slice(shape);
            normal_tensor(&mut self.rng, &one, device)
                .expand(&full, false)
                .contiguous()
        } else {
            normal_tensor(&mut self.rng, &full, device)
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
    use tch::Kind;

    fn noise(seed: u64, timesteps: Timesteps, same_noise: bool) -> SeededNoise {
        SeededNoise::new(seed, 1000, timesteps, same_noise)
    }

    #[test]
    fn draws_depend_on_seed_and_key_only() {
        let mut noise = noise(7, Timesteps::Uniform, false);
        noise.begin_image("a");
        let (t1, e1) = noise.draw(0, 4, &[1, 2, 2], Device::Cpu);
        noise.begin_image("b");
        let (tb, eb) = noise.draw(0, 4, &[1, 2, 2], Device::Cpu);
        noise.begin_image("a");
        let (t2, e2) = noise.draw(0, 4, &[1, 2, 2], Device::Cpu);
        assert!(t1.equal(&t2) && e1.equal(&e2));
        assert!(!(t1.equal(&tb) && e1.equal(&eb)), "another key draws the same");
        assert_eq!(e1.size(), [4, 1, 2, 2]);
        assert_eq!(t1.kind(), Kind::Int64);
    }

    /// 200 replays of one image's draws on 4 threads, while 2 other threads reseed and
    /// draw from torch's global generator the whole time: every replay is the same.
    #[test]
    fn draws_ignore_torch_global_generator_and_threads() {
        let reference = {
            let mut n = noise(11, Timesteps::Uniform, false);
            n.begin_image("img");
            let (t, e) = n.draw(0, 8, &[3, 4, 4], Device::Cpu);
            (
                Vec::<i64>::try_from(&t).unwrap(),
                Vec::<f32>::try_from(e.flatten(0, -1)).unwrap(),
            )
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for s in 0..2 {
                let stop = &stop;
                scope.spawn(move || {
                    let mut i = s;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        tch::manual_seed(i);
                        let _ = Tensor::randn([64], (Kind::Float, Device::Cpu)).sum(Kind::Float);
                        i += 2;
                    }
                });
            }
            let replays: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        for _ in 0..50 {
                            let mut n = noise(11, Timesteps::Uniform, false);
                            n.begin_image("other");
                            let _ = n.draw(0, 8, &[3, 4, 4], Device::Cpu);
                            n.begin_image("img");
                            let (t, e) = n.draw(0, 8, &[3, 4, 4], Device::Cpu);
                            assert_eq!(Vec::<i64>::try_from(&t).unwrap(), reference.0);
                            assert_eq!(Vec::<f32>::try_from(e.flatten(0, -1)).unwrap(), reference.1);
                        }
                    })
                })
                .collect();
            let results: Vec<_> = replays.into_iter().map(|h| h.join()).collect();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for r in results {
                r.expect("a replay differed");
            }
        });
    }

    /// Where a CUDA device exists, its draws are the CPU draws, bit for bit.
    #[test]
    fn draws_on_cuda_equal_cpu_draws() {
        let mut devices = vec![Device::Cpu];
        if tch::Cuda::is_available() {
            devices.push(Device::Cuda(0));
        }
        let draws: Vec<(Tensor, Tensor)> = devices
            .iter()
            .map(|&d| {
                let mut n = noise(3, Timesteps::Stratified, false);
                n.begin_image("k");
                let (t, e) = n.draw(0, 6, &[2, 3], d);
                assert_eq!(t.device(), d);
                (t.to_device(Device::Cpu), e.to_device(Device::Cpu))
            })
            .collect();
        for (t, e) in &draws[1..] {
            assert!(t.equal(&draws[0].0) && e.equal(&draws[0].1));
        }
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut n = noise(5, Timesteps::Uniform, false);
        n.begin_image("k");
        let (_, e) = n.draw(0, 1, &[100_000], Device::Cpu);
        let mean = f64::try_from(e.mean(Kind::Float)).unwrap();
        let std = f64::try_from(e.std(true)).unwrap();
        assert!(mean.abs() < 0.02 && (std - 1.0).abs() < 0.02, "{mean} {std}");
    }

    #[test]
    fn stratified_and_shared_noise() {
        let mut noise = noise(0, Timesteps::Stratified, true);
        noise.begin_image("k");
        let (t, e) = noise.draw(0, 10, &[3], Device::Cpu);
        let t: Vec<i64> = Vec::try_from(&t).unwrap();
        for (i, v) in t.iter().enumerate() {
            assert!((i as i64 * 100..(i as i64 + 1) * 100).contains(v), "{t:?}");
        }
        assert!(e.get(0).equal(&e.get(9)));
    }
}
