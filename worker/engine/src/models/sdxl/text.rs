//! SDXL's prompt conditioning, as `StableDiffusionXLPipeline.encode_prompt` computes it:
//!
//! * `tokenizer` + `text_encoder` (OpenAI CLIP ViT-L/14, `CLIPTextModel`, quick-GELU) and
//!   `tokenizer_2` + `text_encoder_2` (OpenCLIP ViT-bigG/14, `CLIPTextModelWithProjection`,
//!   GELU), the same prompt through both, padded/truncated to 77 tokens (`tokenizer_2` pads
//!   with `!`);
//! * prompt embeds: the penultimate layer's hidden states (`hidden_states[-2]`, before the final
//!   layer norm) of both, concatenated on the feature axis `(b, 77, 768 + 1280)`;
//! * pooled embeds: `text_encoder_2`'s `text_embeds`, the projection of its final-layer-normed
//!   EOS token `(b, 1280)`;
//! * the negative side for classifier-free guidance: zeros when no negative prompt is given and
//!   the pipeline has `force_zeros_for_empty_prompt` (SDXL base's default), else the encoded
//!   negative prompt (`""` when none is given). An explicit `""` is encoded, not zeroed.
//!
//! `prompt_2`/`negative_prompt_2` (a different prompt for the second encoder) are not exposed:
//! both encoders always get the same text, as when diffusers' callers leave them unset.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::Weights;
use super::keys;
use crate::EngineError;
use crate::flux::clip::{self, ClipTextModel};
use crate::flux::tokenizer::PromptTokenizer;
use crate::flux::weights::{Checkpoint, Source};

/// The conditioning of a batch of prompts.
#[derive(Debug)]
pub struct PromptEmbeds {
    /// `(b, 77, 2048)` for SDXL: CLIP-L's and bigG's penultimate hidden states side by side.
    pub embeds: Tensor,
    /// `(b, 1280)` for SDXL: bigG's projected EOS embedding.
    pub pooled: Tensor,
}

/// Both tokenizers and text encoders.
#[derive(Debug)]
pub struct TextEncoders {
    pub tokenizer: PromptTokenizer,
    pub tokenizer_2: PromptTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: ClipTextModel,
    /// Zeros, not the encoded empty prompt, for the negative side when no negative prompt is
    /// given (the pipeline's `force_zeros_for_empty_prompt`, from `model_index.json`).
    pub force_zeros_for_empty_prompt: bool,
}

/// The hidden state SDXL takes: `hidden_states[-2]`, one layer before the last.
const PENULTIMATE: usize = 1;

fn load_err(msg: impl Into<String>) -> EngineError {
    EngineError::Load(msg.into())
}

impl TextEncoders {
    /// Loads from a diffusers SDXL folder `dir` (configs from `text_encoder*/config.json`,
    /// tokenizers from `tokenizer*/`, `force_zeros_for_empty_prompt` from `model_index.json`)
    /// with the weights from `weights`, strictly: every missing or unexpected key is listed.
    pub fn load(dir: &Path, weights: &Weights, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let config = clip::Config::from_json(&dir.join("text_encoder/config.json"))?;
        let config_2 = clip::Config::from_json(&dir.join("text_encoder_2/config.json"))?;
        if config_2.projection_dim.is_none() {
            return Err(load_err(format!(
                "{}: text_encoder_2 must be a CLIPTextModelWithProjection (its text_embeds are \
                 SDXL's pooled embeds)",
                dir.join("text_encoder_2/config.json").display()
            )));
        }
        let (text_encoder, text_encoder_2) = match weights {
            Weights::Diffusers => (
                ClipTextModel::load(&config, &dir.join("text_encoder"), device, kind)?,
                ClipTextModel::load(&config_2, &dir.join("text_encoder_2"), device, kind)?,
            ),
            Weights::SingleFile(file) => {
                let ck = Checkpoint::open_file(file)?;
                let hidden = config_2.hidden_size;
                (
                    ClipTextModel::load_from(
                        &config,
                        &ck,
                        "sdxl text_encoder (conditioner.embedders.0)",
                        &keys::clip_l,
                        &keys::clip_l_ignored,
                        device,
                        kind,
                    )?,
                    ClipTextModel::load_from(
                        &config_2,
                        &ck,
                        "sdxl text_encoder_2 (conditioner.embedders.1)",
                        &|n: &str| -> Source { keys::open_clip(n, hidden) },
                        &keys::open_clip_ignored,
                        device,
                        kind,
                    )?,
                )
            }
        };
        let tokenizer =
            PromptTokenizer::clip_from_dir(&dir.join("tokenizer"), config.max_position_embeddings as usize)?;
        let tokenizer_2 = PromptTokenizer::clip_from_dir(
            &dir.join("tokenizer_2"),
            config_2.max_position_embeddings as usize,
        )?;
        let index = dir.join("model_index.json");
        let force_zeros_for_empty_prompt = if index.exists() {
            crate::flux::read_json(&index)?
                .get("force_zeros_for_empty_prompt")
                .and_then(|v| v.as_bool())
                .unwrap_or(true)
        } else {
            true
        };
        Ok(Self {
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            force_zeros_for_empty_prompt,
        })
    }

    /// Token ids of `prompts` from `tokenizer` `(b, 77)` on `device`.
    fn ids(tokenizer: &PromptTokenizer, prompts: &[&str], device: Device) -> Result<Tensor, EngineError> {
        let mut all = Vec::with_capacity(prompts.len() * tokenizer.max_len);
        for p in prompts {
            all.extend(tokenizer.encode(p)?);
        }
        Ok(Tensor::f_from_slice(&all)?
            .f_reshape([prompts.len() as i64, tokenizer.max_len as i64])?
            .f_to_device(device)?)
    }

    /// The conditioning of `prompts` (no negative side).
    pub fn encode(&self, prompts: &[&str]) -> Result<PromptEmbeds, EngineError> {
        if prompts.is_empty() {
            return Err(EngineError::InvalidRequest("no prompt to encode".into()));
        }
        let _g = tch::no_grad_guard();
        let ids = Self::ids(&self.tokenizer, prompts, self.text_encoder.vs.device())?;
        let ids_2 = Self::ids(&self.tokenizer_2, prompts, self.text_encoder_2.vs.device())?;
        let o = self.text_encoder.encode(&ids, PENULTIMATE)?;
        let o2 = self.text_encoder_2.encode(&ids_2, PENULTIMATE)?;
        let pooled = o2
            .text_embeds
            .ok_or_else(|| EngineError::Torch("text_encoder_2 has no text_projection".into()))?; // (b, proj)
        let device = o2.hidden.device();
        let embeds = Tensor::f_cat(&[o.hidden.f_to_device(device)?, o2.hidden], -1)?; // (b, 77, h1 + h2)
        Ok(PromptEmbeds { embeds, pooled })
    }

    /// `encode_prompt` with classifier-free guidance: `(positive, negative)`, each batched like
    /// `prompts`. `negative` applies to every prompt; `None` gives zeros under
    /// `force_zeros_for_empty_prompt`, else the encoded empty prompt.
    pub fn encode_with_negative(
        &self,
        prompts: &[&str],
        negative: Option<&str>,
    ) -> Result<(PromptEmbeds, PromptEmbeds), EngineError> {
        let positive = self.encode(prompts)?;
        let negative = match negative {
            None if self.force_zeros_for_empty_prompt => PromptEmbeds {
                embeds: positive.embeds.f_zeros_like()?,
                pooled: positive.pooled.f_zeros_like()?,
            },
            negative => self.encode(&vec![negative.unwrap_or(""); prompts.len()])?,
        };
        Ok((positive, negative))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, json: &str) -> clip::Config {
        let path = std::env::temp_dir().join(format!("ditfleet-sdxl-{}-{name}.json", std::process::id()));
        std::fs::write(&path, json).unwrap();
        let c = clip::Config::from_json(&path);
        std::fs::remove_file(&path).unwrap();
        c.unwrap()
    }

    /// stable-diffusion-xl-base-1.0's `text_encoder/config.json` and `text_encoder_2/config.json`
    /// parse to the CLIP-L and bigG presets: quick-GELU without a projection (its unused
    /// `projection_dim` ignored), GELU with one.
    #[test]
    fn sdxl_base_text_encoder_configs_parse_to_the_clip_l_and_big_g_presets() {
        let te = parse(
            "te",
            r#"{"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
            "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
            "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
            "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
            "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "vocab_size": 49408}"#,
        );
        assert_eq!(te, clip::Config::large());
        let te2 = parse(
            "te2",
            r#"{"architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0,
            "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280,
            "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 5120,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
            "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280,
            "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "vocab_size": 49408}"#,
        );
        assert_eq!(te2, clip::Config::big_g());
    }
}
