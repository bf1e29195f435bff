//! SDXL's denoiser: diffusers' `UNet2DConditionModel` with the options SDXL uses (linear
//! transformer projections, GEGLU, `addition_embed_type="text_time"` micro-conditioning).
//!
//! Variables are named like the diffusers checkpoint (`down_blocks.1.attentions.0.
//! transformer_blocks.0.attn1.to_q.weight`, `add_embedding.linear_1`, ...); the original
//! single-file layout (`model.diffusion_model.input_blocks.*`) is mapped onto them at load time
//! ([`super::unet_keys`]). The blocks are in [`super::unet_blocks`], whose [`SpatialOps`] is where a
//! row-split multi-GPU forward plugs in.

use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::fast::{self, LocalOps, Perf};
pub use super::unet_blocks::Cond;
use super::unet_blocks::{DownBlock, MidBlock, ResnetBlock2D, Transformer2DModel, UpBlock};
use super::unet_keys;
use crate::EngineError;
use crate::flux::layers::{Conv2d, GroupNorm, Linear, NoRandomInit, Res};
use crate::flux::weights::{Checkpoint, Source, load_strict};
pub use crate::nn::spatial::{SingleDevice, SpatialOps};

/// Architecture hyper-parameters (the subset of diffusers' `UNet2DConditionModel` config that
/// SDXL-style UNets use; [`Config::from_json`] refuses the options this does not implement).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Channels per resolution level, full resolution first.
    pub block_out_channels: Vec<i64>,
    /// Per level: whether the down block has transformers (`CrossAttnDownBlock2D`) or not
    /// (`DownBlock2D`).
    pub down_attention: Vec<bool>,
    /// Per up block, lowest resolution first: `CrossAttnUpBlock2D` or `UpBlock2D`.
    pub up_attention: Vec<bool>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: i64,
    /// Transformer blocks per `Transformer2DModel`, per level; the up blocks use the list
    /// reversed and the mid block its last entry.
    pub transformer_layers_per_block: Vec<i64>,
    /// Attention heads per level (what diffusers' config calls `attention_head_dim`).
    pub num_attention_heads: Vec<i64>,
    /// Text token width (SDXL: CLIP-L 768 + OpenCLIP-bigG 1280).
    pub cross_attention_dim: i64,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    /// Width of the timestep embedding `emb` (diffusers: `4 * block_out_channels[0]`).
    pub time_embedding_dim: i64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// Sinusoidal width of each of the `time_ids` (original size, crop, target size).
    pub addition_time_embed_dim: i64,
    /// `add_embedding` input: pooled text width + `time_ids.len() * addition_time_embed_dim`.
    pub projection_class_embeddings_input_dim: i64,
}

impl Config {
    /// stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json`.
    pub fn sdxl_base() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280],
            down_attention: vec![false, true, true],
            up_attention: vec![true, true, false],
            layers_per_block: 2,
            transformer_layers_per_block: vec![1, 2, 10],
            num_attention_heads: vec![5, 10, 20],
            cross_attention_dim: 2048,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            time_embedding_dim: 1280,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            addition_time_embed_dim: 256,
            projection_class_embeddings_input_dim: 2816,
        }
    }

    /// SDXL's block structure at tiny widths (head dim 8, pooled text width 16; the committed
    /// goldens' config).
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![8, 16, 16],
            transformer_layers_per_block: vec![1, 2, 2],
            num_attention_heads: vec![1, 2, 2],
            cross_attention_dim: 32,
            norm_num_groups: 4,
            time_embedding_dim: 32,
            addition_time_embed_dim: 8,
            projection_class_embeddings_input_dim: 16 + 6 * 8,
            ..Self::sdxl_base()
        }
    }

    /// Width of the pooled text embedding `text_embeds` (with the six SDXL `time_ids`).
    pub fn text_embeds_dim(&self) -> i64 {
        self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim
    }

    /// Checks that the lists agree and the widths divide (errors name the field).
    pub fn validate(&self) -> Result<(), EngineError> {
        let n = self.block_out_channels.len();
        let bad = |m: String| Err(EngineError::Load(format!("unet config: {m}")));
        if n == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.norm_num_groups < 1 {
            return bad(format!("norm_num_groups = {}", self.norm_num_groups));
        }
        for (name, len) in [
            ("down_block_types", self.down_attention.len()),
            ("up_block_types", self.up_attention.len()),
            (
                "transformer_layers_per_block",
                self.transformer_layers_per_block.len(),
            ),
            ("attention_head_dim", self.num_attention_heads.len()),
        ] {
            if len != n {
                return bad(format!("{name} has {len} entries for {n} levels"));
            }
        }
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            if ch <= 0 || ch % self.norm_num_groups != 0 {
                return bad(format!(
                    "block_out_channels[{i}] = {ch} is not a multiple of norm_num_groups"
                ));
            }
            let heads = self.num_attention_heads[i];
            let used = self.down_attention[i] || self.up_attention[n - 1 - i] || i == n - 1;
            if used && (heads <= 0 || ch % heads != 0) {
                return bad(format!(
                    "{ch} channels do not split into {heads} heads (level {i})"
                ));
            }
        }
        if self.layers_per_block < 1 || self.time_embedding_dim < 1 || self.text_embeds_dim() < 0 {
            return bad("layers_per_block, time_embedding_dim or the add_embedding width is invalid".into());
        }
        Ok(())
    }

    /// From a diffusers `unet/config.json`. Missing keys take diffusers' defaults; an option
    /// this implementation does not compute (another block type, attention type, time embedding,
    /// class or encoder projection, ...) is an error naming it.
    pub fn from_json(path: &Path) -> Result<Self, EngineError> {
        let v = crate::flux::read_json(path)?;
        super::unet_config::parse(&v).map_err(|m| EngineError::Load(format!("{}: {m}", path.display())))
    }
}

/// diffusers `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(p: nn::Path<'_>, cin: i64, cout: i64) -> Res<Self> {
        Ok(Self {
            linear_1: Linear::new(&p / "linear_1", cin, cout, true)?,
            linear_2: Linear::new(&p / "linear_2", cout, cout, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Res<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.f_silu_()?)
    }
}

/// diffusers `get_timestep_embedding`: `t` `(n,)` (any dtype) -> `(n, dim)` fp32,
/// `[sin(t f), cos(t f)]` (or `[cos, sin]` flipped), `f_i = exp(-ln(10000) i / (half - shift))`;
/// the same ops in the same order, so the embedding is bit-identical.
pub fn timestep_embedding(t: &Tensor, dim: i64, flip_sin_to_cos: bool, shift: f64) -> Res<Tensor> {
    let half = dim / 2;
    let freqs = Tensor::f_arange(half, (Kind::Float, t.device()))?
        .f_mul_scalar(-(10_000f64.ln()))?
        .f_div_scalar(half as f64 - shift)?
        .f_exp()?; // (half,)
    let args = t
        .f_to_kind(Kind::Float)?
        .f_unsqueeze(1)?
        .f_mul(&freqs.f_unsqueeze(0)?)?; // (n, half)
    let (sin, cos) = (args.f_sin()?, args.f_cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::f_cat(&[cos, sin], -1)?
    } else {
        Tensor::f_cat(&[sin, cos], -1)?
    };
    if dim % 2 == 1 {
        emb.f_constant_pad_nd([0, 1])
    } else {
        Ok(emb)
    }
}

/// The SDXL UNet with its variables in `vs`.
#[derive(Debug)]
pub struct Unet {
    pub config: Config,
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub add_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub vs: nn::VarStore,
    /// The fast paths the forward takes ([`Unet::set_perf`]); [`Perf::REFERENCE`] when built.
    perf: Perf,
}

impl Unet {
    /// Builds the model with randomly initialised weights on `device` in `kind`.
    pub fn new(c: &Config, device: Device, kind: Kind) -> Result<Self, EngineError> {
        c.validate()?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let r = vs.root();
        let (g, eps, temb) = (c.norm_num_groups, c.norm_eps, c.time_embedding_dim);
        let n = c.block_out_channels.len();
        let boc = &c.block_out_channels;
        let lpb = c.layers_per_block;
        let transformer = |p: nn::Path<'_>, ch: i64, level: usize, layers: i64| {
            let heads = c.num_attention_heads[level];
            Transformer2DModel::new(p, ch, heads, layers, c.cross_attention_dim, g)
        };
        let conv_in = Conv2d::new(&r / "conv_in", c.in_channels, boc[0], 3)?;
        let time_embedding = TimestepEmbedding::new(&r / "time_embedding", boc[0], temb)?;
        let add_embedding = TimestepEmbedding::new(
            &r / "add_embedding",
            c.projection_class_embeddings_input_dim,
            temb,
        )?;
        let mut down_blocks = Vec::with_capacity(n);
        for (i, &ch) in boc.iter().enumerate() {
            let p = &r / "down_blocks" / i;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..lpb {
                let cin = if j == 0 { boc[i.saturating_sub(1)] } else { ch };
                resnets.push(ResnetBlock2D::new(&p / "resnets" / j, cin, ch, temb, g, eps)?);
                if c.down_attention[i] {
                    let layers = c.transformer_layers_per_block[i];
                    attentions.push(transformer(&p / "attentions" / j, ch, i, layers)?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Conv2d::new(&p / "downsamplers" / 0 / "conv", ch, ch, 3)?.with_stride(2))
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }
        let top = boc[n - 1];
        let mid = &r / "mid_block";
        let mid_block = MidBlock {
            resnets: vec![
                ResnetBlock2D::new(&mid / "resnets" / 0, top, top, temb, g, eps)?,
                ResnetBlock2D::new(&mid / "resnets" / 1, top, top, temb, g, eps)?,
            ],
            attentions: vec![transformer(
                &mid / "attentions" / 0,
                top,
                n - 1,
                c.transformer_layers_per_block[n - 1],
            )?],
        };
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = top;
        for i in 0..n {
            let level = n - 1 - i; // the resolution level this up block works at
            let (ch, below) = (boc[level], boc[level.saturating_sub(1)]);
            let p = &r / "up_blocks" / i;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..=lpb {
                let skip = if j == lpb { below } else { ch };
                let cin = if j == 0 { prev } else { ch };
                resnets.push(ResnetBlock2D::new(
                    &p / "resnets" / j,
                    cin + skip,
                    ch,
                    temb,
                    g,
                    eps,
                )?);
                if c.up_attention[i] {
                    let layers = c.transformer_layers_per_block[level];
                    attentions.push(transformer(&p / "attentions" / j, ch, level, layers)?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Conv2d::new(&p / "upsamplers" / 0 / "conv", ch, ch, 3)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
            prev = ch;
        }
        let conv_norm_out = GroupNorm::new(&r / "conv_norm_out", g, boc[0], eps)?;
        let conv_out = Conv2d::new(&r / "conv_out", boc[0], c.out_channels, 3)?;
        vs.freeze();
        Ok(Self {
            config: c.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            vs,
            perf: Perf::REFERENCE,
        })
    }

    /// The fast paths the forward takes.
    pub fn perf(&self) -> Perf {
        self.perf
    }

    /// Switches the forward's fast paths, converting the convolution weights' memory layout in
    /// place when `channels_last` changes and stacking the attention projections the first time
    /// `qkv` is on (captured graphs of the old forward must be dropped).
    pub fn set_perf(&mut self, perf: Perf) -> Result<(), EngineError> {
        let _guard = tch::no_grad_guard();
        if perf.channels_last != self.perf.channels_last {
            fast::set_conv_layout(&self.vs, perf.channels_last)?;
        }
        if perf.qkv {
            let transformers = self
                .down_blocks
                .iter_mut()
                .flat_map(|b| b.attentions.iter_mut())
                .chain(self.mid_block.attentions.iter_mut())
                .chain(self.up_blocks.iter_mut().flat_map(|b| b.attentions.iter_mut()));
            for t in transformers {
                for block in &mut t.transformer_blocks {
                    block.fuse_projections()?;
                }
            }
        }
        self.perf = perf;
        Ok(())
    }

    /// The dtype of the weights.
    /// A copy of the weights on `device` (a rank of a multi-GPU plan).
    pub fn replicate(&self, device: Device) -> Result<Self, EngineError> {
        let _guard = tch::no_grad_guard();
        let mut copy = {
            let _zero = crate::nn::NoRandomInit::new();
            Self::new(&self.config, device, self.kind())?
        };
        copy.vs.copy(&self.vs)?;
        Ok(copy)
    }

    pub fn kind(&self) -> Kind {
        self.conv_in.weight.kind()
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(|t| t.numel() as i64).sum()
    }

    /// Builds the model and strictly loads a checkpoint: a diffusers `unet/` folder (single or
    /// sharded `diffusion_pytorch_model[.fp16].safetensors`), one diffusers-layout file, or an
    /// original single-file checkpoint (`model.diffusion_model.*`; its text encoders and VAE
    /// are skipped).
    pub fn load(c: &Config, path: &Path, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let model = {
            let _zero = NoRandomInit::new();
            Self::new(c, device, kind)?
        };
        model.load_weights(path)?;
        Ok(model)
    }

    /// Loads weights from `path` (see [`Unet::load`]) into this model.
    pub fn load_weights(&self, path: &Path) -> Result<(), EngineError> {
        let ck = if path.is_dir() {
            let stem = ["diffusion_pytorch_model", "diffusion_pytorch_model.fp16"]
                .into_iter()
                .find(|s| {
                    path.join(format!("{s}.safetensors")).exists()
                        || path.join(format!("{s}.safetensors.index.json")).exists()
                })
                .unwrap_or("diffusion_pytorch_model");
            Checkpoint::open_dir(path, stem)?
        } else {
            Checkpoint::open_file(path)?
        };
        let original = ck
            .tensors
            .keys()
            .any(|k| k.starts_with(unet_keys::ORIGINAL_PREFIX));
        if original {
            let c = &self.config;
            load_strict(
                &self.vs,
                &ck,
                "sdxl unet (original single-file layout)",
                &|n| Source::Key(unet_keys::original_key(c, n)),
                &|k| !k.starts_with(unet_keys::ORIGINAL_PREFIX),
            )
        } else {
            load_strict(
                &self.vs,
                &ck,
                "sdxl unet (diffusers layout)",
                &|n| Source::Key(n.to_string()),
                &|_| false,
            )
        }
    }

    /// The conditioning `emb` `(b, time_embedding_dim)`: the timestep embedding plus the
    /// `text_time` embedding of the pooled text `text_embeds` `(b, text_dim)` and the
    /// micro-conditioning `time_ids` `(b, 6)` (original h, w, crop top, left, target h, w).
    /// `timestep` is a scalar, `(1,)` or `(b,)`. Like diffusers, the sinusoids are computed in
    /// fp32 and cast to the model dtype.
    pub fn embed(&self, timestep: &Tensor, text_embeds: &Tensor, time_ids: &Tensor) -> Res<Tensor> {
        let c = &self.config;
        let kind = self.kind();
        let (b, _) = text_embeds.size2()?; // (b, text_dim)
        let t = timestep.f_reshape([-1])?.f_expand([b], false)?; // (b,)
        let t_emb = timestep_embedding(&t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?;
        let emb = self.time_embedding.forward(&t_emb.f_to_kind(kind)?)?; // (b, temb)
        let ids = time_ids.f_reshape([-1])?; // (b * 6,)
        let time_embeds =
            timestep_embedding(&ids, c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)?
                .f_reshape([b, -1])?; // (b, 6 * add_dim)
        let add = Tensor::f_cat(&[text_embeds.f_to_kind(kind)?, time_embeds.f_to_kind(kind)?], -1)?;
        emb.f_add(&self.add_embedding.forward(&add)?)
    }

    /// Full forward on one device: `sample` `(b, in_ch, h, w)`, `timestep` scalar or `(b,)`,
    /// `encoder_hidden_states` `(b, seq, cross_dim)`, `text_embeds` `(b, text_dim)`, `time_ids`
    /// `(b, 6)` -> `(b, out_ch, h, w)`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Res<Tensor> {
        let emb = self.embed(timestep, text_embeds, time_ids)?;
        self.forward_embedded(sample, &emb, encoder_hidden_states, &LocalOps::new(&self.perf))
    }

    /// The forward from a precomputed `emb` ([`Unet::embed`]) with the spatial operations of
    /// `spatial` (a row-split forward passes this rank's rows of `sample`). With
    /// [`Perf::channels_last`] the activations run channels-last from `conv_in` on; the output is
    /// contiguous either way.
    pub fn forward_embedded(
        &self,
        sample: &Tensor,
        emb: &Tensor,
        encoder_hidden_states: &Tensor,
        spatial: &dyn SpatialOps,
    ) -> Res<Tensor> {
        let kind = self.kind();
        let temb_act = emb.f_to_kind(kind)?.f_silu()?;
        let context = encoder_hidden_states.f_to_kind(kind)?;
        let c = Cond {
            temb_act: &temb_act,
            context: &context,
            spatial,
            attention: self.perf.attention,
            fused: self.perf.fused,
            addln: self.perf.addln,
            stacked: self.perf.qkv,
        };
        let sample = sample.f_to_kind(kind)?;
        let sample = if self.perf.channels_last {
            fast::to_channels_last(&sample)?
        } else {
            sample
        };
        let (h, mut skips) = self.down(&sample, &c)?;
        let h = self.mid_block.forward(&h, &c)?;
        self.up(&h, &mut skips, &c)?.f_contiguous()
    }

    /// `conv_in` and the down blocks: `(b, in_ch, h, w)` -> the lowest-resolution features and
    /// the skip connections (`conv_in`'s output first).
    pub fn down(&self, sample: &Tensor, c: &Cond<'_>) -> Res<(Tensor, Vec<Tensor>)> {
        let mut h = c.spatial.conv(&self.conv_in, sample)?; // (b, boc[0], h, w)
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, c, &mut skips)?;
        }
        Ok((h, skips))
    }

    /// The up blocks and the output head: consumes `skips` -> `(b, out_ch, h, w)`.
    pub fn up(&self, x: &Tensor, skips: &mut Vec<Tensor>, c: &Cond<'_>) -> Res<Tensor> {
        let mut h = x.shallow_clone();
        for block in &self.up_blocks {
            h = block.forward(&h, c, skips)?;
        }
        let h = c.spatial.group_norm_silu(&self.conv_norm_out, h, None)?;
        c.spatial.conv(&self.conv_out, &h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDXL base builds the 2,567,463,684 parameters of diffusers' SDXL UNet (bf16, zero
    /// initialised: about 5 GB of host memory).
    #[test]
    #[ignore = "allocates the full 2.6B-parameter model (~5 GB)"]
    fn sdxl_base_has_the_parameter_count_of_diffusers_sdxl_unet() {
        let _zero = NoRandomInit::new();
        let model = Unet::new(&Config::sdxl_base(), Device::Cpu, Kind::BFloat16).unwrap();
        assert_eq!(model.num_parameters(), 2_567_463_684);
    }

    /// The timestep sinusoids are diffusers' `get_timestep_embedding(t, 4, flip_sin_to_cos,
    /// 0)`: frequencies 1 and 1/100, cosines first when flipped.
    #[test]
    fn timestep_embedding_orders_cos_first_when_flipped() -> Res<()> {
        let t = Tensor::from_slice(&[0.0f32, 2.0]);
        let flipped = timestep_embedding(&t, 4, true, 0.0)?;
        let plain = timestep_embedding(&t, 4, false, 0.0)?;
        let want = |x: f64| [x.cos(), (x / 100.0).cos(), x.sin(), (x / 100.0).sin()];
        for (row, x) in [(0, 0.0), (1, 2.0)] {
            let got = Vec::<f32>::try_from(flipped.f_get(row)?)?;
            for (g, w) in got.iter().zip(want(x)) {
                assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {:?}", want(x));
            }
            let got = Vec::<f32>::try_from(plain.f_get(row)?)?;
            let w = want(x);
            assert_eq!(got.len(), 4);
            assert!((got[0] as f64 - w[2]).abs() < 1e-6 && (got[2] as f64 - w[0]).abs() < 1e-6);
        }
        assert_eq!(timestep_embedding(&t, 5, true, 0.0)?.size(), vec![2, 5]);
        Ok(())
    }

    /// Counts the calls of each [`SpatialOps`] operation and computes them on one device.
    #[derive(Default)]
    struct Counting {
        group_norm: std::cell::Cell<usize>,
        conv3x3: std::cell::Cell<usize>,
        conv1x1: std::cell::Cell<usize>,
        self_attention: std::cell::Cell<usize>,
        upsample: std::cell::Cell<usize>,
    }

    fn bump(c: &std::cell::Cell<usize>) {
        c.set(c.get() + 1);
    }

    impl SpatialOps for Counting {
        fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor> {
            bump(&self.group_norm);
            SingleDevice.group_norm(norm, x)
        }
        fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
            match conv.weight.size()[2..] {
                [3, 3] => bump(&self.conv3x3),
                _ => bump(&self.conv1x1),
            }
            SingleDevice.conv(conv, x)
        }
        fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
            bump(&self.self_attention);
            SingleDevice.attention(q, k, v)
        }
        fn upsample_nearest(&self, x: &Tensor, size: [i64; 2]) -> Res<Tensor> {
            bump(&self.upsample);
            SingleDevice.upsample_nearest(x, size)
        }
    }

    /// Every GroupNorm, convolution, self-attention and upsampling of the forward goes through
    /// the [`SpatialOps`] it is given (what a row-split forward relies on), and the single-device
    /// one computes exactly [`Unet::forward`]. The tiny config has 17 resnets (2 GroupNorms and 2
    /// 3x3 convs each; 10 of them change the channel count and have a 1x1 shortcut: the first
    /// of level 1 and all 9 of the up path), 11 transformers (1 GroupNorm each) holding 22
    /// transformer blocks, the output GroupNorm, `conv_in`, `conv_out`, 2 downsamplers and 2
    /// upsamplers.
    #[test]
    fn every_spatial_operation_of_the_forward_goes_through_the_spatial_seam() -> Res<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(12);
        let c = Config::tiny();
        let model =
            Unet::new(&c, Device::Cpu, Kind::Float).map_err(|e| tch::TchError::Torch(e.to_string()))?;
        let opts = (Kind::Float, Device::Cpu);
        let sample = Tensor::f_randn([1, 4, 8, 12], opts)?;
        let ctx = Tensor::f_randn([1, 7, c.cross_attention_dim], opts)?;
        let text = Tensor::f_randn([1, c.text_embeds_dim()], opts)?;
        let ids = Tensor::from_slice(&[64f32, 96., 0., 0., 64., 96.]).f_reshape([1, 6])?;
        let t = Tensor::from_slice(&[700.0f32]);
        let counting = Counting::default();
        let emb = model.embed(&t, &text, &ids)?;
        let got = model.forward_embedded(&sample, &emb, &ctx, &counting)?;
        let want = model.forward(&sample, &t, &ctx, &text, &ids)?;
        assert!(bool::try_from(got.f_eq_tensor(&want)?.f_all()?)?);
        assert_eq!(counting.group_norm.get(), 17 * 2 + 11 + 1);
        assert_eq!(counting.conv3x3.get(), 17 * 2 + 2 + 2 + 2);
        assert_eq!(counting.conv1x1.get(), 10);
        assert_eq!(counting.self_attention.get(), 22);
        assert_eq!(counting.upsample.get(), 2);
        Ok(())
    }

    /// A scalar timestep is broadcast over the batch: the same output as the timestep repeated
    /// per sample.
    #[test]
    fn a_scalar_timestep_equals_the_timestep_repeated_over_the_batch() -> Res<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(11);
        let c = Config::tiny();
        let model =
            Unet::new(&c, Device::Cpu, Kind::Float).map_err(|e| tch::TchError::Torch(e.to_string()))?;
        let opts = (Kind::Float, Device::Cpu);
        let sample = Tensor::f_randn([2, 4, 8, 8], opts)?;
        let ctx = Tensor::f_randn([2, 5, c.cross_attention_dim], opts)?;
        let text = Tensor::f_randn([2, c.text_embeds_dim()], opts)?;
        let ids = Tensor::from_slice(&[64f32, 64., 0., 0., 64., 64.]).f_expand([2, 6], false)?;
        let scalar = model.forward(&sample, &Tensor::from(500.0f32), &ctx, &text, &ids)?;
        let batch = model.forward(
            &sample,
            &Tensor::from_slice(&[500.0f32, 500.0]),
            &ctx,
            &text,
            &ids,
        )?;
        assert_eq!(scalar.size(), vec![2, 4, 8, 8]);
        assert!(bool::try_from(scalar.f_eq_tensor(&batch)?.f_all()?)?);
        Ok(())
    }
}
