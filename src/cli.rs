//! The operator's command line: every subcommand and its flags, as clap
//! parses them. [`crate::commands::run`] carries them out.

use clap::{Parser, Subcommand};
use holdfast_common::config::{Connections, Limits, QueueSettings};
use holdfast_common::ledger::{GrantSource, Period};
use holdfast_common::messages::LimitPeriod;
use holdfast_coordinator::keys::Scope;

use crate::fleet::FleetSettings;

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Credit quotas for Generate All batches: one hold per batch, jobs only when granted."
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Connections,
    /// Print data as JSON (`submit`: one JSON object per line).
    #[arg(long, global = true, help_heading = "Output")]
    pub json: bool,
    /// Write logs as JSON lines.
    #[arg(
        long,
        env = "HOLDFAST_LOG_JSON",
        global = true,
        help_heading = "Output"
    )]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create the database if missing and apply pending migrations (safe to repeat).
    Migrate,
    /// Run every role in one process: coordinator, worker, reconciler, HTTP API.
    Run(FleetSettings),
    /// Run the coordinator role only.
    Coordinator(FleetSettings),
    /// Run the worker role only.
    Worker(FleetSettings),
    /// Run the reconciler role only.
    Reconciler(FleetSettings),
    /// Accounts: create, grant credits, allowances, show balances.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Publish a batch request like a producer would and print the decision.
    Submit(SubmitArgs),
    /// Batches.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Recompute every balance and hold from the journal, and name the holds
    /// stuck past their deadline, TTL or dispatch lease; exit 1 on either.
    Audit(AuditArgs),
    /// A scripted Generate All scenario on the local services.
    Demo(FleetSettings),
    /// Price a batch request against the account's credits; holds nothing.
    /// Exit 0 when it fits, 2 when it does not, 3 when the input is invalid.
    Preview(PreviewArgs),
    /// Hold credits for a while (a soft hold) so that a batch can start later.
    Reserve(ReserveArgs),
    /// Soft holds: show or cancel one.
    #[command(subcommand)]
    Reservation(ReservationCommand),
    /// Spenders (teams, members, keys) inside an account, with limits per period.
    #[command(subcommand)]
    Spender(SpenderCommand),
    /// API keys of the HTTP API: create (shown once), list, revoke.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The least-privilege RabbitMQ permissions of a role's broker user on the
    /// namespace: its configure, write and read regexes, one a line (see
    /// scripts/rabbitmq-users.sh, which applies them).
    AmqpPermissions {
        /// The broker role: producer, coordinator, worker or reconciler.
        #[arg(value_enum, value_name = "ROLE")]
        role: holdfast_common::topology::BrokerRole,
    },
    /// Write the JSON Schema of every wire message (generated from the code)
    /// to a directory, one file per message; `make schemas` runs it.
    Schemas {
        /// Where to write them.
        #[arg(long, default_value = "docs/schemas")]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
pub enum SpenderCommand {
    /// Create or change a spender: its parent, kind, limit and period (the
    /// whole definition: what is not given is cleared).
    Set {
        /// The account the spender belongs to.
        #[arg(value_name = "ACCOUNT")]
        account: String,
        /// The spender's id, unique within the account.
        #[arg(value_name = "SPENDER")]
        spender: String,
        /// The spender above it (same account); none: a root.
        #[arg(long)]
        parent: Option<String>,
        /// What it is to people (team, member, key, ...): decisions say
        /// "Your team 'design' has ...".
        #[arg(long)]
        kind: Option<String>,
        /// Most credits held plus captured per period; none: no limit.
        #[arg(long, allow_negative_numbers = true, requires = "period")]
        limit: Option<i64>,
        /// day, week, month (calendar, UTC unless anchored) or none (a lifetime cap).
        #[arg(long, value_parser = parse_limit_period)]
        period: Option<LimitPeriod>,
        /// Start of one period (RFC 3339, not in the future); none: calendar periods in UTC.
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        anchor: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Show one spender, or every spender of the account: limit, used, held,
    /// remaining, when it resets, and the spenders below it.
    Show {
        /// The account the spenders belong to.
        #[arg(value_name = "ACCOUNT")]
        account: String,
        /// One spender's id; none: every spender of the account.
        #[arg(value_name = "SPENDER")]
        spender: Option<String>,
    },
    /// Remove a spender with nothing below it and no open hold.
    Delete {
        /// The account the spender belongs to.
        #[arg(value_name = "ACCOUNT")]
        account: String,
        /// The spender's id.
        #[arg(value_name = "SPENDER")]
        spender: String,
    },
}

fn parse_limit_period(s: &str) -> Result<LimitPeriod, String> {
    LimitPeriod::parse(s).ok_or_else(|| format!("`{s}`: expected day, week, month or none"))
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a key and print it once (only its hash is stored).
    Create(KeyCreateArgs),
    /// List every key (never their secrets), revoked and expired ones too.
    List,
    /// Revoke a key by its id: refused from now on (by running processes
    /// within HOLDFAST_API_KEY_CACHE_SECS).
    Revoke {
        /// The key's id: the 12 characters after `hf_live_` (as `key list` shows).
        #[arg(value_name = "KEY_ID")]
        id: String,
    },
}

#[derive(clap::Args)]
pub struct KeyCreateArgs {
    /// reader (read batches, reservations, accounts), producer (also
    /// preview, reserve, submit, cancel) or admin (everything: grants,
    /// allowances, keys; every account).
    #[arg(long, value_parser = parse_scope)]
    pub scope: Scope,
    /// An account the key may use (repeat for several). A reader or producer
    /// key needs at least one, or --all-accounts.
    #[arg(long = "account", value_name = "ID")]
    pub accounts: Vec<String>,
    /// The key may use every account (always so for admin keys).
    #[arg(long, conflicts_with = "accounts")]
    pub all_accounts: bool,
    /// The key expires this many days from now (default: never).
    #[arg(long, value_name = "DAYS",
          value_parser = clap::value_parser!(u32).range(1..=holdfast_coordinator::keys::MAX_KEY_DAYS as i64))]
    pub expires_in: Option<u32>,
    /// What the key is for (shown by `key list`).
    #[arg(long, value_name = "TEXT")]
    pub name: Option<String>,
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    s.parse()
}

#[derive(Subcommand)]
pub enum AccountCommand {
    /// Create an account with no credits.
    Create {
        /// The new account's id (1 to 128 characters).
        #[arg(value_name = "ACCOUNT")]
        id: String,
    },
    /// Add credits to an account, as one grant.
    Grant {
        /// The account to add credits to.
        #[arg(value_name = "ACCOUNT")]
        id: String,
        /// Credits to add, in the smallest unit (a positive whole number).
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        /// What is left of the grant expires this many seconds from now.
        #[arg(long, value_name = "SECS", conflicts_with = "expires_at")]
        expires_in: Option<u64>,
        /// What is left of the grant expires at this time (RFC 3339).
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// Lower is used first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// plan, purchase, promotion or manual.
        #[arg(long, default_value = "manual", value_parser = parse_source)]
        source: GrantSource,
        /// Idempotency key within the account (default: a new id). The same
        /// id with the same terms adds nothing the second time.
        #[arg(long, value_name = "G")]
        grant_id: Option<String>,
        /// A reference stored with the grant and in the journal (invoice, reason).
        #[arg(long, value_name = "T")]
        note: Option<String>,
        /// Create the account if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Void what a grant has left (what open holds took of it stays theirs).
    Void {
        /// The account the grant belongs to.
        #[arg(value_name = "ACCOUNT")]
        id: String,
        /// The grant's id (as `account show` lists it).
        #[arg(value_name = "GRANT_ID")]
        grant_id: String,
    },
    /// Give an account credits every period (a plan's allowance): the
    /// reconciler issues each period's `plan` grant once the period begins.
    Allowance {
        /// The account that receives the credits.
        #[arg(value_name = "ACCOUNT")]
        id: String,
        /// Credits each period, in the smallest unit (a positive whole number).
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        /// day, week or month (a calendar month, in UTC).
        #[arg(long, value_parser = parse_period)]
        period: Period,
        /// The start of the first period (RFC 3339, at most 366 days ago;
        /// missed periods are issued at once). Default: now.
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        anchor: Option<chrono::DateTime<chrono::Utc>>,
        /// Most unused credits carried from one period into the next.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 0,
            allow_negative_numbers = true
        )]
        rollover_cap: i64,
        /// Idempotency key within the account (default: a new id). The same
        /// id with the same terms changes nothing the second time.
        #[arg(long, value_name = "A")]
        allowance_id: Option<String>,
    },
    /// Change an allowance's terms from its next period on.
    AllowanceChange {
        /// The account the allowance belongs to.
        #[arg(value_name = "ACCOUNT")]
        id: String,
        /// The allowance's id (as `account show` lists it).
        #[arg(value_name = "ALLOWANCE_ID")]
        allowance_id: String,
        /// Credits each period from the next period on.
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        /// day, week or month; a new length starts at the end of the current period.
        #[arg(long, value_parser = parse_period)]
        period: Period,
        /// Most unused credits carried into each period from the next one on.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 0,
            allow_negative_numbers = true
        )]
        rollover_cap: i64,
    },
    /// Stop an allowance after its current period (its current grant stays).
    AllowanceStop {
        /// The account the allowance belongs to.
        #[arg(value_name = "ACCOUNT")]
        id: String,
        /// The allowance's id (as `account show` lists it).
        #[arg(value_name = "ALLOWANCE_ID")]
        allowance_id: String,
    },
    /// Show balance, held and available credits, the grants, the allowances and the open holds.
    Show {
        /// The account's id.
        #[arg(value_name = "ACCOUNT")]
        id: String,
    },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("not an RFC 3339 time ({e}); for example 2027-01-01T00:00:00Z"))
}

fn parse_period(s: &str) -> Result<Period, String> {
    s.parse()
        .map_err(|e: holdfast_common::ledger::LedgerError| e.to_string())
}

fn parse_source(s: &str) -> Result<GrantSource, String> {
    s.parse()
        .map_err(|e: holdfast_common::ledger::LedgerError| e.to_string())
}

#[derive(Subcommand)]
pub enum BatchCommand {
    /// Show a batch: decision, hold, figures and items.
    Show {
        /// The batch's id (the request's `batch_id`).
        #[arg(value_name = "BATCH_ID")]
        id: String,
    },
    /// Cancel a running batch: nothing new starts, the rest is released.
    Cancel {
        /// The batch's id (the request's `batch_id`).
        #[arg(value_name = "BATCH_ID")]
        id: String,
    },
}

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Call a hold stuck only once it is this many seconds past its deadline,
    /// TTL or dispatch lease (a running reconciler resolves it before then).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub stuck_after: u64,
}

#[derive(clap::Args)]
pub struct PreviewArgs {
    /// The request as JSON (`items`, or `count` and `cost`): a file path, or `-` for standard input.
    #[arg(value_name = "FILE")]
    pub file: String,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub pricing: PricingSettings,
}

/// The coordinator settings a price depends on: the same flags and variables
/// as the coordinator's, so that a preview prices as the fleet decides.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Pricing (as the coordinator's)")]
pub struct PricingSettings {
    /// Seconds a granted batch may run before the reconciler closes it (the
    /// preview's expiry notice names grants that expire sooner).
    #[arg(long, env = "HOLDFAST_EXECUTION_TIMEOUT_SECS", default_value_t = 3600)]
    pub execution_timeout_secs: u64,
    /// Sequential mode: items reserved per chunk.
    #[arg(long, env = "HOLDFAST_SEQUENTIAL_CHUNK", default_value_t = 10)]
    pub sequential_chunk: usize,
}

impl PricingSettings {
    pub fn execution_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.execution_timeout_secs)
    }
}

#[derive(clap::Args)]
pub struct ReserveArgs {
    /// The account to hold credits of.
    #[arg(value_name = "ACCOUNT")]
    pub account: String,
    /// Credits to hold, in the smallest unit.
    #[arg(allow_negative_numbers = true)]
    pub amount: i64,
    /// Seconds until the hold expires unless a batch consumes it.
    #[arg(long, default_value_t = holdfast_coordinator::api::reservations::DEFAULT_TTL_SECS)]
    pub ttl: u64,
    /// Charge the hold to this spender (and every spender above it).
    #[arg(long)]
    pub spender: Option<String>,
    /// Longest TTL a soft hold may ask for, in seconds (as the coordinator's).
    #[arg(long, env = "HOLDFAST_MAX_RESERVATION_TTL_SECS", default_value_t = 900)]
    pub max_reservation_ttl_secs: u64,
}

#[derive(Subcommand)]
pub enum ReservationCommand {
    /// Show a reservation.
    Show {
        /// The reservation's id (as `reserve` printed it).
        #[arg(value_name = "RESERVATION_ID")]
        id: String,
    },
    /// Cancel a reservation no batch has used: its credits return at once.
    Cancel {
        /// The reservation's id (as `reserve` printed it).
        #[arg(value_name = "RESERVATION_ID")]
        id: String,
    },
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// The request as JSON: a file path, or `-` for standard input.
    #[arg(value_name = "FILE")]
    pub file: String,
    /// Also wait for the batch to finish, showing its progress (a bar on a
    /// terminal, a line every few seconds otherwise), and print its summary.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait for each answer: the decision, then (with --wait) the
    /// next progress event or the summary.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
    #[command(flatten)]
    pub queues: QueueSettings,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command and subcommand, with its path (`account grant`).
    fn every_command() -> Vec<(String, clap::Command)> {
        fn walk(prefix: &str, cmd: &clap::Command, out: &mut Vec<(String, clap::Command)>) {
            // clap's own `help` subcommand prints the others' help.
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let path = format!("{prefix} {}", sub.get_name()).trim().to_string();
                out.push((path.clone(), sub.clone()));
                walk(&path, sub, out);
            }
        }
        let mut root = Cli::command();
        root.build();
        let mut out = vec![("".to_string(), root.clone())];
        walk("", &root, &mut out);
        out
    }

    /// `--help` of a command, as `holdfast <path> --help` prints it.
    fn help(path: &str) -> String {
        let mut args = vec!["holdfast"];
        args.extend(path.split_whitespace());
        args.push("--help");
        match Cli::command().try_get_matches_from(args) {
            Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => e.to_string(),
            Err(e) => panic!("`{path} --help`: {e}"),
            Ok(_) => panic!("`{path} --help` printed no help"),
        }
    }

    #[test]
    fn help_shows_no_rustdoc_link_syntax() {
        for (path, _) in every_command() {
            let text = help(&path);
            assert!(
                !text.contains("[`") && !text.contains("`]"),
                "`holdfast {path} --help` shows rustdoc link syntax:\n{text}"
            );
        }
    }

    #[test]
    fn every_positional_argument_is_documented() {
        for (path, cmd) in every_command() {
            for arg in cmd.get_positionals() {
                assert!(
                    arg.get_help().is_some(),
                    "`holdfast {path}`: positional <{}> has no help",
                    arg.get_id()
                );
            }
        }
    }

    /// The connection flags come under their own heading, after the
    /// command's own flags, in every command's help.
    #[test]
    fn connection_flags_have_their_own_heading() {
        for (path, _) in every_command() {
            let text = help(&path);
            let heading = text
                .find("\nConnections:\n")
                .unwrap_or_else(|| panic!("`holdfast {path} --help` has no Connections heading"));
            for flag in [
                "--database-url <",
                "--database-url-file <",
                "--amqp-url <",
                "--namespace <",
            ] {
                let at = text.find(flag).unwrap_or_else(|| panic!("{path}: {flag}"));
                assert!(
                    at > heading,
                    "`holdfast {path} --help`: {flag} outside Connections"
                );
            }
        }
        let submit = help("submit");
        let wait = submit.find("--wait").unwrap();
        assert!(wait < submit.find("\nConnections:\n").unwrap(), "{submit}");
    }

    /// Commands that run no coordinator take none of its tuning flags.
    #[test]
    fn only_the_roles_take_coordinator_tuning_flags() {
        for path in [
            "preview",
            "reserve",
            "submit",
            "account grant",
            "batch show",
        ] {
            let text = help(path);
            for flag in [
                "--coordinator-prefetch",
                "--coordinator-consumers",
                "--confirm-window",
                "--amqp-account-bindings",
            ] {
                assert!(
                    !text.contains(flag),
                    "`holdfast {path} --help` lists {flag}"
                );
            }
        }
        assert!(help("run").contains("--coordinator-prefetch"));
        assert!(help("preview").contains("--sequential-chunk"));
    }
}
