//! Fetch stage (tokio): reads `shards_in_flight` shards at once and hands their samples
//! on, each charged to the process's prefetch byte budget until it is decoded.
//!
//! A shard whose stream breaks is read again (per `runtime.shard_retries`, with
//! [`Backoff::shard`]), skipping the samples already handed on, so no sample is handed on
//! twice. A shard that is wrong in itself (its layout) fails at once.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::event::{Control, Event};
use crate::sample::Sample;
use crate::shards::{self, InputConfig, ReadLimits, SampleReceiver, ShardInput};
use crate::storage::{Backoff, Location, ShardRef};

/// A sample and its share of the prefetch byte budget, released once decoded.
pub(super) struct Budgeted {
    pub sample: Sample,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Budget units are KiB so that a u32 permit count covers any sample size.
const BUDGET_UNIT: u64 = 1024;

/// What the fetch stage needs of the configuration.
pub(super) struct FetchSettings {
    pub input: InputConfig,
    pub limits: ReadLimits,
    pub prefetch_bytes: u64,
    pub shards_in_flight: usize,
    pub shard_retries: u32,
}

/// Feeds one shard's samples into the pipeline channel, charging the byte budget.
struct ChannelFeed<'a> {
    shard: Arc<str>,
    tx: &'a mpsc::Sender<Event<Budgeted>>,
    budget: &'a Arc<Semaphore>,
    handed_on: u64,
    closed: bool,
}

impl SampleReceiver for ChannelFeed<'_> {
    async fn accept(&mut self, sample: Sample) -> bool {
        let bytes = sample.image.as_ref().map_or(0, |b| b.len() as u64);
        let units = bytes.div_ceil(BUDGET_UNIT).max(1) as u32;
        let permit = self.budget.clone().acquire_many_owned(units).await.ok();
        let event = Event::Item {
            shard: self.shard.clone(),
            item: Budgeted { sample, permit },
        };
        if self.tx.send(event).await.is_err() {
            self.closed = true;
            return false;
        }
        self.handed_on += 1;
        true
    }
}

/// Reads `shards` below `input` into `tx`: per shard, Begin, its samples, End or Failed.
pub(super) async fn run(
    shards: Vec<ShardRef>,
    input: Location,
    settings: FetchSettings,
    tx: mpsc::Sender<Event<Budgeted>>,
) {
    let units = (settings.prefetch_bytes / BUDGET_UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
    let budget = Arc::new(Semaphore::new(units as usize));
    futures::stream::iter(shards)
        .for_each_concurrent(settings.shards_in_flight, |shard| {
            let (tx, budget, input, settings) = (&tx, &budget, &input, &settings);
            async move {
                let id: Arc<str> = shard.id.as_str().into();
                if tx.send(Event::Control(Control::Begin(id.clone()))).await.is_err() {
                    return;
                }
                let mut feed = ChannelFeed {
                    shard: id.clone(),
                    tx,
                    budget,
                    handed_on: 0,
                    closed: false,
                };
                let mut retries = Backoff::shard(settings.shard_retries).start();
                let end = loop {
                    let source = ShardInput {
                        store: input.store.clone(),
                        path: shard.path.clone(),
                        size: shard.size,
                        members: shard.members.clone(),
                        skip: feed.handed_on,
                    };
                    let error = match shards::read_shard(&settings.input, &source, settings.limits, &mut feed).await {
                        Ok(_) if feed.closed => return,
                        Ok(samples) => {
                            break Control::End {
                                shard: id.clone(),
                                samples,
                            }
                        }
                        Err(e) => e,
                    };
                    let wait = if error.is_transient() {
                        retries.next_delay()
                    } else {
                        None
                    };
                    match wait {
                        Some(wait) => {
                            tracing::warn!(
                                shard = %id,
                                "read failed ({error}); retry {}/{} in {wait:?}, resuming after {} sample(s)",
                                retries.attempts() - 1,
                                settings.shard_retries,
                                feed.handed_on
                            );
                            tokio::time::sleep(wait).await;
                        }
                        None => {
                            let attempts = retries.attempts();
                            tracing::error!(shard = %id, "giving up after {attempts} attempt(s): {error}");
                            break Control::Failed {
                                shard: id.clone(),
                                error: format!("{error} (after {attempts} attempt(s))"),
                            };
                        }
                    }
                };
                let _ = tx.send(Event::Control(end)).await;
            }
        })
        .await;
}
