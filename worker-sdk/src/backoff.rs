//! Exponential backoff with jitter, for reconnection loops.

use std::time::Duration;

/// Settings of an exponential backoff.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffConfig {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Growth per failed attempt (at least 1.0).
    pub multiplier: f64,
    /// Fraction of each delay taken off at random (0.0 to 1.0): "equal
    /// jitter" at 0.5, "full jitter" at 1.0.
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { initial: Duration::from_millis(100), max: Duration::from_secs(5), multiplier: 2.0, jitter: 0.5 }
    }
}

/// The state of one backoff sequence.
#[derive(Clone, Debug)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    /// A fresh sequence.
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before the next attempt, then advances.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.delay_for(self.attempt, rand::random::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// The delay of attempt `attempt` (0-based) given a uniform random
    /// `unit` in `[0, 1)`: `min(max, initial * multiplier^attempt)` minus a
    /// random share of `jitter` of it.
    pub fn delay_for(&self, attempt: u32, unit: f64) -> Duration {
        let multiplier = self.config.multiplier.max(1.0);
        let exponent = i32::try_from(attempt.min(64)).unwrap_or(64);
        let base = self.config.initial.as_secs_f64() * multiplier.powi(exponent);
        let capped = base.min(self.config.max.as_secs_f64());
        let jitter = self.config.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        Duration::from_secs_f64((capped * (1.0 - jitter)).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_jitter_only_shortens() {
        let backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.5,
        });
        assert_eq!(backoff.delay_for(0, 0.0), Duration::from_millis(100));
        assert_eq!(backoff.delay_for(3, 0.0), Duration::from_millis(800));
        assert_eq!(backoff.delay_for(10, 0.0), Duration::from_secs(2));
        assert_eq!(backoff.delay_for(10, 0.999_999), Duration::from_secs_f64(2.0 * (1.0 - 0.5 * 0.999_999)));
        for attempt in 0..40 {
            for unit in [0.0, 0.25, 0.5, 0.99] {
                let delay = backoff.delay_for(attempt, unit);
                assert!(delay <= Duration::from_secs(2));
                assert!(delay >= Duration::from_millis(50));
            }
        }
    }

    #[test]
    fn next_delay_advances_and_reset_restarts() {
        let mut backoff = Backoff::new(BackoffConfig { jitter: 0.0, ..BackoffConfig::default() });
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
        assert_eq!(backoff.next_delay(), Duration::from_millis(200));
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }
}
