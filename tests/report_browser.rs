//! `dtta report` end to end, checked in a real browser: a small real run (source, TENT
//! and Diffusion-TTA at a tiny budget on 24 demo digits under two corruptions), then the
//! page rendered by headless Chromium. The test fails if the page is blank, if the
//! browser's console shows anything (the page has no script, so any message is an
//! error: a blocked load, a parse problem), or if the page makes any network request.
//!
//! Requests are seen three ways: a static check that the HTML names no URL and embeds
//! nothing, the browser's network log (`--log-net-log`: every URL request the page
//! started, told apart from the browser's own background requests by the page's
//! `file://` network isolation key), and a host-resolver rule that makes every host
//! unresolvable so nothing leaves the machine even if it tried. A control page with a
//! script and a remote image must trip both browser-side detectors, so a detector that
//! stopped working fails the test instead of passing it.
//!
//! Without Chromium (`/usr/bin/chromium`, or `DTTA_CHROMIUM`) the test says so and
//! passes, unless `DTTA_REQUIRE_BROWSER` is set (`make test` sets it where `make setup`
//! installs Debian's `chromium`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The browser, or `None` (with the reason printed) when the test may skip.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("DTTA_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.exists() {
        return Some(path);
    }
    let required = std::env::var("DTTA_REQUIRE_BROWSER").is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "DTTA_REQUIRE_BROWSER is set but {} does not exist (make setup installs Debian's chromium)",
        path.display()
    );
    eprintln!(
        "SKIPPED report_browser: no browser at {} (install Debian's `chromium`, or set DTTA_CHROMIUM; \
         set DTTA_REQUIRE_BROWSER=1 to make this a failure)",
        path.display()
    );
    None
}

/// What the browser did with one page.
struct Rendered {
    png: Vec<u8>,
    /// Console messages from the browser's log.
    console: Vec<String>,
    /// URLs of requests the page started.
    requests: Vec<String>,
    log: String,
}

/// Renders `page` (a local HTML file) in headless Chromium with a fresh profile.
fn render(browser: &Path, page: &Path, work: &Path, size: (u32, u32)) -> Rendered {
    let profile = tempfile::tempdir_in(work).unwrap();
    let shot = work.join("screenshot.png");
    let netlog = work.join("netlog.json");
    let _ = std::fs::remove_file(&shot);
    let output = Command::new("timeout")
        .arg("180")
        .arg(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--log-net-log={}", netlog.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("--window-size={},{}", size.0, size.1))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium starts");
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "chromium failed ({}):\n{log}", output.status);
    let console = log
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot ({e}):\n{log}"));
    Rendered {
        png,
        console,
        requests: page_requests(&netlog),
        log,
    }
}

/// URLs of the requests a `file://` page started, from Chromium's network log. The
/// browser's own requests (time sync, accounts) carry another isolation key.
fn page_requests(netlog: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(netlog).unwrap_or_else(|e| panic!("no network log: {e}"));
    // A log cut short by the browser's exit lacks its closing brackets.
    let log: serde_json::Value = serde_json::from_str(&text)
        .or_else(|_| serde_json::from_str(&format!("{}]}}", text.trim_end().trim_end_matches(','))))
        .unwrap_or_else(|e| panic!("the network log does not parse: {e}"));
    let start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        .as_u64()
        .expect("the network log names its event types");
    let events = log["events"].as_array().expect("the network log has events");
    events
        .iter()
        .filter(|e| e["type"].as_u64() == Some(start_job))
        .filter(|e| {
            let p = &e["params"];
            let key = p["network_isolation_key"].as_str().unwrap_or("");
            let initiator = p["initiator"].as_str().unwrap_or("");
            key.contains("file://") || initiator == "null" || initiator.starts_with("file:")
        })
        .filter_map(|e| e["params"]["url"].as_str().map(str::to_string))
        .collect()
}

/// Share of pixels that are not near-white, and the number of distinct colours.
fn ink(png: &[u8]) -> (f64, usize) {
    let img = image::load_from_memory(png).expect("the screenshot is a PNG").to_rgb8();
    let total = (img.width() * img.height()) as f64;
    let inked = img.pixels().filter(|p| p.0.iter().any(|&c| c < 235)).count() as f64;
    let colours: std::collections::BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    (inked / total, colours.len())
}

fn run(pipeline: &Path, sets: &[&str]) {
    let mut args = vec!["run", pipeline.to_str().unwrap(), "--no-progress"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = run_dtta(&args);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn report_renders_in_a_real_browser_without_errors_or_requests() {
    let Some(browser) = chromium() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let shard = tmp.path().join("shard-000000.tar");
    write_demo_shard(&shard, &demo_samples()[..24]);
    let eval = tmp.path().join("eval");
    let extra = "[corrupt]\nkinds = [\"gaussian_noise\", \"contrast\"]\nseverities = [3]\n\
                 [tta]\nsteps = 2\naccum = 1\nsamples_per_step = 4\n";
    let pipeline = write_pipeline(tmp.path(), &shard.to_string_lossy(), "unused", extra);
    for method in ["source", "tent", "diffusion-tta"] {
        let url = format!("output.url={}/{method}/", eval.display());
        run(&pipeline, &[&format!("tta.method={method}"), &url]);
    }

    let page = tmp.path().join("report.html");
    let o = run_dtta(&["report", &format!("{}/", eval.display()), "-o", page.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let html = std::fs::read_to_string(&page).unwrap();

    // The numbers: three methods, three variants, every image paired for the gains.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval.join("_runs/report.json")).unwrap()).unwrap();
    let series: Vec<&str> = json["robustness"]["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(series, ["diffusion-tta", "source", "tent"], "{json:#}");
    assert_eq!(
        json["robustness"]["variants"],
        serde_json::json!(["clean", "gaussian_noise/3", "contrast/3"])
    );
    assert_eq!(json["robustness"]["reference"], "source");
    assert_eq!(json["facts"]["runs"].as_array().unwrap().len(), 3);
    assert_eq!(json["facts"]["rows"], 3 * 24 * 3);
    for gain in json["robustness"]["gains"].as_array().unwrap() {
        let pairs = if gain["variant"] == "all corrupted" { 48 } else { 24 };
        assert_eq!(gain["pairs"], pairs, "{gain}");
        assert!(gain["low"].as_f64() <= gain["mean"].as_f64() && gain["mean"].as_f64() <= gain["high"].as_f64());
    }
    assert_eq!(json["robustness"]["gains"].as_array().unwrap().len(), 2 * 4);
    let dynamics = &json["dynamics"]["series"];
    assert_eq!(dynamics[0]["series"], "diffusion-tta", "{dynamics}");
    assert_eq!(dynamics[0]["steps"].as_array().unwrap().len(), 2);
    let source_changes = &json["relabelling"]["series"][1];
    assert_eq!(
        (&source_changes["series"], &source_changes["changed"]),
        (&"source".into(), &0.into())
    );

    // The page embeds nothing and names no URL; every chart has a caption.
    let lower = html.to_lowercase();
    for banned in [
        "http://", "https://", "<script", "<link", "<img", "<iframe", "<object", "@import", "url(",
    ] {
        assert!(!lower.contains(banned), "the page contains {banned:?}");
    }
    let (charts, captions) = (html.matches("<svg").count(), html.matches("<figcaption>").count());
    assert!(charts >= 6, "{charts} charts");
    assert_eq!(charts, captions, "every chart has a caption");
    for section in [
        "Run facts",
        "Robustness",
        "Gain over",
        "Cost",
        "Adaptation dynamics",
        "Relabelling",
    ] {
        assert!(html.contains(section), "no {section:?} section");
    }

    let work = tmp.path().join("browser");
    std::fs::create_dir_all(&work).unwrap();
    let shown = render(&browser, &page, &work, (1280, 2400));
    assert!(
        shown.console.is_empty(),
        "console messages: {:?}\n{}",
        shown.console,
        shown.log
    );
    assert!(
        shown.requests.is_empty(),
        "the page made requests: {:?}",
        shown.requests
    );
    let (inked, colours) = ink(&shown.png);
    std::fs::copy(work.join("screenshot.png"), tmp.path().join("report.png")).unwrap();
    assert!(
        inked > 0.03 && colours > 20,
        "the page looks blank: {:.2}% of pixels inked, {colours} colours",
        100.0 * inked
    );
    eprintln!("report page: {:.1}% of pixels inked, {colours} colours", 100.0 * inked);

    // The control: a page with a console error and a remote image trips both detectors.
    let bad = tmp.path().join("bad.html");
    std::fs::write(
        &bad,
        "<!DOCTYPE html><html><body><p>control</p><img src=\"https://example.com/x.png\">\
         <script>console.error(\"control error\")</script></body></html>",
    )
    .unwrap();
    let control = render(&browser, &bad, &work, (400, 300));
    assert!(
        control.console.iter().any(|l| l.contains("control error")),
        "the console detector missed a console.error: {}",
        control.log
    );
    assert_eq!(
        control.requests,
        ["https://example.com/x.png"],
        "the request detector missed a remote image"
    );
    let (inked, _) = ink(&control.png);
    assert!(inked < 0.03, "a nearly empty page counts as blank: {inked}");
}
