//! The OpenAPI document's bounds, from the limits this process enforces.
//!
//! Every id of a request body (a field named `account_id`, `batch_id`,
//! `item_id` or `reservation_id`, each entry of `item_ids`) and every `{id}`
//! in a path gets the id rules of [`crate::intake`]: 1 to [`MAX_ID_CHARS`] characters,
//! none of them a control character ([`ID_PATTERN`]); an `allowance_id`, in
//! a body or a path, the same rules within [`MAX_ALLOWANCE_ID_CHARS`]. Item lists get
//! `HOLDFAST_MAX_ITEMS`, costs `HOLDFAST_MAX_ITEM_COST`, soft-hold TTLs
//! `HOLDFAST_MAX_RESERVATION_TTL_SECS`. They are set here, from the running
//! configuration, and nowhere else, so the document cannot drift from what
//! the intake enforces.

use holdfast_common::config::Limits;
use holdfast_common::ledger::MAX_ALLOWANCE_ID_CHARS;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{ArrayItems, Schema};
use utoipa::openapi::{OpenApi, RefOr};

pub use crate::intake::MAX_ID_CHARS;

pub use holdfast_common::messages::ID_PATTERN;

/// The request bodies the bounds apply to. Not the answers: a rejection or
/// a problem document echoes the id a client sent, valid or not.
const REQUESTS: [&str; 5] = [
    "AllowanceRequest",
    "BatchRequest",
    "ItemRequest",
    "PreviewRequest",
    "ReservationRequest",
];

/// Fields that carry an id.
const ID_FIELDS: [&str; 4] = ["account_id", "batch_id", "item_id", "reservation_id"];

/// Sets the configured bounds on a document (a [`utoipa::Modify`]).
pub struct Bounds {
    pub limits: Limits,
    /// The longest soft hold, in seconds.
    pub max_ttl_secs: u64,
}

impl utoipa::Modify for Bounds {
    fn modify(&self, openapi: &mut OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            for (name, schema) in components.schemas.iter_mut() {
                if REQUESTS.contains(&name.as_str()) {
                    self.walk(schema);
                }
            }
        }
        for operation in super::operations(openapi) {
            self.parameters(operation);
        }
    }
}

impl Bounds {
    fn parameters(&self, operation: &mut Operation) {
        for parameter in operation.parameters.iter_mut().flatten() {
            let Some(RefOr::T(schema)) = parameter.schema.as_mut() else {
                continue;
            };
            match parameter.name.as_str() {
                "id" => id_rules(schema),
                "allowance_id" => allowance_id_rules(schema),
                _ => {}
            }
        }
    }

    /// Apply the bounds to every property of `schema`, at any depth.
    fn walk(&self, schema: &mut RefOr<Schema>) {
        let RefOr::T(schema) = schema else {
            return;
        };
        match schema {
            Schema::Object(object) => {
                for (name, property) in object.properties.iter_mut() {
                    if let RefOr::T(property) = property {
                        self.property(name, property);
                    }
                    self.walk(property);
                }
            }
            Schema::Array(array) => {
                if let ArrayItems::RefOrSchema(items) = &mut array.items {
                    self.walk(items);
                }
            }
            Schema::OneOf(one) => one.items.iter_mut().for_each(|s| self.walk(s)),
            Schema::AllOf(all) => all.items.iter_mut().for_each(|s| self.walk(s)),
            Schema::AnyOf(any) => any.items.iter_mut().for_each(|s| self.walk(s)),
            _ => {}
        }
    }

    /// The bounds of one property, by its name.
    fn property(&self, name: &str, schema: &mut Schema) {
        let max_items = self.limits.max_items;
        match (name, schema) {
            (name, schema) if ID_FIELDS.contains(&name) => id_rules(schema),
            ("allowance_id", schema) => allowance_id_rules(schema),
            ("item_ids", Schema::Array(array)) => {
                array.max_items = Some(max_items);
                if let ArrayItems::RefOrSchema(items) = &mut array.items {
                    if let RefOr::T(items) = items.as_mut() {
                        id_rules(items);
                    }
                }
            }
            ("items", Schema::Array(array)) => array.max_items = Some(max_items),
            ("count", Schema::Object(object)) => object.maximum = Some(max_items.into()),
            ("estimated_cost" | "cost", Schema::Object(object)) => {
                let max = usize::try_from(self.limits.max_item_cost).unwrap_or(usize::MAX);
                object.maximum = Some(max.into());
            }
            ("ttl_seconds", Schema::Object(object)) => {
                let max = usize::try_from(self.max_ttl_secs).unwrap_or(usize::MAX);
                object.maximum = Some(max.into());
            }
            _ => {}
        }
    }
}

/// 1 to [`MAX_ID_CHARS`] characters, no control character.
fn id_rules(schema: &mut Schema) {
    if let Schema::Object(object) = schema {
        object.min_length = Some(1);
        object.max_length = Some(MAX_ID_CHARS);
        object.pattern = Some(ID_PATTERN.into());
    }
}

/// The id rules within [`MAX_ALLOWANCE_ID_CHARS`].
fn allowance_id_rules(schema: &mut Schema) {
    id_rules(schema);
    if let Schema::Object(object) = schema {
        object.max_length = Some(MAX_ALLOWANCE_ID_CHARS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CoordinatorConfig, CoordinatorSettings};
    use holdfast_common::config::QueueSettings;
    use holdfast_common::topology::Names;
    use serde_json::Value;

    fn document(limits: Limits, max_ttl_secs: u64) -> Value {
        let config = CoordinatorConfig {
            amqp_url: String::new(),
            names: Names::new("doc"),
            queues: QueueSettings::default(),
            limits,
            settings: CoordinatorSettings {
                max_reservation_ttl_secs: max_ttl_secs,
                ..Default::default()
            },
            dispatch_grace: std::time::Duration::from_secs(30),
        };
        serde_json::to_value(crate::api::openapi_document(&config)).unwrap()
    }

    #[test]
    fn the_document_carries_the_configured_limits() {
        let limits = Limits {
            max_items: 7,
            max_item_cost: 99,
            ..Limits::default()
        };
        let doc = document(limits, 60);
        let at = |pointer: &str| {
            doc.pointer(pointer)
                .unwrap_or_else(|| panic!("{pointer} is not in the document"))
                .clone()
        };
        let schemas = "/components/schemas";
        assert_eq!(
            at(&format!("{schemas}/BatchRequest/properties/items/maxItems")),
            7
        );
        assert_eq!(
            at(&format!(
                "{schemas}/ItemRequest/properties/estimated_cost/maximum"
            )),
            99
        );
        for id in ["batch_id", "account_id"] {
            let field = at(&format!("{schemas}/BatchRequest/properties/{id}"));
            assert_eq!(
                (field["maxLength"].clone(), field["pattern"].clone()),
                (128.into(), ID_PATTERN.into())
            );
        }
        assert_eq!(
            at(&format!(
                "{schemas}/ItemRequest/properties/item_id/maxLength"
            )),
            128
        );
        let preview = at(&format!("{schemas}/PreviewRequest/oneOf"));
        assert!(preview
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["properties"]["count"]["maximum"] == 7));
        let reservation = at(&format!("{schemas}/ReservationRequest/oneOf"));
        // Each way to hold states the TTL bound, beside the preview's body or in it.
        let ttl_max = |v: &Value| {
            std::iter::once(v)
                .chain(v["allOf"].as_array().into_iter().flatten())
                .any(|s| s["properties"]["ttl_seconds"]["maximum"] == 60)
        };
        assert!(
            reservation.as_array().unwrap().iter().all(ttl_max),
            "{reservation:#}"
        );
        assert!(reservation
            .to_string()
            .contains("#/components/schemas/PreviewRequest"));
        // Answers echo what was sent: no bounds there.
        assert!(doc
            .pointer(&format!(
                "{schemas}/Extensions/properties/account_id/pattern"
            ))
            .is_none());
        let id = at("/paths/~1v1~1batches~1{id}/get/parameters/0/schema");
        assert_eq!(
            (id["maxLength"].clone(), id["pattern"].clone()),
            (128.into(), ID_PATTERN.into())
        );
        let allowances = "/paths/~1v1~1accounts~1{id}~1allowances";
        for field in [
            at(&format!(
                "{schemas}/AllowanceRequest/properties/allowance_id"
            )),
            at(&format!(
                "{allowances}~1{{allowance_id}}/put/parameters/1/schema"
            )),
        ] {
            assert_eq!(
                (field["maxLength"].clone(), field["pattern"].clone()),
                (64.into(), ID_PATTERN.into()),
                "{field}"
            );
        }
    }
}
