//! The training loop: exact resume, NaN guard, clipping, checkpoints on disk.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Module, VarMap};
use pretext_core::checkpoint::load_checkpoint;
use pretext_core::init::named_tensors;
use pretext_core::seed::{stream_rng, METHOD};
use pretext_core::trainer::{BatchSource, Method, NullObserver, StepCx, StepOut, TrainConfig, Trainer};
use pretext_core::{Error, OptimConfig, OptimKind, Result, RunDir, ScheduleConfig, SeededVarMap};
use rand::Rng;
use std::collections::HashMap;

/// A two-layer MLP classifier with a BatchNorm-like running mean (a model
/// buffer), an EMA twin (method state) and input noise drawn from the step's
/// generator: every path of the loop that a real method uses.
struct TinyMlp {
    vars: SeededVarMap,
    buffers: VarMap,
    twin: VarMap,
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
    scale_loss: f64,
    /// Adds `sqrt(w - w)` to the loss: value 0, gradient NaN.
    poison_grad: bool,
}

impl TinyMlp {
    fn new(seed: u64) -> Result<Self> {
        let vars = SeededVarMap::from_seed(seed, pretext_core::seed::INIT);
        let vb = vars.var_builder(DType::F32, &Device::Cpu);
        let fc1 = candle_nn::linear(4, 8, vb.pp("fc1"))?;
        let fc2 = candle_nn::linear(8, 3, vb.pp("fc2"))?;
        let buffers = VarMap::new();
        buffers.get(
            4,
            "input.running_mean",
            candle_nn::Init::Const(0.0),
            DType::F32,
            &Device::Cpu,
        )?;
        let twin = VarMap::new();
        for (name, t) in named_tensors(vars.var_map()) {
            twin.get(t.shape(), &name, candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu)?;
        }
        pretext_core::ema::copy_params(&twin, vars.var_map())?;
        Ok(Self {
            vars,
            buffers,
            twin,
            fc1,
            fc2,
            scale_loss: 1.0,
            poison_grad: false,
        })
    }
}

impl Method for TinyMlp {
    type Batch = (Tensor, Tensor);

    fn vars(&self) -> &VarMap {
        self.vars.var_map()
    }

    fn model_buffers(&self) -> Option<&VarMap> {
        Some(&self.buffers)
    }

    fn step(&mut self, (x, y): &Self::Batch, cx: &StepCx) -> Result<StepOut> {
        let mut rng = cx.rng(METHOD);
        let noise: Vec<f32> = (0..x.elem_count()).map(|_| rng.random_range(-0.01..0.01)).collect();
        let x = (x + Tensor::from_vec(noise, x.shape(), x.device())?)?;
        let rm = named_tensors(&self.buffers)[0].1.clone();
        let mean = x.mean(0)?;
        let new_rm = ((rm * 0.9)? + (mean * 0.1)?)?;
        self.buffers.set_one("input.running_mean", &new_rm)?;
        let h = self.fc1.forward(&x)?.relu()?;
        let logits = self.fc2.forward(&h)?;
        let mut loss = (candle_nn::loss::cross_entropy(&logits, y)? * self.scale_loss)?;
        if self.poison_grad {
            let w = self.fc2.weight();
            let zero = w.sub(&w.copy()?)?.sum_all()?;
            loss = (loss + zero.sqrt()?)?;
        }
        let acc = logits
            .argmax(D::Minus1)?
            .eq(y)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        Ok(StepOut {
            loss,
            stats: vec![("acc", f64::from(acc))],
        })
    }

    fn after_update(&mut self, _cx: &StepCx) -> Result<()> {
        pretext_core::ema::ema_update(&self.twin, self.vars.var_map(), 0.9)
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        named_tensors(&self.twin)
            .into_iter()
            .map(|(n, t)| (format!("twin.{n}"), t))
            .collect()
    }

    fn load_buffers(&mut self, b: &HashMap<String, Tensor>) -> Result<()> {
        for (name, _) in named_tensors(&self.twin) {
            let t = b
                .get(&format!("twin.{name}"))
                .ok_or_else(|| Error::Config(format!("missing twin.{name}")))?;
            self.twin.set_one(&name, t)?;
        }
        Ok(())
    }
}

/// Batches that are a pure function of (seed, step): a seeded shuffle of a fixed set.
struct Blobs {
    seed: u64,
    x: Vec<[f32; 4]>,
    y: Vec<u32>,
    batch: usize,
}

impl Blobs {
    fn new(seed: u64) -> Self {
        let mut rng = stream_rng(123, "fixture", &[]);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..24 {
            let c = (i % 3) as u32;
            let mut v = [0f32; 4];
            for (j, e) in v.iter_mut().enumerate() {
                *e = rng.random_range(-0.5..0.5) + if j as u32 == c { 1.5 } else { 0.0 };
            }
            x.push(v);
            y.push(c);
        }
        Self { seed, x, y, batch: 4 }
    }
}

impl BatchSource for Blobs {
    type Batch = (Tensor, Tensor);

    fn steps_per_epoch(&self) -> u64 {
        (self.x.len() / self.batch) as u64
    }

    fn batch(&mut self, step: u64) -> Result<Self::Batch> {
        let spe = self.steps_per_epoch();
        let (epoch, i) = (step / spe, (step % spe) as usize);
        let order = pretext_core::seed::permutation(self.x.len(), &mut stream_rng(self.seed, "data-order", &[epoch]));
        let idx = &order[i * self.batch..(i + 1) * self.batch];
        let xs: Vec<f32> = idx.iter().flat_map(|&k| self.x[k]).collect();
        let ys: Vec<u32> = idx.iter().map(|&k| self.y[k]).collect();
        Ok((
            Tensor::from_vec(xs, (self.batch, 4), &Device::Cpu)?,
            Tensor::new(ys, &Device::Cpu)?,
        ))
    }
}

fn configs(max_steps: u64) -> (OptimConfig, ScheduleConfig, TrainConfig) {
    let optim = OptimConfig {
        name: OptimKind::AdamW,
        lr: 0.05,
        weight_decay: 0.01,
        ..Default::default()
    };
    let schedule = ScheduleConfig {
        warmup_steps: 2,
        ..Default::default()
    };
    let train = TrainConfig {
        max_steps,
        seed: 7,
        checkpoint_every: 0,
        keep_checkpoints: 2,
        ..Default::default()
    };
    (optim, schedule, train)
}

fn bits(ts: &[(String, Tensor)]) -> Result<Vec<(String, Vec<u32>)>> {
    ts.iter()
        .filter(|(n, _)| n != "step")
        .map(|(n, t)| {
            Ok((
                n.clone(),
                t.flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
            ))
        })
        .collect()
}

#[test]
fn four_steps_equal_two_then_resume_then_two_bit_for_bit() -> Result<()> {
    let (optim, schedule, train) = configs(4);
    // Uninterrupted.
    let mut a = Trainer::new(TinyMlp::new(7)?, &optim, &schedule, &train)?;
    let full = a.fit(&mut Blobs::new(7), &mut NullObserver)?;
    assert_eq!(full.losses.len(), 4);

    // Two steps, checkpoint on disk, then a fresh model/optimizer/data (as a new process would build).
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
    let run = RunDir::create(tmp.path().join("run"), "# test\n")?;
    let mut b = Trainer::new(TinyMlp::new(7)?, &optim, &schedule, &train)?;
    b.attach_run(&run)?;
    let first = b.fit_until(&mut Blobs::new(7), &mut NullObserver, 2)?;
    drop(b);
    let run = RunDir::open(run.root())?;
    let ckpt = run.checkpoints(2).load_latest(&Device::Cpu)?;
    assert_eq!(ckpt.trainer.step, 2);
    let mut c = Trainer::new(TinyMlp::new(999)?, &optim, &schedule, &train)?; // different init: resume must overwrite it
    c.resume(&ckpt, &run.checkpoints_dir().join("step-00000002"))?;
    c.attach_run(&run)?;
    let second = c.fit(&mut Blobs::new(7), &mut NullObserver)?;

    let resumed: Vec<u64> = first.losses.iter().chain(&second.losses).map(|l| l.to_bits()).collect();
    let uninterrupted: Vec<u64> = full.losses.iter().map(|l| l.to_bits()).collect();
    assert_eq!(resumed, uninterrupted, "losses differ");
    assert_eq!(bits(&a.model_tensors())?, bits(&c.model_tensors())?, "weights differ");
    assert_eq!(
        bits(&a.optimizer().state())?,
        bits(&c.optimizer().state())?,
        "optimizer moments differ"
    );
    assert_eq!(
        bits(&a.method.buffers())?,
        bits(&c.method.buffers())?,
        "EMA twin differs"
    );
    assert_eq!(c.optimizer().steps_taken(), 4);

    // The metrics log reads as one run of 4 steps.
    let recs = pretext_core::run::read_metrics(&run.metrics_path())?;
    let steps: Vec<u64> = recs.iter().filter_map(|r| r["step"].as_u64()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    let logged: Vec<u64> = recs
        .iter()
        .filter_map(|r| r["loss"].as_f64())
        .map(f64::to_bits)
        .collect();
    assert_eq!(logged, uninterrupted);

    // And the final checkpoint equals the uninterrupted trainer's state.
    let fin = load_checkpoint(&run.checkpoints_dir().join("step-00000004"), &Device::Cpu)?;
    assert_eq!(bits(&fin.model)?, bits(&a.model_tensors())?);
    Ok(())
}

#[test]
fn loss_falls_and_weights_change() -> Result<()> {
    let (optim, schedule, train) = configs(30);
    let mut t = Trainer::new(TinyMlp::new(1)?, &optim, &schedule, &train)?;
    let s = t.fit(&mut Blobs::new(1), &mut NullObserver)?;
    let head: f64 = s.losses[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = s.losses[25..].iter().sum::<f64>() / 5.0;
    assert!(tail < 0.5 * head, "loss did not fall: {head} -> {tail}");
    Ok(())
}

#[test]
fn nan_loss_stops_with_the_step_and_no_checkpoint() -> Result<()> {
    let (optim, schedule, mut train) = configs(6);
    train.checkpoint_every = 1;
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
    let run = RunDir::create(tmp.path().join("run"), "")?;
    let mut t = Trainer::new(TinyMlp::new(1)?, &optim, &schedule, &train)?;
    t.attach_run(&run)?;
    t.fit_until(&mut Blobs::new(1), &mut NullObserver, 2)?;
    t.method.scale_loss = f64::NAN;
    let err = t
        .fit(&mut Blobs::new(1), &mut NullObserver)
        .expect_err("NaN must stop training");
    assert!(matches!(err, Error::NonFinite { step: 2, .. }), "{err}");
    assert!(err.to_string().contains("step 2"), "{err}");
    // latest still names the last good step
    assert_eq!(run.checkpoints(0).load_latest(&Device::Cpu)?.trainer.step, 2);
    Ok(())
}

#[test]
fn infinite_gradients_are_caught() -> Result<()> {
    let (optim, schedule, train) = configs(3);
    let mut t = Trainer::new(TinyMlp::new(1)?, &optim, &schedule, &train)?;
    t.method.poison_grad = true; // finite loss, NaN gradient
    let err = t.fit(&mut Blobs::new(1), &mut NullObserver).expect_err("inf grads");
    assert!(matches!(err, Error::NonFinite { step: 0, .. }), "{err}");
    Ok(())
}

#[test]
fn gradient_clipping_bounds_the_update() -> Result<()> {
    // With SGD and no momentum, the update is lr * clipped gradient: its norm is at most lr * max_norm.
    let optim = OptimConfig {
        name: OptimKind::Sgd,
        lr: 1.0,
        momentum: 0.0,
        ..Default::default()
    };
    let schedule = ScheduleConfig {
        kind: pretext_core::ScheduleKind::Constant,
        ..Default::default()
    };
    let train = TrainConfig {
        max_steps: 1,
        clip_grad_norm: 0.01,
        ..Default::default()
    };
    let mut t = Trainer::new(TinyMlp::new(3)?, &optim, &schedule, &train)?;
    let before: Vec<(String, Tensor)> = t
        .model_tensors()
        .into_iter()
        .map(|(n, v)| Ok((n, v.copy()?)))
        .collect::<Result<_>>()?;
    t.fit(&mut Blobs::new(3), &mut NullObserver)?;
    let after = t.model_tensors();
    let mut sq = 0.0f64;
    for ((n, b), (_, a)) in before.iter().zip(&after) {
        if n.starts_with("fc") {
            sq += (a - b)?.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    let moved = sq.sqrt();
    assert!(moved > 0.0099 && moved < 0.0101, "update norm {moved}");
    Ok(())
}

#[test]
fn resume_rejects_a_checkpoint_of_another_model() -> Result<()> {
    let (optim, schedule, train) = configs(2);
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
    let run = RunDir::create(tmp.path().join("run"), "")?;
    let mut t = Trainer::new(TinyMlp::new(1)?, &optim, &schedule, &train)?;
    t.attach_run(&run)?;
    t.fit(&mut Blobs::new(1), &mut NullObserver)?;
    let mut ck = run.checkpoints(0).load_latest(&Device::Cpu)?;
    ck.model.retain(|(n, _)| n != "fc2.bias");
    ck.model
        .push(("head.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu)?));
    let mut fresh = Trainer::new(TinyMlp::new(1)?, &optim, &schedule, &train)?;
    let err = fresh.resume(&ck, tmp.path()).expect_err("keys differ");
    let msg = err.to_string();
    assert!(
        msg.contains("fc2.bias") && msg.contains("head.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
    Ok(())
}

/// Weights of `vars` as f64 vectors, by name.
fn values(vars: &VarMap) -> Result<Vec<(String, Vec<f64>)>> {
    named_tensors(vars)
        .into_iter()
        .map(|(n, t)| Ok((n, t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)))
        .collect()
}

#[test]
fn weight_average_is_the_published_model_and_follows_the_formula() -> Result<()> {
    let (optim, schedule, mut train) = configs(6);
    train.ema_decay = 0.5;
    let mut t = Trainer::new(TinyMlp::new(3)?, &optim, &schedule, &train)?;
    let mut blobs = Blobs::new(3);
    // The average by hand: a_0 = w_0, a_t = d_t a_{t-1} + (1 - d_t) w_t,
    // d_t = min(0.5, t / (9 + t)) for the update completing step t.
    let mut avg = values(t.method.vars())?;
    for step in 1..=6u64 {
        t.fit_until(&mut blobs, &mut NullObserver, step)?;
        let d = 0.5f64.min(step as f64 / (9.0 + step as f64));
        assert_eq!(d, train.ema_decay_at(step));
        for ((_, a), (_, w)) in avg.iter_mut().zip(values(t.method.vars())?) {
            for (ai, wi) in a.iter_mut().zip(w) {
                *ai = d * *ai + (1.0 - d) * wi;
            }
        }
    }
    let published: HashMap<String, Tensor> = t.model_tensors().into_iter().collect();
    let iterate = values(t.method.vars())?;
    let mut apart = 0.0f64;
    for ((name, a), (_, w)) in avg.iter().zip(&iterate) {
        let p = published[name].flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for ((pi, ai), wi) in p.iter().zip(a).zip(w) {
            assert!((pi - ai).abs() < 1e-5, "{name}: published {pi}, average by hand {ai}");
            apart = apart.max((pi - wi).abs());
        }
    }
    assert!(
        apart > 1e-3,
        "the published weights equal the iterate: nothing was averaged"
    );
    // Model buffers are published as they are.
    assert!(published.contains_key("input.running_mean"));

    // Evaluation in the middle of training sees the average, and the
    // iterate comes back bit for bit afterwards.
    let before = bits(&named_tensors(t.method.vars()))?;
    let seen = t.with_published_weights(|m| values(m.vars()))?;
    for ((name, s), (_, a)) in seen.iter().zip(&avg) {
        for (si, ai) in s.iter().zip(a) {
            assert!(
                (si - ai).abs() < 1e-5,
                "{name}: the closure saw {si}, the average is {ai}"
            );
        }
    }
    assert_eq!(bits(&named_tensors(t.method.vars()))?, before);
    Ok(())
}

#[test]
fn weight_average_resumes_bit_for_bit() -> Result<()> {
    let (optim, schedule, mut train) = configs(4);
    train.ema_decay = 0.9;
    let mut a = Trainer::new(TinyMlp::new(5)?, &optim, &schedule, &train)?;
    let full = a.fit(&mut Blobs::new(5), &mut NullObserver)?;

    let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
    let run = RunDir::create(tmp.path().join("run"), "")?;
    let mut b = Trainer::new(TinyMlp::new(5)?, &optim, &schedule, &train)?;
    b.attach_run(&run)?;
    b.fit_until(&mut Blobs::new(5), &mut NullObserver, 2)?;
    drop(b);
    let dir = run.checkpoints_dir().join("step-00000002");
    let ckpt = load_checkpoint(&dir, &Device::Cpu)?;
    assert!(
        ckpt.state.iter().any(|(n, _)| n == "trainer.iterate.fc1.weight"),
        "the iterate is not in state.safetensors"
    );
    assert!(ckpt.metadata.get("pretext.weights").is_some_and(|m| m.contains("0.9")));
    let mut c = Trainer::new(TinyMlp::new(77)?, &optim, &schedule, &train)?;
    c.resume(&ckpt, &dir)?;
    let second = c.fit(&mut Blobs::new(5), &mut NullObserver)?;
    assert_eq!(
        full.losses[2..].iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        second.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        "the resumed run trained on other weights"
    );
    assert_eq!(bits(&a.model_tensors())?, bits(&c.model_tensors())?, "averages differ");
    assert_eq!(
        bits(&named_tensors(a.method.vars()))?,
        bits(&named_tensors(c.method.vars()))?,
        "iterates differ"
    );

    // A damaged iterate is named with the file it came from.
    let mut bad = ckpt.clone();
    bad.state.retain(|(n, _)| n != "trainer.iterate.fc2.bias");
    let mut d = Trainer::new(TinyMlp::new(5)?, &optim, &schedule, &train)?;
    let msg = d.resume(&bad, &dir).expect_err("iterate incomplete").to_string();
    assert!(msg.contains("fc2.bias") && msg.contains("state.safetensors"), "{msg}");
    Ok(())
}

#[test]
fn weight_average_decay_must_lie_below_one() {
    let (optim, schedule, mut train) = configs(2);
    for bad in [1.0, -0.1, f64::NAN] {
        train.ema_decay = bad;
        let err = Trainer::new(TinyMlp::new(1).expect("model"), &optim, &schedule, &train)
            .err()
            .expect("rejected");
        assert!(err.to_string().contains("train.ema_decay"), "{err}");
    }
}

/// An epoch-end monitor that records a figure of the weights, and can fail
/// at one step as a process killed during that evaluation would stop.
struct WeightMonitor {
    fail_at: Option<u64>,
}

impl pretext_core::trainer::Monitor<TinyMlp> for WeightMonitor {
    type Error = Error;

    fn due(&self, step: u64, steps_per_epoch: u64) -> bool {
        step.is_multiple_of(steps_per_epoch)
    }

    fn evaluate(
        &mut self,
        model: &TinyMlp,
        step: u64,
        _spe: u64,
        _observer: &mut dyn pretext_core::trainer::Observer,
    ) -> Result<Vec<serde_json::Value>> {
        if self.fail_at == Some(step) {
            return Err(Error::Config(format!("killed during the evaluation of step {step}")));
        }
        let mut sum = 0f64;
        for (_, t) in pretext_core::trainer::model_tensors(model) {
            sum += f64::from(t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?);
        }
        Ok(vec![
            serde_json::json!({ "event": "weights", "step": step, "sum": sum }),
        ])
    }
}

fn records_without_timing(run: &RunDir) -> Result<Vec<serde_json::Value>> {
    let mut recs = pretext_core::run::read_metrics(&run.metrics_path())?;
    for r in &mut recs {
        if let Some(o) = r.as_object_mut() {
            o.remove("elapsed_s");
        }
    }
    Ok(recs)
}

#[test]
fn a_run_killed_during_an_epoch_end_evaluation_resumes_to_the_same_log() -> Result<()> {
    let (optim, schedule, mut train) = configs(12);
    train.checkpoint_every = 4;
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
    let whole = RunDir::create(tmp.path().join("whole"), "# test\n")?;
    let mut a = Trainer::new(TinyMlp::new(7)?, &optim, &schedule, &train)?;
    a.attach_run(&whole)?;
    a.train(
        &mut Blobs::new(7),
        &mut WeightMonitor { fail_at: None },
        &mut NullObserver,
    )?;
    let expected = records_without_timing(&whole)?;
    let evals: Vec<u64> = expected
        .iter()
        .filter(|r| r["event"] == "weights")
        .filter_map(|r| r["step"].as_u64())
        .collect();
    assert_eq!(evals, [6, 12], "one evaluation per epoch end");
    assert_eq!(expected.len(), 14, "12 step records and 2 evaluations: {expected:?}");

    // killed inside the evaluation of an epoch end (6) and of the last step (12):
    // the step records are written, the evaluation is not, and no checkpoint
    // of that step exists, so resume goes back to 4 resp. 8
    for (kill, back_to) in [(6, 4), (12, 8)] {
        let run = RunDir::create(tmp.path().join(format!("killed-{kill}")), "# test\n")?;
        let mut b = Trainer::new(TinyMlp::new(7)?, &optim, &schedule, &train)?;
        b.attach_run(&run)?;
        let err = b
            .train(
                &mut Blobs::new(7),
                &mut WeightMonitor { fail_at: Some(kill) },
                &mut NullObserver,
            )
            .err();
        assert!(err.is_some(), "the evaluation at {kill} should have failed");
        drop(b);
        let logged = records_without_timing(&run)?;
        assert!(
            logged.iter().any(|r| r["step"] == kill && r.get("event").is_none()),
            "the step {kill} record was written before the kill"
        );
        let (path, ckpt) = run.checkpoints(2).load_latest_with_path(&Device::Cpu)?;
        assert_eq!(
            ckpt.trainer.step, back_to,
            "no checkpoint of a step whose evaluation did not finish"
        );
        let mut c = Trainer::new(TinyMlp::new(999)?, &optim, &schedule, &train)?;
        c.resume(&ckpt, &path)?;
        c.attach_run(&run)?;
        c.train(
            &mut Blobs::new(7),
            &mut WeightMonitor { fail_at: None },
            &mut NullObserver,
        )?;
        assert_eq!(
            records_without_timing(&run)?,
            expected,
            "killed at the evaluation of {kill}"
        );
        assert_eq!(bits(&a.model_tensors())?, bits(&c.model_tensors())?, "weights differ");
    }
    Ok(())
}
