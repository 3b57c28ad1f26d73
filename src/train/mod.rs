//! Training an adapter on auxiliary annotated data (caoyunkang/AdaCLIP@e27ee32
//! `method/trainer.py` `train_one_batch` l.103-141; zqhang/AnomalyCLIP@45ed4dd `train.py`): only the adapter's tensors are variables, the backbone stays plain
//! (frozen) tensors; the losses are the references'.

pub mod augment;
pub mod fit;
pub mod losses;
pub mod optim;

use crate::choice::Choice;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::clip::{ClipModel, ClipTokenizer};
use crate::data::dataset::Sample;
use crate::method::config::{Preset, TextPrompts};
use crate::method::params::{AdapterParams, NamedTensors};
use crate::method::{prompts, Adapter, Detector, TextInputs};
use crate::rng::SplitMix64;
use crate::{Error, Result};
use optim::{Adam, AdamConfig};

crate::choice::choice_enum! {
    /// The image-level loss.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum ImageLoss {
        /// focal loss on the image probabilities (AdaCLIP)
        Focal = "focal",
        /// cross-entropy (AnomalyCLIP)
        CrossEntropy = "cross-entropy",
    }
}

crate::choice::choice_enum! {
    /// How the dice loss groups pixels.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum DiceGroups {
        /// per mask row (AdaCLIP's batch-1 `squeeze()` quirk)
        Rows = "rows",
        /// per image (AnomalyCLIP)
        Images = "images",
    }
}

/// Training hyper-parameters; [`TrainOptions::for_preset`] gives the references' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 = Adam.
    pub weight_decay: f64,
    pub seed: u64,
    /// Probability that a sample is replaced by a 2x2 mosaic of four images of its class
    /// (April-GAN / AdaCLIP augmentation).
    pub mosaic_rate: f64,
    pub image_loss: ImageLoss,
    /// Weight of the summed per-layer pixel losses.
    pub pixel_weight: f64,
    pub dice: DiceGroups,
    /// Stop after this many steps in total (smoke runs, tests).
    pub max_steps: Option<usize>,
}

impl TrainOptions {
    /// AdaCLIP: AdamW lr 0.01, betas (0.5, 0.999), decay 0.01, 5 epochs, batch 1, mosaic 0.2,
    /// focal image loss, per-row dice. AnomalyCLIP / HeadCLIP: Adam lr 1e-3, betas (0.5, 0.999),
    /// 15 epochs, batch 8, cross-entropy, per-image dice, pixel losses × 4 / layers (its `lam = 4`
    /// with one layer). Ours: AdamW lr 2e-3, 5 epochs, batch 1, mosaic 0.2, focal, per-image dice.
    pub fn for_preset(preset: Preset, layers: usize) -> Self {
        let adaclip = Self {
            epochs: 5,
            batch_size: 1,
            lr: 0.01,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            seed: 111,
            mosaic_rate: 0.2,
            image_loss: ImageLoss::Focal,
            pixel_weight: 1.0,
            dice: DiceGroups::Rows,
            max_steps: None,
        };
        match preset {
            Preset::Adaclip | Preset::ZeroShot => adaclip,
            Preset::Anomalyclip | Preset::Headclip => Self {
                epochs: 15,
                batch_size: 8,
                lr: 1e-3,
                weight_decay: 0.0,
                mosaic_rate: 0.0,
                image_loss: ImageLoss::CrossEntropy,
                pixel_weight: 4.0 / layers.max(1) as f64,
                dice: DiceGroups::Images,
                ..adaclip
            },
            Preset::Zsad => Self {
                lr: 2e-3,
                dice: DiceGroups::Images,
                ..adaclip
            },
        }
    }

    fn adam(&self) -> AdamConfig {
        AdamConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// The presets with learned tensors, for messages: `adaclip, anomalyclip, headclip, zsad`.
pub fn trainable_presets() -> String {
    // Every preset but the training-free one learns something.
    Preset::ALL
        .iter()
        .filter(|p| **p != Preset::ZeroShot)
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One preprocessed training example.
pub struct Example {
    /// `[3, S, S]` normalised pixels.
    pub pixels: Vec<f32>,
    /// `S x S` ground truth.
    pub mask: Vec<bool>,
    pub label: bool,
}

/// Decodes, optionally mosaics, and resizes one sample (masks: PIL bilinear, then > 0.5).
pub fn load_example(samples: &[&Sample], size: usize) -> Result<Example> {
    let (rgb, mask) = augment::compose(samples)?;
    let img = crate::data::image::resize_bicubic(&rgb, size as u32, size as u32);
    let mask = crate::data::image::resize_mask(&mask, size as u32, size as u32);
    let any = mask.iter().any(|&b| b);
    // A mosaic is anomalous when its mask is (the references keep the label of the first image,
    // which mislabels mosaics; we do not copy that).
    let label = match samples {
        [one] => one.label.unwrap_or(any),
        _ => any,
    };
    Ok(Example {
        pixels: crate::clip::preprocess::normalize(&img),
        mask,
        label,
    })
}

/// Progress of a run, saved in checkpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Epochs finished.
    pub epochs_done: usize,
    pub steps: usize,
    /// Mean loss of each finished epoch.
    pub epoch_losses: Vec<f64>,
}

/// The trainable state: variables and optimiser.
pub struct Trainer {
    pub adapter: Adapter,
    pub options: TrainOptions,
    vars: Vec<(String, Var)>,
    opt: Adam,
    pub progress: Progress,
    device: Device,
    /// The model's dtype, which the forward sees the variables in.
    dtype: DType,
    /// The variables' and the optimiser's own dtype: f32 at least (f64 stays f64), as PyTorch's
    /// mixed precision keeps master weights, since in f16 Adam's eps (1e-8) is 0 and a zero
    /// gradient gives 0/0, and in bf16 small updates are lost to rounding.
    master: DType,
}

impl Trainer {
    /// Starts from `adapter` (fresh or loaded), its tensors becoming variables on `device`.
    pub fn new(
        adapter: Adapter,
        options: TrainOptions,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut names: Vec<&String> = adapter.tensors.keys().collect();
        names.sort();
        let vars = names
            .into_iter()
            .map(|n| {
                let t = adapter.tensors[n]
                    .to_device(device)?
                    .to_dtype(crate::clip::wide(dtype))?;
                Ok((n.clone(), Var::from_tensor(&t)?))
            })
            .collect::<Result<Vec<_>>>()?;
        if vars.is_empty() {
            return Err(Error::training(format!(
                "the {} preset has no learned tensors to train; train one of: {}",
                adapter.config.preset.name(),
                trainable_presets()
            )));
        }
        let opt = Adam::new(options.adam());
        Ok(Self {
            adapter,
            options,
            vars,
            opt,
            progress: Progress::default(),
            device: device.clone(),
            dtype,
            master: crate::clip::wide(dtype),
        })
    }

    /// The variables, by adapter tensor name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The variables by role, through the adapter's name tree, in the model's dtype (a
    /// differentiable cast of the same tensors, so gradients reach the variables).
    fn params(&self, clip: &crate::clip::ClipConfig) -> Result<AdapterParams> {
        let tensors: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(self.dtype)?)))
            .collect::<Result<_>>()?;
        AdapterParams::load(&self.adapter.config, clip, &mut NamedTensors::new(&tensors))
    }

    /// The current tensors as an adapter (f32, CPU).
    pub fn snapshot(&self) -> Result<Adapter> {
        let mut a = self.adapter.clone();
        a.tensors = self
            .vars
            .iter()
            .map(|(n, v)| {
                Ok((
                    n.clone(),
                    v.as_tensor()
                        .detach()
                        .to_dtype(DType::F32)?
                        .to_device(&Device::Cpu)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(a)
    }

    /// The loss of one batch of one class (differentiable in the variables).
    pub fn loss(
        &self,
        model: &ClipModel,
        vision: &crate::clip::VisionTransformer,
        inputs: &TextInputs,
        batch: &[Example],
    ) -> Result<Tensor> {
        let det = Detector::with_params(
            self.adapter.config.clone(),
            vision.clone(),
            model.text.clone(),
            self.params(&model.config)?,
            inputs.clone(),
        )?;
        let s = self.adapter.config.image_size;
        let b = batch.len();
        let px: Vec<f32> = batch
            .iter()
            .flat_map(|e| e.pixels.iter().copied())
            .collect();
        let px = Tensor::from_vec(px, (b, 3, s, s), &self.device)?.to_dtype(self.dtype)?;
        let gt: Vec<f32> = batch
            .iter()
            .flat_map(|e| e.mask.iter().map(|&m| m as u8 as f32))
            .collect();
        // The losses in f32 at least (f64 stays f64), as PyTorch's autocast computes them: in
        // f16 a dice sum over a 518x518 mask overflows (65504 at most), and bf16 keeps 8 bits.
        let wide = self.master;
        let gt = Tensor::from_vec(gt, (b, s, s), &self.device)?.to_dtype(wide)?;
        let labels: Vec<f32> = batch.iter().map(|e| e.label as u8 as f32).collect();
        let labels = Tensor::from_vec(labels, b, &self.device)?.to_dtype(wide)?;
        let fwd = det.forward(&px, true)?;
        let image_probs = fwd.image_probs.to_dtype(wide)?;
        let o = &self.options;
        let mut loss = match o.image_loss {
            ImageLoss::Focal => losses::focal(&image_probs, &labels)?,
            ImageLoss::CrossEntropy => losses::cross_entropy(&image_probs, &labels)?,
        };
        let inv = (1.0 - &gt)?;
        let groups = |x: &Tensor| -> Result<Tensor> {
            Ok(match o.dice {
                DiceGroups::Rows => x.reshape((b * s, s))?,
                DiceGroups::Images => x.reshape((b, s * s))?,
            })
        };
        for m in &fwd.layer_maps {
            let m = &m.to_dtype(wide)?;
            let abn = m.narrow(1, 1, 1)?.squeeze(1)?;
            let nor = m.narrow(1, 0, 1)?.squeeze(1)?;
            let pixel = ((losses::focal(m, &gt)? + losses::dice(&groups(&abn)?, &groups(&gt)?)?)?
                + losses::dice(&groups(&nor)?, &groups(&inv)?)?)?;
            loss = (loss + (pixel * o.pixel_weight)?)?;
        }
        Ok(loss)
    }

    /// One optimiser step on one batch; returns the loss.
    pub fn step(
        &mut self,
        model: &ClipModel,
        vision: &crate::clip::VisionTransformer,
        inputs: &TextInputs,
        batch: &[Example],
    ) -> Result<f64> {
        let loss = self.loss(model, vision, inputs, batch)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::training(format!(
                "the loss is {value} at step {}: lower `lr`",
                self.progress.steps + 1
            )));
        }
        let grads = loss.backward()?;
        self.check_gradients(&grads)?;
        self.opt.step(&self.vars, &grads)?;
        self.progress.steps += 1;
        Ok(value)
    }

    /// A step whose gradients are not all finite is refused before it reaches the variables
    /// (their NaN would be saved in every later checkpoint), naming the tensors and what to
    /// change.
    fn check_gradients(&self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let bad = non_finite_gradients(&self.vars, grads)?;
        if bad.is_empty() {
            return Ok(());
        }
        let fix = match self.dtype {
            DType::F16 => "f16 keeps 5 exponent bits: train with `dtype` bf16 or f32",
            _ => "lower `lr`",
        };
        Err(Error::training(format!(
            "the gradients of {} are not finite (NaN or infinity) at step {}; the step was not applied: {fix}",
            bad.join(", "),
            self.progress.steps + 1
        )))
    }

    /// Checkpoint bytes: the variables, the optimiser moments and the progress.
    pub fn checkpoint_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors = HashMap::new();
        for (n, v) in &self.vars {
            tensors.insert(format!("param.{n}"), v.as_tensor().detach());
            if let (Some(m), Some(s)) = (self.opt.m.get(n), self.opt.v.get(n)) {
                tensors.insert(format!("adam.m.{n}"), m.clone());
                tensors.insert(format!("adam.v.{n}"), s.clone());
            }
        }
        let meta = HashMap::from([
            ("zsad.config".to_string(), to_json(&self.adapter.config)),
            ("zsad.train_options".to_string(), to_json(&self.options)),
            ("zsad.progress".to_string(), to_json(&self.progress)),
            ("zsad.adam_step".to_string(), self.opt.step.to_string()),
        ]);
        crate::data::tensors::serialize(&tensors, meta)
    }

    /// Restores a checkpoint written by [`Self::checkpoint_bytes`] for the same configuration.
    pub fn restore(&mut self, path: &Path) -> Result<()> {
        let (tensors, meta) = crate::data::tensors::read(path)?;
        let bad = |m: String| Error::weights(path.display().to_string(), m);
        let cfg = crate::method::DetectorConfig::from_json(
            meta.get("zsad.config")
                .ok_or_else(|| bad("no zsad.config".into()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        if cfg != self.adapter.config {
            return Err(bad(
                "the checkpoint was made with a different configuration (preset, model or flags)"
                    .into(),
            ));
        }
        self.progress = serde_json::from_str(
            meta.get("zsad.progress")
                .ok_or_else(|| bad("no zsad.progress".into()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        self.opt.step = meta
            .get("zsad.adam_step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no zsad.adam_step".into()))?;
        for (n, v) in &self.vars {
            let get = |k: String| -> Result<Tensor> {
                Ok(tensors
                    .get(&k)
                    .ok_or_else(|| bad(format!("missing `{k}`")))?
                    .to_device(&self.device)?
                    .to_dtype(self.master)?)
            };
            v.set(&get(format!("param.{n}"))?)?;
            if self.opt.step > 0 {
                self.opt.m.insert(n.clone(), get(format!("adam.m.{n}"))?);
                self.opt.v.insert(n.clone(), get(format!("adam.v.{n}"))?);
            }
        }
        Ok(())
    }
}

/// The names of the variables whose gradient holds a NaN or an infinity.
fn non_finite_gradients<'a>(
    vars: &'a [(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Result<Vec<&'a str>> {
    let mut bad = Vec::new();
    for (n, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            // A sum, not a max: a maximum passes over NaN, a sum carries it.
            let total = g
                .to_dtype(DType::F64)?
                .abs()?
                .sum_all()?
                .to_scalar::<f64>()?;
            if !total.is_finite() {
                bad.push(n.as_str());
            }
        }
    }
    Ok(bad)
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialisable")
}

/// Batches of one epoch: samples grouped by class (a batch shares its class word), shuffled
/// within classes and in order of batches, deterministically from `seed` and the epoch.
pub fn epoch_batches(
    samples: &[Sample],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::keyed(seed, &format!("epoch {epoch}"));
    let mut by_class: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        by_class.entry(&s.class).or_default().push(i);
    }
    let shuffle = |v: &mut Vec<usize>, rng: &mut SplitMix64| {
        for i in (1..v.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    };
    let mut batches = Vec::new();
    for idx in by_class.values_mut() {
        shuffle(idx, &mut rng);
        batches.extend(idx.chunks(batch_size.max(1)).map(<[usize]>::to_vec));
    }
    let mut order: Vec<usize> = (0..batches.len()).collect();
    shuffle(&mut order, &mut rng);
    order.into_iter().map(|i| batches[i].clone()).collect()
}

/// The text inputs for a class: hand-made ensembles name the class (AdaCLIP uses the dataset
/// folder name); learned prompts keep their word.
pub fn text_inputs_for(
    adapter: &Adapter,
    class: &str,
    tok: &ClipTokenizer,
    fixed_word: bool,
) -> Result<TextInputs> {
    let mut cfg = adapter.config.clone();
    if !fixed_word && matches!(cfg.text, TextPrompts::Ensemble { .. }) {
        cfg.class_name = prompts::class_word(class);
    }
    TextInputs::build(&cfg, tok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn non_finite_gradients_are_named() {
        let dev = Device::Cpu;
        let vars: Vec<(String, Var)> = ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), Var::new(&[1f32, 2.0], &dev).unwrap()))
            .collect();
        let loss = vars
            .iter()
            .map(|(_, v)| v.as_tensor().sum_all().unwrap())
            .reduce(|x, y| (x + y).unwrap())
            .unwrap();
        let mut grads = loss.backward().unwrap();
        assert!(non_finite_gradients(&vars, &grads).unwrap().is_empty());
        grads.insert(
            vars[1].1.as_tensor(),
            Tensor::new(&[0f32, f32::NAN], &dev).unwrap(),
        );
        grads.insert(
            vars[2].1.as_tensor(),
            Tensor::new(&[f32::NEG_INFINITY, 0.0], &dev).unwrap(),
        );
        assert_eq!(non_finite_gradients(&vars, &grads).unwrap(), ["b", "c"]);
    }

    #[test]
    fn batches_cover_every_sample_once_and_keep_classes_apart() {
        let samples: Vec<Sample> = (0..23)
            .map(|i| Sample {
                image: format!("{i}.png").into(),
                mask: None,
                label: Some(false),
                class: ["a", "b", "c"][i % 3].into(),
                rel: PathBuf::new(),
            })
            .collect();
        let b = epoch_batches(&samples, 4, 1, 0);
        let mut all: Vec<usize> = b.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..23).collect::<Vec<_>>());
        for batch in &b {
            assert!(batch.len() <= 4);
            assert!(batch
                .iter()
                .all(|&i| samples[i].class == samples[batch[0]].class));
        }
        assert_eq!(b, epoch_batches(&samples, 4, 1, 0), "deterministic");
        assert_ne!(b, epoch_batches(&samples, 4, 1, 1), "reshuffled per epoch");
    }
}
