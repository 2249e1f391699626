//! The build's progress display.
//!
//! On a terminal: one spinner line `⠋ [3/5] setup: CMD  4.1s` at the bottom, command output
//! printed above it, and a finished step left as `✓ [3/5] setup: CMD (4.1s)`. When stderr is
//! not a terminal (CI logs, pipes), the same information as plain lines, so logs stay
//! readable and nothing is overwritten.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Indentation of command output under its step.
const OUTPUT_INDENT: &str = "    ";

/// Steps, their output and their timing, on stderr.
pub struct Progress {
    total: usize,
    index: usize,
    label: String,
    step_started: Instant,
    bar: Option<ProgressBar>,
    width: usize,
    hidden: bool,
}

impl Progress {
    /// A display for `total` steps: a spinner when stderr is a terminal, plain lines otherwise.
    pub fn new(total: usize) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress::with_mode(total, tty)
    }

    /// A display that draws a spinner only when `tty` is true.
    pub fn with_mode(total: usize, tty: bool) -> Progress {
        let bar = tty.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{spinner:.cyan} {msg} {elapsed:.dim}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar
        });
        let width = terminal_width().unwrap_or(100);
        Progress {
            total,
            index: 0,
            label: String::new(),
            step_started: Instant::now(),
            bar,
            width,
            hidden: false,
        }
    }

    /// A display that prints nothing (for library callers and tests).
    pub fn hidden(total: usize) -> Progress {
        let mut p = Progress::with_mode(total, false);
        p.hidden = true;
        p
    }

    /// Starts the next step: `[i/total] kind: what`.
    pub fn step(&mut self, kind: &str, what: &str) {
        self.index += 1;
        // Leave room for the spinner and the elapsed time.
        let room = self.width.saturating_sub(12);
        self.label = step_label(self.index, self.total, kind, what, room);
        self.step_started = Instant::now();
        match &self.bar {
            Some(bar) => {
                bar.reset_elapsed();
                bar.set_message(self.label.clone());
                bar.enable_steady_tick(Duration::from_millis(100));
            }
            None => self.plain(&self.label),
        }
    }

    /// Prints one line of a command's output above the spinner.
    pub fn output(&self, line: &str) {
        let line = format!("{OUTPUT_INDENT}{line}");
        match &self.bar {
            Some(bar) => bar.println(line),
            None => self.plain(&line),
        }
    }

    /// Prints a note (not command output) above the spinner.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => self.plain(line),
        }
    }

    fn plain(&self, line: &str) {
        if !self.hidden {
            eprint_line(line);
        }
    }

    /// Ends the current step successfully; returns how long it took.
    pub fn done(&mut self) -> Duration {
        self.done_with("")
    }

    /// Ends the current step successfully with a short result (`12 MiB`, `pid 73`).
    pub fn done_with(&mut self, detail: &str) -> Duration {
        let took = self.step_started.elapsed();
        let line = finished_line(true, &self.label, detail, took);
        self.print_final(&line);
        took
    }

    /// Ends the current step as failed.
    pub fn failed(&mut self) {
        let took = self.step_started.elapsed();
        let line = finished_line(false, &self.label, "", took);
        self.print_final(&line);
    }

    fn print_final(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => {
                bar.disable_steady_tick();
                bar.set_message(String::new());
                bar.println(line);
            }
            None => self.plain(line),
        }
    }

    /// A handle that prints lines above the display from any thread.
    pub fn printer(&self) -> Printer {
        Printer {
            bar: self.bar.clone(),
            hidden: self.hidden,
        }
    }

    /// Removes the spinner line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Prints lines above a [`Progress`] display (or as plain lines) from any thread.
#[derive(Clone)]
pub struct Printer {
    bar: Option<ProgressBar>,
    hidden: bool,
}

impl Printer {
    /// Prints one line.
    pub fn line(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if !self.hidden => eprint_line(line),
            None => {}
        }
    }
}

fn eprint_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn terminal_width() -> Option<usize> {
    let cols = std::env::var("COLUMNS").ok()?.parse().ok()?;
    (cols >= 20).then_some(cols)
}

/// `[3/5] setup: CMD`, with CMD cut to fit `room` characters.
pub fn step_label(index: usize, total: usize, kind: &str, what: &str, room: usize) -> String {
    let head = format!("[{index}/{total}] {kind}");
    if what.is_empty() {
        return head;
    }
    let head = format!("{head}: ");
    let left = room.saturating_sub(head.chars().count()).max(16);
    format!("{head}{}", truncate(what, left))
}

/// The line a finished step leaves behind.
pub fn finished_line(ok: bool, label: &str, detail: &str, took: Duration) -> String {
    let mark = if ok { "✓" } else { "✗" };
    let took = format_duration(took);
    if detail.is_empty() {
        format!("{mark} {label} ({took})")
    } else {
        format!("{mark} {label}: {detail} ({took})")
    }
}

/// One line of at most `max` characters: newlines shown as `⏎`, cut with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c == '\n' { '⏎' } else { c })
        .filter(|c| !c.is_control())
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut out: String = flat.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `850ms`, `4.1s`, `2m05s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// `512 B`, `4.0 KiB`, `17.3 MiB`, `1.2 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Splits a byte stream into display lines: `\n` ends a line, `\r` (progress redraws) keeps
/// only what follows it, invalid UTF-8 is replaced, other control characters are dropped, and
/// very long lines are cut so one chatty command cannot flood the terminal's line buffer.
#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

/// Longest line kept; the rest of an over-long line is dropped.
const MAX_LINE: usize = 4096;

impl LineSplitter {
    /// Feeds bytes; returns the lines they completed.
    pub fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in data {
            match b {
                b'\n' => lines.push(self.take()),
                b'\r' => self.buf.clear(),
                _ if self.buf.len() < MAX_LINE => self.buf.push(b),
                _ => {}
            }
        }
        lines
    }

    /// The unterminated last line, if any.
    pub fn finish(&mut self) -> Option<String> {
        (!self.buf.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.buf)
            .chars()
            .filter(|c| !c.is_control() || *c == '\t')
            .collect();
        self.buf.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_fit_their_room() {
        assert_eq!(step_label(2, 5, "boot", "", 80), "[2/5] boot");
        assert_eq!(
            step_label(3, 5, "setup", "echo hi > /etc/motd", 80),
            "[3/5] setup: echo hi > /etc/motd"
        );
        let long = "x".repeat(200);
        let l = step_label(3, 5, "setup", &long, 60);
        assert_eq!(l.chars().count(), 60);
        assert!(l.ends_with('…'));
        // Never cut below a readable minimum, even on a tiny terminal.
        let l = step_label(10, 12, "service", &long, 5);
        assert_eq!(l.chars().count(), "[10/12] service: ".len() + 16);
        assert_eq!(truncate("a\nb\x1b[0m", 10), "a⏎b[0m");
    }

    #[test]
    fn finished_lines() {
        let took = Duration::from_millis(4100);
        assert_eq!(
            finished_line(true, "[3/5] setup: true", "", took),
            "✓ [3/5] setup: true (4.1s)"
        );
        assert_eq!(
            finished_line(false, "[4/5] service: web", "pid 73", took),
            "✗ [4/5] service: web: pid 73 (4.1s)"
        );
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(format_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(format_duration(Duration::from_millis(4149)), "4.1s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4.0 KiB");
        assert_eq!(format_size(17 * 1024 * 1024 + 300 * 1024), "17.3 MiB");
        assert_eq!(format_size(3 << 30), "3.0 GiB");
    }

    #[test]
    fn lines_are_split_and_cleaned() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"one\ntw"), ["one"]);
        assert_eq!(s.push(b"o\n\nthr"), ["two", ""]);
        assert_eq!(s.finish().as_deref(), Some("thr"));
        assert_eq!(s.finish(), None);
        assert_eq!(s.push(b"10%\r50%\r100%\n"), ["100%"]);
        assert_eq!(s.push(b"\xff ok\x07\tx\n"), ["\u{fffd} ok\tx"]);
        let long = vec![b'a'; MAX_LINE * 2];
        let mut lines = s.push(&long);
        lines.extend(s.push(b"\n"));
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
    }

    #[test]
    fn hidden_mode_runs_every_call() {
        let mut p = Progress::hidden(2);
        p.step("rootfs", "busybox");
        p.output("a line");
        p.done_with("4.0 MiB");
        p.step("boot", "");
        p.failed();
        p.finish();
    }
}
