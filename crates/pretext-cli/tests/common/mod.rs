//! Fixtures the CLI tests make for themselves: tiny image folders and text
//! files of a user's own kind (unlabelled, labelled, with and without a
//! split), and the tiny model settings every tool trains with.

#![allow(dead_code)] // each test crate uses its own part of this module

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The three image classes: horizontal stripes, vertical stripes, checks.
pub const IMAGE_CLASSES: [&str; 3] = ["checks", "hstripes", "vstripes"];

/// Side of the fixture images.
pub const IMAGE_SIZE: u32 = 16;

/// A 16×16 grayscale image of class `c` (see [`IMAGE_CLASSES`]) with noise
/// drawn from `k` (so every image differs).
fn pattern(c: usize, k: u64) -> image::GrayImage {
    let mut state = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    image::GrayImage::from_fn(IMAGE_SIZE, IMAGE_SIZE, |x, y| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = ((state >> 33) % 121) as i32 - 60;
        let on = match c {
            0 => ((x / 4) + (y / 4)) % 2 == 0,
            1 => (y / 2) % 2 == 0,
            _ => (x / 2) % 2 == 0,
        };
        let v = if on { 220 } else { 30 } + noise;
        image::Luma([v.clamp(0, 255) as u8])
    })
}

/// A flat folder of `n` unlabelled PNG images of every class in turn.
pub fn unlabelled_images(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    for i in 0..n {
        pattern(i % 3, 1000 + i as u64)
            .save(dir.join(format!("img{i:03}.png")))
            .expect("png");
    }
    dir.to_path_buf()
}

/// Class subfolders of `per_class` PNG images each (seeded by `seed`).
pub fn labelled_images(dir: &Path, per_class: usize, seed: u64) -> PathBuf {
    for (c, name) in IMAGE_CLASSES.iter().enumerate() {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        for i in 0..per_class {
            pattern(c, seed * 100_000 + (c * 1000 + i) as u64)
                .save(d.join(format!("{i:02}.png")))
                .expect("png");
        }
    }
    dir.to_path_buf()
}

/// `train/` and `test/` class folders: the data's own split.
pub fn split_images(dir: &Path, train: usize, test: usize) -> PathBuf {
    labelled_images(&dir.join("train"), train, 1);
    labelled_images(&dir.join("test"), test, 2);
    dir.to_path_buf()
}

/// Words of the three text topics.
pub const TOPICS: [(&str, &str); 3] = [
    ("food", "bread cheese soup wine cake apple dinner cook taste salt"),
    ("sport", "ball goal team match score player coach win league run"),
    ("tech", "computer code bug program disk network server byte cpu file"),
];

const COMMON: &str = "the a of and to in is it that was";

/// A document of `topic` (index into [`TOPICS`]) drawn by `k`.
pub fn document(topic: usize, k: u64) -> String {
    let words: Vec<&str> = TOPICS[topic].1.split(' ').chain(COMMON.split(' ')).collect();
    let mut state = k.wrapping_mul(2862933555777941757).wrapping_add(3037000493);
    (0..10)
        .map(|_| {
            state = state.wrapping_mul(2862933555777941757).wrapping_add(3037000493);
            words[((state >> 33) % words.len() as u64) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Plain text, one document per line, no labels.
pub fn corpus_txt(path: &Path, n: usize) -> PathBuf {
    let text: String = (0..n).map(|i| document(i % 3, i as u64) + "\n").collect();
    std::fs::write(path, text).expect("write");
    path.to_path_buf()
}

/// JSONL with only a `text` field (and an `id` the readers ignore).
pub fn unlabelled_jsonl(path: &Path, n: usize) -> PathBuf {
    let text: String = (0..n)
        .map(|i| serde_json::json!({"id": i, "text": document(i % 3, 500 + i as u64)}).to_string() + "\n")
        .collect();
    std::fs::write(path, text).expect("write");
    path.to_path_buf()
}

/// JSONL with `text` and `label` (the topic name), `n` documents, topics in turn.
pub fn labelled_jsonl(path: &Path, n: usize, seed: u64) -> PathBuf {
    let text: String = (0..n)
        .map(|i| {
            serde_json::json!({"text": document(i % 3, seed * 10_000 + i as u64), "label": TOPICS[i % 3].0}).to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, text).expect("write");
    path.to_path_buf()
}

/// JSONL with `text`, `label` and `split` (`train`, then every fifth record
/// `validation` or `test` in turn).
pub fn split_jsonl(path: &Path, n: usize, seed: u64) -> PathBuf {
    let text: String = (0..n)
        .map(|i| {
            let split = match i % 10 {
                4 => "validation",
                9 => "test",
                _ => "train",
            };
            serde_json::json!({"text": document(i % 3, seed * 10_000 + i as u64), "label": TOPICS[i % 3].0, "split": split})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, text).expect("write");
    path.to_path_buf()
}

/// The lines of a JSON-lines file.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Tiny settings of `pretext-contrastive` for 16×16 images.
pub const CONTRASTIVE_TINY: [&str; 20] = [
    "--set",
    "train.max_steps=6",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.checkpoint_every=3",
    "--set",
    "model.encoder.widths=[4, 8]",
    "--set",
    "model.encoder.strides=[1, 2]",
    "--set",
    "model.head.hidden=8",
    "--set",
    "model.head.output=4",
    "--set",
    "data.image_size=16",
    "--set",
    "schedule.warmup_steps=1",
    "--quiet",
    "--seed=3",
];

/// Tiny settings of `pretext-generative` for 16×16 images.
pub const GENERATIVE_TINY: [&str; 20] = [
    "--set",
    "train.max_steps=6",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.checkpoint_every=3",
    "--set",
    "model.arch=\"mlp\"",
    "--set",
    "model.hidden=[32]",
    "--set",
    "model.latent=4",
    "--set",
    "eval.iwae_samples=4",
    "--set",
    "data.image_size=16",
    "--set",
    "eval.monitor_images=16",
    "--quiet",
    "--seed=3",
];

/// Tiny settings of `pretext-mlm`.
pub const MLM_TINY: [&str; 26] = [
    "--set",
    "model.size=\"custom\"",
    "--set",
    "model.hidden=32",
    "--set",
    "model.layers=1",
    "--set",
    "model.heads=2",
    "--set",
    "tokenizer.vocab_size=200",
    "--set",
    "data.seq_len=32",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.max_steps=20",
    "--set",
    "train.checkpoint_every=10",
    "--set",
    "eval.every_steps=10",
    "--set",
    "eval.max_len=32",
    "--set",
    "model.max_position=32",
    "--seed=3",
    "--quiet",
];

/// Runs `bin` with `args`; panics with its stderr unless it succeeds.
pub fn ok(bin: &str, args: &[&std::ffi::OsStr]) -> Output {
    let out = Command::new(bin).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{bin} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `bin` with `args`; panics unless it fails; returns its stderr.
pub fn fails(bin: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(bin).args(args).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{bin} {args:?} succeeded; stderr:\n{err}");
    err
}

/// Arguments as `OsStr`s: strings, paths and lists of strings mixed.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => {{
        let mut v: Vec<std::ffi::OsString> = Vec::new();
        $( $crate::common::Push::push_to(&$a, &mut v); )*
        v
    }};
}

/// What [`args!`] takes: anything that is an `OsStr`, or a list of strings.
pub trait Push {
    /// Appends itself to `v`.
    fn push_to(&self, v: &mut Vec<std::ffi::OsString>);
}

impl<T: AsRef<std::ffi::OsStr> + ?Sized> Push for &T {
    fn push_to(&self, v: &mut Vec<std::ffi::OsString>) {
        v.push(self.as_ref().to_os_string());
    }
}

impl Push for PathBuf {
    fn push_to(&self, v: &mut Vec<std::ffi::OsString>) {
        v.push(self.into());
    }
}

impl Push for String {
    fn push_to(&self, v: &mut Vec<std::ffi::OsString>) {
        v.push(self.into());
    }
}

impl<const N: usize> Push for [&str; N] {
    fn push_to(&self, v: &mut Vec<std::ffi::OsString>) {
        v.extend(self.iter().map(std::ffi::OsString::from));
    }
}

/// `OsString`s as the `&OsStr` slice [`ok`] and [`fails`] take.
pub fn os(v: &[std::ffi::OsString]) -> Vec<&std::ffi::OsStr> {
    v.iter().map(|s| s.as_os_str()).collect()
}

/// The JSON of `path`.
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
