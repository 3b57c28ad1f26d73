//! `zsad bench`: flags into [`BenchOptions`], the library's bench, a table (or JSON) on stdout.

use std::path::PathBuf;

use clap::Args;

use super::args::{DetectorArgs, OutputArgs, ReferenceArgs};
use super::output::EXIT_OK;
use crate::error::{OptionError, Result};
use crate::jobs::bench::{bench, BenchOptions, BenchReport};

#[derive(Debug, Args)]
#[command(mut_arg("model", |a| a.required(true)))]
pub struct BenchArgs {
    /// Folder of images to run over (searched recursively); the first one is also the warm-up
    #[arg(
        value_name = "DIR",
        required_unless_present = "images",
        conflicts_with = "images"
    )]
    pub dir: Option<PathBuf>,
    /// The same as DIR
    #[arg(long, value_name = "DIR", hide_short_help = true)]
    pub images: Option<PathBuf>,
    #[command(flatten)]
    pub detector: DetectorArgs,
    /// The files `zsad detect` would write (encoded and written to a temporary folder)
    #[command(flatten)]
    pub output: OutputArgs,
    /// Normal images or a bank, as for detect: the nearest-patch search is timed as its own
    /// stage, and the bank's size and set-up reported
    #[command(flatten)]
    pub reference: ReferenceArgs,
    /// Passes over the images (at least 1)
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = super::flags::at_least(1))]
    pub runs: usize,
    /// Images per model pass: 1 times each stage one image at a time; 0 is detect's default
    ///
    /// 0: about 1024 tokens on a CPU, what half the free memory holds on a GPU, where
    /// throughput on a GPU comes from.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub batch_size: usize,
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
}

fn table(r: &BenchReport) {
    println!(
        "{} {} @ {} px, {} images, {} threads, gemm {}",
        r.model, r.preset, r.image_size, r.images, r.threads, r.gemm
    );
    println!(
        "{:.4} s per image, {:.2} images per second (after one warm-up image)",
        r.seconds_per_image, r.images_per_second
    );
    for (name, v) in r.stages.named() {
        println!(
            "  {name:<11} {v:>9.4} s  {:>5.1}%",
            100.0 * v / r.seconds_per_image
        );
    }
    println!(
        "load {:.2} s, set-up {:.2} s, peak RSS {}",
        r.load_seconds,
        r.setup_seconds,
        r.peak_rss_mb
            .map(|m| format!("{m:.0} MB"))
            .unwrap_or_else(|| "n/a".into())
    );
    if let Some(b) = &r.reference_bank {
        println!(
            "reference bank: {} image(s), {} patches x {} layer(s), {:.1} MB, built in {:.2} s",
            b.images, b.patches_per_layer, b.layers, b.megabytes, b.build_seconds
        );
    }
}

pub fn run(args: BenchArgs) -> Result<u8> {
    let images =
        args.dir.clone().or(args.images.clone()).ok_or_else(|| {
            OptionError::rule("name the folder of images to time (zsad bench DIR)")
        })?;
    let opts = BenchOptions {
        detector: args.detector.options(),
        output: args.output.options(true),
        reference: args.reference.options(),
        images,
        runs: args.runs,
        batch_size: args.batch_size,
    };
    let report = bench(&opts, &super::output::console(true))?;
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        table(&report);
    }
    Ok(EXIT_OK)
}
