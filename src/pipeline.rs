//! Wires the stages with bounded channels:
//!
//! ```text
//! fetch+parse (tokio, shards_in_flight shards, prefetch_bytes budget)
//!   -> decode (rayon pool, order kept)
//!   -> adapt (one std thread owning the model and device)
//!   -> sink (tokio: Parquet per shard, commit markers)
//! ```
//!
//! Invariants: every sample read yields exactly one row; a shard's rows are committed
//! together or not at all; per shard, events arrive in order (Begin, items, End or
//! Failed) at every stage. Channels are bounded, so a slow stage slows the ones before
//! it instead of filling memory.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use object_store::ObjectStoreExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::PipelineConfig;
use crate::image::{prepare, DecodeLimits, Expansion, Prepared, Views};
use crate::model::device::{self, DeviceSpec};
use crate::model::{Bundle, BundleError};
use crate::sample::{Defect, Sample, Status};
use crate::shards::{self, ReadLimits, SampleReceiver, ShardInput};
use crate::sink::commit::{self, CommitMarker, CommitResult};
use crate::sink::{ShardWriter, SinkError, Tally};
use crate::storage::{self, Location, ShardRef, StorageError, StoreOptions};
use crate::tta::methods::BuildError;
use crate::tta::{Method, Outcome};
use crate::worker::Worker;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Method(#[from] BuildError),
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("model failed: {0}")]
    Model(#[from] tch::TchError),
    #[error("{0}")]
    Internal(String),
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
    if config.input.format == crate::shards::InputFormat::Folder {
        listed = shards::folder::group(listed, &config.input.folder);
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
    let committed = commit::committed_ids(&output).await?.into_iter().collect();
    Ok(Plan {
        input,
        output,
        shards: worker.share(listed),
        total_listed,
        committed,
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
    pub method: &'static str,
    pub bundle: String,
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

/// How progress is shown: a bar on a terminal, log lines otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Bar,
    Log,
}

/// Runs the pipeline for this worker's uncommitted shards.
pub async fn run(config: PipelineConfig, worker: Worker, progress: ProgressMode) -> Result<RunReport, PipelineError> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let run_id = format!("{}-{:04x}", started_at.format("%Y%m%dT%H%M%SZ"), rand::random::<u16>());
    let plan = plan(&config, worker).await?;
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

    let bundle = Bundle::open(&config.model.bundle, &store_options(&config)).await?;
    let device_spec: DeviceSpec = config.runtime.device.parse().map_err(PipelineError::Internal)?;
    let device = device::resolve(device_spec)?;
    if config.runtime.torch_threads > 0 {
        tch::set_num_threads(config.runtime.torch_threads as i32);
    }
    crate::tta::autocast::configure_cuda_math(device, config.runtime.tf32);
    let method_name = config.tta.method_column();

    let mut report = RunReport {
        run_id: run_id.clone(),
        dtta_version: env!("CARGO_PKG_VERSION"),
        started_at: started_at.to_rfc3339(),
        finished_at: String::new(),
        elapsed_s: 0.0,
        worker,
        device: device::describe(device),
        method: method_name,
        bundle: bundle.source.clone(),
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
        adapt_busy_s: 0.0,
        peak_rss_mib: 0.0,
        config: redacted(&config),
    };
    if todo.is_empty() {
        tracing::info!("nothing to do: every shard of this worker is committed");
        report.finished_at = chrono::Utc::now().to_rfc3339();
        return Ok(report);
    }

    // The adapt thread loads the model itself: tch modules stay on the thread that owns
    // the device. It reports readiness before any I/O starts.
    let views = Views {
        classifier: bundle.classifier_view(),
        diffusion: if config.tta.method.needs_diffusion() {
            bundle.diffusion_view()
        } else {
            None
        },
    };
    let batch_size = config.runtime.batch_size;
    let (samples_tx, samples_rx) = mpsc::channel::<Event<Budgeted>>(256);
    let (prepared_tx, prepared_rx) = mpsc::channel::<Event<Prepared>>(batch_size * 2);
    let (outcomes_tx, outcomes_rx) = mpsc::channel::<Event<Outcome>>(batch_size * 2);
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), PipelineError>>();
    let adapt_busy = Arc::new(AtomicU64::new(0));
    let adapt_thread = {
        let tta = config.tta.clone();
        let seed = config.runtime.seed;
        let busy = adapt_busy.clone();
        std::thread::Builder::new()
            .name("dtta-adapt".into())
            .spawn(move || -> Result<(), PipelineError> {
                let method = match crate::tta::methods::build(&bundle, device, &tta, seed, batch_size) {
                    Ok(method) => method,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(()));
                adapt_stage(prepared_rx, outcomes_tx, method, &busy)
            })
            .map_err(|e| PipelineError::Internal(format!("cannot start the adapt thread: {e}")))?
    };
    ready_rx
        .await
        .map_err(|_| PipelineError::Internal("the adapt thread stopped while loading the model".into()))??;

    let fetch = tokio::spawn(fetch_stage(
        todo.clone(),
        plan.input.clone(),
        config.clone(),
        samples_tx,
    ));
    let decode_threads = match config.runtime.decode_threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        n => n,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(decode_threads)
        .thread_name(|i| format!("dtta-decode-{i}"))
        .build()
        .map_err(|e| PipelineError::Internal(format!("cannot start the decode pool: {e}")))?;
    let expansion = match &config.corrupt {
        Some(c) => Expansion {
            variants: c.variants(),
            seed: config.runtime.seed,
        },
        None => Expansion::none(),
    };
    let decode = tokio::spawn(decode_stage(
        samples_rx,
        prepared_tx,
        Arc::new(pool),
        views,
        DecodeLimits {
            max_pixels: config.limits.max_pixels,
        },
        config.input.require_label,
        expansion,
        decode_threads * 4,
        batch_size,
    ));

    let mut progress = Progress::new(progress, todo.len());
    let sink = SinkStage {
        by_variant: config.corrupt.is_some(),
        output: plan.output.clone(),
        run_id: run_id.clone(),
        method: method_name,
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
            .collect(),
    };
    let sink_result = sink.run(outcomes_rx, &mut report, &mut progress).await;
    progress.finish();

    // Upstream stages end once the sink stops reading; surface the first real error.
    let adapt_result = tokio::task::spawn_blocking(move || adapt_thread.join())
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))?
        .map_err(|_| PipelineError::Internal("the adapt thread panicked".into()))?;
    let _ = fetch.await;
    let _ = decode.await;
    adapt_result?;
    sink_result?;

    report.elapsed_s = started.elapsed().as_secs_f64();
    report.finished_at = chrono::Utc::now().to_rfc3339();
    report.images_per_s = report.tally.rows as f64 / report.elapsed_s.max(1e-9);
    report.adapt_busy_s = adapt_busy.load(Ordering::Relaxed) as f64 / 1e6;
    report.peak_rss_mib = peak_rss_mib();
    commit::write_run_summary(&plan.output, &run_id, &report).await?;
    Ok(report)
}

/// The process's peak resident set size in MiB (Linux reports `ru_maxrss` in KiB).
fn peak_rss_mib() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
    if !ok {
        return 0.0;
    }
    // SAFETY: initialised by the successful call above.
    unsafe { usage.assume_init() }.ru_maxrss as f64 / 1024.0
}

/// Messages between stages. Control events keep their order relative to items of the
/// same shard.
enum Event<T> {
    Item { shard: Arc<str>, item: T },
    Control(Control),
}

enum Control {
    Begin(Arc<str>),
    /// The shard was read to its end; `samples` items were handed on in total.
    End {
        shard: Arc<str>,
        samples: u64,
    },
    /// The shard could not be read after retries; its rows must not be committed.
    Failed {
        shard: Arc<str>,
        error: String,
    },
}

/// A sample and its share of the prefetch byte budget, released once decoded.
struct Budgeted {
    sample: Sample,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Budget units are KiB so that a u32 permit count covers any sample size.
const BUDGET_UNIT: u64 = 1024;

/// Feeds one shard's samples into the pipeline channel, charging the byte budget.
struct ChannelSink<'a> {
    shard: Arc<str>,
    tx: &'a mpsc::Sender<Event<Budgeted>>,
    budget: &'a Arc<Semaphore>,
    handed_on: u64,
    closed: bool,
}

impl SampleReceiver for ChannelSink<'_> {
    async fn accept(&mut self, sample: Sample) -> bool {
        let bytes = sample.image.as_ref().map_or(0, |b| b.len() as u64);
        let units = bytes.div_ceil(BUDGET_UNIT).max(1) as u32;
        let permit = self.budget.clone().acquire_many_owned(units).await.ok();
        let event = Event::Item {
            shard: self.shard.clone(),
            item: Budgeted {
                sample,
                _permit: permit,
            },
        };
        if self.tx.send(event).await.is_err() {
            self.closed = true;
            return false;
        }
        self.handed_on += 1;
        true
    }
}

async fn fetch_stage(
    shards: Vec<ShardRef>,
    input: Location,
    config: PipelineConfig,
    tx: mpsc::Sender<Event<Budgeted>>,
) {
    let units = (config.runtime.prefetch_bytes.0 / BUDGET_UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
    let budget = Arc::new(Semaphore::new(units as usize));
    let limits = ReadLimits {
        max_member_bytes: config.limits.max_member_bytes.0,
    };
    let retries = config.runtime.shard_retries;
    futures::stream::iter(shards)
        .for_each_concurrent(config.runtime.shards_in_flight, |shard| {
            let (tx, budget, input, config) = (&tx, &budget, &input, &config);
            async move {
                let id: Arc<str> = shard.id.as_str().into();
                if tx.send(Event::Control(Control::Begin(id.clone()))).await.is_err() {
                    return;
                }
                let mut sink = ChannelSink {
                    shard: id.clone(),
                    tx,
                    budget,
                    handed_on: 0,
                    closed: false,
                };
                let mut attempt = 0;
                let end = loop {
                    let source = ShardInput {
                        store: input.store.clone(),
                        path: shard.path.clone(),
                        size: shard.size,
                        members: shard.members.clone(),
                        skip: sink.handed_on,
                    };
                    match shards::read_shard(&config.input, &source, limits, &mut sink).await {
                        Ok(_) if sink.closed => return,
                        Ok(samples) => break Control::End { shard: id.clone(), samples },
                        Err(e) if attempt < retries && e.is_transient() => {
                            attempt += 1;
                            let wait = Duration::from_millis(200 * 2u64.pow(attempt.min(6)));
                            tracing::warn!(shard = %id, "read failed ({e}); retry {attempt}/{retries} in {wait:?}, resuming after {} sample(s)", sink.handed_on);
                            tokio::time::sleep(wait).await;
                        }
                        Err(e) => {
                            tracing::error!(shard = %id, "giving up after {} attempt(s): {e}", attempt + 1);
                            break Control::Failed {
                                shard: id.clone(),
                                error: format!("{e} (after {} attempt(s))", attempt + 1),
                            };
                        }
                    }
                };
                let _ = tx.send(Event::Control(end)).await;
            }
        })
        .await;
}

/// Decodes on the pool, in input order, and expands every sample into its variants.
///
/// Variants leave in runs: `group` consecutive samples of a shard are held (decoded
/// views only, at most `group` x variants items), then emitted variant by variant, so
/// a batch of the adapt stage holds one variant and stateful methods (TENT, online
/// Diffusion-TTA) see one stream per variant. Without corruption, one variant: no
/// holding. End counts become rows (samples x variants), which the sink checks.
#[allow(clippy::too_many_arguments)]
async fn decode_stage(
    rx: mpsc::Receiver<Event<Budgeted>>,
    tx: mpsc::Sender<Event<Prepared>>,
    pool: Arc<rayon::ThreadPool>,
    views: Views,
    limits: DecodeLimits,
    require_label: bool,
    expansion: Expansion,
    depth: usize,
    group: usize,
) {
    let views = Arc::new(views);
    let expansion = Arc::new(expansion);
    let per_sample = expansion.variants.len() as u64;
    let mut ordered = tokio_stream_of(rx)
        .map(|event| -> BoxFuture<'static, Event<Vec<Prepared>>> {
            match event {
                Event::Control(c) => futures::future::ready(Event::Control(c)).boxed(),
                Event::Item { shard, item } => {
                    let (done_tx, done_rx) = oneshot::channel();
                    let views = views.clone();
                    let expansion = expansion.clone();
                    let variants = expansion.variants.clone();
                    let key = item.sample.key.clone();
                    let label = item.sample.label;
                    pool.spawn(move || {
                        let prepared = prepare(item.sample, &views, limits, require_label, &expansion);
                        drop(item._permit);
                        let _ = done_tx.send(prepared);
                    });
                    async move {
                        // A decoder panic loses the pixels, not the rows.
                        let items = done_rx.await.unwrap_or_else(|_| {
                            variants
                                .into_iter()
                                .map(|variant| Prepared {
                                    key: key.clone(),
                                    label,
                                    variant,
                                    pixels: None,
                                    gen_pixels: None,
                                    defect: Some(Defect::new(Status::DecodeError, "the image decoder panicked")),
                                })
                                .collect()
                        });
                        Event::Item { shard, item: items }
                    }
                    .boxed()
                }
            }
        })
        .buffered(depth);
    // Per shard: shards in flight interleave their samples.
    let mut held: HashMap<Arc<str>, Vec<Vec<Prepared>>> = HashMap::new();
    while let Some(event) = ordered.next().await {
        match event {
            Event::Item { shard, item } => {
                let group_full = {
                    let samples = held.entry(shard.clone()).or_default();
                    samples.push(item);
                    samples.len() >= group.max(1)
                };
                if group_full && !emit_by_variant(&shard, held.remove(&shard), &tx).await {
                    return;
                }
            }
            Event::Control(c) => {
                let c = match c {
                    Control::End { shard, samples } => Control::End {
                        samples: samples * per_sample,
                        shard,
                    },
                    c => c,
                };
                match &c {
                    Control::End { shard, .. } => {
                        if !emit_by_variant(shard, held.remove(shard), &tx).await {
                            return;
                        }
                    }
                    // Its rows will not be committed: no need to adapt them.
                    Control::Failed { shard, .. } => drop(held.remove(shard)),
                    Control::Begin(_) => {}
                }
                if tx.send(Event::Control(c)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends a shard's held samples variant by variant; false when the receiver is gone.
async fn emit_by_variant(
    shard: &Arc<str>,
    held: Option<Vec<Vec<Prepared>>>,
    tx: &mpsc::Sender<Event<Prepared>>,
) -> bool {
    let mut columns: Vec<Vec<Prepared>> = Vec::new();
    for items in held.unwrap_or_default() {
        for (v, item) in items.into_iter().enumerate() {
            if columns.len() <= v {
                columns.push(Vec::new());
            }
            columns[v].push(item);
        }
    }
    for item in columns.into_iter().flatten() {
        let event = Event::Item {
            shard: shard.clone(),
            item,
        };
        if tx.send(event).await.is_err() {
            return false;
        }
    }
    true
}

fn tokio_stream_of<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Runs the method over batches of consecutive items. A batch never spans a control
/// event, so End always follows the outcomes of its shard.
fn adapt_stage(
    mut rx: mpsc::Receiver<Event<Prepared>>,
    tx: mpsc::Sender<Event<Outcome>>,
    mut method: Box<dyn Method>,
    busy_us: &AtomicU64,
) -> Result<(), PipelineError> {
    let max_batch = method.batch_size().max(1);
    let mut held: Option<Event<Prepared>> = None;
    loop {
        let Some(event) = held.take().or_else(|| rx.blocking_recv()) else {
            return Ok(());
        };
        let (shard, item) = match event {
            Event::Control(c) => {
                if tx.blocking_send(Event::Control(c)).is_err() {
                    return Ok(());
                }
                continue;
            }
            Event::Item { shard, item } => (shard, item),
        };
        let mut shards = vec![shard];
        let variant = item.variant;
        let mut batch = vec![item];
        // A batch is full unless a shard boundary, another variant or the end of input
        // cuts it: TENT's batch statistics need the whole batch. It holds one variant, as
        // stateful methods keep one state per variant.
        while batch.len() < max_batch {
            match rx.blocking_recv() {
                Some(Event::Item { shard, item }) if item.variant == variant => {
                    shards.push(shard);
                    batch.push(item);
                }
                Some(other) => {
                    held = Some(other);
                    break;
                }
                None => break,
            }
        }
        let t = Instant::now();
        let outcomes = method.run(batch)?;
        busy_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        for (shard, mut item) in shards.into_iter().zip(outcomes) {
            item.variant = variant;
            if tx.blocking_send(Event::Item { shard, item }).is_err() {
                return Ok(());
            }
        }
    }
}

/// Writes rows per shard and commits each shard when its End arrives.
struct SinkStage {
    /// Tally per variant too (`[corrupt]` is set).
    by_variant: bool,
    output: Location,
    run_id: String,
    method: &'static str,
    worker: Worker,
    /// Shard id -> where it was read from, for the commit marker.
    sources: HashMap<String, String>,
}

impl SinkStage {
    async fn run(
        &self,
        mut rx: mpsc::Receiver<Event<Outcome>>,
        report: &mut RunReport,
        progress: &mut Progress,
    ) -> Result<(), PipelineError> {
        let mut writers: HashMap<Arc<str>, ShardWriter> = HashMap::new();
        let result = async {
            while let Some(event) = rx.recv().await {
                match event {
                    Event::Control(Control::Begin(shard)) => {
                        let writer =
                            ShardWriter::create(&self.output, &self.run_id, &shard, self.method, self.by_variant)?;
                        writers.insert(shard, writer);
                    }
                    Event::Item { shard, item } => {
                        progress.row(&item);
                        let writer = writers.get_mut(&shard).ok_or_else(|| {
                            PipelineError::Internal(format!("row for shard {shard} before its start"))
                        })?;
                        writer.push(item).await?;
                    }
                    Event::Control(Control::End { shard, samples }) => {
                        let writer = writers
                            .remove(&shard)
                            .ok_or_else(|| PipelineError::Internal(format!("end of unknown shard {shard}")))?;
                        let rows = writer.tally.rows;
                        if rows != samples {
                            writer.abort().await;
                            return Err(PipelineError::Internal(format!(
                                "shard {shard}: {samples} sample(s) read but {rows} row(s) reached the sink"
                            )));
                        }
                        self.commit(writer, report).await?;
                        progress.shard_done();
                    }
                    Event::Control(Control::Failed { shard, error }) => {
                        if let Some(writer) = writers.remove(&shard) {
                            writer.abort().await;
                        }
                        report.shards_failed.push(FailedShard {
                            shard: shard.to_string(),
                            error,
                        });
                        progress.shard_done();
                    }
                }
            }
            Ok(())
        }
        .await;
        // Shards still open were cut off by an error elsewhere: nothing of them is kept.
        for (_, writer) in writers {
            writer.abort().await;
        }
        result
    }

    async fn commit(&self, writer: ShardWriter, report: &mut RunReport) -> Result<(), PipelineError> {
        let shard = writer.shard().to_string();
        let (predictions, steps, tally) = writer.finish().await?;
        let marker = CommitMarker {
            shard: shard.clone(),
            run_id: self.run_id.clone(),
            predictions: predictions.clone(),
            steps: steps.clone(),
            source: self.sources.get(&shard).cloned().unwrap_or_default(),
            method: self.method.to_string(),
            worker_index: self.worker.index,
            worker_count: self.worker.count,
            committed_at: chrono::Utc::now().to_rfc3339(),
            tally: tally.clone(),
        };
        match commit::commit(&self.output, &marker).await? {
            CommitResult::Committed => {
                // Best effort: the shard is committed; leftovers only cost space.
                match commit::remove_orphans(&self.output, &shard, &self.run_id).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(shard, "removed {removed} uncommitted file(s) of earlier runs"),
                    Err(e) => tracing::warn!(shard, "could not remove files of earlier runs: {e}"),
                }
                report.tally.merge(&tally);
                report.shards_committed.push(shard);
            }
            CommitResult::AlreadyCommitted => {
                tracing::warn!(
                    shard,
                    "another run committed this shard first; discarding this run's output for it"
                );
                for rel in [predictions, steps] {
                    let _ = self.output.store.delete(&self.output.child(&rel)).await;
                }
                report.shards_lost_race.push(shard);
            }
        }
        Ok(())
    }
}

/// Progress: an indicatif bar on a terminal, a log line every 10 s otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Instant,
    shards_total: usize,
    shards_done: usize,
    rows: u64,
    labelled: u64,
    correct: u64,
}

impl Progress {
    fn new(mode: ProgressMode, shards_total: usize) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::new(shards_total as u64);
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} shards  {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            started: Instant::now(),
            last_log: Instant::now(),
            shards_total,
            shards_done: 0,
            rows: 0,
            labelled: 0,
            correct: 0,
        }
    }

    fn message(&self) -> String {
        let rate = self.rows as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let mut msg = format!("{} images, {rate:.1} images/s", self.rows);
        if self.labelled > 0 {
            msg += &format!(", top-1 {:.2}%", 100.0 * self.correct as f64 / self.labelled as f64);
        }
        msg
    }

    fn row(&mut self, outcome: &Outcome) {
        self.rows += 1;
        if let Some(ok) = outcome.correct_after() {
            self.labelled += 1;
            self.correct += ok as u64;
        }
        self.tick();
    }

    fn shard_done(&mut self) {
        self.shards_done += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        self.tick();
    }

    fn tick(&mut self) {
        if let Some(bar) = &self.bar {
            if self.last_log.elapsed() >= Duration::from_millis(100) {
                bar.set_message(self.message());
                self.last_log = Instant::now();
            }
        } else if self.last_log.elapsed() >= Duration::from_secs(10) {
            tracing::info!(
                "progress: {}/{} shards, {}",
                self.shards_done,
                self.shards_total,
                self.message()
            );
            self.last_log = Instant::now();
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
