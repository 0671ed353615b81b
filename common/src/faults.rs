//! Named fault points for fault-injection tests, enabled by
//! `HOLDFAST_FAILPOINTS` (comma-separated) or, in a test process, by
//! [`enable`]. Unset, each point costs one check of an initialised static.
//!
//! - `NAME`: a process reaching [`crash_point`] `NAME` aborts, as abruptly as
//!   SIGKILL: no destructors, no acks, no goodbyes.
//! - `panic:NAME` / `panic-once:NAME`: [`panic_point`] `NAME` panics every
//!   time, or the first time only. `NAME@NAMESPACE` limits it to one AMQP
//!   namespace, so tests sharing a process do not trip each other's points.

use std::sync::{Mutex, OnceLock};

static ENV_POINTS: OnceLock<Vec<String>> = OnceLock::new();

fn from_env() -> &'static [String] {
    ENV_POINTS.get_or_init(|| {
        std::env::var("HOLDFAST_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    })
}

/// Points enabled by [`enable`], and the `panic-once` points already spent.
static ENABLED: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SPENT: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Enable a point in this process, as if it were listed in `HOLDFAST_FAILPOINTS`.
pub fn enable(point: &str) {
    if let Ok(mut enabled) = ENABLED.lock() {
        enabled.push(point.to_string());
    }
}

fn listed(spec: &str) -> bool {
    from_env().iter().any(|p| p == spec)
        || ENABLED
            .lock()
            .map(|e| e.iter().any(|p| p == spec))
            .unwrap_or(false)
}

/// Turn every point off in this process, whatever `HOLDFAST_FAILPOINTS`
/// says: for tests that run roles in their own process (the processes they
/// start still read the variable). Points enabled with [`enable`] still
/// fire. Has no effect once a point was reached.
pub fn disable() {
    let _ = ENV_POINTS.set(Vec::new());
}

/// Abort the process if `point` is enabled.
pub fn crash_point(point: &str) {
    if from_env().iter().any(|p| p == point) {
        eprintln!("holdfast: crash point `{point}` reached, aborting");
        std::process::abort();
    }
}

/// Panic if `panic:point` (or `panic:point@namespace`) is enabled, or if
/// `panic-once:point` (or `…@namespace`) is enabled and has not fired yet.
pub fn panic_point(point: &str, namespace: &str) {
    if from_env().is_empty() && ENABLED.lock().map(|e| e.is_empty()).unwrap_or(true) {
        return;
    }
    let scoped = format!("{point}@{namespace}");
    for name in [point, scoped.as_str()] {
        if listed(&format!("panic:{name}")) {
            panic!("fault point `{name}` reached");
        }
        let once = format!("panic-once:{name}");
        if listed(&once) {
            let first = SPENT
                .lock()
                .map(|mut spent| {
                    let first = !spent.contains(&once);
                    if first {
                        spent.push(once.clone());
                    }
                    first
                })
                .unwrap_or(false);
            if first {
                panic!("fault point `{name}` reached (once)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_points_fire_where_and_as_often_as_enabled() {
        enable("panic-once:unit.once@ns1");
        enable("panic:unit.always");
        let panics =
            |point: &str, ns: &str| std::panic::catch_unwind(|| panic_point(point, ns)).is_err();
        assert!(!panics("unit.once", "ns2"), "another namespace");
        assert!(panics("unit.once", "ns1"));
        assert!(!panics("unit.once", "ns1"), "only once");
        assert!(panics("unit.always", "any") && panics("unit.always", "any"));
        assert!(!panics("unit.never", "ns1"));
    }
}
