//! `[tta]`: the method and its knobs, owned by the methods that read them.

use serde::{Deserialize, Serialize};

use super::budget::{BudgetConfig, StepCost};

/// The method and its knobs. Defaults are the reference defaults of ALGORITHM.md.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TtaConfig {
    pub method: MethodName,
    /// How many classes `topk_after` lists per row.
    pub topk: usize,
    /// Optimizer steps per image.
    pub steps: usize,
    /// Iterations whose gradients accumulate into one step (iterations = steps * accum).
    pub accum: usize,
    /// (t, eps) pairs per iteration.
    pub samples_per_step: usize,
    pub timesteps: Timesteps,
    /// One eps shared by all samples of an iteration.
    pub same_noise: bool,
    pub loss: Loss,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub adapt: Adapt,
    /// Restrict the condition mixture to the source top-K classes; 0 means all.
    pub adapt_topk: usize,
    pub mode: Mode,
    pub precision: Precision,
    /// Run the `accum * samples_per_step` pairs of a step as one batch, the classifier
    /// once per step (same gradient as the reference's `accum` iterations, fewer passes).
    pub fuse_accum: bool,
    /// Largest denoiser batch when fusing; bounds device memory.
    pub max_batch: usize,
    pub tent: TentConfig,
    pub eata: EataConfig,
    pub sar: SarConfig,
    pub diffusion_classifier: DiffusionClassifierConfig,
    /// Adaptive compute per image (episodic diffusion methods); all off by default.
    pub budget: BudgetConfig,
    pub dusa: DusaConfig,
}

impl TtaConfig {
    /// What one adaptation step of the configured method costs, for `[tta.budget]`; or
    /// why the method takes no budget. Online mode is refused: its adapted state carries
    /// across images, so "the source prediction" of an image and a per-image cap mean
    /// something else there (ALGORITHM.md gates episodic adaptation).
    pub fn budget_step_cost(&self) -> Result<StepCost, String> {
        match (self.method, self.mode) {
            (MethodName::DiffusionTta, Mode::Episodic) => Ok(StepCost {
                steps: self.steps,
                evals: (self.accum * self.samples_per_step) as u64,
            }),
            (MethodName::Dusa, Mode::Episodic) => Ok(StepCost {
                steps: self.dusa.steps,
                evals: (self.dusa.accum * (self.dusa.topk + self.dusa.random)) as u64,
            }),
            (MethodName::DiffusionTta | MethodName::Dusa, Mode::Online) => Err(
                "adaptive compute is per image: it applies to tta.mode = \"episodic\" only; \
                 remove [tta.budget] or set tta.mode = \"episodic\""
                    .into(),
            ),
            (method, _) => Err(format!(
                "{} does not adapt with a denoiser; [tta.budget] applies to diffusion-tta and dusa (episodic)",
                method.as_str()
            )),
        }
    }

    /// The `method` column and summary label: the method, with `-online` when
    /// Diffusion-TTA or DUSA runs in online mode (TENT is always online), and with
    /// `-adaptive` when `[tta.budget]` gates it, so a robustness table over several
    /// outputs shows each configuration as its own column.
    pub fn method_column(&self) -> &'static str {
        let adaptive = !self.budget.is_off();
        match (self.method, self.mode) {
            (MethodName::DiffusionTta, Mode::Online) => "diffusion-tta-online",
            (MethodName::Dusa, Mode::Online) => "dusa-online",
            (MethodName::DiffusionTta, Mode::Episodic) if adaptive => "diffusion-tta-adaptive",
            (MethodName::Dusa, Mode::Episodic) if adaptive => "dusa-adaptive",
            (method, _) => method.as_str(),
        }
    }
}

impl Default for TtaConfig {
    fn default() -> Self {
        TtaConfig {
            method: MethodName::default(),
            topk: 5,
            steps: 5,
            accum: 12,
            samples_per_step: 15,
            timesteps: Timesteps::Uniform,
            same_noise: false,
            loss: Loss::Mse,
            optimizer: OptimizerKind::Sgd,
            lr: 5e-3,
            momentum: 0.9,
            weight_decay: 0.0,
            adapt: Adapt::ClassifierDiffusion,
            adapt_topk: 0,
            mode: Mode::Episodic,
            precision: Precision::Fp32,
            fuse_accum: true,
            max_batch: 64,
            tent: TentConfig::default(),
            eata: EataConfig::default(),
            sar: SarConfig::default(),
            diffusion_classifier: DiffusionClassifierConfig::default(),
            budget: BudgetConfig::default(),
            dusa: DusaConfig::default(),
        }
    }
}

/// TENT: entropy minimisation over norm-layer affine parameters, online.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TentConfig {
    pub lr: f64,
    pub momentum: f64,
}

impl Default for TentConfig {
    fn default() -> Self {
        TentConfig {
            lr: 1e-3,
            momentum: 0.9,
        }
    }
}

/// EATA (Niu et al., ICML 2022), online: entropy minimisation over the norm-layer
/// affine parameters of the reliable (entropy below `e_margin` x ln C) and non-redundant
/// samples, each weighted by 1/exp(E - E0), plus an anti-forgetting penalty
/// `fisher_alpha` x sum F (theta - theta0)^2 with F from clean images.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EataConfig {
    /// SGD learning rate (the authors': 2.5e-4 at batch 64).
    pub lr: f64,
    pub momentum: f64,
    /// E0 as a fraction of ln C (C: the classes the model predicts over).
    pub e_margin: f64,
    /// A kept sample must have cosine similarity below this to the moving average of
    /// the kept samples' probabilities (momentum 0.9); none is redundant in a stream's
    /// first batch.
    pub d_margin: f64,
    /// Weight of the Fisher penalty; 0 is ETA (no clean images needed).
    pub fisher_alpha: f64,
    /// Clean images for the Fisher information, read as `[input]` reads (same format):
    /// a shard, a folder of shards, or a pattern. Required when `fisher_alpha > 0`.
    pub fisher_url: Option<String>,
    /// How many of its images (the first ones, in shard order).
    pub fisher_samples: usize,
    /// Images per Fisher batch (the authors use the test batch size, 64).
    pub fisher_batch: usize,
}

impl Default for EataConfig {
    fn default() -> Self {
        EataConfig {
            lr: 2.5e-4,
            momentum: 0.9,
            e_margin: 0.4,
            d_margin: 0.05,
            fisher_alpha: 2000.0,
            fisher_url: None,
            fisher_samples: 2000,
            fisher_batch: 64,
        }
    }
}

/// SAR (Niu et al., ICLR 2023), online: sharpness-aware (SAM) entropy minimisation of
/// the reliable samples, over the norm-layer affine parameters outside `frozen`, with
/// model recovery.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SarConfig {
    /// SGD learning rate; unset, 2.5e-4 x runtime.batch_size / 64 (the authors' rule).
    pub lr: Option<f64>,
    pub momentum: f64,
    /// SAM's neighbourhood radius.
    pub rho: f64,
    /// E0 as a fraction of ln C, applied on both passes.
    pub e_margin: f64,
    /// Reset weights and optimizer when the moving average (0.9) of the second pass's
    /// loss falls below this.
    pub reset_below: f64,
    /// Module paths whose norm layers stay frozen (the last stage, as the authors
    /// leave it): a parameter is frozen when its module path is one of these or lies
    /// below one. The defaults are the authors' ResNet (`layer4`) and ViT-B
    /// (`blocks.9` to `blocks.11`, the final `norm`) choices.
    pub frozen: Vec<String>,
}

impl Default for SarConfig {
    fn default() -> Self {
        SarConfig {
            lr: None,
            momentum: 0.9,
            rho: 0.05,
            e_margin: 0.4,
            reset_below: 0.2,
            frozen: ["layer4", "blocks.9", "blocks.10", "blocks.11", "norm"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl SarConfig {
    /// The learning rate at `batch_size`: `lr`, or the authors' 2.5e-4 x batch / 64.
    pub fn lr_at(&self, batch_size: usize) -> f64 {
        self.lr.unwrap_or(2.5e-4 * batch_size as f64 / 64.0)
    }

    /// Whether parameter `name` (`module.path.weight`) lies in a frozen module.
    pub fn is_frozen(&self, name: &str) -> bool {
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        self.frozen.iter().any(|f| {
            module == f
                || module
                    .strip_prefix(f.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        })
    }
}

/// Diffusion Classifier: predict the class whose condition gives the lowest loss.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffusionClassifierConfig {
    /// (t, eps) pairs per class, shared by all classes.
    pub samples: usize,
    /// Keep only this many classes after a first pass; 0 means no pruning.
    pub prune_to: usize,
    /// Pairs of the first pass when pruning.
    pub first_samples: usize,
}

impl Default for DiffusionClassifierConfig {
    fn default() -> Self {
        DiffusionClassifierConfig {
            samples: 64,
            prune_to: 0,
            first_samples: 16,
        }
    }
}

/// DUSA (ALGORITHM.md, "DUSA"): one timestep, a few candidate classes, a mixture of
/// their noise predictions. `tta.mode`, `tta.adapt` and `tta.precision` apply; the
/// optimizer is Adam (no weight decay).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DusaConfig {
    /// The one diffusion timestep, in 0..T.
    pub timestep: usize,
    /// Candidates from the top of the classifier's logits.
    pub topk: usize,
    /// Candidates drawn without replacement from the other classes, with the
    /// classifier's probabilities.
    pub random: usize,
    pub lr: f64,
    /// Optimizer steps per image (episodic mode; online mode runs one pass per batch).
    pub steps: usize,
    /// Passes (episodic: per-image iterations; online: batches) whose gradients
    /// accumulate into one optimizer step (online, `runtime.batch_size = 8` and
    /// `accum = 8` is the authors' 64 images per update).
    pub accum: usize,
    /// Adapt the classifier's head too (the authors' recipe adapts the whole
    /// classifier); false leaves the bundle's `classifier.head` out, as Diffusion-TTA.
    pub adapt_head: bool,
    /// Segmenters: the most candidate classes per image (the union of every pixel's top
    /// `topk`; every pixel's top-1 is kept even past this). The authors use 20.
    pub max_dense_candidates: usize,
}

impl Default for DusaConfig {
    fn default() -> Self {
        DusaConfig {
            timestep: 100,
            topk: 4,
            random: 2,
            lr: 1e-5,
            steps: 1,
            accum: 1,
            adapt_head: true,
            max_dense_candidates: 20,
        }
    }
}

/// Test-time adaptation methods of ALGORITHM.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodName {
    #[default]
    Source,
    Tent,
    Eata,
    Sar,
    DiffusionClassifier,
    DiffusionTta,
    Dusa,
}

impl MethodName {
    pub fn as_str(self) -> &'static str {
        match self {
            MethodName::Source => "source",
            MethodName::Tent => "tent",
            MethodName::Eata => "eata",
            MethodName::Sar => "sar",
            MethodName::DiffusionClassifier => "diffusion-classifier",
            MethodName::DiffusionTta => "diffusion-tta",
            MethodName::Dusa => "dusa",
        }
    }

    /// Whether the method needs the bundle's diffusion model.
    pub fn needs_diffusion(self) -> bool {
        matches!(
            self,
            MethodName::DiffusionClassifier | MethodName::DiffusionTta | MethodName::Dusa
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Timesteps {
    /// Independent uniform draws from 0..T.
    Uniform,
    /// One random offset, then evenly spaced over 0..T.
    Stratified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    Mse,
    L1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Adapt {
    /// Every classifier parameter except the head, plus every denoiser parameter.
    #[serde(rename = "classifier+diffusion")]
    ClassifierDiffusion,
    /// Every classifier parameter except the head.
    #[serde(rename = "classifier")]
    Classifier,
    /// Affine parameters of the classifier's norm layers only.
    #[serde(rename = "norm")]
    Norm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Weights and optimizer state are restored after every image.
    Episodic,
    /// Adapted weights and optimizer state carry over from image to image.
    Online,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// bf16 autocast with fp32 weights; CUDA only.
    Bf16,
}
