//! The long help of each command (`--help`): what it writes, examples, the model forms where a
//! model is read, and its exit status. `-h` shows the common flags and points here.

/// Under `-h`: where the rest is.
pub const SHORT: &str = "--help lists every option, with examples and the exit status.";

/// The `--model` forms, shared by every command that reads a model.
macro_rules! models {
    () => {
        "Models (--model):
  a folder        with config.json + model.safetensors (Hugging Face CLIPModel layout) or an
                  OpenAI/open_clip state dict (open_clip_model.safetensors, *.bin, *.pth)
  a file          one weight file; config.json and tokenizer.json are read from beside it
  org/name        a Hugging Face hub id, e.g. openai/clip-vit-large-patch14-336: read from the
                  local hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
                  ~/.cache/huggingface/hub) and downloaded when missing, unless HF_HUB_OFFLINE=1
  random:ARCH     deterministic random weights of ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336 or
                  tiny, for benchmarks and tests without downloads (append :SEED to vary them)"
    };
}

/// The exit status of commands that either do what was asked or stop with an error.
macro_rules! exit_plain {
    () => {
        "Exit status: 0 done; 2 bad usage, an input that cannot be read, or an output that cannot
be written (the message names the file or flag); 130 stopped by Ctrl-C or SIGTERM."
    };
}

pub const TOP: &str = concat!(
    models!(),
    "

Exit status: 0 success; 1 some inputs could not be scored (each is reported, every other input
is scored and written); 2 bad usage, a model or adapter that cannot be loaded, or an output that
cannot be written (the message names the file); 130 stopped by Ctrl-C or SIGTERM (what was
finished is kept; detect --resume continues). A closed stdout (`zsad eval ... | head -1`) ends
zsad by SIGPIPE (141 in a shell), as it does cat."
);

pub const DETECT: &str = concat!(
    "Outputs in --out DIR, written as each input finishes:
  run.json        the settings that made the records (model and adapter SHA-256, detector
                  configuration, output options); --resume refuses other settings
  scores.jsonl    one JSON object per input: path, score, global_score, map_max, map_mean,
                  map_min, width, height, map, heatmap (paths relative to DIR), anomalous
                  (--threshold), mask, regions (--pixel-threshold); a failed input has path
                  and error instead (--format csv: scores.csv)
  maps/NAME.png   the anomaly map at the image's size, 16-bit grey, value = round(p * 65535)
  heatmaps/NAME.png  inferno colormap over the image, on --heatmap-scale: fixed [0, 1] (default),
                  image (each map's own range) or run (the whole run's range, drawn after the
                  last record); --colorbar adds a labelled colour bar
  masks/NAME.png  with --pixel-threshold or --thresholds: the defect mask (255 where map >= P)
  report.html     with --report: the page of `zsad report` (thumbnails in thumbs/)
Without --out the records go to stdout (JSON Lines, or CSV with --format csv) and no file is
written. NAME is the path inside the folder argument without extension (docs/detect.md: how
names are kept distinct and shortened). Folder walks leave out masks and zsad output folders.

Examples:
  zsad detect bottle/test --model openai/clip-vit-base-patch16 --out runs/bottle
  zsad detect imgs/ -m random:ViT-B-16 --threshold 0.7 | jq -c 'select(.anomalous)'
  zsad detect /data/pcb -m M --shard 3/8 --out out/shard-3 --resume --quiet

",
    models!(),
    "

Exit status: 0 every input scored; 1 some inputs failed (each has an `error` record, the others
are scored and written); 2 bad usage (a missing INPUT path, a flag out of range: nothing is
written), a model or adapter that cannot be loaded, or an output that cannot be written; 130
stopped by Ctrl-C or SIGTERM (what was scored is kept; the same command with --resume goes on)."
);

pub const EVAL: &str = concat!(
    "Writes metrics.json, metrics.csv, metrics.md, the ROC and PR curves (roc_image.svg, ... and
their numbers in curves.json) and run.json to --out; the table goes to stdout.

Examples:
  zsad eval --data mvtec_ad --model openai/clip-vit-large-patch14-336 --adapter a.safetensors --out ev
  zsad eval --data mtd --predictions runs/mtd --out ev-mtd

",
    models!(),
    "

",
    exit_plain!()
);

pub const CALIBRATE: &str = concat!(
    "Writes thresholds.json: the image and pixel thresholds, what they achieve on the data, and the
model they were chosen with (`detect --thresholds` refuses other settings).

Examples:
  zsad calibrate --data bottle --model M --out thresholds.json
  zsad calibrate --normal good/ --model M --max-fpr 0.01 --out thresholds.json
  zsad calibrate --data bottle --predictions runs/bottle --min-recall 0.95 --out t.json

",
    models!(),
    "

",
    exit_plain!()
);

pub const TRAIN: &str = concat!(
    "Writes the adapter (--out) and, after every epoch, its checkpoint beside it; --resume goes on
from the checkpoint.

Examples:
  zsad train --data visa --model openai/clip-vit-large-patch14-336 --preset adaclip --out a.safetensors
  zsad train --data mvtec_ad --model M --preset anomalyclip --epochs 15 --out b.safetensors --resume

",
    models!(),
    "

",
    exit_plain!()
);

pub const MANIFEST: &str = concat!(
    "Writes one row per image (image, mask, label, class); labels come from the masks where the
layout has none. Magnetic Tile Defect (one product, a folder per defect type) is one class.

Examples:
  zsad manifest mtd --out mtd.csv
  zsad manifest mvtec_ad/bottle --out bottle.jsonl

",
    exit_plain!()
);

pub const IMPORT: &str = concat!(
    "Writes a zsad adapter that records the backbone (--model) it belongs to.

Examples:
  zsad import-checkpoint pretrained_visa_clinicdb.pth --format adaclip \\
      --model openai/clip-vit-large-patch14-336 --out adaclip.safetensors
  zsad import-checkpoint epoch_15.pth --format anomalyclip --model M --out anomalyclip.safetensors

",
    models!(),
    "

",
    exit_plain!()
);

pub const MERGE: &str =
    "Each shard must be a finished detect run (run.json says so) with the same settings, and the
shards must be 0..N-1 of one --shard K/N split, each once; otherwise merge names what is wrong
(--partial merges anyway). Records are joined by path (a scored record beats a failed one) and
sorted; map, heatmap and mask files are copied under names zsad builds. --out must be new,
empty or one of the shards (--overwrite replaces an earlier merge).

Examples:
  zsad merge out/shard-* --out out/all
  zsad merge out/shard-0 out/shard-1 --out out/all --overwrite

Exit status: 0 merged; 1 merged, but some run-scale heatmaps could not be drawn; 2 a shard that
is missing, unfinished or of other settings, bad usage, or an output that cannot be written.";

pub const REPORT: &str =
    "The page lists every input of the run's records (scores.jsonl or scores.csv), highest
score first, failed inputs last, with its image, heatmap and defect mask side by side, a page
of rows at a time. Thumbnails are made in DIR/thumbs/ (again only when their source changed);
the enlarged view shows the run's own heatmap and mask and the input image itself (a preview
for formats browsers cannot show, such as TIFF). Relative input paths are read from the folder
detect ran in (run.json's info.cwd). The filters, order and page are kept in the URL
(report.html#filter=failed&page=2). Keys: j/k or arrows move, Enter enlarges, left/right turn
pages (images when enlarged), Esc closes, / searches.

Examples:
  zsad report runs/bottle
  zsad report runs/bottle --eval ev-bottle --page-size 50

Exit status: 0 the page shows every picture; 1 some pictures could not be made (an input moved
away, a heatmap missing; each row says why, the page is written); 2 bad usage or no records in
DIR.";

pub const BENCH: &str = concat!(
    "Prints seconds per image for each stage (one image at a time unless --batch-size), load and
set-up times and peak memory; --json prints one object.

Examples:
  zsad bench imgs/ --model random:ViT-B-16 --precision bf16
  zsad bench imgs/ -m random:ViT-L-14-336 --image-size 518 --json

",
    models!(),
    "

",
    exit_plain!()
);

pub const INFO: &str = concat!(
    "Examples:
  zsad info --model openai/clip-vit-base-patch16
  zsad info --model random:ViT-L-14-336 --json

",
    models!(),
    "

",
    exit_plain!()
);

pub const FEATURES: &str = concat!(
    "The output holds `image_embeds` [N, E] and `text_embeds` [T, E] (projected, not normalised, as
CLIPModel.get_image_features / get_text_features), and for each --layers i `layer_<i>`
[N, 1 + patches, width]: the residual stream after block i (Hugging Face hidden_states[i]; 0 is
the input of the first block). Images are squashed to the model's input size with PIL-style
bicubic resampling and CLIP-normalised. The metadata lists the model and the images in order.

Examples:
  zsad features --model openai/clip-vit-base-patch16 --text 'a photo of a screw' \\
      --layers 6,12 --out feats.safetensors img1.png img2.jpg
  zsad features --model random:tiny --text 'a photo of a pill' --out t.safetensors

",
    models!(),
    "

",
    exit_plain!()
);

pub const REFERENCE_BUILD: &str = concat!(
    "Examples:
  zsad reference build good/ --model M --out bank.safetensors
  zsad detect test/ --model M --reference bank.safetensors --out runs/test

",
    models!(),
    "

Exit status: 0 every image is in the bank; 1 some images could not be used (each is named, the
bank holds the others); 2 no usable image, bad usage, or an output that cannot be written."
);
