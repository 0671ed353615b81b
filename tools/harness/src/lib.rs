//! What the bench (`holdfast-bench`) and the fault-injection harness
//! (`holdfast-chaos`) share: the roles started as child processes of the
//! `holdfast` binary ([`processes`]), and what `rabbitmqctl` says about their
//! consumers ([`rabbitmqctl`], also read by the reconnect test).

pub mod host;
pub mod postgres;
pub mod processes;
pub mod rabbitmqctl;
