use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema};
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use super::*;

fn table_in(store: Arc<dyn ObjectStore>, interval: u64) -> Table {
    Table::new(
        Location {
            store,
            prefix: Path::from("out/t"),
            display: "memory:///out/t".into(),
        },
        interval,
    )
}

fn schema() -> Schema {
    Schema::new(vec![Field::new("key", DataType::Utf8, false)])
}

fn commit_of(shard: &str, run: &str) -> Commit {
    let mut add = AddFile::data_file(&format!("{shard}.{run}.parquet"), 10, 1, 1);
    add.tags.insert("run".to_string(), run.to_string());
    Commit::one_file(add, format!("dtta/{shard}"), serde_json::Map::new())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_transaction_id_is_committed_once_and_the_log_replays_to_the_same_state() {
    rt().block_on(async {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let t = table_in(store.clone(), 100);
        assert_eq!(t.snapshot(At::Latest).await.unwrap().version, None, "no table yet");
        assert_eq!(
            t.commit(&commit_of("a", "r1"), &schema()).await.unwrap(),
            Committed::Now(0)
        );
        assert_eq!(
            t.commit(&commit_of("b", "r1"), &schema()).await.unwrap(),
            Committed::Now(1)
        );
        // Another run, and the same run again: both find the id; the files say whose.
        for run in ["r2", "r1"] {
            match t.commit(&commit_of("a", run), &schema()).await.unwrap() {
                Committed::Before(adds) => assert_eq!(adds[0].tags["run"], "r1"),
                other => panic!("{other:?}"),
            }
        }
        // A fresh reader (another process) sees what the writer's cache holds.
        let snap = table_in(store.clone(), 100).snapshot(At::Latest).await.unwrap();
        assert_eq!(snap.version, Some(1));
        assert_eq!(snap.files.len(), 2);
        assert_eq!(snap.txns.len(), 2);
        assert_eq!(snap.protocol, Some(Protocol::DTTA));
        let meta = snap.metadata.unwrap();
        assert_eq!(meta.schema_string, schema::schema_string(&schema()));
        // Another schema is refused.
        let other = Schema::new(vec![Field::new("x", DataType::Int64, true)]);
        let err = t.commit(&commit_of("c", "r1"), &other).await.unwrap_err().to_string();
        assert!(err.contains("columns differ"), "{err}");
    });
}

#[test]
fn checkpoints_hold_the_whole_state_and_let_a_reader_skip_the_commits_before_them() {
    rt().block_on(async {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let t = table_in(store.clone(), 3);
        for i in 0..8 {
            t.commit(&commit_of(&format!("shard {i}/x%"), "r"), &schema())
                .await
                .unwrap();
        }
        let full = table_in(store.clone(), 3).snapshot(At::Latest).await.unwrap();
        assert_eq!(full.version, Some(7));
        // Checkpoints at 3 and 6; the hint names the newest.
        for v in [3, 6] {
            store.head(&t.loc.child(&checkpoint_file(v))).await.unwrap();
        }
        assert_eq!(t.last_checkpoint_hint().await.unwrap(), Some(6));
        // Without the commits the checkpoint covers, the table opens to the same state.
        for v in 0..=6 {
            store.delete(&t.loc.child(&commit_file(v))).await.unwrap();
        }
        let from_checkpoint = table_in(store.clone(), 3).snapshot(At::Latest).await.unwrap();
        assert_eq!(from_checkpoint.version, Some(7));
        assert_eq!(from_checkpoint.files, full.files);
        assert_eq!(from_checkpoint.txns, full.txns);
        assert_eq!(from_checkpoint.metadata, full.metadata);
        assert_eq!(from_checkpoint.protocol, full.protocol);
        // Paths with spaces, slashes and percent signs survive encoding both ways.
        assert!(
            full.files.keys().any(|p| decode_path(p) == "shard 3/x%.r.parquet"),
            "{:?}",
            full.files.keys()
        );
        // Version 6 comes from its checkpoint alone.
        assert_eq!(t.snapshot(At::Version(6)).await.unwrap().files.len(), 7);
        // A version whose commits are gone and that no checkpoint holds cannot be read.
        assert!(t.snapshot(At::Version(4)).await.is_err());
    });
}

#[test]
fn time_travel_reads_each_version_and_the_version_current_at_a_time() {
    rt().block_on(async {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let t = table_in(store.clone(), 100);
        let mut stamps = Vec::new();
        for i in 0..5 {
            t.commit(&commit_of(&format!("s{i}"), "r"), &schema()).await.unwrap();
            let actions = t.read_commit(i).await.unwrap().unwrap();
            stamps.push(commit_timestamp(&actions).unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        for v in 0..5u64 {
            let snap = t.snapshot(At::Version(v)).await.unwrap();
            assert_eq!(snap.files.len() as u64, v + 1);
            assert_eq!(
                t.snapshot(At::Timestamp(stamps[v as usize])).await.unwrap().version,
                Some(v)
            );
        }
        assert_eq!(t.version_at(stamps[4] + 1_000_000).await.unwrap(), 4);
        assert!(
            t.snapshot(At::Timestamp(stamps[0] - 1)).await.is_err(),
            "before the table existed"
        );
        assert!(t.snapshot(At::Version(5)).await.is_err(), "a version not written yet");
    });
}

#[test]
fn a_gap_in_the_log_and_a_newer_protocol_are_errors_not_silent_states() {
    rt().block_on(async {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let t = table_in(store.clone(), 100);
        for i in 0..3 {
            t.commit(&commit_of(&format!("s{i}"), "r"), &schema()).await.unwrap();
        }
        store.delete(&t.loc.child(&commit_file(1))).await.unwrap();
        let err = table_in(store.clone(), 100).snapshot(At::Latest).await.unwrap_err().to_string();
        assert!(err.contains("gap"), "{err}");

        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let t = table_in(store.clone(), 100);
        let newer = r#"{"protocol":{"minReaderVersion":3,"minWriterVersion":7,"readerFeatures":["deletionVectors"],"writerFeatures":["deletionVectors"]}}"#;
        store
            .put(&t.loc.child(&commit_file(0)), PutPayload::from(format!("{newer}\n")))
            .await
            .unwrap();
        let err = t.snapshot(At::Latest).await.unwrap_err().to_string();
        assert!(err.contains("reader 3"), "{err}");
        assert!(t.commit(&commit_of("s", "r"), &schema()).await.is_err(), "nor written to");
    });
}

#[test]
fn concurrent_writers_each_land_once_at_contiguous_versions() {
    let rt = rt();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    // Each writer has its own cache, as separate processes do; each also
                    // commits shards its neighbour commits.
                    let t = table_in(store, 4);
                    for i in 0..10 {
                        for (shard, run) in [
                            (format!("{w}-{i}"), format!("w{w}")),
                            (format!("{}-{i}", (w + 1) % 8), format!("x{w}")),
                        ] {
                            t.commit(&commit_of(&shard, &run), &schema()).await.unwrap();
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let t = table_in(store.clone(), 4);
        let snap = t.snapshot(At::Latest).await.unwrap();
        assert_eq!(snap.version, Some(79), "80 shards, one version each");
        assert_eq!(snap.files.len(), 80);
        assert_eq!(snap.txns.len(), 80);
        let (commits, checkpoints) = t.list_log(0).await.unwrap();
        assert_eq!(commits, (0..80).collect::<Vec<_>>());
        assert!(!checkpoints.is_empty());
        // Every checkpoint holds exactly the state of its version.
        for v in checkpoints {
            let cp = checkpoint::read(&t.loc, &checkpoint_file(v)).await.unwrap();
            assert_eq!(
                cp.iter().filter(|a| a.add.is_some()).count() as u64,
                v + 1,
                "checkpoint {v}"
            );
        }
    });
}

/// A store whose creates of commit files fail the way real ones do: the next `conflicts`
/// answer `AlreadyExists` without writing (S3's 409 when two conditional writes of one
/// key meet, where neither lands), and the next `lost_responses` write and then fail as
/// a connection reset (the response of a create that landed is lost).
#[derive(Debug, Default)]
struct FailingCommits {
    inner: InMemory,
    conflicts: AtomicUsize,
    lost_responses: AtomicUsize,
}

/// Takes one from `left` if any is left.
fn take_one(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl std::fmt::Display for FailingCommits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FailingCommits")
    }
}

#[async_trait::async_trait]
impl ObjectStore for FailingCommits {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let commit = opts.mode == PutMode::Create && location.as_ref().ends_with(".json");
        if commit && take_one(&self.conflicts) {
            return Err(object_store::Error::AlreadyExists {
                path: location.to_string(),
                source: "409 Conflict: a conditional write of this key was in progress".into(),
            });
        }
        let put = self.inner.put_opts(location, payload, opts).await?;
        if commit && take_one(&self.lost_responses) {
            return Err(object_store::Error::Generic {
                store: "FailingCommits",
                source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            });
        }
        Ok(put)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[test]
fn a_conflict_where_neither_write_landed_and_a_lost_response_leave_no_gap_and_no_duplicate() {
    rt().block_on(async {
        let store = Arc::new(FailingCommits::default());
        let t = table_in(store.clone(), 100);
        assert_eq!(
            t.commit(&commit_of("a", "r"), &schema()).await.unwrap(),
            Committed::Now(0)
        );
        // Two 409s in a row: the version is still free after each, so it is tried again;
        // skipping to the next one would leave a gap that readers refuse.
        store.conflicts.store(2, Ordering::SeqCst);
        assert_eq!(
            t.commit(&commit_of("b", "r"), &schema()).await.unwrap(),
            Committed::Now(1)
        );
        // Our create landed but its answer was lost: the retried create finds the file,
        // the log holds our id, and the shard counts as committed, once.
        store.lost_responses.store(1, Ordering::SeqCst);
        match t.commit(&commit_of("c", "r"), &schema()).await.unwrap() {
            Committed::Before(adds) => assert_eq!(adds.len(), 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.conflicts.load(Ordering::SeqCst), 0, "both conflicts were met");
        assert_eq!(
            store.lost_responses.load(Ordering::SeqCst),
            0,
            "the lost response was met"
        );
        let fresh = table_in(store.clone(), 100);
        let (commits, _) = fresh.list_log(0).await.unwrap();
        assert_eq!(commits, vec![0, 1, 2], "contiguous versions");
        let snap = fresh.snapshot(At::Latest).await.unwrap();
        assert_eq!((snap.files.len(), snap.txns.len()), (3, 3), "each shard once");
    });
}
