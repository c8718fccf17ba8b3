//! Model bundles: a folder with `bundle.toml` and TorchScript files, local or in an
//! object store.
//!
//! Invariants: every file of the bundle is read exactly once, into memory, and hashed
//! as read; the models are loaded from those bytes, never from the path again, so the
//! bundle's digest ([`Bundle::sha256`]) covers exactly what runs, and a file changed
//! after the digest was taken is never loaded. Files the spec names resolve only inside
//! the bundle (no `..`, no absolute paths). A loaded [`Classifier`] has been run once on
//! a zero batch and its output shape checked against `bundle.toml`, so shape mistakes
//! fail at start, not mid-run.
//!
//! Hazard: TorchScript files are code; a pin ([`Bundle::open_pinned`]) is what keeps a
//! swapped bundle from running.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{CModule, Device, Kind, Tensor};

use super::label_space::LabelSpace;
use super::schedule::{alphas_cumprod, ScheduleKind};
use crate::image::{Channels, ClassifierView, DiffusionView};
use crate::sample::Task;
use crate::storage::{self, StoreOptions};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {bundle}: cannot read {file}: {message}")]
    Read {
        bundle: String,
        file: String,
        message: String,
    },
    #[error("bundle {bundle}: bundle.toml: {message}")]
    Spec { bundle: String, message: String },
    #[error("bundle {bundle}: cannot load {file}: {source}")]
    Load {
        bundle: String,
        file: String,
        source: tch::TchError,
    },
    #[error("bundle {bundle}: {message}")]
    Shape { bundle: String, message: String },
    #[error(
        "bundle {bundle}: its sha256 is {actual}, but model.sha256 pins {expected}; refusing to run another bundle (update the pin if the change is intended)"
    )]
    PinMismatch {
        bundle: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
}

/// `bundle.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSpec {
    pub name: String,
    /// What the classifier predicts: `classification` (logits `[B,K]`), `segmentation`
    /// (logits `[B,K,h,w]`) or `depth` (`[B,1,h,w]`, metres).
    #[serde(default)]
    pub task: Task,
    /// One name per class, optional. For an open-vocabulary bundle (tools/export_clip_sd.py)
    /// this is the vocabulary: the head and the class embeddings were made from it.
    #[serde(default)]
    pub class_names: Vec<String>,
    /// The prompt templates (`a photo of a {}.`) the vocabulary was turned into text
    /// with; empty for a closed-set bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_templates: Vec<String>,
    pub classifier: ClassifierSpec,
    /// The diffusion model; needed by diffusion-tta and diffusion-classifier.
    #[serde(default)]
    pub diffusion: Option<DiffusionSpec>,
}

impl BundleSpec {
    /// Every file the spec names, as written.
    pub fn files(&self) -> impl Iterator<Item = &str> {
        let diffusion = self.diffusion.iter().flat_map(|d| {
            let embeddings = Some(&d.class_embeddings).filter(|e| !e.is_empty());
            [Some(&d.denoiser), embeddings, d.encoder.as_ref()]
                .into_iter()
                .flatten()
        });
        std::iter::once(&self.classifier.file)
            .chain(diffusion)
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionSpec {
    /// TorchScript: `forward(x_t [N,C,h,w], t [N] int64, cond [N,...]) -> eps [N,C',h,w]`,
    /// C' = C, or 2C with learned variance (the first C channels are used).
    pub denoiser: String,
    /// How the prediction conditions the denoiser: `mixture` (a `[N,D]` or `[N,T,D]`
    /// vector) or `concat` (a `[N,D,h,w]` map the denoiser concatenates to its input:
    /// per-pixel class-embedding mixtures for segmentation, the depth map for depth).
    #[serde(default)]
    pub condition: Condition,
    /// safetensors file with the class embeddings, `[K,D]` or `[K,T,D]`; not used by a
    /// depth bundle.
    #[serde(default)]
    pub class_embeddings: String,
    /// Tensor name inside `class_embeddings`.
    #[serde(default = "default_embeddings_tensor")]
    pub embeddings_tensor: String,
    /// Optional TorchScript encoder: image in [-1,1] -> latent mean.
    #[serde(default)]
    pub encoder: Option<String>,
    #[serde(default = "default_latent_scale")]
    pub latent_scale: f64,
    /// Channels of the diffusion view (1 or 3).
    pub channels: usize,
    /// Side of the diffusion view (the classifier crop, resized).
    pub resolution: u32,
    pub schedule: ScheduleSpec,
    /// Depth bundles: the depth range (metres) the denoiser's condition map is normalised
    /// from, to [-1, 1]: `2 (d - depth_min) / (depth_max - depth_min) - 1`.
    #[serde(default)]
    pub depth_min: Option<f64>,
    #[serde(default)]
    pub depth_max: Option<f64>,
}

/// `diffusion.condition`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    #[default]
    Mixture,
    Concat,
}

fn default_embeddings_tensor() -> String {
    "embeddings".into()
}
fn default_latent_scale() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub kind: ScheduleKind,
    pub beta_start: f64,
    pub beta_end: f64,
    pub steps: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    /// TorchScript module: `[B,C,H,W]` float -> logits `[B,K]`.
    #[serde(default = "default_classifier_file")]
    pub file: String,
    pub num_classes: usize,
    /// Names of the final layer's parameters (never adapted).
    #[serde(default)]
    pub head: Vec<String>,
    /// Names of the norm layers' affine parameters (TENT, `adapt = "norm"`).
    #[serde(default)]
    pub norm: Vec<String>,
    pub preprocess: PreprocessSpec,
}

fn default_classifier_file() -> String {
    "classifier.pt".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    pub resize: u32,
    pub crop: u32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// A bundle read into memory, ready to load.
#[derive(Debug)]
pub struct Bundle {
    pub spec: BundleSpec,
    /// Where it came from, for messages (credentials redacted).
    pub source: String,
    /// [`sha256_of_files`] over every file of the bundle, as read.
    pub sha256: String,
    /// The files the spec names, by normalized relative path, as read (and hashed).
    files: BTreeMap<String, Bytes>,
}

/// Deepest folder nesting read below a local bundle (symlinks are followed; a loop ends here).
const MAX_DEPTH: usize = 16;

impl Bundle {
    /// Opens a bundle from a local folder or an object-store URL.
    pub async fn open(location: &str, options: &StoreOptions) -> Result<Bundle, BundleError> {
        Self::open_pinned(location, options, None).await
    }

    /// Opens a bundle and, with `pin`, refuses it unless its digest equals the pin
    /// (compared before `bundle.toml` is even parsed).
    pub async fn open_pinned(location: &str, options: &StoreOptions, pin: Option<&str>) -> Result<Bundle, BundleError> {
        let (source, files) = if !location.contains("://") || location.starts_with("file://") {
            let dir = location.strip_prefix("file://").unwrap_or(location);
            let source = storage::redact_url(location);
            let files = read_local(Path::new(dir), &source)?;
            (source, files)
        } else {
            read_remote(location, options).await?
        };
        let sha256 = sha256_of_files(&files);
        if let Some(pin) = pin.filter(|p| !p.eq_ignore_ascii_case(&sha256)) {
            return Err(BundleError::PinMismatch {
                bundle: source,
                expected: pin.to_ascii_lowercase(),
                actual: sha256,
            });
        }
        Self::from_files(files, source, sha256)
    }

    fn from_files(mut files: BTreeMap<String, Bytes>, source: String, sha256: String) -> Result<Bundle, BundleError> {
        let spec_err = |message: String| BundleError::Spec {
            bundle: source.clone(),
            message,
        };
        let raw = files.get("bundle.toml").ok_or_else(|| BundleError::Read {
            bundle: source.clone(),
            file: "bundle.toml".into(),
            message: "no such file in the bundle".into(),
        })?;
        let text = std::str::from_utf8(raw).map_err(|e| spec_err(format!("not UTF-8: {e}")))?;
        let value: toml::Value = toml::from_str(text).map_err(|e| spec_err(e.message().to_string()))?;
        let spec: BundleSpec = serde_path_to_error::deserialize(value)
            .map_err(|e| spec_err(format!("key `{}`: {}", e.path(), e.inner().message())))?;
        validate(&spec).map_err(spec_err)?;
        // Only the files the spec names stay in memory; the rest were read for the digest.
        let named: BTreeSet<String> = spec.files().filter_map(normalize).collect();
        files.retain(|path, _| named.contains(path));
        Ok(Bundle {
            spec,
            source,
            sha256,
            files,
        })
    }

    /// The bytes of a file the spec names.
    fn file(&self, name: &str) -> Result<&Bytes, BundleError> {
        normalize(name)
            .and_then(|path| self.files.get(&path))
            .ok_or_else(|| BundleError::Read {
                bundle: self.source.clone(),
                file: name.to_string(),
                message: "no such file in the bundle (paths are relative to the bundle folder, without `..`)".into(),
            })
    }

    /// Loads a TorchScript file of the bundle on `device`.
    fn load_module(&self, name: &str, device: Device) -> Result<CModule, BundleError> {
        let mut data: &[u8] = self.file(name)?;
        CModule::load_data_on_device(&mut data, device).map_err(|source| BundleError::Load {
            bundle: self.source.clone(),
            file: name.to_string(),
            source,
        })
    }

    /// The classifier's preprocessing as a [`ClassifierView`].
    pub fn classifier_view(&self) -> ClassifierView {
        let p = &self.spec.classifier.preprocess;
        ClassifierView {
            channels: if p.channels == 1 { Channels::Gray } else { Channels::Rgb },
            resize: p.resize,
            crop: p.crop,
            mean: p.mean.clone(),
            std: p.std.clone(),
        }
    }

    /// Loads the classifier on `device`, in eval mode, and checks its output shape.
    pub fn load_classifier(&self, device: Device) -> Result<Classifier, BundleError> {
        let spec = &self.spec.classifier;
        let mut module = self.load_module(&spec.file, device)?;
        module.set_eval();
        let view = self.classifier_view();
        let classifier = Classifier {
            module,
            device,
            num_classes: spec.num_classes,
            kept: None,
            task: self.spec.task,
            output_shape: Vec::new(),
            view,
            head: spec.head.clone(),
            norm: spec.norm.clone(),
        };
        let shape_err = |message: String| BundleError::Shape {
            bundle: self.source.clone(),
            message,
        };
        let probe = tch::no_grad(|| classifier.logits(&classifier.zeros(1)))
            .map_err(|e| shape_err(format!("{} failed on a zero batch: {e}", spec.file)))?;
        let (k, shape) = (spec.num_classes as i64, probe.size());
        let (fits, expected) = match self.spec.task {
            Task::Classification => (shape == [1, k], format!("[1, {k}]")),
            Task::Segmentation | Task::Depth => (
                shape.len() == 4 && shape[..2] == [1, k] && shape[2] > 0 && shape[3] > 0,
                format!("[1, {k}, h, w]"),
            ),
        };
        if !fits {
            return Err(shape_err(format!(
                "{} returns shape {:?} for one image of {:?}, but bundle.toml says task = {} with num_classes = {} (expected {expected})",
                spec.file,
                shape,
                classifier.input_shape(1),
                self.spec.task.as_str(),
                spec.num_classes,
            )));
        }
        let classifier = Classifier {
            output_shape: shape,
            ..classifier
        };
        let names: Vec<String> = classifier.parameter_names().map_err(|e| shape_err(e.to_string()))?;
        for (list, what) in [(&spec.head, "head"), (&spec.norm, "norm")] {
            if let Some(missing) = list.iter().find(|h| !names.contains(h)) {
                return Err(shape_err(format!(
                    "{what} parameter `{missing}` is not a parameter of {} (it has {})",
                    spec.file,
                    names.join(", ")
                )));
            }
        }
        Ok(classifier)
    }

    /// The diffusion view, when the bundle has a diffusion model.
    pub fn diffusion_view(&self) -> Option<DiffusionView> {
        self.spec.diffusion.as_ref().map(|d| DiffusionView {
            channels: if d.channels == 1 { Channels::Gray } else { Channels::Rgb },
            resolution: d.resolution,
        })
    }

    /// Loads the denoiser, class embeddings, optional encoder and schedule on `device`,
    /// and checks with one forward that their shapes agree with each other and with the
    /// classifier's class count.
    pub fn load_diffusion(&self, device: Device) -> Result<Diffusion, BundleError> {
        let bundle = self.source.clone();
        let Some(spec) = &self.spec.diffusion else {
            return Err(BundleError::Spec {
                bundle,
                message: "this method needs a diffusion model, but bundle.toml has no [diffusion] section".into(),
            });
        };
        let load = |file: &str| self.load_module(file, device);
        let mut denoiser = load(&spec.denoiser)?;
        denoiser.set_eval();
        let encoder = match &spec.encoder {
            Some(file) => {
                let mut e = load(file)?;
                e.set_eval();
                Some(e)
            }
            None => None,
        };
        let shape_err = |message: String| BundleError::Shape {
            bundle: bundle.clone(),
            message,
        };
        let embeddings = if self.spec.task == Task::Depth {
            // The depth map itself is the condition: no classes, no table.
            Tensor::zeros([0, 1], (Kind::Float, device))
        } else {
            self.class_embeddings(spec, device)?
        };
        let e_shape = embeddings.size();
        let num_classes = self.spec.classifier.num_classes as i64;
        let table_fits = match (self.spec.task, spec.condition) {
            (Task::Depth, _) => true,
            (_, Condition::Concat) => e_shape.len() == 2 && e_shape[0] == num_classes,
            (_, Condition::Mixture) => (e_shape.len() == 2 || e_shape.len() == 3) && e_shape[0] == num_classes,
        };
        if !table_fits {
            let expected = match spec.condition {
                Condition::Concat => format!("[{num_classes}, D] for condition = \"concat\""),
                Condition::Mixture => format!("[{num_classes}, D] or [{num_classes}, T, D]"),
            };
            return Err(shape_err(format!(
                "class embeddings {} have shape {:?}, but the classifier has num_classes = {} (expected {expected})",
                spec.class_embeddings, e_shape, num_classes
            )));
        }
        let abar = alphas_cumprod(
            spec.schedule.kind,
            spec.schedule.beta_start,
            spec.schedule.beta_end,
            spec.schedule.steps,
        );
        let diffusion = Diffusion {
            denoiser,
            encoder,
            embeddings,
            condition: spec.condition,
            depth_range: spec
                .depth_min
                .zip(spec.depth_max)
                .filter(|_| self.spec.task == Task::Depth),
            alphas_cumprod: Tensor::from_slice(&abar).to_kind(Kind::Float).to_device(device),
            num_timesteps: spec.schedule.steps as i64,
            latent_scale: spec.latent_scale,
            view: self.diffusion_view().expect("spec present"),
            latent_shape: Vec::new(),
            device,
        };
        // Probe: encoder (if any) on a zero image, then one denoiser call with class 0's embedding.
        let side = spec.resolution as i64;
        let probe = tch::no_grad(|| -> Result<(Vec<i64>, Vec<i64>), String> {
            let x = Tensor::zeros([1, spec.channels as i64, side, side], (Kind::Float, device));
            let z0 = diffusion.encode(&x).map_err(|e| {
                format!(
                    "the encoder failed on a [1, {}, {side}, {side}] image: {e}",
                    spec.channels
                )
            })?;
            let t = Tensor::zeros([1], (Kind::Int64, device));
            let cond = match spec.condition {
                Condition::Mixture => diffusion.embeddings.narrow(0, 0, 1),
                Condition::Concat => {
                    let (h, w) = (z0.size()[2], z0.size()[3]);
                    Tensor::zeros([1, diffusion.condition_channels(), h, w], (Kind::Float, device))
                }
            };
            let out = diffusion.denoiser.forward_ts(&[&z0, &t, &cond]).map_err(|e| {
                format!(
                    "the denoiser rejected x_t {:?} with cond {:?} (condition = {:?}, class embeddings {:?}): {e}",
                    z0.size(),
                    cond.size(),
                    spec.condition,
                    e_shape
                )
            })?;
            Ok((z0.size(), out.size()))
        })
        .map_err(shape_err)?;
        let (z_shape, out_shape) = probe;
        let c = z_shape[1];
        let ok = out_shape.len() == 4
            && out_shape[0] == 1
            && (out_shape[1] == c || out_shape[1] == 2 * c)
            && out_shape[2..] == z_shape[2..];
        if !ok {
            return Err(shape_err(format!(
                "the denoiser returns {out_shape:?} for x_t {z_shape:?}; expected [1, {c} or {}, {}, {}]",
                2 * c,
                z_shape[2],
                z_shape[3]
            )));
        }
        Ok(Diffusion {
            latent_shape: z_shape[1..].to_vec(),
            ..diffusion
        })
    }
}

/// A loaded diffusion model: denoiser, class embeddings, schedule, optional encoder.
pub struct Diffusion {
    pub denoiser: CModule,
    encoder: Option<CModule>,
    /// `[K,D]` or `[K,T,D]`, float, on the device; `[0, 1]` (empty) for depth bundles.
    pub embeddings: Tensor,
    pub condition: Condition,
    /// Depth bundles: `(depth_min, depth_max)`, metres, of the condition map's [-1, 1].
    pub depth_range: Option<(f64, f64)>,
    /// `[T]` float on the device.
    pub alphas_cumprod: Tensor,
    pub num_timesteps: i64,
    latent_scale: f64,
    pub view: DiffusionView,
    /// `[C, h, w]` of z0.
    pub latent_shape: Vec<i64>,
    pub device: Device,
}

impl Diffusion {
    /// z0 for a diffusion-view batch: `encoder(x) * latent_scale`, or `x` in pixel space.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        match &self.encoder {
            Some(e) => Ok(e.forward_ts(&[x])? * self.latent_scale),
            None => Ok(x.shallow_clone()),
        }
    }

    /// Channels of a `concat` condition map: the embedding width (segmentation) or 1
    /// (the depth map).
    pub fn condition_channels(&self) -> i64 {
        match self.depth_range {
            Some(_) => 1,
            None => *self
                .embeddings
                .size()
                .last()
                .expect("an embedding table has dimensions"),
        }
    }

    /// The `concat` condition `[B, D, h, w]` (the latent's spatial size) of a dense
    /// model output: for a segmenter's logits `[B,K,h',w']`, the per-pixel mixture
    /// `sum_k p_k(u) E_k` of the softmax over classes, resized bilinearly as
    /// probabilities; for a depth map `[B,1,h',w']` (metres), the map resized bilinearly
    /// and normalised from `depth_range` to [-1, 1]. Differentiable in `output`.
    pub fn condition_map(&self, output: &Tensor, task: Task) -> Result<Tensor, tch::TchError> {
        let size = [self.latent_shape[1], self.latent_shape[2]];
        let resize = |t: Tensor| -> Result<Tensor, tch::TchError> {
            let s = t.size();
            if s[2..] == size {
                Ok(t)
            } else {
                t.f_upsample_bilinear2d(size, false, None, None)
            }
        };
        match (task, self.depth_range) {
            (Task::Depth, Some((lo, hi))) => {
                let d = resize(output.to_kind(Kind::Float))?;
                Ok((d - lo) * (2.0 / (hi - lo)) - 1.0)
            }
            (Task::Segmentation, _) => {
                let p = resize(output.to_kind(Kind::Float).softmax(1, Kind::Float))?;
                Tensor::f_einsum("bkhw,kd->bdhw", &[p, self.embeddings.shallow_clone()], None::<&[i64]>)
            }
            _ => Err(tch::TchError::Kind(format!(
                "no concat condition for task {} (depth needs diffusion.depth_min/max)",
                task.as_str()
            ))),
        }
    }

    /// Condition `sum_k p_k E_k` for probabilities `p` `[B,K']` over classes `classes`
    /// (all classes when `None`): `[B, D]` or `[B, T, D]`.
    pub fn condition(&self, p: &Tensor, classes: Option<&Tensor>) -> Tensor {
        let e = match classes {
            Some(idx) => self.embeddings.index_select(0, idx),
            None => self.embeddings.shallow_clone(),
        };
        let dims = e.size();
        let flat = e.view([dims[0], -1]);
        let mut shape = vec![p.size()[0]];
        shape.extend_from_slice(&dims[1..]);
        p.matmul(&flat).view(shape.as_slice())
    }

    /// Denoiser output restricted to the noise prediction (first C channels).
    pub fn predict_noise(&self, z_t: &Tensor, t: &Tensor, cond: &Tensor) -> Result<Tensor, tch::TchError> {
        let out = self.denoiser.forward_ts(&[z_t, t, cond])?;
        Ok(out.narrow(1, 0, self.latent_shape[0]))
    }

    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>, tch::TchError> {
        self.denoiser.named_parameters()
    }

    /// Keeps the class embeddings of the label space's classes only, in the order of a
    /// restricted classifier's logit columns ([`Classifier::restrict`]).
    pub fn restrict(&mut self, space: &LabelSpace) {
        self.embeddings = self.embeddings.index_select(0, &space.kept_index(self.device));
    }
}

/// The bundle digest: the sha256 (hex) of what `sha256sum` prints for every file, one
/// line `<hex>  <path>\n` per file, sorted by path bytewise. That is, in the bundle
/// folder: `find . -type f | sed 's|^\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum`
/// (for paths without blanks, quotes or backslashes, which that pipeline mangles).
/// `files` is keyed by relative path, and a `BTreeMap` iterates in byte order.
pub fn sha256_of_files(files: &BTreeMap<String, Bytes>) -> String {
    let mut listing = Sha256::new();
    for (path, data) in files {
        listing.update(format!("{:x}  {path}\n", Sha256::digest(data)));
    }
    format!("{:x}", listing.finalize())
}

/// `a/./b` -> `a/b`; `None` for paths that leave the bundle (`..`, absolute) or are empty.
fn normalize(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Reads every file below `dir`, following symlinks (the digest covers what a symlink
/// points at, since that is what would be loaded).
fn read_local(dir: &Path, source: &str) -> Result<BTreeMap<String, Bytes>, BundleError> {
    let err = |file: &str, message: String| BundleError::Read {
        bundle: source.to_string(),
        file: file.to_string(),
        message,
    };
    if !dir.is_dir() {
        return Err(err(
            ".",
            "no such folder (a bundle is a folder with bundle.toml)".into(),
        ));
    }
    let mut files = BTreeMap::new();
    let mut pending: Vec<(PathBuf, String, usize)> = vec![(dir.to_owned(), String::new(), 0)];
    while let Some((folder, prefix, depth)) = pending.pop() {
        let shown = if prefix.is_empty() { "." } else { prefix.as_str() };
        if depth > MAX_DEPTH {
            return Err(err(
                shown,
                format!("nested more than {MAX_DEPTH} folders deep (a symlink loop?)"),
            ));
        }
        let entries = std::fs::read_dir(&folder).map_err(|e| err(shown, e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| err(shown, e.to_string()))?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                err(
                    &format!("{prefix}{}", name.to_string_lossy()),
                    "the name is not UTF-8".into(),
                )
            })?;
            let rel = format!("{prefix}{name}");
            let path = entry.path();
            let meta = std::fs::metadata(&path).map_err(|e| err(&rel, e.to_string()))?;
            if meta.is_dir() {
                pending.push((path, format!("{rel}/"), depth + 1));
            } else if meta.is_file() {
                let data = std::fs::read(&path).map_err(|e| err(&rel, e.to_string()))?;
                files.insert(rel, Bytes::from(data));
            }
        }
    }
    Ok(files)
}

/// Downloads every object below the bundle URL; returns the redacted URL and the files.
async fn read_remote(location: &str, options: &StoreOptions) -> Result<(String, BTreeMap<String, Bytes>), BundleError> {
    let root = storage::open(location, options)?;
    let read_err = |file: String, message: String| BundleError::Read {
        bundle: root.display.clone(),
        file,
        message,
    };
    let objects: Vec<_> = storage::retrying("listing the bundle", || {
        root.store.list(Some(&root.prefix)).try_collect()
    })
    .await
    .map_err(|e| read_err("(listing)".into(), e.to_string()))?;
    let mut files = BTreeMap::new();
    for meta in objects {
        let Some(rel) = root.relative(&meta.location).filter(|r| !r.is_empty()) else {
            continue;
        };
        let data = storage::retrying("downloading the bundle", || async {
            root.store.get(&meta.location).await?.bytes().await
        })
        .await
        .map_err(|e| read_err(rel.clone(), e.to_string()))?;
        files.insert(rel, data);
    }
    Ok((root.display.clone(), files))
}

/// The named tensors of a safetensors file held in memory.
fn read_safetensors(data: &[u8]) -> Result<Vec<(String, Tensor)>, tch::TchError> {
    let wrap = |err| tch::TchError::SafeTensorError {
        path: "(in memory)".into(),
        err,
    };
    let file = safetensors::SafeTensors::deserialize(data).map_err(wrap)?;
    file.tensors()
        .into_iter()
        .map(|(name, view)| Ok((name, Tensor::try_from(view)?)))
        .collect()
}

impl Bundle {
    /// The class-embedding table named by `diffusion.class_embeddings`, as float on `device`.
    fn class_embeddings(&self, spec: &DiffusionSpec, device: Device) -> Result<Tensor, BundleError> {
        let tensors = read_safetensors(self.file(&spec.class_embeddings)?).map_err(|source| BundleError::Load {
            bundle: self.source.clone(),
            file: spec.class_embeddings.clone(),
            source,
        })?;
        tensors
            .into_iter()
            .find(|(n, _)| *n == spec.embeddings_tensor)
            .map(|(_, t)| t.to_kind(Kind::Float).to_device(device))
            .ok_or_else(|| BundleError::Shape {
                bundle: self.source.clone(),
                message: format!(
                    "{} holds no tensor named `{}`",
                    spec.class_embeddings, spec.embeddings_tensor
                ),
            })
    }
}

fn validate(spec: &BundleSpec) -> Result<(), String> {
    let c = &spec.classifier;
    let p = &c.preprocess;
    if p.channels != 1 && p.channels != 3 {
        return Err(format!(
            "classifier.preprocess.channels = {}: must be 1 or 3",
            p.channels
        ));
    }
    if p.mean.len() != p.channels || p.std.len() != p.channels {
        return Err(format!(
            "classifier.preprocess: mean has {} and std {} values, but channels = {}",
            p.mean.len(),
            p.std.len(),
            p.channels
        ));
    }
    if p.std.iter().any(|s| *s <= 0.0) {
        return Err("classifier.preprocess.std: every value must be positive".into());
    }
    if p.crop == 0 || p.crop > p.resize {
        return Err(format!(
            "classifier.preprocess: crop = {} must be in 1..=resize ({})",
            p.crop, p.resize
        ));
    }
    if c.num_classes == 0 {
        return Err("classifier.num_classes must be at least 1".into());
    }
    if spec.task == Task::Segmentation && c.num_classes > 255 {
        return Err(format!(
            "task = \"segmentation\" writes 8-bit masks (255 = ignore): classifier.num_classes must be at most 255, not {}",
            c.num_classes
        ));
    }
    if spec.task == Task::Depth && c.num_classes != 1 {
        return Err(format!(
            "task = \"depth\" predicts one value per pixel: classifier.num_classes must be 1, not {}",
            c.num_classes
        ));
    }
    if let Some(d) = &spec.diffusion {
        match (spec.task, d.condition) {
            (Task::Classification, Condition::Concat) => {
                return Err("diffusion.condition = \"concat\" needs a dense task (segmentation or depth)".into())
            }
            (Task::Depth, Condition::Mixture) => {
                return Err("task = \"depth\" has no classes to mix: set diffusion.condition = \"concat\"".into())
            }
            _ => {}
        }
        if spec.task == Task::Depth {
            match (d.depth_min, d.depth_max) {
                (Some(lo), Some(hi)) if lo.is_finite() && hi.is_finite() && lo < hi => {}
                _ => {
                    return Err(
                        "task = \"depth\": diffusion.depth_min and depth_max must be set, with depth_min < depth_max"
                            .into(),
                    )
                }
            }
        } else if d.class_embeddings.is_empty() {
            return Err("diffusion.class_embeddings must name the class embeddings file".into());
        }
        if d.channels != 1 && d.channels != 3 {
            return Err(format!("diffusion.channels = {}: must be 1 or 3", d.channels));
        }
        if d.resolution == 0 || d.schedule.steps == 0 {
            return Err("diffusion.resolution and diffusion.schedule.steps must be at least 1".into());
        }
        if !(0.0 < d.schedule.beta_start && d.schedule.beta_start <= d.schedule.beta_end && d.schedule.beta_end < 1.0) {
            return Err("diffusion.schedule: need 0 < beta_start <= beta_end < 1".into());
        }
    }
    if !spec.class_names.is_empty() && spec.class_names.len() != c.num_classes {
        return Err(format!(
            "class_names has {} names but classifier.num_classes = {}",
            spec.class_names.len(),
            c.num_classes
        ));
    }
    Ok(())
}

/// A loaded TorchScript classifier and its input geometry.
pub struct Classifier {
    module: CModule,
    pub device: Device,
    /// Classes of [`Classifier::logits`]: the module's, or the kept ones after
    /// [`Classifier::restrict`].
    pub num_classes: usize,
    /// The kept logit columns (`model.class_subset` / `model.label_map`), on the device.
    kept: Option<Tensor>,
    /// What the module predicts: logits `[B,K]`, or a map `[B,K,h,w]` (dense tasks).
    pub task: Task,
    /// The module's output shape for one image, as checked at load.
    pub output_shape: Vec<i64>,
    pub view: ClassifierView,
    /// Final-layer parameter names, never adapted.
    pub head: Vec<String>,
    /// Norm-layer affine parameter names.
    pub norm: Vec<String>,
}

impl Classifier {
    /// `[batch, C, crop, crop]`.
    pub fn input_shape(&self, batch: usize) -> [i64; 4] {
        let side = self.view.crop as i64;
        [batch as i64, self.view.channels.count() as i64, side, side]
    }

    fn zeros(&self, batch: usize) -> Tensor {
        Tensor::zeros(self.input_shape(batch), (Kind::Float, self.device))
    }

    /// Logits for a batch already on this classifier's device: `[B, num_classes]`, the
    /// kept columns only once restricted.
    pub fn logits(&self, batch: &Tensor) -> Result<Tensor, tch::TchError> {
        let logits = self.module.forward_ts(&[batch])?;
        match &self.kept {
            Some(kept) => logits.f_index_select(1, kept),
            None => Ok(logits),
        }
    }

    /// Keeps only the label space's classes: from now on [`Classifier::logits`] has one
    /// column per kept class, in ascending model-class order (before any softmax).
    pub fn restrict(&mut self, space: &LabelSpace) {
        self.kept = Some(space.kept_index(self.device));
        self.num_classes = space.len();
    }

    /// Builds a device batch from preprocessed images (each `view.numel()` floats).
    pub fn batch_from(&self, images: &[&[f32]]) -> Tensor {
        let numel = self.view.numel();
        let mut flat = Vec::with_capacity(images.len() * numel);
        for img in images {
            debug_assert_eq!(img.len(), numel);
            flat.extend_from_slice(img);
        }
        Tensor::from_slice(&flat)
            .view(self.input_shape(images.len()))
            .to_device(self.device)
    }

    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>, tch::TchError> {
        self.module.named_parameters()
    }

    /// The module's buffers (BatchNorm running statistics), aliasing the live ones:
    /// writing into them writes the module's.
    pub fn buffers(&self) -> Result<Vec<Tensor>, tch::TchError> {
        module_buffers(&self.module)
    }

    /// Eval mode: BatchNorm uses (and never updates) its running statistics.
    pub fn set_eval(&mut self) {
        self.module.set_eval();
    }

    /// Train mode: BatchNorm uses batch statistics and updates its running ones (TENT).
    pub fn set_train(&mut self) {
        self.module.set_train();
    }

    /// Saves the module (weights and buffers) as TorchScript.
    pub fn save(&self, path: &Path) -> Result<(), tch::TchError> {
        self.module.save(path)
    }

    pub fn parameter_names(&self) -> Result<Vec<String>, tch::TchError> {
        Ok(self.module.named_parameters()?.into_iter().map(|(n, _)| n).collect())
    }

    /// (parameter count, of which in the head) for `inspect`.
    pub fn parameter_counts(&self, head: &[String]) -> Result<(i64, i64), tch::TchError> {
        let mut total = 0;
        let mut in_head = 0;
        for (name, t) in self.module.named_parameters()? {
            total += t.numel() as i64;
            if head.contains(&name) {
                in_head += t.numel() as i64;
            }
        }
        Ok((total, in_head))
    }
}

extern "C" {
    /// src/model/buffers.cpp.
    fn dtta_module_buffers(module: *mut std::ffi::c_void, out: *mut *mut std::ffi::c_void, capacity: i64) -> i64;
}

// tch keeps a CModule as its one field, the `torch::jit::script::Module*`, and gives no
// accessor to it; this checks the layout the pointer read in `module_buffers` relies on.
const _: () = assert!(std::mem::size_of::<CModule>() == std::mem::size_of::<*mut std::ffi::c_void>());

/// Handles to `module`'s buffers, recursively, in the module's order (tch has no
/// accessor for them).
fn module_buffers(module: &CModule) -> Result<Vec<Tensor>, tch::TchError> {
    // SAFETY: CModule is exactly its module pointer (checked above), valid while
    // `module` lives; every handle the shim writes is a new `torch::Tensor*` that the
    // returned Tensor owns and frees.
    unsafe {
        let raw = *(module as *const CModule as *const *mut std::ffi::c_void);
        let count = dtta_module_buffers(raw, std::ptr::null_mut(), 0);
        if count < 0 {
            return Err(tch::TchError::Torch("could not list the module's buffers".into()));
        }
        let mut handles = vec![std::ptr::null_mut(); count as usize];
        let written = dtta_module_buffers(raw, handles.as_mut_ptr(), count);
        if written != count {
            return Err(tch::TchError::Torch("the module's buffers changed while listed".into()));
        }
        Ok(handles.into_iter().map(|h| Tensor::from_ptr(h.cast())).collect())
    }
}
