//! The `zsad` command line: flags into the library jobs' options ([`args`]), the job's summary
//! into output and an exit status; errors shown with options spelled as flags ([`output`]).

mod args;
mod bench;
mod calibrate;
mod detect;
mod eval;
mod features;
mod flags;
mod help;
mod import;
mod info;
mod manifest;
mod merge;
mod output;
mod reference;
mod report;
mod train;
mod values;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

pub use output::{EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED};

/// Zero-shot visual anomaly detection with CLIP.
#[derive(Debug, Parser)]
#[command(name = "zsad", version, about, after_long_help = help::TOP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score images: an anomaly score and a pixel anomaly map per image, written as records
    /// (JSON Lines or CSV; to stdout without --out), 16-bit map PNGs and heatmaps.
    #[command(after_help = help::SHORT, after_long_help = help::DETECT)]
    Detect(detect::DetectArgs),
    /// Evaluate on an annotated dataset: image and pixel AUROC, AP, F1-max and AUPRO per class
    /// and their mean, exactly as the papers compute them, with ROC and PR plots.
    #[command(after_help = help::SHORT, after_long_help = help::EVAL)]
    Eval(eval::EvalArgs),
    /// Choose image and pixel thresholds (thresholds.json for `detect --thresholds`) on
    /// labelled data (F1-max, --max-fpr or --min-recall) or on normal images only (--normal
    /// with --max-fpr).
    #[command(after_help = help::SHORT, after_long_help = help::CALIBRATE)]
    Calibrate(calibrate::CalibrateArgs),
    /// Train an adapter on annotated auxiliary data (the target classes are never seen).
    #[command(after_help = help::SHORT, after_long_help = help::TRAIN)]
    Train(train::TrainArgs),
    /// Write a manifest (image, mask, label, class) from a dataset folder.
    #[command(after_help = help::SHORT, after_long_help = help::MANIFEST)]
    Manifest(manifest::ManifestArgs),
    /// Convert a published AdaCLIP or AnomalyCLIP checkpoint (.pth) into a zsad adapter.
    #[command(after_help = help::SHORT, after_long_help = help::IMPORT)]
    ImportCheckpoint(import::ImportArgs),
    /// Join the output folders of `zsad detect --shard` runs.
    #[command(after_help = help::SHORT, after_long_help = help::MERGE)]
    Merge(merge::MergeArgs),
    /// Write DIR/report.html for a detect run: every image by score with its heatmap, mask and
    /// decision, the score histogram, filters, keyboard navigation, settings and metrics.
    #[command(after_help = help::SHORT, after_long_help = help::REPORT)]
    Report(report::ReportArgs),
    /// Time the detection pipeline per stage (decode, resize, backbone, text, maps, smoothing,
    /// PNG encoding, writing) over a folder of images, with peak memory.
    #[command(after_help = help::SHORT, after_long_help = help::BENCH)]
    Bench(bench::BenchArgs),
    /// Reference banks: normal patch features of a product, for `--reference` on detect and
    /// eval.
    Reference(reference::ReferenceCmd),
    /// Print a model's architecture (widths, depths, patch grid, parameters, naming).
    #[command(after_help = help::SHORT, after_long_help = help::INFO)]
    Info(info::InfoArgs),
    /// Write CLIP image/text embeddings and per-layer hidden states to a safetensors file.
    #[command(after_help = help::SHORT, after_long_help = help::FEATURES)]
    Features(features::FeaturesArgs),
}

/// Ctrl-C and SIGTERM ask the running job to stop (`progress::request_stop`): it
/// finishes what is in flight, writes it, and says what was kept. A second one ends zsad at
/// once, as it would have without the handler.
fn stop_on_signals() {
    extern "C" fn on_signal(sig: libc::c_int) {
        crate::progress::request_stop();
        // SAFETY: restoring the default disposition is async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores an atomic and resets the disposition, both
        // async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Runs the command line; returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut longs = Vec::new();
    let mut stack = vec![Cli::command()];
    while let Some(cmd) = stack.pop() {
        longs.extend(
            cmd.get_arguments()
                .filter_map(|a| a.get_long().map(String::from)),
        );
        stack.extend(cmd.get_subcommands().cloned());
    }
    output::set_flags(longs);
    // The commands whose jobs stop cleanly on request; the others end at Ctrl-C as any program
    // does (what they write is written atomically).
    if matches!(
        cli.command,
        Command::Detect(_)
            | Command::Eval(_)
            | Command::Calibrate(_)
            | Command::Train(_)
            | Command::Bench(_)
            | Command::Reference(_)
    ) {
        stop_on_signals();
    }
    let result = match cli.command {
        Command::Detect(a) => detect::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Train(a) => train::run(a),
        Command::Manifest(a) => manifest::run(a),
        Command::ImportCheckpoint(a) => import::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Report(a) => report::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Reference(a) => reference::run(a),
        Command::Info(a) => info::run(a),
        Command::Features(a) => features::run(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => ExitCode::from(output::report_error(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
