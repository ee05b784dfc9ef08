//! Learning-rate schedules as transformers' `get_scheduler` builds them (LambdaLR over the
//! optimiser step count).

use crate::{Error, Result};

/// A learning-rate schedule.
#[derive(Debug, Clone)]
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
    /// `kind`: constant | constant_with_warmup | linear | cosine.
    pub fn new(kind: &str, base_lr: f64, warmup_steps: usize, total_steps: usize) -> Result<Self> {
        let kind = match kind {
            "constant" => Kind::Constant,
            "constant_with_warmup" => Kind::ConstantWithWarmup,
            "linear" => Kind::Linear,
            "cosine" => Kind::Cosine,
            other => {
                return Err(Error::Config(format!(
                "lr_scheduler_type {other:?}: use constant, constant_with_warmup, linear or cosine"
            )))
            }
        };
        Ok(Self {
            kind,
            base_lr,
            warmup: warmup_steps,
            total: total_steps,
        })
    }

    /// The multiplier after `step` optimiser steps (transformers' lr_lambda(step)).
    pub fn lambda(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        // transformers' `constant` ignores warmup entirely.
        if self.kind != Kind::Constant && step < self.warmup {
            return s / w.max(1.0);
        }
        match self.kind {
            Kind::Constant | Kind::ConstantWithWarmup => 1.0,
            Kind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Kind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * progress).cos())).max(0.0)
            }
        }
    }

    /// The rate of the update made after `step` steps; also what transformers logs as
    /// `learning_rate` at global step `step` (`get_last_lr()` after the scheduler stepped).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.lambda(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values: transformers 5.23 `get_scheduler(kind, optimizer(lr=1e-3),
    /// num_warmup_steps=3, num_training_steps=10)`, reading `scheduler.get_last_lr()[0]` after
    /// 0, 1, 3, 5, 9, 10 `scheduler.step()` calls.
    #[test]
    fn schedules_match_transformers() {
        let steps = [0usize, 1, 3, 5, 9, 10];
        let cases: [(&str, [f64; 6]); 4] = [
            ("constant", [1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]),
            (
                "constant_with_warmup",
                [0.0, 3.333333333333333e-4, 1e-3, 1e-3, 1e-3, 1e-3],
            ),
            (
                "linear",
                [
                    0.0,
                    3.333333333333333e-4,
                    1e-3,
                    7.142857142857143e-4,
                    1.4285714285714284e-4,
                    0.0,
                ],
            ),
            (
                "cosine",
                [
                    0.0,
                    3.333333333333333e-4,
                    1e-3,
                    8.117449009293668e-4,
                    4.9515566048790485e-5,
                    0.0,
                ],
            ),
        ];
        for (kind, want) in cases {
            let s = LrScheduler::new(kind, 1e-3, 3, 10).unwrap();
            for (st, w) in steps.iter().zip(want) {
                assert!(
                    (s.lr_at(*st) - w).abs() < 1e-12,
                    "{kind} at {st}: {} vs {w}",
                    s.lr_at(*st)
                );
            }
        }
        assert!(LrScheduler::new("polynomial_decay", 1e-3, 0, 10).is_err());
    }
}
