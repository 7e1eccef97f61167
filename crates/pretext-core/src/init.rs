//! Seeded parameter initialisation and the named parameter stores of a model.
//!
//! candle's CPU device cannot be seeded, so [`SeededVarMap`] draws initial
//! values from the run's [`INIT`](crate::seed::INIT) stream instead, in the
//! order the model asks for them. Building the same model with the same seed
//! gives bit-identical weights.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::Rng;
pub use rand_distr_shim::standard_normal;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Box–Muller on `StdRng`, so we need no extra dependency for normals.
mod rand_distr_shim {
    use rand::rngs::StdRng;
    use rand::Rng;

    /// One standard normal draw.
    pub fn standard_normal(rng: &mut StdRng) -> f64 {
        loop {
            let u1: f64 = rng.random();
            if u1 > f64::MIN_POSITIVE {
                let u2: f64 = rng.random();
                return (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            }
        }
    }
}

/// A [`VarMap`] whose missing variables are created from a seeded generator.
///
/// Cloning shares the same variables and generator.
#[derive(Clone)]
pub struct SeededVarMap {
    map: VarMap,
    rng: Arc<Mutex<StdRng>>,
}

impl SeededVarMap {
    /// A new, empty store drawing from `rng`.
    pub fn new(rng: StdRng) -> Self {
        Self {
            map: VarMap::new(),
            rng: Arc::new(Mutex::new(rng)),
        }
    }

    /// A new, empty store drawing from the `init` stream of `seed`.
    pub fn from_seed(seed: u64, stream: &str) -> Self {
        Self::new(crate::seed::stream_rng(seed, stream, &[]))
    }

    /// The underlying candle [`VarMap`] (shared, not copied).
    pub fn var_map(&self) -> &VarMap {
        &self.map
    }

    /// A [`VarBuilder`] that creates variables in this store.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// All variables, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        named_vars(&self.map)
    }
}

/// The variables of `map`, sorted by name (a stable order for optimizers and files).
pub fn named_vars(map: &VarMap) -> Vec<(String, Var)> {
    let data = match map.data().lock() {
        Ok(d) => d,
        Err(poisoned) => poisoned.into_inner(),
    };
    let sorted: BTreeMap<&String, &Var> = data.iter().collect();
    sorted.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The tensors of `map` by name, sorted: what goes into `model.safetensors`.
pub fn named_tensors(map: &VarMap) -> Vec<(String, Tensor)> {
    named_vars(map)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect()
}

fn sample(init: Init, shape: &Shape, rng: &mut StdRng) -> Vec<f64> {
    let n = shape.elem_count();
    let uniform = |lo: f64, up: f64, rng: &mut StdRng| -> Vec<f64> {
        (0..n).map(|_| lo + (up - lo) * rng.random::<f64>()).collect()
    };
    let normal = |mean: f64, std: f64, rng: &mut StdRng| -> Vec<f64> {
        (0..n).map(|_| mean + std * standard_normal(rng)).collect()
    };
    match init {
        Init::Const(c) => vec![c; n],
        Init::Uniform { lo, up } => uniform(lo, up, rng),
        Init::Randn { mean, stdev } => normal(mean, stdev, rng),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound, rng)
                }
                NormalOrUniform::Normal => normal(0.0, std, rng),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut data = match self.map.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        if let Some(var) = data.get(name) {
            let t = var.as_tensor();
            if t.shape() != &s {
                candle_core::bail!("shape mismatch for {name}: existing {:?}, requested {s:?}", t.shape());
            }
            return t.to_dtype(dtype);
        }
        let values = {
            let mut rng = match self.rng.lock() {
                Ok(r) => r,
                Err(p) => p.into_inner(),
            };
            sample(h, &s, &mut rng)
        };
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let data = match self.map.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self.map.data().lock() {
            Ok(d) => d.contains_key(name),
            Err(p) => p.into_inner().contains_key(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Module;

    fn build(seed: u64) -> candle_core::Result<(SeededVarMap, Tensor)> {
        let store = SeededVarMap::from_seed(seed, crate::seed::INIT);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let lin = candle_nn::linear(4, 3, vb.pp("fc"))?;
        let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu)?;
        Ok((store.clone(), lin.forward(&x)?))
    }

    #[test]
    fn same_seed_same_weights() -> candle_core::Result<()> {
        let (a, ya) = build(3)?;
        let (b, yb) = build(3)?;
        let (_, yc) = build(4)?;
        assert_eq!(ya.to_vec2::<f32>()?, yb.to_vec2::<f32>()?);
        assert_ne!(ya.to_vec2::<f32>()?, yc.to_vec2::<f32>()?);
        let names: Vec<String> = a.named_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["fc.bias".to_string(), "fc.weight".to_string()]);
        assert_eq!(b.named_vars().len(), 2);
        Ok(())
    }

    #[test]
    fn kaiming_bounds_follow_fan_in() -> candle_core::Result<()> {
        // candle's linear uses kaiming-uniform with ReLU gain... but bounded by 1/sqrt(fan_in)
        // for the weight: check every value lies within the advertised bound.
        let shape = Shape::from((64, 100));
        let mut rng = crate::seed::stream_rng(0, "t", &[]);
        let v = sample(candle_nn::init::DEFAULT_KAIMING_UNIFORM, &shape, &mut rng);
        let bound = 3f64.sqrt() * 2f64.sqrt() / 10.0;
        assert!(v.iter().all(|x| x.abs() <= bound));
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02, "{mean}");
        let var = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
        // variance of U(-b, b) is b^2/3 = gain^2/fan_in = 0.02
        assert!((var - 0.02).abs() < 0.002, "{var}");
        Ok(())
    }

    #[test]
    fn normal_draws_have_unit_variance() {
        let mut rng = crate::seed::stream_rng(1, "t", &[]);
        let v = sample(Init::Randn { mean: 1.0, stdev: 2.0 }, &Shape::from(20000), &mut rng);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        assert!((var - 4.0).abs() < 0.15, "{var}");
    }
}
