//! CLIP text encoder (transformers' `CLIPTextModel`): causal pre-LN transformer with quick-GELU;
//! Flux uses only the pooled output, the final-layer-normed hidden state at the EOS token.
//! Variables carry the checkpoint's names (`text_model.encoder.layers.N.self_attn.q_proj`, ...).

use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::layers::{Embedding, LayerNorm, Linear, Res, sdpa};
use super::weights::{Checkpoint, Source, load_strict};
use crate::EngineError;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub layer_norm_eps: f64,
    /// `2` selects transformers' legacy pooling (argmax of the ids); otherwise the first
    /// occurrence of this id.
    pub eos_token_id: i64,
}

impl Config {
    /// openai/clip-vit-large-patch14 text model (FLUX.1 `text_encoder`).
    pub fn large() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }

    pub fn dev() -> Self {
        Self::large()
    }

    pub fn schnell() -> Self {
        Self::large()
    }

    pub fn tiny() -> Self {
        Self {
            vocab_size: 384,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }

    pub fn from_json(path: &Path) -> Result<Self, EngineError> {
        let v = super::read_json(path)?;
        let i = |k: &str| super::json_i64(&v, k, path);
        let act = v
            .get("hidden_act")
            .and_then(|x| x.as_str())
            .unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(EngineError::Load(format!(
                "{}: hidden_act {act:?} is not supported (quick_gelu)",
                path.display()
            )));
        }
        Ok(Self {
            vocab_size: i("vocab_size")?,
            hidden_size: i("hidden_size")?,
            intermediate_size: i("intermediate_size")?,
            num_hidden_layers: i("num_hidden_layers")?,
            num_attention_heads: i("num_attention_heads")?,
            max_position_embeddings: i("max_position_embeddings")?,
            layer_norm_eps: v.get("layer_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
            eos_token_id: v.get("eos_token_id").and_then(|x| x.as_i64()).unwrap_or(2),
        })
    }
}

#[derive(Debug)]
pub struct EncoderLayer {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm1: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub layer_norm2: LayerNorm,
}

#[derive(Debug)]
pub struct ClipTextModel {
    pub config: Config,
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
    pub layers: Vec<EncoderLayer>,
    pub final_layer_norm: LayerNorm,
    pub vs: nn::VarStore,
}

impl ClipTextModel {
    pub fn new(c: &Config, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let r = vs.root() / "text_model";
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        let emb = &r / "embeddings";
        let token_embedding = Embedding::new(&emb / "token_embedding", c.vocab_size, h)?;
        let position_embedding = Embedding::new(&emb / "position_embedding", c.max_position_embeddings, h)?;
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let l = &r / "encoder" / "layers" / i;
            let a = &l / "self_attn";
            layers.push(EncoderLayer {
                q_proj: Linear::new(&a / "q_proj", h, h, true)?,
                k_proj: Linear::new(&a / "k_proj", h, h, true)?,
                v_proj: Linear::new(&a / "v_proj", h, h, true)?,
                out_proj: Linear::new(&a / "out_proj", h, h, true)?,
                layer_norm1: LayerNorm::new(&l / "layer_norm1", h, eps)?,
                fc1: Linear::new(&l / "mlp" / "fc1", h, c.intermediate_size, true)?,
                fc2: Linear::new(&l / "mlp" / "fc2", c.intermediate_size, h, true)?,
                layer_norm2: LayerNorm::new(&l / "layer_norm2", h, eps)?,
            });
        }
        let final_layer_norm = LayerNorm::new(&r / "final_layer_norm", h, eps)?;
        vs.freeze();
        Ok(Self {
            config: c.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            vs,
        })
    }

    /// Loads `model.safetensors` from a transformers `CLIPTextModel` folder; the legacy
    /// `text_model.embeddings.position_ids` buffer is ignored if present.
    pub fn load(c: &Config, dir: &Path, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let model = {
            let _zero = super::layers::NoRandomInit::new();
            Self::new(c, device, kind)?
        };
        let ck = Checkpoint::open_dir(dir, "model")?;
        // transformers <= 4 saves `text_model.*` (as FLUX.1's checkpoint has); 5.x drops the prefix.
        let prefixed = ck.tensors.keys().any(|k| k.starts_with("text_model."));
        let source = move |n: &str| match n.strip_prefix("text_model.") {
            Some(rest) if !prefixed => Source::Key(rest.to_string()),
            _ => Source::Key(n.to_string()),
        };
        load_strict(&model.vs, &ck, "clip text encoder", &source, &|k| {
            k.ends_with("embeddings.position_ids")
        })?;
        Ok(model)
    }

    /// ids `(b, seq)` -> (last hidden state `(b, seq, h)`, pooled `(b, h)`).
    pub fn forward(&self, ids: &Tensor) -> Res<(Tensor, Tensor)> {
        let c = &self.config;
        let (b, s) = ids.size2()?;
        let nh = c.num_attention_heads;
        let hd = c.hidden_size / nh;
        let pos = Tensor::f_arange(s, (Kind::Int64, ids.device()))?;
        let mut h = self
            .token_embedding
            .forward(ids)?
            .f_add(&self.position_embedding.forward(&pos)?)?; // (b, seq, h)
        let heads = |x: Tensor| x.f_reshape([b, s, nh, hd])?.f_transpose(1, 2); // (b, heads, seq, hd)
        for l in &self.layers {
            let x = l.layer_norm1.forward(&h)?;
            let q = heads(l.q_proj.forward(&x)?)?;
            let k = heads(l.k_proj.forward(&x)?)?;
            let v = heads(l.v_proj.forward(&x)?)?;
            let a = sdpa(&q, &k, &v, None, true, None)?
                .f_transpose(1, 2)?
                .f_reshape([b, s, c.hidden_size])?;
            h = h.f_add(&l.out_proj.forward(&a)?)?;
            let x = l.fc1.forward(&l.layer_norm2.forward(&h)?)?;
            let x = x.f_mul(&x.f_mul_scalar(1.702)?.f_sigmoid()?)?; // quick_gelu
            h = h.f_add(&l.fc2.forward(&x)?)?;
        }
        let h = self.final_layer_norm.forward(&h)?;
        let eos_pos = if c.eos_token_id == 2 {
            ids.f_argmax(-1, false)?
        } else {
            ids.f_eq(c.eos_token_id)?
                .f_to_kind(Kind::Int)?
                .f_argmax(-1, false)?
        }; // (b,)
        let batch = Tensor::f_arange(b, (Kind::Int64, ids.device()))?;
        let pooled = h.f_index(&[Some(batch), Some(eos_pos)])?; // (b, h)
        Ok((h, pooled))
    }
}
