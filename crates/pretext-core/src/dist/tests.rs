use super::*;
use crate::ops::{batch_norm, NormStats};
use candle_core::{Device, Var, D};

fn close(a: &[f32], b: &[f32], tol: f32) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("lengths {} and {}", a.len(), b.len()));
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if (x - y).abs() > tol * (1.0 + y.abs()) {
            return Err(format!("element {i}: {x} vs {y}"));
        }
    }
    Ok(())
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = crate::seed::stream_rng(seed, "dist-test", &[]);
    (0..n).map(|_| crate::init::standard_normal(&mut rng) as f32).collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values")
}

#[test]
fn thread_ranks_reduce_gather_and_broadcast() {
    let out = LocalGroup::run(3, |w| {
        let r = w.rank() as f32;
        let mut sum = vec![r, 10.0 * r, 1.0];
        w.all_reduce_f32(&mut sum);
        let mut sum64 = vec![f64::from(r) + 0.5];
        w.all_reduce_f64(&mut sum64);
        let gathered = w.all_gather_f32(&[r, r + 0.25]);
        let mut b = vec![r; 2];
        w.broadcast_f32(&mut b, 2);
        w.barrier();
        (sum, sum64, gathered, b, w.bytes_sent())
    });
    for (sum, sum64, gathered, b, bytes) in out {
        assert_eq!(sum, vec![3.0, 30.0, 3.0]);
        assert_eq!(sum64, vec![4.5]);
        assert_eq!(gathered, vec![0.0, 0.25, 1.0, 1.25, 2.0, 2.25]);
        assert_eq!(b, vec![2.0, 2.0]);
        assert!(bytes >= 12 + 8 + 8, "bytes counted: {bytes}");
    }
}

#[test]
fn one_process_needs_no_collective() {
    let w = World::single();
    let mut v = vec![1.0f32, 2.0];
    w.all_reduce_f32(&mut v);
    assert_eq!(v, vec![1.0, 2.0]);
    assert_eq!(w.all_gather_f32(&[3.0]), vec![3.0]);
    assert_eq!(w.bytes_sent(), 0);
    step_scope(&w, || assert!(step_collective().is_none()));
    let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).expect("x");
    assert_eq!(flat(&gather_rows(&x).expect("gather")), vec![1.0, 2.0]);
}

/// A loss of the whole batch: `Σ softmax(G·Gᵀ) ⊙ W`, nonlinear in every row.
fn batch_loss(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let s = g.matmul(&g.t()?)?;
    let p = candle_nn::ops::softmax(&s, D::Minus1)?;
    (p * w)?.sum_all()
}

#[test]
fn gathered_rows_give_each_rank_the_gradient_of_its_rows() {
    let (n, d, ranks) = (6, 4, 3);
    let all = values(n * d, 1);
    let wts = Tensor::from_vec(values(n * n, 2), (n, n), &Device::Cpu).expect("w");
    // One process: the loss of the whole batch and its gradient.
    let x = Var::from_vec(all.clone(), (n, d), &Device::Cpu).expect("x");
    let loss = batch_loss(x.as_tensor(), &wts).expect("loss");
    let single = loss.backward().expect("backward");
    let dx = flat(single.get(x.as_tensor()).expect("grad"));
    let per = n / ranks;
    let out = LocalGroup::run(ranks, |w| {
        let r = w.rank();
        let mine = Var::from_vec(all[r * per * d..(r + 1) * per * d].to_vec(), (per, d), &Device::Cpu).expect("x");
        step_scope(&w, || {
            let g = gather_rows(mine.as_tensor()).expect("gather");
            let loss = batch_loss(&g, &wts).expect("loss");
            let grads = loss.backward().expect("backward");
            (
                flat(&g),
                loss.to_scalar::<f32>().expect("loss"),
                flat(grads.get(mine.as_tensor()).expect("grad")),
            )
        })
    });
    let l = loss.to_scalar::<f32>().expect("loss");
    for (r, (g, lr, dxr)) in out.into_iter().enumerate() {
        assert_eq!(g, all, "rank {r} gathers every row in rank order");
        close(&[lr], &[l], 1e-6).expect("every rank computes the batch loss");
        // Every rank computed the whole loss, so its rows get the sum of the
        // ranks' gradients: N times the single-process gradient.
        let want: Vec<f32> = dx[r * per * d..(r + 1) * per * d]
            .iter()
            .map(|v| v * ranks as f32)
            .collect();
        close(&dxr, &want, 1e-5).unwrap_or_else(|e| panic!("rank {r}: {e}"));
    }
}

#[test]
fn synchronised_batch_norm_is_batch_norm_of_the_whole_batch() {
    for relu in [false, true] {
        let (n, c, ranks) = (8, 3, 2);
        let all: Vec<f32> = values(n * c, 3).iter().map(|v| v * 2.0 + 1.0).collect();
        let wts = values(n * c, 4);
        let gamma_v = vec![1.5f32, 0.5, -1.0];
        let beta_v = vec![0.1f32, -0.2, 0.3];
        let run = |x: &[f32], w: &[f32], rows: usize| {
            let dev = Device::Cpu;
            let x = Var::from_vec(x.to_vec(), (rows, c), &dev).expect("x");
            let gamma = Var::from_vec(gamma_v.clone(), c, &dev).expect("g");
            let beta = Var::from_vec(beta_v.clone(), c, &dev).expect("b");
            let (y, stats) = batch_norm(
                x.as_tensor(),
                gamma.as_tensor(),
                beta.as_tensor(),
                NormStats::Batch,
                1e-5,
                relu,
            )
            .expect("bn");
            let w = Tensor::from_vec(w.to_vec(), (rows, c), &dev).expect("w");
            let grads = (y.clone() * w)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            let g = |v: &Var| flat(grads.get(v.as_tensor()).expect("grad"));
            (
                flat(&y),
                g(&x),
                g(&gamma),
                g(&beta),
                stats.expect("stats"),
                norm_rows(rows),
            )
        };
        let (y, dx, dg, db, (mean, var), count) = run(&all, &wts, n);
        assert_eq!(count, n);
        let per = n / ranks;
        let out = LocalGroup::run(ranks, |w| {
            let r = w.rank();
            let span = r * per * c..(r + 1) * per * c;
            step_scope(&w, || run(&all[span.clone()], &wts[span], per))
        });
        let (mut sg, mut sb) = (vec![0f32; c], vec![0f32; c]);
        for (r, (yr, dxr, dgr, dbr, (mr, vr), count)) in out.into_iter().enumerate() {
            let span = r * per * c..(r + 1) * per * c;
            close(&yr, &y[span.clone()], 1e-5).unwrap_or_else(|e| panic!("relu {relu}, rank {r} output: {e}"));
            close(&dxr, &dx[span], 1e-5).unwrap_or_else(|e| panic!("relu {relu}, rank {r} input gradient: {e}"));
            close(&mr, &mean, 1e-6).expect("mean of the whole batch");
            close(&vr, &var, 1e-5).expect("variance of the whole batch");
            assert_eq!(count, n, "running statistics count the whole batch");
            for j in 0..c {
                sg[j] += dgr[j];
                sb[j] += dbr[j];
            }
        }
        // Weight and bias gradients are each rank's share: they sum to the whole.
        close(&sg, &dg, 1e-5).expect("weight gradient");
        close(&sb, &db, 1e-5).expect("bias gradient");
    }
}

#[test]
fn averaged_and_broadcast_tensors() {
    let out = LocalGroup::run(2, |w| {
        let r = w.rank() as f32;
        let t = Tensor::new(&[[r, 2.0 * r]], &Device::Cpu).expect("t");
        let avg = w.average_tensors(&[t]).expect("average");
        let v = Var::new(&[r + 1.0, r + 2.0], &Device::Cpu).expect("v");
        w.broadcast_vars(std::slice::from_ref(&v), 0).expect("broadcast");
        (flat(&avg[0]), flat(v.as_tensor()))
    });
    for (avg, v) in out {
        assert_eq!(avg, vec![0.5, 1.0]);
        assert_eq!(v, vec![1.0, 2.0]);
    }
}

#[test]
fn the_step_collective_is_scoped_to_the_thread_and_restored() {
    let worlds = LocalGroup::ranks(2);
    // No collective is called, so one thread can hold a rank of a group of two.
    step_scope(&worlds[0], || {
        assert_eq!(step_collective().map(|w| w.rank()), Some(0));
        std::thread::scope(|s| {
            s.spawn(|| assert!(step_collective().is_none(), "other threads see none"));
        });
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step_scope(&worlds[1], || panic!("inside"))
        }));
        assert!(r.is_err());
        assert_eq!(step_collective().map(|w| w.rank()), Some(0), "restored after a panic");
    });
    assert!(step_collective().is_none());
}

#[test]
fn a_launcher_without_mpi_support_is_refused() {
    // The variables are read, never set here (tests run in parallel); this
    // checks only the parsing of what a launcher sets.
    if launcher_size().is_none() {
        #[cfg(not(feature = "mpi"))]
        assert!(init().is_ok());
    }
}

#[test]
fn running_statistics_joined_across_ranks_are_the_sequential_ones() {
    // Groups g = 0..6 normalised one after another (one process) against
    // ranks 0..3 normalising 2 groups each, then joined.
    let (groups, ranks, m) = (6usize, 3usize, 0.1f64);
    let stat = |g: usize| vec![g as f32 * 0.5 - 1.0, (g * g) as f32 * 0.1];
    let r0 = vec![0.25f32, 2.0];
    let ema = |r: &mut Vec<f32>, s: &[f32]| {
        for (a, b) in r.iter_mut().zip(s) {
            *a = ((1.0 - m) * f64::from(*a) + m * f64::from(*b)) as f32;
        }
    };
    let mut want = r0.clone();
    for g in 0..groups {
        ema(&mut want, &stat(g));
    }
    let per = groups / ranks;
    let out = LocalGroup::run(ranks, |w| {
        let map = candle_nn::VarMap::new();
        let (mean, count) = {
            let mut data = map.data().lock().expect("lock");
            let mean = Var::from_vec(r0.clone(), 2, &Device::Cpu).expect("mean");
            let count = Var::from_tensor(&Tensor::new(7i64, &Device::Cpu).expect("t")).expect("count");
            data.insert("bn.running_mean".into(), mean.clone());
            data.insert("bn.num_batches_tracked".into(), count.clone());
            (mean, count)
        };
        let before: std::collections::HashMap<String, Tensor> = crate::init::named_vars(&map)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().copy().expect("copy")))
            .collect();
        let mut r = r0.clone();
        for g in w.rank() * per..(w.rank() + 1) * per {
            ema(&mut r, &stat(g));
        }
        mean.set(&Tensor::from_vec(r, 2, &Device::Cpu).expect("r"))
            .expect("set");
        join_running_stats(&w, &map, &before, per, m).expect("join");
        (
            flat(mean.as_tensor()),
            count.as_tensor().to_scalar::<i64>().expect("count"),
        )
    });
    for (r, (mean, count)) in out.into_iter().enumerate() {
        close(&mean, &want, 1e-6).unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(count, 7 + groups as i64, "rank {r}: one batch per group");
    }
}

#[test]
fn unsynchronised_batch_norm_normalises_each_ranks_rows_alone() {
    let (n, c, ranks) = (8, 2, 2);
    let all: Vec<f32> = values(n * c, 5).iter().map(|v| v * 3.0 - 1.0).collect();
    let bn = |x: &[f32], rows: usize| {
        let dev = Device::Cpu;
        let x = Var::from_vec(x.to_vec(), (rows, c), &dev).expect("x");
        let g = Tensor::new(&[1f32, 2.0], &dev).expect("g");
        let b = Tensor::new(&[0f32, 0.5], &dev).expect("b");
        let (y, stats) = batch_norm(x.as_tensor(), &g, &b, NormStats::Batch, 1e-5, false).expect("bn");
        let dx = y
            .sqr()
            .and_then(|t| t.sum_all())
            .and_then(|l| l.backward())
            .map(|gs| flat(gs.get(x.as_tensor()).expect("grad")))
            .expect("backward");
        (flat(&y), dx, stats.expect("stats").0, norm_rows(rows))
    };
    let per = n / ranks;
    let out = LocalGroup::run(ranks, |w| {
        let span = w.rank() * per * c..(w.rank() + 1) * per * c;
        let mine = &all[span];
        // Alone, outside any step, and inside a step without synchronisation: the same.
        let alone = bn(mine, per);
        let unsynced = step_scope_with(&w, false, || bn(mine, per));
        let synced = step_scope_with(&w, true, || bn(mine, per));
        (alone, unsynced, synced)
    });
    for (r, (alone, unsynced, synced)) in out.into_iter().enumerate() {
        assert_eq!(unsynced, alone, "rank {r}: its own rows' statistics");
        assert_eq!(unsynced.3, per);
        assert_eq!(synced.3, n, "synchronised: the whole batch's");
        assert!(close(&synced.2, &unsynced.2, 1e-6).is_err(), "rank {r}: the two differ");
    }
}
