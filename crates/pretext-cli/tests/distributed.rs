//! Data-parallel training under `mpirun` (builds with the `mpi` feature:
//! `cargo test -p pretext-cli --features mpi --test distributed`, run by
//! `.ci/run` with Debian's Open MPI). Two processes with global batch B
//! train as one process with batch B; a killed rank stops the run with a
//! message naming it; the run resumes under `mpirun` and matches the
//! uninterrupted one.
#![cfg(feature = "mpi")]

mod common;

use common::{jsonl, os, CONTRASTIVE_TINY, GENERATIVE_TINY, MLM_TINY};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `mpirun -np n bin args`, allowed as root and on more ranks than cores
/// (Open MPI reads these variables; other launchers ignore them).
fn mpirun(n: usize, bin: &str, args: &[OsString]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &n.to_string(), bin])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

fn output(mut c: Command) -> Output {
    c.output()
        .expect("mpirun (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)")
}

/// `mpirun -np 2 bin args`; panics unless it fails; returns its stderr
/// (what [`common::fails`] is for one process).
fn mpirun_fails(bin: &str, args: &[OsString]) -> String {
    let out = output(mpirun(2, bin, args));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "mpirun -np 2 {bin} {args:?} succeeded; stderr:\n{err}"
    );
    err
}

fn pretrain_args(method: &[&str], out: &Path, tiny: &[&str], extra: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["pretrain".into()];
    a.extend(method.iter().map(Into::into));
    a.extend(["--out".into(), out.as_os_str().to_owned()]);
    a.extend(tiny.iter().map(Into::into));
    a.extend(extra.iter().map(Into::into));
    a
}

/// The training losses of a run, step by step.
fn losses(run: &Path) -> Vec<f64> {
    jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|r| r.get("event").is_none())
        .filter_map(|r| r.get("loss").and_then(serde_json::Value::as_f64))
        .collect()
}

/// The tensors of the latest checkpoint's `model.safetensors`, as f32.
fn weights(run: &Path) -> HashMap<String, Vec<f32>> {
    tensors(run, "model.safetensors")
}

/// The tensors of the latest checkpoint's `file`, as f32.
fn tensors(run: &Path, file: &str) -> HashMap<String, Vec<f32>> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).expect("latest");
    let file = run.join("checkpoints").join(latest.trim()).join(file);
    candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
        .expect("model.safetensors")
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values");
            (n, v)
        })
        .collect()
}

/// Largest difference between two runs' weights, relative to max(1, |w|).
fn weight_gap(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (name, va) in a {
        let vb = &b[name];
        assert_eq!(va.len(), vb.len(), "{name}");
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs() / x.abs().max(1.0));
        }
    }
    worst
}

/// SGD, so the weights compare the gradients (Adam's normalised update
/// turns rounding noise in near-zero gradients into whole steps), and f32
/// products: in bf16 a sum taken in another order can round an operand to
/// the next bf16 value, 2⁻⁸ away (the SimCLR default trains in bf16).
const SGD_F32: [&str; 8] = [
    "--set",
    "optim.name=\"sgd\"",
    "--set",
    "optim.lr=0.002",
    "--set",
    "optim.momentum=0.9",
    "--set",
    "train.precision=\"f32\"",
];

/// Trains with `mpirun -np 2` and with one process (global batch 8 both
/// times; `single` adds settings of the one-process run given the
/// two-process run's folder); losses, final weights and the method's state
/// (MoCo's queue and key networks, BYOL's target) must agree within `tol`
/// (relative).
fn one_and_two_processes(bin: &str, method: &[&str], tiny: &[&str], single: fn(&Path) -> Vec<String>, tol: f32) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let out = output(mpirun(2, bin, &pretrain_args(method, &two, tiny, &SGD_F32)));
    assert!(
        out.status.success(),
        "mpirun -np 2 {bin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let extra = single(&two);
    let mut args: Vec<&str> = SGD_F32.to_vec();
    args.extend(extra.iter().map(String::as_str));
    common::ok(bin, &os(&pretrain_args(method, &one, tiny, &args)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("run folder:").count(),
        1,
        "rank 0 alone reports: {stdout}"
    );
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 6);
    assert_eq!(l2.len(), 6, "rank 0 alone writes metrics");
    for (a, b) in l1.iter().zip(&l2) {
        assert!(
            (a - b).abs() <= f64::from(tol) * a.abs().max(1.0),
            "{bin}: {l1:?} vs {l2:?}"
        );
    }
    let gap = weight_gap(&weights(&one), &weights(&two));
    let state_gap = weight_gap(&tensors(&one, "state.safetensors"), &tensors(&two, "state.safetensors"));
    eprintln!("{bin} {method:?}: losses within {tol:e}, weights within {gap:.2e}, state within {state_gap:.2e}");
    assert!(gap < tol, "{bin}: final weights differ by {gap}");
    assert!(state_gap < tol, "{bin}: final state differs by {state_gap}");
    let trainer = common::json(&two.join("checkpoints/step-00000006/trainer.json"));
    let procs = trainer["processes"].as_str().unwrap_or_default().to_string();
    assert!(procs.starts_with("2 processes, MPI"), "{procs}");
    assert!(common::json(&one.join("checkpoints/step-00000006/trainer.json"))
        .get("processes")
        .is_none());
}

/// No settings of the one-process run beyond the common ones.
fn none(_: &Path) -> Vec<String> {
    vec![]
}

#[test]
fn two_processes_train_simclr_as_one_does() {
    one_and_two_processes(
        env!("CARGO_BIN_EXE_pretext-contrastive"),
        &[],
        &CONTRASTIVE_TINY,
        none,
        1e-5,
    );
}

#[test]
fn two_processes_train_byol_as_one_does() {
    one_and_two_processes(
        env!("CARGO_BIN_EXE_pretext-contrastive"),
        &["--method", "byol"],
        &CONTRASTIVE_TINY,
        none,
        // Batch norm over 4 rows per view in the predictor: rounding grows faster.
        1e-4,
    );
}

/// MoCo: each process normalises one of the two batch-norm groups; the
/// queue (compared with the state) takes both processes' keys in batch order.
#[test]
fn two_processes_train_moco_as_one_does() {
    one_and_two_processes(
        env!("CARGO_BIN_EXE_pretext-contrastive"),
        &[
            "--method",
            "moco",
            "--set",
            "model.moco.bn_groups=2",
            "--set",
            "model.moco.queue_size=32",
        ],
        &CONTRASTIVE_TINY,
        none,
        // Four images per batch-norm group: rounding grows faster.
        1e-4,
    );
}

/// MLM with dropout: the one-process run uses the tokenizer rank 0 trained
/// (the trainer numbers tied pieces in hash order, so two trainings differ).
#[test]
fn two_processes_train_bert_as_one_does() {
    let tiny: Vec<&str> = MLM_TINY
        .iter()
        .map(|a| match *a {
            "train.max_steps=20" => "train.max_steps=6",
            "train.checkpoint_every=10" => "train.checkpoint_every=3",
            other => other,
        })
        .collect();
    one_and_two_processes(
        env!("CARGO_BIN_EXE_pretext-mlm"),
        &[],
        &tiny,
        |two| {
            vec![
                "--set".into(),
                format!(
                    "tokenizer.path={:?}",
                    two.join("tokenizer/tokenizer.json").display().to_string()
                ),
            ]
        },
        1e-5,
    );
}

#[test]
fn two_processes_train_the_conv_vae_as_one_does() {
    // The default architecture (conv) and free bits, not the tiny MLP.
    let tiny: Vec<&str> = GENERATIVE_TINY
        .iter()
        .copied()
        .filter(|a| !a.starts_with("model.arch") && !a.starts_with("model.hidden"))
        .collect();
    let tiny: Vec<&str> = tiny
        .windows(2)
        .filter(|w| !(w[0] == "--set" && w[1] == "--set"))
        .map(|w| w[0])
        .chain(tiny.last().copied())
        .collect();
    one_and_two_processes(env!("CARGO_BIN_EXE_pretext-generative"), &[], &tiny, none, 1e-5);
}

#[test]
fn settings_that_do_not_split_across_processes_stop_every_rank() {
    let tmp = tempfile::tempdir().expect("tmp");
    let bin = env!("CARGO_BIN_EXE_pretext-contrastive");
    let started = Instant::now();
    let err = mpirun_fails(
        bin,
        &pretrain_args(
            &["--method", "moco"],
            &tmp.path().join("r"),
            &CONTRASTIVE_TINY,
            &["--set", "model.moco.bn_groups=3"],
        ),
    );
    assert!(
        err.contains("rank ") && err.contains("model.moco.bn_groups = 3 must be a multiple of the 2 processes"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // A global batch that does not split evenly.
    let err = mpirun_fails(
        bin,
        &pretrain_args(
            &[],
            &tmp.path().join("odd"),
            &CONTRASTIVE_TINY,
            &["--set", "train.batch_size=7"],
        ),
    );
    assert!(
        err.contains("train.batch_size = 7") && err.contains("multiple of 2"),
        "{err}"
    );
}

/// The pid of the rank `rank` among the children of `parent` (Open MPI
/// starts the ranks of a one-machine run as children of mpirun).
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn latest_step(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("checkpoints/latest"))
        .ok()
        .and_then(|s| s.trim().strip_prefix("step-").and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[test]
fn a_killed_rank_stops_the_run_and_it_resumes_under_mpirun() {
    let tmp = tempfile::tempdir().expect("tmp");
    let bin = env!("CARGO_BIN_EXE_pretext-contrastive");
    let long = ["--set", "train.max_steps=40", "--set", "train.checkpoint_every=4"];
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    let out = output(mpirun(2, bin, &pretrain_args(&[], &whole, &CONTRASTIVE_TINY, &long)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut child = mpirun(2, bin, &pretrain_args(&[], &cut, &CONTRASTIVE_TINY, &long))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
    let deadline = Instant::now() + Duration::from_secs(120);
    while latest_step(&cut) < 8 {
        assert!(Instant::now() < deadline, "no checkpoint at step 8");
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the run ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim = rank_pid(child.id(), 1).expect("rank 1's pid");
    let killed_at = Instant::now();
    let _ = Command::new("kill").args(["-9", &victim.to_string()]).status();
    let out = child.wait_with_output().expect("mpirun");
    let waited = killed_at.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mpirun must fail when a rank dies");
    assert!(waited < Duration::from_secs(60), "the others stopped after {waited:?}");
    assert!(err.contains("rank 1"), "the message names the lost rank: {err}");
    let at = latest_step(&cut);
    assert!((8..40).contains(&at), "killed mid-run, latest checkpoint {at}");
    // The latest checkpoint is whole: it loads.
    let w = weights(&cut);
    assert!(!w.is_empty());

    let resumed = output(mpirun(2, bin, &["resume".into(), cut.clone().into_os_string()]));
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(
        losses(&cut),
        losses(&whole),
        "the resumed run logs the uninterrupted run's losses"
    );
    assert_eq!(weights(&cut), weights(&whole), "and ends with its weights");
    let _: PathBuf = cut;
}
