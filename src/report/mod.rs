//! Reports: the summary over committed output and the text the command line prints.
//!
//! [`summary`] reads the predictions table's commit records and run summaries (committed data only) and writes
//! `_runs/summary.*` and `_runs/robustness.*`; [`tables`] formats `dtta summarize` and
//! `dtta plan`; [`console`] formats what `dtta run` and `dtta inspect` report; [`html`]
//! makes the `dtta report` page. Every
//! formatter writes to a `&mut impl Write` and returns its error, so a closed pipe
//! (`dtta summarize out/ | head`) reaches the caller as `ErrorKind::BrokenPipe`.
//!
//! Nothing below this module imports it: `summary` and `tables` read sink, storage,
//! sample and worker types; `console` also reads the pipeline's run report and the
//! model bundle, whose formatting is all it does with them.

pub mod console;
pub mod html;
pub mod summary;
pub mod tables;

/// A fraction as a percentage with two decimals, `n/a` when unknown.
pub fn percent(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{:.2}%", 100.0 * v))
}

#[cfg(test)]
mod tests {
    use super::percent;

    #[test]
    fn percent_has_two_decimals_or_says_na() {
        assert_eq!(percent(Some(0.98765)), "98.77%");
        assert_eq!(percent(Some(1.0)), "100.00%");
        assert_eq!(percent(None), "n/a");
    }
}
