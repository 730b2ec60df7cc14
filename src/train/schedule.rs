//! The released recipe's learning rate: linear warm-up per iteration, then half-cycle cosine
//! (MAE's `adjust_learning_rate`, called with a fractional epoch).

#[derive(Clone, Debug)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub epochs: f64,
}

impl Schedule {
    /// `epoch` is fractional: `epoch + step_in_epoch / steps_per_epoch`.
    pub fn at(&self, epoch: f64) -> f64 {
        if epoch < self.warmup_epochs {
            self.lr * epoch / self.warmup_epochs
        } else {
            let span = (self.epochs - self.warmup_epochs).max(1e-12);
            self.min_lr
                + (self.lr - self.min_lr)
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * (epoch - self.warmup_epochs) / span).cos())
        }
    }
}
