//! What `dtta run` and `dtta inspect` print.

use std::io::{self, Write};

use tch::Device;

use super::percent;
use crate::model::bundle::{BundleSpec, Condition};
use crate::model::{device, Bundle};
use crate::pipeline::RunReport;
use crate::sample::Task;

/// `dtta run`: shards, images, accuracy, compute and memory of the finished run.
pub fn write_run(w: &mut impl Write, r: &RunReport) -> io::Result<()> {
    writeln!(w, "run {} finished in {:.1} s on {}", r.run_id, r.elapsed_s, r.device)?;
    writeln!(
        w,
        "  shards:   {} committed, {} skipped (already committed), {} failed",
        r.shards_committed.len(),
        r.shards_skipped,
        r.shards_failed.len()
    )?;
    for f in &r.shards_failed {
        writeln!(w, "            failed {}: {}", f.shard, f.error)?;
    }
    let t = &r.tally;
    writeln!(
        w,
        "  images:   {} ({} ok, {} with a status), {:.1} images/s",
        t.rows,
        t.rows - t.not_ok(),
        t.not_ok(),
        r.images_per_s
    )?;
    if t.not_ok() > 0 {
        let other: Vec<String> = t
            .statuses
            .iter()
            .filter(|(k, _)| *k != "ok")
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        writeln!(w, "            {}", other.join(", "))?;
    }
    if t.labelled > 0 {
        writeln!(
            w,
            "  accuracy: {} top-1 before, {} after ({}) on {} labelled images",
            percent(t.accuracy_before()),
            percent(t.accuracy_after()),
            r.method,
            t.labelled
        )?;
    }
    if t.predicted() > 0 {
        writeln!(
            w,
            "  compute:  {:.2} ms/image in the method, {:.1} denoiser evals/image, adapt stage busy {:.0}% of the run",
            r.ms_per_image,
            r.denoiser_evals_per_image,
            100.0 * r.adapt_busy_s / r.elapsed_s.max(1e-9)
        )?;
    }
    writeln!(w, "  memory:   {:.0} MiB peak resident", r.peak_rss_mib)?;
    writeln!(w, "  output:   {}", r.output)
}

/// What `dtta inspect` found: the bundle's models loaded on a device, each checked with
/// one forward, and their parameter counts.
pub struct Inspection<'a> {
    pub spec: &'a BundleSpec,
    /// Where the bundle came from.
    pub source: &'a str,
    /// The bundle's digest (what `model.sha256` pins).
    pub sha256: &'a str,
    /// The device, described.
    pub device: String,
    pub input_shape: [i64; 4],
    /// The classifier's output for one image: `[1, K]`, or `[1, K, h, w]` (dense tasks).
    pub output_shape: Vec<i64>,
    /// All classifier parameters.
    pub parameters: i64,
    /// Those in the classifier's head.
    pub head_parameters: i64,
    pub diffusion: Option<DiffusionCheck>,
}

/// The loaded diffusion model, for bundles that have one.
pub struct DiffusionCheck {
    pub parameters: i64,
    pub latent_shape: Vec<i64>,
    pub embeddings_shape: Vec<i64>,
}

/// Loads the bundle's classifier (and diffusion model, if any) on `device`; the error
/// is one line.
pub fn inspect(bundle: &Bundle, device: Device) -> Result<Inspection<'_>, String> {
    let spec = &bundle.spec;
    let classifier = bundle.load_classifier(device).map_err(|e| e.to_string())?;
    let (parameters, head_parameters) = classifier
        .parameter_counts(&spec.classifier.head)
        .map_err(|e| format!("cannot list parameters: {e}"))?;
    let diffusion = match &spec.diffusion {
        None => None,
        Some(_) => {
            let diffusion = bundle.load_diffusion(device).map_err(|e| e.to_string())?;
            let parameters = diffusion
                .named_parameters()
                .map_err(|e| format!("cannot list denoiser parameters: {e}"))?
                .iter()
                .map(|(_, t)| t.numel() as i64)
                .sum();
            Some(DiffusionCheck {
                parameters,
                latent_shape: diffusion.latent_shape.clone(),
                embeddings_shape: diffusion.embeddings.size(),
            })
        }
    };
    Ok(Inspection {
        spec,
        source: &bundle.source,
        sha256: &bundle.sha256,
        device: device::describe(device),
        input_shape: classifier.input_shape(1),
        output_shape: classifier.output_shape.clone(),
        parameters,
        head_parameters,
        diffusion,
    })
}

/// `dtta inspect`: the bundle's models, preprocessing, diffusion view and classes.
pub fn write_inspection(w: &mut impl Write, i: &Inspection) -> io::Result<()> {
    let spec = i.spec;
    let c = &spec.classifier;
    writeln!(w, "bundle {} ({})", spec.name, i.source)?;
    writeln!(w, "  sha256:      {}", i.sha256)?;
    writeln!(w, "  device:      {}", i.device)?;
    let output = match spec.task {
        Task::Classification => format!("logits {:?}", i.output_shape),
        Task::Segmentation => format!(
            "segmentation logits {:?}, upsampled to the {}x{} crop",
            i.output_shape, c.preprocess.crop, c.preprocess.crop
        ),
        Task::Depth => format!(
            "depth (metres) {:?}, upsampled to the {}x{} crop",
            i.output_shape, c.preprocess.crop, c.preprocess.crop
        ),
    };
    writeln!(
        w,
        "  classifier:  {}: input {:?} -> {output} (checked with one forward)",
        c.file, i.input_shape
    )?;
    let p = &c.preprocess;
    writeln!(
        w,
        "  preprocess:  {} channel(s), resize shorter side {}, center crop {}, mean {:?}, std {:?}",
        p.channels, p.resize, p.crop, p.mean, p.std
    )?;
    let head = if c.head.is_empty() {
        "none named".to_string()
    } else {
        c.head.join(", ")
    };
    writeln!(
        w,
        "  parameters:  {} ({} in the head: {head})",
        i.parameters, i.head_parameters
    )?;
    if !c.norm.is_empty() {
        writeln!(w, "  norm params: {} tensors (TENT, adapt = \"norm\")", c.norm.len())?;
    }
    if let (Some(d), Some(check)) = (&spec.diffusion, &i.diffusion) {
        let condition = match (spec.task, d.condition) {
            (Task::Depth, _) => format!(
                "condition: the depth map, concatenated, normalised from {}..{} m",
                d.depth_min.unwrap_or_default(),
                d.depth_max.unwrap_or_default()
            ),
            (_, Condition::Concat) => format!(
                "condition: per-pixel class-embedding mixtures, concatenated, class embeddings {:?}",
                check.embeddings_shape
            ),
            (_, Condition::Mixture) => format!("class embeddings {:?}", check.embeddings_shape),
        };
        writeln!(
            w,
            "  diffusion:   {} ({} parameters): z0 {:?}, {condition} (checked with one forward)",
            d.denoiser, check.parameters, check.latent_shape
        )?;
        let encoder = d.encoder.as_deref().map_or("none (pixel space)".to_string(), |e| {
            format!("{e}, latent_scale {}", d.latent_scale)
        });
        writeln!(w, "  encoder:     {encoder}")?;
        writeln!(
            w,
            "  gen view:    {} channel(s) at {}x{} in [-1, 1]; schedule {:?} {}..{} over {} steps",
            d.channels,
            d.resolution,
            d.resolution,
            d.schedule.kind,
            d.schedule.beta_start,
            d.schedule.beta_end,
            d.schedule.steps
        )?;
    }
    if !spec.prompt_templates.is_empty() {
        writeln!(
            w,
            "  vocabulary:  {} class names as text, template(s) {:?} (tools/export_clip_sd.py)",
            spec.class_names.len(),
            spec.prompt_templates
        )?;
    }
    if spec.class_names.is_empty() {
        writeln!(w, "  classes:     {} (unnamed)", c.num_classes)
    } else {
        let shown: Vec<&str> = spec.class_names.iter().take(20).map(String::as_str).collect();
        let more = spec.class_names.len().saturating_sub(shown.len());
        let tail = if more > 0 {
            format!(" ... and {more} more")
        } else {
            String::new()
        };
        writeln!(w, "  classes:     {}{tail}", shown.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_spec() -> BundleSpec {
        toml::from_str(include_str!("../../configs/bundles/demo-mnist/bundle.toml")).unwrap()
    }

    /// What inspecting `spec` as the demo bundle on the CPU finds, without diffusion.
    fn checked(spec: &BundleSpec) -> Inspection<'_> {
        Inspection {
            spec,
            source: "configs/bundles/demo-mnist",
            sha256: "e25fa978203e0365277dae552430e1b5e85e1352f609484f1990335517b0cc04",
            device: "cpu".into(),
            input_shape: [1, 1, 28, 28],
            output_shape: vec![1, 10],
            parameters: 24058,
            head_parameters: 650,
            diffusion: None,
        }
    }

    /// The demo bundle's loaded diffusion model: ten class embeddings of 64.
    fn denoiser(parameters: i64, latent_shape: Vec<i64>) -> Option<DiffusionCheck> {
        Some(DiffusionCheck {
            parameters,
            latent_shape,
            embeddings_shape: vec![10, 64],
        })
    }

    fn text(i: &Inspection) -> String {
        let mut buf = Vec::new();
        write_inspection(&mut buf, i).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn inspection_of_the_demo_bundle() {
        let spec = demo_spec();
        let inspection = Inspection {
            diffusion: denoiser(247568, vec![1, 32, 32]),
            ..checked(&spec)
        };
        assert_eq!(
            text(&inspection),
            r#"bundle demo-mnist (configs/bundles/demo-mnist)
  sha256:      e25fa978203e0365277dae552430e1b5e85e1352f609484f1990335517b0cc04
  device:      cpu
  classifier:  classifier.pt: input [1, 1, 28, 28] -> logits [1, 10] (checked with one forward)
  preprocess:  1 channel(s), resize shorter side 28, center crop 28, mean [0.5], std [0.5]
  parameters:  24058 (650 in the head: fc.weight, fc.bias)
  norm params: 6 tensors (TENT, adapt = "norm")
  diffusion:   denoiser.pt (247568 parameters): z0 [1, 32, 32], class embeddings [10, 64] (checked with one forward)
  encoder:     none (pixel space)
  gen view:    1 channel(s) at 32x32 in [-1, 1]; schedule Linear 0.0001..0.02 over 1000 steps
  classes:     0, 1, 2, 3, 4, 5, 6, 7, 8, 9
"#
        );
    }

    #[test]
    fn inspection_without_diffusion_head_or_class_names() {
        let mut spec = demo_spec();
        spec.diffusion = None;
        spec.classifier.head.clear();
        spec.classifier.norm.clear();
        spec.class_names.clear();
        let out = text(&Inspection {
            head_parameters: 0,
            ..checked(&spec)
        });
        assert!(
            out.contains("  parameters:  24058 (0 in the head: none named)\n"),
            "{out}"
        );
        assert!(out.ends_with("  classes:     10 (unnamed)\n"), "{out}");
        assert!(!out.contains("norm params") && !out.contains("diffusion:"), "{out}");
    }

    #[test]
    fn an_encoder_is_named_with_its_latent_scale() {
        let mut spec = demo_spec();
        if let Some(d) = spec.diffusion.as_mut() {
            d.encoder = Some("vae.pt".into());
            d.latent_scale = 0.18215;
        }
        let inspection = Inspection {
            diffusion: denoiser(1, vec![4, 32, 32]),
            ..checked(&spec)
        };
        assert!(text(&inspection).contains("  encoder:     vae.pt, latent_scale 0.18215\n"));
    }

    #[test]
    fn long_class_lists_are_cut_at_twenty() {
        let mut spec = demo_spec();
        spec.class_names = (0..25).map(|i| format!("c{i}")).collect();
        assert!(text(&checked(&spec)).ends_with(", c18, c19 ... and 5 more\n"));
    }
}
