//! `simulate`: a generator for demos, tests and benchmarks. It sleeps, then
//! reports a cost of `reserved × cost_factor`, or fails at a given rate. The
//! item's payload may override any setting under a `simulate` key:
//!
//! ```json
//! {"simulate": {"latency_ms": 20, "cost_factor": 0.5, "actual_cost": 7,
//!               "report_cost": true, "fail": false, "failure_rate": 0.1,
//!               "transient_failures": 2, "panic": false}}
//! ```
//!
//! `transient_failures: n` fails the first `n` attempts in this process
//! transiently (to exercise retries); `panic: true` crashes the generator.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use holdfast_common::messages::ItemJob;
use rand::Rng;
use serde_json::Value;

use crate::generator::{Generated, Generator, GeneratorError};

/// Defaults for every item; the payload overrides them.
#[derive(Clone, Debug)]
pub struct SimulateSettings {
    pub latency: Duration,
    pub cost_factor: f64,
    pub failure_rate: f64,
}

impl Default for SimulateSettings {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            cost_factor: 1.0,
            failure_rate: 0.0,
        }
    }
}

/// The simulate generator.
pub struct Simulate {
    settings: SimulateSettings,
    attempts: Mutex<HashMap<String, u32>>,
}

impl Simulate {
    pub fn new(settings: SimulateSettings) -> Self {
        Self {
            settings,
            attempts: Mutex::new(HashMap::new()),
        }
    }
}

fn knob<'a>(job: &'a ItemJob, key: &str) -> Option<&'a Value> {
    job.payload.get("simulate").and_then(|s| s.get(key))
}

#[async_trait]
impl Generator for Simulate {
    fn name(&self) -> &str {
        "simulate"
    }

    async fn generate(&self, job: &ItemJob) -> Result<Generated, GeneratorError> {
        let latency = knob(job, "latency_ms")
            .and_then(Value::as_u64)
            .map(Duration::from_millis)
            .unwrap_or(self.settings.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if knob(job, "panic").and_then(Value::as_bool) == Some(true) {
            panic!("simulated generator crash for {}", job.message_id());
        }
        if let Some(n) = knob(job, "transient_failures").and_then(Value::as_u64) {
            // A panic elsewhere never leaves the map half-written: use it as it is.
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            let seen = attempts.entry(job.message_id()).or_insert(0);
            *seen += 1;
            if u64::from(*seen) <= n {
                return Err(GeneratorError::Transient(format!(
                    "simulated transient failure {seen} of {n}"
                )));
            }
        }
        if knob(job, "fail").and_then(Value::as_bool) == Some(true) {
            return Err(GeneratorError::Permanent("simulated failure".into()));
        }
        let rate = knob(job, "failure_rate")
            .and_then(Value::as_f64)
            .unwrap_or(self.settings.failure_rate);
        if rate > 0.0 && rand::rng().random_bool(rate.clamp(0.0, 1.0)) {
            return Err(GeneratorError::Permanent("simulated random failure".into()));
        }
        if knob(job, "report_cost").and_then(Value::as_bool) == Some(false) {
            return Ok(Generated {
                actual_cost: None,
                output: None,
            });
        }
        let cost = match knob(job, "actual_cost").and_then(Value::as_i64) {
            Some(c) => c,
            None => {
                let factor = knob(job, "cost_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(self.settings.cost_factor);
                (job.reserved as f64 * factor).round() as i64
            }
        };
        Ok(Generated {
            actual_cost: Some(cost),
            output: None,
        })
    }
}
