//! The states of batches, items and holds, and the one place where each is
//! mapped to the text the database stores (and its CHECK constraints allow).
//! Columns of these types read and write through [`FromSql`] and [`ToSql`],
//! so a state is never a bare string literal in the code.

use std::error::Error;
use std::fmt;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use utoipa::ToSchema;

/// An enum whose variants are stored as text: `as_str`, parsing, `Display`,
/// and the PostgreSQL conversions, from one list of (variant, text) pairs.
macro_rules! stored_as_text {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every state, in the order of the lifecycle.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The text stored in the database (and shown in JSON).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The state stored as `text`, if it is one.
            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, text: &str) -> bool {
                self.as_str() == text
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, text: &&str) -> bool {
                self.as_str() == *text
            }
        }

        impl<'a> FromSql<'a> for $name {
            fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
                let text = <&str as FromSql>::from_sql(ty, raw)?;
                $name::parse(text).ok_or_else(|| {
                    format!(concat!("`{}` is not a ", stringify!($name)), text).into()
                })
            }

            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty)
            }
        }

        impl ToSql for $name {
            fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
                self.as_str().to_sql(ty, out)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as ToSql>::accepts(ty)
            }

            to_sql_checked!();
        }
    };
}

stored_as_text! {
    /// Where a batch is in its lifecycle (docs/state-machines.md).
    BatchState {
        /// Insufficient credits: nothing held, nothing runs. Final.
        Denied = "denied",
        /// Held; its jobs are being published.
        Granted = "granted",
        /// Held; every job of the current chunk confirmed by the broker.
        Dispatched = "dispatched",
        /// Cancel requested: running items finish, nothing new starts.
        Cancelling = "cancelling",
        /// Every item settled; the remainder released. Final.
        Completed = "completed",
        /// Past its execution deadline: unsettled items failed. Final.
        Expired = "expired",
        /// Cancelled and closed. Final.
        Cancelled = "cancelled",
    }
}

impl BatchState {
    /// Still holding credits (its hold is open).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            BatchState::Granted | BatchState::Dispatched | BatchState::Cancelling
        )
    }
}

stored_as_text! {
    /// Where an item is.
    ItemState {
        /// A later chunk of a sequential batch: not held yet.
        Queued = "queued",
        /// Held and dispatched (or about to be): waiting for a worker.
        Pending = "pending",
        /// Ran; charged its actual cost (capped at its reservation).
        Succeeded = "succeeded",
        /// Did not produce a result: not charged.
        Failed = "failed",
        /// Never started because its batch was cancelled: not charged.
        Cancelled = "cancelled",
        /// Never runs (left out by the mode, or a chunk that no longer fit).
        Skipped = "skipped",
    }
}

stored_as_text! {
    /// Whether a hold still holds credits.
    HoldState {
        /// Holding its amount.
        Open = "open",
        /// Its batch closed: captured credits posted, the rest released.
        Closed = "closed",
        /// A soft hold past its TTL: every credit released.
        Expired = "expired",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_from_its_text() {
        for s in BatchState::ALL {
            assert_eq!(BatchState::parse(s.as_str()), Some(*s));
        }
        for s in ItemState::ALL {
            assert_eq!(ItemState::parse(s.as_str()), Some(*s));
        }
        for s in HoldState::ALL {
            assert_eq!(HoldState::parse(s.as_str()), Some(*s));
        }
        assert_eq!(BatchState::parse("running"), None);
        assert_eq!(
            serde_json::to_string(&BatchState::Cancelling).unwrap(),
            "\"cancelling\""
        );
    }
}
