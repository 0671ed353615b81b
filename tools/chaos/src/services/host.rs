//! What the throwaway services need from the host, shared with the bench
//! ([`holdfast_harness::host`]).

pub(super) use holdfast_harness::host::{ensure_free, output, port_open, START_TIMEOUT};
