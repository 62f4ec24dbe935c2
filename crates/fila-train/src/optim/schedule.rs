//! The learning-rate schedule.

use crate::config::ScheduleConfig;

/// Learning rate at an optimizer step: linear warmup from 0, then cosine down to
/// `min_lr_ratio × peak` — Hugging Face's `get_cosine_with_min_lr_schedule_with_warmup`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_lr_ratio: f64,
}

impl Schedule {
    pub fn new(peak: f64, config: &ScheduleConfig, total_steps: u64) -> Self {
        // HF: warmup = ceil(ratio × total).
        let warmup_steps = config.warmup_steps.unwrap_or_else(|| (config.warmup_ratio * total_steps as f64).ceil() as u64);
        Self { peak, warmup_steps, total_steps, min_lr_ratio: config.min_lr_ratio }
    }

    /// `step`: optimizer steps already taken (0 for the first update).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let progress = (step - self.warmup_steps) as f64 / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
        self.peak * (cosine * (1.0 - self.min_lr_ratio) + self.min_lr_ratio)
    }
}
