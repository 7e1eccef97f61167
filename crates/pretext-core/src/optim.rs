//! Optimizers whose state is kept by parameter name: AdamW, SGD (momentum,
//! Nesterov) and LARS.
//!
//! Every optimizer follows the update rule of its PyTorch namesake
//! (`torch.optim.AdamW`, `torch.optim.SGD`) or, for LARS, of the SimCLR
//! reference implementation, so the same hyper-parameters mean the same thing.
//! Moments are saved as `<param>.exp_avg`, `<param>.exp_avg_sq` and
//! `<param>.momentum_buffer`, plus the scalar `step`.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// An optimizer over a fixed set of named parameters.
pub trait Optim: Send {
    /// Applies one update with learning rate `lr`. Parameters without a
    /// gradient are left unchanged (as in PyTorch).
    ///
    /// # Errors
    /// A tensor operation failed.
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()>;

    /// The optimizer state, by name (moments keyed by parameter name, and `step`).
    fn state(&self) -> Vec<(String, Tensor)>;

    /// Restores a state produced by [`Optim::state`].
    ///
    /// # Errors
    /// [`Error::Config`] naming the key when a moment is missing, unexpected or of the wrong shape.
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;

    /// Number of updates applied so far.
    fn steps_taken(&self) -> u64;
}

/// Which optimizer to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    /// Adam with decoupled weight decay.
    AdamW,
    /// Stochastic gradient descent, optionally with (Nesterov) momentum.
    Sgd,
    /// Layer-wise adaptive rate scaling on top of SGD with momentum.
    Lars,
}

/// Optimizer settings (the `optim` section of a config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// `adamw`, `sgd` or `lars`.
    pub name: OptimKind,
    /// Base learning rate (the schedule scales it).
    pub lr: f64,
    /// Weight decay (decoupled for AdamW, L2 for SGD and LARS).
    pub weight_decay: f64,
    /// Adam's `beta1`.
    pub beta1: f64,
    /// Adam's `beta2`.
    pub beta2: f64,
    /// Adam's `eps`.
    pub eps: f64,
    /// Momentum of SGD and LARS.
    pub momentum: f64,
    /// Nesterov momentum (SGD and LARS).
    pub nesterov: bool,
    /// LARS trust coefficient `eta`.
    pub trust_coefficient: f64,
    /// Exclude every one-dimensional parameter (biases, norm scales and shifts)
    /// from weight decay and from LARS adaptation.
    pub exclude_1d: bool,
    /// More parameters to exclude, as name patterns where `*` matches any run
    /// of characters, e.g. `"*.bias"`, `"embeddings.*"`.
    pub exclude: Vec<String>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            name: OptimKind::AdamW,
            lr: 1e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            momentum: 0.9,
            nesterov: false,
            trust_coefficient: 0.001,
            exclude_1d: true,
            exclude: Vec::new(),
        }
    }
}

impl OptimConfig {
    /// Checks the ranges of every field.
    ///
    /// # Errors
    /// The bad key and why.
    pub fn validate(&self) -> crate::SettingResult {
        let bad = |f: &str, v: f64, why: &str| Err(crate::InvalidSetting::value(format!("optim.{f}"), v, why));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr, "must be finite and >= 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "must be finite and >= 0");
        }
        for (f, v) in [
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("momentum", self.momentum),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(f, v, "must lie in [0, 1)");
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad("eps", self.eps, "must be > 0");
        }
        if self.trust_coefficient.is_nan() || self.trust_coefficient <= 0.0 {
            return bad("trust_coefficient", self.trust_coefficient, "must be > 0");
        }
        Ok(())
    }

    /// Whether parameter `name` of shape `dims` is excluded from weight decay
    /// (and from LARS adaptation).
    pub fn is_excluded(&self, name: &str, dims: &[usize]) -> bool {
        (self.exclude_1d && dims.len() <= 1) || self.exclude.iter().any(|p| glob_match(p, name))
    }

    /// Builds the optimizer over `params` (name, variable).
    ///
    /// # Errors
    /// [`Error::Config`] when the config is invalid.
    pub fn build(&self, params: Vec<(String, Var)>) -> Result<Box<dyn Optim>> {
        self.validate()?;
        let params: Vec<Param> = params
            .into_iter()
            .map(|(name, var)| {
                let excluded = self.is_excluded(&name, var.dims());
                Param { name, var, excluded }
            })
            .collect();
        Ok(match self.name {
            OptimKind::AdamW => Box::new(AdamW::new(params, self.clone())),
            OptimKind::Sgd => Box::new(Sgd::new(params, self.clone(), false)),
            OptimKind::Lars => Box::new(Sgd::new(params, self.clone(), true)),
        })
    }
}

/// `*`-wildcard match of `name` against `pattern` (`*` matches any run, also empty).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p = pattern.as_bytes();
    let s = name.as_bytes();
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// One optimised parameter.
struct Param {
    name: String,
    var: Var,
    /// No weight decay, no LARS adaptation.
    excluded: bool,
}

fn state_to_vec(step: u64, moments: &BTreeMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = moments.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let step_t = Tensor::new(&[step as i64], &candle_core::Device::Cpu).and_then(|t| t.reshape(()));
    if let Ok(t) = step_t {
        out.push(("step".to_string(), t));
    }
    out
}

/// Validates and loads moments for `params` with the given suffixes.
/// `required`: whether every suffix must be present for every parameter once `step > 0`.
fn load_moments(
    params: &[Param],
    suffixes: &[&str],
    state: &HashMap<String, Tensor>,
    required: bool,
) -> Result<(u64, BTreeMap<String, Tensor>)> {
    let step = match state.get("step") {
        Some(t) => {
            let v = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
            match v.as_slice() {
                [s] if *s >= 0 => *s as u64,
                _ => {
                    return Err(Error::Config(
                        "optimizer state: `step` must be one non-negative integer".into(),
                    ))
                }
            }
        }
        None => return Err(Error::Config("optimizer state: missing `step`".into())),
    };
    let mut expected: HashMap<String, &Param> = HashMap::new();
    for p in params {
        for s in suffixes {
            expected.insert(format!("{}.{s}", p.name), p);
        }
    }
    let unexpected: Vec<&String> = state
        .keys()
        .filter(|k| k.as_str() != "step" && !expected.contains_key(*k))
        .collect();
    if !unexpected.is_empty() {
        return Err(Error::Config(format!(
            "optimizer state has entries for unknown parameters: {unexpected:?}"
        )));
    }
    let mut moments = BTreeMap::new();
    for (key, p) in expected {
        match state.get(&key) {
            Some(t) => {
                if t.dims() != p.var.dims() {
                    return Err(Error::Config(format!(
                        "optimizer state {key:?} has shape {:?}, parameter has {:?}",
                        t.dims(),
                        p.var.dims()
                    )));
                }
                let t = t.to_device(p.var.device())?.to_dtype(p.var.dtype())?;
                moments.insert(key, t);
            }
            None if required && step > 0 => {
                return Err(Error::Config(format!("optimizer state: missing {key:?}")));
            }
            None => {}
        }
    }
    Ok((step, moments))
}

/// One AdamW update's constants.
struct AdamHyper {
    lr: f64,
    wd: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    bc1: f64,
    bc2: f64,
}

/// Borrows the f32 values of a contiguous CPU tensor and runs `f` on them;
/// `None` when the tensor is elsewhere or of another type.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    crate::ops::fused::borrowed(t).map(|v| f(&v))
}

/// The AdamW update in one pass over the parameter, its gradient and both
/// moments (CPU, f32): the same arithmetic as the tensor path, without its
/// dozen intermediate tensors. The parameter is updated in place (candle's
/// in-place op on the variable's storage) and the new moments are written
/// straight from the old ones, so nothing is copied. Returns the new moments;
/// `None` when a tensor is not a contiguous f32 CPU tensor, or when only one
/// of the two moments exists (a partial state; the kernel takes both or
/// neither): the caller then takes the tensor path, which treats each
/// moment on its own, and nothing has changed.
fn adamw_fused_cpu(
    theta: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    h: &AdamHyper,
) -> Result<Option<(Tensor, Tensor)>> {
    use crate::ops::fused::borrowed;
    let n = theta.elem_count();
    if m.is_some() != v.is_some()
        || g.elem_count() != n
        || m.is_some_and(|m| m.elem_count() != n)
        || v.is_some_and(|v| v.elem_count() != n)
    {
        return Ok(None);
    }
    let Some(gs) = borrowed(g) else {
        return Ok(None);
    };
    let (mo, vo) = (m.map(borrowed), v.map(borrowed));
    if matches!(mo, Some(None)) || matches!(vo, Some(None)) || borrowed(theta).is_none() {
        return Ok(None);
    }
    let op = AdamInPlace {
        g: &gs,
        m: mo.as_ref().and_then(|x| x.as_deref()),
        v: vo.as_ref().and_then(|x| x.as_deref()),
        h,
        moments: std::sync::Mutex::new(None),
    };
    theta.inplace_op1(&op)?;
    let moments = op
        .moments
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some((mm, vv)) = moments else {
        return Err(candle_core::Error::Msg("AdamW: the in-place update did not run".into()).into());
    };
    let (shape, dev) = (theta.shape().clone(), theta.device());
    Ok(Some((
        Tensor::from_vec(mm, shape.clone(), dev)?,
        Tensor::from_vec(vv, shape, dev)?,
    )))
}

/// [`adamw_fused_cpu`]'s in-place op on the parameter.
struct AdamInPlace<'a> {
    g: &'a [f32],
    /// The moments so far (`None`: zeros, the first step).
    m: Option<&'a [f32]>,
    v: Option<&'a [f32]>,
    h: &'a AdamHyper,
    /// The new moments, once the op has run.
    moments: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl candle_core::InplaceOp1 for AdamInPlace<'_> {
    fn name(&self) -> &'static str {
        "pretext-adamw"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let th = crate::ops::fused::in_place_values(storage, layout, "AdamW: the parameter")?;
        let n = th.len();
        let k = AdamConstants::of(self.h);
        let (mut mm, mut vv) = (Vec::<f32>::with_capacity(n), Vec::<f32>::with_capacity(n));
        const CHUNK: usize = 1 << 14;
        th.par_chunks_mut(CHUNK)
            .zip(mm.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
            .zip(vv.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(ci, ((t, m), v))| {
                let at = ci * CHUNK..ci * CHUNK + t.len();
                let old = self.m.zip(self.v).map(|(m0, v0)| (&m0[at.clone()], &v0[at.clone()]));
                adamw_chunk(t, &self.g[at], old, m, v, &k);
            });
        // SAFETY: the loop above wrote all `n` values of both.
        unsafe {
            mm.set_len(n);
            vv.set_len(n);
        }
        *self.moments.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((mm, vv));
        Ok(())
    }
}

/// The step's scalars of [`AdamInPlace`], in f32.
struct AdamConstants {
    /// `1 − lr·wd`: the decoupled weight decay's factor.
    decay: f32,
    b1: f32,
    b2: f32,
    /// `1 − β₁`, `1 − β₂`.
    c1: f32,
    c2: f32,
    /// `√(1 − β₂ᵗ)`.
    sbc2: f32,
    eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    step: f32,
}

impl AdamConstants {
    fn of(h: &AdamHyper) -> Self {
        Self {
            decay: (1.0 - h.lr * h.wd) as f32,
            b1: h.b1 as f32,
            b2: h.b2 as f32,
            c1: (1.0 - h.b1) as f32,
            c2: (1.0 - h.b2) as f32,
            sbc2: h.bc2.sqrt() as f32,
            eps: h.eps as f32,
            step: (h.lr / h.bc1) as f32,
        }
    }
}

crate::ops::vector::multiversion! {
    /// One chunk of the AdamW update: the new moments into `m` and `v`
    /// from `old` (`None`: zeros, the first step) and the gradient `g`, and
    /// the parameter `t` updated in place. Element by element, with no
    /// reordering and no contracted multiply-add, so every instruction set
    /// gives the same bits (`sqrt` and `/` are correctly rounded).
    fn adamw_chunk(
        t: &mut [f32],
        g: &[f32],
        old: Option<(&[f32], &[f32])>,
        m: &mut [std::mem::MaybeUninit<f32>],
        v: &mut [std::mem::MaybeUninit<f32>],
        k: &AdamConstants,
    ) {
        #[inline(always)]
        fn one(t: &mut f32, g: f32, (m0, v0): (f32, f32), m: &mut std::mem::MaybeUninit<f32>, v: &mut std::mem::MaybeUninit<f32>, k: &AdamConstants) {
            let mi = m0 * k.b1 + g * k.c1;
            let vi = v0 * k.b2 + g * g * k.c2;
            *m = std::mem::MaybeUninit::new(mi);
            *v = std::mem::MaybeUninit::new(vi);
            let denom = vi.sqrt() / k.sbc2 + k.eps;
            *t = *t * k.decay - mi / denom * k.step;
        }
        let n = t.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        match old {
            Some((m0, v0)) => {
                let (m0, v0) = (&m0[..n], &v0[..n]);
                for i in 0..n {
                    one(&mut t[i], g[i], (m0[i], v0[i]), &mut m[i], &mut v[i], k);
                }
            }
            // the first step's moments are zeros: 0·β + x is x, bit for bit
            None => {
                for i in 0..n {
                    one(&mut t[i], g[i], (0.0, 0.0), &mut m[i], &mut v[i], k);
                }
            }
        }
    }
}

/// AdamW as in `torch.optim.AdamW` (decoupled weight decay, bias correction).
pub struct AdamW {
    params: Vec<Param>,
    cfg: OptimConfig,
    step: u64,
    /// `<name>.exp_avg` and `<name>.exp_avg_sq`.
    moments: BTreeMap<String, Tensor>,
}

impl AdamW {
    fn new(params: Vec<Param>, cfg: OptimConfig) -> Self {
        Self {
            params,
            cfg,
            step: 0,
            moments: BTreeMap::new(),
        }
    }
}

impl Optim for AdamW {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for p in &self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let wd = if p.excluded { 0.0 } else { self.cfg.weight_decay };
            let (km, kv) = (format!("{}.exp_avg", p.name), format!("{}.exp_avg_sq", p.name));
            let h = AdamHyper {
                lr,
                wd,
                b1,
                b2,
                eps: self.cfg.eps,
                bc1,
                bc2,
            };
            if let Some((m, v)) =
                adamw_fused_cpu(p.var.as_tensor(), g, self.moments.get(&km), self.moments.get(&kv), &h)?
            {
                self.moments.insert(km, m);
                self.moments.insert(kv, v);
                continue;
            }
            let theta = p.var.as_tensor().detach();
            let theta = if wd != 0.0 {
                theta.affine(1.0 - lr * wd, 0.0)?
            } else {
                theta
            };
            let m = match self.moments.get(&km) {
                Some(m) => ((m * b1)? + (g * (1.0 - b1))?)?,
                None => (g * (1.0 - b1))?,
            };
            let g2 = g.sqr()?;
            let v = match self.moments.get(&kv) {
                Some(v) => ((v * b2)? + (g2 * (1.0 - b2))?)?,
                None => (g2 * (1.0 - b2))?,
            };
            // denom = sqrt(v) / sqrt(bc2) + eps ; p -= lr / bc1 * m / denom
            let denom = (v.sqrt()? / bc2.sqrt())?.affine(1.0, self.cfg.eps)?;
            let update = (m.div(&denom)? * (lr / bc1))?;
            p.var.set(&(theta - update)?)?;
            self.moments.insert(km, m);
            self.moments.insert(kv, v);
        }
        Ok(())
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        state_to_vec(self.step, &self.moments)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let (step, moments) = load_moments(&self.params, &["exp_avg", "exp_avg_sq"], state, false)?;
        self.step = step;
        self.moments = moments;
        Ok(())
    }

    fn steps_taken(&self) -> u64 {
        self.step
    }
}

/// SGD as in `torch.optim.SGD` (L2 weight decay, momentum with the first
/// buffer equal to the gradient, optional Nesterov) and, with `lars`, LARS as
/// in SimCLR: for parameters not excluded, the gradient (with weight decay) is
/// scaled by the trust ratio `eta * ||w|| / ||g||` before entering the momentum
/// buffer `v = momentum * v + lr * trust * g`, and `w -= v`.
pub struct Sgd {
    params: Vec<Param>,
    cfg: OptimConfig,
    lars: bool,
    step: u64,
    /// `<name>.momentum_buffer`.
    moments: BTreeMap<String, Tensor>,
}

impl Sgd {
    fn new(params: Vec<Param>, cfg: OptimConfig, lars: bool) -> Self {
        Self {
            params,
            cfg,
            lars,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    fn sgd_update(&self, p: &Param, g: &Tensor, lr: f64) -> Result<(Tensor, Option<Tensor>)> {
        let theta = p.var.as_tensor().detach();
        let wd = if p.excluded { 0.0 } else { self.cfg.weight_decay };
        let d = if wd != 0.0 { (g + (&theta * wd)?)? } else { g.clone() };
        let mu = self.cfg.momentum;
        let key = format!("{}.momentum_buffer", p.name);
        let (d, buf) = if mu != 0.0 {
            let buf = match self.moments.get(&key) {
                Some(b) => ((b * mu)? + &d)?,
                None => d.clone(),
            };
            let d = if self.cfg.nesterov {
                (d + (&buf * mu)?)?
            } else {
                buf.clone()
            };
            (d, Some(buf))
        } else {
            (d, None)
        };
        Ok(((theta - (d * lr)?)?, buf))
    }

    fn lars_update(&self, p: &Param, g: &Tensor, lr: f64) -> Result<(Tensor, Option<Tensor>)> {
        let theta = p.var.as_tensor().detach();
        let (d, trust) = if p.excluded {
            (g.clone(), 1.0)
        } else {
            let wd = self.cfg.weight_decay;
            let d = if wd != 0.0 { (g + (&theta * wd)?)? } else { g.clone() };
            let wn = l2_norm(&theta)?;
            let gn = l2_norm(&d)?;
            let trust = if wn > 0.0 && gn > 0.0 {
                self.cfg.trust_coefficient * wn / gn
            } else {
                1.0
            };
            (d, trust)
        };
        let scaled = (d * (lr * trust))?;
        let mu = self.cfg.momentum;
        let key = format!("{}.momentum_buffer", p.name);
        let buf = match self.moments.get(&key) {
            Some(b) => ((b * mu)? + &scaled)?,
            None => scaled.clone(),
        };
        let delta = if self.cfg.nesterov {
            ((&buf * mu)? + scaled)?
        } else {
            buf.clone()
        };
        Ok(((theta - delta)?, Some(buf)))
    }
}

/// Euclidean norm of a tensor, as f64.
///
/// # Errors
/// A tensor operation failed.
pub fn l2_norm(t: &Tensor) -> Result<f64> {
    Ok(sum_of_squares(t)?.sqrt())
}

/// Partial sums of [`squares_in_lanes`]: eight 512-bit registers of f64.
const SQUARE_LANES: usize = 32;

crate::ops::vector::multiversion! {
    /// `Σ x²` of a block in f64, in [`SQUARE_LANES`] partial sums (value `i`
    /// into lane `i mod 32`) added in lane order, then the tail: an order
    /// fixed by the lanes, not by the instruction set, so the vector and
    /// the portable compilations give the same bits. A single running sum
    /// was one add's latency per value.
    fn squares_in_lanes(x: &[f32]) -> f64 {
        let mut acc = [0f64; SQUARE_LANES];
        let mut chunks = x.chunks_exact(SQUARE_LANES);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f64::from(v) * f64::from(v);
            }
        }
        let mut s = 0f64;
        for a in acc {
            s += a;
        }
        for &v in chunks.remainder() {
            s += f64::from(v) * f64::from(v);
        }
        s
    }
}

/// `Σ t²` accumulated in f64. On a contiguous f32 CPU tensor this is one
/// parallel pass (fixed blocks added in order, so the result does not depend
/// on scheduling); elsewhere candle's ops.
///
/// # Errors
/// A tensor operation failed.
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    use rayon::prelude::*;
    let fast = with_cpu_f32(t, |v| {
        let parts: Vec<f64> = v.par_chunks(1 << 15).map(squares_in_lanes).collect();
        parts.iter().sum::<f64>()
    });
    match fast {
        Some(s) => Ok(s),
        None => Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?),
    }
}

impl Optim for Sgd {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let mut new_moments = Vec::new();
        for p in &self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let (theta, buf) = if self.lars {
                self.lars_update(p, g, lr)?
            } else {
                self.sgd_update(p, g, lr)?
            };
            p.var.set(&theta)?;
            if let Some(b) = buf {
                new_moments.push((format!("{}.momentum_buffer", p.name), b));
            }
        }
        self.moments.extend(new_moments);
        Ok(())
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        state_to_vec(self.step, &self.moments)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let (step, moments) = load_moments(&self.params, &["momentum_buffer"], state, false)?;
        self.step = step;
        self.moments = moments;
        Ok(())
    }

    fn steps_taken(&self) -> u64 {
        self.step
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const W0: [f32; 3] = [1.0, -2.0, 0.5];
    const G: [f32; 3] = [0.1, -0.2, 0.3];

    #[test]
    fn sum_of_squares_in_f64_on_both_paths() -> Result<()> {
        // several parallel blocks; integer values make the sum exact
        let n = 7 * 15_001;
        let v: Vec<f32> = (0..n).map(|i| ((i % 13) as f32) - 6.0).collect();
        let want: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let t = Tensor::from_vec(v, (n / 7, 7), &Device::Cpu)?;
        assert_eq!(sum_of_squares(&t)?, want);
        // a transposed view takes candle's path and agrees
        assert_eq!(sum_of_squares(&t.t()?)?, want);
        assert_eq!(sum_of_squares(&t.to_dtype(DType::F64)?)?, want);
        assert!((l2_norm(&Tensor::new(&[3f32, 4.0], &Device::Cpu)?)? - 5.0).abs() < 1e-12);
        // a block's lanes: the same bits on every kernel family, within f64
        // rounding of the single running sum (a ragged tail of 7 values)
        let v = crate::ops::testing::hashed_values(32 * 40 + 7, 9);
        let serial: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        crate::ops::testing::same_on_every_family(|| squares_in_lanes(&v).to_bits());
        assert!((squares_in_lanes(&v) - serial).abs() <= serial * 1e-14);
        Ok(())
    }

    fn setup(cfg: &OptimConfig) -> Result<(Var, Box<dyn Optim>)> {
        let var = Var::new(&W0, &Device::Cpu)?;
        // a 3-element weight: switch off the 1-d exclusion so decay and adaptation apply
        let cfg = OptimConfig {
            exclude_1d: false,
            ..cfg.clone()
        };
        let opt = cfg.build(vec![("layer.weight".into(), var.clone())])?;
        Ok((var, opt))
    }

    /// grads such that d(loss)/dw = G: loss = sum(w * G)
    fn grads_for(var: &Var) -> Result<GradStore> {
        let g = Tensor::new(&G, &Device::Cpu)?;
        Ok((var.as_tensor() * g)?.sum_all()?.backward()?)
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1::<f32>().unwrap_or_default()
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn adamw_two_steps_match_hand_computation() -> Result<()> {
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let (var, mut opt) = setup(&cfg)?;
        // Hand computation of torch.optim.AdamW (b1=.9, b2=.999, eps=1e-8).
        let mut w: Vec<f64> = W0.iter().map(|&x| x as f64).collect();
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        for t in 1..=2 {
            let grads = grads_for(&var)?;
            opt.step(&grads, 0.1)?;
            for i in 0..3 {
                let g = G[i] as f64;
                w[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                w[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
            close(&values(&var), &w);
        }
        // first step of Adam moves each weight by ~lr against the gradient sign
        // (plus the decay): w1 = w0 * (1 - 1e-3) - 0.1 * sign(g)
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        assert!(state.contains_key("layer.weight.exp_avg"));
        assert!(state.contains_key("layer.weight.exp_avg_sq"));
        close(&state["layer.weight.exp_avg"].to_vec1::<f32>()?, &m);
        assert_eq!(opt.steps_taken(), 2);
        Ok(())
    }

    /// The in-place CPU update runs in blocks of 16,384 values on rayon: a
    /// parameter of several blocks (and a ragged last one) must follow
    /// torch's formula at every position, its moments included.
    #[test]
    fn adamw_in_place_update_covers_every_block() -> Result<()> {
        let n = 3 * 16_384 + 77;
        let w0: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.02).collect();
        let gv: Vec<f32> = (0..n).map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.01).collect();
        let var = Var::from_tensor(&Tensor::from_vec(w0.clone(), n, &Device::Cpu)?)?;
        let cfg = OptimConfig {
            lr: 0.01,
            weight_decay: 0.1,
            exclude_1d: false,
            ..Default::default()
        };
        let mut opt = cfg.build(vec![("big.weight".into(), var.clone())])?;
        let g = Tensor::from_vec(gv.clone(), n, &Device::Cpu)?;
        let mut w: Vec<f64> = w0.iter().map(|&x| f64::from(x)).collect();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        for t in 1..=3 {
            let grads = (var.as_tensor() * &g)?.sum_all()?.backward()?;
            opt.step(&grads, 0.01)?;
            for i in 0..n {
                let gi = f64::from(gv[i]);
                w[i] *= 1.0 - 0.01 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                let (mh, vh) = (m[i] / (1.0 - 0.9f64.powi(t)), v[i] / (1.0 - 0.999f64.powi(t)));
                w[i] -= 0.01 * mh / (vh.sqrt() + 1e-8);
            }
        }
        close(&values(&var), &w);
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        close(&state["big.weight.exp_avg"].to_vec1::<f32>()?, &m);
        close(&state["big.weight.exp_avg_sq"].to_vec1::<f32>()?, &v);
        Ok(())
    }

    /// The vector-compiled update chunk gives the portable chunk's bits on
    /// every kernel family, with and without old moments, and those bits
    /// are the scalar formula's.
    #[test]
    fn adamw_chunk_is_the_same_on_every_family() {
        use crate::ops::testing::{bits, hashed_values, out_buffer, out_values, same_on_every_family};
        let n = 1000 + 13; // a ragged vector tail
        let g: Vec<f32> = hashed_values(n, 1).iter().map(|x| x * 0.01).collect();
        let (m0, v0) = (
            hashed_values(n, 2),
            hashed_values(n, 3).iter().map(|x| x.abs()).collect::<Vec<_>>(),
        );
        let k = AdamConstants::of(&AdamHyper {
            lr: 0.003,
            wd: 0.05,
            b1: 0.9,
            b2: 0.999,
            eps: 1e-8,
            bc1: 1.0 - 0.9f64.powi(7),
            bc2: 1.0 - 0.999f64.powi(7),
        });
        for old in [Some((&m0[..], &v0[..])), None] {
            let run = || {
                let (mut t, mut m, mut v) = (hashed_values(n, 4), out_buffer(n), out_buffer(n));
                adamw_chunk(&mut t, &g, old, &mut m, &mut v, &k);
                (bits(&t), bits(&out_values(&m)), bits(&out_values(&v)))
            };
            same_on_every_family(run);
            let (t, m, v) = run();
            let t0 = hashed_values(n, 4);
            for i in 0..n {
                let (mo, vo) = old.map_or((0.0, 0.0), |(m0, v0)| (m0[i], v0[i]));
                let mi = mo * k.b1 + g[i] * k.c1;
                let vi = vo * k.b2 + g[i] * g[i] * k.c2;
                let ti = t0[i] * k.decay - mi / (vi.sqrt() / k.sbc2 + k.eps) * k.step;
                assert_eq!(
                    (t[i], m[i], v[i]),
                    (ti.to_bits(), mi.to_bits(), vi.to_bits()),
                    "value {i}"
                );
            }
        }
    }

    /// A state with only the first moment (the second absent, as zeros)
    /// updates with that moment and a zero second one, as torch's formula
    /// does with each moment on its own.
    #[test]
    fn adamw_with_one_moment_in_its_state_uses_it() -> Result<()> {
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.0,
            ..Default::default()
        };
        let (var, mut opt) = setup(&cfg)?;
        let m0 = [0.5f32, -0.25, 0.125];
        let state: HashMap<String, Tensor> = [
            ("step".to_string(), Tensor::new(&[3i64], &Device::Cpu)?),
            ("layer.weight.exp_avg".to_string(), Tensor::new(&m0, &Device::Cpu)?),
        ]
        .into_iter()
        .collect();
        opt.load_state(&state)?;
        opt.step(&grads_for(&var)?, 0.1)?;
        let want: Vec<f64> = (0..3)
            .map(|i| {
                let g = f64::from(G[i]);
                let m = 0.9 * f64::from(m0[i]) + 0.1 * g;
                let v = 0.001 * g * g;
                let (mh, vh) = (m / (1.0 - 0.9f64.powi(4)), v / (1.0 - 0.999f64.powi(4)));
                f64::from(W0[i]) - 0.1 * mh / (vh.sqrt() + 1e-8)
            })
            .collect();
        close(&values(&var), &want);
        Ok(())
    }

    #[test]
    fn adamw_first_step_known_values() -> Result<()> {
        // With bias correction the first step is lr * g/|g| (eps aside), plus decay.
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let (var, mut opt) = setup(&cfg)?;
        opt.step(&grads_for(&var)?, 0.1)?;
        close(
            &values(&var),
            &[1.0 * 0.999 - 0.1, -2.0 * 0.999 + 0.1, 0.5 * 0.999 - 0.1],
        );
        Ok(())
    }

    #[test]
    fn sgd_momentum_matches_torch_formula() -> Result<()> {
        let cfg = OptimConfig {
            name: OptimKind::Sgd,
            momentum: 0.9,
            weight_decay: 0.1,
            ..Default::default()
        };
        let (var, mut opt) = setup(&cfg)?;
        // step 1: d = g + .1 w ; buf = d ; w -= .5 buf
        opt.step(&grads_for(&var)?, 0.5)?;
        let d1: Vec<f64> = (0..3).map(|i| G[i] as f64 + 0.1 * W0[i] as f64).collect();
        let w1: Vec<f64> = (0..3).map(|i| W0[i] as f64 - 0.5 * d1[i]).collect();
        close(&values(&var), &w1);
        // step 2: d = g + .1 w1 ; buf = .9 buf + d ; w -= .5 buf
        opt.step(&grads_for(&var)?, 0.5)?;
        let w2: Vec<f64> = (0..3)
            .map(|i| {
                let d2 = G[i] as f64 + 0.1 * w1[i];
                w1[i] - 0.5 * (0.9 * d1[i] + d2)
            })
            .collect();
        close(&values(&var), &w2);
        Ok(())
    }

    #[test]
    fn sgd_nesterov_matches_torch_formula() -> Result<()> {
        let cfg = OptimConfig {
            name: OptimKind::Sgd,
            momentum: 0.9,
            nesterov: true,
            ..Default::default()
        };
        let (var, mut opt) = setup(&cfg)?;
        opt.step(&grads_for(&var)?, 0.5)?;
        opt.step(&grads_for(&var)?, 0.5)?;
        // buf1 = g, step1: w -= .5 (g + .9 g); buf2 = .9 g + g, step2: w -= .5 (g + .9 buf2)
        let w2: Vec<f64> = (0..3)
            .map(|i| {
                let g = G[i] as f64;
                W0[i] as f64 - 0.5 * 1.9 * g - 0.5 * (g + 0.9 * 1.9 * g)
            })
            .collect();
        close(&values(&var), &w2);
        Ok(())
    }

    #[test]
    fn lars_step_uses_trust_ratio() -> Result<()> {
        let cfg = OptimConfig {
            name: OptimKind::Lars,
            momentum: 0.9,
            weight_decay: 1e-4,
            trust_coefficient: 0.001,
            ..Default::default()
        };
        let (var, mut opt) = setup(&cfg)?;
        let lr = 4.8;
        let mut w: Vec<f64> = W0.iter().map(|&x| x as f64).collect();
        let mut buf = [0.0; 3];
        for _ in 0..2 {
            opt.step(&grads_for(&var)?, lr)?;
            let d: Vec<f64> = (0..3).map(|i| G[i] as f64 + 1e-4 * w[i]).collect();
            let wn = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            let dn = d.iter().map(|x| x * x).sum::<f64>().sqrt();
            let trust = 0.001 * wn / dn;
            for i in 0..3 {
                buf[i] = 0.9 * buf[i] + lr * trust * d[i];
                w[i] -= buf[i];
            }
            close(&values(&var), &w);
        }
        Ok(())
    }

    #[test]
    fn lars_excluded_params_skip_adaptation_and_decay() -> Result<()> {
        let var = Var::new(&W0, &Device::Cpu)?; // 1-d: a bias
        let cfg = OptimConfig {
            name: OptimKind::Lars,
            momentum: 0.0,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = cfg.build(vec![("fc.bias".into(), var.clone())])?;
        opt.step(&grads_for(&var)?, 0.1)?;
        let w: Vec<f64> = (0..3).map(|i| W0[i] as f64 - 0.1 * G[i] as f64).collect();
        close(&values(&var), &w);
        Ok(())
    }

    #[test]
    fn state_round_trip_and_bad_state() -> Result<()> {
        let cfg = OptimConfig::default();
        let (var, mut opt) = setup(&cfg)?;
        opt.step(&grads_for(&var)?, 0.1)?;
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        let (var2, mut opt2) = setup(&cfg)?;
        opt2.load_state(&state)?;
        var2.set(var.as_tensor())?;
        opt.step(&grads_for(&var)?, 0.1)?;
        opt2.step(&grads_for(&var2)?, 0.1)?;
        assert_eq!(values(&var), values(&var2));

        let mut bad = state.clone();
        bad.insert(
            "other.weight.exp_avg".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu)?,
        );
        let err = opt2.load_state(&bad).expect_err("unknown key");
        assert!(err.to_string().contains("other.weight.exp_avg"), "{err}");
        let mut bad = state.clone();
        bad.insert(
            "layer.weight.exp_avg".into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu)?,
        );
        assert!(opt2.load_state(&bad).is_err());
        Ok(())
    }

    #[test]
    fn glob_patterns() {
        assert!(glob_match("*.bias", "layer1.0.conv.bias"));
        assert!(glob_match("embeddings.*", "embeddings.word.weight"));
        assert!(!glob_match("*norm*", "encoder.LayerNorm.weight"));
        assert!(glob_match("*Norm*", "encoder.LayerNorm.weight"));
        assert!(!glob_match("*.bias", "bias_weight"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn validate_rejects_bad_values() {
        let cfg = OptimConfig {
            beta1: 1.0,
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("beta1"));
        let cfg = OptimConfig {
            lr: f64::NAN,
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }
}
