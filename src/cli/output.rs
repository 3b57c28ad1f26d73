//! What the command line prints besides records: exit statuses, the console of a command
//! (messages on stderr unless quiet), errors, and option names as flags.
//!
//! The library names options by their field in backticks (`` `batch_size` ``); on the command
//! line they are flags. The long flags of every command are read once from the clap definition
//! ([`set_flags`]), so a field that is a flag shows as one (`--batch-size`) and other
//! backticked words (`zsad eval`, a file name) stay as they are.

use std::collections::HashSet;
use std::sync::OnceLock;

use crate::progress::Console;
use crate::Error;

/// Exit status when the command did what was asked.
pub const EXIT_OK: u8 = 0;
/// Exit status when some inputs could not be scored (the others were, and were written).
pub const EXIT_SOME_FAILED: u8 = 1;
/// Exit status for bad usage, a model that cannot be loaded, or an output that cannot be written.
pub const EXIT_ERROR: u8 = 2;
/// Exit status when the user stopped the run (Ctrl-C, SIGTERM): 128 + SIGINT, as shells use.
pub const EXIT_INTERRUPTED: u8 = 130;

static FIELDS: OnceLock<HashSet<String>> = OnceLock::new();

/// The long flags of every command (`batch-size`), from the clap definition, set once at
/// start.
pub fn set_flags(longs: impl IntoIterator<Item = String>) {
    let _ = FIELDS.set(longs.into_iter().map(|l| l.replace('-', "_")).collect());
}

fn fields() -> &'static HashSet<String> {
    FIELDS.get_or_init(HashSet::new)
}

/// The console of a command: messages on stderr unless `quiet`, options spelled as flags.
pub fn console(quiet: bool) -> Console {
    Console::new(quiet, options)
}

/// `1 class`, `2 classes`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `text` with each backticked option field that is a flag written as the flag.
pub fn options(text: &str) -> String {
    let fields = fields();
    crate::error::rewrite_backticked(text, |word, _| {
        let is_field = !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
            && fields.contains(word);
        is_field.then(|| (format!("--{}", word.replace('_', "-")), 0))
    })
}

/// Prints `zsad: error: ...` (or what an interrupted run kept) and returns the exit status.
pub fn report_error(e: &Error) -> u8 {
    match e {
        Error::Interrupted { kept } => {
            if kept.is_empty() {
                eprintln!("zsad: interrupted");
            } else {
                eprintln!("zsad: interrupted: {}", options(kept));
            }
            EXIT_INTERRUPTED
        }
        _ => {
            eprintln!("zsad: error: {}", options(&e.to_string()));
            EXIT_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_fields_become_flags_and_other_words_stay() {
        set_flags(["batch-size", "resume", "overwrite", "force-thresholds"].map(String::from));
        assert_eq!(
            options("`batch_size` 300: at most 256; see `zsad eval` and `run.json`"),
            "--batch-size 300: at most 256; see `zsad eval` and `run.json`"
        );
        assert_eq!(
            options("pass `resume` or `overwrite`; `force_thresholds`"),
            "pass --resume or --overwrite; --force-thresholds"
        );
        assert_eq!(options("a `stray backtick"), "a `stray backtick");
        assert_eq!(options("`not_a_flag_here`"), "`not_a_flag_here`");
    }
}
