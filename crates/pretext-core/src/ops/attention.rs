//! Multi-head scaled dot-product attention as one graph node: scores,
//! key mask, softmax, dropout on the probabilities and the weighted sum per
//! head, forward and backward, on strided views of the `(batch · seq,
//! hidden)` rows (no transposed copies), one rayon task per head.

use super::bf16::Precision;
use super::dropout::dropout;
use super::fast_path;
use super::fused::{apply, values, FusedOp, Operand};
use super::gemm::{matmul, row_major, transposed, View};
use candle_core::{bail, Shape, Tensor, D};
use rayon::prelude::*;

/// Multi-head scaled dot-product attention over `(batch · seq, hidden)` rows
/// (heads side by side in the hidden dimension, as Hugging Face lays them
/// out), with an additive key mask and dropout on the probabilities.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// `(batch · seq)` additive bias per key: 0 for tokens, a large negative number for padding.
    pub key_bias: std::sync::Arc<Vec<f32>>,
    /// Dropout on the attention probabilities (0 = none).
    pub dropout: f64,
    /// Seed of the dropout masks.
    pub seed: u64,
    /// The precision of the operands of its products (usually the caller's
    /// [`Precision::current`], taken when the op is built so that the
    /// backward pass uses the forward's).
    pub precision: Precision,
}

impl Attention {
    fn dims(&self, len: usize) -> candle_core::Result<(usize, usize)> {
        let rows = self.batch * self.seq;
        if rows == 0 || !len.is_multiple_of(rows) || !(len / rows).is_multiple_of(self.heads) {
            bail!(
                "attention: {len} values do not fit {} sequences × {} tokens × {} heads",
                self.batch,
                self.seq,
                self.heads
            );
        }
        Ok((len / rows, len / rows / self.heads))
    }

    /// Head `task = b · heads + h`'s `(seq, dh)` block of the `(batch · seq,
    /// hidden)` rows, and the same block transposed.
    fn head_views(&self, task: usize, hid: usize, dh: usize) -> (View, View) {
        let (b, h) = (task / self.heads, task % self.heads);
        let block = View {
            off: b * self.seq * hid + h * dh,
            rs: hid,
            cs: 1,
        };
        let transposed = View {
            off: block.off,
            rs: 1,
            cs: hid,
        };
        (block, transposed)
    }

    /// The number of the first head of this process's batch in the whole
    /// batch of a data-parallel step (0 in one process): dropout masks are
    /// drawn by a head's number in the whole batch, so they do not depend
    /// on the number of processes. Read on the calling thread.
    fn first_task(&self) -> usize {
        crate::dist::step_collective().map_or(0, |w| w.rank() * self.batch * self.heads)
    }

    /// Probabilities (after dropout when `drop`) of head `task = b · heads + h`, `seq × seq`,
    /// and the dropout mask used (drawn for head `first + task` of the whole batch).
    fn probs(
        &self,
        q: &[f32],
        k: &[f32],
        (first, task): (usize, usize),
        hid: usize,
        dh: usize,
    ) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
        let t = self.seq;
        let b = task / self.heads;
        let (base, kt) = self.head_views(task, hid, dh);
        let mut s = vec![0f32; t * t];
        matmul(
            self.precision,
            (t, t, dh),
            q,
            base,
            k,
            kt,
            &mut s,
            row_major(t),
            false,
            1,
        );
        let scale = 1.0 / (dh as f32).sqrt();
        let kb = &self.key_bias[b * t..(b + 1) * t];
        super::vector::scaled_softmax_rows(&mut s, scale, kb);
        if self.dropout > 0.0 {
            let seed = crate::seed::splitmix64(self.seed ^ ((first + task) as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            let keep = 1.0 / (1.0 - self.dropout) as f32;
            let threshold = (self.dropout * (1u64 << 53) as f64) as u64;
            let mut st = seed;
            let mask: Vec<f32> = (0..t * t)
                .map(|_| {
                    st = st.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    if crate::seed::splitmix64(st) >> 11 < threshold {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect();
            let dropped = s.iter().zip(&mask).map(|(p, m)| p * m).collect();
            (s, dropped, Some(mask))
        } else {
            (s.clone(), s, None)
        }
    }
}

impl FusedOp<3> for Attention {
    const NAME: &'static str = "pretext-attention";

    fn forward(&self, [q, k, v]: [Operand<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let shape = Shape::from(q.dims.to_vec());
        let (q, k, v) = (q.data, k.data, v.data);
        if q.len() != k.len() || q.len() != v.len() {
            bail!("attention: q, k and v differ in size");
        }
        let (hid, dh) = self.dims(q.len())?;
        let t = self.seq;
        let first = self.first_task();
        let parts: Vec<Vec<f32>> = (0..self.batch * self.heads)
            .into_par_iter()
            .map(|task| {
                let (_, p, _) = self.probs(q, k, (first, task), hid, dh);
                let (b, h) = (task / self.heads, task % self.heads);
                let vv = View {
                    off: b * t * hid + h * dh,
                    rs: hid,
                    cs: 1,
                };
                let mut out = vec![0f32; t * dh];
                matmul(
                    self.precision,
                    (t, dh, t),
                    &p,
                    row_major(t),
                    v,
                    vv,
                    &mut out,
                    row_major(dh),
                    false,
                    1,
                );
                out
            })
            .collect();
        let mut ctx = vec![0f32; q.len()];
        scatter(&mut ctx, &parts, self.heads, t, hid, dh);
        Ok((ctx, shape))
    }

    fn backward(
        &self,
        [q, k, v]: [&Tensor; 3],
        _ctx: &Tensor,
        dctx: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let (qs, ks, vs, ds) = (values(q)?, values(k)?, values(v)?, values(dctx)?);
        let (hid, dh) = self.dims(qs.len())?;
        let t = self.seq;
        let scale = 1.0 / (dh as f32).sqrt();
        let first = self.first_task();
        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..self.batch * self.heads)
            .into_par_iter()
            .map(|task| {
                let (p, pd, mask) = self.probs(&qs, &ks, (first, task), hid, dh);
                let (blk, blk_t) = self.head_views(task, hid, dh);
                // dV = P'ᵀ · dctx
                let mut dv = vec![0f32; t * dh];
                matmul(
                    self.precision,
                    (t, dh, t),
                    &pd,
                    transposed(t),
                    &ds,
                    blk,
                    &mut dv,
                    row_major(dh),
                    false,
                    1,
                );
                // dP' = dctx · Vᵀ, then through dropout and softmax
                let mut dp = vec![0f32; t * t];
                matmul(
                    self.precision,
                    (t, t, dh),
                    &ds,
                    blk,
                    &vs,
                    blk_t,
                    &mut dp,
                    row_major(t),
                    false,
                    1,
                );
                if let Some(m) = &mask {
                    dp.iter_mut().zip(m).for_each(|(d, m)| *d *= m);
                }
                super::vector::softmax_backward_rows(&mut dp, &p, t, scale);
                // dQ = dS · K, dK = dSᵀ · Q
                let mut dq = vec![0f32; t * dh];
                matmul(
                    self.precision,
                    (t, dh, t),
                    &dp,
                    row_major(t),
                    &ks,
                    blk,
                    &mut dq,
                    row_major(dh),
                    false,
                    1,
                );
                let mut dk = vec![0f32; t * dh];
                matmul(
                    self.precision,
                    (t, dh, t),
                    &dp,
                    transposed(t),
                    &qs,
                    blk,
                    &mut dk,
                    row_major(dh),
                    false,
                    1,
                );
                (dq, dk, dv)
            })
            .collect();
        let n = qs.len();
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let mut pq = Vec::with_capacity(parts.len());
        let mut pk = Vec::with_capacity(parts.len());
        let mut pv = Vec::with_capacity(parts.len());
        for (a, b, c) in parts {
            pq.push(a);
            pk.push(b);
            pv.push(c);
        }
        scatter(&mut dq, &pq, self.heads, t, hid, dh);
        scatter(&mut dk, &pk, self.heads, t, hid, dh);
        scatter(&mut dv, &pv, self.heads, t, hid, dh);
        let dev = q.device();
        Ok([
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ])
    }
}

/// Writes per-head `seq × dh` blocks back into `(batch · seq, hidden)` rows.
fn scatter(out: &mut [f32], parts: &[Vec<f32>], heads: usize, t: usize, hid: usize, dh: usize) {
    for (task, p) in parts.iter().enumerate() {
        let (b, h) = (task / heads, task % heads);
        for (i, row) in p.chunks(dh).enumerate() {
            let o = (b * t + i) * hid + h * dh;
            out[o..o + dh].copy_from_slice(row);
        }
    }
}

/// Multi-head attention of `(batch · seq, hidden)` queries, keys and values
/// (see [`Attention`]): one fused node on CPU f32 that never materialises
/// transposed copies; candle's ops elsewhere (the reference in tests).
///
/// # Errors
/// Shapes that do not fit.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, op: Attention) -> candle_core::Result<Tensor> {
    if fast_path(&[q, k, v]) {
        apply([&q.contiguous()?, &k.contiguous()?, &v.contiguous()?], op)
    } else {
        reference_attention(q, k, v, &op)
    }
}

/// [`attention`] from candle's differentiable ops (dropout masks differ from the fused op's).
///
/// # Errors
/// Shapes that do not fit.
pub fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, op: &Attention) -> candle_core::Result<Tensor> {
    let (b, t, nh) = (op.batch, op.seq, op.heads);
    let hid = q.dim(D::Minus1)?;
    let dh = hid / nh;
    let split =
        |y: &Tensor| -> candle_core::Result<Tensor> { y.reshape((b, t, nh, dh))?.transpose(1, 2)?.contiguous() };
    let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
    let bias = Tensor::from_slice(op.key_bias.as_slice(), (b, 1, 1, t), q.device())?;
    let scores = (qh.matmul(&kh.t()?)? * (1.0 / (dh as f64).sqrt()))?.broadcast_add(&bias)?;
    let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
    let p = dropout(&p, op.dropout, op.seed)?;
    p.matmul(&vh)?.transpose(1, 2)?.reshape((b * t, hid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::ops::testing::max_diff;

    /// Values in [-1, 1]: the shared generator's, halved.
    fn rand(shape: &[usize], seed: u64) -> Tensor {
        (crate::ops::testing::rand(shape, seed) * 0.5).expect("scale")
    }

    #[test]
    fn attention_and_its_gradients_match_candle() -> candle_core::Result<()> {
        let (b, t, nh, hid) = (2, 5, 3, 12);
        let mut key_bias = vec![0f32; b * t];
        key_bias[8] = -1e9;
        key_bias[9] = -1e9; // the second sequence has two padding tokens
        let op = Attention {
            batch: b,
            seq: t,
            heads: nh,
            key_bias: std::sync::Arc::new(key_bias),
            dropout: 0.0,
            seed: 0,
            precision: Precision::current(),
        };
        let q = Var::from_tensor(&rand(&[b * t, hid], 1))?;
        let k = Var::from_tensor(&rand(&[b * t, hid], 2))?;
        let v = Var::from_tensor(&rand(&[b * t, hid], 3))?;
        let g = rand(&[b * t, hid], 4);
        let y = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), op.clone())?;
        let r = reference_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &op)?;
        assert!(max_diff(&y, &r) < 1e-5, "{}", max_diff(&y, &r));
        let gy = (y * &g)?.sum_all()?.backward()?;
        let gr = (r * &g)?.sum_all()?.backward()?;
        for var in [&q, &k, &v] {
            let d = max_diff(gy.get(var.as_tensor()).expect("g"), gr.get(var.as_tensor()).expect("g"));
            assert!(d < 1e-5, "{d}");
        }
        Ok(())
    }

    #[test]
    fn attention_dropout_gradient_matches_finite_differences() -> candle_core::Result<()> {
        let (b, t, nh, hid) = (1, 4, 2, 4);
        let op = Attention {
            batch: b,
            seq: t,
            heads: nh,
            key_bias: std::sync::Arc::new(vec![0f32; b * t]),
            dropout: 0.3,
            seed: 11,
            precision: Precision::current(),
        };
        let q = rand(&[b * t, hid], 5);
        let k = rand(&[b * t, hid], 6);
        let v = rand(&[b * t, hid], 7);
        let g = rand(&[b * t, hid], 8);
        let qv = Var::from_tensor(&q)?;
        let grads = (attention(qv.as_tensor(), &k, &v, op.clone())? * &g)?
            .sum_all()?
            .backward()?;
        let an = grads.get(qv.as_tensor()).expect("g").flatten_all()?.to_vec1::<f32>()?;
        let qs = q.flatten_all()?.to_vec1::<f32>()?;
        let f = |x: Vec<f32>| -> candle_core::Result<f64> {
            let x = Tensor::from_vec(x, (b * t, hid), &Device::Cpu)?;
            Ok(f64::from(
                (attention(&x, &k, &v, op.clone())? * &g)?
                    .sum_all()?
                    .to_scalar::<f32>()?,
            ))
        };
        let mut some_dropped = false;
        for i in 0..qs.len() {
            let h = 1e-2;
            let (mut p, mut m) = (qs.clone(), qs.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (f(p)? - f(m)?) / (2.0 * f64::from(h));
            assert!((fd - f64::from(an[i])).abs() < 2e-3, "q[{i}]: {fd} vs {}", an[i]);
            some_dropped |= an[i] != 0.0;
        }
        assert!(some_dropped);
        Ok(())
    }
}
