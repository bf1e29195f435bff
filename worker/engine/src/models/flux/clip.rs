//! CLIP text encoder (transformers' `CLIPTextModel`, and `CLIPTextModelWithProjection` when the
//! config has a projection): causal pre-LN transformer with quick-GELU (OpenAI CLIP) or GELU
//! (OpenCLIP). Flux uses only the pooled output, the final-layer-normed hidden state at the EOS
//! token; SDXL also taps the penultimate layer's hidden state and projects the pooled output.
//! Variables carry the checkpoint's names (`text_model.encoder.layers.N.self_attn.q_proj`, ...).

use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::layers::{Embedding, LayerNorm, Linear, Res, sdpa};
use super::weights::{Checkpoint, Source, load_strict};
use crate::EngineError;

/// The MLP's activation (transformers' `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP).
    Gelu,
}

impl Activation {
    fn forward(self, x: &Tensor) -> Res<Tensor> {
        match self {
            Activation::QuickGelu => x.f_mul(&x.f_mul_scalar(1.702)?.f_sigmoid()?),
            Activation::Gelu => x.f_gelu("none"),
        }
    }
}

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
    pub hidden_act: Activation,
    /// `Some(dim)` for `CLIPTextModelWithProjection`: a bias-free `text_projection` of the pooled
    /// output to `dim`.
    pub projection_dim: Option<i64>,
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
            hidden_act: Activation::QuickGelu,
            projection_dim: None,
        }
    }

    /// laion/CLIP-ViT-bigG-14 text model with its projection (SDXL's `text_encoder_2`).
    pub fn big_g() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
            hidden_act: Activation::Gelu,
            projection_dim: Some(1280),
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
            hidden_act: Activation::QuickGelu,
            projection_dim: None,
        }
    }

    /// A transformers `config.json`; a projection is built only for the
    /// `CLIPTextModelWithProjection` architecture (plain `CLIPTextModel` configs carry an unused
    /// `projection_dim` too).
    pub fn from_json(path: &Path) -> Result<Self, EngineError> {
        let v = super::read_json(path)?;
        let i = |k: &str| super::json_i64(&v, k, path);
        let hidden_act = match v
            .get("hidden_act")
            .and_then(|x| x.as_str())
            .unwrap_or("quick_gelu")
        {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            act => {
                return Err(EngineError::Load(format!(
                    "{}: hidden_act {act:?} is not supported (quick_gelu, gelu)",
                    path.display()
                )));
            }
        };
        let with_projection = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x.as_str() == Some("CLIPTextModelWithProjection"))
            });
        let projection_dim = if with_projection {
            Some(i("projection_dim")?)
        } else {
            None
        };
        Ok(Self {
            vocab_size: i("vocab_size")?,
            hidden_size: i("hidden_size")?,
            intermediate_size: i("intermediate_size")?,
            num_hidden_layers: i("num_hidden_layers")?,
            num_attention_heads: i("num_attention_heads")?,
            max_position_embeddings: i("max_position_embeddings")?,
            layer_norm_eps: v.get("layer_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
            eos_token_id: v.get("eos_token_id").and_then(|x| x.as_i64()).unwrap_or(2),
            hidden_act,
            projection_dim,
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
    pub text_projection: Option<Linear>,
    pub vs: nn::VarStore,
}

/// What [`ClipTextModel::encode`] computes.
#[derive(Debug)]
pub struct ClipOutput {
    /// transformers' `hidden_states[-1 - skip]`: the residual stream after all but the last
    /// `skip` layers, not final-layer-normed `(b, seq, h)`.
    pub hidden: Tensor,
    /// The final-layer-normed last hidden state `(b, seq, h)`.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at the EOS token `(b, h)`.
    pub pooled: Tensor,
    /// `text_projection(pooled)` `(b, projection_dim)`, with a projection.
    pub text_embeds: Option<Tensor>,
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
        let text_projection = match c.projection_dim {
            Some(p) => Some(Linear::new(vs.root() / "text_projection", h, p, false)?),
            None => None,
        };
        vs.freeze();
        Ok(Self {
            config: c.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            vs,
        })
    }

    /// Loads `model.safetensors` (or its shards) from a transformers `CLIPTextModel` /
    /// `CLIPTextModelWithProjection` folder; the legacy `text_model.embeddings.position_ids`
    /// buffer is ignored if present.
    pub fn load(c: &Config, dir: &Path, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let ck = Checkpoint::open_dir(dir, "model")?;
        // transformers <= 4 saves `text_model.*` (as FLUX.1's checkpoint has); 5.x drops the prefix
        // of a `CLIPTextModel` (a `CLIPTextModelWithProjection` keeps it).
        let prefixed = ck.tensors.keys().any(|k| k.starts_with("text_model."));
        let source = move |n: &str| match n.strip_prefix("text_model.") {
            Some(rest) if !prefixed => Source::Key(rest.to_string()),
            _ => Source::Key(n.to_string()),
        };
        Self::load_from(
            c,
            &ck,
            "clip text encoder",
            &source,
            &|k| k.ends_with("embeddings.position_ids"),
            device,
            kind,
        )
    }

    /// Strictly loads the model from `ck` (see [`load_strict`]: `source` maps each variable name
    /// to its checkpoint tensors, `ignore` names the keys of `ck` that are not this model's).
    pub fn load_from(
        c: &Config,
        ck: &Checkpoint,
        what: &str,
        source: &dyn Fn(&str) -> Source,
        ignore: &dyn Fn(&str) -> bool,
        device: Device,
        kind: Kind,
    ) -> Result<Self, EngineError> {
        let model = {
            let _zero = super::layers::NoRandomInit::new();
            Self::new(c, device, kind)?
        };
        load_strict(&model.vs, ck, what, source, ignore)?;
        Ok(model)
    }

    /// ids `(b, seq)` -> (last hidden state `(b, seq, h)`, pooled `(b, h)`).
    pub fn forward(&self, ids: &Tensor) -> Res<(Tensor, Tensor)> {
        let o = self.encode(ids, 0)?;
        Ok((o.last_hidden_state, o.pooled))
    }

    /// ids `(b, seq)` -> every output, with the hidden state `skip` layers before the last
    /// (SDXL uses `skip = 1`, the penultimate layer).
    pub fn encode(&self, ids: &Tensor, skip: usize) -> Res<ClipOutput> {
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
        // A `skip` of every layer or more taps the embeddings (transformers' `hidden_states[0]`).
        let tap = self.layers.len().saturating_sub(skip);
        let mut hidden = h.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            let x = l.layer_norm1.forward(&h)?;
            let q = heads(l.q_proj.forward(&x)?)?;
            let k = heads(l.k_proj.forward(&x)?)?;
            let v = heads(l.v_proj.forward(&x)?)?;
            let a = sdpa(&q, &k, &v, None, true, None)?
                .f_transpose(1, 2)?
                .f_reshape([b, s, c.hidden_size])?;
            h = h.f_add(&l.out_proj.forward(&a)?)?;
            let x = l.fc1.forward(&l.layer_norm2.forward(&h)?)?;
            h = h.f_add(&l.fc2.forward(&c.hidden_act.forward(&x)?)?)?;
            if i + 1 == tap {
                hidden = h.shallow_clone();
            }
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
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?), // (b, projection_dim)
            None => None,
        };
        Ok(ClipOutput {
            hidden,
            last_hidden_state: h,
            pooled,
            text_embeds,
        })
    }
}
