//! The `holdfast` binary's library: assembling roles into a fleet, a producer
//! client (what `submit` does, and what tests drive), the demo scenario, the
//! benchmark and the fault-injection harness (`chaos`), both of which run the
//! roles as child processes (`processes`).

pub mod bench;
pub mod bench_cpu;
pub mod bench_naive;
pub mod chaos;
pub mod demo;
pub mod fleet;
pub mod processes;
pub mod producer;
pub mod rabbitmqctl;
pub mod report;
