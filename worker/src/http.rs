//! `http`: POST each item to a URL and read the actual cost from the answer.
//!
//! The request body is the item job as JSON (`batch_id`, `item_id`,
//! `account_id`, `reserved`, `payload`, `attempt`). A 2xx answer may carry
//! `{"actual_cost": 9}` (or `"cost"`); without it the reservation is charged.
//! 5xx, 429, timeouts and connection errors are transient (retried with
//! backoff by the worker); any other 4xx fails the item, uncharged.

use std::time::Duration;

use async_trait::async_trait;
use holdfast_common::messages::ItemJob;
use serde_json::Value;

use crate::generator::{Generated, Generator, GeneratorError};

/// The http generator.
pub struct Http {
    client: reqwest::Client,
    url: String,
}

impl Http {
    pub fn new(url: impl Into<String>, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self {
            client,
            url: url.into(),
        })
    }
}

#[async_trait]
impl Generator for Http {
    fn name(&self) -> &str {
        "http"
    }

    async fn generate(&self, job: &ItemJob) -> Result<Generated, GeneratorError> {
        let response = self
            .client
            .post(&self.url)
            .json(job)
            .send()
            .await
            .map_err(|e| GeneratorError::Transient(format!("POST {}: {e}", self.url)))?;
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(GeneratorError::Transient(format!(
                "POST {} answered {status}",
                self.url
            )));
        }
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let text: String = text.chars().take(200).collect();
            return Err(GeneratorError::Permanent(format!(
                "POST {} answered {status}: {text}",
                self.url
            )));
        }
        let body: Value = match response.json().await {
            Ok(v) => v,
            Err(e) => {
                // The work was done; only the cost is unknown: the reservation is charged.
                tracing::warn!(batch_id = %job.batch_id, item_id = %job.item_id, error = %e,
                    "generator answer is not JSON; charging the reservation");
                Value::Null
            }
        };
        let actual_cost = body
            .get("actual_cost")
            .or_else(|| body.get("cost"))
            .and_then(Value::as_i64);
        Ok(Generated {
            actual_cost,
            output: Some(body),
        })
    }
}
