//! Batch request bodies the bench sends.

use serde_json::json;

/// A request for batch `batch_id` on `account`: `n` items of `cost` each.
pub(crate) fn request(batch_id: &str, account: &str, n: usize, cost: i64) -> Vec<u8> {
    let items: Vec<_> = (0..n)
        .map(|i| json!({"item_id": format!("i{i}"), "estimated_cost": cost}))
        .collect();
    json!({"batch_id": batch_id, "account_id": account, "items": items})
        .to_string()
        .into_bytes()
}

/// `n` batches `<prefix><i>` of `size` items costing 1, on `account(i)`,
/// as (batch id, body) pairs for [`holdfast::producer::Producer::send_many`].
pub(crate) fn numbered(
    prefix: &str,
    n: usize,
    size: usize,
    account: impl Fn(usize) -> String,
) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i}");
            let body = request(&id, &account(i), size, 1);
            (id, body)
        })
        .collect()
}
