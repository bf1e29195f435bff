//! Prompt tokenizers, padded and truncated to a fixed length as FluxPipeline and
//! StableDiffusionXLPipeline do (`padding="max_length"`, `truncation=True`).
//!
//! * CLIP (`tokenizer/`): `tokenizer.json` if present, else built from `vocab.json` +
//!   `merges.txt` exactly as transformers' `CLIPTokenizer` builds its backend (NFC, whitespace
//!   collapse, lowercase; CLIP split regex + byte-level; BPE with `</w>` word suffix; Roberta-style
//!   `<|startoftext|> ... <|endoftext|>`). The pad token is a special token too, as transformers
//!   registers it: SDXL's `tokenizer_2` pads with `!`, so a `!` in a prompt becomes the pad id.
//! * T5 (`tokenizer_2/`): `tokenizer.json` (Unigram; appends `</s>`; pad `<pad>`).

use std::path::Path;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormSeq};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::EngineError;

const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("tokenizer: {e}"))
}

/// A tokenizer that always returns exactly `max_len` ids.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    pub max_len: usize,
    pub pad_id: u32,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// Reads a token name from `special_tokens_map.json` / `tokenizer_config.json` (string or
/// `{"content": ...}`).
fn special_token(dir: &Path, key: &str) -> Option<String> {
    for f in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(f)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match v.get(key) {
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(obj) => {
                if let Some(s) = obj.get("content").and_then(|c| c.as_str()) {
                    return Some(s.to_string());
                }
            }
            None => {}
        }
    }
    None
}

impl PromptTokenizer {
    fn finish(mut tokenizer: Tokenizer, max_len: usize, pad_token: &str) -> Result<Self, EngineError> {
        let pad_id = tokenizer
            .token_to_id(pad_token)
            .ok_or_else(|| tok_err(format!("pad token {pad_token:?} is not in the vocabulary")))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tok_err)?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.to_string(),
        }));
        Ok(Self {
            tokenizer,
            max_len,
            pad_id,
        })
    }

    /// CLIP's tokenizer from a `tokenizer/` folder.
    pub fn clip_from_dir(dir: &Path, max_len: usize) -> Result<Self, EngineError> {
        let pad = special_token(dir, "pad_token").unwrap_or_else(|| "<|endoftext|>".into());
        let json = dir.join("tokenizer.json");
        if json.exists() {
            let tokenizer = Tokenizer::from_file(&json).map_err(tok_err)?;
            return Self::finish(tokenizer, max_len, &pad);
        }
        let bos = special_token(dir, "bos_token").unwrap_or_else(|| "<|startoftext|>".into());
        let eos = special_token(dir, "eos_token").unwrap_or_else(|| "<|endoftext|>".into());
        let unk = special_token(dir, "unk_token").unwrap_or_else(|| "<|endoftext|>".into());
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(unk)
            .fuse_unk(false)
            .build()
            .map_err(tok_err)?;
        Self::finish(Self::clip_pipeline(bpe, &bos, &eos, &pad)?, max_len, &pad)
    }

    fn clip_pipeline(bpe: BPE, bos: &str, eos: &str, pad: &str) -> Result<Tokenizer, EngineError> {
        let mut tokenizer = Tokenizer::new(bpe);
        let replace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(tok_err)?;
        tokenizer.with_normalizer(Some(NormSeq::new(vec![
            NFC.into(),
            replace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tok_err)?;
        tokenizer.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        tokenizer.add_special_tokens(&[
            AddedToken::from(bos.to_string(), true),
            AddedToken::from(eos.to_string(), true),
            AddedToken::from(pad.to_string(), true),
        ]);
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| tok_err(format!("{t:?} is not in the vocabulary")))
        };
        let (bos_id, eos_id) = (id(bos)?, id(eos)?);
        let post = RobertaProcessing::new((eos.to_string(), eos_id), (bos.to_string(), bos_id))
            .trim_offsets(false)
            .add_prefix_space(false);
        tokenizer.with_post_processor(Some(post));
        Ok(tokenizer)
    }

    /// T5's tokenizer from a `tokenizer_2/` folder (`tokenizer.json`).
    pub fn t5_from_dir(dir: &Path, max_len: usize) -> Result<Self, EngineError> {
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(tok_err)?;
        let pad = special_token(dir, "pad_token").unwrap_or_else(|| "<pad>".into());
        Self::finish(tokenizer, max_len, &pad)
    }

    /// The byte-level alphabet, sorted: one token per byte, with and without `</w>`.
    fn byte_vocab(first_id: u32) -> Vec<(String, u32)> {
        let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        chars.sort_unstable();
        let mut out = Vec::new();
        let mut id = first_id;
        for c in chars {
            out.push((c.to_string(), id));
            out.push((format!("{c}</w>"), id + 1));
            id += 2;
        }
        out
    }

    /// Vocabulary size of the tiny tokenizers (2 or 3 specials + 512 byte tokens, rounded up).
    pub const TINY_VOCAB: i64 = 520;

    /// A tiny CLIP-style tokenizer built in code: byte-level BPE without merges (every byte is a
    /// token), `<|startoftext|>` = 0, `<|endoftext|>` = 1 (also pad), bytes from 2.
    pub fn tiny_clip(max_len: usize) -> Result<Self, EngineError> {
        let mut vocab = vec![
            ("<|startoftext|>".to_string(), 0),
            ("<|endoftext|>".to_string(), 1),
        ];
        vocab.extend(Self::byte_vocab(2));
        let vocab: Vocab = vocab.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token("<|endoftext|>".into())
            .build()
            .map_err(tok_err)?;
        Self::finish(
            Self::clip_pipeline(bpe, "<|startoftext|>", "<|endoftext|>", "<|endoftext|>")?,
            max_len,
            "<|endoftext|>",
        )
    }

    /// A tiny T5-style tokenizer built in code: `<pad>` = 0, `</s>` = 1, `<unk>` = 2, byte tokens
    /// from 3; appends `</s>`.
    pub fn tiny_t5(max_len: usize) -> Result<Self, EngineError> {
        let mut vocab = vec![
            ("<pad>".to_string(), 0),
            ("</s>".to_string(), 1),
            ("<unk>".to_string(), 2),
        ];
        vocab.extend(Self::byte_vocab(3));
        let vocab: Vocab = vocab.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .end_of_word_suffix("</w>".into())
            .unk_token("<unk>".into())
            .build()
            .map_err(tok_err)?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.add_special_tokens(&[AddedToken::from("<pad>", true), AddedToken::from("</s>", true)]);
        let post = TemplateProcessing::builder()
            .try_single("$A </s>")
            .map_err(tok_err)?
            .special_tokens(vec![("</s>", 1)])
            .build()
            .map_err(tok_err)?;
        tokenizer.with_post_processor(Some(post));
        Self::finish(tokenizer, max_len, "<pad>")
    }

    /// Token ids, exactly `max_len` of them.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, EngineError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::InvalidRequest(format!("tokenizer: {e}")))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        if ids.len() != self.max_len {
            return Err(EngineError::Torch(format!(
                "tokenizer returned {} ids, expected {}",
                ids.len(),
                self.max_len
            )));
        }
        Ok(ids)
    }
}
