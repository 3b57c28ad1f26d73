//! The references' losses (AdaCLIP `loss.py`, AnomalyCLIP `loss.py`, identical code), written
//! with differentiable candle ops.

use candle_core::{Tensor, D};

use crate::Result;

/// Focal loss on probabilities (no nonlinearity inside), gamma 2, alpha all ones: the one-hot
/// target is clamped to `[1e-5, 1 − 1e-5]` (label smoothing), `pt = Σ_c onehot_c · p_c + 1e-5`,
/// loss `−(1 − pt)² · log pt`, averaged over every position.
///
/// # Shapes
/// `probs: [B, C, ...]`, `target: [B, ...]` with class indices as floats (0/1 for masks).
pub fn focal(probs: &Tensor, target: &Tensor) -> Result<Tensor> {
    let c = probs.dim(1)?;
    let smooth = 1e-5;
    let mut pt: Option<Tensor> = None;
    for k in 0..c {
        // one-hot of class k, clamped as the reference's label smoothing does
        let onehot = target.eq(k as f64)?.to_dtype(probs.dtype())?;
        let onehot = onehot.clamp(smooth, 1.0 - smooth)?;
        let term = (onehot * probs.narrow(1, k, 1)?.squeeze(1)?)?;
        pt = Some(match pt {
            Some(p) => (p + term)?,
            None => term,
        });
    }
    let pt = (pt.expect("at least one class") + smooth)?;
    let one_minus = (1.0 - &pt)?;
    let loss = (one_minus.sqr()? * pt.log()?)?.neg()?;
    Ok(loss.mean_all()?)
}

/// Dice loss `1 − mean_n (2 Σ x y + 1) / (Σ x + Σ y + 1)` over the rows `n` of `x`, `y`
/// flattened to `[N, -1]`. AdaCLIP calls it with `N` = the rows of one 518x518 mask (batch 1,
/// `squeeze()`), AnomalyCLIP with `N` = the batch.
pub fn dice(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    let x = x.reshape((n, ()))?;
    let y = y.reshape((n, ()))?.to_dtype(x.dtype())?;
    let inter = (&x * &y)?.sum(D::Minus1)?;
    let num = ((inter * 2.0)? + 1.0)?;
    let den = ((x.sum(D::Minus1)? + y.sum(D::Minus1)?)? + 1.0)?;
    Ok((1.0 - (num / den)?.mean_all()?)?)
}

/// `−log p[label]`, averaged: cross-entropy on probabilities (AnomalyCLIP's CE on logits/0.07 is
/// this after its softmax). `probs: [B, 2]`, `labels: [B]` as 0/1 floats.
pub fn cross_entropy(probs: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let p1 = probs.narrow(1, 1, 1)?.squeeze(1)?;
    let p0 = probs.narrow(1, 0, 1)?.squeeze(1)?;
    let l = labels.to_dtype(probs.dtype())?;
    let picked = ((&l * &p1)? + ((1.0 - &l)? * &p0)?)?;
    // Clamp away from 0 so that a confident mistake gives a large, finite loss.
    Ok(picked.clamp(1e-12, 1.0)?.log()?.neg()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn scalar(t: Tensor) -> f64 {
        t.to_scalar::<f32>().unwrap() as f64
    }

    #[test]
    fn focal_by_hand() {
        // One sample, 2 classes, 2 positions: p = [[0.9, 0.2], [0.1, 0.8]] (class-major),
        // targets [0, 1]: pt = 0.9(1-1e-5) + 0.1e-5 + 1e-5 at position 0, and likewise 0.8 ...
        let probs = t(&[0.9, 0.2, 0.1, 0.8], &[1, 2, 2]);
        let target = t(&[0.0, 1.0], &[1, 2]);
        let s = 1e-5f64;
        let pt0 = 0.9 * (1.0 - s) + 0.1 * s + s;
        let pt1 = 0.2 * s + 0.8 * (1.0 - s) + s;
        let want = (-(1.0 - pt0).powi(2) * pt0.ln() - (1.0 - pt1).powi(2) * pt1.ln()) / 2.0;
        assert!((scalar(focal(&probs, &target).unwrap()) - want).abs() < 1e-7);
    }

    #[test]
    fn dice_per_row_by_hand() {
        // AdaCLIP's quirk: rows of one mask are the "samples".
        let x = t(&[1.0, 0.0, 0.5, 0.5], &[2, 2]);
        let y = t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]);
        // row 0: (2*1 + 1)/(1 + 1 + 1) = 1; row 1: (2*0.5 + 1)/(1 + 1 + 1) = 2/3
        let want = 1.0 - (1.0 + 2.0 / 3.0) / 2.0;
        assert!((scalar(dice(&x, &y).unwrap()) - want).abs() < 1e-7);
    }

    #[test]
    fn cross_entropy_by_hand() {
        let probs = t(&[0.25, 0.75, 0.6, 0.4], &[2, 2]);
        let labels = t(&[1.0, 0.0], &[2]);
        let want = -(0.75f64.ln() + 0.6f64.ln()) / 2.0;
        assert!((scalar(cross_entropy(&probs, &labels).unwrap()) - want).abs() < 1e-7);
    }
}
