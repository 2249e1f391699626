//! A phase timer for the resume path, printed to stderr when
//! `SMOLVM_TIMINGS=1`: each phase with the time since the timer started
//! (the first call, made at the top of `main`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();
static ENABLED: OnceLock<bool> = OnceLock::new();
static FIRST_EXIT: AtomicBool = AtomicBool::new(false);

/// Start the clock (idempotent). Call first thing in `main`.
pub fn start() {
    START.get_or_init(Instant::now);
}

fn enabled() -> bool {
    *ENABLED.get_or_init(|| std::env::var_os("SMOLVM_TIMINGS").is_some_and(|v| v == "1"))
}

/// Record that `phase` has just finished.
pub fn mark(phase: &str) {
    if enabled() {
        let start = START.get_or_init(Instant::now);
        eprintln!(
            "smolvm-timing {phase} {:.3} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// Record the first guest exit of this process (later calls do nothing).
pub fn mark_first_exit() {
    if enabled() && !FIRST_EXIT.swap(true, Ordering::Relaxed) {
        mark("first-guest-exit");
    }
}
