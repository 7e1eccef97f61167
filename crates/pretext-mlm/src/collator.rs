//! From documents to training batches: packing or truncating token
//! sequences, BERT masking (15% of the non-special tokens chosen; of those
//! 80% become `[MASK]`, 10% a random token, 10% stay) and dynamic padding.

pub use crate::tokenizer::SpecialIds;
use candle_core::{Device, Tensor};
use pretext_core::trainer::BatchSource;
use pretext_core::{Error, Result};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How documents become sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Packing {
    /// Concatenate documents (separated by `[SEP]`) and cut the stream into
    /// full `[CLS] … [SEP]` sequences: no padding, no wasted compute.
    Pack,
    /// One sequence per document, `[CLS] doc [SEP]`, cut at the maximum length.
    Truncate,
}

/// The masking recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskingConfig {
    /// Fraction of the non-special, non-padding tokens chosen for prediction.
    pub mask_prob: f64,
    /// Of the chosen tokens, the fraction replaced by `[MASK]`.
    pub mask_ratio: f64,
    /// Of the chosen tokens, the fraction replaced by a random (non-special) token; the rest stay.
    pub random_ratio: f64,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        Self {
            mask_prob: 0.15,
            mask_ratio: 0.8,
            random_ratio: 0.1,
        }
    }
}

impl MaskingConfig {
    /// Checks the fractions.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        if !(self.mask_prob > 0.0 && self.mask_prob <= 1.0) {
            return Err(InvalidSetting::value(
                "masking.mask_prob",
                self.mask_prob,
                "must be in (0, 1]",
            ));
        }
        for (key, r) in [
            ("masking.mask_ratio", self.mask_ratio),
            ("masking.random_ratio", self.random_ratio),
        ] {
            if !(0.0..=1.0).contains(&r) {
                return Err(InvalidSetting::value(key, r, "must be in [0, 1]"));
            }
        }
        if self.mask_ratio + self.random_ratio > 1.0 {
            return Err(InvalidSetting::new(
                "masking.random_ratio",
                format!(
                    "{} plus masking.mask_ratio = {} must be at most 1",
                    self.random_ratio, self.mask_ratio
                ),
            ));
        }
        Ok(())
    }
}

/// Token sequences of at most `seq_len` tokens, each `[CLS] … [SEP]`.
///
/// # Errors
/// `seq_len` < 3, or no tokens at all.
pub fn sequences(docs: &[Vec<u32>], seq_len: usize, packing: Packing, ids: &SpecialIds) -> Result<Vec<Vec<u32>>> {
    if seq_len < 3 {
        return Err(pretext_core::InvalidSetting::value("data.seq_len", seq_len, "must be at least 3").into());
    }
    let body = seq_len - 2;
    let wrap = |piece: &[u32]| {
        let mut s = Vec::with_capacity(piece.len() + 2);
        s.push(ids.cls);
        s.extend_from_slice(piece);
        s.push(ids.sep);
        s
    };
    let out: Vec<Vec<u32>> = match packing {
        Packing::Truncate => docs
            .iter()
            .filter(|d| !d.is_empty())
            .map(|d| wrap(&d[..d.len().min(body)]))
            .collect(),
        Packing::Pack => {
            let mut stream = Vec::new();
            for d in docs.iter().filter(|d| !d.is_empty()) {
                if !stream.is_empty() {
                    stream.push(ids.sep);
                }
                stream.extend_from_slice(d);
            }
            stream.chunks(body).map(wrap).collect()
        }
    };
    if out.is_empty() {
        return Err(Error::Data("the corpus has no tokens to train on".into()));
    }
    Ok(out)
}

/// A masked batch before it becomes tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Masked {
    /// Inputs, padded to the longest sequence.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for tokens, 0 for padding.
    pub attention: Vec<Vec<u8>>,
    /// `(row, position, original id)` of every chosen token.
    pub labels: Vec<(usize, usize, u32)>,
}

/// Applies BERT masking to `seqs` with `rng`, padding them to the longest.
/// At least one token of the batch is always chosen (so the loss is defined).
pub fn mask_batch(seqs: &[&[u32]], cfg: &MaskingConfig, ids: &SpecialIds, rng: &mut StdRng) -> Masked {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(seqs.len());
    let mut attention = Vec::with_capacity(seqs.len());
    let mut labels = Vec::new();
    let mut eligible = Vec::new();
    for (r, s) in seqs.iter().enumerate() {
        let mut row = s.to_vec();
        row.resize(t, ids.pad);
        let mut att = vec![1u8; s.len()];
        att.resize(t, 0);
        for (p, &tok) in s.iter().enumerate() {
            if tok < ids.first_regular {
                continue;
            }
            eligible.push((r, p));
            if rng.random::<f64>() < cfg.mask_prob {
                labels.push((r, p, tok));
            }
        }
        input_ids.push(row);
        attention.push(att);
    }
    if labels.is_empty() && !eligible.is_empty() {
        let (r, p) = eligible[rng.random_range(0..eligible.len())];
        labels.push((r, p, seqs[r][p]));
    }
    for &(r, p, _) in &labels {
        let u = rng.random::<f64>();
        if u < cfg.mask_ratio {
            input_ids[r][p] = ids.mask;
        } else if u < cfg.mask_ratio + cfg.random_ratio && ids.vocab_size > ids.first_regular {
            input_ids[r][p] = rng.random_range(ids.first_regular..ids.vocab_size);
        }
    }
    Masked {
        input_ids,
        attention,
        labels,
    }
}

impl Masked {
    /// The batch as tensors on `device`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn to_batch(&self, device: &Device) -> Result<MlmBatch> {
        let b = self.input_ids.len();
        let t = self.input_ids.first().map_or(0, Vec::len);
        let flat: Vec<u32> = self.input_ids.iter().flatten().copied().collect();
        let att: Vec<f32> = self.attention.iter().flatten().map(|&a| f32::from(a)).collect();
        let pos: Vec<u32> = self.labels.iter().map(|&(r, p, _)| (r * t + p) as u32).collect();
        let tgt: Vec<u32> = self.labels.iter().map(|&(_, _, id)| id).collect();
        let m = pos.len();
        Ok(MlmBatch {
            input_ids: Tensor::from_vec(flat, (b, t), device)?,
            attention_mask: Tensor::from_vec(att, (b, t), device)?,
            positions: Tensor::from_vec(pos, m, device)?,
            targets: Tensor::from_vec(tgt, m, device)?,
            total_masked: m,
        })
    }

    /// Rows `[first, first + rows)` of the batch (padding as in the whole
    /// batch), with the masked positions among them: a data-parallel
    /// process's share; `total_masked` stays the whole batch's count.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn rows_to_batch(&self, first: usize, rows: usize, device: &Device) -> Result<MlmBatch> {
        let t = self.input_ids.first().map_or(0, Vec::len);
        let part = Masked {
            input_ids: self.input_ids[first..first + rows].to_vec(),
            attention: self.attention[first..first + rows].to_vec(),
            labels: self
                .labels
                .iter()
                .filter(|&&(r, _, _)| (first..first + rows).contains(&r))
                .map(|&(r, p, id)| (r - first, p, id))
                .collect(),
        };
        let mut batch = part.to_batch(device)?;
        if part.input_ids.is_empty() {
            batch.input_ids = Tensor::zeros((0, t), candle_core::DType::U32, device)?;
        }
        batch.total_masked = self.labels.len();
        Ok(batch)
    }
}

/// Token ids, attention mask and (for training) the masked positions and their targets.
#[derive(Debug, Clone)]
pub struct MlmBatch {
    /// `(batch, seq)` u32 token ids (masking applied).
    pub input_ids: Tensor,
    /// `(batch, seq)` f32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `(m,)` u32 flat indices (`b · seq + t`) of the positions to predict.
    pub positions: Tensor,
    /// `(m,)` u32 original token ids at those positions.
    pub targets: Tensor,
    /// Positions to predict in the whole batch of the step: `m` in one
    /// process; in data-parallel training, where this batch is one
    /// process's rows, the count over every process's rows (the loss is a
    /// mean over all of them).
    pub total_masked: usize,
}

/// Seeded, shuffled, masked batches of sequences: the batch of a step is a
/// pure function of (seed, step), so resumed runs see the same batches.
#[derive(Debug, Clone)]
pub struct MlmBatcher {
    seqs: Arc<Vec<Vec<u32>>>,
    batch_size: usize,
    seed: u64,
    masking: MaskingConfig,
    ids: SpecialIds,
    device: Device,
    order: Option<(u64, Vec<usize>)>,
    /// The part of every batch this process takes (data-parallel training).
    shard: pretext_core::Shard,
}

impl MlmBatcher {
    /// A batcher over `seqs` (drops the last incomplete batch of each epoch;
    /// when there are fewer sequences than a batch, a batch holds them all).
    pub fn new(
        seqs: Arc<Vec<Vec<u32>>>,
        batch_size: usize,
        seed: u64,
        masking: MaskingConfig,
        ids: SpecialIds,
        device: &Device,
    ) -> Self {
        Self {
            batch_size: batch_size.min(seqs.len()).max(1),
            seqs,
            seed,
            masking,
            ids,
            device: device.clone(),
            order: None,
            shard: pretext_core::Shard::default(),
        }
    }
}

impl BatchSource for MlmBatcher {
    type Batch = MlmBatch;

    fn steps_per_epoch(&self) -> u64 {
        (self.seqs.len() / self.batch_size).max(1) as u64
    }

    fn batch(&mut self, step: u64) -> Result<MlmBatch> {
        let spe = self.steps_per_epoch();
        let (epoch, k) = (step / spe, (step % spe) as usize);
        if self.order.as_ref().map(|o| o.0) != Some(epoch) {
            let mut rng = pretext_core::seed::stream_rng(self.seed, "mlm-order", &[epoch]);
            self.order = Some((epoch, pretext_core::seed::permutation(self.seqs.len(), &mut rng)));
        }
        let order = self
            .order
            .as_ref()
            .map(|o| &o.1[k * self.batch_size..(k + 1) * self.batch_size]);
        let picked: Vec<&[u32]> = order
            .unwrap_or_default()
            .iter()
            .map(|&i| self.seqs[i].as_slice())
            .collect();
        let mut rng = pretext_core::seed::stream_rng(self.seed, "mlm-mask", &[step]);
        // The whole batch is masked (the stream runs over all of it), then a
        // data-parallel process keeps its rows.
        let masked = mask_batch(&picked, &self.masking, &self.ids, &mut rng);
        if self.shard.size == 1 {
            return masked.to_batch(&self.device);
        }
        let rows = self.batch_size / self.shard.size;
        masked.rows_to_batch(self.shard.rank * rows, rows, &self.device)
    }

    fn set_shard(&mut self, shard: pretext_core::Shard) -> Result<()> {
        if shard.size == 0 || !self.batch_size.is_multiple_of(shard.size) || shard.rank >= shard.size {
            return Err(pretext_core::Error::Config(format!(
                "train.batch_size = {} cannot be split into {} equal parts, one per process: \
                 choose a multiple of {} (no larger than the corpus's {} sequences)",
                self.batch_size,
                shard.size,
                shard.size,
                self.seqs.len()
            )));
        }
        self.shard = shard;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const IDS: SpecialIds = SpecialIds {
        pad: 0,
        cls: 2,
        sep: 3,
        mask: 4,
        first_regular: 5,
        vocab_size: 1000,
    };

    #[test]
    fn packing_and_truncation() -> Result<()> {
        let docs = vec![vec![10, 11, 12], vec![], vec![13, 14, 15, 16, 17]];
        let packed = sequences(&docs, 6, Packing::Pack, &IDS)?;
        assert_eq!(
            packed,
            vec![vec![2, 10, 11, 12, 3, 3], vec![2, 13, 14, 15, 16, 3], vec![2, 17, 3]]
        );
        let cut = sequences(&docs, 5, Packing::Truncate, &IDS)?;
        assert_eq!(cut, vec![vec![2, 10, 11, 12, 3], vec![2, 13, 14, 15, 3]]);
        assert!(sequences(&[vec![]], 8, Packing::Pack, &IDS).is_err());
        assert!(sequences(&docs, 2, Packing::Pack, &IDS).is_err());
        Ok(())
    }

    #[test]
    fn masking_proportions_and_untouched_special_tokens() {
        // 400 sequences of varied length with specials sprinkled in
        let mut rng = StdRng::seed_from_u64(1);
        let seqs: Vec<Vec<u32>> = (0..400)
            .map(|i| {
                let n = 20 + i % 100;
                let mut s = vec![IDS.cls];
                s.extend((0..n).map(|j| {
                    if j % 17 == 5 {
                        IDS.sep
                    } else {
                        rng.random_range(5..1000)
                    }
                }));
                s.push(IDS.sep);
                s
            })
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let m = mask_batch(&refs, &MaskingConfig::default(), &IDS, &mut StdRng::seed_from_u64(7));
        let regular: usize = seqs.iter().map(|s| s.iter().filter(|&&t| t >= 5).count()).sum();
        let chosen = m.labels.len() as f64 / regular as f64;
        assert!((chosen - 0.15).abs() < 0.01, "chose {chosen}");
        let (mut masked, mut random, mut kept) = (0usize, 0usize, 0usize);
        for &(r, p, orig) in &m.labels {
            assert!(orig >= 5, "a special token was chosen");
            assert_eq!(orig, seqs[r][p]);
            let now = m.input_ids[r][p];
            if now == IDS.mask {
                masked += 1;
            } else if now == orig {
                kept += 1;
            } else {
                assert!(now >= 5, "a random replacement must not be special");
                random += 1;
            }
        }
        let n = m.labels.len() as f64;
        assert!((masked as f64 / n - 0.8).abs() < 0.02, "[MASK] {}", masked as f64 / n);
        // a random draw equals the original with probability 1/995: counts as kept
        assert!((random as f64 / n - 0.1).abs() < 0.015, "random {}", random as f64 / n);
        assert!((kept as f64 / n - 0.1).abs() < 0.015, "kept {}", kept as f64 / n);
        // everything not chosen is unchanged; padding is padding with attention 0
        let t = m.input_ids[0].len();
        assert_eq!(t, seqs.iter().map(Vec::len).max().unwrap_or(0));
        let chosen: std::collections::HashSet<(usize, usize)> = m.labels.iter().map(|&(r, p, _)| (r, p)).collect();
        for (r, s) in seqs.iter().enumerate() {
            for p in 0..t {
                if p >= s.len() {
                    assert_eq!((m.input_ids[r][p], m.attention[r][p]), (IDS.pad, 0));
                } else {
                    assert_eq!(m.attention[r][p], 1);
                    if !chosen.contains(&(r, p)) {
                        assert_eq!(m.input_ids[r][p], s[p]);
                    }
                }
            }
        }
    }

    #[test]
    fn a_batch_always_has_a_target_and_batches_are_reproducible() -> Result<()> {
        let one = [2u32, 9, 3];
        let cfg = MaskingConfig {
            mask_prob: 1e-9,
            ..Default::default()
        };
        let m = mask_batch(&[&one], &cfg, &IDS, &mut StdRng::seed_from_u64(0));
        assert_eq!(m.labels, vec![(0, 1, 9)]);
        let seqs: Arc<Vec<Vec<u32>>> = Arc::new((0..10).map(|i| vec![2, 10 + i, 11 + i, 3]).collect());
        let mut a = MlmBatcher::new(seqs.clone(), 4, 3, MaskingConfig::default(), IDS, &Device::Cpu);
        let mut b = MlmBatcher::new(seqs, 4, 3, MaskingConfig::default(), IDS, &Device::Cpu);
        assert_eq!(a.steps_per_epoch(), 2);
        let x = a.batch(5)?;
        let _ = b.batch(0)?;
        let y = b.batch(5)?;
        assert_eq!(x.input_ids.to_vec2::<u32>()?, y.input_ids.to_vec2::<u32>()?);
        assert_eq!(x.targets.to_vec1::<u32>()?, y.targets.to_vec1::<u32>()?);
        Ok(())
    }
}
