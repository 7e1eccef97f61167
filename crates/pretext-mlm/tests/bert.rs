//! The trainable BERT against candle-transformers' inference BERT (the
//! exported weights load there and give the same logits), and a short
//! training run on a tiny corpus whose loss falls.

use candle_core::{DType, Device, Tensor};
use pretext_core::trainer::{NullObserver, Trainer};
use pretext_core::{OptimConfig, ScheduleConfig, TrainConfig};
use pretext_mlm::collator::{sequences, MaskingConfig, MlmBatcher, Packing};
use pretext_mlm::{BertDims, BertMlm, WordPieceTokenizer};
use std::collections::BTreeMap;
use std::sync::Arc;

fn dims(vocab: usize) -> BertDims {
    BertDims {
        vocab_size: vocab,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        layer_norm_eps: 1e-12,
        initializer_range: 0.2,
        pad_token_id: 0,
    }
}

#[test]
fn exported_weights_give_the_same_logits_in_candle_transformers() -> pretext_core::Result<()> {
    let dev = Device::Cpu;
    let d = dims(60);
    let model = BertMlm::new(&d, 4, &dev)?;
    let tensors = pretext_mlm::export::hf_tensors(&model);
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    for n in [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.1.attention.self.query.weight",
        "bert.encoder.layer.0.output.LayerNorm.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.decoder.weight",
        "cls.predictions.bias",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let tmp = tempfile::tempdir().map_err(|e| pretext_core::Error::io("tmp", e))?;
    let path = tmp.path().join("model.safetensors");
    let bytes = pretext_core::checkpoint::safetensors_bytes(&tensors, &BTreeMap::new())?;
    std::fs::write(&path, bytes).map_err(|e| pretext_core::Error::io(&path, e))?;
    let cfg: candle_transformers::models::bert::Config =
        serde_json::from_value(d.hf_config()).map_err(|e| pretext_core::Error::Config(e.to_string()))?;
    // SAFETY: the file was just written by this test and is not modified while mapped.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev)? };
    let theirs = candle_transformers::models::bert::BertForMaskedLM::load(vb, &cfg)?;
    let ids = Tensor::new(&[[2u32, 17, 33, 4, 9, 3, 0, 0], [2, 5, 6, 7, 8, 9, 10, 3]], &dev)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], &dev)?;
    let ours = model.logits(&ids, &mask.to_dtype(DType::F32)?)?;
    let ref_logits = theirs.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
    assert_eq!(ours.dims(), ref_logits.dims());
    // compare the real (non-padding) positions
    let diff = (ours - ref_logits)?.abs()?;
    let real = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let worst = diff.broadcast_mul(&real)?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(worst < 1e-4, "logits differ by {worst}");
    Ok(())
}

#[test]
fn loss_falls_on_a_tiny_corpus() -> pretext_core::Result<()> {
    let dev = Device::Cpu;
    let docs: Vec<String> = [
        "the cat sat on the mat",
        "the dog sat on the log",
        "a bird sang in the tree",
        "the cat chased the dog",
        "a fish swam in the sea",
    ]
    .iter()
    .cycle()
    .take(60)
    .map(|s| s.to_string())
    .collect();
    let tok = WordPieceTokenizer::train(&docs, 60, 1)?;
    let ids = tok.special_ids()?;
    let seqs = sequences(&tok.encode_all(&docs)?, 16, Packing::Pack, &ids)?;
    let mut d = dims(tok.vocab_size());
    d.initializer_range = 0.02;
    let model = BertMlm::new(&d, 0, &dev)?;
    let train = TrainConfig {
        max_steps: 150,
        batch_size: 8,
        seed: 0,
        ..TrainConfig::default()
    };
    let optim = OptimConfig {
        lr: 3e-3,
        weight_decay: 0.01,
        ..OptimConfig::default()
    };
    let mut trainer = Trainer::new(model, &optim, &ScheduleConfig::default(), &train)?;
    let mut batcher = MlmBatcher::new(Arc::new(seqs), 8, 0, MaskingConfig::default(), ids, &dev);
    let s = trainer.fit(&mut batcher, &mut NullObserver)?;
    let head = s.losses[..10].iter().sum::<f64>() / 10.0;
    let tail = s.losses[140..].iter().sum::<f64>() / 10.0;
    assert!(head > 3.0, "starts near ln(vocab): {head}");
    assert!(tail < head - 1.5, "loss did not fall: {head:.2} → {tail:.2}");
    Ok(())
}
