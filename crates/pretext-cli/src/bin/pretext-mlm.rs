//! `pretext-mlm`: BERT-style masked language modeling.

use anyhow::Context;
use clap::Subcommand;
use pretext_cli::runner::{run_config, Extra, NoFlags};
use pretext_mlm::{Mlm, MlmConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
enum TokenizerCommand {
    /// Train a WordPiece tokenizer on a corpus -> DIR/tokenizer.json + DIR/vocab.txt.
    Train {
        /// Text: fortune files, .txt, .jsonl or .parquet (format detected); default: the shipped fortunes.
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        /// Vocabulary size (special tokens included).
        #[arg(long, default_value_t = 8000)]
        vocab_size: usize,
        /// Pieces seen fewer times are left out.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// Output folder.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// This tool's own subcommands.
#[derive(Debug, Subcommand)]
enum Own {
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Predict the [MASK] tokens of a sentence (top-k).
    FillMask {
        /// The run folder.
        run: PathBuf,
        /// Text containing [MASK], e.g. "the [MASK] is mightier than the sword."
        text: String,
        /// How many candidates per mask.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Device: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

impl Extra for Own {
    fn run(self) -> anyhow::Result<()> {
        match self {
            Own::Tokenizer(TokenizerCommand::Train {
                data,
                vocab_size,
                min_frequency,
                out,
            }) => {
                let mut overrides = vec![
                    format!("tokenizer.vocab_size={vocab_size}"),
                    format!("tokenizer.min_frequency={min_frequency}"),
                ];
                if let Some(d) = &data {
                    overrides.push(format!("data.path={:?}", d.display().to_string()));
                }
                let resolved: pretext_cli::config::Resolved<MlmConfig> =
                    pretext_cli::config::resolve(pretext_mlm::config::DEFAULT_CONFIG, None, &overrides)?;
                let tok = pretext_mlm::app::train_tokenizer(&resolved.config, &out)
                    .with_context(|| format!("training a tokenizer into {}", out.display()))?;
                println!(
                    "tokenizer: {} tokens -> {}, {}",
                    tok.vocab_size(),
                    out.join("tokenizer.json").display(),
                    out.join("vocab.txt").display()
                );
            }
            Own::FillMask {
                run,
                text,
                top_k,
                device,
            } => {
                let cfg: MlmConfig = run_config(&run, &[])?;
                let device = pretext_core::select_device(&device)?;
                let preds = pretext_mlm::app::fill_mask(&run, &cfg, &text, top_k, &device)
                    .with_context(|| format!("fill-mask with {}", run.display()))?;
                for (i, p) in preds.iter().enumerate() {
                    println!("[MASK] #{} (token {}):", i + 1, p.position);
                    for (tok, prob) in &p.candidates {
                        println!("  {tok:<20} {:6.2}%", prob * 100.0);
                    }
                }
            }
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    pretext_cli::runner::main::<Mlm, NoFlags, Own>()
}
