//! The `dtta` command line: run, plan, inspect, summarize, report, history, vacuum.

use std::fmt::Display;
use std::io::{self, IsTerminal, StdoutLock, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use dtta::config::units::HumanDuration;
use dtta::config::PipelineConfig;
use dtta::model::device::{self, DeviceSpec};
use dtta::model::Bundle;
use dtta::pipeline::{self, MixedBundles, ProgressMode};
use dtta::report::{console, html, summary, tables};
use dtta::sink::delta::At;
use dtta::sink::{commit, maintenance};
use dtta::storage::{self, StoreOptions};
use dtta::worker::Worker;

#[derive(Parser)]
#[command(
    name = "dtta",
    version,
    about = "Diffusion-TTA at dataset scale: stream shards, adapt a classifier per image, write Parquet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: process this worker's uncommitted shards.
    Run {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Log lines instead of a progress bar, even on a terminal.
        #[arg(long)]
        no_progress: bool,
        /// Add shards to an output whose committed shards were made with another model
        /// bundle (by default such a run is refused).
        #[arg(long)]
        allow_mixed_bundles: bool,
    },
    /// Print this worker's shards and which are already committed.
    Plan {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[command(flatten)]
        at: SnapshotArgs,
    },
    /// Load a model bundle, run one forward, print what it holds.
    Inspect {
        /// Local folder or object-store URL of the bundle.
        bundle: String,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Aggregate the committed shards under an output URL.
    Summarize {
        output_url: String,
        #[command(flatten)]
        at: SnapshotArgs,
    },
    /// One self-contained HTML page (charts inline) over the committed shards below the
    /// output URLs; also writes <first URL>/_runs/report.json.
    Report {
        #[arg(required = true)]
        output_urls: Vec<String>,
        /// Write the page to this local file instead of <first URL>/_runs/report.html.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        at: SnapshotArgs,
    },
    /// List the versions of an output's predictions table: when, which run and worker,
    /// which bundle, how many shards and rows each commit added.
    History { output_url: String },
    /// Delete data files that no commit references (runs killed before their commit)
    /// and that are older than the retention. Referenced files are never deleted.
    Vacuum {
        output_url: String,
        /// Keep unreferenced files younger than this (a run may still be writing them).
        #[arg(long, default_value = "7d")]
        retention: HumanDuration,
        /// Print what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which version of the output's tables to read (default: the latest).
#[derive(Args)]
struct SnapshotArgs {
    /// Read this version of the predictions table (`dtta history` lists them).
    #[arg(long, value_name = "N", conflicts_with = "as_of")]
    version: Option<u64>,
    /// Read the tables as they were at this time: RFC 3339 (2026-12-01T06:00:00Z) or a
    /// date (2026-12-01, midnight UTC).
    #[arg(long, value_name = "TIMESTAMP")]
    as_of: Option<String>,
}

impl SnapshotArgs {
    fn at(&self) -> Result<At, String> {
        if let Some(v) = self.version {
            return Ok(At::Version(v));
        }
        let Some(text) = &self.as_of else { return Ok(At::Latest) };
        let time = chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| t.timestamp_millis())
            .or_else(|_| {
                chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").map(|d| {
                    d.and_hms_opt(0, 0, 0)
                        .expect("midnight exists")
                        .and_utc()
                        .timestamp_millis()
                })
            })
            .map_err(|_| {
                format!("--as-of {text}: not an RFC 3339 time (2026-12-01T06:00:00Z) or a date (2026-12-01)")
            })?;
        Ok(At::Timestamp(time))
    }
}

#[derive(Args)]
struct PipelineArgs {
    /// The pipeline TOML file.
    pipeline: PathBuf,
    /// Override a config key, e.g. --set runtime.device=cpu (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// This worker's index (else from the scheduler: JOB_COMPLETION_INDEX,
    /// SLURM_ARRAY_TASK_ID, AWS_BATCH_JOB_ARRAY_INDEX, BATCH_TASK_INDEX).
    #[arg(long, env = "DTTA_WORKER_INDEX")]
    worker_index: Option<usize>,
    /// Number of workers (else SLURM_ARRAY_TASK_COUNT, BATCH_TASK_COUNT or runtime.worker_count).
    #[arg(long, env = "DTTA_WORKER_COUNT")]
    worker_count: Option<usize>,
}

impl PipelineArgs {
    fn load(&self) -> Result<(PipelineConfig, Worker), String> {
        let config = PipelineConfig::load(&self.pipeline, &self.overrides).map_err(|e| e.to_string())?;
        let worker = Worker::detect(self.worker_index, self.worker_count, config.runtime.worker_count)
            .map_err(|e| e.to_string())?;
        Ok((config, worker))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("DTTA_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}"), 2),
    };
    let done = runtime.block_on(async {
        match cli.command {
            Command::Run {
                pipeline,
                no_progress,
                allow_mixed_bundles,
            } => cmd_run(pipeline, no_progress, allow_mixed_bundles).await,
            Command::Plan { pipeline, at } => cmd_plan(pipeline, at).await,
            Command::Inspect { bundle, device } => cmd_inspect(&bundle, &device).await,
            Command::Summarize { output_url, at } => cmd_summarize(&output_url, at).await,
            Command::Report {
                output_urls,
                output,
                at,
            } => cmd_report(&output_urls, output, at).await,
            Command::History { output_url } => cmd_history(&output_url).await,
            Command::Vacuum {
                output_url,
                retention,
                dry_run,
            } => cmd_vacuum(&output_url, retention, dry_run).await,
        }
    });
    done.err().unwrap_or(ExitCode::SUCCESS)
}

/// Prints a one-line reason and returns the exit code.
fn fail(reason: impl Display, code: u8) -> ExitCode {
    eprintln!("error: {reason}");
    ExitCode::from(code)
}

/// `?` for a command: reports the error on one line and carries the exit code.
trait OrFail<T> {
    fn or_fail(self, code: u8) -> Result<T, ExitCode>;
}

impl<T, E: Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, code: u8) -> Result<T, ExitCode> {
        self.map_err(|e| fail(e, code))
    }
}

/// Writes to the locked stdout. A reader that closed the pipe early (`dtta inspect ... |
/// head -1`) ends the command quietly with success; any other write error is one line.
fn print(write: impl FnOnce(&mut StdoutLock) -> io::Result<()>) -> Result<(), ExitCode> {
    let mut out = io::stdout().lock();
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(ExitCode::SUCCESS),
        done => done.map_err(|e| fail(format!("cannot write to stdout: {e}"), 1)),
    }
}

async fn cmd_run(args: PipelineArgs, no_progress: bool, allow_mixed_bundles: bool) -> Result<(), ExitCode> {
    let (config, worker) = args.load().or_fail(2)?;
    let mode = if !no_progress && std::io::stderr().is_terminal() {
        ProgressMode::Bar
    } else {
        ProgressMode::Log
    };
    let mixing = match allow_mixed_bundles {
        true => MixedBundles::Allow,
        false => MixedBundles::Refuse,
    };
    let report = pipeline::run(config, worker, mode, mixing)
        .await
        .map_err(|e| fail(&e, e.exit_code()))?;
    // Failed shards set the exit code even when nobody reads the report.
    let printed = print(|w| console::write_run(w, &report));
    if let Some(first) = report.shards_failed.first() {
        return Err(fail(
            format!(
                "{} shard(s) failed (the others are committed; rerun to retry them); first: {}: {}",
                report.shards_failed.len(),
                first.shard,
                first.error
            ),
            1,
        ));
    }
    printed
}

async fn cmd_plan(args: PipelineArgs, at: SnapshotArgs) -> Result<(), ExitCode> {
    let (config, worker) = args.load().or_fail(2)?;
    let at = at.at().or_fail(2)?;
    let mut plan = pipeline::plan(&config, worker).await.or_fail(1)?;
    if at != At::Latest {
        plan.committed = commit::read_markers_at(&plan.output, at)
            .await
            .or_fail(1)?
            .into_keys()
            .collect();
    }
    print(|w| tables::write_plan(w, &worker, &plan.shards, plan.total_listed, &plan.committed))
}

async fn cmd_inspect(location: &str, device: &str) -> Result<(), ExitCode> {
    let spec: DeviceSpec = device.parse().or_fail(2)?;
    let bundle = Bundle::open(location, &StoreOptions::default()).await.or_fail(1)?;
    let device = device::resolve(spec).or_fail(1)?;
    let inspection = console::inspect(&bundle, device).or_fail(1)?;
    print(|w| console::write_inspection(w, &inspection))
}

async fn cmd_summarize(output_url: &str, at: SnapshotArgs) -> Result<(), ExitCode> {
    let at = at.at().or_fail(2)?;
    let out = storage::open(output_url, &StoreOptions::default()).or_fail(1)?;
    let summary = summary::summarize(&out, at).await.or_fail(1)?;
    print(|w| tables::write_summary(w, &summary))?;
    let written = summary::write(&out, &summary).await.or_fail(1)?;
    print(|w| writeln!(w, "written: {}", written.join(", ")))
}

async fn cmd_report(output_urls: &[String], file: Option<PathBuf>, at: SnapshotArgs) -> Result<(), ExitCode> {
    let at = at.at().or_fail(2)?;
    let outs = output_urls
        .iter()
        .map(|url| storage::open(url, &StoreOptions::default()))
        .collect::<Result<Vec<_>, _>>()
        .or_fail(1)?;
    let report = html::build(&outs, at).await.or_fail(1)?;
    let page = html::render(&report);
    let mut written = vec![html::write_json(&outs[0], &report).await.or_fail(1)?];
    match file {
        Some(path) => {
            std::fs::write(&path, page)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
                .or_fail(1)?;
            written.push(path.display().to_string());
        }
        None => written.push(html::write_html(&outs[0], page).await.or_fail(1)?),
    }
    print(|w| writeln!(w, "written: {}", written.join(", ")))
}

async fn cmd_history(output_url: &str) -> Result<(), ExitCode> {
    let out = storage::open(output_url, &StoreOptions::default()).or_fail(1)?;
    let history = maintenance::history(&out).await.or_fail(1)?;
    print(|w| tables::write_history(w, &out.display, &history))
}

async fn cmd_vacuum(output_url: &str, retention: HumanDuration, dry_run: bool) -> Result<(), ExitCode> {
    let out = storage::open(output_url, &StoreOptions::default()).or_fail(1)?;
    let reports = maintenance::vacuum(&out, retention.0, dry_run).await.or_fail(1)?;
    print(|w| tables::write_vacuum(w, &reports, retention, dry_run))
}
