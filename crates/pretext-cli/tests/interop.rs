//! Interoperability with PyTorch, torchvision, timm and transformers, both ways:
//! Hugging Face BERT folders written by `save_pretrained` start a run and
//! give transformers' hidden states; classifier folders written by
//! `finetune` load strictly in torchvision / `BertForSequenceClassification`
//! (and the model card's module) and predict what `predict` predicts.
//!
//! These need the PyTorch reference's virtual environment (torch,
//! torchvision, transformers, and timm for the ViTs: `pip install timm`):
//! they are ignored by default and run with
//! `PRETEXT_REFERENCE=/path/to/reference cargo test -p pretext-cli --test interop -- --ignored`,
//! where `/path/to/reference/.venv/bin/python` exists.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const CONTRASTIVE: &str = env!("CARGO_BIN_EXE_pretext-contrastive");
const MLM: &str = env!("CARGO_BIN_EXE_pretext-mlm");
const GENERATIVE: &str = env!("CARGO_BIN_EXE_pretext-generative");

fn python() -> PathBuf {
    let root = std::env::var_os("PRETEXT_REFERENCE")
        .expect("set PRETEXT_REFERENCE to the PyTorch reference folder (with its .venv) to run the interop tests");
    let py = Path::new(&root).join(".venv/bin/python");
    assert!(py.is_file(), "{} is missing", py.display());
    py
}

/// Runs a Python script with `args`; panics with its output unless it succeeds.
fn run_python(dir: &Path, name: &str, script: &str, args: &[&std::ffi::OsStr]) -> String {
    let file = dir.join(name);
    std::fs::write(&file, script).expect("script");
    let out = std::process::Command::new(python())
        .arg(&file)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} failed:\n{text}");
    text
}

const SAVE_BERTS: &str = r#"
import json, shutil, sys, torch
from tokenizers import BertWordPieceTokenizer
from transformers import BertConfig, BertForMaskedLM, BertModel
out = sys.argv[1]
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
open(f"{out}/vocab.txt", "w").write("\n".join(vocab) + "\n")
cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)
ids = torch.tensor([[2, 10, 11, 12, 3, 0, 0], [2, 20, 21, 22, 23, 24, 3]])
mask = (ids != 0).long()
for name, cls in [("mlm", BertForMaskedLM), ("base", BertModel)]:
    torch.manual_seed({"mlm": 0, "base": 1}[name])
    m = cls(cfg).eval()
    d = f"{out}/{name}"
    m.save_pretrained(d)
    shutil.copy(f"{out}/vocab.txt", f"{d}/vocab.txt")
    if name == "mlm":  # the other folder has vocab.txt alone
        BertWordPieceTokenizer(f"{out}/vocab.txt", lowercase=True).save(f"{d}/tokenizer.json")
    with torch.no_grad():
        h = (m.bert if name == "mlm" else m)(input_ids=ids, attention_mask=mask).last_hidden_state
    json.dump({"ids": ids.tolist(), "mask": mask.tolist(), "hidden": h.tolist()}, open(f"{d}/hidden.json", "w"))
print("saved")
"#;

#[test]
#[ignore = "needs the PyTorch reference venv: PRETEXT_REFERENCE=..."]
fn hugging_face_bert_folders_start_a_run_with_transformers_hidden_states() {
    let tmp = tempfile::tempdir().expect("tmp");
    run_python(tmp.path(), "save_berts.py", SAVE_BERTS, &[tmp.path().as_os_str()]);
    let dev = candle_core::Device::Cpu;
    for name in ["mlm", "base"] {
        let dir = tmp.path().join(name);
        let spec = pretext_core::paradigm::InitSpec {
            source: dir.display().to_string(),
            path: dir.clone(),
        };
        let settings = <pretext_mlm::Mlm as pretext_core::paradigm::Paradigm>::init_settings(&spec).expect("settings");
        let cfg: pretext_mlm::MlmConfig =
            pretext_cli::config::resolve(pretext_mlm::config::DEFAULT_CONFIG, None, &settings)
                .expect("config")
                .config;
        let (model, tok, record) =
            pretext_core::paradigm::initialised_model::<pretext_mlm::Mlm>(&cfg, &spec, &dev).expect("loads");
        assert!(
            record.unused.is_empty(),
            "{name}: unexpected tensors {:?}",
            record.unused
        );
        assert_eq!(tok.vocab_size(), 100);
        match name {
            "mlm" => assert!(record.initialised.is_empty(), "{record:?}"),
            _ => {
                assert!(
                    !record.initialised.is_empty()
                        && record.initialised.iter().all(|n| n.starts_with("cls.predictions.")),
                    "a BertModel has no MLM head, which starts fresh: {record:?}"
                );
                assert!(
                    record.skipped.iter().any(|s| s.starts_with("bert.pooler.dense.weight")),
                    "{record:?}"
                );
            }
        }
        let want = json(&dir.join("hidden.json"));
        let rows = |k: &str| -> Vec<Vec<f64>> {
            want[k]
                .as_array()
                .expect("rows")
                .iter()
                .map(|r| r.as_array().expect("row").iter().filter_map(|x| x.as_f64()).collect())
                .collect()
        };
        let (ids, mask) = (rows("ids"), rows("mask"));
        let flat_ids: Vec<u32> = ids.iter().flatten().map(|&x| x as u32).collect();
        let flat_mask: Vec<f32> = mask.iter().flatten().map(|&x| x as f32).collect();
        let ids_t = candle_core::Tensor::from_vec(flat_ids, (2, 7), &dev).expect("ids");
        let mask_t = candle_core::Tensor::from_vec(flat_mask, (2, 7), &dev).expect("mask");
        let got = model
            .encode(&ids_t, &mask_t, None)
            .and_then(|h| h.flatten_all())
            .and_then(|h| h.to_vec1::<f32>())
            .expect("hidden");
        let hidden: Vec<f64> = want["hidden"]
            .as_array()
            .expect("hidden")
            .iter()
            .flat_map(|b| b.as_array().expect("seq").iter())
            .flat_map(|t| t.as_array().expect("tok").iter().filter_map(|x| x.as_f64()))
            .collect();
        assert_eq!(got.len(), hidden.len());
        // padded positions are not compared: transformers and pretext both
        // compute them, but from attention over nothing meaningful
        let max_diff = got
            .iter()
            .zip(&hidden)
            .enumerate()
            .filter(|(i, _)| mask[i / (7 * 32)][(i / 32) % 7] > 0.0)
            .map(|(_, (a, b))| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        assert!(max_diff < 1e-4, "{name}: max |Δ| {max_diff} against transformers");
        eprintln!("{name}: max |hidden state difference| against transformers {max_diff:.2e}");
        // and the command line starts a run from it
        // text in the folder's vocabulary (w0 … w94)
        let corpus = tmp.path().join("corpus.txt");
        let text: String = (0..60)
            .map(|i| format!("w{} w{} w{} w{}\n", i % 95, (i * 7) % 95, (i * 13) % 95, (i * 29) % 95))
            .collect();
        std::fs::write(&corpus, text).expect("corpus");
        let run = tmp.path().join(format!("run-{name}"));
        ok(
            MLM,
            &os(&args![
                "pretrain",
                "--init",
                dir,
                "--data",
                corpus,
                "--out",
                run,
                "--quiet",
                "--set",
                "train.max_steps=2",
                "--set",
                "train.batch_size=4",
                "--set",
                "data.seq_len=32",
                "--set",
                "eval.every_steps=0",
                "--set",
                "eval.max_len=32"
            ]),
        );
    }
}

const CHECK_IMAGE_CLASSIFIERS: &str = r#"
import json, re, sys, torch, torchvision
import numpy as np
from PIL import Image
from safetensors.torch import load_file
clf, preds_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
conf = json.load(open(f"{clf}/config.json"))
state = load_file(f"{clf}/model.safetensors")
classes = conf["pretext"]["classes"]
if mode == "torchvision":
    model = torchvision.models.resnet18(num_classes=len(classes))
    if conf["in_channels"] != 3:
        model.conv1 = torch.nn.Conv2d(conf["in_channels"], 64, 7, 2, 3, bias=False)
else:  # the model card's own module, run in the folder as the card says
    import os
    os.chdir(clf)
    card = open("README.md").read()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.split("model.load_state_dict(state)")[0]
    scope = {"state": state}
    exec(code.replace('state = load_file("model.safetensors")', ""), scope)
    model = scope["model"]
missing, unexpected = model.load_state_dict(state, strict=True), None
model.eval()
mean = torch.tensor(conf["mean"]).view(-1, 1, 1)
std = torch.tensor(conf["std"]).view(-1, 1, 1)
data_root = sys.argv[4]
import os
os.chdir(os.path.dirname(preds_path))
worst, agree, n = 0.0, 0, 0
for line in open(preds_path):
    p = json.loads(line)
    img = Image.open(f"{data_root}/{p['id']}").convert("L" if conf["in_channels"] == 1 else "RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    x = ((x - mean) / std).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    agree += classes[int(probs.argmax())] == p["label"]
    worst = max(worst, max(abs(float(probs[i]) - p["probabilities"][c]) for i, c in enumerate(classes)))
    n += 1
print(json.dumps({"n": n, "agree": agree, "max_prob_diff": worst}))
"#;

const CHECK_TEXT_CLASSIFIER: &str = r#"
import json, sys, torch
from transformers import AutoTokenizer, BertForSequenceClassification
clf, preds_path, data_path, max_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model, info = BertForSequenceClassification.from_pretrained(clf, output_loading_info=True)
assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
model.eval()
tok = AutoTokenizer.from_pretrained(clf)
docs = [json.loads(l)["text"] for l in open(data_path)]
preds = [json.loads(l) for l in open(preds_path)]
enc = tok(docs, return_tensors="pt", truncation=True, max_length=max_len, padding=True)
with torch.no_grad():
    probs = model(**enc).logits.softmax(-1)
labels = model.config.id2label
agree = sum(labels[int(probs[i].argmax())] == p["label"] for i, p in enumerate(preds))
worst = max(abs(float(probs[i][k]) - p["probabilities"][labels[k]]) for i, p in enumerate(preds) for k in range(len(labels)))
print(json.dumps({"n": len(preds), "agree": agree, "max_prob_diff": worst}))
"#;

fn check(report: &str, n: u64) {
    let line = report.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("{report}"));
    assert_eq!(v["n"].as_u64(), Some(n), "{v}");
    assert_eq!(v["agree"].as_u64(), Some(n), "every prediction agrees: {v}");
    assert!(v["max_prob_diff"].as_f64().is_some_and(|d| d < 1e-4), "{v}");
    eprintln!("{v}");
}

#[test]
#[ignore = "needs the PyTorch reference venv: PRETEXT_REFERENCE=..."]
fn classifier_folders_load_strictly_in_pytorch_and_predict_alike() {
    let tmp = tempfile::tempdir().expect("tmp");
    // images: a torchvision ResNet-18 (3 channels) and the card's small ResNet (1 channel)
    let train = labelled_images(&tmp.path().join("train"), 8, 1);
    let test = labelled_images(&tmp.path().join("test"), 34, 2);
    let both = tmp.path().join("labelled");
    std::fs::create_dir_all(&both).expect("mkdir");
    for (part, from) in [("train", &train), ("test", &test)] {
        std::os::unix::fs::symlink(from, both.join(part)).expect("link");
    }
    for (mode, extra) in [
        (
            "torchvision",
            vec![
                "--set",
                "model.encoder.arch=\"resnet18\"",
                "--set",
                "model.encoder.in_channels=3",
                "--set",
                "data.channels=3",
            ],
        ),
        ("card", vec![]),
        // a ViT classifier: timm's names plus head.*, loaded by the card's timm code
        (
            "card-vit",
            vec![
                "--set",
                "model.encoder.arch=\"vit-tiny\"",
                "--set",
                "model.encoder.depth=2",
                "--set",
                "data.image_size=16", // the images' own size: timm's ViT takes no other
            ],
        ),
    ] {
        let run = tmp.path().join(format!("run-{mode}"));
        let mut a = args![
            "pretrain",
            "--data",
            train,
            "--out",
            run,
            CONTRASTIVE_TINY,
            "--set",
            "train.max_steps=2",
            "--set",
            "train.batch_size=4"
        ];
        a.extend(extra.iter().map(std::ffi::OsString::from));
        ok(CONTRASTIVE, &os(&a));
        let clf = tmp.path().join(format!("clf-{mode}"));
        ok(
            CONTRASTIVE,
            &os(&args![
                "finetune",
                run,
                "--data",
                both,
                "--out",
                clf,
                "--quiet",
                "--set",
                "eval.finetune.budget_images=96"
            ]),
        );
        let preds = tmp.path().join(format!("preds-{mode}.jsonl"));
        ok(
            CONTRASTIVE,
            &os(&args!["predict", clf, "--data", test, "--out", preds, "--quiet"]),
        );
        let report = run_python(
            tmp.path(),
            "check_images.py",
            CHECK_IMAGE_CLASSIFIERS,
            &os(&args![clf, preds, mode, test]),
        );
        check(&report, 102);
    }
    // text: BertForSequenceClassification
    let corpus = corpus_txt(&tmp.path().join("corpus.txt"), 120);
    let run = tmp.path().join("run-text");
    ok(MLM, &os(&args!["pretrain", "--data", corpus, "--out", run, MLM_TINY]));
    let data = split_jsonl(&tmp.path().join("topics.jsonl"), 100, 5);
    let clf = tmp.path().join("clf-text");
    ok(
        MLM,
        &os(&args![
            "finetune",
            run,
            "--data",
            data,
            "--out",
            clf,
            "--quiet",
            "--set",
            "eval.finetune.epochs=3"
        ]),
    );
    let preds = tmp.path().join("preds-text.jsonl");
    ok(
        MLM,
        &os(&args!["predict", clf, "--data", data, "--out", preds, "--quiet"]),
    );
    let report = run_python(
        tmp.path(),
        "check_text.py",
        CHECK_TEXT_CLASSIFIER,
        &os(&args![clf, preds, data, "32"]),
    );
    check(&report, 100);
}

const CHECK_VIT_EXPORT: &str = r#"
import json, re, sys, torch
import numpy as np
from PIL import Image
from safetensors.torch import load_file
export, embeddings, data_root = sys.argv[1], sys.argv[2], sys.argv[3]
import os
os.chdir(export)
conf = json.load(open("config.json"))
card = open("README.md").read()
code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
code = code.split("features = model(")[0]
scope = {}
exec(code, scope)  # timm.create_model(...) and a strict load_state_dict, as the card says
model = scope["model"].eval()
assert type(model).__module__.startswith("timm"), type(model)
c = conf["in_channels"]
mean = torch.tensor(conf.get("mean", [0.0] * c)).view(-1, 1, 1)  # the MAE takes [0, 1] intensities
std = torch.tensor(conf.get("std", [1.0] * c)).view(-1, 1, 1)
rows = [json.loads(l) for l in open(embeddings)][:10]
worst, scale = 0.0, 0.0
for r in rows:
    img = Image.open(f"{data_root}/{r['id']}").convert("L")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
    x = ((x - mean) / std).unsqueeze(0)
    with torch.no_grad():
        f = model(x)[0]
    ours = torch.tensor(r["embedding"])
    worst = max(worst, float((f - ours).abs().max()))
    scale = max(scale, float(f.abs().max()))
print(json.dumps({"n": len(rows), "max_abs_diff": worst, "max_abs": scale, "dim": int(f.shape[0])}))
"#;

#[test]
#[ignore = "needs the PyTorch reference venv with timm: PRETEXT_REFERENCE=..."]
fn vit_exports_load_in_timm_with_the_same_features() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = labelled_images(&tmp.path().join("images"), 4, 5);
    // a contrastive ViT (SimCLR) and the MAE's encoder, three blocks on 4×4 patches of 16×16 images
    for (name, bin, arch) in [
        (
            "simclr",
            CONTRASTIVE,
            vec![
                "--set",
                "model.encoder.arch=\"vit-tiny\"",
                "--set",
                "model.encoder.depth=3",
                "--set",
                "model.encoder.patch_size=4",
                "--set",
                "eval.knn_every=0",
            ],
        ),
        (
            "mae",
            GENERATIVE,
            vec![
                "--method",
                "mae",
                "--set",
                "mae.depth=3",
                "--set",
                "mae.patch_size=4",
                "--set",
                "eval.every=0",
            ],
        ),
    ] {
        let run = tmp.path().join(name);
        let mut a = args![
            "pretrain",
            "--data",
            images,
            "--out",
            run,
            "--quiet",
            "--set",
            "data.image_size=16",
            "--set",
            "train.max_steps=3",
            "--set",
            "train.batch_size=8"
        ];
        a.extend(arch.iter().map(std::ffi::OsString::from));
        ok(bin, &os(&a));
        ok(bin, &os(&args!["export", run]));
        let emb = tmp.path().join(format!("{name}.jsonl"));
        ok(
            bin,
            &os(&args!["embed", run, "--data", images, "--out", emb, "--quiet"]),
        );
        let report = run_python(
            tmp.path(),
            "check_vit.py",
            CHECK_VIT_EXPORT,
            &os(&args![run.join("export"), emb, images]),
        );
        let line = report.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("{report}"));
        assert_eq!(v["n"].as_u64(), Some(10), "{v}");
        assert_eq!(v["dim"].as_u64(), Some(192), "{v}");
        let (diff, scale) = (
            v["max_abs_diff"].as_f64().expect("diff"),
            v["max_abs"].as_f64().expect("scale"),
        );
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{name}: timm's features differ from ours: {v}"
        );
        eprintln!("{name}: {v}");
    }
}
