//! JSON Schemas of the wire messages, generated from the types in
//! [`crate::messages`] (doc comments become descriptions; the bounds the
//! intake enforces that JSON Schema can say become constraints).
//!
//! `holdfast schemas` writes them to docs/schemas/, one file per message;
//! docs/asyncapi.yaml refers to them, and a test fails when the committed
//! files differ from what the code generates. Draft-07, the dialect every
//! AsyncAPI tool reads. Schemas are open (no `additionalProperties: false`):
//! within a `schema_version` fields are only added, and readers ignore the
//! ones they do not know.

use std::collections::BTreeSet;
use std::path::Path;

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use crate::messages::{
    BatchRequest, Event, Granted, Insufficient, ItemJob, Preview, PreviewRequest, Rejected,
};

/// One message's schema and the file it is written to (`<name>.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct MessageSchema {
    /// The file's stem: `batch-request`, `decision-granted`, ...
    pub name: &'static str,
    pub schema: Value,
}

impl MessageSchema {
    pub fn file_name(&self) -> String {
        format!("{}.json", self.name)
    }

    /// The file's content: pretty JSON and a final newline.
    pub fn to_file(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.schema).expect("a schema serialises");
        s.push('\n');
        s
    }
}

/// Every message of the contract, in a stable order.
pub fn all() -> Vec<MessageSchema> {
    let decisions = [
        decision::<Granted>("granted"),
        decision::<Insufficient>("insufficient"),
        decision::<Rejected>("rejected"),
    ];
    vec![
        message(
            "batch-request",
            "Batch request",
            "A producer's \"Generate All\" (producer → `<ns>.intake`, routing key `requests`): \
             one message for the whole batch. Answered with a decision on `reply_to`.",
            root::<BatchRequest>(),
        ),
        message(
            "preview-request",
            "Preview request",
            "A batch to price (producer → `<ns>.intake`, routing key `previews`): `items` as in \
             a batch request, or `count` items of `cost` each. Holds nothing; answered on \
             `reply_to` with a preview, or a rejected decision.",
            root::<PreviewRequest>(),
        ),
        any_decision(&decisions),
        decisions[0].clone(),
        decisions[1].clone(),
        decisions[2].clone(),
        message(
            "preview",
            "Preview",
            "The answer to a preview request, on its `reply_to` only: what the batch costs, \
             what the account (and the spenders on its path) have, and what fits.",
            published(root::<Preview>(), "preview", None),
        ),
        message(
            "item-job",
            "Item job",
            "One item to generate (coordinator → `<ns>.jobs`); its AMQP `message_id` is \
             `batch_id:item_id`, or `sha256:` and a hash of the two past 255 bytes.",
            root::<ItemJob>(),
        ),
        event_variant("progress", "Batch progress"),
        event_variant("completed", "Batch completed"),
    ]
}

/// Write every schema to `dir` (created if missing); returns the files written.
pub fn write(dir: &Path) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for m in all() {
        let path = dir.join(m.file_name());
        std::fs::write(&path, m.to_file())?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

/// The files of `dir` that differ from what the code generates (missing,
/// different, or a `.json` file that is no schema of the contract any more).
pub fn differences(dir: &Path) -> Vec<String> {
    let schemas = all();
    let mut out = Vec::new();
    for m in &schemas {
        let path = dir.join(m.file_name());
        match std::fs::read_to_string(&path) {
            Ok(text) if text == m.to_file() => {}
            Ok(_) => out.push(format!("{} differs from the code", path.display())),
            Err(e) => out.push(format!("{}: {e}", path.display())),
        }
    }
    let known: BTreeSet<String> = schemas.iter().map(MessageSchema::file_name).collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".json") && !known.contains(&name) {
                out.push(format!(
                    "{} is not a message of the contract",
                    entry.path().display()
                ));
            }
        }
    }
    out.sort();
    out
}

/// The schema of `T` alone, as a draft-07 document.
fn root<T: JsonSchema>() -> Map<String, Value> {
    let generator = SchemaSettings::draft07().into_generator();
    match generator.into_root_schema_for::<T>().to_value() {
        Value::Object(map) => map,
        other => unreachable!("the schema of a message type is an object, got {other}"),
    }
}

/// A message's schema with its title and description, tidied: doc comments'
/// line breaks unwrapped, unused definitions dropped.
fn message(
    name: &'static str,
    title: &str,
    description: &str,
    mut schema: Map<String, Value>,
) -> MessageSchema {
    schema.insert("title".into(), title.into());
    schema.insert("description".into(), description.into());
    let mut schema = Value::Object(schema);
    unwrap_descriptions(&mut schema);
    prune_definitions(&mut schema);
    MessageSchema { name, schema }
}

/// `body` as Holdfast publishes it: `schema_version` and the `event` tag (and
/// a decision's `decision` tag) beside its own fields, all at one level.
fn published(
    mut body: Map<String, Value>,
    event: &str,
    decision: Option<&str>,
) -> Map<String, Value> {
    let mut properties = Map::new();
    properties.insert(
        "schema_version".into(),
        json!({
            "description": "The version of the message contract (1). Within a version fields are \
                only added, never renamed or retyped: ignore the ones you do not know.",
            "type": "integer",
            "minimum": 1,
        }),
    );
    properties.insert("event".into(), json!({"type": "string", "const": event}));
    let mut required = vec![json!("schema_version"), json!("event")];
    if let Some(kind) = decision {
        properties.insert("decision".into(), json!({"type": "string", "const": kind}));
        required.push(json!("decision"));
    }
    if let Some(Value::Object(own)) = body.remove("properties") {
        properties.extend(own);
    }
    if let Some(Value::Array(own)) = body.remove("required") {
        required.extend(own);
    }
    body.insert("properties".into(), Value::Object(properties));
    body.insert("required".into(), Value::Array(required));
    body
}

/// The decision of one kind, as a reply and as a `decision.<kind>` event.
fn decision<T: JsonSchema>(kind: &'static str) -> MessageSchema {
    let (name, title, description) = match kind {
        "granted" => (
            "decision-granted",
            "Decision: granted",
            "The batch's hold is taken and its item jobs are being published (routing key \
             `decision.granted`, and the request's `reply_to`).",
        ),
        "insufficient" => (
            "decision-insufficient",
            "Decision: insufficient",
            "Nothing was held and nothing runs: what the batch costs, what the account has, \
             what would fit, the sentence to show and the options (routing key \
             `decision.insufficient`, and the request's `reply_to`).",
        ),
        _ => (
            "decision-rejected",
            "Decision: rejected",
            "The request could not be decided as sent; every problem names its field (routing \
             key `decision.rejected`, and the request's `reply_to`). The request was parked in \
             `<ns>.requests.dead`.",
        ),
    };
    message(
        name,
        title,
        description,
        published(root::<T>(), "decision", Some(kind)),
    )
}

/// `decision.json`: any of the three decisions.
fn any_decision(decisions: &[MessageSchema]) -> MessageSchema {
    let mut definitions = Map::new();
    let mut one_of = Vec::new();
    for d in decisions {
        let mut variant = d.schema.as_object().cloned().unwrap_or_default();
        variant.remove("$schema");
        if let Some(Value::Object(defs)) = variant.remove("definitions") {
            definitions.extend(defs);
        }
        one_of.push(Value::Object(variant));
    }
    let mut schema = Map::new();
    schema.insert(
        "$schema".into(),
        "http://json-schema.org/draft-07/schema#".into(),
    );
    schema.insert("definitions".into(), Value::Object(definitions));
    schema.insert("oneOf".into(), Value::Array(one_of));
    message(
        "decision",
        "Decision",
        "The coordinator's answer to a batch request: exactly one per request, `granted`, \
         `insufficient` or `rejected` (the `decision` field), sent to the request's `reply_to` \
         with its `correlation_id` and published on `<ns>.events` with routing key \
         `decision.<decision>`.",
        schema,
    )
}

/// A struct variant of [`Event`] (`progress`, `completed`), with the version.
fn event_variant(event: &'static str, title: &str) -> MessageSchema {
    let all = root::<Event>();
    let variant = all
        .get("oneOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|v| v.pointer("/properties/event/const") == Some(&Value::from(event)))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_else(|| unreachable!("Event has a `{event}` variant"));
    let mut body = Map::new();
    body.insert("$schema".into(), all["$schema"].clone());
    body.insert("definitions".into(), all["definitions"].clone());
    body.extend(variant);
    if let Some(Value::Object(p)) = body.get_mut("properties") {
        p.remove("event");
    }
    if let Some(Value::Array(r)) = body.get_mut("required") {
        r.retain(|f| f != "event");
    }
    let description = body
        .remove("description")
        .and_then(|d| d.as_str().map(str::to_string))
        .unwrap_or_default();
    message(
        if event == "progress" {
            "progress"
        } else {
            "completed"
        },
        title,
        &description,
        published(body, event, None),
    )
}

/// Doc comments arrive with their line breaks: one line per paragraph reads
/// better in generated clients and documentation.
fn unwrap_descriptions(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(s) if key == "description" => {
                        *s = s
                            .split("\n\n")
                            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    other => unwrap_descriptions(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

/// Drop the definitions nothing refers to (a message built from a larger type).
fn prune_definitions(schema: &mut Value) {
    let Some(Value::Object(definitions)) = schema.get("definitions").cloned() else {
        return;
    };
    let mut used = BTreeSet::new();
    let mut body = schema.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("definitions");
    }
    let mut frontier = vec![body];
    while let Some(v) = frontier.pop() {
        for name in refs(&v) {
            if used.insert(name.clone()) {
                if let Some(d) = definitions.get(&name) {
                    frontier.push(d.clone());
                }
            }
        }
    }
    let kept: Map<String, Value> = definitions
        .into_iter()
        .filter(|(name, _)| used.contains(name))
        .collect();
    if let Some(map) = schema.as_object_mut() {
        if kept.is_empty() {
            map.remove("definitions");
        } else {
            map.insert("definitions".into(), Value::Object(kept));
        }
    }
}

/// The definitions `v` refers to (`#/definitions/<name>`), at any depth.
fn refs(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(r)) => {
                        if let Some(name) = r.strip_prefix("#/definitions/") {
                            out.push(name.to_string());
                        }
                    }
                    _ => out.extend(refs(value)),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| out.extend(refs(i))),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::messages::{BatchFigures, Decision, Rejected, SCHEMA_VERSION};

    fn docs() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
    }

    fn validator(name: &str) -> jsonschema::Validator {
        let m = all()
            .into_iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no schema named `{name}`"));
        jsonschema::validator_for(&m.schema).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// `schema` with every object that lists its properties closed to others,
    /// so that a misspelt field in an example is caught. The published
    /// schemas stay open: readers ignore fields they do not know.
    fn closed(mut schema: Value) -> Value {
        fn close(v: &mut Value) {
            match v {
                Value::Object(map) => {
                    if map.contains_key("properties") {
                        map.entry("additionalProperties").or_insert(false.into());
                    }
                    map.values_mut().for_each(close);
                }
                Value::Array(items) => items.iter_mut().for_each(close),
                _ => {}
            }
        }
        close(&mut schema);
        schema
    }

    /// Every ```json block of `markdown`, with the schema named by the
    /// `<!-- schema: NAME -->` line right before it (`None` when missing)
    /// and its line number.
    fn examples(markdown: &str) -> Vec<(usize, Option<String>, String)> {
        let lines: Vec<&str> = markdown.lines().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            if lines[i].trim() == "```json" {
                let marker = lines[..i]
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .and_then(|l| l.trim().strip_prefix("<!-- schema:"))
                    .and_then(|l| l.strip_suffix("-->"))
                    .map(|name| name.trim().to_string());
                let start = i + 1;
                let end = (start..lines.len())
                    .find(|&j| lines[j].trim() == "```")
                    .unwrap_or_else(|| panic!("messages.md:{start}: unclosed ```json block"));
                out.push((start, marker, lines[start..end].join("\n")));
                i = end;
            }
            i += 1;
        }
        out
    }

    /// The problems with the examples of `markdown`: a block without a
    /// marker, an unknown schema, JSON that does not parse, an example that
    /// its schema (closed) refuses.
    fn example_problems(markdown: &str) -> Vec<String> {
        let schemas = all();
        let mut problems = Vec::new();
        for (line, marker, text) in examples(markdown) {
            let Some(name) = marker else {
                problems.push(format!(
                    "messages.md:{line}: a ```json block needs `<!-- schema: NAME -->` right before it"
                ));
                continue;
            };
            let Some(m) = schemas.iter().find(|m| m.name == name) else {
                problems.push(format!("messages.md:{line}: no schema named `{name}`"));
                continue;
            };
            let instance: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("messages.md:{line}: not JSON: {e}"));
                    continue;
                }
            };
            let validator = jsonschema::validator_for(&closed(m.schema.clone())).unwrap();
            for e in validator.iter_errors(&instance) {
                problems.push(format!(
                    "messages.md:{line} ({name}): {} at `{}`",
                    e,
                    e.instance_path()
                ));
            }
        }
        problems
    }

    #[test]
    fn committed_schemas_are_the_codes() {
        let differences = differences(&docs().join("schemas"));
        assert!(
            differences.is_empty(),
            "docs/schemas/ is not what the code generates; run `make schemas` and commit:\n{}",
            differences.join("\n")
        );
    }

    #[test]
    fn every_schema_is_valid_draft_07() {
        for m in all() {
            assert_eq!(
                m.schema["$schema"], "http://json-schema.org/draft-07/schema#",
                "{}",
                m.name
            );
            jsonschema::draft7::meta::validate(&m.schema)
                .unwrap_or_else(|e| panic!("{}: {e}", m.name));
        }
    }

    #[test]
    fn every_example_in_messages_md_satisfies_its_schema() {
        let markdown = std::fs::read_to_string(docs().join("messages.md")).unwrap();
        let problems = example_problems(&markdown);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        // Every message has an example (`decision` is any of the three kinds).
        let shown: BTreeSet<String> = examples(&markdown)
            .into_iter()
            .filter_map(|(_, name, _)| name)
            .collect();
        for m in all() {
            assert!(
                m.name == "decision" || shown.contains(m.name),
                "messages.md has no example of `{}`",
                m.name
            );
        }
    }

    #[test]
    fn a_wrong_example_is_caught() {
        let good = r#"{"batch_id": "b", "account_id": "acme", "items": [{"item_id": "a", "estimated_cost": 3}]}"#;
        let doc = |json: &str| format!("<!-- schema: batch-request -->\n```json\n{json}\n```\n");
        assert!(example_problems(&doc(good)).is_empty());
        for bad in [
            good.replace("\"estimated_cost\": 3", "\"estimated_cost\": 0"),
            good.replace("\"estimated_cost\": 3", "\"estimated_cost\": \"3\""),
            good.replace("batch_id", "batchid"),
            good.replace("\"b\"", "\"\""),
            good.replace("\"items\": [", "\"mode\": \"everything\", \"items\": ["),
            good.replace("\"item_id\"", "\"id\""),
            good.replace('}', ""),
        ] {
            assert!(!example_problems(&doc(&bad)).is_empty(), "accepted: {bad}");
        }
        let unmarked = format!("```json\n{good}\n```\n");
        assert!(example_problems(&unmarked)[0].contains("<!-- schema: NAME -->"));
        let unknown = doc(good).replace("batch-request", "batch-requests");
        assert!(example_problems(&unknown)[0].contains("no schema named"));
    }

    #[test]
    fn published_messages_satisfy_their_schemas() {
        let rejected = Event::Decision(Decision::Rejected(Rejected::one(
            Some("b".into()),
            "items[0].estimated_cost",
            "must be greater than zero, got 0",
        )));
        let progress = Event::Progress {
            batch_id: "b".into(),
            account_id: "a".into(),
            figures: BatchFigures::default(),
        };
        let completed = Event::Completed {
            batch_id: "b".into(),
            account_id: "a".into(),
            state: "completed".into(),
            figures: BatchFigures::default(),
        };
        for (name, event) in [
            ("decision-rejected", &rejected),
            ("decision", &rejected),
            ("progress", &progress),
            ("completed", &completed),
        ] {
            let wire: Value = serde_json::from_slice(&event.to_wire().unwrap()).unwrap();
            let v = validator(name);
            let errors: Vec<String> = v.iter_errors(&wire).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{name}: {errors:?} in {wire}");
        }
        // Without the version it is not what Holdfast publishes.
        let bare = serde_json::to_value(&progress).unwrap();
        assert!(!validator("progress").is_valid(&bare));

        let job = crate::messages::ItemJob {
            schema_version: SCHEMA_VERSION,
            batch_id: "b".into(),
            item_id: "i".into(),
            account_id: "a".into(),
            reserved: 7,
            payload: json!({"prompt": "x"}),
            attempt: 1,
        };
        let (body, _) = crate::dispatch::job_message(&job).unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(validator("item-job").is_valid(&body), "{body}");
    }
}
