//! Adaptive compute (ALGORITHM.md, "Adaptive compute"): `[tta.budget]` and the per-image
//! [`Gate`] that decides whether an image is adapted, and when its adaptation stops.
//!
//! Every option is off by default; with all of them off a gate never fires, so results
//! are those of the ungated loop. A method uses a gate like this:
//!
//! ```text
//! let mut gate = cfg.budget.start(&before);          // Some(Confident): do not adapt
//! for step in 0..steps {
//!     if let Some(why) = gate.before_step(step_cost) { stop = why; break }   // budget
//!     ... run the step, gate.charge(passes) for every denoiser forward ...
//!     match gate.after_update(step, steps, || predict())? {   // stable_steps
//!         AfterUpdate::Continue => {}
//!         AfterUpdate::Stop(why) => { stop = why; break }
//!         AfterUpdate::Diverged(why) => { diverged = why; break }
//!     }
//! }
//! let after = gate.take_prediction().unwrap_or_else(|| predict());
//! ```
//!
//! Denoiser evaluations are counted per image: one per (t, eps) pair (and per class
//! condition, for methods that score several) that goes through the denoiser's forward,
//! whether pairs run one at a time or batched together.

use serde::{Deserialize, Serialize};

use super::Prediction;

/// `[tta.budget]`: per-image adaptive compute for episodic adaptation. All off by default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Do not adapt an image whose source top-1 probability is at least this (0..=1):
    /// its after-prediction is the source's, with 0 steps and 0 denoiser evaluations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_conf: Option<f32>,
    /// Stop once the prediction has stayed the same for this many consecutive steps.
    /// Precisely: with p_0 the before-prediction (the source's top-1) and p_s the top-1
    /// of the classifier after the s-th optimizer step, adaptation stops after step s
    /// when p_s = p_(s-1) = ... = p_(s-n), n = `stable_steps`: so with 2 it stops after
    /// step 2 at the earliest, when neither update changed the source's answer. Costs
    /// one extra classifier forward per step (no denoiser pass); the last one is the
    /// after-prediction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable_steps: Option<u32>,
    /// Cap on denoiser evaluations per image: a step that would take the image past it
    /// is not started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_evals: Option<u64>,
}

/// What one step of the configured method costs, for checking a budget against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCost {
    /// Optimizer steps per image.
    pub steps: usize,
    /// Denoiser evaluations of one step.
    pub evals: u64,
}

impl BudgetConfig {
    /// Whether every option is off (the gate never fires).
    pub fn is_off(&self) -> bool {
        *self == BudgetConfig::default()
    }

    /// Checks the values against the configured method: `cost` is what one step of it
    /// costs, or why the method takes no budget. Returns the offending key.
    pub fn validate(&self, cost: Result<StepCost, String>) -> Result<(), (&'static str, String)> {
        if self.is_off() {
            return Ok(());
        }
        let cost = cost.map_err(|why| ("tta.budget", why))?;
        if let Some(c) = self.skip_conf {
            if !(0.0..=1.0).contains(&c) {
                return Err(("tta.budget.skip_conf", format!("{c} must be a probability in 0..=1")));
            }
        }
        if let Some(n) = self.stable_steps {
            if n == 0 {
                return Err(("tta.budget.stable_steps", "must be at least 1".into()));
            }
            if n as usize >= cost.steps {
                return Err((
                    "tta.budget.stable_steps",
                    format!(
                        "{n} must be smaller than the {} step(s) per image: it could never stop adaptation early",
                        cost.steps
                    ),
                ));
            }
        }
        if let Some(m) = self.max_evals {
            if m < cost.evals {
                return Err((
                    "tta.budget.max_evals",
                    format!(
                        "{m} is less than one step's {} denoiser evaluations: no image would be adapted \
                         (use tta.budget.skip_conf = 0.0 to adapt none)",
                        cost.evals
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The gate of one image, given its source prediction.
    pub fn start(&self, before: &Prediction) -> Gate {
        let confident = self.skip_conf.is_some_and(|c| before.conf >= c);
        Gate {
            stable_steps: self.stable_steps,
            max_evals: self.max_evals,
            evals: 0,
            last_pred: before.class,
            unchanged: 0,
            skip: confident.then_some(StopReason::Confident),
            prediction: None,
        }
    }
}

/// Why an image's adaptation ended before its configured steps: the `stop_reason` column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// Every configured step ran (or the method has no steps).
    #[default]
    None,
    /// `skip_conf`: the source was confident enough; not adapted.
    Confident,
    /// `stable_steps`: the prediction stopped changing.
    Stable,
    /// `max_evals`: the next step would have exceeded the cap.
    Budget,
    /// The loss (or the adapted prediction) became non-finite; the source prediction is kept.
    Diverged,
}

impl StopReason {
    pub const ALL: [StopReason; 5] = [
        StopReason::None,
        StopReason::Confident,
        StopReason::Stable,
        StopReason::Budget,
        StopReason::Diverged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::None => "none",
            StopReason::Confident => "confident",
            StopReason::Stable => "stable",
            StopReason::Budget => "budget",
            StopReason::Diverged => "diverged",
        }
    }
}

/// What the gate decides after an optimizer step ([`Gate::after_update`]).
#[derive(Debug, Clone, PartialEq)]
pub enum AfterUpdate {
    Continue,
    /// Stop adapting this image, for this reason.
    Stop(StopReason),
    /// The updated classifier's prediction is not finite: keep the source answer.
    Diverged(String),
}

/// The per-image state of [`BudgetConfig`]: denoiser evaluations spent and the
/// prediction's run of unchanged steps. Decides; the method's loop acts.
#[derive(Debug, Clone)]
pub struct Gate {
    stable_steps: Option<u32>,
    max_evals: Option<u64>,
    evals: u64,
    /// The latest top-1 seen (the before-prediction at first).
    last_pred: i64,
    /// Consecutive steps after which the top-1 was `last_pred` unchanged.
    unchanged: u32,
    skip: Option<StopReason>,
    /// The prediction after the latest update, when `stable_steps` asked for it.
    prediction: Option<Prediction>,
}

impl Gate {
    /// `Some(Confident)` when the image must not be adapted at all.
    pub fn skip(&self) -> Option<StopReason> {
        self.skip
    }

    /// Before a step that will cost `step_evals` denoiser evaluations: `Some(Budget)`
    /// when it would take the image past `max_evals` (do not start it).
    pub fn before_step(&self, step_evals: u64) -> Option<StopReason> {
        let over = self.max_evals.is_some_and(|m| self.evals + step_evals > m);
        over.then_some(StopReason::Budget)
    }

    /// Counts denoiser evaluations spent.
    pub fn charge(&mut self, evals: u64) {
        self.evals += evals;
    }

    /// After a step, with the classifier's top-1 after its update: `Some(Stable)` when
    /// the prediction has now stayed the same for `stable_steps` consecutive steps.
    pub fn after_step(&mut self, pred: i64) -> Option<StopReason> {
        if pred == self.last_pred {
            self.unchanged += 1;
        } else {
            self.last_pred = pred;
            self.unchanged = 0;
        }
        let stable = self.stable_steps.is_some_and(|n| self.unchanged >= n);
        stable.then_some(StopReason::Stable)
    }

    /// After optimizer step `step` (0-based) of `steps`. When `stable_steps` is set it
    /// runs `predict` (the classifier as just updated: one forward, no denoiser pass) and
    /// decides; otherwise it continues without predicting. A stop that would fire at the
    /// last step saves nothing, so it does not fire there. The prediction is kept for
    /// [`Gate::take_prediction`]: when the loop stops here, it is the after-prediction.
    pub fn after_update<E>(
        &mut self,
        step: usize,
        steps: usize,
        predict: impl FnOnce() -> Result<Prediction, E>,
    ) -> Result<AfterUpdate, E> {
        if !self.wants_step_predictions() {
            return Ok(AfterUpdate::Continue);
        }
        let now = predict()?;
        if !now.conf.is_finite() {
            return Ok(AfterUpdate::Diverged(format!(
                "prediction became {} after step {step}; source prediction kept",
                now.conf
            )));
        }
        let fired = self.after_step(now.class);
        self.prediction = Some(now);
        Ok(match fired.filter(|_| step + 1 < steps) {
            Some(reason) => AfterUpdate::Stop(reason),
            None => AfterUpdate::Continue,
        })
    }

    /// The prediction of the latest [`Gate::after_update`] that predicted, if any.
    pub fn take_prediction(&mut self) -> Option<Prediction> {
        self.prediction.take()
    }

    /// Whether the method must know the prediction after every step (`stable_steps` set).
    pub fn wants_step_predictions(&self) -> bool {
        self.stable_steps.is_some()
    }

    /// Denoiser evaluations charged so far.
    pub fn evals(&self) -> u64 {
        self.evals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(class: i64, conf: f32) -> Prediction {
        Prediction {
            class,
            conf,
            topk: vec![class],
            topk_probs: vec![conf],
        }
    }

    const COST: StepCost = StepCost { steps: 5, evals: 32 };

    #[test]
    fn an_empty_budget_never_fires() {
        let b = BudgetConfig::default();
        assert!(b.is_off());
        assert_eq!(b.validate(Err("no budget here".into())), Ok(()));
        let mut g = b.start(&pred(3, 1.0));
        assert_eq!(g.skip(), None);
        for _ in 0..100 {
            assert_eq!(g.before_step(1 << 40), None);
            g.charge(1 << 40);
            assert_eq!(g.after_step(3), None);
        }
        assert!(!g.wants_step_predictions());
    }

    #[test]
    fn skip_conf_skips_at_and_above_the_threshold() {
        let b = BudgetConfig {
            skip_conf: Some(0.9),
            ..Default::default()
        };
        assert_eq!(b.start(&pred(1, 0.9)).skip(), Some(StopReason::Confident));
        assert_eq!(b.start(&pred(1, 0.95)).skip(), Some(StopReason::Confident));
        assert_eq!(b.start(&pred(1, 0.899)).skip(), None);
        let all = BudgetConfig {
            skip_conf: Some(0.0),
            ..Default::default()
        };
        assert_eq!(all.start(&pred(1, 0.0)).skip(), Some(StopReason::Confident));
    }

    #[test]
    fn max_evals_refuses_the_step_that_would_exceed_it() {
        let b = BudgetConfig {
            max_evals: Some(100),
            ..Default::default()
        };
        let mut g = b.start(&pred(0, 0.5));
        for _ in 0..3 {
            assert_eq!(g.before_step(32), None);
            g.charge(32);
        }
        assert_eq!(g.evals(), 96);
        assert_eq!(g.before_step(32), Some(StopReason::Budget));
        assert_eq!(g.before_step(4), None, "a step that fits exactly is allowed");
    }

    #[test]
    fn stable_counts_unchanged_steps_from_the_before_prediction() {
        let b = BudgetConfig {
            stable_steps: Some(2),
            ..Default::default()
        };
        // p0 = 7 (before); p1 = 7, p2 = 7: stop after step 2.
        let mut g = b.start(&pred(7, 0.5));
        assert!(g.wants_step_predictions());
        assert_eq!(g.after_step(7), None);
        assert_eq!(g.after_step(7), Some(StopReason::Stable));
        // p1 = 2 changes the answer: the run restarts at p1; p2 = p3 = 2 stops after step 3.
        let mut g = b.start(&pred(7, 0.5));
        assert_eq!(g.after_step(2), None);
        assert_eq!(g.after_step(2), None);
        assert_eq!(g.after_step(2), Some(StopReason::Stable));
        // Flip-flopping never stops.
        let mut g = b.start(&pred(7, 0.5));
        for p in [1, 7, 1, 7, 1, 7] {
            assert_eq!(g.after_step(p), None);
        }
    }

    #[test]
    fn validation_names_the_key() {
        let with = |b: BudgetConfig, cost| b.validate(cost).map_err(|(k, m)| format!("{k}: {m}"));
        let skip = |c| BudgetConfig {
            skip_conf: Some(c),
            ..Default::default()
        };
        assert!(with(skip(0.9), Ok(COST)).is_ok());
        assert!(with(skip(0.0), Ok(COST)).is_ok());
        assert!(with(skip(1.5), Ok(COST))
            .unwrap_err()
            .starts_with("tta.budget.skip_conf"));
        assert!(with(skip(f32::NAN), Ok(COST))
            .unwrap_err()
            .starts_with("tta.budget.skip_conf"));
        let err = with(skip(0.9), Err("online mode: not per image".into())).unwrap_err();
        assert_eq!(err, "tta.budget: online mode: not per image");
        let stable = |n| BudgetConfig {
            stable_steps: Some(n),
            ..Default::default()
        };
        assert!(with(stable(4), Ok(COST)).is_ok());
        assert!(with(stable(0), Ok(COST)).unwrap_err().contains("at least 1"));
        assert!(with(stable(5), Ok(COST)).unwrap_err().contains("never stop"));
        let cap = |m| BudgetConfig {
            max_evals: Some(m),
            ..Default::default()
        };
        assert!(with(cap(32), Ok(COST)).is_ok());
        let err = with(cap(31), Ok(COST)).unwrap_err();
        assert!(
            err.starts_with("tta.budget.max_evals: 31 is less than one step's 32"),
            "{err}"
        );
    }

    #[test]
    fn stop_reasons_have_stable_names() {
        let names: Vec<&str> = StopReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, ["none", "confident", "stable", "budget", "diverged"]);
        assert_eq!(StopReason::default(), StopReason::None);
    }
}
