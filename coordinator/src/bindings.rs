//! Account bindings of AMQP producers (`HOLDFAST_AMQP_ACCOUNT_BINDINGS`):
//! which broker users may submit batch requests for which accounts. When set,
//! a request arriving over AMQP must carry a `user_id` property (RabbitMQ
//! refuses a `user_id` other than the connection's login, so a set one is
//! the sender's real broker user) bound to its `account_id`; any other is
//! answered `rejected` on the field `user_id`, before the ledger holds
//! anything. Requests over HTTP are governed by their API key instead.

use std::collections::{HashMap, HashSet};

/// The bindings: broker user → accounts (`*`: every account).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountBindings {
    by_user: HashMap<String, HashSet<String>>,
}

/// The account that stands for every account.
pub const ANY_ACCOUNT: &str = "*";

impl AccountBindings {
    /// Parse `user:account,user:account,…` (split at each pair's first `:`;
    /// `user:*` binds every account). At least one pair; spaces around the
    /// pairs are ignored.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut by_user: HashMap<String, HashSet<String>> = HashMap::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((user, account)) = pair.split_once(':') else {
                return Err(format!("`{pair}` is not `user:account`"));
            };
            if user.is_empty() || account.is_empty() {
                return Err(format!(
                    "`{pair}`: both the user and the account are needed"
                ));
            }
            by_user
                .entry(user.to_string())
                .or_default()
                .insert(account.to_string());
        }
        if by_user.is_empty() {
            return Err("give at least one `user:account` pair".into());
        }
        Ok(Self { by_user })
    }

    /// `Ok` when `user_id` may submit for `account_id`, or the reason it may not.
    pub fn check(&self, user_id: Option<&str>, account_id: &str) -> Result<(), String> {
        let Some(user) = user_id else {
            return Err(
                "is required: account bindings are on, and the request has no user_id property (set it to your RabbitMQ user name)"
                    .into(),
            );
        };
        match self.by_user.get(user) {
            Some(accounts) if accounts.contains(account_id) || accounts.contains(ANY_ACCOUNT) => {
                Ok(())
            }
            _ => Err(format!(
                "user_id `{user}` is not bound to account_id `{account_id}`"
            )),
        }
    }
}

impl std::str::FromStr for AccountBindings {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let b = AccountBindings::parse("alice:acme, alice:beta,ops:*,").unwrap();
        assert_eq!(b.check(Some("alice"), "acme"), Ok(()));
        assert_eq!(b.check(Some("alice"), "beta"), Ok(()));
        assert_eq!(b.check(Some("ops"), "anything"), Ok(()));
        assert_eq!(
            b.check(Some("alice"), "gamma").unwrap_err(),
            "user_id `alice` is not bound to account_id `gamma`"
        );
        assert!(b.check(Some("mallory"), "acme").is_err());
        assert!(b
            .check(None, "acme")
            .unwrap_err()
            .starts_with("is required"));
        assert_eq!(
            AccountBindings::parse("a:x:y")
                .unwrap()
                .check(Some("a"), "x:y"),
            Ok(())
        );
        for bad in ["", " , ", "alice", ":acme", "alice:"] {
            assert!(AccountBindings::parse(bad).is_err(), "{bad}");
        }
    }
}
