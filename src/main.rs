//! The `dtta` command line: run, plan, inspect, summarize.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use dtta::config::PipelineConfig;
use dtta::model::device::{self, DeviceSpec};
use dtta::model::Bundle;
use dtta::pipeline::{self, ProgressMode, RunReport};
use dtta::sink::summary;
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
    },
    /// Print this worker's shards and which are already committed.
    Plan {
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// Load a model bundle, run one forward, print what it holds.
    Inspect {
        /// Local folder or object-store URL of the bundle.
        bundle: String,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Aggregate the committed shards under an output URL.
    Summarize { output_url: String },
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
        Err(e) => return fail(&format!("cannot start the async runtime: {e}"), 2),
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { pipeline, no_progress } => cmd_run(pipeline, no_progress).await,
            Command::Plan { pipeline } => cmd_plan(pipeline).await,
            Command::Inspect { bundle, device } => cmd_inspect(&bundle, &device).await,
            Command::Summarize { output_url } => cmd_summarize(&output_url).await,
        }
    })
}

/// Prints a one-line reason and returns the exit code.
fn fail(reason: &str, code: u8) -> ExitCode {
    eprintln!("error: {reason}");
    ExitCode::from(code)
}

async fn cmd_run(args: PipelineArgs, no_progress: bool) -> ExitCode {
    let (config, worker) = match args.load() {
        Ok(v) => v,
        Err(e) => return fail(&e, 2),
    };
    let mode = if !no_progress && std::io::stderr().is_terminal() {
        ProgressMode::Bar
    } else {
        ProgressMode::Log
    };
    match pipeline::run(config, worker, mode).await {
        Ok(report) => {
            print_report(&report);
            if report.shards_failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                let first = &report.shards_failed[0];
                fail(
                    &format!(
                        "{} shard(s) failed (the others are committed; rerun to retry them); first: {}: {}",
                        report.shards_failed.len(),
                        first.shard,
                        first.error
                    ),
                    1,
                )
            }
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

fn percent(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{:.2}%", 100.0 * v))
}

fn print_report(r: &RunReport) {
    println!("run {} finished in {:.1} s on {}", r.run_id, r.elapsed_s, r.device);
    println!(
        "  shards:   {} committed, {} skipped (already committed), {} failed",
        r.shards_committed.len(),
        r.shards_skipped,
        r.shards_failed.len()
    );
    for f in &r.shards_failed {
        println!("            failed {}: {}", f.shard, f.error);
    }
    let t = &r.tally;
    println!(
        "  images:   {} ({} ok, {} with a status), {:.1} images/s",
        t.rows,
        t.rows - t.not_ok(),
        t.not_ok(),
        r.images_per_s
    );
    if t.not_ok() > 0 {
        let other: Vec<String> = t
            .statuses
            .iter()
            .filter(|(k, _)| *k != "ok")
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        println!("            {}", other.join(", "));
    }
    if t.labelled > 0 {
        println!(
            "  accuracy: {} top-1 before, {} after ({}) on {} labelled images",
            percent(t.accuracy_before()),
            percent(t.accuracy_after()),
            r.method,
            t.labelled
        );
    }
    let predicted = t.predicted();
    if predicted > 0 {
        println!(
            "  compute:  {:.2} ms/image in the method, adapt stage busy {:.0}% of the run",
            t.adapt_ms / predicted as f64,
            100.0 * r.adapt_busy_s / r.elapsed_s.max(1e-9)
        );
    }
    println!("  memory:   {:.0} MiB peak resident", r.peak_rss_mib);
    println!("  output:   {}", r.output);
}

async fn cmd_plan(args: PipelineArgs) -> ExitCode {
    let (config, worker) = match args.load() {
        Ok(v) => v,
        Err(e) => return fail(&e, 2),
    };
    match pipeline::plan(&config, worker).await {
        Ok(plan) => {
            let todo = plan.todo().len();
            println!(
                "worker {}/{}: {} of {} listed shard(s), {} committed, {} to do",
                worker.index,
                worker.count,
                plan.shards.len(),
                plan.total_listed,
                plan.shards.len() - todo,
                todo
            );
            for s in &plan.shards {
                let state = if plan.committed.contains(&s.id) {
                    "committed"
                } else {
                    "todo"
                };
                println!("{state:>9}  {}  ({} bytes)", s.id, s.size);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

async fn cmd_inspect(location: &str, device: &str) -> ExitCode {
    let spec: DeviceSpec = match device.parse() {
        Ok(s) => s,
        Err(e) => return fail(&e, 2),
    };
    let bundle = match Bundle::open(location, &StoreOptions::default()).await {
        Ok(b) => b,
        Err(e) => return fail(&e.to_string(), 1),
    };
    let device = match device::resolve(spec) {
        Ok(d) => d,
        Err(e) => return fail(&e.to_string(), 1),
    };
    let classifier = match bundle.load_classifier(device) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string(), 1),
    };
    let spec = &bundle.spec;
    let c = &spec.classifier;
    println!("bundle {} ({})", spec.name, bundle.source);
    println!("  device:      {}", device::describe(device));
    println!(
        "  classifier:  {}: input {:?} -> logits [1, {}] (checked with one forward)",
        c.file,
        classifier.input_shape(1),
        c.num_classes
    );
    let p = &c.preprocess;
    println!(
        "  preprocess:  {} channel(s), resize shorter side {}, center crop {}, mean {:?}, std {:?}",
        p.channels, p.resize, p.crop, p.mean, p.std
    );
    match classifier.parameter_counts(&c.head) {
        Ok((total, head)) => println!(
            "  parameters:  {total} ({head} in the head: {})",
            if c.head.is_empty() {
                "none named".to_string()
            } else {
                c.head.join(", ")
            }
        ),
        Err(e) => return fail(&format!("cannot list parameters: {e}"), 1),
    }
    if !c.norm.is_empty() {
        println!("  norm params: {} tensors (TENT, adapt = \"norm\")", c.norm.len());
    }
    if let Some(d) = &spec.diffusion {
        let diffusion = match bundle.load_diffusion(device) {
            Ok(diffusion) => diffusion,
            Err(e) => return fail(&e.to_string(), 1),
        };
        let params: i64 = match diffusion.named_parameters() {
            Ok(p) => p.iter().map(|(_, t)| t.numel() as i64).sum(),
            Err(e) => return fail(&format!("cannot list denoiser parameters: {e}"), 1),
        };
        println!(
            "  diffusion:   {} ({params} parameters): z0 {:?}, class embeddings {:?} (checked with one forward)",
            d.denoiser,
            diffusion.latent_shape,
            diffusion.embeddings.size()
        );
        println!(
            "  encoder:     {}",
            d.encoder
                .as_deref()
                .map_or("none (pixel space)".to_string(), |e| format!(
                    "{e}, latent_scale {}",
                    d.latent_scale
                ))
        );
        println!(
            "  gen view:    {} channel(s) at {}x{} in [-1, 1]; schedule {:?} {}..{} over {} steps",
            d.channels,
            d.resolution,
            d.resolution,
            d.schedule.kind,
            d.schedule.beta_start,
            d.schedule.beta_end,
            d.schedule.steps
        );
    }
    if spec.class_names.is_empty() {
        println!("  classes:     {} (unnamed)", c.num_classes);
    } else {
        let shown: Vec<&str> = spec.class_names.iter().take(20).map(String::as_str).collect();
        let more = spec.class_names.len().saturating_sub(shown.len());
        let tail = if more > 0 {
            format!(" ... and {more} more")
        } else {
            String::new()
        };
        println!("  classes:     {}{tail}", shown.join(", "));
    }
    ExitCode::SUCCESS
}

async fn cmd_summarize(output_url: &str) -> ExitCode {
    let out = match storage::open(output_url, &StoreOptions::default()) {
        Ok(o) => o,
        Err(e) => return fail(&e.to_string(), 1),
    };
    let summary = match summary::summarize(&out).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), 1),
    };
    println!(
        "{}: {} committed shard(s) from {} run(s)",
        out.display, summary.committed_shards, summary.runs
    );
    println!(
        "{:<22} {:>6} {:>7} {:>8} {:>7} {:>9} {:>13} {:>12} {:>10} {:>10}",
        "method",
        "worker",
        "shards",
        "rows",
        "not ok",
        "labelled",
        "top-1 before",
        "top-1 after",
        "ms/image",
        "images/s"
    );
    for r in &summary.rows {
        println!(
            "{:<22} {:>6} {:>7} {:>8} {:>7} {:>9} {:>13} {:>12} {:>10.2} {:>10}",
            r.method,
            r.worker.map_or("all".to_string(), |w| w.to_string()),
            r.shards,
            r.tally.rows,
            r.tally.not_ok(),
            r.tally.labelled,
            percent(r.tally.accuracy_before()),
            percent(r.tally.accuracy_after()),
            r.ms_per_image(),
            r.images_per_s.map_or("n/a".to_string(), |v| format!("{v:.1}"))
        );
    }
    for (shard, error) in &summary.failed_shards {
        println!("failed (not committed): {shard}: {error}");
    }
    if !summary.variants.is_empty() {
        println!();
        print_robustness(&summary.variants);
    }
    match summary::write(&out, &summary).await {
        Ok(written) => {
            println!("written: {}", written.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

/// The robustness table: one line per variant, top-1 after adaptation per method, then
/// the mean over corrupted variants and each method's ms per image.
fn print_robustness(rows: &[summary::VariantRow]) {
    let mut methods: Vec<&str> = Vec::new();
    let mut variants: Vec<(&str, u8)> = Vec::new();
    for r in rows {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
        if !variants.contains(&(r.corruption.as_str(), r.severity)) {
            variants.push((&r.corruption, r.severity));
        }
    }
    let cell = |method: &str, v: (&str, u8)| {
        rows.iter()
            .find(|r| r.method == method && r.corruption == v.0 && r.severity == v.1)
    };
    let width = methods.iter().map(|m| m.len()).max().unwrap_or(0).max(8);
    print!("{:<22} {:>3}", "top-1 (%)", "sev");
    for m in &methods {
        print!(" {m:>width$}");
    }
    println!();
    for &v in &variants {
        print!(
            "{:<22} {:>3}",
            v.0,
            if v.1 == 0 { "-".to_string() } else { v.1.to_string() }
        );
        for m in &methods {
            let acc = cell(m, v).and_then(|r| r.tally.accuracy_after());
            print!(
                " {:>width$}",
                acc.map_or("n/a".to_string(), |a| format!("{:.1}", a * 100.0))
            );
        }
        println!();
    }
    print!("{:<26}", "mean over corrupted");
    for m in &methods {
        let accs: Vec<f64> = variants
            .iter()
            .filter(|v| v.1 > 0)
            .filter_map(|&v| cell(m, v).and_then(|r| r.tally.accuracy_after()))
            .collect();
        let mean = (!accs.is_empty()).then(|| accs.iter().sum::<f64>() / accs.len() as f64 * 100.0);
        print!(" {:>width$}", mean.map_or("n/a".to_string(), |a| format!("{a:.1}")));
    }
    println!();
    print!("{:<26}", "ms per image");
    for m in &methods {
        let (ms, n) = rows.iter().filter(|r| r.method == *m).fold((0.0, 0u64), |(ms, n), r| {
            (ms + r.tally.adapt_ms, n + r.tally.predicted())
        });
        print!(" {:>width$.1}", ms / n.max(1) as f64);
    }
    println!();
}
