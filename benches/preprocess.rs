//! Decode + preprocess throughput of dtta on real JPEGs, per core, and the error of the
//! reduced-scale (DCT-domain) decode against the full-scale path.
//!
//! ```text
//! cargo bench --bench preprocess -- [--photos DIR] [--out FILE] [--pil-out DIR] [--min-time SECONDS]
//! ```
//!
//! DIR (default `$DTTA_BENCH_PHOTOS`, else `target/bench/photos`) holds one folder per size
//! class (`imagenet/`, `camera/`; any other folder of JPEGs is measured too), as written by
//! `bench/photos.py`. For each class it times, on a rayon pool of 1 and of 2 threads
//! (every thread decodes the whole set, so the work is the same on each):
//!
//! - `decode_only`: [`decode`] at full scale (the floor the pipeline is compared with);
//! - `full`: [`decode`] + [`ClassifierView::apply`], the torchvision-equivalent path;
//! - `scaled`: [`decode_for_view`] (asked for [`ClassifierView::needed_short_side`]) +
//!   [`ClassifierView::apply`], what `prepare` runs;
//! - `scaled_no_margin`: the same asked for the resize target itself, the largest DCT
//!   reduction (for comparison: faster, further from `full`).
//!
//! Images/s per core is images over the CPU seconds of the pool's threads (median of 5
//! trials, all cases interleaved), so other load on a shared machine does not count;
//! wall-clock images/s is reported beside it for the 1 -> 2 thread scaling. The view is
//! ImageNet's: Resize(232) bilinear + CenterCrop(224) + Normalize, RGB.
//!
//! It also reports, per class, the difference of each scaled pipeline from `full` (max
//! and mean absolute, in normalised units and in 8-bit levels), and, when
//! `bench/pil_preprocess.py` left its tensors in `--pil-out` (default
//! `target/bench/pil_out`), of `full` and the scaled pipelines from PIL's. Results go to
//! FILE (default `target/bench/preprocess.json`) and a table to stdout;
//! `bench/report_preprocess.py` sets them beside PIL's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dtta::image::decode::{dct_reduction, decode_for_view};
use dtta::image::{decode, Channels, ClassifierView};
use serde_json::{json, Value};

const MAX_PIXELS: u64 = 1 << 30;
const TRIALS: usize = 5;
const THREADS: [usize; 2] = [1, 2];

struct Args {
    photos: PathBuf,
    out: PathBuf,
    pil_out: PathBuf,
    min_time: f64,
}

fn args() -> Args {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut a = Args {
        photos: std::env::var_os("DTTA_BENCH_PHOTOS")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/bench/photos")),
        out: root.join("target/bench/preprocess.json"),
        pil_out: root.join("target/bench/pil_out"),
        min_time: 0.2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--photos" => a.photos = value().into(),
            "--out" => a.out = value().into(),
            "--pil-out" => a.pil_out = value().into(),
            "--min-time" => a.min_time = value().parse().expect("--min-time SECONDS"),
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other}; see the top of benches/preprocess.rs"),
        }
    }
    a
}

/// The torchvision ImageNet evaluation transform.
fn imagenet_view() -> ClassifierView {
    ClassifierView {
        channels: Channels::Rgb,
        resize: 232,
        crop: 224,
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    }
}

struct Photo {
    name: String,
    bytes: Vec<u8>,
}

fn load_class(dir: &Path) -> Vec<Photo> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("jpg") || x.eq_ignore_ascii_case("jpeg"))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| Photo {
            name: p.file_stem().unwrap().to_string_lossy().into_owned(),
            bytes: std::fs::read(&p).unwrap(),
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Pipeline {
    DecodeOnly,
    Full,
    /// What `prepare` runs: [`decode_for_view`] with [`ClassifierView::needed_short_side`].
    Scaled,
    /// [`decode_for_view`] asked for the resize target itself (no margin): the largest
    /// reduction, faster and further from the full-scale path.
    ScaledNoMargin,
}

const PIPELINES: [Pipeline; 4] = [
    Pipeline::DecodeOnly,
    Pipeline::Full,
    Pipeline::Scaled,
    Pipeline::ScaledNoMargin,
];

impl Pipeline {
    fn name(self) -> &'static str {
        match self {
            Pipeline::DecodeOnly => "decode_only",
            Pipeline::Full => "full",
            Pipeline::Scaled => "scaled",
            Pipeline::ScaledNoMargin => "scaled_no_margin",
        }
    }

    /// The shorter side a scaled pipeline asks [`decode_for_view`] for.
    fn needed(self, view: &ClassifierView) -> Option<u32> {
        match self {
            Pipeline::Scaled => Some(view.needed_short_side(None)),
            Pipeline::ScaledNoMargin => Some(view.resize),
            _ => None,
        }
    }

    /// One image through the pipeline; returns something to keep the work alive.
    fn run(self, bytes: &[u8], view: &ClassifierView) -> usize {
        match (self, self.needed(view)) {
            (Pipeline::DecodeOnly, _) => decode(bytes, view.channels, MAX_PIXELS).unwrap().data.len(),
            (_, Some(needed)) => view
                .apply(&decode_for_view(bytes, view.channels, MAX_PIXELS, needed).unwrap())
                .len(),
            _ => view.apply(&decode(bytes, view.channels, MAX_PIXELS).unwrap()).len(),
        }
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid out pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// One timed run: every thread of `pool` runs `passes` passes over all `photos`.
struct Trial {
    images: usize,
    wall: f64,
    /// CPU seconds of all the pool's threads together.
    cpu: f64,
}

fn trial(pool: &rayon::ThreadPool, photos: &[Photo], p: Pipeline, view: &ClassifierView, passes: usize) -> Trial {
    let start = Instant::now();
    let cpu: Vec<f64> = pool.broadcast(|_| {
        let c0 = thread_cpu_seconds();
        let mut sink = 0usize;
        for _ in 0..passes {
            for ph in photos {
                sink = sink.wrapping_add(p.run(&ph.bytes, view));
            }
        }
        std::hint::black_box(sink);
        thread_cpu_seconds() - c0
    });
    Trial {
        images: pool.current_num_threads() * passes * photos.len(),
        wall: start.elapsed().as_secs_f64(),
        cpu: cpu.iter().sum(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times every pipeline on every pool, the trials interleaved (one trial of each in
/// turn) so that a change in the machine's load hits all of them alike.
///
/// Images/s per core is images over CPU seconds: what one core does while it runs the
/// pipeline, unaffected by time the thread spends descheduled (this runs on shared
/// machines). Wall-clock rates are reported beside it, for the scaling.
fn timings(photos: &[Photo], view: &ClassifierView, min_time: f64) -> serde_json::Map<String, Value> {
    let pools: Vec<rayon::ThreadPool> = THREADS
        .iter()
        .map(|t| rayon::ThreadPoolBuilder::new().num_threads(*t).build().unwrap())
        .collect();
    let cases: Vec<(Pipeline, usize)> = PIPELINES
        .iter()
        .flat_map(|p| (0..pools.len()).map(move |i| (*p, i)))
        .collect();
    // Warm-up trial of one pass each, which also sizes the trials.
    let passes: Vec<usize> = cases
        .iter()
        .map(|(p, i)| {
            let t = trial(&pools[*i], photos, *p, view, 1);
            ((min_time / t.wall).ceil() as usize).max(1)
        })
        .collect();
    let mut trials: Vec<Vec<Trial>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..TRIALS {
        for (k, (p, i)) in cases.iter().enumerate() {
            trials[k].push(trial(&pools[*i], photos, *p, view, passes[k]));
        }
    }
    let mut out = serde_json::Map::new();
    for (k, (p, i)) in cases.iter().enumerate() {
        let threads = THREADS[*i];
        let per_core: Vec<f64> = trials[k].iter().map(|t| t.images as f64 / t.cpu).collect();
        let wall: Vec<f64> = trials[k].iter().map(|t| t.images as f64 / t.wall).collect();
        let m = median(per_core.clone());
        let spread =
            (per_core.iter().cloned().fold(f64::MIN, f64::max) - per_core.iter().cloned().fold(f64::MAX, f64::min)) / m;
        let entry = out
            .entry(p.name().to_string())
            .or_insert_with(|| Value::Object(Default::default()));
        entry.as_object_mut().unwrap().insert(
            threads.to_string(),
            json!({
                "threads": threads,
                "images_per_s_per_core": m,
                "ms_per_image_per_core": 1e3 / m,
                "spread": spread,
                "wall_images_per_s": median(wall.clone()),
                "wall_images_per_s_per_core": median(wall.clone()) / threads as f64,
                "per_core_trials": per_core,
                "wall_trials": wall,
                "images_per_trial": trials[k][0].images,
            }),
        );
    }
    out
}

#[derive(Default)]
struct Diff {
    max_norm: f64,
    sum_norm: f64,
    max_levels: f64,
    sum_levels: f64,
    n: usize,
}

impl Diff {
    fn add(&mut self, a: &[f32], b: &[f32], std: &[f32]) {
        assert_eq!(a.len(), b.len());
        let plane = a.len() / std.len();
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let d = (*x as f64 - *y as f64).abs();
            let levels = d * std[i / plane] as f64 * 255.0;
            self.max_norm = self.max_norm.max(d);
            self.sum_norm += d;
            self.max_levels = self.max_levels.max(levels);
            self.sum_levels += levels;
        }
        self.n += a.len();
    }

    fn json(&self) -> Value {
        let n = self.n.max(1) as f64;
        json!({
            "max_abs_normalized": self.max_norm,
            "mean_abs_normalized": self.sum_norm / n,
            "max_abs_levels": self.max_levels,
            "mean_abs_levels": self.sum_levels / n,
            "values": self.n,
        })
    }
}

fn read_f32(path: &Path) -> Option<Vec<f32>> {
    let raw = std::fs::read(path).ok()?;
    Some(
        raw.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
    )
}

fn class_report(class: &str, photos: &[Photo], args: &Args) -> Value {
    let view = imagenet_view();
    let scaled: Vec<Pipeline> = PIPELINES.into_iter().filter(|p| p.needed(&view).is_some()).collect();
    let mut sizes = Vec::new();
    let mut reductions: Vec<BTreeMap<String, usize>> = vec![BTreeMap::new(); scaled.len()];
    let mut vs_full: Vec<Diff> = scaled.iter().map(|_| Diff::default()).collect();
    let mut vs_pil: Vec<Diff> = scaled.iter().map(|_| Diff::default()).collect();
    let (mut pixels, mut bytes) = (0u64, 0u64);
    let mut full_vs_pil = Diff::default();
    let mut pil_found = 0;
    for ph in photos {
        let img = decode(&ph.bytes, Channels::Rgb, MAX_PIXELS).unwrap();
        sizes.push(format!("{}x{}", img.width, img.height));
        pixels += img.width as u64 * img.height as u64;
        bytes += ph.bytes.len() as u64;
        let full = view.apply(&img);
        let pil = read_f32(&args.pil_out.join(class).join(format!("{}.f32", ph.name)));
        if let Some(pil) = &pil {
            full_vs_pil.add(&full, pil, &view.std);
            pil_found += 1;
        }
        for (i, p) in scaled.iter().enumerate() {
            let needed = p.needed(&view).unwrap();
            let reduction = dct_reduction(img.width, img.height, needed);
            *reductions[i].entry(format!("1/{reduction}")).or_default() += 1;
            let out = view.apply(&decode_for_view(&ph.bytes, Channels::Rgb, MAX_PIXELS, needed).unwrap());
            vs_full[i].add(&out, &full, &view.std);
            if let Some(pil) = &pil {
                vs_pil[i].add(&out, pil, &view.std);
            }
        }
    }
    let timings = timings(photos, &view, args.min_time);
    let mut errors = serde_json::Map::new();
    for (i, p) in scaled.iter().enumerate() {
        errors.insert(
            p.name().into(),
            json!({
                "needed_short_side": p.needed(&view).unwrap(),
                "dct_reductions": reductions[i],
                "vs_full": vs_full[i].json(),
                "vs_pil": if pil_found > 0 { vs_pil[i].json() } else { Value::Null },
            }),
        );
    }
    let n = photos.len() as f64;
    json!({
        "images": photos.len(),
        "sizes": sizes,
        "megapixels_avg": pixels as f64 / n / 1e6,
        "bits_per_pixel": 8.0 * bytes as f64 / pixels as f64,
        "timings": timings,
        "scaled_error": errors,
        "full_vs_pil": if pil_found > 0 { full_vs_pil.json() } else { Value::Null },
    })
}

fn main() {
    let args = args();
    let mut classes: Vec<String> = std::fs::read_dir(&args.photos)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (make the photos with bench/photos.py, or pass --photos / DTTA_BENCH_PHOTOS)",
                args.photos.display()
            )
        })
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // imagenet first, then camera, then anything else.
    classes.sort_by_key(|c| {
        (
            ["imagenet", "camera"].iter().position(|k| k == c).unwrap_or(2),
            c.clone(),
        )
    });
    let started = Instant::now();
    let mut report = serde_json::Map::new();
    for class in &classes {
        let photos = load_class(&args.photos.join(class));
        if photos.is_empty() {
            continue;
        }
        eprintln!("preprocess bench: {class} ({} JPEGs)", photos.len());
        report.insert(class.clone(), class_report(class, &photos, &args));
    }
    let out = json!({
        "bench": "preprocess",
        "side": "dtta",
        "photos": args.photos.display().to_string(),
        "view": {"resize": 232, "crop": 224, "interpolation": "bilinear (antialiased, PIL-style)", "normalize": "imagenet"},
        "available_parallelism": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "loadavg": std::fs::read_to_string("/proc/loadavg").ok().map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
        "seconds": started.elapsed().as_secs_f64(),
        "classes": report,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    print_table(&out);
    println!("wrote {}", args.out.display());
}

fn print_table(out: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "{:<9} {:<17} {:>7} {:>11} {:>12} {:>7} {:>11}",
        "class", "path", "threads", "img/s/core", "ms/img/core", "spread", "wall img/s"
    );
    for (class, c) in out["classes"].as_object().unwrap() {
        for (p, by_t) in c["timings"].as_object().unwrap() {
            for (t, m) in by_t.as_object().unwrap() {
                println!(
                    "{:<9} {:<17} {:>7} {:>11.1} {:>12.3} {:>6.1}% {:>11.1}",
                    class,
                    p,
                    t,
                    f(&m["images_per_s_per_core"]),
                    f(&m["ms_per_image_per_core"]),
                    100.0 * f(&m["spread"]),
                    f(&m["wall_images_per_s"])
                );
            }
        }
        for (p, e) in c["scaled_error"].as_object().unwrap() {
            let v = &e["vs_full"];
            println!(
                "{:<9} {:<17} vs full: max {:.3} mean {:.4} normalized = max {:.1} mean {:.2} 8-bit levels; reductions {}",
                class,
                p,
                f(&v["max_abs_normalized"]),
                f(&v["mean_abs_normalized"]),
                f(&v["max_abs_levels"]),
                f(&v["mean_abs_levels"]),
                e["dct_reductions"]
            );
        }
        if let Some(e) = c["full_vs_pil"].as_object() {
            println!(
                "{:<9} {:<17} vs PIL: max {:.1} mean {:.2} 8-bit levels",
                class,
                "full",
                f(&e["max_abs_levels"]),
                f(&e["mean_abs_levels"])
            );
        }
    }
}
