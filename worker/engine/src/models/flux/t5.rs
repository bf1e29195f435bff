//! T5 v1.1 encoder (transformers' `T5EncoderModel`): RMS norms, gated-GELU feed-forward,
//! unscaled attention with a relative position bias computed in layer 0 and shared by all layers.
//! Variables carry the checkpoint's names (`encoder.block.N.layer.0.SelfAttention.q`, ...).

use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::layers::{Embedding, Linear, Res, RmsNorm, sdpa};
use super::weights::{Checkpoint, Source, load_strict};
use crate::EngineError;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub relative_attention_num_buckets: i64,
    pub relative_attention_max_distance: i64,
    pub layer_norm_epsilon: f64,
}

impl Config {
    /// google/t5-v1_1-xxl (FLUX.1 `text_encoder_2`).
    pub fn xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
        }
    }

    /// Same encoder for both Flux variants.
    pub fn dev() -> Self {
        Self::xxl()
    }

    pub fn schnell() -> Self {
        Self::xxl()
    }

    pub fn tiny() -> Self {
        Self {
            vocab_size: 384,
            d_model: 32,
            d_kv: 8,
            d_ff: 64,
            num_layers: 2,
            num_heads: 4,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
        }
    }

    /// Reads the fields this encoder uses from a transformers `config.json`.
    pub fn from_json(path: &Path) -> Result<Self, EngineError> {
        let v = super::read_json(path)?;
        let i = |k: &str| super::json_i64(&v, k, path);
        let ff = v
            .get("feed_forward_proj")
            .and_then(|x| x.as_str())
            .unwrap_or("gated-gelu");
        let act = v
            .get("dense_act_fn")
            .and_then(|x| x.as_str())
            .unwrap_or("gelu_new");
        if ff != "gated-gelu" || !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
            return Err(EngineError::Load(format!(
                "{}: feed_forward_proj {ff:?} / dense_act_fn {act:?} not supported (T5 v1.1: gated-gelu, gelu_new)",
                path.display()
            )));
        }
        Ok(Self {
            vocab_size: i("vocab_size")?,
            d_model: i("d_model")?,
            d_kv: i("d_kv")?,
            d_ff: i("d_ff")?,
            num_layers: i("num_layers")?,
            num_heads: i("num_heads")?,
            relative_attention_num_buckets: i("relative_attention_num_buckets")?,
            relative_attention_max_distance: v
                .get("relative_attention_max_distance")
                .and_then(|x| x.as_i64())
                .unwrap_or(128),
            layer_norm_epsilon: v
                .get("layer_norm_epsilon")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
        })
    }
}

#[derive(Debug)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub relative_attention_bias: Option<Embedding>,
}

#[derive(Debug)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub ff_norm: RmsNorm,
    pub wi_0: Linear,
    pub wi_1: Linear,
    pub wo: Linear,
}

#[derive(Debug)]
pub struct T5Encoder {
    pub config: Config,
    pub shared: Embedding,
    pub blocks: Vec<Block>,
    pub final_layer_norm: RmsNorm,
    pub vs: nn::VarStore,
}

impl T5Encoder {
    pub fn new(c: &Config, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let r = vs.root();
        let inner = c.num_heads * c.d_kv;
        let eps = c.layer_norm_epsilon;
        let shared = Embedding::new(&r / "shared", c.vocab_size, c.d_model)?;
        let mut blocks = Vec::new();
        for i in 0..c.num_layers {
            let b = &r / "encoder" / "block" / i / "layer";
            let sa = &b / 0 / "SelfAttention";
            let ff = &b / 1 / "DenseReluDense";
            blocks.push(Block {
                attn_norm: RmsNorm::new(&b / 0 / "layer_norm", "weight", c.d_model, eps)?,
                attn: Attention {
                    q: Linear::new(&sa / "q", c.d_model, inner, false)?,
                    k: Linear::new(&sa / "k", c.d_model, inner, false)?,
                    v: Linear::new(&sa / "v", c.d_model, inner, false)?,
                    o: Linear::new(&sa / "o", inner, c.d_model, false)?,
                    relative_attention_bias: if i == 0 {
                        Some(Embedding::new(
                            &sa / "relative_attention_bias",
                            c.relative_attention_num_buckets,
                            c.num_heads,
                        )?)
                    } else {
                        None
                    },
                },
                ff_norm: RmsNorm::new(&b / 1 / "layer_norm", "weight", c.d_model, eps)?,
                wi_0: Linear::new(&ff / "wi_0", c.d_model, c.d_ff, false)?,
                wi_1: Linear::new(&ff / "wi_1", c.d_model, c.d_ff, false)?,
                wo: Linear::new(&ff / "wo", c.d_ff, c.d_model, false)?,
            });
        }
        let final_layer_norm = RmsNorm::new(&r / "encoder" / "final_layer_norm", "weight", c.d_model, eps)?;
        vs.freeze();
        Ok(Self {
            config: c.clone(),
            shared,
            blocks,
            final_layer_norm,
            vs,
        })
    }

    /// Loads `model.safetensors` (or its sharded index) from a transformers folder.
    /// `encoder.embed_tokens.weight` (tied to `shared.weight`) is accepted in place of or
    /// alongside `shared.weight`.
    pub fn load(c: &Config, dir: &Path, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let model = {
            let _zero = super::layers::NoRandomInit::new();
            Self::new(c, device, kind)?
        };
        let ck = Checkpoint::open_dir(dir, "model")?;
        let has_shared = ck.contains("shared.weight");
        let source = move |n: &str| {
            if n == "shared.weight" && !has_shared {
                Source::Key("encoder.embed_tokens.weight".into())
            } else {
                Source::Key(n.to_string())
            }
        };
        load_strict(&model.vs, &ck, "t5 encoder", &source, &|k| {
            k == "encoder.embed_tokens.weight"
        })?;
        Ok(model)
    }

    /// Relative position buckets `(q, k)` as transformers computes them (bidirectional).
    fn buckets(&self, len: i64, device: Device) -> Res<Tensor> {
        let c = &self.config;
        let pos = Tensor::f_arange(len, (Kind::Int64, device))?;
        let rel = pos.f_unsqueeze(0)?.f_sub(&pos.f_unsqueeze(1)?)?; // memory - context, (q, k)
        let nb = c.relative_attention_num_buckets / 2;
        let mut buckets = rel.f_gt(0)?.f_to_kind(Kind::Int64)?.f_mul_scalar(nb)?;
        let rel = rel.f_abs()?;
        let max_exact = nb / 2;
        let is_small = rel.f_lt(max_exact)?;
        let large = rel
            .f_to_kind(Kind::Float)?
            .f_div_scalar(max_exact as f64)?
            .f_log()?
            .f_div_scalar((c.relative_attention_max_distance as f64 / max_exact as f64).ln())?
            .f_mul_scalar((nb - max_exact) as f64)?
            .f_to_kind(Kind::Int64)?
            .f_add_scalar(max_exact)?;
        let large = large.f_clamp_max(nb - 1)?;
        buckets = buckets.f_add(&rel.f_where_self(&is_small, &large)?)?;
        Ok(buckets)
    }

    /// ids `(b, seq)` int64 -> last hidden state `(b, seq, d_model)`. No attention mask (as
    /// FluxPipeline calls it: padding tokens are attended to).
    pub fn forward(&self, ids: &Tensor) -> Res<Tensor> {
        let c = &self.config;
        let (b, s) = ids.size2()?;
        let mut h = self.shared.forward(ids)?; // (b, seq, d_model)
        let rab = self
            .blocks
            .first()
            .and_then(|b| b.attn.relative_attention_bias.as_ref())
            .ok_or_else(|| tch::TchError::Torch("t5 encoder has no layers".into()))?;
        let bias = rab
            .forward(&self.buckets(s, ids.device())?)? // (q, k, heads)
            .f_permute([2, 0, 1])?
            .f_unsqueeze(0)?
            .f_to_kind(h.kind())?; // (1, heads, q, k)
        let heads = |x: Tensor| x.f_reshape([b, s, c.num_heads, c.d_kv])?.f_transpose(1, 2); // (b, heads, seq, d_kv)
        for blk in &self.blocks {
            let x = blk.attn_norm.forward(&h)?;
            let q = heads(blk.attn.q.forward(&x)?)?;
            let k = heads(blk.attn.k.forward(&x)?)?;
            let v = heads(blk.attn.v.forward(&x)?)?;
            let a = sdpa(&q, &k, &v, Some(&bias), false, Some(1.0))?; // T5 does not scale scores
            let a = a.f_transpose(1, 2)?.f_reshape([b, s, c.num_heads * c.d_kv])?;
            h = h.f_add(&blk.attn.o.forward(&a)?)?;
            let x = blk.ff_norm.forward(&h)?;
            let gated = blk
                .wi_0
                .forward(&x)?
                .f_gelu("tanh")?
                .f_mul(&blk.wi_1.forward(&x)?)?;
            h = h.f_add(&blk.wo.forward(&gated)?)?;
        }
        self.final_layer_norm.forward(&h)
    }
}
