//! The methods as trainable wholes: MoCo's key queue and momentum encoder,
//! BYOL's target network, and 20 steps on a tiny fixture whose loss falls,
//! for every method.

use candle_core::{Device, Tensor};
use pretext_contrastive::{
    Byol, ContrastiveModel, Dino, DinoConfig, EncoderConfig, MethodKind, MoCo, ModelConfig, MomentumQueue,
};
use pretext_core::dist::{Fitted, LocalGroup};
use pretext_core::init::named_vars;
use pretext_core::trainer::{LossLog, Method, StepCx};
use pretext_core::{OptimConfig, ScheduleConfig, TrainConfig, Trainer};
use pretext_data::ImageBatch;
use pretext_data::{AugmentConfig, BatcherConfig, ImageBatcher, ImageDataset, Pipeline};
use std::sync::Arc;

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().expect("rows")
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values")
}

#[test]
fn queue_wraps_around_at_capacity() {
    let dev = Device::Cpu;
    let mut q = MomentumQueue::new(5, 2, 0, &dev).expect("queue");
    assert_eq!((q.capacity(), q.ptr()), (5, 0));
    // starts as unit vectors
    for r in rows(q.keys()) {
        assert!((r[0] * r[0] + r[1] * r[1] - 1.0).abs() < 1e-5);
    }
    let a = Tensor::new(&[[1f32, 0.], [2., 0.], [3., 0.]], &dev).expect("a");
    q.push(&a).expect("push");
    assert_eq!(q.ptr(), 3);
    let b = Tensor::new(&[[0f32, 4.], [0., 5.], [0., 6.]], &dev).expect("b");
    q.push(&b).expect("push");
    // rows 3, 4 take the first two of b; the third wraps to row 0, replacing the oldest
    assert_eq!(q.ptr(), 1);
    assert_eq!(
        rows(q.keys()),
        vec![vec![0., 6.], vec![2., 0.], vec![3., 0.], vec![0., 4.], vec![0., 5.]]
    );
    // exactly one lap returns the pointer where it was
    let c = Tensor::zeros((5, 2), candle_core::DType::F32, &dev).expect("c");
    q.push(&c).expect("push");
    assert_eq!(q.ptr(), 1);
    // more keys than the queue holds, or the wrong width, is an error
    assert!(q
        .push(&Tensor::zeros((6, 2), candle_core::DType::F32, &dev).expect("t"))
        .is_err());
    assert!(q
        .push(&Tensor::zeros((1, 3), candle_core::DType::F32, &dev).expect("t"))
        .is_err());
    assert!(MomentumQueue::from_parts(q.keys().clone(), 5).is_err());
}

fn tiny_cfg() -> ModelConfig {
    let mut cfg = ModelConfig {
        encoder: EncoderConfig {
            widths: vec![4, 8],
            strides: vec![1, 2],
            ..EncoderConfig::default()
        },
        ..ModelConfig::default()
    };
    cfg.head.hidden = 8;
    cfg.head.output = 4;
    cfg.moco.queue_size = 32;
    cfg.moco.bn_groups = 2;
    cfg
}

#[test]
fn key_encoder_follows_the_query_encoder_by_ema() {
    let dev = Device::Cpu;
    let mut cfg = tiny_cfg();
    cfg.moco.momentum = 0.9;
    let mut moco = MoCo::new(&cfg, 1, &dev).expect("moco");
    let query = named_vars(moco.vars());
    let key = named_vars(moco.key_params());
    assert_eq!(query.len(), key.len());
    // the key networks start as exact copies
    for ((nq, q), (nk, k)) in query.iter().zip(&key) {
        assert_eq!(nq, nk);
        assert_eq!(flat(q.as_tensor()), flat(k.as_tensor()));
    }
    // move the query weights, then one update: key = 0.9 key + 0.1 query
    let before: Vec<Vec<f32>> = key.iter().map(|(_, k)| flat(k.as_tensor())).collect();
    for (_, q) in &query {
        q.set(&(q.as_tensor() + 1.0).expect("add")).expect("set");
    }
    let cx = StepCx {
        step: 0,
        epoch: 0,
        total_steps: 10,
        seed: 1,
        lr: 0.0,
        shard: Default::default(),
    };
    moco.after_update(&cx).expect("update");
    for (((name, k), (_, q)), old) in key.iter().zip(&query).zip(&before) {
        for ((kv, qv), ov) in flat(k.as_tensor()).iter().zip(&flat(q.as_tensor())).zip(old) {
            let want = 0.9 * ov + 0.1 * qv;
            assert!((kv - want).abs() < 1e-5, "{name}: {kv} vs {want}");
        }
    }
    // the cosine schedule reaches momentum 1 at the end: the key stops moving
    cfg.moco.momentum_cosine = true;
    let mut moco = MoCo::new(&cfg, 1, &dev).expect("moco");
    let key = named_vars(moco.key_params());
    let before: Vec<Vec<f32>> = key.iter().map(|(_, k)| flat(k.as_tensor())).collect();
    for (_, q) in named_vars(moco.vars()) {
        q.set(&(q.as_tensor() + 1.0).expect("add")).expect("set");
    }
    moco.after_update(&StepCx { step: 10, ..cx }).expect("update");
    for ((_, k), old) in key.iter().zip(&before) {
        assert_eq!(&flat(k.as_tensor()), old);
    }
}

#[test]
fn byol_target_follows_the_online_network_by_the_cosine_ema() {
    let dev = Device::Cpu;
    let mut cfg = tiny_cfg();
    cfg.byol.momentum = 0.9;
    cfg.byol.predictor_hidden = 6;
    let mut byol = Byol::new(&cfg, 1, &dev).expect("byol");
    let online = named_vars(byol.vars());
    let target = named_vars(byol.target_params());
    // the target is the online encoder and projector, without the predictor, equal at the start
    let followed: Vec<_> = online.iter().filter(|(n, _)| !n.starts_with("predictor.")).collect();
    assert!(online.iter().any(|(n, _)| n == "predictor.net.0.weight"));
    assert_eq!(followed.len(), target.len());
    for ((no, o), (nt, t)) in followed.iter().zip(&target) {
        assert_eq!(no, nt);
        assert_eq!(flat(o.as_tensor()), flat(t.as_tensor()));
    }
    let before: Vec<Vec<f32>> = target.iter().map(|(_, t)| flat(t.as_tensor())).collect();
    for (_, o) in &online {
        o.set(&o.as_tensor().affine(1.5, 0.25).expect("move")).expect("set");
    }
    // step 3 of 10: τ = 1 − (1 − 0.9)(cos(0.3π) + 1)/2
    let tau = 1.0 - 0.1 * ((0.3 * std::f64::consts::PI).cos() + 1.0) / 2.0;
    let cx = StepCx {
        step: 3,
        epoch: 0,
        total_steps: 10,
        seed: 1,
        lr: 0.0,
        shard: Default::default(),
    };
    byol.after_update(&cx).expect("update");
    for (((name, t), (_, o)), old) in target.iter().zip(&followed).zip(&before) {
        for ((tv, ov), prev) in flat(t.as_tensor()).iter().zip(&flat(o.as_tensor())).zip(old) {
            let want = (tau * f64::from(*prev) + (1.0 - tau) * f64::from(*ov)) as f32;
            assert!((tv - want).abs() < 1e-5, "{name}: {tv} vs {want}");
        }
    }
    // a constant τ without the cosine
    cfg.byol.momentum_cosine = false;
    let byol = Byol::new(&cfg, 1, &dev).expect("byol");
    assert!((cfg.byol.momentum_at(3, 10) - 0.9).abs() < 1e-15);
    assert!(named_vars(byol.target_params()).len() == target.len());
}

/// 64 8×8 grayscale images of four shapes with noise.
fn fixture() -> ImageDataset {
    let mut pixels = Vec::new();
    let mut state = 12345u64;
    for i in 0..64 {
        let c = i % 4;
        for y in 0..8 {
            for x in 0..8 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let on = match c {
                    0 => x < 4,
                    1 => y < 4,
                    2 => (x + y) % 2 == 0,
                    _ => (2..6).contains(&x) && (2..6).contains(&y),
                };
                pixels.push(if on { 180 } else { 40 } + (state >> 61) as u8 * 8);
            }
        }
    }
    ImageDataset {
        height: 8,
        width: 8,
        channels: 1,
        pixels,
        labels: Some((0..64).map(|i| (i % 4) as u32).collect()),
        classes: vec![],
        ids: None,
    }
}

fn losses_with(method: MethodKind, cfg: &ModelConfig, steps: u64) -> Vec<f64> {
    let dev = Device::Cpu;
    let model = ContrastiveModel::new(method, cfg, 0, &dev).expect("model");
    let train = TrainConfig {
        max_steps: steps,
        batch_size: 16,
        seed: 0,
        ..TrainConfig::default()
    };
    let optim = OptimConfig {
        lr: 3e-3,
        ..OptimConfig::default()
    };
    let mut trainer = Trainer::new(model, &optim, &ScheduleConfig::default(), &train).expect("trainer");
    let augment = AugmentConfig {
        crop: true,
        crop_scale: (0.6, 1.0),
        flip_p: 0.5,
        ..AugmentConfig::none(vec![0.4], vec![0.3])
    };
    let pipeline = Arc::new(Pipeline::new(augment, 8, 8).expect("pipeline"));
    let mut batcher = ImageBatcher::new(
        Arc::new(fixture()),
        pipeline,
        BatcherConfig {
            batch_size: 16,
            views: 2,
            seed: 0,
            shuffle: true,
            drop_last: true,
            prefetch: 0,
        },
        &dev,
    )
    .expect("batcher");
    let mut obs = LossLog::default();
    trainer.fit(&mut batcher, &mut obs).expect("fit");
    obs.0
}

/// Mean of steps `from..from+4` against the last four.
fn assert_falls(name: &str, l: &[f64], from: usize) {
    assert_eq!(l.len(), 20);
    assert!(l.iter().all(|v| v.is_finite()), "{name}: {l:?}");
    let head = l[from..from + 4].iter().sum::<f64>() / 4.0;
    let tail = l[16..].iter().sum::<f64>() / 4.0;
    assert!(
        tail < head - 0.05,
        "{name}: loss did not fall: first {head:.4}, last {tail:.4}: {l:?}"
    );
}

#[test]
fn simclr_loss_falls_in_20_steps() {
    assert_falls("simclr", &losses_with(MethodKind::SimClr, &tiny_cfg(), 20), 0);
}

#[test]
fn moco_loss_falls_in_20_steps() {
    // The queue starts as random unit vectors, easy negatives: the loss first
    // rises while real keys fill it (2 steps of 16 keys for a queue of 32), so
    // the comparison starts once the queue holds only keys. A faster-moving
    // key encoder (momentum 0.9) suits 20 steps.
    let mut cfg = tiny_cfg();
    cfg.moco.momentum = 0.9;
    assert_falls("moco", &losses_with(MethodKind::MoCo, &cfg, 20), 2);
}

#[test]
fn byol_loss_falls_in_20_steps() {
    let mut cfg = tiny_cfg();
    cfg.byol.predictor_hidden = 8;
    assert_falls("byol", &losses_with(MethodKind::Byol, &cfg, 20), 0);
}

#[test]
fn simsiam_loss_falls_in_20_steps() {
    let mut cfg = tiny_cfg();
    cfg.simsiam.predictor_hidden = 4;
    assert_falls("simsiam", &losses_with(MethodKind::SimSiam, &cfg, 20), 0);
}

#[test]
fn barlow_twins_loss_falls_in_20_steps() {
    assert_falls(
        "barlow_twins",
        &losses_with(MethodKind::BarlowTwins, &tiny_cfg(), 20),
        0,
    );
}

#[test]
fn vicreg_loss_falls_in_20_steps() {
    assert_falls("vicreg", &losses_with(MethodKind::VicReg, &tiny_cfg(), 20), 0);
}

fn random_views(n: usize, sizes: &[usize], seed: u64) -> Vec<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    sizes
        .iter()
        .map(|&s| {
            let v: Vec<f32> = (0..n * s * s).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            Tensor::from_vec(v, (n, 1, s, s), &Device::Cpu).expect("view")
        })
        .collect()
}

fn dino_cfg() -> ModelConfig {
    let mut cfg = tiny_cfg();
    cfg.dino = DinoConfig {
        hidden: 8,
        bottleneck: 4,
        prototypes: 6,
        local_crops: 2,
        local_size: 8,
        momentum: 0.9,
        ..DinoConfig::default()
    };
    cfg
}

#[test]
fn dino_centre_and_teacher_follow_their_ema_formulas() {
    let cfg = dino_cfg();
    let mut dino = Dino::new(&cfg, 2, &Device::Cpu).expect("dino");
    let batch = ImageBatch {
        views: random_views(5, &[12, 12, 8, 8], 4),
        labels: None,
        indices: vec![],
    };
    let cx = StepCx {
        step: 3,
        epoch: 0,
        total_steps: 10,
        seed: 2,
        lr: 0.0,
        shard: Default::default(),
    };
    let mut expected = vec![0f32; 6];
    for round in 0..2 {
        // the teacher's outputs of the two global views, before the update
        let tt = cfg.dino.teacher_temperature_at(cx.step, cx.total_steps);
        let (_, t) = dino.loss(&batch.views, tt).expect("loss");
        assert_eq!(t.dims(), [10, 6]);
        let mean: Vec<f32> = t.mean(0).and_then(|m| m.to_vec1::<f32>()).expect("mean");
        let student = named_vars(dino.vars());
        let teacher = named_vars(dino.teacher_params());
        assert_eq!(student.len(), teacher.len());
        let before: Vec<Vec<f32>> = teacher.iter().map(|(_, v)| flat(v.as_tensor())).collect();
        // move the student, as an optimizer step would
        for (_, v) in &student {
            v.set(&v.as_tensor().affine(1.2, -0.1).expect("move")).expect("set");
        }
        dino.step(&batch, &cx).expect("step");
        dino.after_update(&cx).expect("update");
        // c ← 0.9 c + 0.1 mean(t)
        for (e, m) in expected.iter_mut().zip(&mean) {
            *e = 0.9 * *e + 0.1 * m;
        }
        let got = flat(dino.center());
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-6, "round {round}: centre {got:?} vs {expected:?}");
        }
        // teacher ← τ teacher + (1 − τ) student, τ on the cosine from 0.9
        let tau = pretext_core::ema::cosine_momentum(3, 10, 0.9);
        for (((name, t), (_, s)), old) in teacher.iter().zip(&student).zip(&before) {
            for ((tv, sv), prev) in flat(t.as_tensor()).iter().zip(&flat(s.as_tensor())).zip(old) {
                let want = (tau * f64::from(*prev) + (1.0 - tau) * f64::from(*sv)) as f32;
                assert!((tv - want).abs() < 1e-5, "{name}: {tv} vs {want}");
            }
        }
    }
    // the wrong number of views is an error naming the setting
    let two = ImageBatch {
        views: random_views(5, &[12, 12], 4),
        labels: None,
        indices: vec![],
    };
    let err = dino.step(&two, &cx).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("local_crops"), "{err}");
}

#[test]
fn dino_teacher_temperature_warms_up_linearly() {
    let d = DinoConfig {
        teacher_temperature_start: 0.04,
        teacher_temperature: 0.07,
        teacher_warmup: 0.3,
        ..DinoConfig::default()
    };
    assert!((d.teacher_temperature_at(0, 100) - 0.04).abs() < 1e-12);
    assert!((d.teacher_temperature_at(15, 100) - 0.055).abs() < 1e-12);
    assert!((d.teacher_temperature_at(30, 100) - 0.07).abs() < 1e-12);
    assert!((d.teacher_temperature_at(99, 100) - 0.07).abs() < 1e-12);
    let none = DinoConfig {
        teacher_warmup: 0.0,
        ..d
    };
    assert!((none.teacher_temperature_at(0, 100) - 0.07).abs() < 1e-12);
}

/// Trains `method` for `steps` steps of batch 16 on `ranks` threads as
/// data-parallel ranks (one trainer each, its shard of every batch); what
/// rank 0 ended with (every rank ends the same, or this fails).
fn data_parallel(method: MethodKind, ranks: usize, steps: u64) -> Result<Fitted, String> {
    let dev = Device::Cpu;
    let mut cfg = tiny_cfg();
    cfg.moco.bn_groups = 4;
    cfg.dino.local_crops = 2;
    let fitted = LocalGroup::fit(ranks, || {
        let model = ContrastiveModel::new(method, &cfg, 0, &dev)?;
        let train = TrainConfig {
            max_steps: steps,
            batch_size: 16,
            seed: 0,
            ..TrainConfig::default()
        };
        // SGD: its update is proportional to the gradient, so the weights
        // compare the gradients (Adam's normalisation would blow rounding
        // noise in near-zero gradients up to full steps).
        let optim = OptimConfig {
            name: pretext_core::OptimKind::Sgd,
            lr: 0.01,
            momentum: 0.9,
            ..OptimConfig::default()
        };
        let trainer = Trainer::new(model, &optim, &ScheduleConfig::default(), &train)?;
        let pipeline = Arc::new(Pipeline::new(AugmentConfig::fashion_mnist(), 8, 8)?);
        let bc = BatcherConfig::training(16, 2, 0, 1);
        let mut batcher = ImageBatcher::new(Arc::new(fixture()), pipeline, bc, &dev)?;
        if method == MethodKind::Dino {
            // multi-crop: the local views are sharded with the global ones
            let local = Arc::new(Pipeline::new(AugmentConfig::fashion_mnist(), 4, 4)?);
            batcher = batcher.with_local_views(local, cfg.dino.local_crops)?;
        }
        Ok((trainer, batcher))
    });
    fitted.map_err(|e| e.to_string())
}

#[test]
fn data_parallel_ranks_train_as_one_process_does() {
    // (method, steps, loss tolerance, weight tolerance), relative. Barlow
    // Twins and VICReg divide by per-dimension statistics of 16 rows (and
    // VICReg has a hinge on them), which magnify the rounding of sums taken
    // in another order as the tiny run goes on (VICReg's second gradient
    // already moves weights by 4e-4 apart while its loss agrees to 2e-7):
    // they are compared over fewer steps, with a looser bound. MoCo's
    // weights drift furthest of the rest (its InfoNCE rows run over the
    // queue, and the ranks' key encoders see shuffled batch-norm groups):
    // 9.1e-6 apart after 4 steps with the softmax summed sequentially,
    // 1.4e-5 with the same sums taken over 16 lanes — rounding either way,
    // where a wrong gradient sum or a missed collective is off by 1e-3 and more.
    for (method, steps, loss_tol, weight_tol) in [
        (MethodKind::SimClr, 4, 2e-5, 1e-5),
        (MethodKind::MoCo, 4, 2e-5, 3e-5),
        (MethodKind::Byol, 4, 2e-5, 1e-5),
        (MethodKind::SimSiam, 4, 2e-5, 1e-5),
        (MethodKind::BarlowTwins, 2, 1e-4, 1e-4),
        (MethodKind::VicReg, 1, 1e-4, 1e-5),
        (MethodKind::Dino, 4, 2e-5, 1e-5),
    ] {
        let one = data_parallel(method, 1, steps).expect("one process");
        let (l1, w1) = (&one.losses, &one);
        for ranks in [2, 4] {
            let wn = data_parallel(method, ranks, steps).expect("ranks");
            let ln = &wn.losses;
            for (a, b) in l1.iter().zip(ln) {
                assert!(
                    (a - b).abs() <= loss_tol * a.abs().max(1.0),
                    "{method:?} on {ranks} ranks: losses {ln:?} vs {l1:?}"
                );
            }
            // The weights, then the method's state (MoCo's queue and key
            // networks, BYOL's and DINO's teachers). BN statistics and
            // gradients summed in another order: rounding only.
            let worst = w1.gap(&wn);

            eprintln!("{method:?} on {ranks} ranks: weights within {worst:.2e}");

            assert!(
                worst < weight_tol,
                "{method:?} on {ranks} ranks: weights differ by {worst}"
            );
            assert_eq!(ln.len(), steps as usize);
        }
    }
}

#[test]
fn moco_refuses_batch_norm_groups_that_do_not_split_across_the_processes() {
    let err = data_parallel(MethodKind::MoCo, 3, 2).expect_err("refused");
    assert!(
        err.contains("data-parallel training on 3 processes")
            && err.contains("model.moco.bn_groups = 4 must be a multiple of the 3 processes"),
        "{err}"
    );
}

#[test]
fn gathered_nt_xent_gives_each_rank_the_gradient_of_its_rows_of_the_whole_batch() {
    use candle_core::Var;
    let (n, d, ranks) = (8, 5, 2);
    let vals = |seed: u64| -> Vec<f32> {
        let mut rng = pretext_core::seed::stream_rng(seed, "nt-xent-test", &[]);
        (0..n * d)
            .map(|_| pretext_core::init::standard_normal(&mut rng) as f32)
            .collect()
    };
    let (a, b) = (vals(1), vals(2));
    let dev = Device::Cpu;
    // One process: NT-Xent of the concatenated batch.
    let z1 = Var::from_vec(a.clone(), (n, d), &dev).expect("z1");
    let z2 = Var::from_vec(b.clone(), (n, d), &dev).expect("z2");
    let loss = pretext_contrastive::nt_xent(z1.as_tensor(), z2.as_tensor(), 0.2).expect("loss");
    let g = loss.backward().expect("backward");
    let (g1, g2) = (
        flat(g.get(z1.as_tensor()).expect("g1")),
        flat(g.get(z2.as_tensor()).expect("g2")),
    );
    let per = n / ranks;
    let out = pretext_core::dist::LocalGroup::run(ranks, |w| {
        let r = w.rank();
        let span = r * per * d..(r + 1) * per * d;
        let y1 = Var::from_vec(a[span.clone()].to_vec(), (per, d), &dev).expect("y1");
        let y2 = Var::from_vec(b[span].to_vec(), (per, d), &dev).expect("y2");
        pretext_core::dist::step_scope(&w, || {
            let all1 = pretext_core::dist::gather_rows(y1.as_tensor()).expect("gather");
            let all2 = pretext_core::dist::gather_rows(y2.as_tensor()).expect("gather");
            let l = pretext_contrastive::nt_xent(&all1, &all2, 0.2).expect("loss");
            let g = l.backward().expect("backward");
            (
                l.to_scalar::<f32>().expect("loss"),
                flat(g.get(y1.as_tensor()).expect("g1")),
                flat(g.get(y2.as_tensor()).expect("g2")),
            )
        })
    });
    let l = loss.to_scalar::<f32>().expect("loss");
    for (r, (lr, d1, d2)) in out.into_iter().enumerate() {
        assert!((lr - l).abs() < 1e-6, "rank {r}: loss {lr} vs {l}");
        let span = r * per * d..(r + 1) * per * d;
        // Summed over the ranks' losses, each the whole batch's: N times the
        // single-process gradient (the trainer's average divides it out).
        for (got, want) in d1.iter().zip(&g1[span.clone()]).chain(d2.iter().zip(&g2[span])) {
            assert!(
                (got - ranks as f32 * want).abs() < 1e-6,
                "rank {r}: {got} vs {ranks}·{want}"
            );
        }
    }
}
