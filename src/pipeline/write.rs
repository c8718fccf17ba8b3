//! Write stage (tokio): one Parquet writer pair per shard in flight; a shard's rows are
//! committed when its End arrives and the row count matches, never otherwise.
//!
//! Commit policy: data files first, then one Delta commit per table (`sink::commit`); a
//! shard another run committed first is discarded; after our commit, files of the same
//! shard left by killed runs are removed (best effort).

use std::collections::HashMap;
use std::sync::Arc;

use object_store::ObjectStoreExt;
use tokio::sync::mpsc;

use super::event::{Control, Event};
use super::progress::Progress;
use super::{FailedShard, PipelineError, RunReport};
use crate::sink::commit::{self, CommitMarker, CommitResult};
use crate::sink::predictions::Layout;
use crate::sink::ShardWriter;
use crate::storage::Location;
use crate::tta::Outcome;
use crate::worker::Worker;

/// Writes rows per shard and commits each shard when its End arrives.
pub(super) struct WriteStage {
    /// Tally per variant too (`[corrupt]` is set).
    pub by_variant: bool,
    pub output: Location,
    pub run_id: String,
    pub method: String,
    /// The model bundle's digest, on every row and commit marker.
    pub bundle_sha256: String,
    /// The predictions table's columns (dense tasks add theirs).
    pub layout: Layout,
    /// The output's tables; their snapshots are reused from commit to commit.
    pub tables: Arc<commit::Tables>,
    /// sha256 of the run's config, in every commit's facts.
    pub config_sha256: String,
    pub worker: Worker,
    /// Shard id -> where it was read from, for the commit marker.
    pub sources: HashMap<String, String>,
}

impl WriteStage {
    pub(super) async fn run(
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
                        let writer = ShardWriter::create(
                            &self.output,
                            &self.run_id,
                            &shard,
                            &self.method,
                            &self.bundle_sha256,
                            self.layout,
                            self.by_variant,
                        )?;
                        writers.insert(shard, writer);
                    }
                    Event::Item { shard, item } => {
                        progress.row(&item);
                        let writer = writers.get_mut(&shard).ok_or_else(|| PipelineError::OutOfOrder {
                            shard: shard.to_string(),
                            event: "a row",
                        })?;
                        writer.push(item).await?;
                    }
                    Event::Control(Control::End { shard, samples }) => {
                        let writer = writers.remove(&shard).ok_or_else(|| PipelineError::OutOfOrder {
                            shard: shard.to_string(),
                            event: "its end",
                        })?;
                        let rows = writer.tally.rows;
                        if rows != samples {
                            writer.abort().await;
                            return Err(PipelineError::RowCount {
                                shard: shard.to_string(),
                                samples,
                                rows,
                            });
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
        let files = writer.finish(&self.output).await?;
        let tally = files.tally.clone();
        let marker = CommitMarker {
            shard: shard.clone(),
            run_id: self.run_id.clone(),
            predictions: files.predictions.rel.clone(),
            steps: files.steps.rel.clone(),
            source: self.sources.get(&shard).cloned().unwrap_or_default(),
            method: self.method.to_string(),
            bundle_sha256: Some(self.bundle_sha256.clone()),
            config_sha256: Some(self.config_sha256.clone()),
            worker_index: self.worker.index,
            worker_count: self.worker.count,
            committed_at: chrono::Utc::now().to_rfc3339(),
            tally: tally.clone(),
        };
        match commit::commit(&self.tables, &marker, (&files.predictions, &files.steps), &self.layout).await? {
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
                for rel in [&files.predictions.rel, &files.steps.rel] {
                    let _ = self.output.store.delete(&self.output.child(rel)).await;
                }
                report.shards_lost_race.push(shard);
            }
        }
        Ok(())
    }
}
