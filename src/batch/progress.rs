//! Progress of long work: a bar on a terminal, plain lines in logs (Slurm, CI, `nohup`), where a
//! bar prints nothing until the end. Warnings go through it so they never tear the bar.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A plain line at least every this long, and at every 5% of the work.
const LINE_EVERY: Duration = Duration::from_secs(30);

enum Mode {
    Bar(indicatif::ProgressBar),
    Lines(Mutex<LineState>),
    Quiet,
}

struct LineState {
    last: Instant,
    last_step: u64,
}

/// Progress of `total` items, counted as they finish.
pub struct Progress {
    mode: Mode,
    label: String,
    unit: String,
    total: u64,
    done: std::sync::atomic::AtomicU64,
    started: Instant,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise; nothing when `quiet`.
    pub fn new(label: &str, unit: &str, total: u64, quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{per_sec}}  ETA {{eta}}  {{msg}}"
                ))
                .expect("valid template")
                .progress_chars("=> "),
            );
            Mode::Bar(bar)
        } else {
            Mode::Lines(Mutex::new(LineState {
                last: Instant::now(),
                last_step: 0,
            }))
        };
        Self {
            mode,
            label: label.into(),
            unit: unit.into(),
            total,
            done: 0.into(),
            started: Instant::now(),
        }
    }

    /// One more item finished.
    pub fn inc(&self) {
        let done = self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        match &self.mode {
            Mode::Bar(b) => b.inc(1),
            Mode::Lines(state) => {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                let step = (self.total / 20).max(1);
                let due = done / step > s.last_step / step || s.last.elapsed() >= LINE_EVERY;
                if due || done == self.total {
                    s.last = Instant::now();
                    s.last_step = done;
                    eprintln!("{}", self.line(done));
                }
            }
            Mode::Quiet => {}
        }
    }

    /// `zsad: detect: 120/2000 images (6%), 3.21 images/s, ETA 9m46s`
    fn line(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-9);
        let left = self.total.saturating_sub(done) as f64 / rate.max(1e-9);
        format!(
            "zsad: {}: {done}/{} {} ({:.0}%), {:.2} {}/s, ETA {}",
            self.label,
            self.total,
            self.unit,
            100.0 * done as f64 / self.total.max(1) as f64,
            rate,
            self.unit,
            format_duration(left)
        )
    }

    /// A message for the user (a failed input), printed above the bar.
    pub fn warn(&self, msg: &str) {
        match &self.mode {
            Mode::Bar(b) => b.suspend(|| eprintln!("{msg}")),
            Mode::Lines(_) => eprintln!("{msg}"),
            Mode::Quiet => {}
        }
    }

    pub fn finish(&self) {
        if let Mode::Bar(b) = &self.mode {
            b.finish_and_clear();
        }
    }
}

/// `1h02m`, `9m46s`, `12s`.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(format_duration(12.4), "12s");
        assert_eq!(format_duration(586.0), "9m46s");
        assert_eq!(format_duration(3720.0), "1h02m");
        assert_eq!(format_duration(f64::NAN), "?");
    }
}
