//! The JSON wire contract. docs/messages.md shows each type with a complete
//! example; field names here are that contract, so rename nothing lightly.
//!
//! The contract is versioned by [`SCHEMA_VERSION`], carried as
//! `schema_version` on every message Holdfast publishes and accepted on
//! requests (absent means 1). Within a version fields are only ever added,
//! never renamed or retyped; readers ignore fields they do not know. The JSON
//! Schemas in docs/schemas/ are generated from these types ([`crate::schemas`]).

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// The most characters an id (batch, account, item, spender) may have.
pub const MAX_ID_CHARS: usize = 128;

/// Any character but a control character (C0, DEL and C1), as the intake
/// checks ids: the `pattern` of ids in the JSON Schemas and the OpenAPI document.
pub const ID_PATTERN: &str = "^[^\\x00-\\x1F\\x7F-\\x9F]+$";

/// How much of a batch may run when the credits do not cover all of it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every item runs, or none does (the default).
    #[default]
    AllOrNothing,
    /// The longest prefix of the items, in request order, that fits.
    FirstFit,
    /// The longest prefix by descending priority (ties keep request order) that fits.
    PriorityFit,
    /// Exactly the items named in `item_ids`, all or nothing.
    Selected,
    /// Reserve and run chunk by chunk, stopping cleanly when a chunk no longer fits.
    Sequential,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::AllOrNothing,
        Mode::FirstFit,
        Mode::PriorityFit,
        Mode::Selected,
        Mode::Sequential,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::AllOrNothing => "all_or_nothing",
            Mode::FirstFit => "first_fit",
            Mode::PriorityFit => "priority_fit",
            Mode::Selected => "selected",
            Mode::Sequential => "sequential",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// One item of a batch request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct ItemRequest {
    /// Unique within the batch: 1 to 128 characters, no control characters.
    #[schemars(length(min = 1, max = MAX_ID_CHARS), pattern(ID_PATTERN))]
    pub item_id: String,
    /// Estimated cost in the account's smallest credit unit; reserved for the item
    /// (at most `HOLDFAST_MAX_ITEM_COST`, 1,000,000,000 by default).
    #[schema(minimum = 1)]
    #[schemars(range(min = 1))]
    pub estimated_cost: i64,
    /// Higher runs first under `priority_fit`.
    #[serde(default)]
    pub priority: i32,
    /// Opaque to Holdfast; handed to the generator (at most
    /// `HOLDFAST_MAX_PAYLOAD_BYTES`, 65,536 by default, as JSON; no U+0000).
    #[serde(default)]
    pub payload: Value,
}

/// A producer's "Generate All": one message for the whole batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct BatchRequest {
    /// The version of the contract the producer speaks: absent means 1 (what
    /// producers sent before the field existed). A newer major version than
    /// the coordinator knows is `rejected` naming this field.
    #[serde(default = "current_version")]
    #[schema(minimum = 1, default = 1)]
    #[schemars(range(min = 1), default = "current_version")]
    pub schema_version: u32,
    /// The producer's idempotency key: 1 to 128 characters, no control characters.
    #[schemars(length(min = 1, max = MAX_ID_CHARS), pattern(ID_PATTERN))]
    pub batch_id: String,
    /// An existing account: 1 to 128 characters, no control characters.
    #[schema(example = "acme")]
    #[schemars(length(min = 1, max = MAX_ID_CHARS), pattern(ID_PATTERN))]
    pub account_id: String,
    /// At least one item, at most `HOLDFAST_MAX_ITEMS` (10,000 by default); ids unique.
    #[schema(min_items = 1)]
    #[schemars(length(min = 1))]
    pub items: Vec<ItemRequest>,
    /// How much of the batch may run when the credits do not cover all of it.
    #[serde(default)]
    pub mode: Mode,
    /// With `mode: selected` (and only then): the items to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_items = 1)]
    #[schemars(length(min = 1))]
    pub item_ids: Option<Vec<String>>,
    /// A soft hold to consume instead of reserving anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_ID_CHARS))]
    pub reservation_id: Option<String>,
    /// The spender (team, member, key) of the account the batch is charged
    /// to: it fits only if the account and every spender from this one up
    /// to its root cover it (docs/spenders.md). Absent: the account only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "design")]
    #[schemars(length(min = 1, max = MAX_ID_CHARS), pattern(ID_PATTERN))]
    pub spender_id: Option<String>,
}

impl BatchRequest {
    /// SHA-256 of the canonical content: the same batch id with another
    /// content is a conflict. Serialising the parsed fields makes whitespace
    /// and key order irrelevant. `schema_version` is not content (a producer
    /// that starts sending it replays its earlier batches), and the fields
    /// keep the order they had before it existed, so fingerprints recorded by
    /// earlier versions still match.
    pub fn fingerprint(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Content<'a> {
            batch_id: &'a str,
            account_id: &'a str,
            items: &'a [ItemRequest],
            mode: Mode,
            #[serde(skip_serializing_if = "Option::is_none")]
            item_ids: Option<&'a Vec<String>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reservation_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            spender_id: Option<&'a str>,
        }
        let content = Content {
            batch_id: &self.batch_id,
            account_id: &self.account_id,
            items: &self.items,
            mode: self.mode,
            item_ids: self.item_ids.as_ref(),
            reservation_id: self.reservation_id.as_deref(),
            spender_id: self.spender_id.as_deref(),
        };
        let canonical = serde_json::to_vec(&content).expect("a parsed request serialises");
        Sha256::digest(&canonical).to_vec()
    }
}

/// The version of the wire contract this build speaks: `schema_version` on
/// every message Holdfast publishes. Bumped only for a change that is not an
/// addition (a field renamed, retyped or removed), never for a new field.
pub const SCHEMA_VERSION: u32 = 1;

fn current_version() -> u32 {
    SCHEMA_VERSION
}

/// Why a message's `schema_version` cannot be read, or `None` when this build
/// understands it (1 to [`SCHEMA_VERSION`]).
pub fn unsupported_version(version: u64) -> Option<String> {
    match version {
        0 => Some("must be at least 1".into()),
        v if v > u64::from(SCHEMA_VERSION) => Some(format!(
            "version {v} is newer than this Holdfast understands ({SCHEMA_VERSION}); \
             send {SCHEMA_VERSION}, or upgrade Holdfast"
        )),
        _ => None,
    }
}

/// `schema_version` of a message Holdfast reads from another Holdfast
/// process (an item job): absent is 1, a newer major version is an error.
fn known_version<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    match unsupported_version(u64::from(v)) {
        None => Ok(v),
        Some(why) => Err(serde::de::Error::custom(format!("schema_version: {why}"))),
    }
}

/// Why an item of a granted batch does not run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct LeftOut {
    /// The item.
    pub item_id: String,
    /// `did_not_fit` (first_fit, priority_fit) or `not_selected` (selected).
    pub reason: String,
}

/// The batch was reserved in full and its jobs are (being) dispatched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Granted {
    /// From the request.
    pub batch_id: String,
    /// From the request.
    pub account_id: String,
    /// From the request (`all_or_nothing` when it had none).
    pub mode: Mode,
    /// The batch's hold (a UUID).
    pub hold_id: String,
    /// Credits held for the items that run.
    pub reserved: i64,
    /// Items in the request.
    pub items_total: usize,
    /// Items that run, in request order.
    pub item_ids: Vec<String>,
    /// Items that do not run, and why. Never silent.
    pub left_out: Vec<LeftOut>,
    /// Past this instant the reconciler fails unsettled items and releases the rest.
    pub deadline_at: String,
    /// Sequential mode: items reserved per chunk (`reserved` is the first chunk's cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<usize>,
    /// The grants the hold took `reserved` from, in the order it used them.
    #[serde(default)]
    pub breakdown: Vec<Draw>,
    /// "120 credits held: 80 from your plan allowance (resets on 1 January), 40 from top-ups."
    #[serde(default)]
    pub message: String,
    /// Said when credits the hold took expire before `deadline_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_notice: Option<String>,
}

/// Where a grant's credits come from; also its rank in the burn-down order
/// among grants of equal priority and expiry.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum GrantSource {
    /// A periodic allowance of the account's plan.
    Plan,
    /// Credits bought.
    Purchase,
    /// Credits given away (used before plan and bought credits).
    Promotion,
    /// Credits granted by an operator (and balances from before grants).
    #[default]
    Manual,
}

impl GrantSource {
    pub const ALL: [GrantSource; 4] = [
        GrantSource::Plan,
        GrantSource::Purchase,
        GrantSource::Promotion,
        GrantSource::Manual,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GrantSource::Plan => "plan",
            GrantSource::Purchase => "purchase",
            GrantSource::Promotion => "promotion",
            GrantSource::Manual => "manual",
        }
    }
}

impl std::str::FromStr for GrantSource {
    type Err = crate::ledger::LedgerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GrantSource::ALL
            .into_iter()
            .find(|g| g.as_str() == s)
            .ok_or_else(|| {
                crate::ledger::LedgerError::Invalid(format!(
                    "source must be plan, purchase, promotion or manual, got `{s}`"
                ))
            })
    }
}

/// What a batch draws (or would draw) from one grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Draw {
    /// The grant.
    pub grant_id: String,
    /// Where its credits come from.
    pub source: GrantSource,
    /// Credits taken (or that would be taken) from it.
    pub amount: i64,
    /// RFC 3339; absent: the grant never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// A subset of the items that the available credits cover.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct FitSet {
    /// How many items.
    pub count: usize,
    /// Their cost.
    pub cost: i64,
    /// Which, in request order.
    pub item_ids: Vec<String>,
}

/// One thing a person can do about an insufficient batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Choice {
    /// `generate_first_fit`, `select_items`, `add_credits` (when the
    /// account's credits bind) or `raise_limit` (when a spender's limit binds:
    /// ask an admin to raise it).
    pub action: String,
    /// What to show on the button.
    pub label: String,
    /// For `generate_first_fit`: the request to send (same items, `mode: first_fit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_count: Option<usize>,
    /// For `generate_first_fit`: its cost; for `add_credits` and
    /// `raise_limit`: the shortfall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<i64>,
    /// For `raise_limit`: the spender whose limit binds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spender_id: Option<String>,
}

/// What a level of a decision is: the account's credits, or a spender's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LevelKind {
    Account,
    Spender,
}

/// How often a spender's limit resets.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LimitPeriod {
    Day,
    Week,
    Month,
    /// Never: a lifetime cap.
    #[default]
    None,
}

impl LimitPeriod {
    pub const ALL: [LimitPeriod; 4] = [
        LimitPeriod::Day,
        LimitPeriod::Week,
        LimitPeriod::Month,
        LimitPeriod::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitPeriod::Day => "day",
            LimitPeriod::Week => "week",
            LimitPeriod::Month => "month",
            LimitPeriod::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<LimitPeriod> {
        LimitPeriod::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// "daily", "weekly", "monthly"; nothing for a lifetime cap.
    pub fn adjective(self) -> Option<&'static str> {
        match self {
            LimitPeriod::Day => Some("daily"),
            LimitPeriod::Week => Some("weekly"),
            LimitPeriod::Month => Some("monthly"),
            LimitPeriod::None => None,
        }
    }
}

/// One level a batch must fit: the account, or a spender on the path from the
/// named spender to its root, with what it has left for this batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Level {
    /// `account` or `spender`.
    pub level: LevelKind,
    /// The spender (absent for the account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spender_id: Option<String>,
    /// What the spender is to people: `team`, `member`, `key`, ... (absent for the account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The spender's limit per period; absent: no limit (or the account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// `day`, `week`, `month` or `none` (absent for the account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<LimitPeriod>,
    /// Captured this period by batches charged to the spender or below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<i64>,
    /// Held now by open batches of this period charged to the spender or below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<i64>,
    /// What a batch may take at this level now: the account's available
    /// credits, or the spender's `limit - used - held` (absent: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<i64>,
    /// RFC 3339: when the spender's period ends and its usage starts from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
}

/// Nothing was held and nothing runs; the person decides what happens next.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Insufficient {
    /// From the request.
    pub batch_id: String,
    /// From the request.
    pub account_id: String,
    /// From the request (`all_or_nothing` when it had none).
    pub mode: Mode,
    /// Cost of what the request asked to run.
    pub total_cost: i64,
    /// What the batch could use when it was decided: the account's available
    /// credits, or less when a spender on its path has less left (`limited_by`).
    pub available: i64,
    /// `total_cost - available`.
    pub shortfall: i64,
    /// Items the request asked to run (N of "k out of N").
    pub items_total: usize,
    /// k of "k out of N": the first-fit count.
    pub fit_count: usize,
    /// The longest prefix in request order that fits.
    pub first_fit: FitSet,
    /// The longest prefix by descending priority that fits, listed in request order.
    pub priority_fit: FitSet,
    /// "You have enough credits to generate 8 out of 10 items."
    pub message: String,
    /// "This action costs 120 credits. You have 100 credits available (20 short)."
    pub detail: String,
    /// The choices to offer, in order.
    pub options: Vec<Choice>,
    /// The grants the first-fit option (`first_fit`) would draw from.
    #[serde(default)]
    pub breakdown: Vec<Draw>,
    /// The level that binds: the account, or the spender whose remaining
    /// limit is the tightest on the request's spender path (k of N is
    /// computed against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limited_by: Option<Level>,
}

/// One problem with a request, naming the field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct FieldError {
    /// A JSON path such as `items[3].estimated_cost`, or `body` for the message itself.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The request could not be decided as sent; it was parked in the dead-letter queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Rejected {
    /// `null` when the body did not even carry a readable batch id.
    pub batch_id: Option<String>,
    /// The request's account, when it was read.
    pub account_id: Option<String>,
    /// A one-line summary of `errors`.
    pub reason: String,
    /// One entry per problem.
    pub errors: Vec<FieldError>,
}

impl Rejected {
    pub fn new(batch_id: Option<String>, errors: Vec<FieldError>) -> Self {
        let reason = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            batch_id,
            account_id: None,
            reason,
            errors,
        }
    }

    pub fn one(batch_id: Option<String>, field: &str, reason: impl Into<String>) -> Self {
        Self::new(
            batch_id,
            vec![FieldError {
                field: field.into(),
                reason: reason.into(),
            }],
        )
    }
}

/// The coordinator's answer to a batch request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    Granted(Granted),
    Insufficient(Insufficient),
    Rejected(Rejected),
}

impl Decision {
    /// `granted`, `insufficient` or `rejected`: the metric label and event routing key suffix.
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Granted(_) => "granted",
            Decision::Insufficient(_) => "insufficient",
            Decision::Rejected(_) => "rejected",
        }
    }

    pub fn batch_id(&self) -> Option<&str> {
        match self {
            Decision::Granted(g) => Some(&g.batch_id),
            Decision::Insufficient(i) => Some(&i.batch_id),
            Decision::Rejected(r) => r.batch_id.as_deref(),
        }
    }
}

/// "What would this cost, and what fits?" Holds nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Preview {
    /// From the request.
    pub account_id: String,
    /// From the request (`all_or_nothing` when it had none).
    pub mode: Mode,
    /// Cost of what the request asks to run.
    pub total_cost: i64,
    /// What the batch could use now: the account's available credits, or
    /// less when a spender on its path has less left.
    pub available: i64,
    /// True when the request would be granted as it stands.
    pub fits: bool,
    /// Items the request asks to run.
    pub items_total: usize,
    /// k of "k out of N": the first-fit count (N when everything fits).
    pub fit_count: usize,
    pub first_fit: FitSet,
    pub priority_fit: FitSet,
    /// Credits missing for everything (0 when it fits).
    pub shortfall: i64,
    /// "This action will cost ~120 credits: 80 from your plan allowance
    /// (resets on 1 January), 40 from top-ups. You have 195 credits."
    pub message: String,
    /// When short: "You have enough credits to generate 7 out of 10 items."
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
    /// The grants the batch would draw from (as much of `total_cost` as is
    /// available), in the order it would use them.
    #[serde(default)]
    pub breakdown: Vec<Draw>,
    /// Said when credits the batch would use expire before its deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_notice: Option<String>,
    /// The spender the batch would be charged to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spender_id: Option<String>,
    /// Every level the batch must fit: the account, then the spenders from
    /// the root down to `spender_id`. Only the account without a spender.
    #[serde(default)]
    pub levels: Vec<Level>,
    /// The tightest level when the batch does not fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limited_by: Option<Level>,
}

/// A batch to price (the body of a preview on `<namespace>.previews`, of
/// `POST /v1/preview` and of a soft hold): `items` as in a batch request, or
/// `count` items of `cost` each. No `batch_id`: a preview decides nothing.
/// The intake parses it with the batch request's rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(untagged)]
pub enum PreviewRequest {
    /// The items, as a batch request carries them.
    Items {
        /// The contract's version; absent means 1.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(minimum = 1)]
        #[schemars(range(min = 1))]
        schema_version: Option<u32>,
        /// The account whose credits are counted.
        #[schema(example = "acme")]
        #[schemars(length(min = 1, max = MAX_ID_CHARS), pattern(ID_PATTERN))]
        account_id: String,
        /// The items (ids unique, costs positive).
        #[schema(min_items = 1)]
        #[schemars(length(min = 1))]
        items: Vec<ItemRequest>,
        /// How much may run when the credits do not cover everything (default `all_or_nothing`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<Mode>,
        /// With `mode: selected` (and only then): the items to run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(min_items = 1)]
        #[schemars(length(min = 1))]
        item_ids: Option<Vec<String>>,
        /// The spender the batch would be charged to: priced against the
        /// account and every spender from it up to its root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 1, max = MAX_ID_CHARS), pattern(ID_PATTERN))]
        spender_id: Option<String>,
    },
    /// `count` items (ids `item-1` … `item-N`) of `cost` each.
    Count {
        /// The contract's version; absent means 1.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(minimum = 1)]
        #[schemars(range(min = 1))]
        schema_version: Option<u32>,
        /// The account whose credits are counted.
        #[schema(example = "acme")]
        #[schemars(length(min = 1, max = MAX_ID_CHARS), pattern(ID_PATTERN))]
        account_id: String,
        /// How many items (at most `HOLDFAST_MAX_ITEMS`, 10,000 by default).
        #[schema(minimum = 1)]
        #[schemars(range(min = 1))]
        count: u64,
        /// The estimated cost of each.
        #[schema(minimum = 1)]
        #[schemars(range(min = 1))]
        cost: i64,
        /// How much may run when the credits do not cover everything (default `all_or_nothing`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<Mode>,
        /// With `mode: selected` (and only then): the items to run, by generated id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(min_items = 1)]
        #[schemars(length(min = 1))]
        item_ids: Option<Vec<String>>,
        /// The spender the batch would be charged to: priced against the
        /// account and every spender from it up to its root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 1, max = MAX_ID_CHARS), pattern(ID_PATTERN))]
        spender_id: Option<String>,
    },
}

/// A soft hold: credits set aside for a batch that has not started yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Reservation {
    pub reservation_id: String,
    pub account_id: String,
    pub amount: i64,
    /// `open`, `closed` (cancelled, or consumed by a batch that finished) or `expired`.
    pub state: String,
    /// When the hold expires unless a batch consumes it; `None` once consumed.
    pub expires_at: Option<String>,
    /// The batch that consumed the hold, if any.
    pub batch_id: Option<String>,
    /// The spender the hold is charged to (and every spender above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spender_id: Option<String>,
}

/// Which publication of its item a job is (`attempt` on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The first publication of a chunk's jobs (`1`): by the coordinator that
    /// granted the batch, or by whoever reserved a sequential batch's next chunk.
    First,
    /// Published again (`2`): a redelivered request resuming its dispatch, or
    /// a reconciler re-dispatching a batch whose coordinator died.
    Again,
}

impl Attempt {
    /// The number on the wire.
    pub fn number(self) -> u32 {
        match self {
            Attempt::First => 1,
            Attempt::Again => 2,
        }
    }
}

/// One item to generate (coordinator → jobs queue). Its AMQP `message_id` is
/// [`ItemJob::message_id`]: `batch_id:item_id`, or a fixed-length hash of the
/// two when that would not fit an AMQP short string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ItemJob {
    /// The contract's version ([`SCHEMA_VERSION`]); absent means 1. A worker
    /// parks a job of a newer version than it understands.
    #[serde(default = "current_version", deserialize_with = "known_version")]
    #[schemars(range(min = 1), default = "current_version")]
    pub schema_version: u32,
    /// The item's batch.
    pub batch_id: String,
    /// The item.
    pub item_id: String,
    /// The account it is charged to.
    pub account_id: String,
    /// The most this item may be charged.
    pub reserved: i64,
    /// The item's `payload` from the request (`null` if none).
    #[serde(default)]
    pub payload: Value,
    /// 1 for the first dispatch; 2 when the jobs were sent again (a redelivered request or a reconciler).
    #[schemars(range(min = 1))]
    pub attempt: u32,
}

impl ItemJob {
    /// The job's AMQP `message_id`, at most [`MAX_SHORT_STRING`] bytes by
    /// construction: see [`job_message_id`].
    pub fn message_id(&self) -> String {
        job_message_id(&self.batch_id, &self.item_id)
    }
}

/// The most bytes AMQP 0-9-1 allows in a short string (message ids,
/// correlation ids, `reply_to`, queue and exchange names, header keys).
pub const MAX_SHORT_STRING: usize = 255;

/// `batch_id:item_id` when it fits in [`MAX_SHORT_STRING`] bytes (every id
/// of 127 ASCII characters or fewer does); otherwise `sha256:` and the hex
/// SHA-256 of both ids (71 bytes), each id prefixed by its length so that no
/// two pairs share an input. Ids are up to 128 characters of UTF-8, so
/// `batch_id:item_id` can reach 1,025 bytes; the full ids are always in the
/// job's body. Stable: every dispatch of an item gives it the same id.
pub fn job_message_id(batch_id: &str, item_id: &str) -> String {
    if batch_id.len() + 1 + item_id.len() <= MAX_SHORT_STRING {
        return format!("{batch_id}:{item_id}");
    }
    let mut hasher = Sha256::new();
    for id in [batch_id, item_id] {
        hasher.update((id.len() as u64).to_be_bytes());
        hasher.update(id.as_bytes());
    }
    hashed(hasher)
}

/// `value` itself when it fits in [`MAX_SHORT_STRING`] bytes, otherwise
/// `sha256:` and the hex SHA-256 of it (71 bytes): a stable stand-in for a
/// long value in a short string (a producer's correlation id, say).
pub fn short_id(value: &str) -> std::borrow::Cow<'_, str> {
    if value.len() <= MAX_SHORT_STRING {
        return value.into();
    }
    let mut hasher = Sha256::new();
    hasher.update(value.as_bytes());
    hashed(hasher).into()
}

fn hashed(hasher: Sha256) -> String {
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hasher.finalize() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Counts and credits of a batch, as in progress and completed events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct BatchFigures {
    /// Items in the request.
    pub items_total: i64,
    /// Items reserved to run so far.
    pub run: i64,
    /// Items done and charged.
    pub succeeded: i64,
    /// Items that failed (not charged); includes items still unsettled at the deadline.
    pub failed: i64,
    /// Never started because the batch was cancelled (not charged).
    #[serde(default)]
    pub cancelled: i64,
    /// Never held: left out by the mode, or (sequential) not reserved.
    pub skipped: i64,
    /// Items reserved and not settled yet.
    pub pending: i64,
    /// Credits of the batch's hold.
    pub reserved: i64,
    /// Credits charged so far.
    pub captured: i64,
    /// Credits returned to the account (0 until the batch closes).
    pub released: i64,
    /// Actual cost reported above the reservations: recorded, not charged.
    pub overrun: i64,
}

/// Events on the topic exchange `<namespace>.events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Routing key `decision.<granted|insufficient|rejected>`; the body is the decision.
    Decision(Decision),
    /// Only as the reply to a request on `<namespace>.previews`; never on the exchange.
    Preview(Preview),
    /// Routing key `batch.progress`, coalesced: at most one per batch per interval.
    Progress {
        /// The producer's batch id.
        batch_id: String,
        /// The account the batch is charged to.
        account_id: String,
        /// The batch's counts and credits so far.
        #[serde(flatten)]
        figures: BatchFigures,
    },
    /// Routing key `batch.completed`: the batch closed and its hold resolved.
    Completed {
        /// The producer's batch id.
        batch_id: String,
        /// The account the batch is charged to.
        account_id: String,
        /// `completed`, `expired` or `cancelled`.
        state: String,
        /// The batch's final counts and credits.
        #[serde(flatten)]
        figures: BatchFigures,
    },
}

impl Event {
    /// The body Holdfast publishes (a reply or an event): the event with the
    /// contract's `schema_version` ([`SCHEMA_VERSION`]) first.
    pub fn to_wire(&self) -> serde_json::Result<Vec<u8>> {
        #[derive(Serialize)]
        struct Wire<'a> {
            schema_version: u32,
            #[serde(flatten)]
            event: &'a Event,
        }
        serde_json::to_vec(&Wire {
            schema_version: SCHEMA_VERSION,
            event: self,
        })
    }

    pub fn routing_key(&self) -> String {
        match self {
            Event::Decision(d) => format!("decision.{}", d.kind()),
            Event::Preview(_) => "preview".into(),
            Event::Progress { .. } => "batch.progress".into(),
            Event::Completed { .. } => "batch.completed".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_key_order_and_whitespace() {
        let a: BatchRequest = serde_json::from_str(
            r#"{"batch_id":"b","account_id":"a","items":[{"item_id":"1","estimated_cost":5,"payload":{"x":1,"y":2}}]}"#,
        )
        .unwrap();
        let b: BatchRequest = serde_json::from_str(
            r#"{ "items": [ {"payload":{"y":2,"x":1}, "estimated_cost":5, "item_id":"1"} ], "account_id":"a", "batch_id":"b" }"#,
        )
        .unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut c = a.clone();
        c.items[0].estimated_cost = 6;
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Fingerprints are stored with each decided batch: they must not change
    /// when the request type gains a field, or a producer's retry of a batch
    /// decided before an upgrade would be refused as a conflict. The values
    /// are the SHA-256 of the canonical bodies as earlier versions wrote them.
    #[test]
    fn fingerprints_are_those_recorded_before_schema_version() {
        let full: BatchRequest = serde_json::from_str(
            r#"{"schema_version":1,"batch_id":"b","account_id":"a","mode":"selected","item_ids":["1"],
                "reservation_id":"r","spender_id":"s","items":[{"item_id":"1","estimated_cost":5,"payload":{"x":1}}]}"#,
        )
        .unwrap();
        assert_eq!(
            hex(&full.fingerprint()),
            "489adddb136ba591d10b46a4fc61f1a86cf98321b31390073a3ea483242f0d15"
        );
        let old: BatchRequest = serde_json::from_str(
            r#"{"batch_id":"b","account_id":"a","items":[{"item_id":"1","estimated_cost":5}]}"#,
        )
        .unwrap();
        assert_eq!(old.schema_version, 1, "absent means 1");
        assert_eq!(
            hex(&old.fingerprint()),
            "c1a6beaa6754481100248eb61c00b567e8d9247a43a7dbc3a08a522a2580e513"
        );
    }

    #[test]
    fn published_messages_carry_the_schema_version() {
        let events = [
            Event::Decision(Decision::Rejected(Rejected::one(None, "body", "x"))),
            Event::Progress {
                batch_id: "b".into(),
                account_id: "a".into(),
                figures: BatchFigures::default(),
            },
        ];
        for event in events {
            let wire: Value = serde_json::from_slice(&event.to_wire().unwrap()).unwrap();
            assert_eq!(wire["schema_version"], SCHEMA_VERSION, "{wire}");
            assert_eq!(
                serde_json::from_value::<Event>(wire).unwrap(),
                event,
                "readers ignore it"
            );
        }
        let job = ItemJob {
            schema_version: SCHEMA_VERSION,
            batch_id: "b".into(),
            item_id: "i".into(),
            account_id: "a".into(),
            reserved: 3,
            payload: Value::Null,
            attempt: 1,
        };
        let wire = serde_json::to_value(&job).unwrap();
        assert_eq!(wire["schema_version"], 1);
    }

    #[test]
    fn item_jobs_of_a_newer_version_do_not_parse() {
        let body = |v: &str| {
            format!(
                r#"{{{v}"batch_id":"b","item_id":"i","account_id":"a","reserved":3,"attempt":1}}"#
            )
        };
        let old: ItemJob = serde_json::from_str(&body("")).unwrap();
        assert_eq!(
            old.schema_version, 1,
            "a job queued by an older coordinator"
        );
        let err = serde_json::from_str::<ItemJob>(&body(r#""schema_version":2,"#)).unwrap_err();
        assert!(
            err.to_string()
                .contains("schema_version: version 2 is newer"),
            "{err}"
        );
        assert!(serde_json::from_str::<ItemJob>(&body(r#""schema_version":0,"#)).is_err());
    }

    #[test]
    fn decisions_are_tagged() {
        let d = Decision::Rejected(Rejected::one(None, "body", "not JSON"));
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["decision"], "rejected");
        assert_eq!(v["reason"], "body: not JSON");
        assert_eq!(serde_json::from_value::<Decision>(v).unwrap(), d);
    }

    #[test]
    fn job_message_ids_fit_a_short_string_and_stay_distinct() {
        let long = "🦀".repeat(128);
        assert_eq!(job_message_id("b", "i"), "b:i");
        let plain = job_message_id(&"b".repeat(127), &"i".repeat(127));
        assert_eq!(plain.len(), 255);
        let a = job_message_id(&long, &long);
        let b = job_message_id(&long, &"🦀".repeat(127));
        let c = job_message_id(&"🦀".repeat(127), &long);
        for id in [&a, &b, &c] {
            assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
        }
        assert!(a != b && b != c && a != c);
        assert_eq!(a, job_message_id(&long, &long), "stable");
        assert_eq!(short_id("corr"), "corr");
        assert_eq!(short_id(&long).len(), 71);
    }
}
