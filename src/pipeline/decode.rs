//! Decode stage: decodes and preprocesses on the CPU pool (never on the async I/O
//! threads), in input order, and expands every sample into its variants.
//!
//! Invariant: every sample in yields exactly one item per variant out, whatever the
//! bytes: a decoder or corruption panic is caught and becomes a `decode_error` row.
//! Hazard: rayon aborts the process when a spawned job panics and the pool has no
//! panic handler; jobs here catch their panics, and the pool logs any that escape.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::event::{Control, Event};
use super::fetch::Budgeted;
use crate::image::protocol::{self, ProtocolConfig};
use crate::image::{DecodeLimits, Expansion, Prepared, Views};
use crate::sample::{Defect, Sample, Variant};

/// Turns one sample into its prepared variants ([`crate::image::prepare`] outside tests).
pub(super) type PrepareFn = fn(Sample, &Views, DecodeLimits, bool, &Expansion) -> Vec<Prepared>;

/// What decoding a sample needs, shared by the pool's jobs.
pub(super) struct Decoder {
    pub views: Views,
    pub limits: DecodeLimits,
    pub require_label: bool,
    pub expansion: Expansion,
    pub prepare: PrepareFn,
    pub stream: StreamOrder,
}

/// The order of a shard's items for the stream protocols (`[protocol]`).
pub(super) struct StreamOrder {
    pub protocol: ProtocolConfig,
    /// The run seed (with the shard id, it orders `mixed`).
    pub seed: u64,
}

impl Decoder {
    /// One item per variant, even when preparing panics (then each is a `decode_error`
    /// row that keeps the sample's key and label).
    fn prepare(&self, sample: Sample) -> Vec<Prepared> {
        self.prepare_as(sample, &self.expansion)
    }

    /// One variant of a held sample (the stream protocols), panics caught as above.
    fn prepare_variant(&self, sample: &Sample, variant: Variant) -> Prepared {
        let one = Expansion {
            variants: vec![variant],
            seed: self.expansion.seed,
        };
        self.prepare_as(sample.clone(), &one)
            .pop()
            .expect("one item per variant")
    }

    fn prepare_as(&self, sample: Sample, expansion: &Expansion) -> Vec<Prepared> {
        let (key, label) = (sample.key.clone(), sample.label);
        let prepare = self.prepare;
        catch_unwind(AssertUnwindSafe(|| {
            prepare(sample, &self.views, self.limits, self.require_label, expansion)
        }))
        .unwrap_or_else(|panic| {
            let defect = Defect::from_panic("preparing the image", panic.as_ref());
            expansion
                .variants
                .iter()
                .map(|&variant| Prepared {
                    key: key.clone(),
                    label,
                    variant,
                    pixels: None,
                    gen_pixels: None,
                    dense_label: None,
                    defect: Some(defect.clone()),
                })
                .collect()
        })
    }
}

/// The decode pool: its own threads, apart from tokio's.
pub(super) fn pool(threads: usize) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("dtta-decode-{i}"))
        // Jobs catch their own panics; without a handler rayon would abort the process.
        .panic_handler(|panic| {
            tracing::error!(
                "a decode job panicked: {}",
                crate::sample::panic_message(panic.as_ref())
            )
        })
        .build()
}

/// Decodes on the pool, in input order, and expands every sample into its variants.
///
/// Variants leave in runs: `group` consecutive samples of a shard are held (decoded
/// views only, at most `group` x variants items), then emitted variant by variant, so
/// a batch of the adapt stage holds one variant and stateful methods (TENT, online
/// Diffusion-TTA) see one stream per variant. Without corruption, one variant: no
/// holding. End counts become rows (samples x variants), which the write stage checks.
pub(super) async fn run(
    rx: mpsc::Receiver<Event<Budgeted>>,
    tx: mpsc::Sender<Event<Prepared>>,
    pool: Arc<rayon::ThreadPool>,
    decoder: Decoder,
    depth: usize,
    group: usize,
) {
    if decoder.stream.protocol.one_stream() {
        return run_stream(rx, tx, pool, Arc::new(decoder), depth).await;
    }
    let decoder = Arc::new(decoder);
    let per_sample = decoder.expansion.variants.len() as u64;
    let mut ordered = stream_of(rx)
        .map(|event| -> BoxFuture<'static, Event<Vec<Prepared>>> {
            match event {
                Event::Control(c) => futures::future::ready(Event::Control(c)).boxed(),
                Event::Item { shard, item } => {
                    let (done_tx, done_rx) = oneshot::channel();
                    let decoder = decoder.clone();
                    pool.spawn(move || {
                        let Budgeted { sample, permit } = item;
                        let prepared = decoder.prepare(sample);
                        drop(permit);
                        let _ = done_tx.send(prepared);
                    });
                    async move {
                        // The job catches panics, so it always answers; an empty list
                        // here would surface as a row-count error naming the shard.
                        Event::Item {
                            shard,
                            item: done_rx.await.unwrap_or_default(),
                        }
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

/// The stream protocols: holds each shard's samples (encoded bytes, not decoded views)
/// until its end, then prepares its (sample, variant) pairs in protocol order on the
/// pool, `depth` at a time, and emits them in that order; End counts the pairs.
///
/// Hazard: a shard's encoded bytes stay in memory from its first sample to its end,
/// outside the prefetch budget (the fetch stage reads one shard at a time for these
/// protocols, so it is one shard's bytes).
async fn run_stream(
    rx: mpsc::Receiver<Event<Budgeted>>,
    tx: mpsc::Sender<Event<Prepared>>,
    pool: Arc<rayon::ThreadPool>,
    decoder: Arc<Decoder>,
    depth: usize,
) {
    let mut held: HashMap<Arc<str>, Vec<Arc<Sample>>> = HashMap::new();
    let mut events = stream_of(rx);
    while let Some(event) = events.next().await {
        let c = match event {
            Event::Item { shard, item } => {
                held.entry(shard).or_default().push(Arc::new(item.sample));
                continue;
            }
            Event::Control(c) => c,
        };
        let c = match c {
            Control::End { shard, .. } => {
                let samples = held.remove(&shard).unwrap_or_default();
                let seed = protocol::shard_seed(decoder.stream.seed, &shard);
                let order = decoder
                    .stream
                    .protocol
                    .sequence(samples.len(), &decoder.expansion.variants, seed);
                let rows = order.len() as u64;
                let mut prepared = futures::stream::iter(order)
                    .map(|(i, variant)| {
                        let (sample, decoder) = (samples[i].clone(), decoder.clone());
                        let (done_tx, done_rx) = oneshot::channel();
                        pool.spawn(move || {
                            let _ = done_tx.send(decoder.prepare_variant(&sample, variant));
                        });
                        done_rx
                    })
                    .buffered(depth);
                while let Some(item) = prepared.next().await {
                    // The job catches panics, so it always answers; a missing item
                    // surfaces as a row-count error naming the shard.
                    let Ok(item) = item else { continue };
                    if tx
                        .send(Event::Item {
                            shard: shard.clone(),
                            item,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Control::End { shard, samples: rows }
            }
            Control::Failed { shard, error } => {
                held.remove(&shard);
                Control::Failed { shard, error }
            }
            c @ Control::Begin(_) => c,
        };
        if tx.send(Event::Control(c)).await.is_err() {
            return;
        }
    }
}

fn stream_of<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
