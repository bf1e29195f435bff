//! The AutoencoderKL decoder of Flux (16 latent channels, no post-quant conv), with diffusers'
//! key names (`decoder.up_blocks.N.resnets.M.conv1`, `decoder.mid_block.attentions.0.to_q`, ...).

use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::layers::{Conv2d, GroupNorm, Linear, Res, sdpa};
use super::weights::{Checkpoint, Source, load_strict};
use crate::EngineError;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub latent_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub norm_num_groups: i64,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl Config {
    pub fn flux() -> Self {
        Self {
            latent_channels: 16,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
        }
    }

    pub fn dev() -> Self {
        Self::flux()
    }

    pub fn schnell() -> Self {
        Self::flux()
    }

    /// Same depth (so the 8x spatial factor holds), tiny widths.
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![16, 16, 32, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            ..Self::flux()
        }
    }

    /// Pixels per latent pixel.
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn from_json(path: &Path) -> Result<Self, EngineError> {
        let v = super::read_json(path)?;
        let i = |k: &str| super::json_i64(&v, k, path);
        let f = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let blocks = v
            .get("block_out_channels")
            .and_then(|b| b.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_i64()).collect::<Vec<_>>())
            .ok_or_else(|| EngineError::Load(format!("{}: no block_out_channels", path.display())))?;
        if v.get("use_post_quant_conv")
            .and_then(|x| x.as_bool())
            .unwrap_or(true)
        {
            return Err(EngineError::Load(format!(
                "{}: only VAEs without post_quant_conv (Flux) are supported",
                path.display()
            )));
        }
        Ok(Self {
            latent_channels: i("latent_channels")?,
            out_channels: i("out_channels")?,
            block_out_channels: blocks,
            layers_per_block: i("layers_per_block")?,
            norm_num_groups: i("norm_num_groups")?,
            scaling_factor: f("scaling_factor", 0.3611),
            shift_factor: f("shift_factor", 0.1159),
        })
    }
}

#[derive(Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(p: nn::Path<'_>, cin: i64, cout: i64, groups: i64) -> Res<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&p / "norm1", groups, cin, 1e-6)?,
            conv1: Conv2d::new(&p / "conv1", cin, cout, 3)?,
            norm2: GroupNorm::new(&p / "norm2", groups, cout, 1e-6)?,
            conv2: Conv2d::new(&p / "conv2", cout, cout, 3)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(&p / "conv_shortcut", cin, cout, 1)?)
            } else {
                None
            },
        })
    }

    /// SiLU and the residual add run in place on fresh tensors (the norm's and the conv's
    /// outputs): at 1024² each is a (1, 128, 1024, 1024) activation the decode's peak would hold.
    fn forward_with(&self, x: &Tensor, ops: &dyn Spatial) -> Res<Tensor> {
        let h = ops.conv(&self.conv1, &ops.group_norm(&self.norm1, x)?.f_silu_()?)?;
        let mut h = ops.conv(&self.conv2, &ops.group_norm(&self.norm2, &h)?.f_silu_()?)?;
        match &self.conv_shortcut {
            Some(c) => h.f_add_(&ops.conv(c, x)?),
            None => h.f_add_(x),
        }
    }
}

/// Single-head spatial self-attention of the mid block.
#[derive(Debug)]
pub struct AttentionBlock {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl AttentionBlock {
    fn new(p: nn::Path<'_>, ch: i64, groups: i64) -> Res<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(&p / "group_norm", groups, ch, 1e-6)?,
            to_q: Linear::new(&p / "to_q", ch, ch, true)?,
            to_k: Linear::new(&p / "to_k", ch, ch, true)?,
            to_v: Linear::new(&p / "to_v", ch, ch, true)?,
            to_out: Linear::new(&p / "to_out" / 0, ch, ch, true)?,
        })
    }

    fn forward_with(&self, x: &Tensor, ops: &dyn Spatial) -> Res<Tensor> {
        let (b, c, h, w) = x.size4()?;
        let t = ops
            .group_norm(&self.group_norm, x)?
            .f_reshape([b, c, h * w])?
            .f_transpose(1, 2)?; // (b, hw, c)
        let q = self.to_q.forward(&t)?.f_unsqueeze(1)?; // (b, 1, hw, c)
        let k = self.to_k.forward(&t)?.f_unsqueeze(1)?;
        let v = self.to_v.forward(&t)?.f_unsqueeze(1)?;
        let a = ops.attend(&q, &k, &v)?.f_squeeze_dim(1)?; // (b, hw, c)
        let a = self
            .to_out
            .forward(&a)?
            .f_transpose(1, 2)?
            .f_reshape([b, c, h, w])?;
        x.f_add(&a)
    }
}

#[derive(Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock>,
    pub upsampler: Option<Conv2d>,
}

#[derive(Debug)]
pub struct Decoder {
    pub config: Config,
    pub conv_in: Conv2d,
    pub mid_resnets: Vec<ResnetBlock>,
    pub mid_attention: AttentionBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub vs: nn::VarStore,
}

impl Decoder {
    pub fn new(c: &Config, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let r = vs.root() / "decoder";
        let g = c.norm_num_groups;
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let Some(&top) = rev.first() else {
            return Err(EngineError::Load("vae config has no block_out_channels".into()));
        };
        let conv_in = Conv2d::new(&r / "conv_in", c.latent_channels, top, 3)?;
        let mid = &r / "mid_block";
        let mid_resnets = (0..2)
            .map(|i| ResnetBlock::new(&mid / "resnets" / i, top, top, g))
            .collect::<Res<Vec<_>>>()?;
        let mid_attention = AttentionBlock::new(&mid / "attentions" / 0, top, g)?;
        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &ch) in rev.iter().enumerate() {
            let p = &r / "up_blocks" / i;
            let mut resnets = Vec::new();
            for j in 0..=c.layers_per_block {
                let cin = if j == 0 { prev } else { ch };
                resnets.push(ResnetBlock::new(&p / "resnets" / j, cin, ch, g)?);
            }
            let upsampler = if i + 1 < rev.len() {
                Some(Conv2d::new(&p / "upsamplers" / 0 / "conv", ch, ch, 3)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            prev = ch;
        }
        let conv_norm_out = GroupNorm::new(&r / "conv_norm_out", g, prev, 1e-6)?;
        let conv_out = Conv2d::new(&r / "conv_out", prev, c.out_channels, 3)?;
        vs.freeze();
        Ok(Self {
            config: c.clone(),
            conv_in,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out,
            conv_out,
            vs,
        })
    }

    /// A copy of these weights on `device` (each rank of a patch-parallel decode holds one; the
    /// decoder is ~100 MB in bf16).
    pub fn replicate(&self, device: Device) -> Result<Self, EngineError> {
        let _guard = tch::no_grad_guard();
        let kind = self.conv_in.weight.kind();
        let mut copy = {
            let _zero = super::layers::NoRandomInit::new();
            Self::new(&self.config, device, kind)?
        };
        copy.vs.copy(&self.vs)?;
        Ok(copy)
    }

    /// Loads the decoder from a diffusers `vae/` folder; the encoder half (`encoder.*`,
    /// `quant_conv.*`) is skipped.
    pub fn load(c: &Config, dir: &Path, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let model = {
            let _zero = super::layers::NoRandomInit::new();
            Self::new(c, device, kind)?
        };
        let ck = Checkpoint::open_dir(dir, "diffusion_pytorch_model")?;
        load_strict(
            &model.vs,
            &ck,
            "vae decoder",
            &|n| Source::Key(n.to_string()),
            &|k| k.starts_with("encoder.") || k.starts_with("quant_conv."),
        )?;
        Ok(model)
    }

    /// Scaled latents `z` `(b, latent_ch, h, w)` (as the transformer produces them) -> image in
    /// [-1, 1] `(b, 3, 8h, 8w)`. Applies `z / scaling + shift` first.
    pub fn decode(&self, z: &Tensor) -> Res<Tensor> {
        self.forward(&self.unscale(z)?)
    }

    /// Raw decoder on unscaled latents.
    pub fn forward(&self, z: &Tensor) -> Res<Tensor> {
        self.forward_with(z, &Whole)
    }

    /// `z / scaling + shift`: the transformer's latent space -> the decoder's input.
    pub(crate) fn unscale(&self, z: &Tensor) -> Res<Tensor> {
        z.f_div_scalar(self.config.scaling_factor)?
            .f_add_scalar(self.config.shift_factor)
    }

    /// The decoder with its spatial operations supplied by `ops` ([`Whole`] on one device; a
    /// row-split decode passes halo-exchanging ones, see `parallel::vae`).
    pub(crate) fn forward_with(&self, z: &Tensor, ops: &dyn Spatial) -> Res<Tensor> {
        let mut h = ops.conv(&self.conv_in, z)?;
        h = self.mid_resnets[0].forward_with(&h, ops)?;
        h = self.mid_attention.forward_with(&h, ops)?;
        h = self.mid_resnets[1].forward_with(&h, ops)?;
        for up in &self.up_blocks {
            for r in &up.resnets {
                h = r.forward_with(&h, ops)?;
            }
            if let Some(conv) = &up.upsampler {
                h = ops.conv(conv, &ops.upsample(&h)?)?;
            }
        }
        let h = ops.group_norm(&self.conv_norm_out, &h)?.f_silu_()?;
        ops.conv(&self.conv_out, &h)
    }
}

/// The decoder's operations that look beyond a pixel's own row: everything else (SiLU, the
/// linear projections, residual adds) is row-local. A decode split into row bands (one per
/// GPU) implements these with halo exchanges and global statistics.
pub(crate) trait Spatial {
    /// A convolution `(b, cin, h, w) -> (b, cout, h, w)` (kernel 1 or 3, stride 1, zero padding).
    fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor>;
    /// GroupNorm with the statistics of the whole image.
    fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor>;
    /// Single-head attention of the queries `(b, 1, n, c)` over the keys and values of every
    /// pixel of the image (`k`, `v` hold this band's pixels).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor>;
    /// Nearest-neighbour 2x upsampling.
    fn upsample(&self, x: &Tensor) -> Res<Tensor>;
}

/// The whole image on one device.
pub(crate) struct Whole;

impl Spatial for Whole {
    fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
        conv.forward(x)
    }

    fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor> {
        norm.forward(x)
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        sdpa(q, k, v, None, false, None)
    }

    fn upsample(&self, x: &Tensor) -> Res<Tensor> {
        let (_, _, h, w) = x.size4()?;
        x.f_upsample_nearest2d([h * 2, w * 2], None, None)
    }
}
