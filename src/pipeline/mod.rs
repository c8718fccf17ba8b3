//! The pipeline: plans this worker's shards, then wires one stage per file with
//! bounded channels:
//!
//! ```text
//! fetch.rs   fetch+parse (tokio, shards_in_flight shards, prefetch_bytes budget)
//!   -> decode.rs   decode (rayon pool, order kept, variants expanded)
//!   -> adapt.rs    adapt (one std thread owning the model and device)
//!   -> write.rs    write (tokio: Parquet per shard, commit markers)
//! ```
//!
//! around one message type (`event.rs`), with progress and memory reporting in
//! `progress.rs`.
//!
//! Invariants: every sample read yields exactly one row; a shard's rows are committed
//! together or not at all; per shard, events arrive in order (Begin, items, End or
//! Failed) at every stage. Channels are bounded, so a slow stage slows the ones before
//! it instead of filling memory. A failure of one shard (its stream, or the method on
//! its samples) fails that shard only; the run goes on and reports it.

mod adapt;
pub mod clean;
mod decode;
mod event;
mod fetch;
mod progress;
#[cfg(test)]
mod tests;
mod write;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use adapt::BatchError;
pub use progress::ProgressMode;

use crate::config::PipelineConfig;
use crate::image::{DecodeLimits, Expansion, Prepared, Views};
use crate::model::device::{self, DeviceSpec};
use crate::model::{Bundle, BundleError, LabelSpace, LabelSpaceError};
use crate::shards::{InputFormat, ReadLimits};
use crate::sink::commit;
use crate::sink::predictions::Layout;
use crate::sink::{SinkError, Tally};
use crate::storage::{self, Location, ShardRef, StorageError, StoreOptions};
use crate::tta::methods::BuildError;
use crate::tta::{Method, MethodName, Outcome};
use crate::worker::Worker;
use decode::{Decoder, PrepareFn};
use event::Event;
use progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Method(#[from] BuildError),
    #[error(transparent)]
    LabelSpace(#[from] LabelSpaceError),
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error("runtime.device: {0}")]
    DeviceSpec(String),
    #[error("tta.eata.fisher_url: {0}")]
    CleanImages(#[from] clean::CleanImagesError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("cannot start the {what}: {source}")]
    Start { what: &'static str, source: std::io::Error },
    #[error("cannot start the decode pool: {0}")]
    DecodePool(#[from] rayon::ThreadPoolBuildError),
    #[error("the adapt thread stopped while loading the model")]
    AdaptThreadLost,
    #[error("the adapt thread panicked: {0}")]
    AdaptThreadPanicked(String),
    #[error("shard {shard}: {samples} sample(s) read but {rows} row(s) reached the writer")]
    RowCount { shard: String, samples: u64, rows: u64 },
    #[error("shard {shard}: {event} arrived before its start")]
    OutOfOrder { shard: String, event: &'static str },
    #[error(
        "{output} has {others} committed shard(s) not made with this run's bundle (sha256 {ours}): {found}; refusing to mix two models in one table (write to a new output, or pass --allow-mixed-bundles)"
    )]
    MixedBundles {
        output: String,
        ours: String,
        others: usize,
        /// The other digests with their shard counts, one phrase.
        found: String,
    },
}

impl PipelineError {
    /// The process exit code: 2 when the run was refused as configured (a bundle that
    /// is not the pinned one, one that would mix two models in an output, a label space
    /// that does not fit the classifier, a method the bundle and config cannot run, or an
    /// output written by an older dtta), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            PipelineError::Bundle(BundleError::PinMismatch { .. })
            | PipelineError::MixedBundles { .. }
            | PipelineError::LabelSpace(_)
            | PipelineError::Method(BuildError::Unsupported { .. })
            | PipelineError::Sink(SinkError::OldLayout { .. }) => 2,
            _ => 1,
        }
    }
}

/// Whether a run may add shards to an output whose committed shards were made with
/// another bundle (`--allow-mixed-bundles`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixedBundles {
    Refuse,
    Allow,
}

/// Store options derived from the config's limits and runtime sections.
pub fn store_options(config: &PipelineConfig) -> StoreOptions {
    StoreOptions {
        request_timeout: config.limits.request_timeout.0,
        max_requests: config.runtime.max_requests,
        ..StoreOptions::default()
    }
}

/// This worker's shards and which of them are already committed.
pub struct Plan {
    pub input: Location,
    pub output: Location,
    /// This worker's share, sorted.
    pub shards: Vec<ShardRef>,
    /// Every shard listed, across all workers.
    pub total_listed: usize,
    pub committed: BTreeSet<String>,
    /// The committed shards' markers (all workers'), from the predictions table.
    pub markers: std::collections::BTreeMap<String, commit::CommitMarker>,
}

impl Plan {
    pub fn todo(&self) -> Vec<ShardRef> {
        self.shards
            .iter()
            .filter(|s| !self.committed.contains(&s.id))
            .cloned()
            .collect()
    }
}

pub async fn plan(config: &PipelineConfig, worker: Worker) -> Result<Plan, PipelineError> {
    let options = store_options(config);
    let (input, mut listed) =
        storage::list_shards(&config.input.url, config.input.format.shard_extension(), &options).await?;
    if config.input.format == InputFormat::Folder {
        listed = crate::shards::folder::group(listed, &config.input.folder);
        if listed.is_empty() {
            return Err(StorageError::NoMatch {
                url: format!(
                    "{} (no jpg/jpeg/png/webp objects)",
                    storage::redact_url(&config.input.url)
                ),
            }
            .into());
        }
    }
    let total_listed = listed.len();
    let output = storage::open(&config.output.url, &options)?;
    let markers = commit::read_markers(&output).await?;
    Ok(Plan {
        input,
        output,
        shards: worker.share(listed),
        total_listed,
        committed: markers.keys().cloned().collect(),
        markers,
    })
}

/// What a finished run reports, also written to `_runs/<run_id>.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub dtta_version: &'static str,
    pub started_at: String,
    pub finished_at: String,
    pub elapsed_s: f64,
    pub worker: Worker,
    pub device: String,
    pub method: String,
    pub bundle: String,
    /// The bundle's digest, also on every row and commit marker (README, "Provenance").
    pub bundle_sha256: String,
    pub input: String,
    pub output: String,
    pub shards_listed: usize,
    pub shards_assigned: usize,
    pub shards_skipped: usize,
    pub shards_committed: Vec<String>,
    /// Shards another run committed while this one processed them; output discarded.
    pub shards_lost_race: Vec<String>,
    pub shards_failed: Vec<FailedShard>,
    pub tally: Tally,
    pub images_per_s: f64,
    /// Milliseconds in the method per predicted image (`tally.adapt_ms` / predicted).
    pub ms_per_image: f64,
    /// Denoiser forward passes per predicted image (`tally.denoiser_evals` / predicted).
    pub denoiser_evals_per_image: f64,
    /// Seconds the adapt stage spent computing (the rest of its time it waited for input).
    pub adapt_busy_s: f64,
    /// Peak resident memory of the process so far (getrusage), in MiB.
    pub peak_rss_mib: f64,
    pub config: PipelineConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailedShard {
    pub shard: String,
    pub error: String,
}

/// The config with credentials stripped from its URLs, for the run summary.
fn redacted(config: &PipelineConfig) -> PipelineConfig {
    let mut c = config.clone();
    c.input.url = storage::redact_url(&c.input.url);
    c.output.url = storage::redact_url(&c.output.url);
    c.model.bundle = storage::redact_url(&c.model.bundle);
    c
}

/// Runs the pipeline for this worker's uncommitted shards. Refuses (before any shard is
/// read) a bundle that is not the pinned one, and, unless `mixing` allows it, an output
/// whose committed shards were made with another bundle.
pub async fn run(
    config: PipelineConfig,
    worker: Worker,
    progress: ProgressMode,
    mixing: MixedBundles,
) -> Result<RunReport, PipelineError> {
    let started = Instant::now();
    let mut plan = plan(&config, worker).await?;
    let pin = config.model.sha256.as_deref();
    let bundle = Bundle::open_pinned(&config.model.bundle, &store_options(&config), pin).await?;
    match pin {
        Some(_) => tracing::info!(
            "bundle {}: sha256 {} (matches model.sha256)",
            bundle.source,
            bundle.sha256
        ),
        None => tracing::info!(
            "bundle {}: sha256 {}; pin it (model.sha256 = \"{}\") to refuse any other bundle",
            bundle.source,
            bundle.sha256,
            bundle.sha256
        ),
    }
    let space = LabelSpace::resolve(
        config.model.class_subset.as_ref(),
        config.model.label_map.as_deref(),
        bundle.spec.classifier.num_classes,
        bundle.spec.task,
    )?;
    if let Some(space) = &space {
        tracing::info!("label space {}", space.description);
    }
    let layout = Layout {
        task: bundle.spec.task,
        classes: bundle.spec.classifier.num_classes,
        depth_scale: config.label.depth_scale,
    };
    let tables = Arc::new(commit::Tables::new(&plan.output, config.output.checkpoint_interval));
    // A run killed between a shard's steps and predictions commits: finish the pair
    // before deciding what is left to do.
    if !commit::complete_pairs(&tables, &layout).await?.is_empty() {
        plan.markers = commit::read_markers(&plan.output).await?;
        plan.committed = plan.markers.keys().cloned().collect();
    }
    if !plan.todo().is_empty() {
        check_one_bundle(&plan, &bundle.sha256, mixing)?;
    }
    let device_spec: DeviceSpec = config.runtime.device.parse().map_err(PipelineError::DeviceSpec)?;
    let device = device::resolve(device_spec)?;
    if config.runtime.torch_threads > 0 {
        tch::set_num_threads(config.runtime.torch_threads as i32);
    }
    crate::tta::autocast::configure_cuda_math(device, config.runtime.tf32);
    let views = Views {
        classifier: bundle.classifier_view(),
        diffusion: if config.tta.method.needs_diffusion() {
            bundle.diffusion_view()
        } else {
            None
        },
        task: bundle.spec.task,
        labels: config.label.clone(),
    };
    let clean_images = match (&config.tta.eata.fisher_url, config.tta.method) {
        (Some(url), MethodName::Eata) if config.tta.eata.fisher_alpha != 0.0 && !plan.todo().is_empty() => {
            let limits = (
                ReadLimits {
                    max_member_bytes: config.limits.max_member_bytes.0,
                },
                DecodeLimits {
                    max_pixels: config.limits.max_pixels,
                },
            );
            let store = store_options(&config);
            let n = config.tta.eata.fisher_samples;
            clean::read(url, n, &config.input, &views, limits, &store).await?
        }
        _ => Vec::new(),
    };
    let stages = Stages {
        bundle: bundle.source.clone(),
        bundle_sha256: bundle.sha256.clone(),
        device: device::describe(device),
        views,
        layout,
        tables,
        prepare: crate::image::prepare,
        method: {
            let (tta, seed, batch_size) = (config.tta.clone(), config.runtime.seed, config.runtime.batch_size);
            Box::new(move || {
                Ok(crate::tta::methods::build(
                    &bundle,
                    space.as_ref(),
                    device,
                    &tta,
                    (seed, batch_size),
                    &clean_images,
                )?)
            })
        },
    };
    execute(config, worker, plan, stages, progress, started).await
}

/// Refuses (or, allowed, warns about) committed shards of the output that were made with
/// a bundle other than `ours`: one table should not mix two models silently. A commit
/// record without a digest counts as another bundle, since nobody can tell. Reads the
/// plan's commit records (every worker's committed shards, from the predictions table).
fn check_one_bundle(plan: &Plan, ours: &str, mixing: MixedBundles) -> Result<(), PipelineError> {
    let mut others: std::collections::BTreeMap<Option<&str>, usize> = std::collections::BTreeMap::new();
    for digest in plan
        .markers
        .values()
        .map(|m| m.bundle_sha256.as_deref())
        .filter(|d| *d != Some(ours))
    {
        *others.entry(digest).or_default() += 1;
    }
    if others.is_empty() {
        return Ok(());
    }
    let found = others
        .iter()
        .map(|(digest, n)| match digest {
            None => format!("{n} with no recorded digest (a commit record not written by dtta)"),
            Some(d) => format!("{n} with sha256 {d}"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let error = PipelineError::MixedBundles {
        output: plan.output.display.clone(),
        ours: ours.to_string(),
        others: others.values().sum(),
        found,
    };
    match mixing {
        MixedBundles::Refuse => Err(error),
        MixedBundles::Allow => {
            tracing::warn!("--allow-mixed-bundles: {error}");
            Ok(())
        }
    }
}

/// Builds the method on the adapt thread (tch modules stay on the thread that owns the
/// device).
type MethodFactory = Box<dyn FnOnce() -> Result<Box<dyn Method>, PipelineError> + Send>;

/// What the stages run with, apart from the configuration: in-process tests give a
/// method and a decoder of their own.
struct Stages {
    /// The bundle's (redacted) location, for the report.
    bundle: String,
    /// The bundle's digest, for the report, the rows and the commit markers.
    bundle_sha256: String,
    device: String,
    views: Views,
    /// The predictions table's columns.
    layout: Layout,
    /// The output's Delta tables, which the write stage commits to.
    tables: Arc<commit::Tables>,
    prepare: PrepareFn,
    method: MethodFactory,
}

/// The `method` column and summary label: [`TtaConfig::method_column`](crate::tta::TtaConfig::method_column),
/// with `-continual`, `-gradual` or `-mixed` under a stream protocol, so a table over
/// several outputs shows each protocol as its own column.
pub fn method_label(config: &PipelineConfig) -> String {
    let method = config.tta.method_column();
    match config.protocol.one_stream() {
        true => format!("{method}-{}", config.protocol.name()),
        false => method.to_string(),
    }
}

/// Runs the stages over the plan's uncommitted shards and writes the run summary.
async fn execute(
    config: PipelineConfig,
    worker: Worker,
    plan: Plan,
    stages: Stages,
    progress: ProgressMode,
    started: Instant,
) -> Result<RunReport, PipelineError> {
    let started_at = chrono::Utc::now();
    let run_id = format!("{}-{:04x}", started_at.format("%Y%m%dT%H%M%SZ"), rand::random::<u16>());
    let todo = plan.todo();
    tracing::info!(
        run_id,
        "{} shard(s) listed, {} for worker {}/{}, {} already committed, {} to do",
        plan.total_listed,
        plan.shards.len(),
        worker.index,
        worker.count,
        plan.shards.len() - todo.len(),
        todo.len()
    );
    let method_name = method_label(&config);
    let mut report = RunReport {
        run_id: run_id.clone(),
        dtta_version: env!("CARGO_PKG_VERSION"),
        started_at: started_at.to_rfc3339(),
        finished_at: String::new(),
        elapsed_s: 0.0,
        worker,
        device: stages.device,
        method: method_name.clone(),
        bundle: stages.bundle,
        bundle_sha256: stages.bundle_sha256.clone(),
        input: storage::redact_url(&config.input.url),
        output: plan.output.display.clone(),
        shards_listed: plan.total_listed,
        shards_assigned: plan.shards.len(),
        shards_skipped: plan.shards.len() - todo.len(),
        shards_committed: Vec::new(),
        shards_lost_race: Vec::new(),
        shards_failed: Vec::new(),
        tally: Tally::default(),
        images_per_s: 0.0,
        ms_per_image: 0.0,
        denoiser_evals_per_image: 0.0,
        adapt_busy_s: 0.0,
        peak_rss_mib: 0.0,
        config: redacted(&config),
    };
    // Best effort: files a run killed between its commit and its clean-up left behind.
    let committed_here: BTreeSet<String> = plan
        .shards
        .iter()
        .filter(|s| plan.committed.contains(&s.id))
        .map(|s| s.id.clone())
        .collect();
    if !committed_here.is_empty() {
        match commit::sweep_orphans(&plan.output, &committed_here, &plan.markers).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} uncommitted file(s) of earlier runs of committed shards"),
            Err(e) => tracing::warn!("could not look for files of earlier runs: {e}"),
        }
    }
    if todo.is_empty() {
        tracing::info!("nothing to do: every shard of this worker is committed");
        report.finished_at = chrono::Utc::now().to_rfc3339();
        return Ok(report);
    }

    // The adapt thread loads the model itself. It reports readiness before any I/O
    // starts.
    let batch_size = config.runtime.batch_size;
    let (samples_tx, samples_rx) = mpsc::channel::<Event<fetch::Budgeted>>(256);
    let (prepared_tx, prepared_rx) = mpsc::channel::<Event<Prepared>>(batch_size * 2);
    let (outcomes_tx, outcomes_rx) = mpsc::channel::<Event<Outcome>>(batch_size * 2);
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), PipelineError>>();
    let adapt_busy = Arc::new(AtomicU64::new(0));
    let adapt_thread = {
        let busy = adapt_busy.clone();
        let make_method = stages.method;
        let retries = config.runtime.shard_retries;
        let one_stream = config.protocol.one_stream();
        std::thread::Builder::new()
            .name("dtta-adapt".into())
            .spawn(move || {
                let method = match make_method() {
                    Ok(method) => method,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                adapt::run(prepared_rx, outcomes_tx, method, &busy, (retries, one_stream))
            })
            .map_err(|source| PipelineError::Start {
                what: "adapt thread",
                source,
            })?
    };
    ready_rx.await.map_err(|_| PipelineError::AdaptThreadLost)??;

    let fetch = tokio::spawn(fetch::run(
        todo.clone(),
        plan.input.clone(),
        fetch::FetchSettings {
            input: config.input.clone(),
            limits: ReadLimits {
                max_member_bytes: config.limits.max_member_bytes.0,
            },
            prefetch_bytes: config.runtime.prefetch_bytes.0,
            // The stream protocols' order is the plan's: one shard at a time.
            shards_in_flight: if config.protocol.one_stream() {
                1
            } else {
                config.runtime.shards_in_flight
            },
            shard_retries: config.runtime.shard_retries,
        },
        samples_tx,
    ));
    let decode_threads = match config.runtime.decode_threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        n => n,
    };
    let expansion = match &config.corrupt {
        Some(c) => Expansion {
            variants: c.variants(),
            seed: config.runtime.seed,
        },
        None => Expansion::none(),
    };
    let decode = tokio::spawn(decode::run(
        samples_rx,
        prepared_tx,
        Arc::new(decode::pool(decode_threads)?),
        Decoder {
            views: stages.views,
            limits: DecodeLimits {
                max_pixels: config.limits.max_pixels,
            },
            require_label: config.input.require_label,
            expansion,
            prepare: stages.prepare,
            stream: decode::StreamOrder {
                protocol: config.protocol.clone(),
                seed: config.runtime.seed,
            },
        },
        decode_threads * 4,
        batch_size,
    ));

    let mut progress = Progress::new(progress, todo.len());
    let writer = write::WriteStage {
        by_variant: config.corrupt.is_some(),
        output: plan.output.clone(),
        run_id: run_id.clone(),
        method: method_name,
        bundle_sha256: stages.bundle_sha256,
        layout: stages.layout,
        tables: stages.tables,
        config_sha256: crate::config::digest(&serde_json::to_value(redacted(&config)).expect("configs serialize")),
        worker,
        sources: todo
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    plan.input
                        .display_child(&plan.input.relative(&s.path).unwrap_or_default()),
                )
            })
            .collect::<HashMap<_, _>>(),
    };
    let write_result = writer.run(outcomes_rx, &mut report, &mut progress).await;
    progress.finish();

    // Upstream stages end once the writer stops reading; surface the first real error.
    let adapt_result = tokio::task::spawn_blocking(move || adapt_thread.join())
        .await
        .map_err(|e| PipelineError::AdaptThreadPanicked(e.to_string()))?;
    let _ = fetch.await;
    let _ = decode.await;
    adapt_result
        .map_err(|panic| PipelineError::AdaptThreadPanicked(crate::sample::panic_message(panic.as_ref()).into()))?;
    write_result?;

    report.elapsed_s = started.elapsed().as_secs_f64();
    report.finished_at = chrono::Utc::now().to_rfc3339();
    report.images_per_s = report.tally.rows as f64 / report.elapsed_s.max(1e-9);
    report.ms_per_image = report.tally.ms_per_image();
    report.denoiser_evals_per_image = report.tally.denoiser_evals_per_image();
    report.adapt_busy_s = adapt_busy.load(Ordering::Relaxed) as f64 / 1e6;
    report.peak_rss_mib = progress::peak_rss_mib();
    commit::write_run_summary(&plan.output, &run_id, &report).await?;
    Ok(report)
}
