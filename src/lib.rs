//! The `holdfast` binary's library: assembling roles into a fleet, a producer
//! client (what `submit` does, and what tests drive), and the demo scenario.

pub mod bench;
pub mod bench_naive;
pub mod demo;
pub mod fleet;
pub mod producer;
pub mod report;
