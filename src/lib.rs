//! The `holdfast` binary's library: assembling roles into a fleet, a producer
//! client (what `submit` does, and what tests and the tools under `tools/`
//! drive), the demo scenario and the command line's printing.

pub mod cli;
pub mod commands;
pub mod demo;
pub mod fleet;
pub mod producer;
pub mod progress;
pub mod report;
