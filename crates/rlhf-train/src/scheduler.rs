//! Learning-rate schedules as transformers' `get_scheduler` builds them: a `LambdaLR` whose
//! multiplier is a function of the number of optimiser steps already taken.
//!
//! Step numbering: update `k` (0-based; the k-th call of `optimizer.step()`) uses
//! `base_lr · lambda(k)`, because transformers calls `lr_scheduler.step()` after
//! `optimizer.step()`. [`LrScheduler::lr_at`] gives that rate. What transformers *logs* as
//! `learning_rate` at global step `s` is, since transformers 4.51 (PR #36973, "Log the correct
//! learning rate"), the rate read before the scheduler stepped, i.e. the one update `s - 1`
//! used: [`LrScheduler::logged_lr`]. (Before 4.51 it logged `lambda(s)`, the next step's rate.)

use crate::{Error, Result};

/// The schedule names this crate implements (transformers' `SchedulerType` values).
pub const KINDS: &[&str] = &["constant", "constant_with_warmup", "linear", "cosine"];

/// transformers' other schedule names, so the error can say "not implemented here" rather
/// than "unknown".
const NOT_IMPLEMENTED: &[&str] = &[
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
];

/// The number of warmup steps, as transformers computes it. `warmup_steps >= 1` is a count
/// (truncated, as `int()` does); `0 < warmup_steps < 1` is a fraction of `total_steps`
/// (transformers 5 reads it so); otherwise `warmup_ratio` is the fraction (transformers 4's
/// separate argument). A fraction gives `ceil(total_steps · fraction)`, in f64 like Python:
/// `0.07` of 100 steps is 8 warmup steps, since 100 · 0.07 = 7.000000000000001.
pub fn warmup_steps(warmup_steps: f64, warmup_ratio: f64, total_steps: usize) -> usize {
    if warmup_steps >= 1.0 {
        warmup_steps as usize
    } else if warmup_steps > 0.0 {
        (total_steps as f64 * warmup_steps).ceil() as usize
    } else {
        (total_steps as f64 * warmup_ratio.max(0.0)).ceil() as usize
    }
}

/// A learning-rate schedule: `base_lr` times transformers' `lr_lambda` of the step.
#[derive(Debug, Clone, PartialEq)]
pub struct LrScheduler {
    kind: Kind,
    base_lr: f64,
    warmup: usize,
    total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl LrScheduler {
    /// A schedule of `kind` (one of [`KINDS`]) peaking at `base_lr`, warming up linearly from
    /// 0 over `warmup_steps` steps (see [`warmup_steps`]) and, for `linear` and `cosine`,
    /// reaching 0 at `total_steps`. `constant` ignores the warmup, as transformers' does.
    pub fn new(kind: &str, base_lr: f64, warmup_steps: usize, total_steps: usize) -> Result<Self> {
        let k = match kind {
            "constant" => Kind::Constant,
            "constant_with_warmup" => Kind::ConstantWithWarmup,
            "linear" => Kind::Linear,
            "cosine" => Kind::Cosine,
            other => {
                let expected = if NOT_IMPLEMENTED.contains(&other) {
                    format!(
                        "one of {} (transformers' {other:?} is not implemented in rlhf-rs)",
                        KINDS.join(", ")
                    )
                } else {
                    format!("one of {}", KINDS.join(", "))
                };
                return Err(Error::invalid(
                    "lr_scheduler_type",
                    format!("{other:?}"),
                    expected,
                ));
            }
        };
        if !(base_lr >= 0.0 && base_lr.is_finite()) {
            return Err(Error::invalid(
                "learning_rate",
                base_lr,
                "a finite value >= 0",
            ));
        }
        if k == Kind::Constant && warmup_steps > 0 {
            tracing::warn!(
                "lr_scheduler_type \"constant\" has no warmup (as in transformers); the \
                 {warmup_steps} warmup steps are ignored: use \"constant_with_warmup\" to warm up"
            );
        }
        Ok(Self {
            kind: k,
            base_lr,
            warmup: warmup_steps,
            total: total_steps,
        })
    }

    /// The schedule's name.
    pub fn kind(&self) -> &'static str {
        match self.kind {
            Kind::Constant => "constant",
            Kind::ConstantWithWarmup => "constant_with_warmup",
            Kind::Linear => "linear",
            Kind::Cosine => "cosine",
        }
    }

    /// The peak learning rate.
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// The multiplier after `step` optimiser steps: transformers' `lr_lambda(step)`, with its
    /// float operations in its order (so the values are bit-identical to Python's).
    pub fn lambda(&self, step: usize) -> f64 {
        let warming = self.kind != Kind::Constant && step < self.warmup;
        if warming {
            return step as f64 / self.warmup.max(1) as f64;
        }
        // transformers' `max(1, total - warmup)` on Python ints, which may go negative.
        let decay_len = (self.total as i64 - self.warmup as i64).max(1) as f64;
        match self.kind {
            Kind::Constant | Kind::ConstantWithWarmup => 1.0,
            Kind::Linear => ((self.total as i64 - step as i64) as f64 / decay_len).max(0.0),
            Kind::Cosine => {
                let progress = (step as i64 - self.warmup as i64) as f64 / decay_len;
                // num_cycles = 0.5; `math.pi * float(num_cycles) * 2.0 * progress`.
                let angle = std::f64::consts::PI * 0.5 * 2.0 * progress;
                (0.5 * (1.0 + angle.cos())).max(0.0)
            }
        }
    }

    /// The learning rate of the update made after `step` optimiser steps (update `step`,
    /// 0-based): what to pass to [`AdamW::step`](crate::optim::AdamW::step).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.lambda(step)
    }

    /// What transformers (>= 4.51) logs as `learning_rate` at global step `global_step` (the
    /// optimiser steps taken, counting the one just made): the rate that last update used,
    /// `lr_at(global_step - 1)`. At step 0, before any update, the first update's rate.
    pub fn logged_lr(&self, global_step: usize) -> f64 {
        self.lr_at(global_step.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal to within 4 ulps (the values are bit-identical with glibc's `cos`; other libms
    /// may differ in the last bit).
    fn close(a: f64, b: f64) -> bool {
        a == b || (a - b).abs() <= 1e-15 * b.abs()
    }

    const STEPS_USED: [(&str, [f64; 13]); 4] = [
        ("constant", [1e-3; 13]),
        (
            "constant_with_warmup",
            [
                0.0,
                0.0003333333333333333,
                0.0006666666666666666,
                0.001,
                0.001,
                0.001,
                0.001,
                0.001,
                0.001,
                0.001,
                0.001,
                0.001,
                0.001,
            ],
        ),
        (
            "linear",
            [
                0.0,
                0.0003333333333333333,
                0.0006666666666666666,
                0.001,
                0.0008571428571428571,
                0.0007142857142857143,
                0.0005714285714285714,
                0.00042857142857142855,
                0.0002857142857142857,
                0.00014285714285714284,
                0.0,
                0.0,
                0.0,
            ],
        ),
        (
            "cosine",
            [
                0.0,
                0.0003333333333333333,
                0.0006666666666666666,
                0.001,
                0.0009504844339512095,
                0.0008117449009293668,
                0.0006112604669781572,
                0.00038873953302184284,
                0.00018825509907063325,
                4.9515566048790485e-05,
                0.0,
                4.951556604879043e-05,
                0.00018825509907063315,
            ],
        ),
    ];

    /// The rate each update uses, from transformers 5.23.0 / torch 2.15.0:
    /// ```python
    /// import torch
    /// from transformers import get_scheduler
    /// for kind in ["constant", "constant_with_warmup", "linear", "cosine"]:
    ///     opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ///     sch = get_scheduler(kind, opt, num_warmup_steps=3, num_training_steps=10)
    ///     used = []
    ///     for k in range(13):
    ///         used.append(opt.param_groups[0]["lr"])  # the lr update k uses
    ///         opt.step(); sch.step()
    ///     print(kind, used)
    /// ```
    /// Steps 10-12 run past `num_training_steps` (cosine climbs back, as transformers' does).
    #[test]
    fn lr_at_is_the_rate_transformers_uses() {
        for (kind, want) in STEPS_USED {
            let s = LrScheduler::new(kind, 1e-3, 3, 10).unwrap();
            assert_eq!(s.kind(), kind);
            for (k, w) in want.iter().enumerate() {
                assert!(
                    close(s.lr_at(k), *w),
                    "{kind} update {k}: {} vs {w}",
                    s.lr_at(k)
                );
            }
        }
    }

    /// What a real Trainer run logs, transformers 5.23.0 / torch 2.15.0:
    /// ```python
    /// import tempfile, torch
    /// from transformers import Trainer, TrainingArguments
    /// class Tiny(torch.nn.Module):
    ///     def __init__(self):
    ///         super().__init__(); self.w = torch.nn.Parameter(torch.ones(2))
    ///     def forward(self, x, labels=None):
    ///         return {"loss": ((self.w * x).sum(-1) - labels).pow(2).mean()}
    /// data = [{"x": torch.tensor([1.0, float(i)]), "labels": torch.tensor(0.5)} for i in range(64)]
    /// for kind in ["linear", "cosine", "constant_with_warmup"]:
    ///     args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=10, warmup_steps=3,
    ///                              lr_scheduler_type=kind, learning_rate=1e-3, logging_steps=1,
    ///                              per_device_train_batch_size=2, report_to=[], use_cpu=True,
    ///                              save_strategy="no")
    ///     tr = Trainer(model=Tiny(), args=args, train_dataset=data)
    ///     tr.train()
    ///     print(kind, [(h["step"], h["learning_rate"])
    ///                  for h in tr.state.log_history if "learning_rate" in h])
    /// ```
    /// It logged, at steps 1..=10, exactly `used[0..10]` of the test above: the rate of the
    /// update just made, not the next one.
    #[test]
    fn logged_lr_is_what_the_trainer_logs() {
        for (kind, used) in STEPS_USED.iter().skip(1) {
            let s = LrScheduler::new(kind, 1e-3, 3, 10).unwrap();
            for step in 1..=10 {
                let want = used[step - 1];
                assert!(close(s.logged_lr(step), want), "{kind} log at {step}");
            }
        }
    }

    /// transformers 5.23.0 `TrainingArguments(output_dir=tempfile.mkdtemp(), warmup_steps=ws,
    /// report_to=[]).get_warmup_steps(total)` for each (ws, total) below.
    #[test]
    fn warmup_steps_match_transformers() {
        let cases = [
            (0.1, 30, 3),
            (0.05, 100, 5),
            (0.03, 1000, 30),
            (0.5, 7, 4),
            (5.0, 100, 5),
            (0.0, 100, 0),
            (2.7, 10, 2),
            (0.07, 100, 8),
            (0.14, 50, 8),
        ];
        for (ws, total, want) in cases {
            assert_eq!(
                warmup_steps(ws, 0.0, total),
                want,
                "warmup_steps={ws} of {total}"
            );
            if ws < 1.0 {
                // transformers 4's `warmup_ratio` (warmup_steps=0) is the same rule.
                assert_eq!(warmup_steps(0.0, ws, total), want, "warmup_ratio={ws}");
            }
        }
        // An explicit count wins over the ratio, as in transformers 4.
        assert_eq!(warmup_steps(7.0, 0.5, 100), 7);
    }

    #[test]
    fn unknown_kinds_list_the_valid_ones() {
        let e = LrScheduler::new("cosine_annealing", 1e-3, 0, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("\"lr_scheduler_type\" must be one of")
                && e.ends_with("found \"cosine_annealing\""),
            "{e}"
        );
        for k in KINDS {
            assert!(e.contains(k), "{e}");
        }
        let e = LrScheduler::new("polynomial", 1e-3, 0, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not implemented in rlhf-rs"), "{e}");
        assert!(LrScheduler::new("linear", f64::NAN, 0, 10).is_err());
    }

    /// Degenerate lengths give transformers' values, never NaN or a negative rate.
    #[test]
    fn degenerate_lengths() {
        // warmup longer than the run: `max(1, total - warmup)` guards the division.
        let s = LrScheduler::new("linear", 1.0, 5, 2).unwrap();
        assert_eq!(s.lr_at(1), 0.2);
        assert_eq!(s.lr_at(5), 0.0);
        assert_eq!(s.lr_at(9), 0.0);
        for kind in KINDS {
            let s = LrScheduler::new(kind, 1.0, 0, 0).unwrap();
            for k in 0..4 {
                let lr = s.lr_at(k);
                assert!(lr.is_finite() && lr >= 0.0, "{kind} {k}: {lr}");
            }
        }
        // `constant` ignores warmup, like transformers' get_constant_schedule.
        assert_eq!(
            LrScheduler::new("constant", 1.0, 5, 10).unwrap().lr_at(0),
            1.0
        );
    }
}
