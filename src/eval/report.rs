//! `metrics.json`, `metrics.csv` and `metrics.md`: per class and the unweighted mean over
//! classes, in the papers' column order, as fractions (the Markdown table in percent).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::metrics::Curve;

/// Metric keys in the papers' order: image (AUROC, AP, F1-max), pixel (AUROC, AP, F1-max, AUPRO).
pub const METRICS: [&str; 7] = [
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub image_auroc: Option<f64>,
    pub image_ap: Option<f64>,
    pub image_f1_max: Option<f64>,
    pub pixel_auroc: Option<f64>,
    pub pixel_ap: Option<f64>,
    pub pixel_f1_max: Option<f64>,
    pub pixel_aupro: Option<f64>,
    pub images: usize,
    pub anomalous_images: usize,
    pub pixels: usize,
    /// Why a metric is undefined (only normal images, no anomalous pixels, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl ClassMetrics {
    pub fn values(&self) -> [Option<f64>; 7] {
        [
            self.image_auroc,
            self.image_ap,
            self.image_f1_max,
            self.pixel_auroc,
            self.pixel_ap,
            self.pixel_f1_max,
            self.pixel_aupro,
        ]
    }

    fn from_values(v: [Option<f64>; 7]) -> Self {
        Self {
            image_auroc: v[0],
            image_ap: v[1],
            image_f1_max: v[2],
            pixel_auroc: v[3],
            pixel_ap: v[4],
            pixel_f1_max: v[5],
            pixel_aupro: v[6],
            ..Default::default()
        }
    }
}

/// The whole report; `curves` (image, pixel) per class are for the plots, not serialised.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub classes: BTreeMap<String, ClassMetrics>,
    pub mean: ClassMetrics,
    #[serde(skip)]
    pub curves: BTreeMap<String, (Curve, Curve)>,
}

impl Report {
    /// The mean of each metric over the classes where it is defined.
    pub fn new(
        classes: BTreeMap<String, ClassMetrics>,
        curves: BTreeMap<String, (Curve, Curve)>,
    ) -> Self {
        let mut sums = [0.0f64; 7];
        let mut counts = [0usize; 7];
        for c in classes.values() {
            for (k, v) in c.values().iter().enumerate() {
                if let Some(v) = v {
                    sums[k] += v;
                    counts[k] += 1;
                }
            }
        }
        let mut mean = ClassMetrics::from_values(std::array::from_fn(|k| {
            (counts[k] > 0).then(|| sums[k] / counts[k] as f64)
        }));
        mean.images = classes.values().map(|c| c.images).sum();
        mean.anomalous_images = classes.values().map(|c| c.anomalous_images).sum();
        mean.pixels = classes.values().map(|c| c.pixels).sum();
        Self {
            classes,
            mean,
            curves,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("serialisable") + "\n"
    }

    pub fn to_csv(&self) -> String {
        let mut out = String::from("class,");
        out += &METRICS.join(",");
        out += ",images,anomalous_images,note\n";
        let row = |name: &str, c: &ClassMetrics| {
            let vals: Vec<String> = c
                .values()
                .iter()
                .map(|v| v.map(|x| x.to_string()).unwrap_or_default())
                .collect();
            let note = c.note.clone().unwrap_or_default().replace('"', "'");
            format!(
                "{},{},{},{},\"{note}\"\n",
                csv_field(name),
                vals.join(","),
                c.images,
                c.anomalous_images
            )
        };
        for (name, c) in &self.classes {
            out += &row(name, c);
        }
        out += &row("mean", &self.mean);
        out
    }

    pub fn to_markdown(&self) -> String {
        let head = [
            "class",
            "image AUROC",
            "image AP",
            "image F1-max",
            "pixel AUROC",
            "pixel AP",
            "pixel F1-max",
            "pixel AUPRO",
            "images (anomalous)",
        ];
        let mut out = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
        let pct = |v: Option<f64>| {
            v.map(|x| format!("{:.1}", 100.0 * x))
                .unwrap_or("n/a".into())
        };
        let mut notes = Vec::new();
        for (name, c) in self
            .classes
            .iter()
            .chain([(&"**mean**".to_string(), &self.mean)])
        {
            let vals: Vec<String> = c.values().iter().map(|&v| pct(v)).collect();
            out += &format!(
                "| {name} | {} | {} ({}) |\n",
                vals.join(" | "),
                c.images,
                c.anomalous_images
            );
            if let Some(n) = &c.note {
                notes.push(format!("- {name}: {n}"));
            }
        }
        out += "\nAll values in %; the mean is unweighted over the classes where a metric is defined.\n";
        if !notes.is_empty() {
            out += "\n";
            out += &notes.join("\n");
            out += "\n";
        }
        out
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
