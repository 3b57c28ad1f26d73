//! Adam and AdamW exactly as `torch.optim` computes them (decoupled weight decay for AdamW),
//! with state that can be saved and restored for `--resume`.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled (AdamW) weight decay; 0 = Adam.
    pub weight_decay: f64,
}

/// The optimiser over named variables.
pub struct Adam {
    pub config: AdamConfig,
    pub step: u64,
    /// First and second moments per variable name.
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
}

impl Adam {
    pub fn new(config: AdamConfig) -> Self {
        Self {
            config,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    /// One update of every variable that received a gradient.
    pub fn step(&mut self, vars: &[(String, Var)], grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = match self.m.get(name) {
                Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                None => (g * (1.0 - c.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let mut p = var.as_tensor().detach();
            if c.weight_decay != 0.0 {
                p = (&p * (1.0 - c.lr * c.weight_decay))?;
            }
            // torch: denom = sqrt(v) / sqrt(bc2) + eps; p -= lr / bc1 * m / denom
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let update = ((&m / denom)? * (c.lr / bc1))?;
            var.set(&(p - update)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps of AdamW on f(x) = x²/2 (gradient x), against torch's formulas by hand.
    #[test]
    fn matches_torch_adamw() {
        let x = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamConfig {
            lr: 0.1,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = Adam::new(cfg);
        let vars = vec![("x".to_string(), x.clone())];
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            let loss = (x.as_tensor().sqr().unwrap() * 0.5)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&vars, &grads).unwrap();
            for i in 0..2 {
                let g = want[i];
                want[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.5 * m[i] + 0.5 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let bc1 = 1.0 - 0.5f64.powi(t);
                let bc2 = 1.0 - 0.999f64.powi(t);
                want[i] -= 0.1 / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - want[i]).abs() < 1e-5,
                "{got:?} vs {want:?}"
            );
        }
    }
}
