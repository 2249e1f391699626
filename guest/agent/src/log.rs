//! Minimal logging: one line per event to stderr, or to `/dev/kmsg` when the agent is PID 1
//! (its stderr is the console, which may be the very port the host reads).

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

static KMSG: OnceLock<Mutex<File>> = OnceLock::new();

/// Sends later log lines to the kernel log instead of stderr.
pub fn use_kmsg(file: File) {
    let _ = KMSG.set(Mutex::new(file));
}

/// Writes one log line; never fails or panics.
pub fn line(msg: std::fmt::Arguments<'_>) {
    if let Some(k) = KMSG.get() {
        if let Ok(mut f) = k.lock() {
            // `<6>` is KERN_INFO; one write per record as /dev/kmsg requires.
            let text = format!("<6>smol-agent: {msg}\n");
            let _ = f.write_all(text.as_bytes());
            return;
        }
    }
    let _ = writeln!(std::io::stderr(), "smol-agent: {msg}");
}

/// Logs a formatted line.
#[macro_export]
macro_rules! agent_log {
    ($($arg:tt)*) => { $crate::log::line(format_args!($($arg)*)) };
}
