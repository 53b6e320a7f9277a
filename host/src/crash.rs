//! Crash points, for the tests of the windows between two writes:
//! `SLUICE_CRASH_AT=NAME` makes the process abort when it reaches the
//! point `NAME`, as a kill -9 there would (no cleanup, nothing flushed, no
//! goodbye to the broker or the database). Unset, a point costs one load.
//!
//! The points, in the order a batch passes them:
//! - `dead-letters-written`: the dead letters known before the sinks
//!   (the source's, the plugins', the router's, and the refusals of the
//!   sinks that commit no positions) are written; no sink has committed;
//! - `postgres-before-commit`: an exactly-once PostgreSQL sink has handed
//!   its refusals to the dead letters and not yet committed;
//! - `postgres-committed`: it has committed (rows and positions);
//! - `delivered`: every sink has committed the batch; the source has not;
//! - `source-committed`: the source has committed the batch.

use std::sync::OnceLock;

/// Aborts the process if `SLUICE_CRASH_AT` names `name`.
pub fn point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT.get_or_init(|| std::env::var("SLUICE_CRASH_AT").ok()).as_deref() == Some(name) {
        eprintln!("crash point {name}: aborting");
        std::process::abort();
    }
}
