//! What a job tells while it runs: progress of long runs (a bar on a terminal; plain lines
//! otherwise, so a batch log (Slurm, CI, `2> log`) shows how far the run is instead of staying
//! empty until the end), warnings and notes, one line each; nothing when quiet. A job gets a
//! [`Console`] from its caller, which decides how option names are shown ([`Console::render`]).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Set when the user asked the run to stop (Ctrl-C, SIGTERM, Python's KeyboardInterrupt):
/// jobs stop feeding new work, finish and write what is in flight, and return
/// `Error::Interrupted`.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks running jobs to stop (async-signal-safe: one atomic store).
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// Clears a stop request (the Python package runs several jobs in one process).
pub fn clear_stop() {
    STOP.store(false, std::sync::atomic::Ordering::SeqCst);
}

/// Where a job's messages go (stderr), and how they name options: library messages name an
/// option by its field in backticks (`` `batch_size` ``), which `render` turns into what the
/// caller calls it (`--batch-size` on the command line).
pub struct Console {
    pub quiet: bool,
    render: fn(&str) -> String,
    /// The bar on screen, suspended while a line is printed.
    bar: Mutex<Option<ProgressBar>>,
}

impl Console {
    pub fn new(quiet: bool, render: fn(&str) -> String) -> Self {
        Self {
            quiet,
            render,
            bar: Mutex::new(None),
        }
    }

    /// A console that prints nothing (library callers that read summaries only).
    pub fn silent() -> Self {
        Self::new(true, |s| s.to_string())
    }

    /// `text` with its option names as the caller spells them.
    pub fn render(&self, text: &str) -> String {
        (self.render)(text)
    }

    fn line(&self, line: &str) {
        let bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match bar.as_ref().filter(|b| !b.is_finished()) {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// `zsad: warning: {text}`, unless quiet.
    pub fn warn(&self, text: &str) {
        if !self.quiet {
            self.line(&format!("zsad: warning: {}", self.render(text)));
        }
    }

    /// `zsad: {text}`, unless quiet.
    pub fn note(&self, text: &str) {
        if !self.quiet {
            self.line(&format!("zsad: {}", self.render(text)));
        }
    }

    /// A progress display for `total` units (see [`Progress::new`]), suspended while this
    /// console prints.
    pub fn progress(&self, total: u64, template: &str, lines: Lines) -> Progress {
        let p = Progress::new(total, self.quiet, template, lines);
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.bar.clone());
        p
    }
}

/// A plain line at least this often while steps finish (and for the last step).
pub const LINE_INTERVAL: Duration = Duration::from_secs(30);

/// Plain-line settings: `zsad: {command}: {unit} {pos}/{total} {detail} {s}/{unit} ETA {eta}`
/// every `every` units or [`LINE_INTERVAL`], whichever comes first, and for the last one.
pub struct Lines {
    pub command: &'static str,
    pub unit: &'static str,
    pub every: u64,
}

impl Lines {
    /// A line at every twentieth of `total` units (5%), and at least every [`LINE_INTERVAL`].
    pub fn at_every_5_percent(command: &'static str, unit: &'static str, total: u64) -> Self {
        Self {
            command,
            unit,
            every: (total / 20).max(1),
        }
    }
}

struct Plain {
    lines: Lines,
    started: Instant,
    start_pos: u64,
    last_at: Instant,
    last_pos: u64,
}

pub struct Progress {
    bar: ProgressBar,
    total: u64,
    plain: Option<Plain>,
}

impl Progress {
    /// `template` is the bar's indicatif template (used on a terminal only).
    pub fn new(total: u64, quiet: bool, template: &str, lines: Lines) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if !quiet && terminal {
            ProgressBar::new(total)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("valid template")
                .progress_chars("=> "),
        );
        let now = Instant::now();
        let plain = (!quiet && !terminal).then_some(Plain {
            lines,
            started: now,
            start_pos: 0,
            last_at: now,
            last_pos: 0,
        });
        Self { bar, total, plain }
    }

    /// The bar, to set its prefix and message (hidden when not on a terminal).
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }

    /// Where a resumed run starts: the rate and ETA count only the units run from here.
    pub fn start_at(&mut self, pos: u64) {
        self.bar.set_position(pos);
        if let Some(p) = &mut self.plain {
            p.start_pos = pos;
            p.last_pos = pos;
        }
    }

    /// Moves to `pos`; prints a plain line when one is due, with `detail()` after the count.
    /// Returns whether a line was printed (callers averaging over a line's steps reset then).
    pub fn advance(&mut self, pos: u64, detail: impl FnOnce() -> String) -> bool {
        self.bar.set_position(pos);
        let Some(p) = &mut self.plain else {
            return false;
        };
        let now = Instant::now();
        let due = pos >= self.total
            || pos >= p.last_pos + p.lines.every.max(1)
            || now.duration_since(p.last_at) >= LINE_INTERVAL;
        if !due || pos == p.last_pos {
            return false;
        }
        let done = (pos - p.start_pos).max(1) as f64;
        let per = now.duration_since(p.started).as_secs_f64() / done;
        let eta = per * self.total.saturating_sub(pos) as f64;
        let detail = detail();
        let sep = if detail.is_empty() { "" } else { " " };
        eprintln!(
            "zsad: {}: {} {pos}/{}{sep}{detail} {} s/{} ETA {}",
            p.lines.command,
            p.lines.unit,
            self.total,
            seconds(per),
            p.lines.unit,
            duration(eta)
        );
        p.last_at = now;
        p.last_pos = pos;
        true
    }

    /// Prints `line` to stderr without tearing the bar.
    pub fn println(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Seconds per unit: one decimal from 1 s up, three below, five below 0.01 s.
fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.1}")
    } else if s >= 0.01 {
        format!("{s:.3}")
    } else {
        format!("{s:.5}")
    }
}

/// `45s`, `56m20s`, `3h07m`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(45.0), "45s");
        assert_eq!(duration(3380.0), "56m20s");
        assert_eq!(duration(11220.0), "3h07m");
        assert_eq!(duration(f64::NAN), "0s");
        assert_eq!(seconds(1.84), "1.8");
        assert_eq!(seconds(0.25), "0.250");
        assert_eq!(seconds(0.0012), "0.00120");
    }
}
