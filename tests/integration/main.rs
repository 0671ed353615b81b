//! The integration suite: one test binary (linked once, not once per file)
//! whose modules each drive real PostgreSQL and RabbitMQ; see [`support`].

mod support;

mod admin_auth;
mod allowances;
mod api;
mod api_keys;
mod bad_input;
mod breakdown;
mod broker_list;
mod broker_users;
mod cli;
mod concurrency;
mod contract;
mod db_roles;
mod decisions;
mod grants;
mod grants_api;
mod http_errors;
mod intake_properties;
mod ledger_properties;
mod limits;
mod long_ids;
mod multi_host;
mod outbox;
mod pipeline;
mod reconnect;
mod recovery;
mod secrets;
mod settlement;
mod spenders;
mod steps;
mod supervision;
