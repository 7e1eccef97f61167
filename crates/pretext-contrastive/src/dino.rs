//! DINO (Caron et al. 2021): self-distillation without labels. A student
//! (encoder + [`DinoHead`]) sees two global crops and `local_crops` smaller
//! local crops of each image; a teacher, the EMA of the student with the
//! momentum rising to 1 along a cosine, sees the global crops only. The
//! teacher's outputs are centred (a running mean of them, `center`) and
//! sharpened (temperature warming up from `teacher_temperature_start` to
//! `teacher_temperature`), and each student view is trained to predict them
//! for the other views ([`dino_loss`]).

use crate::branch::{state_tensor, MomentumTwin};
use crate::encoder::Encoder;
use crate::head::{DinoHead, DinoHeadConfig};
use crate::loss::dino_loss;
use crate::model::ModelConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use pretext_core::init::named_vars;
use pretext_core::trainer::{Method, StepCx, StepOut};
use pretext_core::{Error, SeededVarMap};
use pretext_data::ImageBatch;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// DINO settings (`model.dino`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DinoConfig {
    /// Hidden units of the head's MLP (2048 in the paper).
    pub hidden: usize,
    /// The head's bottleneck (256 in the paper).
    pub bottleneck: usize,
    /// Prototypes K, the output dimension (65,536 in the paper).
    pub prototypes: usize,
    /// τ_s, the student's temperature.
    pub student_temperature: f64,
    /// τ_t at the start of the warm-up.
    pub teacher_temperature_start: f64,
    /// τ_t after the warm-up.
    pub teacher_temperature: f64,
    /// Fraction of the run over which τ_t rises linearly to its final value.
    pub teacher_warmup: f64,
    /// Momentum of the centre (a running mean of the teacher's outputs).
    pub center_momentum: f64,
    /// Base EMA momentum of the teacher, rising to 1 along a cosine.
    pub momentum: f64,
    /// Local crops per image, besides the two global ones (0 = no multi-crop).
    pub local_crops: usize,
    /// Side of the local crops (96 of 224 in the paper).
    pub local_size: usize,
    /// Area range of the local crops (the global ones take `data.augment.crop_scale`).
    pub local_scale: (f64, f64),
}

impl Default for DinoConfig {
    fn default() -> Self {
        Self {
            hidden: 512,
            bottleneck: 128,
            prototypes: 1024,
            student_temperature: 0.1,
            teacher_temperature_start: 0.04,
            teacher_temperature: 0.07,
            teacher_warmup: 0.3,
            center_momentum: 0.9,
            momentum: 0.99,
            local_crops: 4,
            local_size: 12,
            local_scale: (0.05, 0.4),
        }
    }
}

impl DinoConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        for (k, v) in [
            ("hidden", self.hidden),
            ("bottleneck", self.bottleneck),
            ("prototypes", self.prototypes),
        ] {
            if v < 2 {
                return Err(InvalidSetting::value(
                    format!("model.dino.{k}"),
                    v,
                    "must be at least 2",
                ));
            }
        }
        for (k, v) in [
            ("student_temperature", self.student_temperature),
            ("teacher_temperature_start", self.teacher_temperature_start),
            ("teacher_temperature", self.teacher_temperature),
        ] {
            if v.is_nan() || v <= 0.0 {
                return Err(InvalidSetting::value(format!("model.dino.{k}"), v, "must be > 0"));
            }
        }
        for (k, v) in [
            ("teacher_warmup", self.teacher_warmup),
            ("center_momentum", self.center_momentum),
            ("momentum", self.momentum),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(InvalidSetting::value(
                    format!("model.dino.{k}"),
                    v,
                    "must lie in [0, 1]",
                ));
            }
        }
        if self.local_crops > 0 && self.local_size < 8 {
            return Err(InvalidSetting::value(
                "model.dino.local_size",
                self.local_size,
                "must be at least 8",
            ));
        }
        let (lo, hi) = self.local_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(InvalidSetting::value(
                "model.dino.local_scale",
                format!("[{lo}, {hi}]"),
                "must satisfy 0 < low ≤ high ≤ 1",
            ));
        }
        Ok(())
    }

    /// τ_t at `step` of `total`: linear from the start value over the
    /// warm-up's steps, then constant.
    pub fn teacher_temperature_at(&self, step: u64, total: u64) -> f64 {
        let warm = (self.teacher_warmup * total as f64).round();
        if warm <= 0.0 || step as f64 >= warm {
            return self.teacher_temperature;
        }
        let p = step as f64 / warm;
        self.teacher_temperature_start + p * (self.teacher_temperature - self.teacher_temperature_start)
    }

    /// The teacher's EMA momentum at `step` of `total`.
    pub fn momentum_at(&self, step: u64, total: u64) -> f64 {
        pretext_core::ema::cosine_momentum(step, total, self.momentum)
    }
}

type Parts = (SeededVarMap, VarMap, Encoder, DinoHead);

/// Encoder (`encoder.*`) and DINO head (`head.*`) from the `init` stream of `seed`.
fn build(cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Parts> {
    let d = &cfg.dino;
    crate::model::build_encoder_with(cfg, seed, device, |features, b| {
        let head_cfg = DinoHeadConfig {
            input: features,
            hidden: d.hidden,
            bottleneck: d.bottleneck,
            prototypes: d.prototypes,
        };
        DinoHead::new(&head_cfg, b)
    })
}

/// The DINO method: the student's `encoder.*`, `head.*` (trained,
/// `model.safetensors`); the teacher's `teacher.encoder.*`, `teacher.head.*`
/// and the `center` `(1, K)` in `state.safetensors`.
pub struct Dino {
    params: SeededVarMap,
    buffers: VarMap,
    encoder: Encoder,
    head: DinoHead,
    teacher: MomentumTwin<DinoHead>,
    center: Tensor,
    pending_center: Option<Tensor>,
    cfg: DinoConfig,
}

impl Dino {
    /// Student and teacher (identical at the start), the centre at 0.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Self> {
        let (params, buffers, encoder, head) = build(cfg, seed, device)?;
        Ok(Self {
            params,
            buffers,
            encoder,
            head,
            teacher: MomentumTwin::from_parts(build(cfg, seed, device)?, "teacher."),
            center: Tensor::zeros((1, cfg.dino.prototypes), DType::F32, device)?,
            pending_center: None,
            cfg: cfg.dino.clone(),
        })
    }

    /// The student's encoder (what transfers).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The teacher's parameters (an EMA of the student's).
    pub fn teacher_params(&self) -> &VarMap {
        self.teacher.params()
    }

    /// The centre `(1, K)`.
    pub fn center(&self) -> &Tensor {
        &self.center
    }

    /// Student outputs of `views` of one size, run as one batch, split back per view.
    fn student(&self, views: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        if views.is_empty() {
            return Ok(vec![]);
        }
        let n = views[0].dim(0)?;
        let out = self
            .head
            .forward(&self.encoder.forward_t(&Tensor::cat(views, 0)?, true)?)?;
        (0..views.len()).map(|i| out.narrow(0, i * n, n)).collect()
    }

    /// The loss of a multi-crop batch (two global views first, then local
    /// ones) at τ_t = `teacher_temperature`, and the teacher's outputs of the
    /// global views `(2n, K)` (what the centre update averages).
    ///
    /// # Errors
    /// Fewer than two views; shapes that do not fit.
    pub fn loss(&self, views: &[Tensor], teacher_temperature: f64) -> candle_core::Result<(Tensor, Tensor)> {
        if views.len() < 2 {
            candle_core::bail!("DINO needs 2 global views per image, got {}", views.len())
        }
        let (global, local) = views.split_at(2);
        let mut student = self.student(global)?;
        student.extend(self.student(local)?);
        let n = global[0].dim(0)?;
        let t = self.teacher.project(&Tensor::cat(global, 0)?)?;
        let teacher = [t.narrow(0, 0, n)?, t.narrow(0, n, n)?];
        let loss = dino_loss(
            &student,
            &teacher,
            &self.center,
            self.cfg.student_temperature,
            teacher_temperature,
        )?;
        Ok((loss, t))
    }
}

impl Method for Dino {
    type Batch = ImageBatch;

    fn vars(&self) -> &VarMap {
        self.params.var_map()
    }

    fn model_buffers(&self) -> Option<&VarMap> {
        Some(&self.buffers)
    }

    fn step(&mut self, batch: &ImageBatch, cx: &StepCx) -> pretext_core::Result<StepOut> {
        let want = 2 + self.cfg.local_crops;
        if batch.views.len() != want {
            return Err(Error::Config(format!(
                "DINO with model.dino.local_crops = {} needs {want} views per image, got {}",
                self.cfg.local_crops,
                batch.views.len()
            )));
        }
        let tt = self.cfg.teacher_temperature_at(cx.step, cx.total_steps);
        let (loss, teacher) = self.loss(&batch.views, tt)?;
        // The teacher's mean output over the whole batch (every rank's rows).
        self.pending_center = Some(pretext_core::dist::step_mean(&teacher.mean_keepdim(0)?)?);
        Ok(StepOut {
            loss,
            stats: vec![
                ("teacher_temperature", tt),
                ("momentum", self.cfg.momentum_at(cx.step, cx.total_steps)),
            ],
        })
    }

    /// The teacher follows the student; the centre follows the teacher's
    /// mean output of the step: `c ← m·c + (1 − m)·mean(t)`.
    fn after_update(&mut self, cx: &StepCx) -> pretext_core::Result<()> {
        self.teacher.follow(
            named_vars(self.params.var_map()),
            self.cfg.momentum_at(cx.step, cx.total_steps),
        )?;
        if let Some(mean) = self.pending_center.take() {
            let m = self.cfg.center_momentum;
            self.center = ((&self.center * m)? + (mean * (1.0 - m))?)?;
        }
        Ok(())
    }

    fn data_parallel(&self, _processes: usize) -> Result<(), String> {
        Ok(())
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        let mut v = self.teacher.tensors();
        v.push(("center".into(), self.center.clone()));
        v
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> pretext_core::Result<()> {
        self.teacher.load(buffers, &["center"], "DINO")?;
        let c = state_tensor(buffers, "center", self.center.dims(), "DINO")?;
        self.center = c.to_dtype(DType::F32)?.to_device(self.center.device())?;
        self.pending_center = None;
        Ok(())
    }

    /// The teacher starts as a copy of the loaded student.
    fn weights_loaded(&mut self) -> pretext_core::Result<()> {
        self.teacher.copy_from(self.params.var_map(), &self.buffers)
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        crate::branch::method_metadata("dino", &self.encoder)
    }
}
