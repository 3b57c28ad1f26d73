//! A detector kept in memory and run on images the caller holds: what the Python package's
//! `zsad.Detector` runs. It is `zsad detect` for one input at a time, without files: the same
//! options checked the same way ([`DetectOptions::validate_settings`]), the same plan, build and
//! reference bank, and per image the same steps as the pipeline and `render` (preprocessing,
//! the model pass, the finite check, the map resized to the image, the threshold, the defect
//! mask and its regions), so that its numbers are the CLI's bit for bit.
//!
//! Files are decoded by the CLI's guarded decoder ([`ImageDetector::decode`]: regular files
//! only, within `max_pixels`); images given in memory are held to the same limits
//! ([`ImageDetector::check_image`]).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::RgbImage;
use serde_json::Value;

use super::detect::DetectOptions;
use super::info::{describe, ModelInfo};
use super::pipeline::{check_finite, detect_in_parts, pass_size};
use super::reference::BankOptions;
use super::render::{map_at_image_size, MapStats};
use crate::data::image::{check_dimensions, decode_limited, into_rgb8, DecodeLimits};
use crate::data::records::Regions;
use crate::decision::regions::defect_regions;
use crate::decision::thresholds::ThresholdFile;
use crate::error::{Error, Result};
use crate::method::{Detection, Detector};
use crate::progress::Console;

/// One scored image: what a record of `zsad detect` says about it, with its map and defect
/// mask at the image's size instead of files.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageResult {
    /// The image score (joint with the map where the method says so), a record's `score`.
    pub score: f32,
    /// The method's global score before pixel evidence is fused in.
    pub global_score: f32,
    pub width: u32,
    pub height: u32,
    /// The anomaly map at the image's size, row-major (`height` rows of `width`).
    pub map: Vec<f32>,
    /// A record's `map_max`, `map_mean` and `map_min`.
    pub stats: MapStats,
    /// `score >= threshold`, with an image threshold.
    pub anomalous: Option<bool>,
    /// `map >= pixel threshold`, small regions removed, with a pixel threshold.
    pub mask: Option<Vec<bool>>,
    /// The mask's connected regions, with a pixel threshold.
    pub regions: Option<Regions>,
}

/// A built detector with its thresholds, ready for images.
pub struct ImageDetector {
    detector: Detector,
    settings: Value,
    info: ModelInfo,
    threshold: Option<f32>,
    pixel_threshold: Option<f32>,
    min_region_area: u64,
    batch_size: usize,
    limits: DecodeLimits,
}

impl ImageDetector {
    /// Checks `opts` as `zsad detect` does (less the rules about output files: inputs, `out`
    /// and the file options are not read), reads the thresholds file, plans the model and
    /// checks what needs no weights, then builds it and attaches the reference bank.
    pub fn new(opts: &DetectOptions, console: &Console) -> Result<Self> {
        opts.validate_settings()?;
        let (mut threshold, mut pixel_threshold) = (opts.threshold, opts.output.pixel_threshold);
        let thresholds = match &opts.thresholds {
            Some(p) => {
                let f = ThresholdFile::load(p)?;
                threshold = f.image.as_ref().map(|c| c.threshold);
                pixel_threshold = f.pixel.as_ref().map(|c| c.threshold);
                Some((f, p.clone()))
            }
            None => None,
        };
        let check =
            |settings: &Value| check_thresholds(thresholds.as_ref(), opts, settings, console);
        let plan = opts.detector.plan(console)?;
        let mut settings = plan.settings.clone();
        let bank_file = opts.reference.read_bank_file(&plan.settings)?;
        if let Some(b) = &bank_file {
            settings["reference"] = b.settings()?;
        }
        // A bank built from images is known only once the model runs.
        let references_pending = opts.reference.is_set() && bank_file.is_none();
        if !references_pending {
            check(&settings)?;
        }
        let built = plan.build()?;
        let info = describe(&built.loaded);
        let bank = BankOptions::for_pipeline(&opts.pipeline);
        let (detector, _) =
            opts.reference
                .attach(built.detector, &mut settings, bank_file, &bank, console)?;
        if references_pending {
            check(&settings)?;
        }
        Ok(Self {
            detector,
            settings,
            info,
            threshold,
            pixel_threshold,
            min_region_area: opts.output.min_region_area,
            batch_size: opts.pipeline.batch_size,
            limits: opts.pipeline.limits,
        })
    }

    /// `run.json`'s settings of the model side (with `reference` when a bank is attached).
    pub fn settings(&self) -> &Value {
        &self.settings
    }

    /// The model, as `zsad info` describes it (the GEMM in use included).
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The square size images are resized to for the model.
    pub fn image_size(&self) -> usize {
        self.detector.image_size()
    }

    /// The image and pixel thresholds in use (given, or from the thresholds file).
    pub fn thresholds(&self) -> (Option<f32>, Option<f32>) {
        (self.threshold, self.pixel_threshold)
    }

    /// The most images per model pass: `batch_size` as `zsad detect` reads it (`requested`
    /// overrides the detector's own; 0 picks as the CLI does).
    pub fn pass_size(&self, requested: Option<usize>) -> usize {
        pass_size(&self.detector, requested.unwrap_or(self.batch_size))
    }

    /// Decodes an image file as `zsad detect` does: through the guarded reader (regular files
    /// only), within `max_pixels`, EXIF orientation applied, to 8-bit RGB
    /// (`data::image::decode_rgb`, keeping the typed error: a missing file is
    /// [`crate::error::FileError`], an undecodable one [`crate::error::InputError`]).
    pub fn decode(&self, path: &Path) -> Result<RgbImage> {
        decode_limited(path, &self.limits).map(into_rgb8)
    }

    /// Whether an image given in memory is within the limits a decoded file is held to (no
    /// empty image, `max_pixels`, the longest side at most 100 times the shortest); `name`
    /// names it in the error.
    pub fn check_image(&self, name: &str, width: u32, height: u32) -> Result<()> {
        if width == 0 || height == 0 {
            return Err(Error::input(
                name,
                format!("image has no pixels ({width}x{height})"),
            ));
        }
        check_dimensions(&PathBuf::from(name), width, height, &self.limits)
    }

    /// Scores `images`, at most `pass` per model pass (see [`Self::pass_size`]). Each image
    /// gets its result, or why it has none (non-finite model output, as a record's `error`);
    /// a model that cannot run is the error of the call. A stop request
    /// (`progress::request_stop`) ends the call between passes with [`Error::Interrupted`].
    pub fn detect(
        &self,
        images: &[RgbImage],
        pass: usize,
        console: &Console,
    ) -> Result<Vec<std::result::Result<ImageResult, String>>> {
        let dev = self.detector.device().clone();
        let size = self.detector.image_size();
        let pass = pass.max(1);
        let mut limit = pass;
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(pass) {
            if crate::progress::stop_requested() {
                return Err(Error::Interrupted {
                    kept: format!("{} of {} images scored", out.len(), images.len()),
                });
            }
            let pixels = chunk
                .iter()
                .map(|rgb| crate::clip::preprocess::preprocess(rgb, size, &dev))
                .collect::<Result<Vec<Tensor>>>()?;
            let dets = detect_in_parts(&self.detector, &pixels, &mut limit, console, None)?;
            for (rgb, d) in chunk.iter().zip(dets) {
                out.push(check_finite(&d).map(|()| self.finish(rgb, &d)));
            }
        }
        Ok(out)
    }

    /// The map at the image's size and what the thresholds make of it, as `render` computes
    /// them for a record.
    fn finish(&self, rgb: &RgbImage, det: &Detection) -> ImageResult {
        let (w, h) = rgb.dimensions();
        let map = map_at_image_size(det, w, h);
        let stats = MapStats::of(&map);
        let (mask, regions) = match self.pixel_threshold {
            None => (None, None),
            Some(t) => {
                let (mask, items) =
                    defect_regions(&map, w as usize, h as usize, t, self.min_region_area);
                let count = items.len();
                (Some(mask), Some(Regions { count, items }))
            }
        };
        ImageResult {
            score: det.score,
            global_score: det.global,
            width: w,
            height: h,
            map,
            stats,
            anomalous: self.threshold.map(|t| det.score >= t),
            mask,
            regions,
        }
    }
}

/// Thresholds calibrated with other settings are refused (warned, with `force_thresholds`),
/// as `zsad detect` does.
fn check_thresholds(
    thresholds: Option<&(ThresholdFile, PathBuf)>,
    opts: &DetectOptions,
    settings: &Value,
    console: &Console,
) -> Result<()> {
    let Some((f, path)) = thresholds else {
        return Ok(());
    };
    match f.check_matches(settings, path) {
        Err(e) if opts.force_thresholds => {
            console.warn(&format!("`force_thresholds`: {e}"));
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::Record;
    use crate::jobs::detect::DetectJob;

    fn image(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 + y * 3) as u8,
                (x * x + 5 * y) as u8,
                ((x ^ y) * 11) as u8,
            ])
        })
    }

    fn options(model: &str) -> DetectOptions {
        let mut o = DetectOptions::new(Vec::new(), model, None);
        o.threshold = Some(0.5);
        o.output.pixel_threshold = Some(0.5);
        o
    }

    /// The in-memory detector gives the numbers of `zsad detect` (the same job, run over the
    /// file) bit for bit, and its map and mask are the ones `render` writes.
    #[test]
    fn scores_equal_the_detect_job_on_the_same_image() {
        let dir = std::env::temp_dir().join(format!("zsad-single-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (w, h) = (45u32, 31u32);
        let rgb = image(w, h);
        let file = dir.join("x.png");
        rgb.save(&file).unwrap();
        let console = Console::silent();

        let det = ImageDetector::new(&options("random:tiny"), &console).unwrap();
        assert_eq!(det.thresholds(), (Some(0.5), Some(0.5)));
        let decoded = det.decode(&file).unwrap();
        assert_eq!(decoded, rgb, "PNG round trip");
        let got = det.detect(&[rgb.clone(), decoded], 1, &console).unwrap();
        let a = got[0].clone().unwrap();
        assert_eq!(a.map.len(), (w * h) as usize);
        assert_eq!((a.width, a.height), (w, h));

        // The job over the file, records only (pixel thresholds need a folder there).
        let mut opts = DetectOptions::new(vec![file.display().to_string()], "random:tiny", None);
        opts.threshold = Some(0.5);
        let mut records: Vec<Record> = Vec::new();
        DetectJob::new(opts, &mut std::io::empty())
            .unwrap()
            .run(&console, Vec::new(), &mut |r: &Record| {
                records.push(r.clone());
                Ok(())
            })
            .unwrap();
        let r = &records[0];
        for b in [&a, &got[1].clone().unwrap()] {
            assert_eq!(Some(b.score.to_bits()), r.score.map(f32::to_bits));
            assert_eq!(
                Some(b.global_score.to_bits()),
                r.global_score.map(f32::to_bits)
            );
            assert_eq!(Some(b.stats.max), r.map_max);
            assert_eq!(Some(b.stats.mean), r.map_mean);
            assert_eq!(Some(b.stats.min), r.map_min);
            assert_eq!(b.anomalous, r.anomalous);
        }

        // Two images per pass: the same numbers up to float rounding.
        let two = det
            .detect(&[rgb.clone(), image(20, 60)], 2, &console)
            .unwrap();
        let t = two[0].clone().unwrap();
        assert!(
            (t.score - a.score).abs() <= 1e-6,
            "{} vs {}",
            t.score,
            a.score
        );
        assert_eq!(two[1].as_ref().unwrap().map.len(), 20 * 60);

        // The map and the mask are render's.
        let plain = det.detect(&[rgb.clone()], 1, &console).unwrap()[0]
            .clone()
            .unwrap();
        let scored = det
            .detector
            .detect(
                &Tensor::stack(
                    &[crate::clip::preprocess::preprocess(
                        &rgb,
                        det.image_size(),
                        &det.detector.device().clone(),
                    )
                    .unwrap()],
                    0,
                )
                .unwrap(),
            )
            .unwrap();
        let out = super::super::render::OutputOptions {
            pixel_threshold: Some(0.5),
            ..super::super::render::OutputOptions::records_only()
        };
        let rendered = super::super::render::render(&out, "x", &rgb, &scored[0]).unwrap();
        assert_eq!(plain.map, map_at_image_size(&scored[0], w, h));
        assert_eq!(plain.regions, rendered.regions);
        let (mask, _) = defect_regions(&plain.map, w as usize, h as usize, 0.5, 1);
        assert_eq!(plain.mask, Some(mask));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn options_are_checked_as_detect_checks_them_and_images_as_files_are() {
        let console = Console::silent();
        let mut o = options("random:tiny");
        o.pipeline.batch_size = 300;
        let e = ImageDetector::new(&o, &console).err().unwrap();
        assert!(
            e.to_string().starts_with("`batch_size` 300: at most 256"),
            "{e}"
        );
        let mut o = options("random:tiny");
        o.thresholds = Some("t.json".into());
        let e = ImageDetector::new(&o, &console).err().unwrap();
        assert!(e.to_string().contains("drop `threshold`"), "{e}");
        let mut o = DetectOptions::new(Vec::new(), "random:tiny", None);
        o.pipeline.limits = DecodeLimits::with_max_pixels(1000);
        let det = ImageDetector::new(&o, &console).unwrap();
        assert_eq!(det.thresholds(), (None, None));
        assert!(det.check_image("a", 30, 30).is_ok());
        let e = det.check_image("a", 40, 30).unwrap_err().to_string();
        assert!(e.contains("over the budget of 1000 (`max_pixels`"), "{e}");
        let e = det.check_image("a", 202, 2).unwrap_err().to_string();
        assert!(e.contains("more elongated than 100:1"), "{e}");
        let e = det.check_image("images[2]", 0, 5).unwrap_err().to_string();
        assert_eq!(e, "images[2]: image has no pixels (0x5)");
        let e = det.decode(Path::new("/no/such/file.png")).unwrap_err();
        assert!(
            matches!(&e, Error::File(f) if f.is_not_found()),
            "a missing file is a typed file error: {e}"
        );
        let e = det.decode(&std::env::temp_dir()).unwrap_err();
        assert!(e.to_string().contains("only regular files are read"), "{e}");
        // Without thresholds: no decision, no mask.
        let r = det.detect(&[image(20, 10)], 1, &console).unwrap()[0]
            .clone()
            .unwrap();
        assert_eq!((r.anomalous, r.mask, r.regions), (None, None, None));
    }
}
