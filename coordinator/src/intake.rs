//! Intake: turn the bytes of a batch request into a [`BatchRequest`], or into a
//! [`Rejected`] decision naming every problem. Runs before any database work,
//! so oversized or malformed input costs the ledger nothing.

use std::collections::HashSet;

use holdfast_common::config::Limits;
use holdfast_common::messages::{
    unsupported_version, BatchRequest, FieldError, ItemRequest, Mode, Rejected, SCHEMA_VERSION,
};
use serde_json::{Map, Value};

pub use holdfast_common::messages::MAX_ID_CHARS;

/// Collects field errors while walking the JSON.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            reason: reason.into(),
        });
    }
}

/// Parse and validate one request body against `limits`.
pub fn parse(body: &[u8], limits: &Limits) -> Result<BatchRequest, Box<Rejected>> {
    validate(read_object(body, limits)?, limits)
}

/// Batch id of the requests built by [`parse_preview`]: a preview decides nothing.
pub const PREVIEW_BATCH_ID: &str = "preview";

/// Parse a preview (or soft hold) body with the rules of a batch request.
///
/// `batch_id` is not needed (a placeholder is used), and instead of `items` the
/// body may give `count` and `cost`: that many items of that cost each, with
/// the ids `item-1` … `item-N` (which `item_ids` may name).
pub fn parse_preview(body: &[u8], limits: &Limits) -> Result<BatchRequest, Box<Rejected>> {
    let mut obj = read_object(body, limits)?;
    obj.insert("batch_id".into(), Value::String(PREVIEW_BATCH_ID.into()));
    let shorthand = ["count", "cost"].iter().any(|f| obj.contains_key(*f));
    if shorthand {
        let mut p = Problems::default();
        if obj.get("items").is_some_and(|v| !v.is_null()) {
            p.add("items", "give either items, or count and cost, not both");
        } else if let Some(items) = generated_items(&obj, limits, &mut p) {
            obj.insert("items".into(), Value::Array(items));
        }
        if !p.0.is_empty() {
            let account_id = obj.get("account_id").and_then(Value::as_str);
            let mut r = Rejected::new(None, p.0);
            r.account_id = account_id.map(str::to_string);
            return Err(Box::new(r));
        }
    }
    validate(obj, limits).map_err(|mut r| {
        for e in r.errors.iter_mut() {
            if e.field == "items" && e.reason == "is required" {
                e.reason = "is required (or count and cost)".into();
            }
        }
        let account_id = r.account_id.take();
        let mut r = Rejected::new(None, std::mem::take(&mut r.errors));
        r.account_id = account_id;
        Box::new(r)
    })
}

/// `count` items of `cost` each, as JSON items, or the problems with either field.
fn generated_items(
    obj: &Map<String, Value>,
    limits: &Limits,
    p: &mut Problems,
) -> Option<Vec<Value>> {
    let count = match obj.get("count") {
        None | Some(Value::Null) => {
            p.add("count", "is required with cost");
            None
        }
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => {
                p.add("count", "must be at least 1");
                None
            }
            Some(c) if c > limits.max_items as u64 => {
                p.add(
                    "count",
                    format!("{c} items; the limit is {}", limits.max_items),
                );
                None
            }
            Some(c) => Some(c as usize),
            None => {
                p.add("count", format!("must be a positive whole number, got {n}"));
                None
            }
        },
        Some(_) => {
            p.add("count", "must be an integer");
            None
        }
    };
    let cost = match cost_value(obj.get("cost"), limits) {
        Ok(c) => Some(c),
        Err(reason) => {
            p.add("cost", reason);
            None
        }
    };
    let (count, cost) = (count?, cost?);
    Some(
        (1..=count)
            .map(|i| serde_json::json!({"item_id": format!("item-{i}"), "estimated_cost": cost}))
            .collect(),
    )
}

/// The estimated cost of one item: a whole number from 1 to `limits.max_item_cost`.
fn cost_value(v: Option<&Value>, limits: &Limits) -> Result<i64, String> {
    match v {
        None | Some(Value::Null) => Err("is required".into()),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(c) if c <= 0 => Err(format!("must be greater than zero, got {c}")),
            Some(c) if c > limits.max_item_cost => Err(format!(
                "{c} exceeds the per-item limit of {}",
                limits.max_item_cost
            )),
            Some(c) => Ok(c),
            None if n.is_f64() && n.as_f64().is_some_and(|f| f.fract() != 0.0) => {
                Err(format!("must be a whole number of credit units, got {n}"))
            }
            None => Err(format!("{n} is out of range")),
        },
        Some(_) => Err("must be an integer".into()),
    }
}

/// The body as a JSON object, or a rejection naming `body`.
fn read_object(body: &[u8], limits: &Limits) -> Result<Map<String, Value>, Box<Rejected>> {
    if body.len() > limits.max_message_bytes {
        return Err(Box::new(Rejected::one(
            None,
            "body",
            format!(
                "message is {} bytes; the limit is {}",
                body.len(),
                limits.max_message_bytes
            ),
        )));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Box::new(Rejected::one(None, "body", format!("not valid JSON: {e}"))))?;
    let Value::Object(obj) = value else {
        return Err(Box::new(Rejected::one(
            None,
            "body",
            "must be a JSON object",
        )));
    };
    Ok(obj)
}

/// Check every field of a request object.
fn validate(obj: Map<String, Value>, limits: &Limits) -> Result<BatchRequest, Box<Rejected>> {
    let mut p = Problems::default();
    let schema_version = version_field(&obj, &mut p);
    let batch_id = id_field(&obj, "batch_id", &mut p);
    let account_id = id_field(&obj, "account_id", &mut p);
    let mode = match obj.get("mode") {
        None | Some(Value::Null) => Some(Mode::AllOrNothing),
        Some(Value::String(s)) => match Mode::parse(s) {
            Some(m) => Some(m),
            None => {
                p.add(
                    "mode",
                    format!(
                        "unknown mode `{s}`; expected all_or_nothing, first_fit, priority_fit, selected or sequential"
                    ),
                );
                None
            }
        },
        Some(_) => {
            p.add("mode", "must be a string");
            None
        }
    };
    let items = items_field(&obj, limits, &mut p);
    let item_ids = selected_ids(&obj, mode, items.as_deref(), &mut p);
    let reservation_id = match obj.get("reservation_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if !r.is_empty() && r.len() <= MAX_ID_CHARS => Some(r.clone()),
        Some(_) => {
            p.add(
                "reservation_id",
                "must be the reservation_id string returned when the credits were reserved",
            );
            None
        }
    };

    let spender_id = match obj.get("spender_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match check_id(s) {
            Ok(()) => Some(s.clone()),
            Err(reason) => {
                p.add("spender_id", reason);
                None
            }
        },
        Some(_) => {
            p.add("spender_id", "must be a string: a spender of the account");
            None
        }
    };
    match (batch_id, account_id, mode, items) {
        (Some(batch_id), Some(account_id), Some(mode), Some(items)) if p.0.is_empty() => {
            Ok(BatchRequest {
                schema_version,
                batch_id,
                account_id,
                items,
                mode,
                item_ids,
                reservation_id,
                spender_id,
            })
        }
        (batch_id, account_id, ..) => {
            let mut r = Rejected::new(batch_id, p.0);
            r.account_id = account_id;
            Err(Box::new(r))
        }
    }
}

/// `schema_version`: absent (or `null`) is 1, what producers sent before the
/// field existed; a version newer than [`SCHEMA_VERSION`] is a problem naming
/// the field, never a guess at what it means.
fn version_field(obj: &Map<String, Value>, p: &mut Problems) -> u32 {
    match obj.get("schema_version") {
        None | Some(Value::Null) => SCHEMA_VERSION,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => match unsupported_version(v) {
                None => v as u32,
                Some(why) => {
                    p.add("schema_version", why);
                    SCHEMA_VERSION
                }
            },
            None => {
                p.add(
                    "schema_version",
                    format!("must be a positive whole number, got {n}"),
                );
                SCHEMA_VERSION
            }
        },
        Some(_) => {
            p.add("schema_version", "must be an integer");
            SCHEMA_VERSION
        }
    }
}

/// An id (batch, account, item): 1 to 128 characters, none of them control characters.
pub fn check_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else if s.chars().count() > MAX_ID_CHARS {
        Err(format!("must be at most {MAX_ID_CHARS} characters"))
    } else if s.chars().any(char::is_control) {
        Err("must not contain control characters".into())
    } else {
        Ok(())
    }
}

fn id_field(obj: &Map<String, Value>, field: &str, p: &mut Problems) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => {
            p.add(field, "is required");
            None
        }
        Some(Value::String(s)) => match check_id(s) {
            Ok(()) => Some(s.clone()),
            Err(reason) => {
                p.add(field, reason);
                None
            }
        },
        Some(_) => {
            p.add(field, "must be a string");
            None
        }
    }
}

fn items_field(
    obj: &Map<String, Value>,
    limits: &Limits,
    p: &mut Problems,
) -> Option<Vec<ItemRequest>> {
    let list = match obj.get("items") {
        None | Some(Value::Null) => {
            p.add("items", "is required");
            return None;
        }
        Some(Value::Array(list)) => list,
        Some(_) => {
            p.add("items", "must be an array");
            return None;
        }
    };
    if list.is_empty() {
        p.add("items", "must contain at least one item");
        return None;
    }
    if list.len() > limits.max_items {
        p.add(
            "items",
            format!(
                "has {} items; the limit is {}",
                list.len(),
                limits.max_items
            ),
        );
        return None;
    }
    let before = p.0.len();
    let mut seen = HashSet::with_capacity(list.len());
    let mut items = Vec::with_capacity(list.len());
    let mut total: i64 = 0;
    for (i, v) in list.iter().enumerate() {
        // Report the first few bad items, not ten thousand lines.
        if p.0.len() - before >= 20 {
            p.add("items", "more problems not listed");
            break;
        }
        let at = |f: &str| format!("items[{i}].{f}");
        let Value::Object(item) = v else {
            p.add(format!("items[{i}]"), "must be an object");
            continue;
        };
        let item_id = match item.get("item_id") {
            Some(Value::String(s)) => match check_id(s) {
                Ok(()) if !seen.insert(s.as_str()) => {
                    p.add(at("item_id"), format!("duplicate item id `{s}`"));
                    None
                }
                Ok(()) => Some(s.clone()),
                Err(reason) => {
                    p.add(at("item_id"), reason);
                    None
                }
            },
            None | Some(Value::Null) => {
                p.add(at("item_id"), "is required");
                None
            }
            Some(_) => {
                p.add(at("item_id"), "must be a string");
                None
            }
        };
        let cost = match cost_value(item.get("estimated_cost"), limits) {
            Ok(c) => Some(c),
            Err(reason) => {
                p.add(at("estimated_cost"), reason);
                None
            }
        };
        let priority = match item.get("priority") {
            None | Some(Value::Null) => Some(0),
            Some(Value::Number(n)) => match n.as_i64().and_then(|x| i32::try_from(x).ok()) {
                Some(x) => Some(x),
                None => {
                    p.add(at("priority"), "must be a 32-bit integer");
                    None
                }
            },
            Some(_) => {
                p.add(at("priority"), "must be an integer");
                None
            }
        };
        let payload = item.get("payload").cloned().unwrap_or(Value::Null);
        let size = serde_json::to_vec(&payload)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > limits.max_payload_bytes {
            p.add(
                at("payload"),
                format!("is {size} bytes; the limit is {}", limits.max_payload_bytes),
            );
            continue;
        }
        if contains_nul(&payload) {
            p.add(
                at("payload"),
                "must not contain the NUL character (\\u0000): PostgreSQL cannot store it",
            );
            continue;
        }
        if let (Some(item_id), Some(estimated_cost), Some(priority)) = (item_id, cost, priority) {
            match total.checked_add(estimated_cost) {
                Some(t) => total = t,
                None => {
                    p.add("items", "the total cost overflows a 64-bit integer");
                    return None;
                }
            }
            items.push(ItemRequest {
                item_id,
                estimated_cost,
                priority,
                payload,
            });
        }
    }
    (p.0.len() == before).then_some(items)
}

/// True when a string or key anywhere in `v` holds U+0000, which a
/// PostgreSQL `jsonb` column refuses. serde_json bounds the nesting depth,
/// so the recursion is bounded too.
fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(contains_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

fn selected_ids(
    obj: &Map<String, Value>,
    mode: Option<Mode>,
    items: Option<&[ItemRequest]>,
    p: &mut Problems,
) -> Option<Vec<String>> {
    let raw = obj.get("item_ids").filter(|v| !v.is_null());
    if mode != Some(Mode::Selected) {
        if raw.is_some() && mode.is_some() {
            p.add("item_ids", "is only allowed with mode `selected`");
        }
        return None;
    }
    let Some(Value::Array(list)) = raw else {
        p.add(
            "item_ids",
            if raw.is_some() {
                "must be an array of item ids"
            } else {
                "is required with mode `selected`"
            },
        );
        return None;
    };
    if list.is_empty() {
        p.add("item_ids", "must name at least one item");
        return None;
    }
    let known: HashSet<&str> = items
        .unwrap_or_default()
        .iter()
        .map(|i| i.item_id.as_str())
        .collect();
    let mut seen = HashSet::new();
    let mut ids = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        match v {
            Value::String(s) if !seen.insert(s.as_str()) => {
                p.add(format!("item_ids[{i}]"), format!("duplicate item id `{s}`"))
            }
            Value::String(s) if items.is_some() && !known.contains(s.as_str()) => p.add(
                format!("item_ids[{i}]"),
                format!("`{s}` is not an item of this batch"),
            ),
            Value::String(s) => ids.push(s.clone()),
            _ => p.add(format!("item_ids[{i}]"), "must be a string"),
        }
    }
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject(body: &str) -> Rejected {
        *parse(body.as_bytes(), &Limits::default()).expect_err("should be rejected")
    }

    fn fields(r: &Rejected) -> Vec<&str> {
        r.errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn accepts_a_minimal_request() {
        let r = parse(
            br#"{"batch_id":"b1","account_id":"acme","items":[{"item_id":"a","estimated_cost":12}]}"#,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(r.mode, Mode::AllOrNothing);
        assert_eq!(r.items[0].estimated_cost, 12);
    }

    #[test]
    fn names_each_problem() {
        assert_eq!(fields(&reject("{nope")), ["body"]);
        assert_eq!(fields(&reject("[1]")), ["body"]);
        assert_eq!(
            fields(&reject(
                r#"{"account_id":"a","items":[{"item_id":"x","estimated_cost":1}]}"#
            )),
            ["batch_id"]
        );
        let r = reject(
            r#"{"batch_id":"b","account_id":"a","items":[{"item_id":"x","estimated_cost":0},{"item_id":"x","estimated_cost":-3},{"item_id":"y","estimated_cost":1.5},{"item_id":"z","estimated_cost":99999999999999}]}"#,
        );
        assert_eq!(
            fields(&r),
            [
                "items[0].estimated_cost",
                "items[1].item_id",
                "items[1].estimated_cost",
                "items[2].estimated_cost",
                "items[3].estimated_cost"
            ]
        );
        assert_eq!(r.batch_id.as_deref(), Some("b"));
        assert_eq!(
            fields(&reject(r#"{"batch_id":"b","account_id":"a","items":[]}"#)),
            ["items"]
        );
        assert_eq!(
            fields(&reject(
                r#"{"batch_id":"b","account_id":"a","mode":"selected","item_ids":["q"],"items":[{"item_id":"x","estimated_cost":1}]}"#
            )),
            ["item_ids[0]"]
        );
        assert_eq!(
            fields(&reject(
                r#"{"batch_id":"b","account_id":"a","mode":"everything","items":[{"item_id":"x","estimated_cost":1}]}"#
            )),
            ["mode"]
        );
    }

    #[test]
    fn schema_version_is_optional_and_newer_majors_are_refused() {
        let items = r#""items":[{"item_id":"a","estimated_cost":1}]"#;
        let ok = |v: &str| {
            parse(
                format!(r#"{{"batch_id":"b","account_id":"a",{v}{items}}}"#).as_bytes(),
                &Limits::default(),
            )
        };
        assert_eq!(ok("").unwrap().schema_version, 1, "absent means 1");
        assert_eq!(ok(r#""schema_version":null,"#).unwrap().schema_version, 1);
        assert_eq!(ok(r#""schema_version":1,"#).unwrap().schema_version, 1);
        let newer = *ok(r#""schema_version":2,"#).unwrap_err();
        assert_eq!(fields(&newer), ["schema_version"]);
        assert!(
            newer.reason.contains("version 2 is newer"),
            "{}",
            newer.reason
        );
        assert_eq!(newer.batch_id.as_deref(), Some("b"));
        for bad in ["0", "-1", "1.5", "\"1\"", "99999999999999999999"] {
            let r = *ok(&format!(r#""schema_version":{bad},"#)).unwrap_err();
            assert_eq!(fields(&r), ["schema_version"], "{bad}");
        }
        let unknown = ok(r#""added_by_a_later_producer":{"x":1},"#).unwrap();
        assert_eq!(unknown.items.len(), 1, "unknown fields are ignored");
    }

    #[test]
    fn preview_takes_items_or_count_and_cost() {
        let limits = Limits::default();
        let r = parse_preview(
            br#"{"account_id":"acme","count":3,"cost":40,"mode":"selected","item_ids":["item-2"]}"#,
            &limits,
        )
        .unwrap();
        assert_eq!(r.batch_id, PREVIEW_BATCH_ID);
        let ids: Vec<_> = r.items.iter().map(|i| i.item_id.as_str()).collect();
        assert_eq!(ids, ["item-1", "item-2", "item-3"]);
        assert!(r.items.iter().all(|i| i.estimated_cost == 40));
        let r = parse_preview(
            br#"{"account_id":"acme","items":[{"item_id":"a","estimated_cost":5}]}"#,
            &limits,
        )
        .unwrap();
        assert_eq!(r.items.len(), 1);

        let reject = |body: &str| *parse_preview(body.as_bytes(), &limits).unwrap_err();
        assert_eq!(
            fields(&reject(r#"{"account_id":"a","count":0,"cost":-1}"#)),
            ["count", "cost"]
        );
        assert_eq!(
            fields(&reject(r#"{"account_id":"a","count":100000,"cost":1}"#)),
            ["count"]
        );
        assert_eq!(fields(&reject(r#"{"account_id":"a","cost":1}"#)), ["count"]);
        assert_eq!(
            fields(&reject(
                r#"{"account_id":"a","count":1,"cost":1,"items":[]}"#
            )),
            ["items"]
        );
        let r = reject(r#"{"account_id":"a"}"#);
        assert_eq!(r.reason, "items: is required (or count and cost)");
        assert_eq!(r.batch_id, None);
    }

    #[test]
    fn enforces_size_limits() {
        let limits = Limits {
            max_items: 2,
            max_payload_bytes: 10,
            ..Limits::default()
        };
        let many = r#"{"batch_id":"b","account_id":"a","items":[{"item_id":"1","estimated_cost":1},{"item_id":"2","estimated_cost":1},{"item_id":"3","estimated_cost":1}]}"#;
        let r = *parse(many.as_bytes(), &limits).unwrap_err();
        assert_eq!(r.reason, "items: has 3 items; the limit is 2");
        let nul = r#"{"batch_id":"b","account_id":"a","items":[{"item_id":"1","estimated_cost":1,"payload":{"k":["\u0000"]}}]}"#;
        let r = *parse(nul.as_bytes(), &Limits::default()).unwrap_err();
        assert_eq!(fields(&r), ["items[0].payload"]);
        let big = r#"{"batch_id":"b","account_id":"a","items":[{"item_id":"1","estimated_cost":1,"payload":"0123456789abcdef"}]}"#;
        let r = *parse(big.as_bytes(), &limits).unwrap_err();
        assert_eq!(fields(&r), ["items[0].payload"]);
        let tiny = Limits {
            max_message_bytes: 5,
            ..Limits::default()
        };
        assert_eq!(
            fields(&parse(many.as_bytes(), &tiny).unwrap_err()),
            ["body"]
        );
    }
}
