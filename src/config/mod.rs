//! Typed pipeline configuration: one TOML file plus `--set key=value` overrides.
//!
//! Invariant: every key is known. An unknown or mistyped key is an error that names
//! the key and where it came from (the file, or the command line), never ignored.
//!
//! Each stage owns the types of its own section (`shards::InputConfig`,
//! `tta::TtaConfig`, `image::corrupt::CorruptConfig`, ...); this module assembles them,
//! loads and checks the file, and owns only the job-wide sections (output, model,
//! runtime, limits).

pub mod units;

use crate::image::protocol::ProtocolConfig;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::image::corrupt::CorruptConfig;
use crate::image::LabelConfig;
use crate::model::ClassSubset;
use crate::shards::InputConfig;
use crate::tta::TtaConfig;
pub use units::{ByteSize, HumanDuration};

/// What went wrong while reading or checking a pipeline configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Key {
        origin: String,
        key: String,
        message: String,
    },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
}

/// The whole pipeline: where samples come from, where results go, which model and method.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub input: InputConfig,
    pub output: OutputConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub tta: TtaConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How dense labels are encoded (`depth.png` units).
    #[serde(default)]
    pub label: LabelConfig,
    /// Robustness evaluation: expand every sample into corrupted variants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<CorruptConfig>,
    /// The order an online method meets the variants in (`reset_each_shift`, the
    /// default, is left out of the serialized config, so older digests still match).
    #[serde(default, skip_serializing_if = "ProtocolConfig::is_default")]
    pub protocol: ProtocolConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Object-store URL or local folder; the Delta tables predictions/ and steps/, and
    /// _runs/, go below it.
    pub url: String,
    /// A Delta checkpoint every this many commits per table, so opening a table reads one
    /// checkpoint plus fewer than this many commit files.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: u64,
}

fn default_checkpoint_interval() -> u64 {
    crate::sink::commit::DEFAULT_CHECKPOINT_INTERVAL
}

/// sha256 (hex) of a config as JSON with sorted keys: the digest that commits and the
/// report show for a run's config (credentials stripped before).
pub fn digest(config: &serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(config).expect("JSON values serialize");
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Local folder or object-store URL of a model bundle (a folder with bundle.toml).
    pub bundle: String,
    /// The bundle's expected digest (64 hex digits, see `model::bundle::sha256_of_files`);
    /// a bundle whose digest differs is refused before anything runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The classes every method may predict: `"imagenet-r"`, `"imagenet-a"`, a file of
    /// class indices, or `[i, j, ...]`, in ascending order (else refused); the logits
    /// are restricted before the softmax, and predictions are written as positions in
    /// the list (the benchmark's own 0..n-1, as its sorted wnid folders number them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_subset: Option<ClassSubset>,
    /// Maps predicted model classes onto dataset classes (`"objectnet"` or a file, one
    /// line of model class indices per dataset class); predictions are written as
    /// dataset classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_map: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Bytes of fetched but not yet decoded sample data held in memory, at most.
    #[serde(default = "default_prefetch_bytes")]
    pub prefetch_bytes: ByteSize,
    /// Shards read concurrently.
    #[serde(default = "default_shards_in_flight")]
    pub shards_in_flight: usize,
    /// Object-store requests in flight at once, across the process.
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// Times a shard whose stream breaks is read again before it is marked failed.
    #[serde(default = "default_shard_retries")]
    pub shard_retries: u32,
    /// Images per classifier forward for methods that batch (`source`).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Threads of the decode pool; 0 means one per core.
    #[serde(default)]
    pub decode_threads: usize,
    /// Threads torch may use for compute on CPU; 0 means torch's default.
    #[serde(default)]
    pub torch_threads: usize,
    /// CUDA only: TF32 tensor cores for fp32 matmuls and convolutions (PyTorch's
    /// `allow_tf32`). Set false for bit-faithful fp32 comparisons with the reference.
    #[serde(default = "yes")]
    pub tf32: bool,
    #[serde(default)]
    pub seed: u64,
    /// Workers sharing the job, when the scheduler does not say (Kubernetes Indexed Jobs,
    /// AWS Batch); flags and scheduler variables must agree with it.
    #[serde(default)]
    pub worker_count: Option<usize>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            device: default_device(),
            prefetch_bytes: default_prefetch_bytes(),
            shards_in_flight: default_shards_in_flight(),
            max_requests: default_max_requests(),
            shard_retries: default_shard_retries(),
            batch_size: default_batch_size(),
            decode_threads: 0,
            torch_threads: 0,
            tf32: true,
            seed: 0,
            worker_count: None,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_device() -> String {
    "auto".into()
}
fn default_prefetch_bytes() -> ByteSize {
    ByteSize(512 << 20)
}
fn default_shards_in_flight() -> usize {
    4
}
fn default_max_requests() -> usize {
    64
}
fn default_shard_retries() -> u32 {
    3
}
fn default_batch_size() -> usize {
    64
}

/// Guards against hostile or broken input. Every limit has a safe default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest image (width x height) decoded; larger ones get status `too_large`.
    /// Guards against decompression bombs: the check runs on the header, before decoding.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Largest shard member read into memory; larger ones get status `too_large`.
    #[serde(default = "default_max_member_bytes")]
    pub max_member_bytes: ByteSize,
    /// Timeout of one object-store request.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_pixels: default_max_pixels(),
            max_member_bytes: default_max_member_bytes(),
            request_timeout: default_request_timeout(),
        }
    }
}

fn default_max_pixels() -> u64 {
    89_478_485 // PIL's decompression-bomb threshold
}
fn default_max_member_bytes() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_request_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

impl PipelineConfig {
    /// Reads `path`, applies `--set` overrides in order, and checks every key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, path, overrides)
    }

    /// Parses configuration text; `path` only names the origin in errors.
    pub fn from_toml_str(text: &str, path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            ConfigError::Syntax {
                path: path.to_owned(),
                message: match line {
                    Some(line) => format!("line {line}: {}", e.message()),
                    None => e.message().to_string(),
                },
            }
        })?;
        let mut overridden = Vec::new();
        for arg in overrides {
            overridden.push(apply_override(&mut table, arg)?);
        }
        let origin_of = |key: &str| {
            overridden
                .iter()
                .rev()
                .find(|(k, _)| key == k || key.starts_with(&format!("{k}.")) || k.starts_with(&format!("{key}.")))
                .map(|(_, arg)| format!("--set {arg}"))
                .unwrap_or_else(|| path.display().to_string())
        };
        let config: PipelineConfig = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = unknown_field_key(e.path().to_string(), &e.inner().to_string());
            ConfigError::Key {
                origin: origin_of(&key),
                key,
                message: e.inner().message().to_string(),
            }
        })?;
        config.validate().map_err(|(key, message)| ConfigError::Key {
            origin: origin_of(key),
            key: key.to_string(),
            message,
        })?;
        Ok(config)
    }

    /// Checks values that parse but make no sense; returns the offending key.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = |key, v: usize| {
            if v == 0 {
                Err((key, "must be at least 1".to_string()))
            } else {
                Ok(())
            }
        };
        if self.input.url.trim().is_empty() {
            return Err(("input.url", "must not be empty".into()));
        }
        if self.output.url.trim().is_empty() {
            return Err(("output.url", "must not be empty".into()));
        }
        if self.model.bundle.trim().is_empty() {
            return Err(("model.bundle", "must not be empty".into()));
        }
        if let Some(pin) = &self.model.sha256 {
            if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    "model.sha256",
                    format!("{pin:?} is not a sha256 digest (64 hex digits, as `dtta inspect` prints)"),
                ));
            }
        }
        if self.protocol.one_stream() && self.corrupt.is_none() {
            return Err((
                "protocol.kind",
                format!(
                    "{:?} orders the corrupted variants of each sample: it needs a [corrupt] section",
                    self.protocol.name()
                ),
            ));
        }
        if self.model.class_subset.is_some() && self.model.label_map.is_some() {
            return Err((
                "model.label_map",
                "cannot be combined with model.class_subset: a label map already restricts the logits to the classes it maps".into(),
            ));
        }
        if !(self.label.depth_scale > 0.0 && self.label.depth_scale.is_finite()) {
            return Err((
                "label.depth_scale",
                "must be a positive number of metres per unit".into(),
            ));
        }
        positive("tta.topk", self.tta.topk)?;
        positive("tta.steps", self.tta.steps)?;
        positive("tta.accum", self.tta.accum)?;
        positive("tta.samples_per_step", self.tta.samples_per_step)?;
        positive("tta.max_batch", self.tta.max_batch)?;
        positive(
            "tta.diffusion_classifier.samples",
            self.tta.diffusion_classifier.samples,
        )?;
        if !(self.tta.lr > 0.0 && self.tta.lr.is_finite()) {
            return Err(("tta.lr", format!("{} must be a positive number", self.tta.lr)));
        }
        self.tta.budget.validate(self.tta.budget_step_cost())?;
        let dusa = &self.tta.dusa;
        positive("tta.dusa.topk", dusa.topk)?;
        positive("tta.dusa.steps", dusa.steps)?;
        positive("tta.dusa.accum", dusa.accum)?;
        if !(dusa.lr > 0.0 && dusa.lr.is_finite()) {
            return Err(("tta.dusa.lr", format!("{} must be a positive number", dusa.lr)));
        }
        if self.tta.diffusion_classifier.prune_to > 0
            && self.tta.diffusion_classifier.first_samples >= self.tta.diffusion_classifier.samples
        {
            return Err((
                "tta.diffusion_classifier.first_samples",
                "must be smaller than tta.diffusion_classifier.samples when pruning".into(),
            ));
        }
        if let Some(c) = &self.corrupt {
            if c.kinds.is_empty() {
                return Err(("corrupt.kinds", "must name at least one corruption (or \"all\")".into()));
            }
            c.corruptions().map_err(|e| ("corrupt.kinds", e))?;
            if c.severities.is_empty() || c.severities.iter().any(|s| !(1..=5).contains(s)) {
                return Err((
                    "corrupt.severities",
                    format!("{:?}: must be a non-empty list of 1..=5", c.severities),
                ));
            }
        }
        positive("runtime.batch_size", self.runtime.batch_size)?;
        positive("input.folder.shard_size", self.input.folder.shard_size)?;
        if self.input.parquet.image_column.is_empty() {
            return Err(("input.parquet.image_column", "must not be empty".into()));
        }
        positive("runtime.shards_in_flight", self.runtime.shards_in_flight)?;
        positive("runtime.max_requests", self.runtime.max_requests)?;
        if self.runtime.prefetch_bytes.0 < self.limits.max_member_bytes.0 {
            return Err((
                "runtime.prefetch_bytes",
                format!(
                    "{} is smaller than limits.max_member_bytes ({}): one sample could never fit",
                    self.runtime.prefetch_bytes, self.limits.max_member_bytes
                ),
            ));
        }
        crate::model::device::DeviceSpec::from_str(&self.runtime.device).map_err(|e| ("runtime.device", e))?;
        if self.limits.max_pixels == 0 {
            return Err(("limits.max_pixels", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// serde reports an unknown field at its parent's path; point at the field itself.
fn unknown_field_key(path: String, message: &str) -> String {
    let field = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    match field {
        Some(f) if path == "." || path.is_empty() => f.to_string(),
        Some(f) if !path.ends_with(f) => format!("{path}.{f}"),
        _ => path,
    }
}

/// Applies one `a.b.c=value` override; returns (key, the argument) for error origins.
/// The value is read as a TOML value when it parses as one (`3`, `true`, `"x"`, `[1,2]`),
/// otherwise as a bare string, so `--set output.url=s3://b/x` needs no quoting.
fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(String, String), ConfigError> {
    let err = |message: &str| ConfigError::Override {
        arg: arg.to_string(),
        message: message.to_string(),
    };
    let (key, raw) = arg.split_once('=').ok_or_else(|| err("expected key=value"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err("the key must be dotted names, like runtime.device"));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut node = table;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| err(&format!("`{}` is a value, not a table", parts[..=i].join("."))))?;
    }
    node.insert(parts[parts.len() - 1].to_string(), value);
    Ok((key.to_string(), arg.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[input]
url = "data/shard-{000000..000009}.tar"
[output]
url = "out/"
[model]
bundle = "configs/bundles/demo-mnist"
"#;

    fn load(text: &str, sets: &[&str]) -> Result<PipelineConfig, ConfigError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        PipelineConfig::from_toml_str(text, Path::new("p.toml"), &sets)
    }

    #[test]
    fn defaults_fill_missing_sections() {
        let c = load(BASE, &[]).unwrap();
        assert_eq!(c.runtime.device, "auto");
        assert_eq!(c.runtime.prefetch_bytes, ByteSize(512 << 20));
        assert_eq!(c.tta.method, crate::tta::MethodName::Source);
        assert_eq!(c.input.format, crate::shards::InputFormat::Webdataset);
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let err = load(&format!("{BASE}\n[runtime]\ndevcie = \"cpu\"\n"), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("p.toml"), "{msg}");
        assert!(msg.contains("runtime.devcie"), "{msg}");
    }

    #[test]
    fn overrides_parse_values_and_create_tables() {
        let c = load(
            BASE,
            &[
                "runtime.batch_size=7",
                "output.url=s3://bucket/x/",
                "runtime.prefetch_bytes=1GiB",
            ],
        )
        .unwrap();
        assert_eq!(c.runtime.batch_size, 7);
        assert_eq!(c.output.url, "s3://bucket/x/");
        assert_eq!(c.runtime.prefetch_bytes, ByteSize(1 << 30));
    }

    #[test]
    fn bad_override_names_the_argument() {
        let err = load(BASE, &["runtime.batch_size=0"]).unwrap_err().to_string();
        assert!(err.contains("--set runtime.batch_size=0"), "{err}");
        let err = load(BASE, &["tta.methd=source"]).unwrap_err().to_string();
        assert!(err.contains("tta.methd"), "{err}");
        assert!(err.contains("--set"), "{err}");
        let err = load(BASE, &["novalue"]).unwrap_err().to_string();
        assert!(err.contains("key=value"), "{err}");
    }

    #[test]
    fn wrong_type_and_bad_values_are_errors() {
        let err = load(BASE, &["runtime.batch_size=\"many\""]).unwrap_err().to_string();
        assert!(err.contains("runtime.batch_size"), "{err}");
        let err = load(BASE, &["runtime.device=tpu"]).unwrap_err().to_string();
        assert!(err.contains("runtime.device"), "{err}");
        let err = load(BASE, &["tta.method=magic"]).unwrap_err().to_string();
        assert!(err.contains("tta.method") && err.contains("source"), "{err}");
    }

    #[test]
    fn the_bundle_pin_must_be_a_sha256_digest() {
        let digest = "e25fa978203e0365277dae552430e1b5e85e1352f609484f1990335517b0cc04";
        let c = load(BASE, &[&format!("model.sha256={digest}")]).unwrap();
        assert_eq!(c.model.sha256.as_deref(), Some(digest));
        for bad in [&digest[..63], "sha256:e25fa978", &format!("{}g", &digest[..63])] {
            let err = load(BASE, &[&format!("model.sha256={bad}")]).unwrap_err().to_string();
            assert!(err.contains("model.sha256") && err.contains("64 hex digits"), "{err}");
        }
        assert!(load(BASE, &[]).unwrap().model.sha256.is_none());
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let err = load(&format!("{BASE}\n[runtime\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("p.toml") && err.contains("line 9"), "{err}");
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!("64k".parse::<ByteSize>().unwrap(), ByteSize(64_000));
        assert_eq!("3MiB".parse::<ByteSize>().unwrap(), ByteSize(3 << 20));
        assert!("3XB".parse::<ByteSize>().is_err());
        assert_eq!("250ms".parse::<HumanDuration>().unwrap().0, Duration::from_millis(250));
        assert_eq!("2m".parse::<HumanDuration>().unwrap().0, Duration::from_secs(120));
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
    }
}
