//! Hand-made prompt ensembles of the references: AdaCLIP's states and templates
//! (caoyunkang/AdaCLIP@e27ee32 `method/adaclip.py` l.151-156 onwards), shared with April-GAN and
//! WinCLIP, and AnomalyCLIP's object-agnostic words (zqhang/AnomalyCLIP@45ed4dd
//! `prompt_ensemble.py` l.58-60).

/// Normal-state phrases shared by AdaCLIP, April-GAN and WinCLIP (`{}` = the object word).
pub const NORMAL_STATES: &[&str] = &[
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
];

/// AdaCLIP's and April-GAN's abnormal states.
pub const ABNORMAL_STATES: &[&str] = &[
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
];

/// AdaCLIP's four templates (`TextEmbebddingLayer`, `adaclip.py` l.146-230).
pub const ADACLIP_TEMPLATES: &[&str] = &[
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
];

/// WinCLIP's templates (anomalib `prompting.py`), without its duplicated
/// "a jpeg corrupted photo of the {}." (21 listed, 20 distinct).
pub const WINCLIP_TEMPLATES: &[&str] = &[
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
];

/// The object word as AdaCLIP derives it from a dataset folder: `-` becomes a space,
/// underscores stay (`metal_nut`, `pcb1`).
pub fn class_word(folder: &str) -> String {
    folder.replace('-', " ")
}

/// Sentences of one state group: state outer loop, template inner loop (AdaCLIP's order).
pub fn sentences(states: &[&str], templates: &[&str], object: &str) -> Vec<String> {
    states
        .iter()
        .flat_map(|s| {
            let phrase = s.replace("{}", object);
            templates.iter().map(move |t| t.replace("{}", &phrase))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaclip_has_28_normal_and_20_abnormal_sentences_in_order() {
        let obj = class_word("metal_nut");
        let n = sentences(NORMAL_STATES, ADACLIP_TEMPLATES, &obj);
        let a = sentences(ABNORMAL_STATES, ADACLIP_TEMPLATES, &obj);
        assert_eq!((n.len(), a.len()), (28, 20));
        assert_eq!(n[0], "a bad photo of a metal_nut.");
        assert_eq!(n[5], "a low resolution photo of the flawless metal_nut.");
        assert_eq!(a[19], "a cropped photo of the metal_nut with damage.");
        assert_eq!(class_word("pcb-1"), "pcb 1");
    }
}
