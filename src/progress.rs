//! Progress of long runs (`train`, `eval`): a bar on a terminal; plain lines otherwise, so a
//! batch log (Slurm, CI, `2> log`) shows how far the run is instead of staying empty until
//! the end; nothing with `--quiet`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A plain line at least this often while steps finish (and for the last step).
pub const LINE_INTERVAL: Duration = Duration::from_secs(30);

/// Plain-line settings: `zsad: {command}: {unit} {pos}/{total} {detail} {s}/{unit} ETA {eta}`
/// every `every` units or [`LINE_INTERVAL`], whichever comes first, and for the last one.
pub struct Lines {
    pub command: &'static str,
    pub unit: &'static str,
    pub every: u64,
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
