//! Evaluation as the papers compute it: per-class image and pixel metrics, the unweighted mean
//! over classes, reports and curve plots.

pub mod metrics;
pub mod plot;
pub mod report;

use std::collections::BTreeMap;

use metrics::{BinaryMetrics, Curve, PixelScores};

crate::choice::choice_enum! {
    /// What to do with a class whose images (or pixels) all have one label, where the metrics are
    /// undefined.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SingleLabel {
        /// Report the metric as undefined (null) and leave the class out of that metric's mean.
        Skip = "skip",
        /// AdaCLIP's rule: AUROC, AP and F1-max are 0 and count in the mean.
        Zero = "zero",
    }
}

// Written out: `#[default]` cannot pass through `choice_enum!`.
#[allow(clippy::derivable_impls)]
impl Default for SingleLabel {
    fn default() -> Self {
        Self::Skip
    }
}

/// Evidence of one class, added image by image.
#[derive(Debug, Clone, Default)]
pub struct ClassEvidence {
    image_pos: Vec<f32>,
    image_neg: Vec<f32>,
    pixels: Option<PixelScores>,
}

/// Per-class evidence of a whole evaluation.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub classes: BTreeMap<String, ClassEvidence>,
}

impl Evaluation {
    /// Adds one image: its score and label, and its map and mask (same `h x w`).
    pub fn add(
        &mut self,
        class: &str,
        score: f32,
        anomalous: bool,
        map: &[f32],
        mask: &[bool],
        h: usize,
        w: usize,
    ) {
        let c = self.classes.entry(class.to_string()).or_default();
        if anomalous {
            c.image_pos.push(score);
        } else {
            c.image_neg.push(score);
        }
        c.pixels
            .get_or_insert_with(PixelScores::new)
            .add(map, mask, h, w);
    }

    /// The image and pixel curves over every class together (thresholds are chosen for all the
    /// data), and the number of images.
    pub fn pooled_curves(self) -> (Curve, Curve, usize) {
        let mut pos = Vec::new();
        let mut neg = Vec::new();
        let mut pixels = PixelScores::new();
        for (_, mut ev) in self.classes {
            pos.append(&mut ev.image_pos);
            neg.append(&mut ev.image_neg);
            if let Some(p) = ev.pixels {
                pixels.append(p);
            }
        }
        let images = pos.len() + neg.len();
        (Curve::new(&mut pos, &mut neg), pixels.into_curve(), images)
    }

    /// Computes every class's metrics and the mean.
    pub fn finish(self, rule: SingleLabel, grid: metrics::ProGrid) -> report::Report {
        let mut classes = BTreeMap::new();
        let mut curves = BTreeMap::new();
        for (name, mut ev) in self.classes {
            let images = ev.image_pos.len() + ev.image_neg.len();
            let anomalous_images = ev.image_pos.len();
            let image_curve = Curve::new(&mut ev.image_pos, &mut ev.image_neg);
            let mut image = BinaryMetrics::from(&image_curve);
            let pixels = ev.pixels.unwrap_or_else(PixelScores::new);
            let n_pixels = pixels.pixels();
            let (mut pixel, aupro, pixel_curve) = pixels.finish_with(grid);
            let mut notes = Vec::new();
            if anomalous_images == 0 {
                notes.push("only normal images".to_string());
            } else if anomalous_images == images {
                notes.push("only anomalous images".to_string());
            }
            if pixel.auroc.is_none() {
                notes.push("no anomalous pixels".to_string());
            }
            // One label only: AUROC is undefined and AP/F1 are trivial (1 with only positives),
            // so all three are left out, or set to 0 under AdaCLIP's rule.
            let single = match rule {
                SingleLabel::Skip => BinaryMetrics::default(),
                SingleLabel::Zero => BinaryMetrics {
                    auroc: Some(0.0),
                    ap: Some(0.0),
                    f1_max: Some(0.0),
                },
            };
            if image.auroc.is_none() {
                image = single;
            }
            if pixel.auroc.is_none() {
                pixel = single;
            }
            classes.insert(
                name.clone(),
                report::ClassMetrics {
                    image_auroc: image.auroc,
                    image_ap: image.ap,
                    image_f1_max: image.f1_max,
                    pixel_auroc: pixel.auroc,
                    pixel_ap: pixel.ap,
                    pixel_f1_max: pixel.f1_max,
                    pixel_aupro: aupro,
                    images,
                    anomalous_images,
                    pixels: n_pixels,
                    note: (!notes.is_empty()).then(|| notes.join("; ")),
                },
            );
            curves.insert(name, (image_curve, pixel_curve));
        }
        report::Report::new(classes, curves)
    }
}
