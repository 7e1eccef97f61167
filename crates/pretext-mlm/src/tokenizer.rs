//! The WordPiece tokenizer: trained on the corpus with the `tokenizers`
//! crate exactly as Python's `BertWordPieceTokenizer` builds one (BERT
//! normaliser with lowercasing, BERT pre-tokeniser, `##` continuation
//! prefix, `[CLS] … [SEP]` post-processor), saved as `tokenizer.json` (which
//! Python's `tokenizers` and `transformers` load) plus `vocab.txt`.

use pretext_core::{Error, Result};
use std::path::Path;
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// The special tokens, in id order: `[PAD]` is 0, `[MASK]` is 4.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// The token ids a collator needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `[PAD]`.
    pub pad: u32,
    /// `[CLS]`.
    pub cls: u32,
    /// `[SEP]`.
    pub sep: u32,
    /// `[MASK]`.
    pub mask: u32,
    /// Ids below this are special tokens (never chosen, never drawn as random replacements).
    pub first_regular: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
}

/// A WordPiece tokenizer and the ids of its special tokens.
#[derive(Clone)]
pub struct WordPieceTokenizer {
    inner: Tokenizer,
    /// `[PAD]`.
    pub pad: u32,
    /// `[UNK]`.
    pub unk: u32,
    /// `[CLS]`.
    pub cls: u32,
    /// `[SEP]`.
    pub sep: u32,
    /// `[MASK]`.
    pub mask: u32,
}

fn tk_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("{what}: {e}"))
}

impl WordPieceTokenizer {
    /// The token ids the collator needs.
    ///
    /// # Errors
    /// A tokenizer whose special tokens do not come first in its vocabulary.
    pub fn special_ids(&self) -> pretext_core::Result<SpecialIds> {
        let tok = self;
        let first_regular = [tok.pad, tok.unk, tok.cls, tok.sep, tok.mask]
            .into_iter()
            .max()
            .unwrap_or(0)
            + 1;
        let vocab_size = tok.vocab_size() as u32;
        if first_regular >= vocab_size {
            return Err(pretext_core::Error::Config(
                "the tokenizer's special tokens must come first in its vocabulary (ids below every regular token)"
                    .into(),
            ));
        }
        Ok(SpecialIds {
            pad: tok.pad,
            cls: tok.cls,
            sep: tok.sep,
            mask: tok.mask,
            first_regular,
            vocab_size,
        })
    }

    /// Trains a vocabulary of at most `vocab_size` tokens (special tokens
    /// included) on `docs`; pieces seen fewer than `min_frequency` times are left out.
    ///
    /// # Errors
    /// An empty corpus or a vocabulary too small for the special tokens.
    pub fn train(docs: &[String], vocab_size: usize, min_frequency: u64) -> Result<Self> {
        if docs.iter().all(|d| d.trim().is_empty()) {
            return Err(Error::Data("empty corpus: no text to train a tokenizer on".into()));
        }
        if vocab_size < SPECIAL_TOKENS.len() + 30 {
            return Err(Error::Config(format!(
                "tokenizer.vocab_size = {vocab_size}: too small (at least {})",
                SPECIAL_TOKENS.len() + 30
            )));
        }
        let model = WordPiece::builder()
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .build()
            .map_err(|e| tk_err("tokenizer", e))?;
        let mut tok = Tokenizer::new(model);
        tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .map_err(|e| tk_err("tokenizer", e))?;
        tok.with_pre_tokenizer(Some(BertPreTokenizer));
        tok.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::new("##".into(), true)));
        let mut trainer = TrainerWrapper::WordPieceTrainer(
            WordPieceTrainer::builder()
                .vocab_size(vocab_size)
                .min_frequency(min_frequency)
                .show_progress(false)
                .limit_alphabet(1000)
                .special_tokens(SPECIAL_TOKENS.iter().map(|s| AddedToken::from(*s, true)).collect())
                .continuing_subword_prefix("##".into())
                .build(),
        );
        tok.train(&mut trainer, docs.iter())
            .map_err(|e| tk_err("training the tokenizer", e))?;
        let t = Self::wrap(tok, Path::new("trained tokenizer"))?;
        let mut inner = t.inner.clone();
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), t.sep),
            ("[CLS]".into(), t.cls),
        )));
        Self::wrap(inner, Path::new("trained tokenizer"))
    }

    fn wrap(inner: Tokenizer, origin: &Path) -> Result<Self> {
        let id = |s: &str| {
            inner.token_to_id(s).ok_or_else(|| {
                Error::corrupt(
                    origin,
                    format!("the tokenizer has no {s} token (a BERT WordPiece tokenizer needs {SPECIAL_TOKENS:?})"),
                )
            })
        };
        Ok(Self {
            pad: id("[PAD]")?,
            unk: id("[UNK]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
            inner,
        })
    }

    /// Loads a `tokenizer.json`.
    ///
    /// # Errors
    /// An unreadable or invalid file, or one without BERT's special tokens, naming the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Config(format!("{}: no such tokenizer file", path.display())));
        }
        let inner =
            Tokenizer::from_file(path).map_err(|e| Error::corrupt(path, format!("not a tokenizer.json: {e}")))?;
        Self::wrap(inner, path)
    }

    /// A BERT tokenizer from a `vocab.txt` (one token per line, id = line
    /// number), as `BertTokenizer` builds one: BERT normaliser (lowercasing
    /// when `lowercase`), BERT pre-tokeniser, `##` continuations, `[CLS] …
    /// [SEP]` around each text.
    ///
    /// # Errors
    /// An unreadable vocabulary, or one without BERT's special tokens, named.
    pub fn from_vocab(path: &Path, lowercase: bool) -> Result<Self> {
        let file = path.to_str().ok_or_else(|| Error::corrupt(path, "not a UTF-8 path"))?;
        let model = WordPiece::from_file(file)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .build()
            .map_err(|e| Error::corrupt(path, format!("not a vocab.txt: {e}")))?;
        let mut tok = Tokenizer::new(model);
        tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
            .map_err(|e| tk_err("tokenizer", e))?;
        tok.with_pre_tokenizer(Some(BertPreTokenizer));
        tok.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::new("##".into(), true)));
        let t = Self::wrap(tok, path)?;
        let mut inner = t.inner.clone();
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), t.sep),
            ("[CLS]".into(), t.cls),
        )));
        Self::wrap(inner, path)
    }

    /// The `tokenizer.json` text.
    ///
    /// # Errors
    /// Serialisation failed.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| tk_err("tokenizer.json", e))
    }

    /// `vocab.txt`: one token per line, in id order (what `BertTokenizer` reads).
    pub fn vocab_txt(&self) -> String {
        let mut out = String::new();
        for id in 0..self.vocab_size() as u32 {
            out.push_str(&self.token(id));
            out.push('\n');
        }
        out
    }

    /// Writes `tokenizer.json` and `vocab.txt` into `dir` (each atomically).
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        pretext_core::run::write_atomic(&dir.join("tokenizer.json"), self.to_json()?.as_bytes())?;
        pretext_core::run::write_atomic(&dir.join("vocab.txt"), self.vocab_txt().as_bytes())
    }

    /// Tokens in the vocabulary (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The text of token `id` (`[UNK]` for an unknown id).
    pub fn token(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_else(|| "[UNK]".into())
    }

    /// The id of `token`, if it is in the vocabulary.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`, without special tokens added.
    ///
    /// # Errors
    /// Tokenisation failed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| tk_err("tokenizing", e))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of many texts (in parallel), without special tokens.
    ///
    /// # Errors
    /// Tokenisation failed.
    pub fn encode_all(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let enc = self
            .inner
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), false)
            .map_err(|e| tk_err("tokenizing", e))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Whether `id` is one of the special tokens.
    pub fn is_special(&self, id: u32) -> bool {
        [self.pad, self.unk, self.cls, self.sep, self.mask].contains(&id)
    }

    /// Text of ids, WordPiece pieces joined (`##` removed), special tokens skipped.
    ///
    /// # Errors
    /// Decoding failed.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| tk_err("decoding", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let base = [
            "The quick brown fox jumps over the lazy dog.",
            "Computers are useless. They can only give you answers.",
            "A journey of a thousand miles begins with a single step.",
            "To err is human; to really foul things up requires a computer.",
        ];
        (0..20).flat_map(|_| base.iter().map(|s| s.to_string())).collect()
    }

    #[test]
    fn trains_saves_and_loads_a_bert_tokenizer() -> Result<()> {
        let t = WordPieceTokenizer::train(&corpus(), 120, 2)?;
        assert_eq!((t.pad, t.unk, t.cls, t.sep, t.mask), (0, 1, 2, 3, 4));
        assert!(t.vocab_size() <= 120 && t.vocab_size() > 40, "{}", t.vocab_size());
        let ids = t.encode("COMPUTERS are useless")?;
        assert!(!ids.is_empty() && !ids.contains(&t.unk), "{ids:?}");
        assert_eq!(t.decode(&ids)?, "computers are useless", "lowercased and rejoined");
        let d = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        t.save(d.path())?;
        let vocab = std::fs::read_to_string(d.path().join("vocab.txt")).map_err(|e| Error::io("vocab", e))?;
        let lines: Vec<&str> = vocab.lines().collect();
        assert_eq!(lines.len(), t.vocab_size());
        assert_eq!(&lines[..5], &SPECIAL_TOKENS);
        assert!(lines.iter().any(|l| l.starts_with("##")), "continuation pieces");
        let back = WordPieceTokenizer::from_file(&d.path().join("tokenizer.json"))?;
        assert_eq!(
            back.encode("a journey of a thousand computers")?,
            t.encode("a journey of a thousand computers")?
        );
        let json: serde_json::Value =
            serde_json::from_str(&back.to_json()?).map_err(|e| Error::Config(e.to_string()))?;
        assert_eq!(json["model"]["type"], "WordPiece");
        assert_eq!(json["post_processor"]["type"], "BertProcessing");
        Ok(())
    }

    #[test]
    fn bad_files_and_empty_corpora_are_clear_errors() -> Result<()> {
        assert!(WordPieceTokenizer::train(&["  ".to_string()], 100, 1)
            .err()
            .map(|e| e.to_string().contains("empty corpus"))
            .unwrap_or(false));
        let d = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = d.path().join("tokenizer.json");
        std::fs::write(&p, b"{not json").map_err(|e| Error::io(&p, e))?;
        let e = WordPieceTokenizer::from_file(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("tokenizer.json") && e.contains("not a tokenizer.json"),
            "{e}"
        );
        let e = WordPieceTokenizer::from_file(&d.path().join("missing.json"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("no such tokenizer file"), "{e}");
        Ok(())
    }
}
