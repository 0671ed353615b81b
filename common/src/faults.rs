//! Named crash points for fault-injection tests. A process started with
//! `HOLDFAST_FAILPOINTS=coordinator.after_reserve` aborts at that point, as
//! abruptly as SIGKILL: no destructors, no acks, no goodbyes. Unset, each
//! point costs one check of an initialised static.

use std::sync::OnceLock;

static POINTS: OnceLock<Vec<String>> = OnceLock::new();

fn enabled() -> &'static [String] {
    POINTS.get_or_init(|| {
        std::env::var("HOLDFAST_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    })
}

/// Turn every crash point off in this process, whatever `HOLDFAST_FAILPOINTS`
/// says: for tests that run roles in their own process (the processes they
/// start still read the variable). Has no effect after the first crash point
/// was reached.
pub fn disable() {
    let _ = POINTS.set(Vec::new());
}

/// Abort the process if `point` is enabled.
pub fn crash_point(point: &str) {
    if enabled().iter().any(|p| p == point) {
        eprintln!("holdfast: crash point `{point}` reached, aborting");
        std::process::abort();
    }
}
