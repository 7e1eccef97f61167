//! Each paradigm as a command-line [`Tool`]: its built-in config and help texts.

use crate::runner::Tool;
use pretext_contrastive::{Contrastive, ContrastiveConfig};
use pretext_generative::{Generative, GenerativeConfig};
use pretext_mlm::{Mlm, MlmConfig};

impl Tool for Contrastive {
    const BIN: &'static str = "pretext-contrastive";
    const DEFAULT_CONFIG: &'static str = pretext_contrastive::DEFAULT_CONFIG;
    const ABOUT: &'static str =
        "Self-supervised pretraining of image encoders: SimCLR, MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg, DINO.";
    const LONG_ABOUT: &'static str = "Without --data, the Fashion-MNIST copy shipped in datasets/ is used.";
    const PRETRAIN_HELP: &'static str = "Pretrain an encoder on unlabeled images; writes a run folder.";
    const PROBE_HELP: &'static str = "Evaluate the encoder against a random-init encoder and raw pixels: linear \
probe and kNN at each label fraction, fine-tuning vs. supervised from scratch at 1% and 10% -> RUN/report/ \
(eval.json, eval.md, PNG plots, index.html).";
    const EXPORT_HELP: &'static str = "Write the backbone (model.safetensors, PyTorch names), config.json and a \
model card (README.md) for the Hub -> RUN/export/.";

    fn label(cfg: &ContrastiveConfig) -> String {
        cfg.method.clone()
    }
}

impl Tool for Generative {
    const BIN: &'static str = "pretext-generative";
    const DEFAULT_CONFIG: &'static str = pretext_generative::DEFAULT_CONFIG;
    const ABOUT: &'static str = "Generative self-supervised pretraining: a variational autoencoder (VAE) or a masked \
autoencoder (MAE) on a Vision Transformer.";
    const LONG_ABOUT: &'static str = "Without --data, the Fashion-MNIST copy shipped in datasets/ is used.";
    const PRETRAIN_HELP: &'static str = "Train a VAE (or, with --method mae, an MAE) on unlabeled images; writes a \
run folder (held-out −ELBO or masked reconstruction error, and kNN accuracy on the features, after every epoch).";
    const PROBE_HELP: &'static str = "The VAE's test −ELBO and IWAE −log p(x), or the MAE's masked reconstruction \
error; features (posterior means, or the ViT's class token) in a linear probe and kNN against a random-init encoder \
and raw pixels; reconstructions (and the VAE's samples and interpolations) -> RUN/report/ (index.html, eval.json, \
likelihood.json or reconstruction.json, PNGs).";
    const EXPORT_HELP: &'static str = "Write the weights (the VAE's under the reference's names; the MAE's encoder \
under timm's), config.json and a model card for the Hub -> RUN/export/.";

    fn label(cfg: &GenerativeConfig) -> String {
        cfg.method.clone()
    }
}

impl Tool for Mlm {
    const BIN: &'static str = "pretext-mlm";
    const DEFAULT_CONFIG: &'static str = pretext_mlm::config::DEFAULT_CONFIG;
    const ABOUT: &'static str =
        "Masked language modeling: BERT-style pretraining with a WordPiece tokenizer trained on the corpus.";
    const LONG_ABOUT: &'static str = "Without --data, the fortunes corpus shipped in datasets/ is used: the model \
pretrains on every fortune except the probe task's test entries, and the probe classifies fortunes of 8 categories \
(computers, science, politics, love, food, sports, law, medicine) from frozen features.";
    const PRETRAIN_HELP: &'static str = "Pretrain a BERT encoder with the MLM objective; writes a run folder \
(tokenizer/, checkpoints, metrics.jsonl with held-out masked-token accuracy).";
    const PROBE_HELP: &'static str = "Held-out masked-token accuracy; frozen sentence features (linear probe, kNN) \
against a random-init model and TF-IDF -> RUN/report/ (index.html, eval.json, PNGs).";
    const EXPORT_HELP: &'static str = "Write the Hugging Face layout (config.json, model.safetensors, tokenizer \
files, model card) -> RUN/export/.";

    fn label(_: &MlmConfig) -> String {
        "mlm".into()
    }
}
